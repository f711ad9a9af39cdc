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

use std::cell::RefCell;

use edgebridge_mapper_sdk::*;

#[derive(Default)]
struct Settings {
    user_properties: Vec<(String, String)>,
    envelope: bool,
}

thread_local! {
    static SETTINGS: RefCell<Settings> = RefCell::new(Settings::default());
}

fn settings_from(cfg: &Value) -> Result<Settings, String> {
    let obj = cfg.as_object().ok_or("config must be a mapping")?;
    let mut s = Settings::default();
    for (k, v) in obj {
        match k.as_str() {
            "userProperties" => {
                let props = v.as_object().ok_or("`userProperties` must be a mapping")?;
                for (pk, pv) in props {
                    let text = match pv {
                        Value::String(t) => t.clone(),
                        other => other.to_string(),
                    };
                    s.user_properties.push((pk.clone(), text));
                }
            }
            "envelope" => s.envelope = v.as_bool().ok_or("`envelope` must be true or false")?,
            other => {
                return Err(format!(
                    "unknown field `{other}`; expected userProperties, envelope"
                ));
            }
        }
    }
    if s.user_properties.is_empty() && !s.envelope {
        return Err("nothing to do: give userProperties and/or envelope: true".into());
    }
    Ok(s)
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

struct Enrich;

impl Mapper for Enrich {
    fn init(config: String) -> Result<(), InitError> {
        let s = settings_from(&parse_config(&config)?).map_err(InitError::InvalidConfig)?;
        SETTINGS.with(|c| *c.borrow_mut() = s);
        Ok(())
    }

    fn map_message(ctx: Context, msg: Message) -> Result<Decision, String> {
        SETTINGS.with(|s| {
            let s = s.borrow();
            let mut props = msg.properties.clone();
            props
                .user_properties
                .extend(s.user_properties.iter().cloned());
            let mut out = Emitted::to(ctx.target.clone());
            if s.envelope {
                out =
                    out.with_payload(envelope(&msg.topic, &ctx.route, now_millis(), &msg.payload));
                props.content_type = Some("application/json".into());
                props.payload_format = Some(1);
            }
            out.properties = Some(props);
            Ok(Decision::Emit(vec![out]))
        })
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
        assert!(settings_from(&serde_json::json!({})).is_err());
        assert!(settings_from(&serde_json::json!({"envelop": true})).is_err());
        let s = settings_from(&serde_json::json!({"userProperties": {"n": 3}})).unwrap();
        assert_eq!(s.user_properties, vec![("n".to_string(), "3".to_string())]);
    }
}
