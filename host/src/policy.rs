//! Plugin policies: what each plugin may do, declared in YAML, deny by default. Pure: no
//! wasmtime here; the plugin runtime asks [`Policy`] for decisions.
//!
//! ```yaml
//! apiVersion: edgebridge.dev/v1alpha1
//! kind: PluginPolicy
//! metadata:
//!   name: dedupe                # the plugin (file dedupe.wasm)
//! spec:
//!   sha256: 3f1c...             # optional: refuse any other build
//!   memory: 16Mi                # linear memory cap
//!   timePerMessage: 10ms        # CPU budget of one call (init gets 100x)
//!   maxEmit: 8                  # messages emitted per input
//!   maxPayload: 1Mi             # bytes per emitted payload
//!   emitTopics: ["$target"]     # filters emitted topics must match; $target = the route's target namespace
//!   imports: [log, clock, kv]   # host interfaces it may import; also wasi-clocks, wasi-random
//!   kv: {maxKeys: 10000, maxBytes: 1Mi}
//!   log: {linesPerSecond: 20, maxLineBytes: 1Ki}   # more is dropped and counted
//!   mayChangeQos: false
//!   mayChangeRetain: false
//!   circuitBreaker: {failures: 5, pause: 1s, maxPause: 60s}
//!   timers: {max: 16, minPeriod: 100ms}   # aggregators (WIT 0.2): timers set at once, shortest
//!   metrics: {maxSeries: 32}    # series of the plugin's own metrics, per route
//!   maxHeld: 1000               # QoS 1/2 messages held in windows before a `pressure` flush
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::parse::{Cx, Fields, boolean, for_each_document, integer, string};
use crate::config::yaml::NodeKind;
use crate::config::{ConfigError, ConfigReport};
use crate::topic;

/// apiVersion of policy documents.
pub const API_VERSION: &str = "edgebridge.dev/v1alpha1";

/// Something a plugin may be granted: a host interface of the plugin package, or what it
/// may observe through WASI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Import {
    /// `edgebridge:plugin/log`.
    Log,
    /// `edgebridge:plugin/clock`.
    Clock,
    /// `edgebridge:plugin/kv` (0.1.0) and `edgebridge:plugin/state` (0.2.0): the same store.
    Kv,
    /// `edgebridge:plugin/timers` (0.2.0).
    Timers,
    /// `edgebridge:plugin/metrics` (0.2.0).
    Metrics,
    /// The real time through WASI: `wasi:clocks/wall-clock` and `monotonic-clock` read the
    /// host's clocks, and sleeping waits. Without it the wall clock reads 1970-01-01, the
    /// monotonic clock never moves, and a sleep returns at once.
    WasiClocks,
    /// Real random numbers through WASI: `wasi:random/*`. Without it they are a fixed
    /// sequence, the same for every instance.
    WasiRandom,
}

impl Import {
    /// Every grant, in the order the policy reference lists them.
    pub const ALL: [Import; 7] = [
        Import::Log,
        Import::Clock,
        Import::Kv,
        Import::Timers,
        Import::Metrics,
        Import::WasiClocks,
        Import::WasiRandom,
    ];

    /// The name used in policies (and, for the first three, in the WIT package).
    pub fn as_str(self) -> &'static str {
        match self {
            Import::Log => "log",
            Import::Clock => "clock",
            Import::Kv => "kv",
            Import::Timers => "timers",
            Import::Metrics => "metrics",
            Import::WasiClocks => "wasi-clocks",
            Import::WasiRandom => "wasi-random",
        }
    }

    /// From a WIT interface name such as `edgebridge:plugin/kv@0.1.0`.
    pub fn from_interface(name: &str) -> Option<Import> {
        let rest = name.strip_prefix("edgebridge:plugin/")?;
        match rest.split('@').next()? {
            "log" => Some(Import::Log),
            "clock" => Some(Import::Clock),
            "kv" | "state" => Some(Import::Kv),
            "timers" => Some(Import::Timers),
            "metrics" => Some(Import::Metrics),
            _ => None,
        }
    }
}

