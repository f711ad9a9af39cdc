//! A native stand-in for the bridge, for a plugin's unit tests (`cargo test`, not the wasm
//! target): [`crate::log`], [`crate::clock`] and [`crate::kv`] are served from state kept per
//! test thread, which the functions here read and set.
//!
//! ```ignore
//! use edgebridge_plugin_sdk::{testing, Context, Message, Mapper};
//!
//! #[test]
//! fn upper_cases() {
//!     let mut p = testing::mapper::<Upper>(r#"{"suffix": "x"}"#).unwrap();
//!     let d = p.map_message(Context::new("r", "a/b"), Message::new("a/b", "hi")).unwrap();
//!     assert_eq!(testing::logs(), vec![(testing::Level::Info, "upper-cased".to_string())]);
//! }
//! ```
//!
//! Every test runs on a thread of its own, so tests do not see each other's state.

use std::cell::RefCell;
use std::collections::BTreeMap;

pub use crate::log::Level;
use crate::{Aggregator, Context, Filter, FlushReason, InitError, Mapper, Message, Release, Reply};

/// Creates a mapper from `config` JSON the way the host's `init` does (the text the host
/// passes is the route's `config:` as JSON; `{}` when the route has none).
pub fn mapper<M: Mapper>(config: &str) -> Result<M, InitError> {
    M::new(crate::parse_config(config)?)
}

/// Creates a filter from `config` JSON the way the host's `init` does.
pub fn filter<F: Filter>(config: &str) -> Result<F, InitError> {
    F::new(crate::parse_config(config)?)
}

/// Creates an aggregator from `config` JSON the way the host's `init` does, in a driver that
/// keeps its timers and moves the clock (which starts fixed at 0 unless [`set_now`] was
/// called).
pub fn aggregator<A: Aggregator>(config: &str) -> Result<Driver<A>, InitError> {
    if host::with(|h| h.now.is_none()) {
        set_now(0);
    }
    Ok(Driver {
        plugin: A::new(crate::parse_config(config)?)?,
        ctx: Context::default(),
    })
}

/// Drives an [`Aggregator`] as the bridge does: messages, timers that fire as the clock
/// moves, flushes.
pub struct Driver<A> {
    /// The plugin.
    pub plugin: A,
    /// The context of timer and flush calls (the route's target namespace in `target`).
    pub ctx: Context,
}

impl<A: Aggregator> Driver<A> {
    /// Calls `on_message` at the current time.
    pub fn message(&mut self, ctx: Context, msg: Message) -> Result<Reply, String> {
        self.plugin.on_message(ctx, msg)
    }

    /// Moves the clock on by `millis`, calling `on_timer` for every timer that falls due on
    /// the way, in order, each at its due time; the window results, in order.
    pub fn advance(&mut self, millis: u64) -> Result<Vec<Release>, String> {
        let end = host::now_millis() + millis;
        let mut out = Vec::new();
        loop {
            let next = host::with(|h| {
                h.timers
                    .iter()
                    .filter(|(_, at)| **at <= end)
                    .min_by_key(|(name, at)| (**at, (*name).clone()))
                    .map(|(n, at)| (n.clone(), *at))
            });
            let Some((name, at)) = next else { break };
            host::with(|h| h.timers.remove(&name));
            set_now(at.max(host::now_millis()));
            out.extend(self.plugin.on_timer(self.ctx.clone(), name)?);
        }
        set_now(end);
        Ok(out)
    }

    /// Calls `flush(reason)`.
    pub fn flush(&mut self, reason: FlushReason) -> Result<Vec<Release>, String> {
        self.plugin.flush(self.ctx.clone(), reason)
    }
}

/// The timers set on this thread: name and due time (ms).
pub fn timers() -> BTreeMap<String, u64> {
    host::with(|h| h.timers.clone())
}

/// Makes [`crate::timers::set`] fail beyond `max` timers or below `min_period` ms, as the
/// host does under a policy.
pub fn set_timer_limits(max: usize, min_period: u64) {
    host::with(|h| h.timer_limits = Some((max, min_period)))
}

/// The value of a counter or gauge the plugin declared, for these label values.
pub fn metric(name: &str, labels: &[&str]) -> Option<f64> {
    host::with(|h| {
        let m = h.metrics.iter().find(|m| m.0 == name)?;
        let key: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
        m.3.get(&key).map(|v| v.0)
    })
}

/// A histogram's (count, sum) for these label values.
pub fn histogram(name: &str, labels: &[&str]) -> Option<(u64, f64)> {
    host::with(|h| {
        let m = h.metrics.iter().find(|m| m.0 == name)?;
        let key: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
        m.3.get(&key).map(|v| (v.1, v.0))
    })
}

/// The lines logged on this thread so far.
pub fn logs() -> Vec<(Level, String)> {
    host::with(|h| h.logs.clone())
}

/// The lines logged on this thread so far, forgetting them.
pub fn take_logs() -> Vec<(Level, String)> {
    host::with(|h| std::mem::take(&mut h.logs))
}

