//! Guest SDK for edgebridge WebAssembly plugins.
//!
//! A plugin is a `cdylib` crate built for `wasm32-wasip2` that implements one of two traits and
//! exports it with the matching macro:
//!
//! - [`Mapper`] (world `route-mapper`, [`export_mapper!`]): sees a message and decides to pass
//!   it, drop it, or emit other messages in its place;
//! - [`Filter`] (world `message-filter`, [`export_filter!`]): only keeps or drops.
//!
//! ```ignore
//! use edgebridge_plugin_sdk::*;
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Config { suffix: String }
//!
//! struct Suffix { suffix: String, seen: u64 }
//!
//! impl Mapper for Suffix {
//!     type Config = Config;
//!     fn new(config: Config) -> Result<Self, InitError> {
//!         Ok(Suffix { suffix: config.suffix, seen: 0 })
//!     }
//!     fn map_message(&mut self, ctx: Context, _msg: Message) -> Result<Decision, String> {
//!         self.seen += 1;
//!         Ok(Decision::Emit(vec![Emitted::to(format!("{}/{}", ctx.target, self.suffix))]))
//!     }
//! }
//!
//! export_mapper!(Suffix);
//! ```
//!
//! The route's `config:` arrives as [`Mapper::Config`] (any `serde::Deserialize` type; a
//! configuration that does not deserialize is refused with serde's message, naming the
//! field). One value of the plugin type lives per route (per instance): `&mut self` is
//! its state between calls. It is lost when the host rebuilds the instance (after a trap or a
//! reload); keep what must survive in [`kv`].
//!
//! The host functions are [`log`], [`clock::now_millis`] and [`kv`]. In a native build
//! (`cargo test`) they are served by [`testing`], so a plugin's unit tests run with plain
//! `cargo test` and can read what it logged, set the clock and inspect its key-value state.
//!
//! The WIT (`wit/plugin.wit`, package `edgebridge:plugin@0.1.0`) is part of this package.

// The `with` paths of the generated bindings name this crate absolutely, which also works
// inside it.
extern crate self as edgebridge_plugin_sdk;

#[doc(hidden)]
pub mod bindings {
    /// The `route-mapper` world: the shared types and imports, and the mapper export.
    pub mod mapper {
        wit_bindgen::generate!({
            world: "route-mapper",
            path: "wit",
            pub_export_macro: true,
            export_macro_name: "export",
            default_bindings_module: "edgebridge_plugin_sdk::bindings::mapper",
            additional_derives: [PartialEq],
        });
    }
    /// The `message-filter` world: the same types and imports (reused, not generated twice),
    /// and the filter export.
    pub mod filter {
        wit_bindgen::generate!({
            world: "message-filter",
            path: "wit",
            pub_export_macro: true,
            export_macro_name: "export",
            default_bindings_module: "edgebridge_plugin_sdk::bindings::filter",
            with: {
                "edgebridge:plugin/types@0.1.0": edgebridge_plugin_sdk::bindings::mapper::edgebridge::plugin::types,
                "edgebridge:plugin/log@0.1.0": edgebridge_plugin_sdk::bindings::mapper::edgebridge::plugin::log,
                "edgebridge:plugin/clock@0.1.0": edgebridge_plugin_sdk::bindings::mapper::edgebridge::plugin::clock,
                "edgebridge:plugin/kv@0.1.0": edgebridge_plugin_sdk::bindings::mapper::edgebridge::plugin::kv,
            },
        });
    }
    /// The `route-aggregator` world of `edgebridge:plugin@0.2.0`: the 0.1.0 types, `log` and
    /// `clock` reused, and `timers`, `metrics`, `state` and the aggregator export.
    pub mod aggregator {
        wit_bindgen::generate!({
            world: "route-aggregator",
            path: "wit/v0.2",
            pub_export_macro: true,
            export_macro_name: "export",
            default_bindings_module: "edgebridge_plugin_sdk::bindings::aggregator",
            additional_derives: [PartialEq],
            with: {
                "edgebridge:plugin/types@0.1.0": edgebridge_plugin_sdk::bindings::mapper::edgebridge::plugin::types,
                "edgebridge:plugin/log@0.1.0": edgebridge_plugin_sdk::bindings::mapper::edgebridge::plugin::log,
                "edgebridge:plugin/clock@0.1.0": edgebridge_plugin_sdk::bindings::mapper::edgebridge::plugin::clock,
            },
        });
    }
}

