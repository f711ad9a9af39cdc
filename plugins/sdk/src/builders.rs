//! Constructors with defaults and builder methods for the WIT records, so that a plugin (and
//! its tests) name only the fields that matter.

use crate::{Context, Direction, Emitted, InitError, Message, Payload, Properties, Qos};

impl Default for Properties {
    /// No properties (what an MQTT 3.1.1 message has).
    fn default() -> Self {
        Properties {
            payload_format: None,
            message_expiry: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        }
    }
}

impl Properties {
    /// The values of the user property `key`, in order.
    pub fn user(&self, key: &str) -> impl Iterator<Item = &str> {
        self.user_properties
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

impl Message {
    /// A message on `topic` with `payload`, QoS 1, not retained, no properties.
    pub fn new(topic: impl Into<String>, payload: impl Into<Vec<u8>>) -> Message {
        Message {
            topic: topic.into(),
            payload: payload.into(),
            qos: Qos::AtLeastOnce,
            retain: false,
            properties: Properties::default(),
        }
    }

    /// With QoS `qos`.
    pub fn qos(mut self, qos: Qos) -> Message {
        self.qos = qos;
        self
    }

    /// With the retain flag set to `retain`.
    pub fn retain(mut self, retain: bool) -> Message {
        self.retain = retain;
        self
    }

    /// With these properties.
    pub fn properties(mut self, properties: Properties) -> Message {
        self.properties = properties;
        self
    }

    /// With a user property added after the others.
    pub fn user_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Message {
        self.properties
            .user_properties
            .push((key.into(), value.into()));
        self
    }

    /// With content type `content_type`.
    pub fn content_type(mut self, content_type: impl Into<String>) -> Message {
        self.properties.content_type = Some(content_type.into());
        self
    }

    /// The payload as text, when it is UTF-8.
    pub fn text(&self) -> Option<&str> {
        std::str::from_utf8(&self.payload).ok()
    }
}

impl Default for Context {
    /// Route `test`, local to remote, source filter `#`, no target yet: set the target with
    /// [`Context::target`] (the host gives the route's static target, or the source topic).
    fn default() -> Self {
        Context {
            route: "test".into(),
            direction: Direction::LocalToRemote,
            source_filter: "#".into(),
            target: String::new(),
        }
    }
}

impl Context {
    /// The context of route `route` whose message goes to `target`.
    pub fn new(route: impl Into<String>, target: impl Into<String>) -> Context {
        Context {
            route: route.into(),
            target: target.into(),
            ..Context::default()
        }
    }

    /// With direction `direction`.
    pub fn direction(mut self, direction: Direction) -> Context {
        self.direction = direction;
        self
    }

    /// With the route's source filter `filter`.
    pub fn source_filter(mut self, filter: impl Into<String>) -> Context {
        self.source_filter = filter.into();
        self
    }

    /// With target topic `target`.
    pub fn target(mut self, target: impl Into<String>) -> Context {
        self.target = target.into();
        self
    }
}

impl Emitted {
    /// A message to `topic` keeping the incoming payload (not copied back from the plugin),
    /// QoS, retain flag and properties.
    pub fn to(topic: impl Into<String>) -> Emitted {
        Emitted {
            topic: topic.into(),
            payload: Payload::Unchanged,
            qos: None,
            retain: None,
            properties: None,
        }
    }

    /// With a new payload.
    pub fn payload(mut self, payload: impl Into<Vec<u8>>) -> Emitted {
        self.payload = Payload::Replace(payload.into());
        self
    }

    /// With QoS `qos` (needs the policy's `mayChangeQos`; never above the route's QoS).
    pub fn qos(mut self, qos: Qos) -> Emitted {
        self.qos = Some(qos);
        self
    }

    /// With the retain flag `retain` (needs the policy's `mayChangeRetain`).
    pub fn retain(mut self, retain: bool) -> Emitted {
        self.retain = Some(retain);
        self
    }

    /// With these properties instead of the incoming ones.
    pub fn properties(mut self, properties: Properties) -> Emitted {
        self.properties = Some(properties);
        self
    }
}

impl InitError {
    /// A configuration error: `message` says which field and why.
    pub fn invalid(message: impl Into<String>) -> InitError {
        InitError::InvalidConfig(message.into())
    }
}