/// What one plugin may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Plugin name.
    pub plugin: String,
    /// Where it was declared (`None`: the built-in default).
    pub file: Option<PathBuf>,
    /// Required sha256 (lowercase hex) of the `.wasm` file.
    pub sha256: Option<String>,
    /// Linear memory cap, bytes.
    pub memory: usize,
    /// CPU budget per message.
    pub time_per_message: Duration,
    /// Most messages emitted per input.
    pub max_emit: usize,
    /// Largest emitted payload, bytes.
    pub max_payload: usize,
    /// Filters emitted topics must match; `$target` is the route's target namespace.
    pub emit_topics: Vec<String>,
    /// Granted host imports.
    pub imports: Vec<Import>,
    /// kv quota: keys.
    pub kv_max_keys: usize,
    /// kv quota: bytes of keys and values.
    pub kv_max_bytes: usize,
    /// Log lines a (plugin, route) may write per second (and in a burst); more are dropped
    /// and counted.
    pub log_lines_per_second: u32,
    /// Longest log line kept, bytes (longer ones are cut).
    pub log_max_line: usize,
    /// May emitted messages set their own QoS (never above the route's).
    pub may_change_qos: bool,
    /// May emitted messages set their own retain flag.
    pub may_change_retain: bool,
    /// When a failing plugin stops being called.
    pub breaker: Breaker,
    /// Timers an aggregator may have set at once, per route.
    pub timers_max: usize,
    /// Shortest timer an aggregator may set.
    pub timers_min_period: Duration,
    /// Series (label combinations) of its own metrics, per route.
    pub metrics_max_series: usize,
    /// QoS 1/2 messages an aggregator's route may hold in windows before it is asked to
    /// flush (`pressure`).
    pub max_held: usize,
}

/// Circuit breaker of a plugin stage: after `failures` failed calls in a row the plugin is not
/// called for `pause`, doubling on each reopening up to `max_pause`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Breaker {
    /// Consecutive failures that open the breaker.
    pub failures: u32,
    /// First pause.
    pub pause: Duration,
    /// Longest pause.
    pub max_pause: Duration,
}

impl Default for Breaker {
    fn default() -> Breaker {
        Breaker {
            failures: 5,
            pause: Duration::from_secs(1),
            max_pause: Duration::from_secs(60),
        }
    }
}

impl Policy {
    /// The policy of a plugin that has no policy file: tight limits, log and clock only,
    /// emitting only into the route's own target namespace.
    pub fn default_for(plugin: &str) -> Policy {
        Policy {
            plugin: plugin.to_string(),
            file: None,
            sha256: None,
            memory: 16 << 20,
            time_per_message: Duration::from_millis(10),
            max_emit: 8,
            max_payload: 1 << 20,
            emit_topics: vec!["$target".into()],
            imports: vec![Import::Log, Import::Clock],
            kv_max_keys: 10_000,
            kv_max_bytes: 1 << 20,
            log_lines_per_second: 20,
            log_max_line: 1024,
            may_change_qos: false,
            may_change_retain: false,
            breaker: Breaker::default(),
            timers_max: 16,
            timers_min_period: Duration::from_millis(100),
            metrics_max_series: 32,
            max_held: 1000,
        }
    }

    /// Whether the policy grants `import`.
    pub fn grants(&self, import: Import) -> bool {
        self.imports.contains(&import)
    }

    /// Whether a plugin on a route whose target namespace is `target` (a topic, or the source
    /// filter for same-as-source routes) may emit to `topic`.
    pub fn may_emit_to(&self, topic_name: &str, target: &str) -> bool {
        self.emit_topics.iter().any(|f| {
            if f == "$target" {
                topic_name == target
                    || topic::matches(target, topic_name)
                    || topic_name
                        .strip_prefix(target)
                        .is_some_and(|rest| rest.starts_with('/'))
            } else {
                topic::matches(f, topic_name)
            }
        })
    }
}

/// A topic a plugin may publish to. Only [`Policy::confine`] makes one, so the path from a
/// plugin's decision to a publish cannot carry a topic its policy does not allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfinedTopic(String);

impl ConfinedTopic {
    /// The topic.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The topic, to publish to.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl Policy {
    /// Checks a topic a plugin emitted on a route whose target namespace is `target`: a valid
    /// topic name that the policy's `emitTopics` allow.
    pub fn confine(&self, name: String, target: &str) -> Result<ConfinedTopic, String> {
        topic::validate_name(&name)
            .map_err(|err| format!("topic \"{}\" {err}", topic::shorten(&name)))?;
        if !self.may_emit_to(&name, target) {
            return Err(format!(
                "topic \"{}\" is outside what its policy allows (emitTopics: {})",
                topic::shorten(&name),
                self.emit_topics
                    .join(", ")
                    .replace("$target", &format!("$target = {target}"))
            ));
        }
        Ok(ConfinedTopic(name))
    }
}

