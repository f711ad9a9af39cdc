//! `window-average`: the average (with min, max and count) of a numeric JSON field over a
//! tumbling window, per topic. Every message is held in its topic's window; when the window
//! closes, one message goes to the topic's target and what the window held is acknowledged
//! to its source once the target acknowledged that message.
//!
//! Config: `{ "field": "temperature", "windowSeconds": 10 }`
//! - `field`: the number to average, a top-level field or a dotted path (`reading.value`).
//! - `windowSeconds`: the window's length (default 10). Windows are aligned to multiples of
//!   it since the Unix epoch, so every topic's window closes at the same moment and one
//!   timer serves them all.
//!
//! A message without the field as a number is dropped with the reason (counted by the
//! bridge). Output payload: `{"avg": 21.5, "min": 21.0, "max": 22.0, "count": 100,
//! "start": <ms>, "end": <ms>}` (`"partial": true` when a flush closed the window early).
//! Its own metrics: `windows_closed` (counter) and `open_windows` (gauge).

use std::collections::BTreeMap;

use edgebridge_plugin_sdk::*;
use serde::Deserialize;

/// The route's `config:`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Config {
    field: String,
    #[serde(default = "ten")]
    window_seconds: u64,
}

fn ten() -> u64 {
    10
}

#[derive(Debug, Clone, Copy)]
struct Window {
    sum: f64,
    min: f64,
    max: f64,
    count: u64,
}

/// The timer that closes the windows.
const CLOSE: &str = "close";

struct WindowAverage {
    field: String,
    window_ms: u64,
    /// Open windows by target topic.
    windows: BTreeMap<String, Window>,
    /// Start of the current window (ms).
    start: u64,
    closed: Option<u32>,
    open: Option<u32>,
}

impl WindowAverage {
    fn result(&self, topic: &str, w: &Window, end: u64, partial: bool) -> Emitted {
        let mut doc = serde_json::json!({
            "avg": w.sum / w.count as f64,
            "min": w.min,
            "max": w.max,
            "count": w.count,
            "start": self.start,
            "end": end,
        });
        if partial {
            doc["partial"] = serde_json::Value::Bool(true);
        }
        Emitted::to(topic).payload(doc.to_string())
    }

    /// Closes every open window at `end`.
    fn close_all(&mut self, end: u64, partial: bool) -> Vec<Release> {
        let windows = std::mem::take(&mut self.windows);
        let out = windows
            .iter()
            .map(|(topic, w)| {
                Release::new(topic.clone(), vec![self.result(topic, w, end, partial)])
            })
            .collect::<Vec<_>>();
        if let Some(m) = self.closed {
            let _ = metrics::add(m, &[], out.len() as f64);
        }
        if let Some(m) = self.open {
            let _ = metrics::set(m, &[], 0.0);
        }
        out
    }
}

impl Aggregator for WindowAverage {
    type Config = Config;

    fn new(config: Config) -> Result<Self, InitError> {
        if config.field.is_empty() {
            return Err(InitError::invalid("`field` must name a JSON field"));
        }
        if config.window_seconds == 0 || config.window_seconds > 86_400 {
            return Err(InitError::invalid(
                "`windowSeconds` must be between 1 and 86400",
            ));
        }
        // Metrics are optional: without the `metrics` grant the plugin runs without them.
        let closed = metrics::declare(
            "windows_closed",
            "Windows closed and sent.",
            metrics::Kind::Counter,
            &[],
            &[],
        )
        .ok();
        let open = metrics::declare(
            "open_windows",
            "Windows open now (one per topic).",
            metrics::Kind::Gauge,
            &[],
            &[],
        )
        .ok();
        Ok(WindowAverage {
            field: config.field,
            window_ms: config.window_seconds * 1000,
            windows: BTreeMap::new(),
            start: 0,
            closed,
            open,
        })
    }

    fn on_message(&mut self, ctx: Context, msg: Message) -> Result<Reply, String> {
        let Some(v) = json::number(&msg.payload, &self.field) else {
            return Ok(Reply::drop(format!("no number at `{}`", self.field)));
        };
        if self.windows.is_empty() {
            // The first message of a window: close it at the next boundary.
            let now = clock::now_millis();
            self.start = now - now % self.window_ms;
            timers::set(CLOSE, self.start + self.window_ms - now)?;
        }
        let w = self.windows.entry(ctx.target.clone()).or_insert(Window {
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            count: 0,
        });
        w.sum += v;
        w.min = w.min.min(v);
        w.max = w.max.max(v);
        w.count += 1;
        if let Some(m) = self.open {
            let _ = metrics::set(m, &[], self.windows.len() as f64);
        }
        Ok(Reply::hold(ctx.target))
    }

