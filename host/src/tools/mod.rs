//! `edgebridge pub` and `edgebridge sub`: small MQTT clients on the bridge's own session code,
//! so the quick start needs nothing installed to watch messages cross.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::config::{Auth, BrokerConnection, Transport, parse::parse_endpoint};
use crate::model::{Message, Properties, QoS};
use crate::mqtt::session::{self, SessionEvent, SessionOptions};
use crate::mqtt::{StateEvent, SubFilter, Version};

/// Where to connect.
#[derive(Debug, Clone)]
pub struct Target {
    /// `host:port`.
    pub endpoint: String,
    /// MQTT 5 (`true`) or 3.1.1.
    pub v5: bool,
    /// Client ID.
    pub client_id: String,
}

fn options(t: &Target, subscriptions: Vec<SubFilter>) -> Result<SessionOptions, String> {
    let endpoint = parse_endpoint(&t.endpoint)?;
    Ok(SessionOptions {
        label: t.client_id.clone(),
        version: if t.v5 { Version::V5 } else { Version::V4 },
        conn: Arc::new(BrokerConnection {
            endpoint,
            transport: Transport::Mqtt,
            tls: None,
            auth: Auth::Anonymous,
        }),
        credentials: Arc::new(crate::credentials::Provider::new(
            Auth::Anonymous,
            crate::credentials::IdentityOptions::from_env(),
        )),
        client_id: t.client_id.clone(),
        clean_start: true,
        session_expiry: None,
        subscriptions,
        max_inflight: 100,
        receive_maximum: 100,
        keep_alive: Duration::from_secs(30),
        backoff: (Duration::from_millis(200), Duration::from_secs(2)),
        max_packet: 16 * 1024 * 1024,
        stamp: None,
    })
}

/// Publishes `count` copies of `payload` (with `{n}` replaced by the sequence number) and
/// returns once the broker acknowledged them all (QoS 0: once written).
pub async fn publish(
    t: &Target,
    topic: &str,
    qos: QoS,
    retain: bool,
    payload: &str,
    count: u64,
) -> Result<(), String> {
    crate::topic::validate_name(topic).map_err(|e| format!("topic \"{topic}\" {e}"))?;
    let (handle, mut events, task) = session::spawn(options(t, vec![])?, 1024);
    for n in 0..count {
        let msg = Message {
            topic: topic.to_string(),
            payload: Bytes::from(payload.replace("{n}", &n.to_string())),
            qos,
            retain,
            properties: Properties::default(),
        };
        handle.publish(msg, n);
    }
    let mut done = 0;
    while done < count {
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
            Ok(Some(SessionEvent::State(StateEvent::Delivered(_)))) => done += 1,
            Ok(Some(SessionEvent::State(StateEvent::Rejected(_, code)))) => {
                return Err(format!(
                    "the broker refused a message (reason code {code:#04x})"
                ));
            }
            Ok(Some(SessionEvent::ConnectionLost(e))) if done == 0 => {
                eprintln!("{}: {e}; retrying", t.endpoint)
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                return Err(format!(
                    "no acknowledgement from {} within 10 s",
                    t.endpoint
                ));
            }
        }
    }
    drop(handle);
    let _ = task.await;
    Ok(())
}

/// Subscribes to `filter` and prints `topic payload` per message, until `count` messages
/// arrived (0: forever).
pub async fn subscribe(t: &Target, filter: &str, qos: QoS, count: u64) -> Result<(), String> {
    crate::topic::validate_filter(filter).map_err(|e| format!("filter \"{filter}\" {e}"))?;
    let subs = vec![SubFilter {
        filter: filter.to_string(),
        qos,
    }];
    let (handle, mut events, _task) = session::spawn(options(t, subs)?, 1024);
    let mut seen = 0;
    while let Some(ev) = events.recv().await {
        match ev {
            SessionEvent::State(StateEvent::Message { msg, ack, .. }) => {
                println!("{} {}", msg.topic, String::from_utf8_lossy(&msg.payload));
                if let Some(ack) = ack {
                    handle.ack(ack);
                }
                seen += 1;
                if count > 0 && seen >= count {
                    break;
                }
            }
            SessionEvent::State(StateEvent::Subscribed(r)) => {
                for (f, code) in r {
                    if code >= 0x80 {
                        return Err(format!("subscription to {f} refused (code {code:#04x})"));
                    }
                }
            }
            SessionEvent::ConnectionLost(e) => eprintln!("{}: {e}; retrying", t.endpoint),
            _ => {}
        }
    }
    Ok(())
}