/// Every policy loaded from a folder, by plugin name.
#[derive(Debug, Clone, Default)]
pub struct Policies {
    by_plugin: HashMap<String, Policy>,
}

impl Policies {
    /// The policy of `plugin`: its file's, or the default.
    pub fn for_plugin(&self, plugin: &str) -> Policy {
        self.by_plugin
            .get(plugin)
            .cloned()
            .unwrap_or_else(|| Policy::default_for(plugin))
    }

    /// Loads every `*.yaml` / `*.yml` in `dir` (a missing folder means no policies).
    pub fn load_dir(dir: &Path) -> Result<Policies, ConfigReport> {
        let mut errors = Vec::new();
        let mut policies = Policies::default();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(policies),
            Err(e) => {
                return Err(ConfigReport {
                    errors: vec![ConfigError {
                        file: dir.to_path_buf(),
                        line: None,
                        document: None,
                        field: None,
                        message: format!("cannot list policies folder: {e}"),
                    }],
                });
            }
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
            .collect();
        files.sort();
        for file in files {
            let text = match crate::config::read_text(&file) {
                Ok(t) => t,
                Err(message) => {
                    errors.push(ConfigError {
                        file,
                        line: None,
                        document: None,
                        field: None,
                        message,
                    });
                    continue;
                }
            };
            policies.parse_into(&file, &text, &mut errors);
        }
        if errors.is_empty() {
            Ok(policies)
        } else {
            Err(ConfigReport { errors })
        }
    }

    fn parse_into(&mut self, file: &Path, text: &str, errors: &mut Vec<ConfigError>) {
        for_each_document(file, text, errors, |cx, node| {
            let Some(p) = read_policy(cx, node, file) else {
                return;
            };
            if let Some(first) = self.by_plugin.get(&p.plugin) {
                let first_file = first.file.clone().unwrap_or_default();
                cx.err(
                    node.line,
                    "metadata.name",
                    format!(
                        "plugin \"{}\" already has a policy in {}",
                        p.plugin,
                        first_file.display()
                    ),
                );
            } else {
                self.by_plugin.insert(p.plugin.clone(), p);
            }
        });
    }
}

/// `16Mi`, `512Ki`, `1048576`.
fn parse_bytes(s: &str) -> Option<usize> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("Gi") {
        (n, 1usize << 30)
    } else if let Some(n) = s.strip_suffix("Mi") {
        (n, 1 << 20)
    } else if let Some(n) = s.strip_suffix("Ki") {
        (n, 1 << 10)
    } else {
        (s, 1)
    };
    num.trim().parse::<usize>().ok()?.checked_mul(mult)
}

/// `10ms`, `500us`, `2s`.
fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit): (&str, fn(u64) -> Duration) = if let Some(n) = s.strip_suffix("ms") {
        (n, Duration::from_millis)
    } else if let Some(n) = s.strip_suffix("us") {
        (n, Duration::from_micros)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, Duration::from_secs)
    } else {
        return None;
    };
    num.trim().parse::<u64>().ok().map(unit)
}

/// Reads an optional size field into `target`; false when it was given but invalid.
/// Reads the whole number `key` of `s`, in `min..=max`, into `target`; false (reported) when it
/// is not one.
fn integer_field<T: TryFrom<i64>>(
    cx: &mut Cx,
    s: &mut Fields,
    key: &'static str,
    (min, max): (i64, i64),
    target: &mut T,
) -> bool {
    let Some(f) = s.get(cx, &[key]) else {
        return true;
    };
    match integer(cx, f, min, max).and_then(|v| T::try_from(v).ok()) {
        Some(v) => {
            *target = v;
            true
        }
        None => false,
    }
}

