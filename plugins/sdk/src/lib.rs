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
}

mod builders;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

pub use bindings::mapper::edgebridge::plugin::types::{
    Context, Decision, Direction, Emitted, InitError, Message, Payload, Properties, Qos,
};
pub use serde;
pub use serde_json;

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

/// What the export macros expand to; not part of the API.
#[doc(hidden)]
pub mod __rt {
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