    fn on_timer(&mut self, _ctx: Context, _name: String) -> Result<Vec<Release>, String> {
        let end = self.start + self.window_ms;
        Ok(self.close_all(end, false))
    }

    fn flush(&mut self, _ctx: Context, _reason: FlushReason) -> Result<Vec<Release>, String> {
        timers::cancel(CLOSE);
        Ok(self.close_all(clock::now_millis(), true))
    }
}

export_aggregator!(WindowAverage);

#[cfg(test)]
mod tests {
    use super::*;
    use edgebridge_plugin_sdk::testing;

    fn reading(topic: &str, v: f64) -> (Context, Message) {
        (
            Context::new("r", topic),
            Message::new(topic, format!("{{\"t\": {v}}}")),
        )
    }

    fn payload(r: &Release) -> serde_json::Value {
        serde_json::from_slice(match &r.messages[0].payload {
            Payload::Replace(b) => b,
            Payload::Unchanged => panic!("a window's result is new bytes"),
        })
        .unwrap()
    }

    #[test]
    fn a_ten_hertz_sensor_becomes_one_average_per_window_per_topic() {
        testing::set_now(1_000_000);
        let mut d = testing::aggregator::<WindowAverage>(r#"{"field": "t"}"#).unwrap();
        let mut out = Vec::new();
        for i in 0..100 {
            let (ctx, msg) = reading("s/a", 20.0 + (i % 2) as f64);
            assert_eq!(d.message(ctx, msg).unwrap(), Reply::hold("s/a"));
            let (ctx, msg) = reading("s/b", 5.0);
            d.message(ctx, msg).unwrap();
            out.extend(d.advance(100).unwrap());
        }
        // The window [1,000,000, 1,010,000) closed when the clock reached its end.
        assert_eq!(out.len(), 2, "one result per topic");
        let a = payload(&out[0]);
        assert_eq!(
            (a["avg"].as_f64(), a["count"].as_u64()),
            (Some(20.5), Some(100))
        );
        assert_eq!(payload(&out[1])["avg"], 5.0);
        assert!(testing::timers().is_empty());
    }

    #[test]
    fn windows_close_at_the_boundary_with_their_average() {
        testing::set_now(3_000);
        let mut d =
            testing::aggregator::<WindowAverage>(r#"{"field": "t", "windowSeconds": 10}"#).unwrap();
        for v in [1.0, 2.0, 6.0] {
            let (ctx, msg) = reading("s/a", v);
            d.message(ctx, msg).unwrap();
        }
        let (ctx, msg) = reading("s/b", 7.0);
        d.message(ctx, msg).unwrap();
        assert_eq!(testing::timers().get(CLOSE), Some(&10_000));
        assert!(d.advance(6_999).unwrap().is_empty());
        let out = d.advance(1).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].window, "s/a");
        assert_eq!(out[0].messages[0].topic, "s/a");
        let p = payload(&out[0]);
        assert_eq!(p["avg"], 3.0);
        assert_eq!(
            (p["min"].as_f64(), p["max"].as_f64()),
            (Some(1.0), Some(6.0))
        );
        assert_eq!(
            (p["count"].as_u64(), p["start"].as_u64(), p["end"].as_u64()),
            (Some(3), Some(0), Some(10_000))
        );
        assert_eq!(payload(&out[1])["avg"], 7.0);
        assert_eq!(testing::metric("windows_closed", &[]), Some(2.0));
        assert_eq!(testing::metric("open_windows", &[]), Some(0.0));
    }

    #[test]
    fn a_flush_sends_partial_windows_and_bad_readings_are_dropped() {
        testing::set_now(0);
        let mut d = testing::aggregator::<WindowAverage>(r#"{"field": "a.b"}"#).unwrap();
        let r = d
            .message(
                Context::new("r", "x"),
                Message::new("x", "{\"a\": {\"b\": 4}}"),
            )
            .unwrap();
        assert_eq!(r, Reply::hold("x"));
        let r = d
            .message(Context::new("r", "x"), Message::new("x", "not json"))
            .unwrap();
        assert_eq!(r, Reply::drop("no number at `a.b`"));
        let out = d.flush(FlushReason::Stop).unwrap();
        assert_eq!(payload(&out[0])["partial"], true);
        assert!(testing::timers().is_empty());
        assert!(
            testing::aggregator::<WindowAverage>(r#"{"field": "t", "windowSeconds": 0}"#).is_err()
        );
        assert!(testing::aggregator::<WindowAverage>(r#"{"fild": "t"}"#).is_err());
    }
}