fn bytes_field(cx: &mut Cx, s: &mut Fields, key: &'static str, target: &mut usize) -> bool {
    let Some((path, n)) = s.get(cx, &[key]) else {
        return true;
    };
    match string(cx, (path.clone(), n)).map(|t| (parse_bytes(&t), t)) {
        Some((Some(v), _)) if v > 0 => {
            *target = v;
            true
        }
        Some((_, t)) => {
            cx.err(
                n.line,
                &path,
                format!("\"{t}\" is not a size such as 16Mi, 512Ki or 4096"),
            );
            false
        }
        None => false,
    }
}

/// Reads an optional non-zero duration field into `target`; false when given but invalid.
fn duration_field(cx: &mut Cx, s: &mut Fields, key: &'static str, target: &mut Duration) -> bool {
    let Some((path, n)) = s.get(cx, &[key]) else {
        return true;
    };
    match string(cx, (path.clone(), n)).map(|t| (parse_duration(&t), t)) {
        Some((Some(d), _)) if !d.is_zero() => {
            *target = d;
            true
        }
        Some((_, t)) => {
            cx.err(
                n.line,
                &path,
                format!("\"{t}\" is not a duration such as 10ms, 500us or 1s"),
            );
            false
        }
        None => false,
    }
}

fn read_policy(cx: &mut Cx, node: &crate::config::yaml::Node, file: &Path) -> Option<Policy> {
    let mut top = Fields::of(cx, node, "")?;
    let api = top
        .required(cx, &["apiVersion"])
        .and_then(|f| string(cx, f));
    let kind = top.required(cx, &["kind"]).and_then(|f| string(cx, f));
    let name = top.required(cx, &["metadata"]).and_then(|(p, m)| {
        let mut m = Fields::of(cx, m, &p)?;
        let n = m.required(cx, &["name"]).and_then(|f| string(cx, f));
        let _ = m.get(cx, &["labels"]);
        let _ = m.get(cx, &["annotations"]);
        m.finish(cx);
        n
    });
    let spec = top.required(cx, &["spec"]);
    top.finish(cx);
    if let Some(n) = &name {
        cx.document = format!("PluginPolicy \"{n}\"");
    }
    if let Some(api) = &api
        && api != API_VERSION
    {
        cx.err(
            node.line,
            "apiVersion",
            format!("\"{api}\" is not supported; expected {API_VERSION}"),
        );
    }
    if let Some(kind) = &kind
        && kind != "PluginPolicy"
    {
        cx.err(node.line, "kind", format!("\"{kind}\" is not PluginPolicy"));
        return None;
    }
    let name = name?;
    let (spec_path, spec) = spec?;
    let mut p = Policy::default_for(&name);
    p.file = Some(file.to_path_buf());
    let mut s = Fields::of(cx, spec, &spec_path)?;
    let mut ok = true;
    if let Some((path, n)) = s.get(cx, &["sha256"]) {
        match string(cx, (path.clone(), n)) {
            Some(h) if h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()) => {
                p.sha256 = Some(h.to_ascii_lowercase())
            }
            Some(h) => {
                cx.err(
                    n.line,
                    &path,
                    format!("\"{h}\" is not a sha256 (64 hex digits)"),
                );
                ok = false;
            }
            None => ok = false,
        }
    }
    ok &= bytes_field(cx, &mut s, "memory", &mut p.memory);
    ok &= bytes_field(cx, &mut s, "maxPayload", &mut p.max_payload);
    ok &= duration_field(cx, &mut s, "timePerMessage", &mut p.time_per_message);
    ok &= integer_field(cx, &mut s, "maxEmit", (0, 10_000), &mut p.max_emit);
    if let Some((path, n)) = s.get(cx, &["emitTopics"]) {
        match &n.kind {
            NodeKind::Seq(items) => {
                p.emit_topics.clear();
                for (i, item) in items.iter().enumerate() {
                    let ip = format!("{path}[{i}]");
                    match string(cx, (ip.clone(), item)) {
                        Some(f) if f == "$target" => p.emit_topics.push(f),
                        Some(f) => match topic::validate_filter(&f) {
                            Ok(()) => p.emit_topics.push(f),
                            Err(e) => {
                                cx.err(
                                    item.line,
                                    &ip,
                                    format!("invalid topic filter \"{}\": {e}", topic::shorten(&f)),
                                );
                                ok = false;
                            }
                        },
                        None => ok = false,
                    }
                }
            }
            _ => {
                cx.err(n.line, &path, "expected a list of topic filters");
                ok = false;
            }
        }
    }
    if let Some((path, n)) = s.get(cx, &["imports"]) {
        match &n.kind {
            NodeKind::Seq(items) => {
                p.imports.clear();
                for (i, item) in items.iter().enumerate() {
                    let ip = format!("{path}[{i}]");
                    match string(cx, (ip.clone(), item)) {
                        Some(name) => match Import::ALL.iter().find(|i| i.as_str() == name) {
                            Some(i) => p.imports.push(*i),
                            None => {
                                cx.err(
                                    item.line,
                                    &ip,
                                    format!(
                                        "\"{name}\" is not something a policy grants; expected one of: {}",
                                        Import::ALL.map(|i| i.as_str()).join(", ")
                                    ),
                                );
                                ok = false;
                            }
                        },
                        None => ok = false,
                    }
                }
            }
            _ => {
                cx.err(n.line, &path, "expected a list such as [log, clock, kv]");
                ok = false;
            }
        }
    }
    if let Some((path, n)) = s.get(cx, &["kv"]) {
        if let Some(mut kv) = Fields::of(cx, n, &path) {
            ok &= integer_field(cx, &mut kv, "maxKeys", (1, 10_000_000), &mut p.kv_max_keys);
            ok &= bytes_field(cx, &mut kv, "maxBytes", &mut p.kv_max_bytes);
            kv.finish(cx);
        } else {
            ok = false;
        }
    }
    if let Some((path, n)) = s.get(cx, &["timers"]) {
        if let Some(mut t) = Fields::of(cx, n, &path) {
            ok &= integer_field(cx, &mut t, "max", (0, 1_000_000), &mut p.timers_max);
            ok &= duration_field(cx, &mut t, "minPeriod", &mut p.timers_min_period);
            t.finish(cx);
        } else {
            ok = false;
        }
    }
    if let Some((path, n)) = s.get(cx, &["metrics"]) {
        if let Some(mut m) = Fields::of(cx, n, &path) {
            ok &= integer_field(
                cx,
                &mut m,
                "maxSeries",
                (0, 100_000),
                &mut p.metrics_max_series,
            );
            m.finish(cx);
        } else {
            ok = false;
        }
    }
    ok &= integer_field(cx, &mut s, "maxHeld", (0, 1_000_000), &mut p.max_held);
    if let Some((path, n)) = s.get(cx, &["log"]) {
        if let Some(mut log) = Fields::of(cx, n, &path) {
            ok &= integer_field(
                cx,
                &mut log,
                "linesPerSecond",
                (1, 100_000),
                &mut p.log_lines_per_second,
            );
            ok &= bytes_field(cx, &mut log, "maxLineBytes", &mut p.log_max_line);
            log.finish(cx);
        } else {
            ok = false;
        }
    }
    if let Some(f) = s.get(cx, &["mayChangeQos"]) {
        match boolean(cx, f) {
            Some(v) => p.may_change_qos = v,
            None => ok = false,
        }
    }
    if let Some(f) = s.get(cx, &["mayChangeRetain"]) {
        match boolean(cx, f) {
            Some(v) => p.may_change_retain = v,
            None => ok = false,
        }
    }
    if let Some((path, n)) = s.get(cx, &["circuitBreaker"]) {
        if let Some(mut b) = Fields::of(cx, n, &path) {
            ok &= integer_field(
                cx,
                &mut b,
                "failures",
                (1, 1_000_000),
                &mut p.breaker.failures,
            );
            ok &= duration_field(cx, &mut b, "pause", &mut p.breaker.pause);
            let mut max_pause = Duration::ZERO;
            ok &= duration_field(cx, &mut b, "maxPause", &mut max_pause);
            if max_pause.is_zero() {
                // Not given: at least the first pause.
                p.breaker.max_pause = p.breaker.max_pause.max(p.breaker.pause);
            } else if max_pause < p.breaker.pause {
                cx.err(
                    n.line,
                    &format!("{path}.maxPause"),
                    "must not be shorter than pause",
                );
                ok = false;
            } else {
                p.breaker.max_pause = max_pause;
            }
            b.finish(cx);
        } else {
            ok = false;
        }
    }
    s.finish(cx);
    ok.then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Policies, Vec<String>> {
        let mut p = Policies::default();
        let mut errors = Vec::new();
        p.parse_into(Path::new("p.yaml"), text, &mut errors);
        if errors.is_empty() {
            Ok(p)
        } else {
            Err(errors.iter().map(|e| e.to_string()).collect())
        }
    }

    #[test]
    fn a_full_policy_parses() {
        let p = parse(
            "apiVersion: edgebridge.dev/v1alpha1\nkind: PluginPolicy\nmetadata: {name: dedupe}\nspec:\n  memory: 8Mi\n  timePerMessage: 500us\n  maxEmit: 2\n  emitTopics: [\"$target\", \"audit/#\"]\n  imports: [log, kv]\n  kv: {maxKeys: 5, maxBytes: 1Ki}\n  mayChangeQos: true\n",
        )
        .unwrap()
        .for_plugin("dedupe");
        assert_eq!(p.memory, 8 << 20);
        assert_eq!(p.time_per_message, Duration::from_micros(500));
        assert_eq!((p.max_emit, p.kv_max_keys, p.kv_max_bytes), (2, 5, 1024));
        assert!(p.grants(Import::Kv) && !p.grants(Import::Clock));
        assert!(p.may_change_qos && !p.may_change_retain);
        assert!(p.may_emit_to("audit/x", "factory/alerts"));
    }

    #[test]
    fn the_default_denies_kv_and_foreign_topics() {
        let p = Policies::default().for_plugin("x");
        assert!(!p.grants(Import::Kv));
        assert!(p.may_emit_to("factory/alerts", "factory/alerts"));
        assert!(p.may_emit_to("factory/alerts/line3", "factory/alerts"));
        assert!(!p.may_emit_to("factory/alertsX", "factory/alerts"));
        assert!(!p.may_emit_to("other/topic", "factory/alerts"));
        // Same-as-source routes: the namespace is the source filter.
        assert!(p.may_emit_to("telemetry/a/b", "telemetry/#"));
    }

    #[test]
    fn bad_policies_name_line_and_field() {
        let errs = parse(
            "apiVersion: edgebridge.dev/v1alpha1\nkind: PluginPolicy\nmetadata: {name: x}\nspec:\n  memory: lots\n  imports: [log, net]\n  emitTopics: [\"a/#/b\"]\n  timePerMessag: 1ms\n",
        )
        .unwrap_err();
        assert_eq!(errs.len(), 4, "{errs:#?}");
        assert!(
            errs[0].contains("p.yaml:5: PluginPolicy \"x\", spec.memory"),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.contains("\"net\" is not something a policy grants"))
        );
        assert!(
            errs.iter()
                .any(|e| e.contains("unknown field `timePerMessag`"))
        );
    }

    #[test]
    fn the_circuit_breaker_is_configurable_and_checked() {
        let p = parse(
            "apiVersion: edgebridge.dev/v1alpha1\nkind: PluginPolicy\nmetadata: {name: x}\nspec:\n  circuitBreaker: {failures: 3, pause: 30s, maxPause: 5m}\n",
        );
        // Minutes are not a unit: the error names the field.
        let errs = p.unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.contains("spec.circuitBreaker.maxPause") && e.contains("\"5m\"")),
            "{errs:?}"
        );
        let p = parse(
            "apiVersion: edgebridge.dev/v1alpha1\nkind: PluginPolicy\nmetadata: {name: x}\nspec:\n  circuitBreaker: {failures: 3, pause: 30s, maxPause: 300s}\n",
        )
        .unwrap()
        .for_plugin("x");
        assert_eq!(
            p.breaker,
            Breaker {
                failures: 3,
                pause: Duration::from_secs(30),
                max_pause: Duration::from_secs(300)
            }
        );
        let errs = parse(
            "apiVersion: edgebridge.dev/v1alpha1\nkind: PluginPolicy\nmetadata: {name: x}\nspec:\n  circuitBreaker: {failures: 0, pause: 2s, maxPause: 1s}\n",
        )
        .unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs.iter()
                .any(|e| e.contains("must not be shorter than pause"))
        );
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_bytes("16Mi"), Some(16 << 20));
        assert_eq!(parse_bytes("4096"), Some(4096));
        assert_eq!(parse_bytes("x"), None);
        assert_eq!(parse_duration("10ms"), Some(Duration::from_millis(10)));
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("10"), None);
    }
}
