//! MQTT client sessions: the codec, the sans-I/O session [`state`], transports, a connection's
//! write queue ([`outbuf`]), and the I/O of one connection ([`link`]), polled by its owner; [`session`] is a single-connection client
//! on its own task (the `pub` / `sub` tools). Knows nothing about routes or plugins.

pub mod backoff;
pub mod codec;
pub mod link;
pub mod outbuf;
pub mod session;
pub mod state;
pub mod transport;

pub use codec::{SubFilter, Version};
pub use link::LinkOptions;
pub use session::{SessionEvent, SessionHandle, SessionOptions};
pub use state::{AckToken, StateEvent, Token};
