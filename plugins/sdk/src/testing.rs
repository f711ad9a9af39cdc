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
use crate::{Filter, InitError, Mapper};

/// Creates a mapper from `config` JSON the way the host's `init` does (the text the host
/// passes is the route's `config:` as JSON; `{}` when the route has none).
pub fn mapper<M: Mapper>(config: &str) -> Result<M, InitError> {
    M::new(crate::parse_config(config)?)
}

/// Creates a filter from `config` JSON the way the host's `init` does.
pub fn filter<F: Filter>(config: &str) -> Result<F, InitError> {
    F::new(crate::parse_config(config)?)
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
