//! `dedupe`: drops a message seen on the same route within a time window, using the host's
//! key-value state (the policy must grant `kv`).
//!
//! Config: `{ "windowSeconds": 60, "by": "payload" }`
//! - `windowSeconds`: how long a message suppresses its repeats (default 60).
//! - `by`: `payload` (topic + payload, default) or `field:<name>` (topic + a top-level JSON
//!   field, e.g. `field:id`).
//!
//! When the key-value quota is full the message is kept (never dropped for lack of memory)
//! and a warning is logged.

use edgebridge_plugin_sdk::serde_json::{self, Value};
use edgebridge_plugin_sdk::*;
use serde::Deserialize;

/// The route's `config:`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Config {
    #[serde(default = "sixty")]
    window_seconds: u64,
    #[serde(default)]
    by: Option<String>,
}

fn sixty() -> u64 {
    60
}

/// FNV-1a over the parts, as hex: the key under which a message is remembered.
pub fn key(topic: &str, data: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in topic.as_bytes().iter().chain([0u8].iter()).chain(data) {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("seen:{h:016x}")
}

struct Dedupe {
    window_ms: u64,
    field: Option<String>,
}

impl Filter for Dedupe {
    type Config = Config;

    fn new(config: Config) -> Result<Self, InitError> {
        if config.window_seconds == 0 {
            return Err(InitError::invalid(
                "`windowSeconds` must be a positive integer",
            ));
        }
        let field = match config.by.as_deref() {
            None | Some("payload") => None,
            Some(f) if f.starts_with("field:") && f.len() > 6 => Some(f[6..].to_string()),
            Some(_) => {
                return Err(InitError::invalid(
                    "`by` must be \"payload\" or \"field:<name>\"",
                ));
            }
        };
        Ok(Dedupe {
            window_ms: config.window_seconds.saturating_mul(1000),
            field,
        })
    }

    fn keep(&mut self, _ctx: Context, msg: Message) -> Result<bool, String> {
        let data = match &self.field {
            None => msg.payload.clone(),
            Some(f) => serde_json::from_slice::<Value>(&msg.payload)
                .ok()
                .and_then(|v| v.get(f).map(|x| x.to_string().into_bytes()))
                .unwrap_or_else(|| msg.payload.clone()),
        };
        let k = key(&msg.topic, &data);
        let now = clock::now_millis();
        if let Some(seen) = kv::get(&k) {
            let at = u64::from_le_bytes(seen.try_into().unwrap_or([0; 8]));
            if now.saturating_sub(at) < self.window_ms {
                return Ok(false);
            }
        }
        if let Err(e) = kv::set(&k, &now.to_le_bytes()) {
            log::warn(&format!(
                "dedupe state not stored, keeping the message: {e}"
            ));
        }
        Ok(true)
    }
}

export_filter!(Dedupe);

#[cfg(test)]
mod tests {
    #[test]
    fn keys_differ_by_topic_and_data() {
        assert_ne!(super::key("a", b"x"), super::key("b", b"x"));
        assert_ne!(super::key("a", b"x"), super::key("a", b"y"));
        assert_eq!(super::key("a", b"x"), super::key("a", b"x"));
    }

    #[test]
    fn repeats_within_the_window_are_dropped_and_a_full_quota_keeps() {
        use super::*;
        let mut d =
            testing::filter::<Dedupe>(r#"{"windowSeconds": 10, "by": "field:id"}"#).unwrap();
        let ctx = Context::default();
        testing::set_now(1_000);
        assert!(
            d.keep(ctx.clone(), Message::new("t", r#"{"id":1,"v":1}"#))
                .unwrap()
        );
        assert!(
            !d.keep(ctx.clone(), Message::new("t", r#"{"id":1,"v":2}"#))
                .unwrap()
        );
        assert!(
            d.keep(ctx.clone(), Message::new("u", r#"{"id":1}"#))
                .unwrap()
        );
        testing::advance(10_000);
        assert!(
            d.keep(ctx.clone(), Message::new("t", r#"{"id":1}"#))
                .unwrap()
        );
        testing::set_kv_max_keys(2);
        assert!(
            d.keep(ctx.clone(), Message::new("t", r#"{"id":2}"#))
                .unwrap()
        );
        assert!(d.keep(ctx, Message::new("t", r#"{"id":2}"#)).unwrap());
        assert_eq!(testing::logs().len(), 2, "{:?}", testing::logs());
        assert!(testing::filter::<Dedupe>(r#"{"windowSeconds": 0}"#).is_err());
        assert!(testing::filter::<Dedupe>(r#"{"by": "id"}"#).is_err());
    }
}