mod builders;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

pub use bindings::aggregator::exports::edgebridge::plugin0_2_0::aggregator::{
    Action, FlushReason, Release, Reply,
};
pub use bindings::mapper::edgebridge::plugin::types::{
    Context, Decision, Direction, Emitted, InitError, Message, Payload, Properties, Qos,
};
pub use serde;
pub use serde_json;

/// A plugin of the `route-aggregator` world (WIT 0.2.0). Export it with
/// [`export_aggregator!`]. It is called per message and on the timers it sets with
/// [`timers::set`]; it holds messages in windows ([`Action::Hold`]) and emits a window's
/// result as a [`Release`], which also acknowledges what the window held.
pub trait Aggregator: Sized + 'static {
    /// The route's `config:`; `serde_json::Value` takes anything, [`NoConfig`] nothing.
    type Config: serde::de::DeserializeOwned;

    /// The format of what this version keeps in [`state`]: a new version keeps the previous
    /// one's state only when both say the same number.
    const STATE_FORMAT: u32 = 1;

    /// As [`Mapper::new`].
    fn new(config: Self::Config) -> Result<Self, InitError>;

    /// Decides about one message: pass, drop, emit, or hold it in a window; and which
    /// windows close now.
    fn on_message(&mut self, ctx: Context, msg: Message) -> Result<Reply, String>;

    /// The timer `name` is due. `ctx.target` is the route's static target, or its source
    /// filter when it keeps source topics.
    fn on_timer(&mut self, ctx: Context, name: String) -> Result<Vec<Release>, String>;

    /// Emit what the windows hold, for `reason` (the route stops, a new version replaces
    /// this one, or the route holds its policy's `maxHeld` messages). A window not released
    /// here stays held: at a stop its messages go unacknowledged and come again.
    fn flush(&mut self, ctx: Context, reason: FlushReason) -> Result<Vec<Release>, String>;
}

impl Reply {
    /// Forward the message unchanged.
    pub fn pass() -> Reply {
        Reply {
            action: Action::Pass,
            releases: Vec::new(),
        }
    }
    /// Drop the message (handled), with the reason.
    pub fn drop(reason: impl Into<String>) -> Reply {
        Reply {
            action: Action::Drop(reason.into()),
            releases: Vec::new(),
        }
    }
    /// Keep the message in `window`.
    pub fn hold(window: impl Into<String>) -> Reply {
        Reply {
            action: Action::Hold(window.into()),
            releases: Vec::new(),
        }
    }
    /// Forward these messages instead.
    pub fn emit(messages: Vec<Emitted>) -> Reply {
        Reply {
            action: Action::Emit(messages),
            releases: Vec::new(),
        }
    }
    /// Also close these windows now (published before the action's messages).
    pub fn releasing(mut self, releases: Vec<Release>) -> Reply {
        self.releases.extend(releases);
        self
    }
}

impl Release {
    /// The result of `window`: these messages.
    pub fn new(window: impl Into<String>, messages: Vec<Emitted>) -> Release {
        Release {
            window: window.into(),
            messages,
        }
    }
    /// `window` closes with nothing to publish: what it held is acknowledged at once.
    pub fn empty(window: impl Into<String>) -> Release {
        Release::new(window, Vec::new())
    }
}

/// A plugin of the `route-mapper` world. Export it with [`export_mapper!`].
pub trait Mapper: Sized + 'static {
    /// The route's `config:`; `serde_json::Value` takes anything, [`NoConfig`] nothing.
    type Config: serde::de::DeserializeOwned;

    /// Called once per route before any message; an error refuses the route's configuration
    /// (the bridge keeps the previous plugin version, or does not start the route).
    fn new(config: Self::Config) -> Result<Self, InitError>;

    /// Decides about one message. An `Err` is handled like a trap: the route's
    /// `onPluginError` applies to the message.
    fn map_message(&mut self, ctx: Context, msg: Message) -> Result<Decision, String>;
}

