//! `edgebridge plugin test`: runs a plugin on sample messages in the production engine under
//! its policy, without a broker, and prints what it logged, each decision and the time per
//! call.

use std::fmt::Debug;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde_json::Value;

use crate::model::{Message, Properties, Props, QoS};

/// Most bytes of a payload read from a file (`-m @FILE`) or of a `--messages` file.
pub const MAX_INPUT: u64 = 16 << 20;

/// What `edgebridge plugin test` runs.
#[derive(Debug, Clone)]
pub struct PluginTest {
    /// The component.
    pub file: PathBuf,
    /// The plugin name (default: the file stem, `_` as `-`).
    pub name: Option<String>,
    /// Policies folder (the plugin's policy, or the default).
    pub policies_dir: PathBuf,
    /// JSON config given to `init`.
    pub config: String,
    /// The route's source filter.
    pub source: String,
    /// The route's static target (`None`: same as source).
    pub target: Option<String>,
    /// Further calls to time per message (0: decide once).
    pub repeat: u32,
    /// The messages, in order, each with its time on the timeline (milliseconds from its
    /// start; the plugin's clock reads the start, plus this).
    pub messages: Vec<(u64, Message)>,
    /// Run the timeline on to this time (ms) after the last message, firing timers; then the
    /// plugin is flushed as at a route's stop.
    pub until: Option<u64>,
}

/// Reads `path` whole, refusing more than [`MAX_INPUT`] bytes.
pub fn read_input(path: &Path) -> Result<Vec<u8>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    read_bounded(file, &path.display().to_string())
}

/// Reads `reader` (named `origin` in errors) whole, refusing more than [`MAX_INPUT`] bytes.
pub fn read_bounded(reader: impl std::io::Read, origin: &str) -> Result<Vec<u8>, String> {
    crate::config::read_at_most(reader, MAX_INPUT)
        .map_err(|e| format!("{origin}: {e}"))?
        .ok_or_else(|| format!("{origin}: larger than {} MiB", MAX_INPUT >> 20))
}

/// A plugin file loaded as the bridge loads it: its policy from the policies folder, then
/// compiled, checked against the policy and pre-instantiated.
pub struct LoadedFile {
    /// The engine it was compiled with.
    pub runtime: std::sync::Arc<crate::plugin::Runtime>,
    /// The checked component.
    pub loaded: crate::plugin::Loaded,
    /// The file's bytes.
    pub bytes: Vec<u8>,
}

/// Loads `file` as plugin `name` under its policy in `policies_dir` (`plugin test` and
/// `plugin install` both check a file this way).
pub fn load_file(file: &Path, name: &str, policies_dir: &Path) -> Result<LoadedFile, String> {
    load_file_with_clock(
        file,
        name,
        policies_dir,
        crate::plugin::timers::HostClock::Real,
    )
}

/// [`load_file`] into a runtime whose plugins see `clock`.
fn load_file_with_clock(
    file: &Path,
    name: &str,
    policies_dir: &Path,
    clock: crate::plugin::timers::HostClock,
) -> Result<LoadedFile, String> {
    let policies = crate::policy::Policies::load_dir(policies_dir).map_err(|r| r.to_string())?;
    let bytes = read_input(file)?;
    let runtime = crate::plugin::Runtime::with_clock(clock)?;
    let loaded = runtime
        .load(name, file, &bytes, policies.for_plugin(name))
        .map_err(|e| e.to_string())?;
    Ok(LoadedFile {
        runtime,
        loaded,
        bytes,
    })
}

