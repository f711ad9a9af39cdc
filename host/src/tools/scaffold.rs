//! `edgebridge plugin new` (a plugin crate that builds anywhere) and `edgebridge plugin
//! install` (a built component copied into a plugins folder under its plugin name, after it
//! was checked to load).

use std::path::{Path, PathBuf};

/// The SDK of the sources this binary was built from, when they are still there.
pub fn default_sdk() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/sdk");
    p.join("Cargo.toml")
        .is_file()
        .then(|| p.canonicalize().unwrap_or(p))
}

/// Where the generated crate gets `edgebridge-plugin-sdk` from.
#[derive(Debug, Clone, PartialEq)]
pub enum Sdk {
    /// A path to the SDK crate (`plugins/sdk` of an edgebridge checkout).
    Path(PathBuf),
    /// A git repository holding it (cargo finds the crate inside).
    Git(String),
    /// A version requirement on crates.io (`--sdk 0.1`), once the SDK is published there.
    Version(String),
}

impl Sdk {
    /// `--sdk`: a git URL (`https://…`, `ssh://…`, `git@…`, `git+…`), a version on crates.io
    /// (`0.1`, `=0.1.0`, `^0.1`), or a path to the SDK folder (checked).
    pub fn parse(arg: &str) -> Result<Sdk, String> {
        let version = arg.trim_start_matches(['=', '^', '~']);
        if !version.is_empty()
            && version.starts_with(|c: char| c.is_ascii_digit())
            && version.chars().all(|c| c.is_ascii_digit() || c == '.')
        {
            return Ok(Sdk::Version(arg.to_string()));
        }
        if let Some(url) = arg.strip_prefix("git+") {
            return Ok(Sdk::Git(url.to_string()));
        }
        if ["https://", "http://", "ssh://", "git@"]
            .iter()
            .any(|p| arg.starts_with(p))
        {
            return Ok(Sdk::Git(arg.to_string()));
        }
        let path = PathBuf::from(arg);
        let manifest = std::fs::read_to_string(path.join("Cargo.toml"))
            .map_err(|e| format!("--sdk {arg}: {}: {e}", path.join("Cargo.toml").display()))?;
        if !manifest.contains("name = \"edgebridge-plugin-sdk\"") {
            return Err(format!(
                "--sdk {arg}: {} is not the edgebridge-plugin-sdk crate (plugins/sdk of an edgebridge checkout)",
                path.join("Cargo.toml").display()
            ));
        }
        Ok(Sdk::Path(path.canonicalize().unwrap_or(path)))
    }

    fn dependency(&self) -> String {
        match self {
            Sdk::Path(p) => format!("{{ path = {} }}", toml_string(&p.display().to_string())),
            Sdk::Git(url) => format!("{{ git = {} }}", toml_string(url)),
            Sdk::Version(v) => toml_string(v),
        }
    }
}

fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A plugin name: what the bridge calls the plugin (its file is `<name>.wasm`, its policy
/// `metadata.name`) and the crate's name. Lowercase letters, digits and `-`, starting with a
/// letter, at most 64 characters.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "plugin name \"{name}\": use lowercase letters, digits and '-', starting with a letter (at most 64 characters), e.g. \"site-prefix\""
        ))
    }
}

/// What `plugin new` makes.
#[derive(Debug, Clone)]
pub struct NewPlugin {
    /// Plugin and crate name.
    pub name: String,
    /// A `message-filter` instead of a `route-mapper`.
    pub filter: bool,
    /// A `route-aggregator` (WIT 0.2.0: windows and timers) instead of a `route-mapper`.
    pub aggregator: bool,
    /// Where the SDK comes from.
    pub sdk: Sdk,
    /// The crate's folder (must not exist, or be empty).
    pub dir: PathBuf,
}