/// A plugin of the `message-filter` world. Export it with [`export_filter!`].
pub trait Filter: Sized + 'static {
    /// The route's `config:`; `serde_json::Value` takes anything, [`NoConfig`] nothing.
    type Config: serde::de::DeserializeOwned;

    /// As [`Mapper::new`].
    fn new(config: Self::Config) -> Result<Self, InitError>;

    /// `true` forwards the message unchanged, `false` drops it (acknowledged and counted).
    fn keep(&mut self, ctx: Context, msg: Message) -> Result<bool, String>;
}

/// The configuration of a plugin that takes none: an empty mapping (what the host gives when
/// the route has no `config:`); any field is refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoConfig {}

/// Parses the JSON configuration text the host gives `init` into `C`.
pub fn parse_config<C: serde::de::DeserializeOwned>(json: &str) -> Result<C, InitError> {
    serde_json::from_str(json).map_err(|e| InitError::InvalidConfig(e.to_string()))
}

/// Writes to the bridge's log, tagged with the plugin and the route (granted by default).
/// Lines longer than 4 KiB are cut by the host.
pub mod log {
    pub use crate::bindings::mapper::edgebridge::plugin::log::Level;

    /// Writes one line at `level`.
    pub fn write(level: Level, message: &str) {
        #[cfg(target_arch = "wasm32")]
        crate::bindings::mapper::edgebridge::plugin::log::write(level, message);
        #[cfg(not(target_arch = "wasm32"))]
        crate::testing::host::log(level, message);
    }
    /// A trace line.
    pub fn trace(message: &str) {
        write(Level::Trace, message)
    }
    /// A debug line.
    pub fn debug(message: &str) {
        write(Level::Debug, message)
    }
    /// An info line.
    pub fn info(message: &str) {
        write(Level::Info, message)
    }
    /// A warning.
    pub fn warn(message: &str) {
        write(Level::Warn, message)
    }
    /// An error line.
    pub fn error(message: &str) {
        write(Level::Error, message)
    }
}

/// Wall-clock time (granted by default).
pub mod clock {
    /// Milliseconds since the Unix epoch. In a native test: [`crate::testing::set_now`]'s
    /// value, or the system clock until it is called.
    pub fn now_millis() -> u64 {
        #[cfg(target_arch = "wasm32")]
        return crate::bindings::mapper::edgebridge::plugin::clock::now_millis();
        #[cfg(not(target_arch = "wasm32"))]
        return crate::testing::host::now_millis();
    }
}

/// Key-value state private to this plugin on this route, kept across messages, instance
/// rebuilds and plugin reloads for the life of the bridge process. Only granted when the
/// plugin's policy lists `kv` (a plugin that uses it without the grant is refused at load);
/// limited in keys and bytes by the policy.
pub mod kv {
    /// The value stored under `key`, if any.
    pub fn get(key: &str) -> Option<Vec<u8>> {
        #[cfg(target_arch = "wasm32")]
        return crate::bindings::mapper::edgebridge::plugin::kv::get(key);
        #[cfg(not(target_arch = "wasm32"))]
        return crate::testing::host::kv_get(key);
    }
    /// Stores `value` under `key`; fails with the reason when the policy's quota would be
    /// exceeded (the previous value is kept then).
    pub fn set(key: &str, value: &[u8]) -> Result<(), String> {
        #[cfg(target_arch = "wasm32")]
        return crate::bindings::mapper::edgebridge::plugin::kv::set(key, value);
        #[cfg(not(target_arch = "wasm32"))]
        return crate::testing::host::kv_set(key, value);
    }
    /// Removes `key` (no error when absent).
    pub fn delete(key: &str) {
        #[cfg(target_arch = "wasm32")]
        crate::bindings::mapper::edgebridge::plugin::kv::delete(key);
        #[cfg(not(target_arch = "wasm32"))]
        crate::testing::host::kv_delete(key);
    }
}

