//! MQTT client sessions: codec adapter, sans-I/O state, transports and the I/O driver.
//! Knows nothing about routes or plugins.

pub mod backoff;
pub mod codec;
pub mod session;
pub mod state;
pub mod transport;

pub use codec::{SubFilter, Version};
pub use session::{SessionEvent, SessionHandle, SessionOptions};
pub use state::{AckToken, StateEvent, Token};