/// The message of the command line: `payload` is the text, or `@PATH` for a file's bytes;
/// `properties` are `KEY=VALUE` user properties.
pub fn message_from_args(
    topic: &str,
    payload: &str,
    properties: &[String],
    qos: QoS,
    retain: bool,
) -> Result<Message, String> {
    crate::topic::validate_name(topic).map_err(|e| format!("--topic \"{topic}\" {e}"))?;
    let payload = match payload.strip_prefix('@') {
        Some(path) => read_input(Path::new(path))?,
        None => payload.as_bytes().to_vec(),
    };
    let mut props = Properties::default();
    for p in properties {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| format!("--property \"{p}\": expected KEY=VALUE"))?;
        props.user_properties.push((k.to_string(), v.to_string()));
    }
    Ok(Message {
        topic: topic.into(),
        payload: Bytes::from(payload),
        qos,
        retain,
        properties: props.into(),
    })
}

/// Messages from JSON lines (`--messages FILE`), one object per line: `topic` (default
/// `default_topic`), `payload` (a string as it is; any other JSON value as its JSON text),
/// `qos` (0, 1 or 2; default 1), `retain`, `userProperties` (an object, or a list of
/// `[key, value]` pairs), `contentType`, `at` (milliseconds from the start of the timeline;
/// never less than the line before; default: the line before's). Empty lines and lines
/// starting with `#` are skipped. Errors name `origin:line`.
pub fn messages_from_json_lines(
    text: &str,
    origin: &str,
    default_topic: &str,
) -> Result<Vec<(u64, Message)>, String> {
    let mut out = Vec::new();
    let mut last = 0;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = format!("{origin}:{}", i + 1);
        let doc: Value = serde_json::from_str(line).map_err(|e| format!("{at}: {e}"))?;
        let time = match doc.get("at") {
            None => last,
            Some(v) => match v.as_u64() {
                Some(t) if t >= last => t,
                Some(t) => {
                    return Err(format!(
                        "{at}: `at` {t} is before the line before's {last}: the timeline only goes forward"
                    ));
                }
                None => {
                    return Err(format!(
                        "{at}: `at` must be milliseconds (a whole number ≥ 0)"
                    ));
                }
            },
        };
        last = time;
        out.push((
            time,
            message_from_json(&doc, default_topic).map_err(|e| format!("{at}: {e}"))?,
        ));
    }
    if out.is_empty() {
        return Err(format!("{origin}: no messages (one JSON object per line)"));
    }
    Ok(out)
}

fn message_from_json(doc: &Value, default_topic: &str) -> Result<Message, String> {
    let obj = doc
        .as_object()
        .ok_or("expected an object like {\"topic\": \"a/b\", \"payload\": \"text\"}")?;
    let mut msg = Message {
        topic: default_topic.into(),
        payload: Bytes::new(),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Props::default(),
    };
    for (k, v) in obj {
        match k.as_str() {
            "topic" => msg.topic = v.as_str().ok_or("`topic` must be a string")?.into(),
            "payload" => {
                msg.payload = Bytes::from(match v {
                    Value::String(s) => s.clone().into_bytes(),
                    other => other.to_string().into_bytes(),
                })
            }
            "qos" => {
                msg.qos = v
                    .as_u64()
                    .and_then(|q| u8::try_from(q).ok())
                    .and_then(QoS::from_u8)
                    .ok_or("`qos` must be 0, 1 or 2")?
            }
            "retain" => msg.retain = v.as_bool().ok_or("`retain` must be true or false")?,
            "contentType" => {
                msg.properties.content_type =
                    Some(v.as_str().ok_or("`contentType` must be a string")?.into())
            }
            "userProperties" => msg.properties.user_properties = user_properties(v)?,
            "at" => {}
            other => {
                return Err(format!(
                    "unknown field `{other}`; expected topic, payload, qos, retain, userProperties, contentType, at"
                ));
            }
        }
    }
    crate::topic::validate_name(&msg.topic).map_err(|e| format!("topic \"{}\" {e}", msg.topic))?;
    Ok(msg)
}