/// Reading JSON payloads.
pub mod json {
    /// The number at `path` in a JSON payload: a top-level field (`temperature`), or a
    /// dotted path into objects (`reading.value`); `None` when the payload is not JSON or
    /// the value is not a number.
    pub fn number(payload: &[u8], path: &str) -> Option<f64> {
        let doc: serde_json::Value = serde_json::from_slice(payload).ok()?;
        path.split('.')
            .try_fold(&doc, |v, key| v.get(key))?
            .as_f64()
    }
}

/// Timers kept by the bridge (WIT 0.2.0; an [`Aggregator`] only): it calls
/// [`Aggregator::on_timer`] when one is due. Granted when the policy lists `timers`, within
/// its `timers.max` and `timers.minPeriod`.
pub mod timers {
    /// Calls `on_timer(name)` once, `after_millis` from now; setting a set name moves it.
    pub fn set(name: &str, after_millis: u64) -> Result<(), String> {
        #[cfg(target_arch = "wasm32")]
        return crate::bindings::aggregator::edgebridge::plugin0_2_0::timers::set(
            name,
            after_millis,
        );
        #[cfg(not(target_arch = "wasm32"))]
        return crate::testing::host::timer_set(name, after_millis);
    }
    /// Cancels `name` (no error when it is not set).
    pub fn cancel(name: &str) {
        #[cfg(target_arch = "wasm32")]
        crate::bindings::aggregator::edgebridge::plugin0_2_0::timers::cancel(name);
        #[cfg(not(target_arch = "wasm32"))]
        crate::testing::host::timer_cancel(name);
    }
    /// How many timers are set.
    pub fn count() -> u32 {
        #[cfg(target_arch = "wasm32")]
        return crate::bindings::aggregator::edgebridge::plugin0_2_0::timers::count();
        #[cfg(not(target_arch = "wasm32"))]
        return crate::testing::host::with(|h| h.timers.len() as u32);
    }
}

/// The plugin's own metrics on the bridge's `/metrics` (WIT 0.2.0; an [`Aggregator`] only),
/// as `edgebridge_plugin_<plugin>_<name>` with the labels `plugin`, `route` and its own.
/// Granted when the policy lists `metrics`, within its `metrics.maxSeries`.
pub mod metrics {
    #[cfg(target_arch = "wasm32")]
    use crate::bindings::aggregator::edgebridge::plugin0_2_0::metrics as host;
    pub use crate::bindings::aggregator::edgebridge::plugin0_2_0::metrics::Kind;

    /// Declares a metric (see the WIT for the rules on names); its handle.
    pub fn declare(
        name: &str,
        help: &str,
        kind: Kind,
        labels: &[&str],
        buckets: &[f64],
    ) -> Result<u32, String> {
        let labels: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
        #[cfg(target_arch = "wasm32")]
        return host::declare(name, help, kind, &labels, buckets);
        #[cfg(not(target_arch = "wasm32"))]
        {
            let _ = help;
            crate::testing::host::metric_declare(name, kind, labels, buckets)
        }
    }
    /// Adds `value` to a counter or gauge.
    pub fn add(metric: u32, labels: &[&str], value: f64) -> Result<(), String> {
        update(metric, labels, value, 0)
    }
    /// Sets a gauge.
    pub fn set(metric: u32, labels: &[&str], value: f64) -> Result<(), String> {
        update(metric, labels, value, 1)
    }
    /// Records an observation in a histogram.
    pub fn observe(metric: u32, labels: &[&str], value: f64) -> Result<(), String> {
        update(metric, labels, value, 2)
    }
    fn update(metric: u32, labels: &[&str], value: f64, op: u8) -> Result<(), String> {
        let labels: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
        #[cfg(target_arch = "wasm32")]
        return match op {
            0 => host::add(metric, &labels, value),
            1 => host::set(metric, &labels, value),
            _ => host::observe(metric, &labels, value),
        };
        #[cfg(not(target_arch = "wasm32"))]
        return crate::testing::host::metric_update(metric, labels, value, op);
    }
}

