//! `deadband`: sends a reading only when it changed by more than a threshold since the last
//! one sent on its topic, or when the last one sent is older than a maximum interval. The
//! last value sent per topic is kept in the bridge's `state` (policy grant `kv`), so a new
//! version of the plugin with the same state format carries on where the old one stopped.
//!
//! Config: `{ "field": "temperature", "threshold": 0.5, "maxIntervalSeconds": 60 }`
//! - `field`: the number compared, a top-level field or a dotted path.
//! - `threshold`: the change (absolute) that sends a reading (default 0: any change).
//! - `maxIntervalSeconds`: a reading is sent anyway once the last one sent is this old
//!   (default 300; 0: never).
//!
//! A message without the field as a number passes unchanged (nothing to compare). Readings
//! inside the band are dropped with the reason `within deadband` (acknowledged, counted).
//! Its own metric: `suppressed` (counter).

use edgebridge_plugin_sdk::*;
use serde::Deserialize;

/// The route's `config:`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Config {
    field: String,
    #[serde(default)]
    threshold: f64,
    #[serde(default = "five_minutes")]
    max_interval_seconds: u64,
}

fn five_minutes() -> u64 {
    300
}

struct Deadband {
    field: String,
    threshold: f64,
    max_interval_ms: u64,
    suppressed: Option<u32>,
}

/// What is kept per topic: the value and the time it was sent.
fn encode(v: f64, at: u64) -> Vec<u8> {
    let mut b = v.to_le_bytes().to_vec();
    b.extend(at.to_le_bytes());
    b
}

fn decode(b: &[u8]) -> Option<(f64, u64)> {
    let v = f64::from_le_bytes(b.get(..8)?.try_into().ok()?);
    let at = u64::from_le_bytes(b.get(8..16)?.try_into().ok()?);
    Some((v, at))
}

impl Aggregator for Deadband {
    type Config = Config;
    const STATE_FORMAT: u32 = 1;

    fn new(config: Config) -> Result<Self, InitError> {
        if !(config.threshold >= 0.0 && config.threshold.is_finite()) {
            return Err(InitError::invalid("`threshold` must be a number ≥ 0"));
        }
        let suppressed = metrics::declare(
            "suppressed",
            "Readings inside the deadband, not sent.",
            metrics::Kind::Counter,
            &[],
            &[],
        )
        .ok();
        Ok(Deadband {
            field: config.field,
            threshold: config.threshold,
            max_interval_ms: config.max_interval_seconds * 1000,
            suppressed,
        })
    }

    fn on_message(&mut self, ctx: Context, msg: Message) -> Result<Reply, String> {
        let Some(v) = json::number(&msg.payload, &self.field) else {
            return Ok(Reply::pass());
        };
        let now = clock::now_millis();
        let key = format!("last:{}", ctx.target);
        if let Some((last, at)) = state::get(&key).as_deref().and_then(decode) {
            let stale = self.max_interval_ms > 0 && now.saturating_sub(at) >= self.max_interval_ms;
            let changed = (v - last).abs() > self.threshold || (self.threshold == 0.0 && v != last);
            if !stale && !changed {
                if let Some(m) = self.suppressed {
                    let _ = metrics::add(m, &[], 1.0);
                }
                return Ok(Reply::drop("within deadband"));
            }
        }
        // Kept a little longer than the interval that makes it stale anyway.
        let ttl = (self.max_interval_ms > 0).then_some(self.max_interval_ms * 2);
        if let Err(e) = state::set(&key, &encode(v, now), ttl) {
            // The quota is full: send the reading rather than lose the change.
            log::warn(&format!("state: {e}; the reading is sent"));
        }
        Ok(Reply::pass())
    }

    fn on_timer(&mut self, _ctx: Context, _name: String) -> Result<Vec<Release>, String> {
        Ok(Vec::new())
    }

    fn flush(&mut self, _ctx: Context, _reason: FlushReason) -> Result<Vec<Release>, String> {
        Ok(Vec::new())
    }
}

export_aggregator!(Deadband);

#[cfg(test)]
mod tests {
    use super::*;
    use edgebridge_plugin_sdk::testing;

    fn send(d: &mut testing::Driver<Deadband>, v: f64) -> Reply {
        d.message(
            Context::new("r", "s/a"),
            Message::new("s/a", format!("{{\"t\": {v}}}")),
        )
        .unwrap()
    }

    #[test]
    fn only_changes_beyond_the_threshold_or_stale_readings_go_on() {
        testing::set_now(0);
        let mut d = testing::aggregator::<Deadband>(
            r#"{"field": "t", "threshold": 0.5, "maxIntervalSeconds": 10}"#,
        )
        .unwrap();
        assert_eq!(send(&mut d, 20.0), Reply::pass(), "the first reading");
        assert_eq!(send(&mut d, 20.4), Reply::drop("within deadband"));
        assert_eq!(send(&mut d, 19.6), Reply::drop("within deadband"));
        assert_eq!(send(&mut d, 20.6), Reply::pass(), "changed by 0.6");
        d.advance(9_999).unwrap();
        assert_eq!(send(&mut d, 20.6), Reply::drop("within deadband"));
        d.advance(1).unwrap();
        assert_eq!(
            send(&mut d, 20.6),
            Reply::pass(),
            "10 s since the last one sent"
        );
        assert_eq!(testing::metric("suppressed", &[]), Some(3.0));
        let other = d
            .message(
                Context::new("r", "s/b"),
                Message::new("s/b", "{\"t\": 20.6}"),
            )
            .unwrap();
        assert_eq!(other, Reply::pass(), "each topic has its own band");
        assert_eq!(
            d.message(Context::new("r", "s/a"), Message::new("s/a", "text"))
                .unwrap(),
            Reply::pass()
        );
        assert!(testing::aggregator::<Deadband>(r#"{"field": "t", "threshold": -1}"#).is_err());
    }
}
