//! Domain types shared by every module: QoS, messages and their MQTT 5 properties.

use std::ops::{Deref, DerefMut};

use bytes::Bytes;
pub use bytestring::ByteString;

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

/// No properties: what [`Props`] reads as when it holds none.
static NO_PROPERTIES: Properties = Properties {
    payload_format: None,
    message_expiry: None,
    content_type: None,
    response_topic: None,
    correlation_data: None,
    user_properties: Vec::new(),
};

/// A message's properties behind one pointer: most messages carry none, and then a message
/// costs no allocation for them and moves as a few words instead of the ~120 bytes of
/// [`Properties`]. Reads see [`Properties`] (empty when none are held); a write allocates them.
#[derive(Clone, Default)]
pub struct Props(Option<Box<Properties>>);

impl Props {
    /// The properties, taken out (empty when none were held).
    pub fn into_inner(self) -> Properties {
        self.0.map(|b| *b).unwrap_or_default()
    }
}

impl From<Properties> for Props {
    fn from(p: Properties) -> Props {
        Props((!p.is_empty()).then(|| Box::new(p)))
    }
}

impl Deref for Props {
    type Target = Properties;
    fn deref(&self) -> &Properties {
        self.0.as_deref().unwrap_or(&NO_PROPERTIES)
    }
}

impl DerefMut for Props {
    fn deref_mut(&mut self) -> &mut Properties {
        self.0.get_or_insert_with(Box::default)
    }
}

impl PartialEq for Props {
    fn eq(&self, other: &Props) -> bool {
        **self == **other
    }
}

impl Eq for Props {}

impl std::fmt::Debug for Props {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

/// An application message as the bridge sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Topic name: shares the buffer it was read from (no allocation per message).
    pub topic: ByteString,
    /// Payload; cloning is cheap (shared buffer).
    pub payload: Bytes,
    /// QoS.
    pub qos: QoS,
    /// Retain flag.
    pub retain: bool,
    /// MQTT 5 properties (empty on 3.1.1).
    pub properties: Props,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn props_read_as_empty_until_written_and_hold_nothing_for_empty_properties() {
        let none = Props::default();
        assert!(none.is_empty());
        assert!(
            Props::from(Properties::default()).0.is_none(),
            "empty: no allocation"
        );
        let mut p = Props::default();
        p.user_properties.push(("k".into(), "v".into()));
        assert!(p.0.is_some());
        assert_eq!(p.user_properties, vec![("k".to_string(), "v".to_string())]);
        assert_ne!(p, none);
        // Equality is of the properties, however they are held.
        assert_eq!(Props(Some(Box::default())), none);
        assert_eq!(p.clone().into_inner().user_properties.len(), 1);
        assert_eq!(none.into_inner(), Properties::default());
    }

    #[test]
    fn a_message_moves_as_a_few_words() {
        // Moved several times per forwarded message; its properties sit behind a pointer.
        assert!(
            std::mem::size_of::<Message>() <= 80,
            "{}",
            std::mem::size_of::<Message>()
        );
    }
}