/// Fixes [`crate::clock::now_millis`] at `millis` (it reads the system clock until then).
pub fn set_now(millis: u64) {
    host::with(|h| h.now = Some(millis))
}

/// Moves the fixed clock on by `millis` (from the system clock's reading if it was not
/// fixed).
pub fn advance(millis: u64) {
    let now = host::now_millis();
    set_now(now + millis)
}

/// The key-value state of this thread.
pub fn kv() -> BTreeMap<String, Vec<u8>> {
    host::with(|h| h.kv.clone())
}

/// Makes [`crate::kv::set`] fail, as the host does when the policy's quota is full, once
/// `keys` keys are stored.
pub fn set_kv_max_keys(keys: usize) {
    host::with(|h| h.kv_max_keys = Some(keys))
}

/// Forgets the logs, the fixed clock, the key-value state and its limit.
pub fn reset() {
    host::with(|h| *h = host::Host::default())
}

#[doc(hidden)]
pub mod host {
    use super::*;

    #[derive(Default)]
    pub struct Host {
        pub logs: Vec<(Level, String)>,
        pub now: Option<u64>,
        pub kv: BTreeMap<String, Vec<u8>>,
        pub kv_max_keys: Option<usize>,
        /// Expiry (ms) of the keys set with a time to live.
        pub expires: BTreeMap<String, u64>,
        pub timers: BTreeMap<String, u64>,
        pub timer_limits: Option<(usize, u64)>,
        /// name, kind, label names, series: values → (sum or value, count).
        #[allow(clippy::type_complexity)]
        pub metrics: Vec<(
            String,
            crate::metrics::Kind,
            Vec<String>,
            BTreeMap<Vec<String>, (f64, u64)>,
        )>,
    }

    thread_local! {
        static HOST: RefCell<Host> = RefCell::new(Host::default());
    }

    pub fn with<T>(f: impl FnOnce(&mut Host) -> T) -> T {
        HOST.with(|h| f(&mut h.borrow_mut()))
    }

    pub fn log(level: Level, message: &str) {
        // Shown by `cargo test` for a failing test (or with --nocapture).
        eprintln!("[plugin {level:?}] {message}");
        with(|h| h.logs.push((level, message.to_string())))
    }

