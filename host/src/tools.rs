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
        client_id: t.client_id.clone(),
        clean_start: true,
        session_expiry: None,
        subscriptions,
        max_inflight: 100,
        receive_maximum: 100,
        keep_alive: Duration::from_secs(30),
        backoff: (Duration::from_millis(200), Duration::from_secs(2)),
        max_packet: 16 * 1024 * 1024,
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