/// Writes the crate; returns the files written.
pub fn new_plugin(p: &NewPlugin) -> Result<Vec<PathBuf>, String> {
    check_name(&p.name)?;
    if p.dir.exists()
        && std::fs::read_dir(&p.dir)
            .map_err(|e| format!("{}: {e}", p.dir.display()))?
            .next()
            .is_some()
    {
        return Err(format!(
            "{}: exists and is not empty; choose another folder (--dir) or name",
            p.dir.display()
        ));
    }
    let type_name: String = p
        .name
        .split('-')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect();
    let lib = p.name.replace('-', "_");
    let world = if p.aggregator {
        "route-aggregator"
    } else if p.filter {
        "message-filter"
    } else {
        "route-mapper"
    };
    let fill = |t: &str| {
        t.replace("{{name}}", &p.name)
            .replace("{{type}}", &type_name)
            .replace("{{lib}}", &lib)
            .replace("{{world}}", world)
            .replace("{{sdk}}", &p.sdk.dependency())
    };
    let readme = p.readme();
    let files: [(&str, &str); 6] = [
        ("Cargo.toml", CARGO_TOML),
        (
            "src/lib.rs",
            if p.aggregator {
                AGGREGATOR_LIB
            } else if p.filter {
                FILTER_LIB
            } else {
                MAPPER_LIB
            },
        ),
        ("README.md", &readme),
        (
            "policy.yaml",
            if p.aggregator {
                AGGREGATOR_POLICY
            } else {
                POLICY
            },
        ),
        (
            "messages.jsonl",
            if p.aggregator {
                AGGREGATOR_MESSAGES
            } else if p.filter {
                FILTER_MESSAGES
            } else {
                MAPPER_MESSAGES
            },
        ),
        (".gitignore", "/target\n"),
    ];
    let mut written = Vec::new();
    for (rel, template) in files {
        let path = p.dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        std::fs::write(&path, fill(template)).map_err(|e| format!("{}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// What `plugin install` did.
#[derive(Debug, Clone)]
pub struct Installed {
    /// The plugin name.
    pub name: String,
    /// Where it is now.
    pub path: PathBuf,
    /// Its world.
    pub world: &'static str,
    /// Its size.
    pub size: usize,
    /// Its sha256.
    pub sha256: String,
}

/// The plugin name of a built file: its stem with `_` made `-` (cargo writes `site_prefix.wasm`
/// for the crate `site-prefix`).
pub fn name_of(file: &Path) -> Result<String, String> {
    let stem = file
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| format!("{}: no file name", file.display()))?;
    let name = stem.replace('_', "-");
    check_name(&name).map_err(|e| format!("{e}; give one with --name"))?;
    Ok(name)
}

/// Checks that `file` loads as plugin `name` under its policy from `policies_dir` (as the
/// bridge would load it), then copies it into `plugins_dir` as `<name>.wasm` atomically: a
/// dotfile the bridge ignores is written, flushed and renamed, so a running bridge never sees
/// half a file.
pub fn install(
    file: &Path,
    name: Option<&str>,
    plugins_dir: &Path,
    policies_dir: &Path,
) -> Result<Installed, String> {
    let name = match name {
        Some(n) => {
            check_name(n)?;
            n.to_string()
        }
        None => name_of(file)?,
    };
    let super::plugin_test::LoadedFile { loaded, bytes, .. } =
        super::plugin_test::load_file(file, &name, policies_dir)
            .map_err(|e| format!("not installed: {e}"))?;
    std::fs::create_dir_all(plugins_dir)
        .map_err(|e| format!("plugins folder {}: {e}", plugins_dir.display()))?;
    let dest = plugins_dir.join(format!("{name}.wasm"));
    let tmp = plugins_dir.join(format!(".{name}.wasm.installing"));
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &dest)
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("{}: {e}", dest.display()));
    }
    Ok(Installed {
        name,
        path: dest,
        world: loaded.world.as_str(),
        size: loaded.size,
        sha256: loaded.sha256.clone(),
    })
}

const CARGO_TOML: &str = r##"[package]
name = "{{name}}"
version = "0.1.0"
edition = "2024"
description = "An edgebridge {{world}} plugin"
publish = false

[lib]
crate-type = ["cdylib"]

[dependencies]
edgebridge-plugin-sdk = {{sdk}}
serde = { version = "1", features = ["derive"] }

# Small components: one instance runs per route that uses the plugin.
[profile.release]
opt-level = "s"
lto = true
codegen-units = 1
panic = "abort"
strip = "debuginfo"

# For `cargo component build --release` (cargo-component 0.21): the bindings come from the SDK,
# which carries the WIT, so it has nothing to generate; this names the component's package.
# Plain `cargo build --target wasm32-wasip2 --release` ignores it.
[package.metadata.component]
package = "edgebridge:{{name}}"