fn user_properties(v: &Value) -> Result<Vec<(String, String)>, String> {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    match v {
        Value::Object(map) => Ok(map.iter().map(|(k, v)| (k.clone(), text(v))).collect()),
        Value::Array(pairs) => pairs
            .iter()
            .map(|p| match p.as_array().map(Vec::as_slice) {
                Some([Value::String(k), v]) => Ok((k.clone(), text(v))),
                _ => Err("`userProperties` pairs must be [\"key\", \"value\"]".to_string()),
            })
            .collect(),
        _ => Err("`userProperties` must be an object or a list of [key, value] pairs".into()),
    }
}

/// Prints the lines the plugin logs (the events of [`crate::plugin::GUEST_LOG`]) as they
/// happen, indented under the message being decided.
struct GuestLines;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for GuestLines {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target() != crate::plugin::GUEST_LOG {
            return;
        }
        struct Text(String);
        impl tracing::field::Visit for Text {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        let mut text = Text(String::new());
        event.record(&mut text);
        println!(
            "  log {}: {}",
            event.metadata().level().as_str().to_ascii_lowercase(),
            text.0
        );
    }
}

/// Runs the test: loads the plugin (refusing it as the bridge would), `init`s it with the
/// config, then decides every message. `Ok(false)` when the plugin failed on a message.
pub async fn run(t: &PluginTest) -> Result<bool, String> {
    use crate::config::Direction;
    use crate::plugin::stage::{Outcome, RouteInfo, Stage};
    use crate::plugin::{Registry, plugin_name};
    use tracing_subscriber::layer::SubscriberExt;

    // This command owns the process: its only subscriber prints the plugin's lines.
    let _ =
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(GuestLines));
    let stem =
        plugin_name(&t.file).ok_or_else(|| format!("{}: not a .wasm file", t.file.display()))?;
    // Cargo writes `site_prefix.wasm` for the plugin `site-prefix`: test it under the name
    // `plugin install` gives it, which also picks its policy.
    let name = match &t.name {
        Some(n) => n.clone(),
        None => super::scaffold::name_of(&t.file).unwrap_or(stem),
    };
    // The plugin's clock is the timeline's: it starts now and moves only with the messages'
    // `at` and the timers that fire.
    let start_ms = crate::plugin::timers::HostClock::Real.now_millis();
    let virtual_ms = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(start_ms));
    let clock = crate::plugin::timers::HostClock::Virtual(virtual_ms.clone());
    let set_time = |ms: u64| virtual_ms.store(start_ms + ms, std::sync::atomic::Ordering::Relaxed);
    let LoadedFile {
        runtime, loaded, ..
    } = load_file_with_clock(&t.file, &name, &t.policies_dir, clock.clone())?;
    let aggregator = loaded.world == crate::plugin::World::Aggregator;
    let timeline = aggregator || t.messages.iter().any(|(at, _)| *at > 0);
    println!(
        "plugin {} ({}), {} bytes, sha256 {}, policy: {}",
        loaded.name,
        loaded.world.as_str(),
        loaded.size,
        loaded.sha256,
        loaded
            .policy
            .file
            .as_ref()
            .map(|f| f.display().to_string())
            .unwrap_or_else(|| "default".into())
    );
    let registry = std::sync::Arc::new(Registry::default());
    registry.install(loaded);
    let route = RouteInfo {
        name: "test".into(),
        direction: Direction::LocalToRemote,
        source: t.source.clone(),
        qos: QoS::ExactlyOnce,
        target_namespace: t.target.clone().unwrap_or_else(|| t.source.clone()),
    };
    let counters = std::sync::Arc::new(crate::counters::PluginCounters::new(&name, "test"));
    let mut stage = Stage::new(runtime, registry, &name, &t.config, route, counters);
    let started = std::time::Instant::now();
    stage.start().await.map_err(|e| {
        format!(
            "{e}\n(the plugin's init refused the config {}: give the route's `config:` as JSON with --config, e.g. --config '{{\"field\": \"value\"}}'; the plugin's README or policy.yaml says which fields it takes)",
            t.config
        )
    })?;
    println!("init with {}: ok ({})", t.config, micros(started.elapsed()));
    let mut ok = true;
    for (i, (at, msg)) in t.messages.iter().enumerate() {
        if timeline {
            ok &= run_timers_until(&mut stage, &set_time, start_ms, *at).await;
            set_time(*at);
        }
        let target = t.target.clone().unwrap_or_else(|| msg.topic.to_string());
        println!(
            "message {}{}: {} ({} bytes, qos {}{})",
            i + 1,
            if timeline {
                format!(" at +{at} ms")
            } else {
                String::new()
            },
            msg.topic,
            msg.payload.len(),
            msg.qos.as_u8(),
            if msg.retain { ", retained" } else { "" }
        );
        let started = std::time::Instant::now();
        let outcome = stage.decide(msg, &target).await;
        let took = micros(started.elapsed());
        print_releases(&mut stage);
        match &outcome {
            Err(e) => {
                println!("  error: {e}  [{took}]");
                ok = false;
                continue;
            }
            Ok(Outcome::Pass) => println!("  pass: forward unchanged to {target}  [{took}]"),
            Ok(Outcome::Drop(reason)) => println!("  drop: {reason}  [{took}]"),
            Ok(Outcome::Hold(window)) => println!("  hold: in window {window:?}  [{took}]"),
            Ok(Outcome::Emit(list)) => {
                println!("  emit {} message(s)  [{took}]", list.len());
                print_emitted(list, Some(msg));
            }
        }
        if t.repeat > 0 {
            let mut samples = Vec::with_capacity(t.repeat as usize);
            for _ in 0..t.repeat {
                let start = std::time::Instant::now();
                if let Err(e) = stage.decide(msg, &target).await {
                    println!("  error on a repeated call: {e}");
                    ok = false;
                    break;
                }
                samples.push(start.elapsed());
            }
            stage.take_releases();
            if !samples.is_empty() {
                samples.sort();
                let pick = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
                println!(
                    "  {} more calls: median {}, p99 {}",
                    samples.len(),
                    micros(pick(0.5)),
                    micros(pick(0.99))
                );
            }
        }
    }
    if timeline {
        let last = t.messages.last().map_or(0, |(at, _)| *at);
        let end = last + t.until.unwrap_or(0);
        ok &= run_timers_until(&mut stage, &set_time, start_ms, end).await;
        set_time(end);
    }
    if aggregator {
        println!("flush (stop) at the end of the timeline");
        if let Err(e) = stage.flush(crate::plugin::stage::FlushReason::Stop).await {
            println!("  error: {e}");
            ok = false;
        }
        print_releases(&mut stage);
    }
    Ok(ok)
}

