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

use std::cell::RefCell;

use edgebridge_filter_sdk::*;

struct Settings {
    window_ms: u64,
    field: Option<String>,
}

thread_local! {
    static SETTINGS: RefCell<Settings> = const { RefCell::new(Settings { window_ms: 60_000, field: None }) };
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

struct Dedupe;

impl Filter for Dedupe {
    fn init(config: String) -> Result<(), InitError> {
        let cfg = parse_config(&config)?;
        let mut s = Settings {
            window_ms: 60_000,
            field: None,
        };
        if let Some(obj) = cfg.as_object() {
            for (k, v) in obj {
                match k.as_str() {
                    "windowSeconds" => {
                        s.window_ms = v.as_u64().filter(|n| *n > 0).ok_or_else(|| {
                            InitError::InvalidConfig(
                                "`windowSeconds` must be a positive integer".into(),
                            )
                        })? * 1000
                    }
                    "by" => match v.as_str() {
                        Some("payload") => s.field = None,
                        Some(f) if f.starts_with("field:") && f.len() > 6 => {
                            s.field = Some(f[6..].to_string())
                        }
                        _ => {
                            return Err(InitError::InvalidConfig(
                                "`by` must be \"payload\" or \"field:<name>\"".into(),
                            ));
                        }
                    },
                    other => {
                        return Err(InitError::InvalidConfig(format!(
                            "unknown field `{other}`; expected windowSeconds, by"
                        )));
                    }
                }
            }
        }
        SETTINGS.with(|c| *c.borrow_mut() = s);
        Ok(())
    }

    fn keep(_ctx: Context, msg: Message) -> Result<bool, String> {
        SETTINGS.with(|s| {
            let s = s.borrow();
            let data = match &s.field {
                None => msg.payload.clone(),
                Some(f) => serde_json::from_slice::<Value>(&msg.payload)
                    .ok()
                    .and_then(|v| v.get(f).map(|x| x.to_string().into_bytes()))
                    .unwrap_or_else(|| msg.payload.clone()),
            };
            let k = key(&msg.topic, &data);
            let now = now_millis();
            if let Some(seen) = kv::get(&k) {
                let at = u64::from_le_bytes(seen.try_into().unwrap_or([0; 8]));
                if now.saturating_sub(at) < s.window_ms {
                    return Ok(false);
                }
            }
            if let Err(e) = kv::set(&k, &now.to_le_bytes()) {
                log::warn(&format!(
                    "dedupe state not stored, keeping the message: {e}"
                ));
            }
            Ok(true)
        })
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
}