# Its own workspace, wherever the folder is.
[workspace]
"##;

const MAPPER_LIB: &str = r##"//! `{{name}}`: an edgebridge route-mapper plugin.
//!
//! It forwards every message under a prefix: a message going to `factory/temp` goes to
//! `<prefix>/factory/temp`. Config (the route's `config:`; without one, `prefix: edge`):
//!
//! ```yaml
//! plugins:
//!   - name: {{name}}
//!     config: { prefix: edge }
//! ```

use edgebridge_plugin_sdk::*;
use serde::Deserialize;

/// The route's `config:`, checked before the route starts (an error names the field).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    /// Topic levels put in front of the target topic (default `edge`).
    #[serde(default = "default_prefix")]
    prefix: String,
}

fn default_prefix() -> String {
    "edge".to_string()
}

/// One value per route: its fields are the plugin's state between messages.
pub struct {{type}} {
    prefix: String,
    forwarded: u64,
}

impl Mapper for {{type}} {
    type Config = Config;

    fn new(config: Config) -> Result<Self, InitError> {
        if config.prefix.is_empty() || config.prefix.contains(['+', '#']) {
            return Err(InitError::invalid(
                "`prefix` must be topic levels without + or #, e.g. \"edge\"",
            ));
        }
        Ok({{type}} {
            prefix: config.prefix,
            forwarded: 0,
        })
    }

    fn map_message(&mut self, ctx: Context, msg: Message) -> Result<Decision, String> {
        self.forwarded += 1;
        log::info(&format!("message {} on {}", self.forwarded, msg.topic));
        // `Emitted::to` keeps the payload, QoS, retain flag and properties.
        Ok(Decision::Emit(vec![Emitted::to(format!(
            "{}/{}",
            self.prefix, ctx.target
        ))]))
    }
}

