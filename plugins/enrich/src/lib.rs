//! `enrich`: adds MQTT 5 user properties and/or wraps the payload in a JSON envelope.
//!
//! Config:
//! ```json
//! { "userProperties": { "site": "plant-7", "line": "3" }, "envelope": true }
//! ```
//! - `userProperties`: added after the message's own (on MQTT 3.1.1 routes they are dropped
//!   by the protocol, so use `envelope` there).
//! - `envelope`: replace the payload with
//!   `{"topic": <source topic>, "route": <route>, "timestamp": <ms since epoch>, "payload": <the
//!   payload as JSON if it parses, else as a string>}` and set content type `application/json`.

use edgebridge_plugin_sdk::serde_json::{self, Map, Value};
use edgebridge_plugin_sdk::*;
use serde::Deserialize;

/// The route's `config:`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Config {
    #[serde(default)]
    user_properties: Map<String, Value>,
    #[serde(default)]
    envelope: bool,
}

#[derive(Debug, PartialEq)]
struct Enrich {
    user_properties: Vec<(String, String)>,
    envelope: bool,
}

fn settings_from(cfg: Config) -> Result<Enrich, String> {
    let user_properties: Vec<(String, String)> = cfg
        .user_properties
        .into_iter()
        .map(|(k, v)| {
            let text = match v {
                Value::String(t) => t,
                other => other.to_string(),
            };
            (k, text)
        })
        .collect();
    if user_properties.is_empty() && !cfg.envelope {
        return Err("nothing to do: give userProperties and/or envelope: true".into());
    }
    Ok(Enrich {
        user_properties,
        envelope: cfg.envelope,
    })
}

/// Builds the envelope payload.
pub fn envelope(topic: &str, route: &str, timestamp: u64, payload: &[u8]) -> Vec<u8> {
    let inner = serde_json::from_slice::<Value>(payload)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(payload).into_owned()));
    serde_json::json!({
        "topic": topic,
        "route": route,
        "timestamp": timestamp,
        "payload": inner,
    })
    .to_string()
    .into_bytes()
}

impl Mapper for Enrich {
    type Config = Config;

    fn new(config: Config) -> Result<Self, InitError> {
        settings_from(config).map_err(InitError::InvalidConfig)
    }

    fn map_message(&mut self, ctx: Context, msg: Message) -> Result<Decision, String> {
        let mut props = msg.properties.clone();
        props
            .user_properties
            .extend(self.user_properties.iter().cloned());
        let mut out = Emitted::to(ctx.target.clone());
        if self.envelope {
            out = out.payload(envelope(
                &msg.topic,
                &ctx.route,
                clock::now_millis(),
                &msg.payload,
            ));
            props.content_type = Some("application/json".into());
            props.payload_format = Some(1);
        }
        Ok(Decision::Emit(vec![out.properties(props)]))
    }
}

export_mapper!(Enrich);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_envelope_embeds_json_or_text() {
        let e = envelope("a/b", "r", 5, br#"{"v":1}"#);
        assert_eq!(
            String::from_utf8(e).unwrap(),
            r#"{"payload":{"v":1},"route":"r","timestamp":5,"topic":"a/b"}"#
        );
        let e: Value = serde_json::from_slice(&envelope("a", "r", 5, b"plain")).unwrap();
        assert_eq!(e["payload"], "plain");
    }

    #[test]
    fn config_needs_something_to_do() {
        assert!(testing::mapper::<Enrich>("{}").is_err());
        assert!(testing::mapper::<Enrich>(r#"{"envelop": true}"#).is_err());
        let s = testing::mapper::<Enrich>(r#"{"userProperties": {"n": 3}}"#).unwrap();
        assert_eq!(s.user_properties, vec![("n".to_string(), "3".to_string())]);
    }

    #[test]
    fn properties_are_added_and_the_envelope_is_timed_by_the_host_clock() {
        let mut p =
            testing::mapper::<Enrich>(r#"{"userProperties": {"site": "s7"}, "envelope": true}"#)
                .unwrap();
        testing::set_now(7);
        let msg = Message::new("a/b", "21.5").user_property("unit", "C");
        let Decision::Emit(out) = p.map_message(Context::new("r", "up/a/b"), msg).unwrap() else {
            panic!("not emitted");
        };
        let props = out[0].properties.clone().unwrap();
        assert_eq!(props.user("site").collect::<Vec<_>>(), ["s7"]);
        assert_eq!(props.user("unit").collect::<Vec<_>>(), ["C"]);
        assert_eq!(out[0].topic, "up/a/b");
        assert_eq!(
            out[0].payload,
            Payload::Replace(
                br#"{"payload":21.5,"route":"r","timestamp":7,"topic":"a/b"}"#.to_vec()
            )
        );
    }
}