/// Key-value state with a time to live (WIT 0.2.0; an [`Aggregator`] only): the same store
/// as [`kv`], kept across instance rebuilds and across versions with the same
/// [`Aggregator::STATE_FORMAT`], for the life of the bridge process. Granted when the policy
/// lists `kv`.
pub mod state {
    #[cfg(target_arch = "wasm32")]
    use crate::bindings::aggregator::edgebridge::plugin0_2_0::state as host;

    /// The value under `key`, unless absent or expired.
    pub fn get(key: &str) -> Option<Vec<u8>> {
        #[cfg(target_arch = "wasm32")]
        return host::get(key);
        #[cfg(not(target_arch = "wasm32"))]
        return crate::testing::host::state_get(key);
    }
    /// Stores `value` under `key` for `ttl_millis` (`None`: until deleted).
    pub fn set(key: &str, value: &[u8], ttl_millis: Option<u64>) -> Result<(), String> {
        #[cfg(target_arch = "wasm32")]
        return host::set(key, value, ttl_millis);
        #[cfg(not(target_arch = "wasm32"))]
        return crate::testing::host::state_set(key, value, ttl_millis);
    }
    /// Removes `key`.
    pub fn delete(key: &str) {
        #[cfg(target_arch = "wasm32")]
        host::delete(key);
        #[cfg(not(target_arch = "wasm32"))]
        crate::testing::host::kv_delete(key);
    }
    /// Up to `limit` live keys starting with `prefix`, in byte order.
    pub fn keys(prefix: &str, limit: u32) -> Vec<String> {
        #[cfg(target_arch = "wasm32")]
        return host::keys(prefix, limit);
        #[cfg(not(target_arch = "wasm32"))]
        return crate::testing::host::state_keys(prefix, limit);
    }
}

/// What the export macros expand to; not part of the API.
#[doc(hidden)]
pub mod __rt {
    pub use crate::bindings::aggregator::exports::edgebridge::plugin0_2_0::aggregator::Guest as AggregatorGuest;
    pub use crate::bindings::filter::exports::edgebridge::plugin::filter::Guest as FilterGuest;
    pub use crate::bindings::mapper::exports::edgebridge::plugin::mapper::Guest as MapperGuest;

    /// The error of a call before a successful `init`.
    pub fn not_initialised() -> String {
        "the plugin has no configuration: init failed or was not called".to_string()
    }
}

/// Exports a [`Mapper`] as the component's `edgebridge:plugin/mapper` (world `route-mapper`).
/// The macro keeps the instance's value of the type between `init` and the calls.
#[macro_export]
macro_rules! export_mapper {
    ($plugin:ty) => {
        const _: () = {
            ::std::thread_local! {
                static INSTANCE: ::core::cell::RefCell<::core::option::Option<$plugin>> =
                    const { ::core::cell::RefCell::new(::core::option::Option::None) };
            }
            struct EdgebridgeMapperExport;
            impl $crate::__rt::MapperGuest for EdgebridgeMapperExport {
                fn init(
                    config: ::std::string::String,
                ) -> ::core::result::Result<(), $crate::InitError> {
                    let config = $crate::parse_config(&config)?;
                    let plugin = <$plugin as $crate::Mapper>::new(config)?;
                    INSTANCE.with(|i| *i.borrow_mut() = ::core::option::Option::Some(plugin));
                    ::core::result::Result::Ok(())
                }
                fn map_message(
                    ctx: $crate::Context,
                    msg: $crate::Message,
                ) -> ::core::result::Result<$crate::Decision, ::std::string::String> {
                    INSTANCE.with(|i| match i.borrow_mut().as_mut() {
                        ::core::option::Option::Some(p) => {
                            <$plugin as $crate::Mapper>::map_message(p, ctx, msg)
                        }
                        ::core::option::Option::None => {
                            ::core::result::Result::Err($crate::__rt::not_initialised())
                        }
                    })
                }
            }
            $crate::__export_route_mapper_impl!(
                EdgebridgeMapperExport with_types_in $crate::bindings::mapper
            );
        };
    };
}