export_mapper!({{type}});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_goes_in_front_of_the_target() {
        let mut plugin = testing::mapper::<{{type}}>(r#"{"prefix": "edge"}"#).unwrap();
        let decision = plugin
            .map_message(
                Context::new("telemetry", "factory/temp"),
                Message::new("factory/temp", "21.5"),
            )
            .unwrap();
        assert_eq!(
            decision,
            Decision::Emit(vec![Emitted::to("edge/factory/temp")])
        );
        assert_eq!(
            testing::logs(),
            vec![(testing::Level::Info, "message 1 on factory/temp".to_string())]
        );
    }

    #[test]
    fn a_bad_config_is_refused() {
        assert!(testing::mapper::<{{type}}>(r#"{"prefix": "a/#"}"#).is_err());
        assert!(testing::mapper::<{{type}}>(r#"{"prefx": "a"}"#).is_err());
    }

    #[test]
    fn without_a_config_the_prefix_is_edge() {
        let mut plugin = testing::mapper::<{{type}}>("{}").unwrap();
        let decision = plugin
            .map_message(Context::new("r", "a/b"), Message::new("a/b", "x"))
            .unwrap();
        assert_eq!(decision, Decision::Emit(vec![Emitted::to("edge/a/b")]));
    }
}
"##;

const FILTER_LIB: &str = r##"//! `{{name}}`: an edgebridge message-filter plugin.
//!
//! It keeps messages whose payload is at most `maxBytes` long and drops the others. Config
//! (the route's `config:`; without one, `maxBytes: 1024`):
//!
//! ```yaml
//! plugins:
//!   - name: {{name}}
//!     config: { maxBytes: 1024 }
//! ```

use edgebridge_plugin_sdk::*;
use serde::Deserialize;

/// The route's `config:`, checked before the route starts (an error names the field).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    /// Longest payload kept, in bytes (default 1024).
    #[serde(default = "default_max_bytes")]
    max_bytes: usize,
}

fn default_max_bytes() -> usize {
    1024
}

/// One value per route: its fields are the plugin's state between messages.
pub struct {{type}} {
    max_bytes: usize,
    dropped: u64,
}

impl Filter for {{type}} {
    type Config = Config;

    fn new(config: Config) -> Result<Self, InitError> {
        Ok({{type}} {
            max_bytes: config.max_bytes,
            dropped: 0,
        })
    }

    fn keep(&mut self, _ctx: Context, msg: Message) -> Result<bool, String> {
        if msg.payload.len() <= self.max_bytes {
            return Ok(true);
        }
        self.dropped += 1;
        log::info(&format!(
            "dropped {} ({} bytes); {} so far",
            msg.topic,
            msg.payload.len(),
            self.dropped
        ));
        Ok(false)
    }
}

export_filter!({{type}});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_payloads_are_dropped() {
        let mut plugin = testing::filter::<{{type}}>(r#"{"maxBytes": 4}"#).unwrap();
        let ctx = Context::default();
        assert!(plugin.keep(ctx.clone(), Message::new("a/b", "1234")).unwrap());
        assert!(!plugin.keep(ctx, Message::new("a/b", "12345")).unwrap());
        assert_eq!(testing::logs().len(), 1);
    }

    #[test]
    fn a_bad_config_is_refused() {
        assert!(testing::filter::<{{type}}>(r#"{"maxBytes": -1}"#).is_err());
        assert!(testing::filter::<{{type}}>(r#"{"maxByte": 1}"#).is_err());
        assert!(testing::filter::<{{type}}>("{}").is_ok(), "maxBytes defaults to 1024");
    }
}
"##;

const AGGREGATOR_LIB: &str = r##"//! `{{name}}`: an edgebridge route-aggregator plugin (WIT 0.2.0): the average of a numeric
//! JSON field per topic over a window of `seconds`, sent when the window's timer fires.
//!
//! Every message is held in its topic's window; the bridge acknowledges it to its source
//! only when the target acknowledged the window's average.

use std::collections::BTreeMap;

use edgebridge_plugin_sdk::*;
use serde::Deserialize;

/// The route's `config:`; unknown fields are refused, naming the field.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// The number to average: a top-level field or a dotted path.
    #[serde(default = "default_field")]
    field: String,
    /// The window's length.
    #[serde(default = "default_seconds")]
    seconds: u64,
}

fn default_field() -> String {
    "value".into()
}

fn default_seconds() -> u64 {
    10
}

struct {{type}} {
    field: String,
    seconds: u64,
    /// Sum and count per topic of the open windows.
    windows: BTreeMap<String, (f64, u64)>,
}

impl {{type}} {
    fn close(&mut self, topic: &str) -> Option<Release> {
        let (sum, count) = self.windows.remove(topic)?;
        timers::cancel(topic);
        let body = format!("{{\"avg\": {}, \"count\": {count}}}", sum / count as f64);
        Some(Release::new(topic, vec![Emitted::to(topic).payload(body)]))
    }
}

impl Aggregator for {{type}} {
    type Config = Config;

    fn new(config: Config) -> Result<Self, InitError> {
        if config.seconds == 0 {
            return Err(InitError::invalid("`seconds` must be at least 1"));
        }
        Ok({{type}} {
            field: config.field,
            seconds: config.seconds,
            windows: BTreeMap::new(),
        })
    }

    fn on_message(&mut self, ctx: Context, msg: Message) -> Result<Reply, String> {
        let Some(v) = json::number(&msg.payload, &self.field) else {
            return Ok(Reply::drop(format!("no number at `{}`", self.field)));
        };
        let window = self.windows.entry(ctx.target.clone()).or_insert((0.0, 0));
        if window.1 == 0 {
            // The window opens: the bridge calls on_timer when it is due.
            timers::set(&ctx.target, self.seconds * 1000)?;
        }
        window.0 += v;
        window.1 += 1;
        Ok(Reply::hold(ctx.target))
    }

    fn on_timer(&mut self, _ctx: Context, topic: String) -> Result<Vec<Release>, String> {
        Ok(self.close(&topic).into_iter().collect())
    }

    fn flush(&mut self, _ctx: Context, _reason: FlushReason) -> Result<Vec<Release>, String> {
        let topics: Vec<String> = self.windows.keys().cloned().collect();
        Ok(topics.iter().filter_map(|t| self.close(t)).collect())
    }
}

export_aggregator!({{type}});

#[cfg(test)]
mod tests {
    use super::*;
    use edgebridge_plugin_sdk::testing;

    #[test]
    fn a_window_sends_its_average_when_its_timer_fires() {
        let mut plugin = testing::aggregator::<{{type}}>(r#"{"seconds": 10}"#).unwrap();
        for v in [20.0, 22.0] {
            let msg = Message::new("s/temp", format!("{{\"value\": {v}}}"));
            let reply = plugin.message(Context::new("r", "s/temp"), msg).unwrap();
            assert_eq!(reply, Reply::hold("s/temp"));
            testing::advance(100);
        }
        assert!(plugin.advance(9_700).unwrap().is_empty(), "not yet");
        let out = plugin.advance(100).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(
            out[0].messages[0],
            Emitted::to("s/temp").payload("{\"avg\": 21, \"count\": 2}")
        );
    }

    #[test]
    fn a_stop_flushes_the_open_windows() {
        let mut plugin = testing::aggregator::<{{type}}>("{}").unwrap();
        let msg = Message::new("t", "{\"value\": 1}");
        plugin.message(Context::new("r", "t"), msg).unwrap();
        assert_eq!(plugin.flush(FlushReason::Stop).unwrap().len(), 1);
    }

    #[test]
    fn a_bad_config_is_refused() {
        assert!(testing::aggregator::<{{type}}>(r#"{"seconds": 0}"#).is_err());
        assert!(testing::aggregator::<{{type}}>(r#"{"second": 1}"#).is_err());
    }
}
"##;

const AGGREGATOR_POLICY: &str = r##"# What the bridge lets `{{name}}` do. Copy it into the bridge's policies folder
# (--policies-dir): an aggregator needs `timers`, which the default policy does not grant.
apiVersion: edgebridge.dev/v1alpha1
kind: PluginPolicy
metadata:
  name: {{name}}
spec:
  imports: [log, clock, timers]   # add kv for state, metrics for its own metrics
  timers: {max: 10000, minPeriod: 1s}   # one timer per topic with an open window
  timePerMessage: 10ms
  memory: 16Mi
"##;

const AGGREGATOR_MESSAGES: &str = r##"{"topic": "sensors/temp", "payload": {"value": 20.5}, "at": 0}
{"topic": "sensors/temp", "payload": {"value": 21.5}, "at": 100}
{"topic": "sensors/temp", "payload": {"value": 22.5}, "at": 10500}
"##;

const POLICY: &str = r##"# What the bridge lets `{{name}}` do. Copy it into the bridge's policies folder
# (--policies-dir); without it the plugin gets the default policy (policies/README.md).
apiVersion: edgebridge.dev/v1alpha1
kind: PluginPolicy
metadata:
  name: {{name}}
spec:
  imports: [log, clock]      # add kv to use the key-value state
  timePerMessage: 10ms
  memory: 16Mi
  maxEmit: 8
  emitTopics: ["#"]          # topics it may emit to; the default is the route's target namespace
"##;

const MAPPER_MESSAGES: &str = r##"{"topic": "factory/temp", "payload": "21.5"}
{"topic": "factory/line3/temp", "payload": {"celsius": 22.1}, "userProperties": {"unit": "C"}}
"##;

const FILTER_MESSAGES: &str = r##"{"topic": "factory/temp", "payload": "21.5"}
{"topic": "factory/temp", "payload": "a payload longer than the limit"}
"##;

const MAPPER_README: &str = r##"# {{name}}

An edgebridge `{{world}}` plugin: forwards every
message under a prefix (`factory/temp` → `edge/factory/temp` with `prefix: edge`).

{{COMMON}}"##;

const AGGREGATOR_README: &str = r##"# {{name}}

An edgebridge `{{world}}` plugin (WIT 0.2.0): the average of a numeric JSON field per topic
over a window (`{"field": "value", "seconds": 10}`), sent when the window's timer fires. The
bridge acknowledges what a window held only once the target acknowledged its average.
`plugin test --messages messages.jsonl` runs the sample timeline (its `at` times) and shows
the timer firing. It needs its policy: the default policy does not grant `timers`.

{{COMMON}}"##;

const FILTER_README: &str = r##"# {{name}}

An edgebridge `{{world}}` plugin: keeps messages
whose payload is at most `maxBytes` long.

{{COMMON}}"##;

/// The part of the README both templates share.
pub const COMMON_README: &str = r##"## Build, test, install

```sh
cargo test                                          # unit tests, natively (the SDK's test host)
rustup target add wasm32-wasip2                     # once
cargo build --target wasm32-wasip2 --release        # → target/wasm32-wasip2/release/{{lib}}.wasm
# or: cargo component build --release               # → target/wasm32-wasip1/release/{{lib}}.wasm

edgebridge plugin test target/wasm32-wasip2/release/{{lib}}.wasm --messages messages.jsonl   # its default config; another: --config '{{config}}'
edgebridge plugin install target/wasm32-wasip2/release/{{lib}}.wasm --plugins-dir /etc/edgebridge/plugins
cp policy.yaml /etc/edgebridge/policies/{{name}}.yaml   # optional: the default policy may do
```

`plugin install` checks that the component loads under its policy and copies it as
`{{name}}.wasm` atomically; a running bridge picks it up within a second. A route uses it with:

```yaml
plugins:
  - name: {{name}}
    config: {{config}}
```
"##;

impl NewPlugin {
    /// The README text (exposed for the walkthrough test).
    pub fn readme(&self) -> String {
        let config = if self.aggregator {
            r#"{"field": "value", "seconds": 10}"#
        } else if self.filter {
            r#"{"maxBytes": 16}"#
        } else {
            r#"{"prefix": "edge"}"#
        };
        let base = if self.aggregator {
            AGGREGATOR_README
        } else if self.filter {
            FILTER_README
        } else {
            MAPPER_README
        };
        base.replace("{{COMMON}}", COMMON_README)
            .replace("{{config}}", config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_derived_from_cargo_file_names() {
        assert!(check_name("site-prefix").is_ok());
        for bad in ["", "Site", "1x", "a_b", "a-", "a/b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert_eq!(
            name_of(Path::new("t/site_prefix.wasm")).unwrap(),
            "site-prefix"
        );
        assert!(name_of(Path::new("t/Bad.wasm")).is_err());
    }

    #[test]
    fn the_sdk_argument_may_be_a_version_on_crates_io() {
        assert_eq!(Sdk::parse("0.1").unwrap(), Sdk::Version("0.1".into()));
        assert_eq!(Sdk::parse("=0.1.0").unwrap().dependency(), "\"=0.1.0\"");
    }

    #[test]
    fn the_sdk_argument_is_a_git_url_or_the_sdk_folder() {
        assert_eq!(
            Sdk::parse("https://example.com/edgebridge.git").unwrap(),
            Sdk::Git("https://example.com/edgebridge.git".into())
        );
        assert_eq!(
            Sdk::parse("git+file:///src/edgebridge").unwrap(),
            Sdk::Git("file:///src/edgebridge".into())
        );
        assert!(Sdk::parse("/nonexistent").is_err());
        let here = Sdk::parse(env!("CARGO_MANIFEST_DIR")).unwrap_err();
        assert!(
            here.contains("is not the edgebridge-plugin-sdk crate"),
            "{here}"
        );
    }

    #[test]
    fn a_new_plugin_is_written_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = NewPlugin {
            name: "site-prefix".into(),
            filter: false,
            aggregator: false,
            sdk: Sdk::Path(PathBuf::from("/sdk \"q\"")),
            dir: dir.path().join("site-prefix"),
        };
        let files = new_plugin(&p).unwrap();
        assert_eq!(files.len(), 6);
        let cargo = std::fs::read_to_string(p.dir.join("Cargo.toml")).unwrap();
        assert!(
            cargo.contains(r#"edgebridge-plugin-sdk = { path = "/sdk \"q\"" }"#),
            "{cargo}"
        );
        let lib = std::fs::read_to_string(p.dir.join("src/lib.rs")).unwrap();
        assert!(lib.contains("impl Mapper for SitePrefix"));
        assert!(!lib.contains("{{"));
        let readme = std::fs::read_to_string(p.dir.join("README.md")).unwrap();
        assert!(
            readme.contains("release/site_prefix.wasm --messages messages.jsonl   # its default config; another: --config '{\"prefix\": \"edge\"}'"),
            "{readme}"
        );
        assert!(!readme.contains("{{"), "{readme}");
        let e = new_plugin(&p).unwrap_err();
        assert!(e.contains("not empty"), "{e}");
    }
}