/// Fires, in order, every timer due up to `end` (ms on the timeline), moving the clock to
/// each; false when one failed.
async fn run_timers_until(
    stage: &mut crate::plugin::stage::Stage,
    set_time: &impl Fn(u64),
    start_ms: u64,
    end: u64,
) -> bool {
    let mut ok = true;
    // Each firing may set further timers; a bound keeps a plugin that sets one at every
    // firing from running forever.
    for _ in 0..100_000 {
        let Some(due) = stage.next_timer() else { break };
        let due_ms = due.div_ceil(1000).saturating_sub(start_ms);
        if due_ms > end {
            break;
        }
        set_time(due_ms);
        println!("timer due at +{due_ms} ms");
        if let Err(e) = stage.fire_timers(due).await {
            println!("  error: {e}");
            ok = false;
        }
        print_releases(stage);
    }
    ok
}

/// Prints the window results of the stage's last call.
fn print_releases(stage: &mut crate::plugin::stage::Stage) {
    for r in stage.take_releases() {
        println!(
            "  release window {:?}: {} message(s)",
            r.window,
            r.messages.len()
        );
        print_emitted(&r.messages, None);
    }
}

fn print_emitted(list: &[crate::plugin::stage::Emitted], input: Option<&Message>) {
    for m in list {
        let payload = if input.is_some_and(|i| m.payload.as_ptr() == i.payload.as_ptr()) {
            "(unchanged)".to_string()
        } else {
            format!("{:?}", String::from_utf8_lossy(&m.payload))
        };
        println!(
            "    {}  qos {}  retain {}  payload {payload}",
            m.topic.as_str(),
            m.qos.as_u8(),
            m.retain
        );
        for (k, v) in &m.properties.user_properties {
            println!("      user property {k}: {v}");
        }
        if let Some(ct) = &m.properties.content_type {
            println!("      content type: {ct}");
        }
    }
}