/// `edgebridge plugins list`: loads every `*.wasm` of `dir` against its policy and describes
/// it, one line each; returns false when any file is refused.
pub async fn plugins_list(
    dir: &std::path::Path,
    policies_dir: &std::path::Path,
) -> Result<bool, String> {
    use crate::plugin::{Registry, Runtime};
    let policies = crate::policy::Policies::load_dir(policies_dir).map_err(|r| r.to_string())?;
    let runtime = Runtime::new()?;
    let registry = Registry::default();
    let errors = registry
        .scan(&runtime, dir, &policies, &Default::default())
        .await;
    for p in registry.list() {
        let policy = match &p.policy.file {
            Some(f) => f.display().to_string(),
            None => "default policy".into(),
        };
        println!(
            "{:<20} {:<15} {:>8} B  sha256 {}  ({policy}; imports granted: {})",
            p.name,
            p.world.as_str(),
            p.size,
            p.sha256,
            p.policy
                .imports
                .iter()
                .map(|i| i.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for e in &errors {
        println!("REFUSED {e}");
    }
    if registry.list().is_empty() && errors.is_empty() {
        println!("no *.wasm files in {}", dir.display());
    }
    Ok(errors.is_empty())
}

/// What `edgebridge plugin test` runs.
#[derive(Debug, Clone)]
pub struct PluginTest {
    /// The component.
    pub file: std::path::PathBuf,
    /// Policies folder (the plugin's policy, or the default).
    pub policies_dir: std::path::PathBuf,
    /// JSON config given to `init`.
    pub config: String,
    /// Source topic of the sample message.
    pub topic: String,
    /// Payload of the sample message.
    pub payload: Vec<u8>,
    /// The route's source filter.
    pub source: String,
    /// The route's static target (`None`: same as source).
    pub target: Option<String>,
    /// Calls to time after the first (0: just decide once).
    pub repeat: u32,
}

/// `edgebridge plugin test`: runs a plugin on one sample message in the production engine
/// under its policy, prints the decision and, with `repeat`, the time per call.
pub async fn plugin_test(t: &PluginTest) -> Result<(), String> {
    use crate::config::Direction;
    use crate::plugin::stage::{Outcome, RouteInfo, Stage};
    use crate::plugin::{Registry, Runtime, plugin_name};
    let name =
        plugin_name(&t.file).ok_or_else(|| format!("{}: not a .wasm file", t.file.display()))?;
    let policies = crate::policy::Policies::load_dir(&t.policies_dir).map_err(|r| r.to_string())?;
    let policy = policies.for_plugin(&name);
    let bytes = std::fs::read(&t.file).map_err(|e| format!("{}: {e}", t.file.display()))?;
    let runtime = Runtime::new()?;
    let loaded = runtime
        .load(&name, &t.file, &bytes, policy)
        .map_err(|e| e.to_string())?;
    println!(
        "plugin {} ({}), {} bytes, sha256 {}",
        loaded.name,
        loaded.world.as_str(),
        loaded.size,
        loaded.sha256
    );
    let registry = std::sync::Arc::new(Registry::default());
    registry.install(loaded);
    crate::topic::validate_name(&t.topic).map_err(|e| format!("--topic \"{}\" {e}", t.topic))?;
    let target = t.target.clone().unwrap_or_else(|| t.topic.clone());
    let route = RouteInfo {
        name: "test".into(),
        direction: Direction::LocalToRemote,
        source: t.source.clone(),
        qos: QoS::AtLeastOnce,
        target_namespace: t.target.clone().unwrap_or_else(|| t.source.clone()),
    };
    let counters = std::sync::Arc::new(crate::counters::PluginCounters::new(&name, "test"));
    let mut stage = Stage::new(runtime, registry, &name, &t.config, route, counters);
    let msg = Message {
        topic: t.topic.clone(),
        payload: Bytes::from(t.payload.clone()),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties::default(),
    };
    let outcome = stage
        .decide(&msg, &target)
        .await
        .map_err(|e| e.to_string())?;
    match &outcome {
        Outcome::Pass => println!("decision: pass (forward unchanged to {target})"),
        Outcome::Drop(reason) => println!("decision: drop ({reason})"),
        Outcome::Emit(list) => {
            println!("decision: emit {} message(s)", list.len());
            for m in list {
                let payload = if m.payload.as_ptr() == msg.payload.as_ptr() {
                    "(unchanged)".to_string()
                } else {
                    format!("{:?}", String::from_utf8_lossy(&m.payload))
                };
                println!(
                    "  topic {}  qos {}  retain {}  payload {payload}",
                    m.topic.as_str(),
                    m.qos.as_u8(),
                    m.retain
                );
                for (k, v) in &m.properties.user_properties {
                    println!("    user property {k}: {v}");
                }
            }
        }
    }
    if t.repeat > 0 {
        let mut samples = Vec::with_capacity(t.repeat as usize);
        for _ in 0..t.repeat {
            let start = std::time::Instant::now();
            stage
                .decide(&msg, &target)
                .await
                .map_err(|e| e.to_string())?;
            samples.push(start.elapsed());
        }
        samples.sort();
        let pick = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
        println!(
            "{} calls: median {:.2} µs, p99 {:.2} µs ({}-byte payload)",
            samples.len(),
            pick(0.5).as_secs_f64() * 1e6,
            pick(0.99).as_secs_f64() * 1e6,
            msg.payload.len()
        );
    }
    Ok(())
}