/// Exports a [`Filter`] as the component's `edgebridge:plugin/filter` (world
/// `message-filter`). The macro keeps the instance's value of the type between `init` and the
/// calls.
#[macro_export]
macro_rules! export_filter {
    ($plugin:ty) => {
        const _: () = {
            ::std::thread_local! {
                static INSTANCE: ::core::cell::RefCell<::core::option::Option<$plugin>> =
                    const { ::core::cell::RefCell::new(::core::option::Option::None) };
            }
            struct EdgebridgeFilterExport;
            impl $crate::__rt::FilterGuest for EdgebridgeFilterExport {
                fn init(
                    config: ::std::string::String,
                ) -> ::core::result::Result<(), $crate::InitError> {
                    let config = $crate::parse_config(&config)?;
                    let plugin = <$plugin as $crate::Filter>::new(config)?;
                    INSTANCE.with(|i| *i.borrow_mut() = ::core::option::Option::Some(plugin));
                    ::core::result::Result::Ok(())
                }
                fn keep(
                    ctx: $crate::Context,
                    msg: $crate::Message,
                ) -> ::core::result::Result<bool, ::std::string::String> {
                    INSTANCE.with(|i| match i.borrow_mut().as_mut() {
                        ::core::option::Option::Some(p) => {
                            <$plugin as $crate::Filter>::keep(p, ctx, msg)
                        }
                        ::core::option::Option::None => {
                            ::core::result::Result::Err($crate::__rt::not_initialised())
                        }
                    })
                }
            }
            $crate::__export_message_filter_impl!(
                EdgebridgeFilterExport with_types_in $crate::bindings::filter
            );
        };
    };
}

/// Exports an [`Aggregator`] as the component's `edgebridge:plugin/aggregator@0.2.0` (world
/// `route-aggregator`). The macro keeps the instance's value of the type between calls.
#[macro_export]
macro_rules! export_aggregator {
    ($plugin:ty) => {
        const _: () = {
            ::std::thread_local! {
                static INSTANCE: ::core::cell::RefCell<::core::option::Option<$plugin>> =
                    const { ::core::cell::RefCell::new(::core::option::Option::None) };
            }
            fn with<T>(
                f: impl ::core::ops::FnOnce(
                    &mut $plugin,
                ) -> ::core::result::Result<T, ::std::string::String>,
            ) -> ::core::result::Result<T, ::std::string::String> {
                INSTANCE.with(|i| match i.borrow_mut().as_mut() {
                    ::core::option::Option::Some(p) => f(p),
                    ::core::option::Option::None => {
                        ::core::result::Result::Err($crate::__rt::not_initialised())
                    }
                })
            }
            struct EdgebridgeAggregatorExport;
            impl $crate::__rt::AggregatorGuest for EdgebridgeAggregatorExport {
                fn init(
                    config: ::std::string::String,
                ) -> ::core::result::Result<(), $crate::InitError> {
                    let config = $crate::parse_config(&config)?;
                    let plugin = <$plugin as $crate::Aggregator>::new(config)?;
                    INSTANCE.with(|i| *i.borrow_mut() = ::core::option::Option::Some(plugin));
                    ::core::result::Result::Ok(())
                }
                fn state_format() -> u32 {
                    <$plugin as $crate::Aggregator>::STATE_FORMAT
                }
                fn on_message(
                    ctx: $crate::Context,
                    msg: $crate::Message,
                ) -> ::core::result::Result<$crate::Reply, ::std::string::String> {
                    with(|p| <$plugin as $crate::Aggregator>::on_message(p, ctx, msg))
                }
                fn on_timer(
                    ctx: $crate::Context,
                    name: ::std::string::String,
                ) -> ::core::result::Result<::std::vec::Vec<$crate::Release>, ::std::string::String>
                {
                    with(|p| <$plugin as $crate::Aggregator>::on_timer(p, ctx, name))
                }
                fn flush(
                    ctx: $crate::Context,
                    reason: $crate::FlushReason,
                ) -> ::core::result::Result<::std::vec::Vec<$crate::Release>, ::std::string::String>
                {
                    with(|p| <$plugin as $crate::Aggregator>::flush(p, ctx, reason))
                }
            }
            $crate::__export_route_aggregator_impl!(
                EdgebridgeAggregatorExport with_types_in $crate::bindings::aggregator
            );
        };
    };
}
