//! `heartbeat`: forwards every message unchanged and, when a topic has been silent for
//! `silenceSeconds`, publishes a heartbeat saying so to `<topic>/<suffix>` (again every
//! `silenceSeconds` while the silence lasts, unless `repeat` is false). Each topic's silence
//! is a timer the bridge keeps; a message moves it.
//!
//! Config: `{ "silenceSeconds": 30, "suffix": "silent", "repeat": true }`
//!
//! Heartbeat payload: `{"topic": "<topic>", "silentForMs": <ms>, "lastSeen": <ms>}`. The
//! policy must grant `timers`, with `timers.max` at least the number of topics watched.

use std::collections::BTreeMap;

use edgebridge_plugin_sdk::*;
use serde::Deserialize;

/// The route's `config:`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Config {
    #[serde(default = "thirty")]
    silence_seconds: u64,
    #[serde(default = "silent")]
    suffix: String,
    #[serde(default = "yes")]
    repeat: bool,
}

fn thirty() -> u64 {
    30
}

fn silent() -> String {
    "silent".into()
}

fn yes() -> bool {
    true
}

struct Heartbeat {
    silence_ms: u64,
    suffix: String,
    repeat: bool,
    /// Last message time by topic.
    seen: BTreeMap<String, u64>,
}

impl Aggregator for Heartbeat {
    type Config = Config;

    fn new(config: Config) -> Result<Self, InitError> {
        if config.silence_seconds == 0 {
            return Err(InitError::invalid("`silenceSeconds` must be at least 1"));
        }
        if config.suffix.is_empty() || config.suffix.contains(['+', '#']) {
            return Err(InitError::invalid(
                "`suffix` must be a topic level without wildcards",
            ));
        }
        Ok(Heartbeat {
            silence_ms: config.silence_seconds * 1000,
            suffix: config.suffix,
            repeat: config.repeat,
            seen: BTreeMap::new(),
        })
    }

    fn on_message(&mut self, ctx: Context, _msg: Message) -> Result<Reply, String> {
        self.seen.insert(ctx.target.clone(), clock::now_millis());
        timers::set(&ctx.target, self.silence_ms)?;
        Ok(Reply::pass())
    }

    fn on_timer(&mut self, _ctx: Context, topic: String) -> Result<Vec<Release>, String> {
        let Some(last) = self.seen.get(&topic).copied() else {
            return Ok(Vec::new());
        };
        let now = clock::now_millis();
        if self.repeat {
            timers::set(&topic, self.silence_ms)?;
        } else {
            self.seen.remove(&topic);
        }
        let body = serde_json::json!({
            "topic": topic,
            "silentForMs": now.saturating_sub(last),
            "lastSeen": last,
        });
        // Nothing is held: the release only publishes.
        Ok(vec![Release::new(
            format!("heartbeat:{topic}"),
            vec![Emitted::to(format!("{topic}/{}", self.suffix)).payload(body.to_string())],
        )])
    }

    fn flush(&mut self, _ctx: Context, _reason: FlushReason) -> Result<Vec<Release>, String> {
        Ok(Vec::new())
    }
}

export_aggregator!(Heartbeat);

#[cfg(test)]
mod tests {
    use super::*;
    use edgebridge_plugin_sdk::testing;

    #[test]
    fn a_silent_topic_gets_a_heartbeat_and_a_message_moves_it() {
        testing::set_now(0);
        let mut d = testing::aggregator::<Heartbeat>(r#"{"silenceSeconds": 5}"#).unwrap();
        let msg = |d: &mut testing::Driver<Heartbeat>| {
            d.message(Context::new("r", "dev/1"), Message::new("dev/1", "x"))
                .unwrap()
        };
        assert_eq!(msg(&mut d), Reply::pass());
        assert!(d.advance(4_000).unwrap().is_empty());
        msg(&mut d);
        assert!(
            d.advance(4_999).unwrap().is_empty(),
            "moved by the message at 4 s"
        );
        let out = d.advance(1).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].messages[0].topic, "dev/1/silent");
        let out = d.advance(5_000).unwrap();
        assert_eq!(out.len(), 1, "again while the silence lasts");
        let Payload::Replace(b) = &out[0].messages[0].payload else {
            panic!()
        };
        let v: serde_json::Value = serde_json::from_slice(b).unwrap();
        assert_eq!(
            (v["silentForMs"].as_u64(), v["lastSeen"].as_u64()),
            (Some(10_000), Some(4_000))
        );
    }

    #[test]
    fn without_repeat_one_heartbeat_per_silence() {
        testing::set_now(0);
        let mut d =
            testing::aggregator::<Heartbeat>(r#"{"silenceSeconds": 1, "repeat": false}"#).unwrap();
        d.message(Context::new("r", "a"), Message::new("a", "x"))
            .unwrap();
        assert_eq!(d.advance(10_000).unwrap().len(), 1);
        assert!(testing::timers().is_empty());
        assert!(testing::aggregator::<Heartbeat>(r##"{"suffix": "#"}"##).is_err());
    }
}
