//! The command line's tools besides `run`: `edgebridge pub` and `edgebridge sub` (small MQTT
//! clients on the bridge's own session code, so the quick start needs nothing installed to
//! watch messages cross), `plugins list`, and the plugin author's tools in [`plugin_test`]
//! and [`scaffold`].

pub mod plugin_test;
pub mod scaffold;
pub mod status_table;

use std::time::Duration;

use bytes::Bytes;

use crate::config::parse::parse_endpoint;
use crate::model::{Message, Props, QoS};
use crate::mqtt::session::{self, SessionEvent, SessionOptions};
use crate::mqtt::{LinkOptions, StateEvent, SubFilter, Version};

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
    let version = if t.v5 { Version::V5 } else { Version::V4 };
    Ok(SessionOptions {
        link: LinkOptions::anonymous(endpoint, version, t.client_id.clone()),
        subscriptions,
        max_inflight: 100,
    })
}

/// Publishes `count` copies of `payload` (with `{n}` replaced by the sequence number) and
/// returns once the broker acknowledged them all (QoS 0: once written). Gives up when `wait`
/// passes without progress (the broker unreachable, or not acknowledging).
pub async fn publish(
    t: &Target,
    topic: &str,
    qos: QoS,
    retain: bool,
    payload: &str,
    (count, interval): (u64, Option<Duration>),
    wait: Duration,
) -> Result<(), String> {
    crate::topic::validate_name(topic).map_err(|e| format!("topic \"{topic}\" {e}"))?;
    let (handle, mut events, task) = session::spawn(options(t, vec![])?, 1024);
    for n in 0..count {
        if let Some(every) = interval
            && n > 0
        {
            tokio::time::sleep(every).await;
        }
        let msg = Message {
            topic: topic.into(),
            payload: Bytes::from(payload.replace("{n}", &n.to_string())),
            qos,
            retain,
            properties: Props::default(),
        };
        handle.publish(msg, n);
    }
    let mut done = 0;
    let mut last_error = None;
    let mut deadline = tokio::time::Instant::now() + wait;
    while done < count {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(SessionEvent::State(StateEvent::Delivered(_)))) => {
                done += 1;
                deadline = tokio::time::Instant::now() + wait;
            }
            Ok(Some(SessionEvent::State(StateEvent::Rejected(_, code)))) => {
                return Err(format!(
                    "the broker refused a message (reason code {code:#04x})"
                ));
            }
            Ok(Some(SessionEvent::ConnectionLost(e))) => {
                eprintln!("{}: {e}; retrying", t.endpoint);
                last_error = Some(e);
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                task.abort();
                return Err(gave_up(
                    t,
                    wait,
                    last_error,
                    format!("{done} of {count} message(s) acknowledged"),
                ));
            }
        }
    }
    drop(handle);
    let _ = task.await;
    Ok(())
}

fn gave_up(t: &Target, wait: Duration, last_error: Option<String>, progress: String) -> String {
    let why = last_error.unwrap_or_else(|| "no answer".into());
    format!(
        "gave up on {} after {} s without progress ({why}); {progress} (--wait SECONDS waits longer)",
        t.endpoint,
        wait.as_secs()
    )
}

/// Subscribes to `filter` and prints `topic payload` per message, until `count` messages
/// arrived (0: forever). Gives up when it is not subscribed within `wait` of starting or of
/// losing the connection.
pub async fn subscribe(
    t: &Target,
    filter: &str,
    qos: QoS,
    count: u64,
    wait: Duration,
) -> Result<(), String> {
    crate::topic::validate_filter(filter).map_err(|e| format!("filter \"{filter}\" {e}"))?;
    let subs = vec![SubFilter {
        filter: filter.to_string(),
        qos,
    }];
    let (handle, mut events, task) = session::spawn(options(t, subs)?, 1024);
    let mut seen = 0;
    let mut last_error = None;
    // Until subscribed (again): give up at this instant.
    let mut deadline = Some(tokio::time::Instant::now() + wait);
    loop {
        let ev = match deadline {
            Some(at) => match tokio::time::timeout_at(at, events.recv()).await {
                Ok(ev) => ev,
                Err(_) => {
                    task.abort();
                    return Err(gave_up(
                        t,
                        wait,
                        last_error,
                        format!("not subscribed to {filter}"),
                    ));
                }
            },
            None => events.recv().await,
        };
        let Some(ev) = ev else { break };
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
                    eprintln!("subscribed to {f} on {}", t.endpoint);
                }
                deadline = None;
            }
            SessionEvent::ConnectionLost(e) => {
                eprintln!("{}: {e}; retrying", t.endpoint);
                last_error = Some(e);
                if deadline.is_none() {
                    deadline = Some(tokio::time::Instant::now() + wait);
                }
            }
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
    if let Err(e) = std::fs::read_dir(dir) {
        return Err(format!("plugins folder {}: {e}", dir.display()));
    }
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
