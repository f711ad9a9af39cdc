//! Guest SDK for edgebridge filter plugins (world `message-filter`).
//!
//! The bindings are generated here from the repository's `wit/` folder, the single source of
//! the contract; a plugin implements [`Filter`] and exports it with [`export_filter!`]:
//!
//! ```ignore
//! use edgebridge_filter_sdk::*;
//! struct NonEmpty;
//! impl Filter for NonEmpty {
//!     fn init(_config: String) -> Result<(), InitError> { Ok(()) }
//!     fn keep(_ctx: Context, msg: Message) -> Result<bool, String> { Ok(!msg.payload.is_empty()) }
//! }
//! export_filter!(NonEmpty);
//! ```
//!
//! Build: `cargo build --target wasm32-wasip2 --release`; the `.wasm` in
//! `target/wasm32-wasip2/release/` is the component to drop into the bridge's plugins folder.
//! (One SDK crate per world: two worlds' bindings in one crate would make every plugin claim
//! both worlds' exports.)

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "message-filter",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "export_filter",
        default_bindings_module: "edgebridge_filter_sdk::bindings",
    });
}

pub use bindings::edgebridge::plugin::types::{
    Context, Direction, InitError, Message, Properties, Qos,
};
pub use bindings::export_filter;
pub use bindings::exports::edgebridge::plugin::filter::Guest as Filter;
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

/// Parses the JSON `config` given to `init`, turning errors into `InitError::InvalidConfig`.
pub fn parse_config(config: &str) -> Result<Value, InitError> {
    serde_json::from_str(config)
        .map_err(|e| InitError::InvalidConfig(format!("config is not JSON: {e}")))
}
