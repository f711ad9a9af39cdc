//! Domain types shared by every module: QoS, messages and their MQTT 5 properties.

use bytes::Bytes;

/// MQTT quality of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    /// At most once.
    AtMostOnce = 0,
    /// At least once.
    AtLeastOnce = 1,
    /// Exactly once.
    ExactlyOnce = 2,
}

impl QoS {
    /// From the wire value.
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }

    /// The wire value.
    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

/// MQTT 5 publish properties that the bridge carries across (topic alias and subscription
/// identifiers are per-connection and never forwarded).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    /// Payload format indicator (0 bytes, 1 UTF-8).
    pub payload_format: Option<u8>,
    /// Message expiry interval in seconds, as received.
    pub message_expiry: Option<u32>,
    /// Content type.
    pub content_type: Option<String>,
    /// Response topic.
    pub response_topic: Option<String>,
    /// Correlation data.
    pub correlation_data: Option<Bytes>,
    /// User properties, in order (keys may repeat).
    pub user_properties: Vec<(String, String)>,
}

impl Properties {
    /// True when no property is set.
    pub fn is_empty(&self) -> bool {
        self.payload_format.is_none()
            && self.message_expiry.is_none()
            && self.content_type.is_none()
            && self.response_topic.is_none()
            && self.correlation_data.is_none()
            && self.user_properties.is_empty()
    }
}

/// An application message as the bridge sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Topic name.
    pub topic: String,
    /// Payload; cloning is cheap (shared buffer).
    pub payload: Bytes,
    /// QoS.
    pub qos: QoS,
    /// Retain flag.
    pub retain: bool,
    /// MQTT 5 properties (empty on 3.1.1).
    pub properties: Properties,
}