fn micros(d: std::time::Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_become_messages_and_errors_name_the_line() {
        let text = "# readings\n{\"topic\":\"a/b\",\"payload\":{\"v\":1},\"qos\":0}\n\n{\"payload\":\"x\",\"retain\":true,\"userProperties\":[[\"k\",\"v\"]]}\n";
        let msgs: Vec<Message> = messages_from_json_lines(text, "m.jsonl", "d/t")
            .unwrap()
            .into_iter()
            .map(|(_, m)| m)
            .collect();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].payload.as_ref(), br#"{"v":1}"#);
        assert_eq!(msgs[0].qos, QoS::AtMostOnce);
        assert_eq!(msgs[1].topic, "d/t");
        assert!(msgs[1].retain);
        assert_eq!(
            msgs[1].properties.user_properties,
            vec![("k".to_string(), "v".to_string())]
        );
        let e = messages_from_json_lines("{}\n{\"topc\":1}", "m.jsonl", "t").unwrap_err();
        assert!(e.starts_with("m.jsonl:2: unknown field `topc`"), "{e}");
        let e = messages_from_json_lines("{\"topic\":\"a/#\"}", "m.jsonl", "t").unwrap_err();
        assert!(e.starts_with("m.jsonl:1: topic \"a/#\""), "{e}");
        assert!(messages_from_json_lines("\n# none\n", "m.jsonl", "t").is_err());
        let timed = messages_from_json_lines("{\"at\":5}\n{}\n{\"at\":9}", "m.jsonl", "t").unwrap();
        assert_eq!(
            timed.iter().map(|(at, _)| *at).collect::<Vec<_>>(),
            [5, 5, 9]
        );
        let e = messages_from_json_lines("{\"at\":5}\n{\"at\":4}", "m.jsonl", "t").unwrap_err();
        assert!(e.starts_with("m.jsonl:2: `at` 4 is before"), "{e}");
    }

    #[test]
    fn input_over_the_bound_is_refused_whole_not_cut() {
        let at = vec![7u8; MAX_INPUT as usize];
        assert_eq!(read_bounded(&at[..], "in").unwrap().len(), at.len());
        let over = vec![7u8; MAX_INPUT as usize + 1];
        let e = read_bounded(&over[..], "stdin").unwrap_err();
        assert_eq!(e, "stdin: larger than 16 MiB");
    }

    #[test]
    fn the_command_line_message_takes_a_file_and_properties() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("payload.bin");
        std::fs::write(&p, [0u8, 1, 2]).unwrap();
        let m = message_from_args(
            "t",
            &format!("@{}", p.display()),
            &["site=7".into()],
            QoS::AtLeastOnce,
            false,
        )
        .unwrap();
        assert_eq!(m.payload.as_ref(), &[0u8, 1, 2]);
        assert_eq!(m.properties.user_properties[0].1, "7");
        assert!(message_from_args("t", "x", &["novalue".into()], QoS::AtLeastOnce, false).is_err());
        let e =
            message_from_args("t", "@/nonexistent/x", &[], QoS::AtLeastOnce, false).unwrap_err();
        assert!(e.contains("/nonexistent/x"), "{e}");
    }
}