    pub fn now_millis() -> u64 {
        with(|h| h.now).unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0)
        })
    }

    pub fn kv_get(key: &str) -> Option<Vec<u8>> {
        with(|h| h.kv.get(key).cloned())
    }

    pub fn kv_set(key: &str, value: &[u8]) -> Result<(), String> {
        with(|h| {
            if let Some(max) = h.kv_max_keys
                && !h.kv.contains_key(key)
                && h.kv.len() >= max
            {
                return Err(format!("kv quota: {max} keys are stored"));
            }
            h.kv.insert(key.to_string(), value.to_vec());
            Ok(())
        })
    }

    pub fn kv_delete(key: &str) {
        with(|h| {
            h.kv.remove(key);
            h.expires.remove(key);
        })
    }

    fn expire(h: &mut Host) {
        let now = h.now.unwrap_or(u64::MAX);
        let gone: Vec<String> = h
            .expires
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            h.kv.remove(&k);
            h.expires.remove(&k);
        }
    }

    pub fn state_get(key: &str) -> Option<Vec<u8>> {
        with(|h| {
            expire(h);
            h.kv.get(key).cloned()
        })
    }

    pub fn state_set(key: &str, value: &[u8], ttl: Option<u64>) -> Result<(), String> {
        kv_set(key, value)?;
        let now = now_millis();
        with(|h| match ttl {
            Some(t) => h.expires.insert(key.to_string(), now + t),
            None => h.expires.remove(key),
        });
        Ok(())
    }

    pub fn state_keys(prefix: &str, limit: u32) -> Vec<String> {
        with(|h| {
            expire(h);
            h.kv.keys()
                .filter(|k| k.starts_with(prefix))
                .take(limit as usize)
                .cloned()
                .collect()
        })
    }

    pub fn timer_set(name: &str, after: u64) -> Result<(), String> {
        let now = now_millis();
        with(|h| {
            if let Some((max, min)) = h.timer_limits {
                if after < min {
                    return Err(format!(
                        "{after} ms is shorter than timers.minPeriod {min} ms"
                    ));
                }
                if !h.timers.contains_key(name) && h.timers.len() >= max {
                    return Err(format!("{max} timers are set, the policy's timers.max"));
                }
            }
            h.timers.insert(name.to_string(), now + after);
            Ok(())
        })
    }

    pub fn timer_cancel(name: &str) {
        with(|h| {
            h.timers.remove(name);
        })
    }

    pub fn metric_declare(
        name: &str,
        kind: crate::metrics::Kind,
        labels: Vec<String>,
        _buckets: &[f64],
    ) -> Result<u32, String> {
        with(|h| {
            if let Some(i) = h.metrics.iter().position(|m| m.0 == name) {
                return if h.metrics[i].1 == kind && h.metrics[i].2 == labels {
                    Ok(i as u32)
                } else {
                    Err(format!("metric {name:?} is already declared otherwise"))
                };
            }
            h.metrics
                .push((name.to_string(), kind, labels, BTreeMap::new()));
            Ok((h.metrics.len() - 1) as u32)
        })
    }

    pub fn metric_update(
        metric: u32,
        labels: Vec<String>,
        value: f64,
        op: u8,
    ) -> Result<(), String> {
        use crate::metrics::Kind;
        with(|h| {
            let m = h
                .metrics
                .get_mut(metric as usize)
                .ok_or_else(|| format!("no metric with handle {metric}"))?;
            if labels.len() != m.2.len() {
                return Err(format!("{} takes {} label values", m.0, m.2.len()));
            }
            let v = m.3.entry(labels).or_insert((0.0, 0));
            match (m.1, op) {
                (Kind::Counter, 0) if value >= 0.0 => v.0 += value,
                (Kind::Gauge, 0) => v.0 += value,
                (Kind::Gauge, 1) => v.0 = value,
                (Kind::Histogram, 2) => {
                    v.0 += value;
                    v.1 += 1;
                }
                _ => {
                    return Err(format!(
                        "{}: that update does not apply to a {:?}",
                        m.0, m.1
                    ));
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    struct Config {
        suffix: String,
        #[serde(default)]
        remember: bool,
    }

    struct Suffix {
        config: Config,
        calls: u32,
    }

    impl Mapper for Suffix {
        type Config = Config;
        fn new(config: Config) -> Result<Self, InitError> {
            if config.suffix.contains('#') {
                return Err(InitError::invalid("`suffix` must not contain #"));
            }
            Ok(Suffix { config, calls: 0 })
        }
        fn map_message(&mut self, ctx: Context, msg: Message) -> Result<Decision, String> {
            self.calls += 1;
            log::info(&format!("call {}", self.calls));
            if self.config.remember {
                kv::set("last", &msg.payload)?;
            }
            Ok(Decision::Emit(vec![
                Emitted::to(format!("{}/{}", ctx.target, self.config.suffix))
                    .payload(clock::now_millis().to_string()),
            ]))
        }
    }

    struct Short;
    impl Filter for Short {
        type Config = NoConfig;
        fn new(_: NoConfig) -> Result<Self, InitError> {
            Ok(Short)
        }
        fn keep(&mut self, _ctx: Context, msg: Message) -> Result<bool, String> {
            Ok(msg.payload.len() < 4)
        }
    }

    #[test]
    fn a_mapper_runs_natively_with_state_logs_clock_and_kv() {
        let mut p = mapper::<Suffix>(r#"{"suffix": "s", "remember": true}"#).unwrap();
        set_now(42);
        let d = p
            .map_message(Context::new("r", "a/b"), Message::new("a/b", "hi"))
            .unwrap();
        assert_eq!(d, Decision::Emit(vec![Emitted::to("a/b/s").payload("42")]));
        p.map_message(Context::default().target("t"), Message::new("t", "again"))
            .unwrap();
        assert_eq!(
            take_logs(),
            vec![
                (Level::Info, "call 1".to_string()),
                (Level::Info, "call 2".to_string())
            ]
        );
        assert!(logs().is_empty());
        assert_eq!(kv().get("last").map(Vec::as_slice), Some(&b"again"[..]));
        advance(8);
        assert_eq!(clock::now_millis(), 50);
    }

    #[test]
    fn configuration_errors_name_the_field() {
        let e = mapper::<Suffix>(r#"{"sufix": "s"}"#).err().unwrap();
        assert!(e.to_string().contains("unknown field `sufix`"), "{e}");
        let e = mapper::<Suffix>(r#"{"suffix": 3}"#).err().unwrap();
        assert!(e.to_string().contains("invalid type"), "{e}");
        let e = mapper::<Suffix>(r##"{"suffix": "#"}"##).err().unwrap();
        assert!(e.to_string().contains("must not contain #"), "{e}");
        assert!(filter::<Short>("{}").is_ok());
        assert!(filter::<Short>(r#"{"x": 1}"#).is_err());
    }

    #[test]
    fn the_kv_quota_can_be_reached() {
        set_kv_max_keys(1);
        assert!(kv::set("a", b"1").is_ok());
        assert!(kv::set("a", b"2").is_ok());
        assert!(kv::set("b", b"1").is_err());
        kv::delete("a");
        assert!(kv::set("b", b"1").is_ok());
        reset();
        assert!(kv().is_empty());
    }

    #[test]
    fn builders_fill_defaults() {
        let m = Message::new("t", "x")
            .qos(Qos::AtMostOnce)
            .retain(true)
            .user_property("k", "v")
            .user_property("k", "w")
            .content_type("text/plain");
        assert_eq!(m.properties.user("k").collect::<Vec<_>>(), ["v", "w"]);
        assert_eq!(m.text(), Some("x"));
        assert!(m.retain);
        let mut f = Short;
        assert!(f.keep(Context::default(), m).unwrap());
        assert!(
            !f.keep(Context::default(), Message::new("t", "long"))
                .unwrap()
        );
    }
}
