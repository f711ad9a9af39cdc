//! Guest SDK for edgebridge mapper plugins (world `route-mapper`).
//!
//! The bindings are generated here from the repository's `wit/` folder, the single source of
//! the contract; a plugin implements [`Mapper`] and exports it with [`export_mapper!`]:
//!
//! ```ignore
//! use edgebridge_mapper_sdk::*;
//! struct Upper;
//! impl Mapper for Upper {
//!     fn init(_config: String) -> Result<(), InitError> { Ok(()) }
//!     fn map_message(ctx: Context, _msg: Message) -> Result<Decision, String> {
//!         Ok(Decision::Emit(vec![Emitted::to(ctx.target.to_uppercase())]))
//!     }
//! }
//! export_mapper!(Upper);
//! ```
//!
//! Build: `cargo build --target wasm32-wasip2 --release`; the `.wasm` in
//! `target/wasm32-wasip2/release/` is the component to drop into the bridge's plugins folder.
//! (One SDK crate per world: two worlds' bindings in one crate would make every plugin claim
//! both worlds' exports.)

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "route-mapper",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "export_mapper",
        default_bindings_module: "edgebridge_mapper_sdk::bindings",
    });
}

pub use bindings::edgebridge::plugin::types::{
    Context, Decision, Direction, Emitted, InitError, Message, Payload, Properties, Qos,
};
pub use bindings::export_mapper;
pub use bindings::exports::edgebridge::plugin::mapper::Guest as Mapper;
pub use serde_json::{self, Value};

/// Writes to the bridge's log (granted by default).
pub mod log {
    use crate::bindings::edgebridge::plugin::log::{Level, write};
    /// Debug line.
    pub fn debug(msg: &str) {
        write(Level::Debug, msg)
    }
    /// Info line.
    pub fn info(msg: &str) {
        write(Level::Info, msg)
    }
    /// Warning line.
    pub fn warn(msg: &str) {
        write(Level::Warn, msg)
    }
}

/// Milliseconds since the Unix epoch (granted by default).
pub fn now_millis() -> u64 {
    bindings::edgebridge::plugin::clock::now_millis()
}

/// Key-value state private to this plugin on this route (the policy must grant `kv`).
pub mod kv {
    pub use crate::bindings::edgebridge::plugin::kv::{delete, get, set};
}

impl Emitted {
    /// A message to `topic` with the incoming payload, QoS, retain flag and properties.
    pub fn to(topic: impl Into<String>) -> Emitted {
        Emitted {
            topic: topic.into(),
            payload: Payload::Unchanged,
            qos: None,
            retain: None,
            properties: None,
        }
    }

    /// The same message with a new payload.
    pub fn with_payload(mut self, payload: Vec<u8>) -> Emitted {
        self.payload = Payload::Replace(payload);
        self
    }
}

/// Parses the JSON `config` given to `init`, turning errors into `InitError::InvalidConfig`.
pub fn parse_config(config: &str) -> Result<Value, InitError> {
    serde_json::from_str(config)
        .map_err(|e| InitError::InvalidConfig(format!("config is not JSON: {e}")))
}
