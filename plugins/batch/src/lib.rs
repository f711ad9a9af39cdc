//! `batch`: collects messages per topic into one JSON array, sent when it has `size`
//! messages or when the first of them is `maxWaitSeconds` old. Every message is held in its
//! topic's batch and acknowledged to its source when the target acknowledged the array.
//!
//! Config: `{ "size": 100, "maxWaitSeconds": 5 }`
//! - `size`: messages per batch (1 to 10000, default 100).
//! - `maxWaitSeconds`: the longest a message waits for its batch to fill (default 5).
//!
//! Output: a JSON array of the payloads, each as the JSON value it is, or as a string when it
//! is not JSON. Its own metric: `batch_size` (histogram of messages per batch sent).

use std::collections::BTreeMap;

use edgebridge_plugin_sdk::serde_json::Value;
use edgebridge_plugin_sdk::*;
use serde::Deserialize;

/// The route's `config:`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Config {
    #[serde(default = "hundred")]
    size: usize,
    #[serde(default = "five")]
    max_wait_seconds: u64,
}

fn hundred() -> usize {
    100
}

fn five() -> u64 {
    5
}

struct Batch {
    size: usize,
    max_wait_ms: u64,
    /// Open batches by target topic.
    open: BTreeMap<String, Vec<Value>>,
    sizes: Option<u32>,
}

impl Batch {
    fn close(&mut self, topic: &str) -> Option<Release> {
        let items = self.open.remove(topic)?;
        timers::cancel(topic);
        if let Some(m) = self.sizes {
            let _ = metrics::observe(m, &[], items.len() as f64);
        }
        let body = Value::Array(items).to_string();
        Some(Release::new(topic, vec![Emitted::to(topic).payload(body)]))
    }
}

impl Aggregator for Batch {
    type Config = Config;

    fn new(config: Config) -> Result<Self, InitError> {
        if !(1..=10_000).contains(&config.size) {
            return Err(InitError::invalid("`size` must be between 1 and 10000"));
        }
        if config.max_wait_seconds == 0 {
            return Err(InitError::invalid("`maxWaitSeconds` must be at least 1"));
        }
        let sizes = metrics::declare(
            "batch_size",
            "Messages per batch sent.",
            metrics::Kind::Histogram,
            &[],
            &[1.0, 10.0, 100.0, 1000.0, 10000.0],
        )
        .ok();
        Ok(Batch {
            size: config.size,
            max_wait_ms: config.max_wait_seconds * 1000,
            open: BTreeMap::new(),
            sizes,
        })
    }

    fn on_message(&mut self, ctx: Context, msg: Message) -> Result<Reply, String> {
        let item = serde_json::from_slice(&msg.payload)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&msg.payload).into_owned()));
        let topic = ctx.target;
        let items = self.open.entry(topic.clone()).or_default();
        if items.is_empty() {
            timers::set(&topic, self.max_wait_ms)?;
        }
        items.push(item);
        let full = items.len() >= self.size;
        let mut reply = Reply::hold(topic.clone());
        if full {
            // Held first, then the batch it completes is released with it.
            reply = reply.releasing(self.close(&topic).into_iter().collect());
        }
        Ok(reply)
    }

    fn on_timer(&mut self, _ctx: Context, name: String) -> Result<Vec<Release>, String> {
        Ok(self.close(&name).into_iter().collect())
    }

    fn flush(&mut self, _ctx: Context, _reason: FlushReason) -> Result<Vec<Release>, String> {
        let topics: Vec<String> = self.open.keys().cloned().collect();
        Ok(topics.iter().filter_map(|t| self.close(t)).collect())
    }
}

export_aggregator!(Batch);

#[cfg(test)]
mod tests {
    use super::*;
    use edgebridge_plugin_sdk::testing;

    fn body(r: &Release) -> Value {
        match &r.messages[0].payload {
            Payload::Replace(b) => serde_json::from_slice(b).unwrap(),
            Payload::Unchanged => panic!("a batch is new bytes"),
        }
    }

    #[test]
    fn a_full_batch_goes_at_once_and_a_slow_one_after_the_wait() {
        testing::set_now(0);
        let mut d = testing::aggregator::<Batch>(r#"{"size": 3, "maxWaitSeconds": 2}"#).unwrap();
        let ctx = || Context::new("r", "out");
        assert_eq!(
            d.message(ctx(), Message::new("a", "1")).unwrap(),
            Reply::hold("out")
        );
        d.message(ctx(), Message::new("a", "text")).unwrap();
        let r = d.message(ctx(), Message::new("a", "{\"v\": 3}")).unwrap();
        assert_eq!(
            r.action,
            Action::Hold("out".into()),
            "held, and released at once"
        );
        assert_eq!(r.releases.len(), 1);
        assert_eq!(
            body(&r.releases[0]),
            serde_json::json!([1, "text", {"v": 3}])
        );
        assert!(
            testing::timers().is_empty(),
            "the full batch's timer is cancelled"
        );
        d.message(ctx(), Message::new("a", "4")).unwrap();
        assert!(d.advance(1_999).unwrap().is_empty());
        let out = d.advance(1).unwrap();
        assert_eq!(body(&out[0]), serde_json::json!([4]));
        assert_eq!(testing::histogram("batch_size", &[]), Some((2, 4.0)));
    }

    #[test]
    fn a_flush_sends_every_open_batch() {
        testing::set_now(0);
        let mut d = testing::aggregator::<Batch>("{}").unwrap();
        d.message(Context::new("r", "x"), Message::new("a", "1"))
            .unwrap();
        d.message(Context::new("r", "y"), Message::new("b", "2"))
            .unwrap();
        let out = d.flush(FlushReason::Stop).unwrap();
        assert_eq!(
            out.iter().map(|r| r.window.as_str()).collect::<Vec<_>>(),
            ["x", "y"]
        );
        assert!(testing::aggregator::<Batch>(r#"{"size": 0}"#).is_err());
    }
}
