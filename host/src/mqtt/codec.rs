//! The packets of the client session, as MQTT 3.1.1 or 5 bytes.
//!
//! PUBLISH, the hot path, is written by our own encoder ([`encode_publish_head`]: straight from
//! the message into the socket buffer, the payload then copied behind it or queued where it is;
//! [`encode_publish`] does both in one call; round-trip tested against rumqttc's decoder). Every other
//! packet is encoded, and everything is decoded, with rumqttc's `mqttbytes` codecs (well
//! tested, public). Everything above the bytes (acks, inflight, reconnect) is in
//! [`super::state`].

use bytes::{BufMut, Bytes, BytesMut};
use rumqttc::mqttbytes::{self as b4, v4};
use rumqttc::v5::mqttbytes::{self as b5, v5};

use crate::model::{ByteString, Message, Properties, Props, QoS};
use crate::secret::Secret;

/// Wire protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V4,
    /// MQTT 5.
    V5,
}

/// Everything a CONNECT needs.
#[derive(Debug, Clone)]
pub struct ConnectSpec {
    /// Client identifier.
    pub client_id: String,
    /// Keep alive in seconds.
    pub keep_alive: u16,
    /// Clean session (3.1.1) / clean start (5).
    pub clean_start: bool,
    /// Session expiry interval in seconds (5 only).
    pub session_expiry: Option<u32>,
    /// Receive maximum announced to the server (5 only).
    pub receive_maximum: Option<u16>,
    /// Largest packet the client accepts (5 only; 3.1.1 has no way to say it, the limit is
    /// still enforced when decoding).
    pub max_packet_size: Option<u32>,
    /// User name.
    pub username: Option<String>,
    /// Password.
    pub password: Option<Secret>,
    /// Enhanced authentication method (5 only), e.g. `K8S-SAT`.
    pub auth_method: Option<String>,
    /// Enhanced authentication data (5 only).
    pub auth_data: Option<Secret>,
}

/// One subscription of a SUBSCRIBE packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubFilter {
    /// Filter, possibly `$share/...`.
    pub filter: String,
    /// Maximum QoS.
    pub qos: QoS,
}

/// Packets the client sends, other than PUBLISH (written by [`encode_publish_head`] straight
/// from the message, without an intermediate packet).
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// CONNECT.
    Connect(Box<ConnectSpec>),
    /// PUBACK.
    PubAck(u16),
    /// PUBREC.
    PubRec(u16),
    /// PUBREL.
    PubRel(u16),
    /// PUBCOMP.
    PubComp(u16),
    /// SUBSCRIBE.
    Subscribe {
        /// Packet id.
        pkid: u16,
        /// Filters.
        filters: Vec<SubFilter>,
    },
    /// UNSUBSCRIBE.
    Unsubscribe {
        /// Packet id.
        pkid: u16,
        /// Filters.
        filters: Vec<String>,
    },
    /// PINGREQ.
    PingReq,
    /// DISCONNECT (normal).
    Disconnect,
    /// AUTH (MQTT 5 only): re-authentication on an open connection (§4.12.1).
    Auth {
        /// Reason code: 0x19 re-authenticate, 0x18 continue authentication.
        reason: u8,
        /// Authentication method (the one the CONNECT used).
        method: String,
        /// Authentication data (e.g. the fresh token).
        data: Secret,
    },
}

/// What the server said in CONNACK.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnAckInfo {
    /// Session present flag.
    pub session_present: bool,
    /// Return / reason code (0 = success).
    pub code: u8,
    /// Human-readable reason.
    pub reason: String,
    /// Server's receive maximum (5).
    pub receive_max: Option<u16>,
    /// Server's maximum QoS (5).
    pub max_qos: Option<u8>,
    /// Server keep alive override (5).
    pub server_keep_alive: Option<u16>,
    /// Server's maximum packet size (5).
    pub max_packet_size: Option<u32>,
    /// Authentication method the server accepted (5): present when it supports enhanced
    /// authentication with this method, and so re-authentication with AUTH.
    pub auth_method: Option<String>,
}

/// Packets the client receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// CONNACK.
    ConnAck(ConnAckInfo),
    /// PUBLISH.
    Publish {
        /// Packet id.
        pkid: u16,
        /// Redelivery flag.
        dup: bool,
        /// The message.
        msg: Message,
    },
    /// PUBACK with reason code (0 on 3.1.1).
    PubAck {
        /// Packet id.
        pkid: u16,
        /// Reason code.
        code: u8,
    },
    /// PUBREC with reason code.
    PubRec {
        /// Packet id.
        pkid: u16,
        /// Reason code.
        code: u8,
    },
    /// PUBREL.
    PubRel(u16),
    /// PUBCOMP.
    PubComp(u16),
    /// SUBACK with one code per filter (0..=2 granted QoS, >= 0x80 failure).
    SubAck {
        /// Packet id.
        pkid: u16,
        /// Codes.
        codes: Vec<u8>,
    },
    /// PINGRESP.
    PingResp,
    /// DISCONNECT from the server (5) with reason code.
    Disconnect(u8),
    /// AUTH from the server (5): 0x00 success, 0x18 continue authentication.
    Auth {
        /// Reason code.
        reason: u8,
        /// Authentication method, if given.
        method: Option<String>,
    },
    /// Anything else (UNSUBACK): ignored by the client.
    Other,
}

/// Codec failures; any of them ends the connection.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Malformed or unsupported bytes from the peer.
    #[error("malformed packet from the broker: {0}")]
    Malformed(String),
    /// A packet we wanted to send could not be encoded.
    #[error("cannot encode packet: {0}")]
    Encode(String),
    /// A PUBLISH larger than the broker's Maximum Packet Size (or MQTT's own limit): that one
    /// message is refused, the connection is fine.
    #[error("message of {size} bytes exceeds the broker's maximum packet size of {max} bytes")]
    TooLarge {
        /// Encoded size.
        size: usize,
        /// The limit.
        max: usize,
    },
}

fn qos4(q: QoS) -> b4::QoS {
    match q {
        QoS::AtMostOnce => b4::QoS::AtMostOnce,
        QoS::AtLeastOnce => b4::QoS::AtLeastOnce,
        QoS::ExactlyOnce => b4::QoS::ExactlyOnce,
    }
}

fn qos5(q: QoS) -> b5::QoS {
    match q {
        QoS::AtMostOnce => b5::QoS::AtMostOnce,
        QoS::AtLeastOnce => b5::QoS::AtLeastOnce,
        QoS::ExactlyOnce => b5::QoS::ExactlyOnce,
    }
}

fn from4(q: b4::QoS) -> QoS {
    QoS::from_u8(q as u8).unwrap_or(QoS::AtMostOnce)
}

fn from5(q: b5::QoS) -> QoS {
    QoS::from_u8(q as u8).unwrap_or(QoS::AtMostOnce)
}

/// Encodes `packet` at the end of `buf`. `max_packet` is the server's limit, if it gave one.
pub fn encode(
    version: Version,
    packet: &Outgoing,
    buf: &mut BytesMut,
    max_packet: Option<u32>,
) -> Result<(), CodecError> {
    match version {
        Version::V4 => encode4(packet, buf),
        Version::V5 => encode5(packet, buf, max_packet),
    }
}

/// MQTT's largest Remaining Length.
const MAX_REMAINING: usize = 268_435_455;

fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn put_varint(buf: &mut BytesMut, mut n: usize) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if n == 0 {
            break;
        }
    }
}

fn put_str(buf: &mut BytesMut, s: &[u8]) {
    buf.put_u16(s.len() as u16);
    buf.put_slice(s);
}

/// Length of the MQTT 5 publish properties of `p` (without their own length prefix).
fn props_len(p: &Properties, stamp: Option<(&str, &str)>) -> usize {
    let mut n = stamp.map_or(0, |(k, v)| 5 + k.len() + v.len());
    if p.payload_format.is_some() {
        n += 2;
    }
    if p.message_expiry.is_some() {
        n += 5;
    }
    if let Some(v) = &p.content_type {
        n += 3 + v.len();
    }
    if let Some(v) = &p.response_topic {
        n += 3 + v.len();
    }
    if let Some(v) = &p.correlation_data {
        n += 3 + v.len();
    }
    for (k, v) in &p.user_properties {
        n += 5 + k.len() + v.len();
    }
    n
}

/// Writes a PUBLISH straight into `buf`: one pass, no intermediate packet, no copy of topic,
/// properties or payload other than onto the wire. The session's writer (`state::Writer`)
/// calls [`encode_publish_head`] and then copies the payload or queues it where it is; this is
/// the copying case in one call. `stamp` is a user property added after the message's own
/// (MQTT 5 only): the bridge's loop mark. A message larger than `max_packet` (the server's limit) or than MQTT allows is
/// [`CodecError::TooLarge`] and nothing is written.
pub fn encode_publish(
    version: Version,
    pkid: u16,
    dup: bool,
    msg: &Message,
    buf: &mut BytesMut,
    max_packet: Option<u32>,
    stamp: Option<(&str, &str)>,
) -> Result<(), CodecError> {
    encode_publish_head(version, pkid, dup, msg, buf, max_packet, stamp, true)?;
    buf.put_slice(&msg.payload);
    Ok(())
}

/// [`encode_publish`] but for the payload, which the caller queues after it (written from
/// where it is, see [`super::outbuf`]). `reserve_payload` makes room for it in `buf` too.
#[allow(clippy::too_many_arguments)]
pub fn encode_publish_head(
    version: Version,
    pkid: u16,
    dup: bool,
    msg: &Message,
    buf: &mut BytesMut,
    max_packet: Option<u32>,
    stamp: Option<(&str, &str)>,
    reserve_payload: bool,
) -> Result<(), CodecError> {
    let p = &msg.properties;
    let too_long = |what: &str| CodecError::Encode(format!("{what} is longer than 65,535 bytes"));
    if msg.topic.len() > u16::MAX as usize {
        return Err(too_long("topic"));
    }
    let props = match version {
        Version::V4 => None,
        Version::V5 => {
            let strings = [p.content_type.as_deref(), p.response_topic.as_deref()];
            if strings
                .iter()
                .flatten()
                .any(|v| v.len() > u16::MAX as usize)
                || p.correlation_data
                    .as_ref()
                    .is_some_and(|v| v.len() > u16::MAX as usize)
                || p.user_properties
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .chain(stamp)
                    .any(|(k, v)| k.len() > u16::MAX as usize || v.len() > u16::MAX as usize)
            {
                return Err(too_long("a property"));
            }
            Some(props_len(p, stamp))
        }
    };
    let remaining = 2
        + msg.topic.len()
        + if msg.qos == QoS::AtMostOnce { 0 } else { 2 }
        + props.map_or(0, |n| varint_len(n) + n)
        + msg.payload.len();
    let size = 1 + varint_len(remaining) + remaining;
    let max = max_packet.map_or(usize::MAX, |m| m as usize);
    if remaining > MAX_REMAINING || size > max {
        return Err(CodecError::TooLarge {
            size,
            max: max.min(MAX_REMAINING + 5),
        });
    }
    buf.reserve(if reserve_payload {
        size
    } else {
        size - msg.payload.len()
    });
    buf.put_u8(0x30 | (u8::from(dup) << 3) | (msg.qos.as_u8() << 1) | u8::from(msg.retain));
    put_varint(buf, remaining);
    put_str(buf, msg.topic.as_bytes());
    if msg.qos != QoS::AtMostOnce {
        buf.put_u16(pkid);
    }
    if let Some(n) = props {
        put_varint(buf, n);
        if let Some(v) = p.payload_format {
            buf.put_u8(0x01);
            buf.put_u8(v);
        }
        if let Some(v) = p.message_expiry {
            buf.put_u8(0x02);
            buf.put_u32(v);
        }
        if let Some(v) = &p.content_type {
            buf.put_u8(0x03);
            put_str(buf, v.as_bytes());
        }
        if let Some(v) = &p.response_topic {
            buf.put_u8(0x08);
            put_str(buf, v.as_bytes());
        }
        if let Some(v) = &p.correlation_data {
            buf.put_u8(0x09);
            put_str(buf, v);
        }
        let stamped = p
            .user_properties
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(stamp);
        for (k, v) in stamped {
            buf.put_u8(0x26);
            put_str(buf, k.as_bytes());
            put_str(buf, v.as_bytes());
        }
    }
    Ok(())
}

fn encode4(packet: &Outgoing, buf: &mut BytesMut) -> Result<(), CodecError> {
    let p = match packet {
        Outgoing::Connect(c) => v4::Packet::Connect(v4::Connect {
            protocol: b4::Protocol::V4,
            keep_alive: c.keep_alive,
            client_id: c.client_id.clone(),
            clean_session: c.clean_start,
            last_will: None,
            login: c.username.as_ref().map(|u| v4::Login {
                username: u.clone(),
                password: c
                    .password
                    .as_ref()
                    .map(|p| p.expose().to_string())
                    .unwrap_or_default(),
            }),
        }),
        Outgoing::PubAck(p) => v4::Packet::PubAck(v4::PubAck::new(*p)),
        Outgoing::PubRec(p) => v4::Packet::PubRec(v4::PubRec::new(*p)),
        Outgoing::PubRel(p) => v4::Packet::PubRel(v4::PubRel::new(*p)),
        Outgoing::PubComp(p) => v4::Packet::PubComp(v4::PubComp::new(*p)),
        Outgoing::Subscribe { pkid, filters } => v4::Packet::Subscribe(v4::Subscribe {
            pkid: *pkid,
            filters: filters
                .iter()
                .map(|f| v4::SubscribeFilter {
                    path: f.filter.clone(),
                    qos: qos4(f.qos),
                })
                .collect(),
        }),
        Outgoing::Unsubscribe { pkid, filters } => v4::Packet::Unsubscribe(v4::Unsubscribe {
            pkid: *pkid,
            topics: filters.clone(),
        }),
        Outgoing::PingReq => v4::Packet::PingReq,
        Outgoing::Disconnect => v4::Packet::Disconnect,
        Outgoing::Auth { .. } => {
            return Err(CodecError::Encode("MQTT 3.1.1 has no AUTH packet".into()));
        }
    };
    p.write(buf, usize::MAX)
        .map(|_| ())
        .map_err(|e| CodecError::Encode(e.to_string()))
}

fn encode5(packet: &Outgoing, buf: &mut BytesMut, max: Option<u32>) -> Result<(), CodecError> {
    let p = match packet {
        Outgoing::Auth {
            reason,
            method,
            data,
        } => return encode_auth(*reason, method, data.expose().as_bytes(), buf),
        Outgoing::Connect(c) => {
            let properties = v5::ConnectProperties {
                session_expiry_interval: c.session_expiry,
                receive_maximum: c.receive_maximum,
                max_packet_size: c.max_packet_size,
                topic_alias_max: None,
                request_response_info: None,
                request_problem_info: None,
                user_properties: Vec::new(),
                authentication_method: c.auth_method.clone(),
                authentication_data: c
                    .auth_data
                    .as_ref()
                    .map(|d| Bytes::copy_from_slice(d.expose().as_bytes())),
            };
            v5::Packet::Connect(
                v5::Connect {
                    keep_alive: c.keep_alive,
                    client_id: c.client_id.clone(),
                    clean_start: c.clean_start,
                    properties: Some(properties),
                },
                None,
                c.username.as_ref().map(|u| v5::Login {
                    username: u.clone(),
                    password: c
                        .password
                        .as_ref()
                        .map(|p| p.expose().to_string())
                        .unwrap_or_default(),
                }),
            )
        }
        Outgoing::PubAck(p) => v5::Packet::PubAck(v5::PubAck::new(*p, None)),
        Outgoing::PubRec(p) => v5::Packet::PubRec(v5::PubRec::new(*p, None)),
        Outgoing::PubRel(p) => v5::Packet::PubRel(v5::PubRel::new(*p, None)),
        Outgoing::PubComp(p) => v5::Packet::PubComp(v5::PubComp::new(*p, None)),
        Outgoing::Subscribe { pkid, filters } => v5::Packet::Subscribe(v5::Subscribe {
            pkid: *pkid,
            filters: filters
                .iter()
                .map(|f| v5::Filter {
                    path: f.filter.clone(),
                    qos: qos5(f.qos),
                    // The bridge's own publishes never come back to the same client.
                    nolocal: !f.filter.starts_with("$share/"),
                    // Keep the publisher's retain flag on forwarded messages.
                    preserve_retain: true,
                    // Retained messages only on a new subscription, so a reconnect with a
                    // resumed session does not replay them (no retained storms).
                    retain_forward_rule: v5::RetainForwardRule::OnNewSubscribe,
                })
                .collect(),
            properties: None,
        }),
        Outgoing::Unsubscribe { pkid, filters } => v5::Packet::Unsubscribe(v5::Unsubscribe {
            pkid: *pkid,
            filters: filters.clone(),
            properties: None,
        }),
        Outgoing::PingReq => v5::Packet::PingReq(v5::PingReq),
        Outgoing::Disconnect => v5::Packet::Disconnect(v5::Disconnect::new(
            v5::DisconnectReasonCode::NormalDisconnection,
        )),
    };
    p.write(buf, max)
        .map(|_| ())
        .map_err(|e| CodecError::Encode(e.to_string()))
}

/// Decodes one packet from the front of `buf`; `Ok(None)` when more bytes are needed.
pub fn decode(
    version: Version,
    buf: &mut BytesMut,
    max_incoming: usize,
) -> Result<Option<Incoming>, CodecError> {
    match version {
        Version::V4 => match v4::Packet::read(buf, max_incoming) {
            Ok(p) => Ok(Some(from_packet4(p))),
            Err(b4::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(CodecError::Malformed(e.to_string())),
        },
        Version::V5 => {
            if let Some(ack) = refused_ack(buf) {
                return Ok(Some(ack));
            }
            if buf.first() == Some(&0xF0) {
                return decode_auth(buf, max_incoming);
            }
            match v5::Packet::read(buf, Some(max_incoming as u32)) {
                Ok(p) => Ok(Some(from_packet5(p)?)),
                Err(b5::Error::InsufficientBytes(_)) => Ok(None),
                Err(e) => Err(CodecError::Malformed(e.to_string())),
            }
        }
    }
}

/// A whole PUBACK or PUBREC at the front of `buf` whose reason code MQTT 5 does not define
/// for it (Mosquitto 2.0 answers an oversize publish with PUBACK 0x95): read as that one
/// message's refusal (reason code 0x80 or more) and consumed, so that it is not taken for a
/// broken connection. `None` for anything else (left in `buf`).
fn refused_ack(buf: &mut BytesMut) -> Option<Incoming> {
    let kind = *buf.first()?;
    if kind != 0x40 && kind != 0x50 {
        return None;
    }
    let (mut len, mut i, mut shift) = (0usize, 1usize, 0);
    loop {
        let b = *buf.get(i)?;
        len |= ((b & 0x7f) as usize) << shift;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if i > 4 {
            return None;
        }
    }
    if len < 3 || buf.len() < i + len {
        return None;
    }
    // The codes MQTT 5 defines for PUBACK and PUBREC (§3.4.2.1, §3.5.2.1): the codec reads
    // those.
    if matches!(
        buf[i + 2],
        0x00 | 0x10 | 0x80 | 0x83 | 0x87 | 0x90 | 0x91 | 0x97 | 0x99
    ) {
        return None;
    }
    let pkid = u16::from_be_bytes([buf[i], buf[i + 1]]);
    let code = buf[i + 2].max(0x80);
    let _ = buf.split_to(i + len);
    Some(if kind == 0x40 {
        Incoming::PubAck { pkid, code }
    } else {
        Incoming::PubRec { pkid, code }
    })
}

/// Encodes an MQTT 5 AUTH packet (§3.15): reason code, then the properties Authentication
/// Method (0x15) and Authentication Data (0x16). Written here because rumqttc 0.25 miscounts
/// the length of these properties (it leaves out their two-byte length prefixes).
fn encode_auth(
    reason: u8,
    method: &str,
    data: &[u8],
    buf: &mut BytesMut,
) -> Result<(), CodecError> {
    if method.len() > u16::MAX as usize || data.len() > u16::MAX as usize {
        return Err(CodecError::Encode(
            "authentication method or data is longer than 65,535 bytes".into(),
        ));
    }
    let props = 3 + method.len() + 3 + data.len();
    let remaining = 1 + varint_len(props) + props;
    buf.reserve(1 + varint_len(remaining) + remaining);
    buf.put_u8(0xF0);
    put_varint(buf, remaining);
    buf.put_u8(reason);
    put_varint(buf, props);
    buf.put_u8(0x15);
    put_str(buf, method.as_bytes());
    buf.put_u8(0x16);
    put_str(buf, data);
    Ok(())
}

/// Decodes an AUTH packet at the front of `buf` (§3.15): its reason code and, if present,
/// its Authentication Method; other properties (reason string, user properties, data) are
/// skipped. `Ok(None)` until the whole packet is there.
fn decode_auth(buf: &mut BytesMut, max_incoming: usize) -> Result<Option<Incoming>, CodecError> {
    let bad = |what: &str| CodecError::Malformed(format!("AUTH: {what}"));
    let Some((len, head)) = read_varint(&buf[1..]).map_err(bad)? else {
        return Ok(None);
    };
    if 1 + head + len > max_incoming {
        return Err(bad("larger than the maximum packet size"));
    }
    if buf.len() < 1 + head + len {
        return Ok(None);
    }
    let packet = buf.split_to(1 + head + len);
    let body = &packet[1 + head..];
    // A Remaining Length of 0 means reason 0x00 and no properties (§3.15.2.1).
    let Some(&reason) = body.first() else {
        return Ok(Some(Incoming::Auth {
            reason: 0,
            method: None,
        }));
    };
    if !matches!(reason, 0x00 | 0x18 | 0x19) {
        return Err(bad(&format!("undefined reason code {reason:#04x}")));
    }
    let mut method = None;
    if body.len() > 1 {
        let Some((plen, phead)) = read_varint(&body[1..]).map_err(bad)? else {
            return Err(bad("truncated property length"));
        };
        let props = body
            .get(1 + phead..1 + phead + plen)
            .ok_or_else(|| bad("property length beyond the packet"))?;
        let mut i = 0;
        while i < props.len() {
            let id = props[i];
            i += 1;
            let two = |i: usize| -> Result<usize, CodecError> {
                props
                    .get(i..i + 2)
                    .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
                    .ok_or_else(|| bad("truncated property"))
            };
            match id {
                // Method and reason string (UTF-8 strings), data (binary).
                0x15 | 0x1F | 0x16 => {
                    let n = two(i)?;
                    let v = props
                        .get(i + 2..i + 2 + n)
                        .ok_or_else(|| bad("truncated property"))?;
                    if id == 0x15 {
                        method = Some(
                            String::from_utf8(v.to_vec())
                                .map_err(|_| bad("method is not UTF-8"))?,
                        );
                    }
                    i += 2 + n;
                }
                // User property: two strings.
                0x26 => {
                    let k = two(i)?;
                    let v = two(i + 2 + k)?;
                    i += 4 + k + v;
                    if i > props.len() {
                        return Err(bad("truncated property"));
                    }
                }
                other => return Err(bad(&format!("property {other:#04x} is not allowed"))),
            }
        }
    }
    Ok(Some(Incoming::Auth { reason, method }))
}

/// A variable byte integer at the front of `b`: `(value, bytes used)`, `None` when more bytes
/// are needed.
fn read_varint(b: &[u8]) -> Result<Option<(usize, usize)>, &'static str> {
    let mut value = 0usize;
    for i in 0..4 {
        let Some(&byte) = b.get(i) else {
            return Ok(None);
        };
        value |= ((byte & 0x7f) as usize) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    Err("variable byte integer longer than 4 bytes")
}

/// The topic as a string sharing the packet's buffer (validated, not copied).
fn topic_string(bytes: Bytes) -> Result<ByteString, CodecError> {
    ByteString::try_from(bytes)
        .map_err(|_| CodecError::Malformed("topic is not valid UTF-8".into()))
}

fn from_packet4(p: v4::Packet) -> Incoming {
    match p {
        v4::Packet::ConnAck(c) => Incoming::ConnAck(ConnAckInfo {
            session_present: c.session_present,
            code: c.code as u8,
            reason: format!("{:?}", c.code),
            ..ConnAckInfo::default()
        }),
        v4::Packet::Publish(p) => Incoming::Publish {
            pkid: p.pkid,
            dup: p.dup,
            msg: Message {
                topic: p.topic.into(),
                payload: p.payload,
                qos: from4(p.qos),
                retain: p.retain,
                properties: Props::default(),
            },
        },
        v4::Packet::PubAck(a) => Incoming::PubAck {
            pkid: a.pkid,
            code: 0,
        },
        v4::Packet::PubRec(a) => Incoming::PubRec {
            pkid: a.pkid,
            code: 0,
        },
        v4::Packet::PubRel(a) => Incoming::PubRel(a.pkid),
        v4::Packet::PubComp(a) => Incoming::PubComp(a.pkid),
        v4::Packet::SubAck(s) => Incoming::SubAck {
            pkid: s.pkid,
            codes: s
                .return_codes
                .iter()
                .map(|c| match c {
                    v4::SubscribeReasonCode::Success(q) => *q as u8,
                    v4::SubscribeReasonCode::Failure => 0x80,
                })
                .collect(),
        },
        v4::Packet::PingResp => Incoming::PingResp,
        _ => Incoming::Other,
    }
}

fn from_packet5(p: v5::Packet) -> Result<Incoming, CodecError> {
    Ok(match p {
        v5::Packet::ConnAck(c) => {
            let code = connack_code5(c.code);
            let mut info = ConnAckInfo {
                session_present: c.session_present,
                code,
                reason: format!("{:?}", c.code),
                ..ConnAckInfo::default()
            };
            if let Some(props) = c.properties {
                if let Some(r) = props.reason_string {
                    info.reason = format!("{:?}: {r}", c.code);
                }
                info.receive_max = props.receive_max;
                info.max_qos = props.max_qos;
                info.server_keep_alive = props.server_keep_alive;
                info.max_packet_size = props.max_packet_size;
                info.auth_method = props.authentication_method;
            }
            Incoming::ConnAck(info)
        }
        v5::Packet::Publish(p) => {
            let properties = p
                .properties
                .map(|pp| Properties {
                    payload_format: pp.payload_format_indicator,
                    message_expiry: pp.message_expiry_interval,
                    content_type: pp.content_type,
                    response_topic: pp.response_topic,
                    correlation_data: pp.correlation_data,
                    user_properties: pp.user_properties,
                })
                .map(Props::from)
                .unwrap_or_default();
            Incoming::Publish {
                pkid: p.pkid,
                dup: p.dup,
                msg: Message {
                    topic: topic_string(p.topic)?,
                    payload: p.payload,
                    qos: from5(p.qos),
                    retain: p.retain,
                    properties,
                },
            }
        }
        v5::Packet::PubAck(a) => Incoming::PubAck {
            pkid: a.pkid,
            code: puback_code5(a.reason),
        },
        v5::Packet::PubRec(a) => Incoming::PubRec {
            pkid: a.pkid,
            code: pubrec_code5(a.reason),
        },
        v5::Packet::PubRel(a) => Incoming::PubRel(a.pkid),
        v5::Packet::PubComp(a) => Incoming::PubComp(a.pkid),
        v5::Packet::SubAck(s) => Incoming::SubAck {
            pkid: s.pkid,
            codes: s
                .return_codes
                .iter()
                .map(|c| match c {
                    v5::SubscribeReasonCode::Success(q) => *q as u8,
                    v5::SubscribeReasonCode::Failure | v5::SubscribeReasonCode::Unspecified => 0x80,
                    v5::SubscribeReasonCode::ImplementationSpecific => 0x83,
                    v5::SubscribeReasonCode::NotAuthorized => 0x87,
                    v5::SubscribeReasonCode::TopicFilterInvalid => 0x8F,
                    v5::SubscribeReasonCode::PkidInUse => 0x91,
                    v5::SubscribeReasonCode::QuotaExceeded => 0x97,
                    v5::SubscribeReasonCode::SharedSubscriptionsNotSupported => 0x9E,
                    v5::SubscribeReasonCode::SubscriptionIdNotSupported => 0xA1,
                    v5::SubscribeReasonCode::WildcardSubscriptionsNotSupported => 0xA2,
                })
                .collect(),
        },
        v5::Packet::PingResp(_) => Incoming::PingResp,
        v5::Packet::Disconnect(d) => Incoming::Disconnect(d.reason_code as u8),
        _ => Incoming::Other,
    })
}

fn connack_code5(c: v5::ConnectReturnCode) -> u8 {
    use v5::ConnectReturnCode as C;
    match c {
        C::Success => 0,
        C::RefusedProtocolVersion | C::UnsupportedProtocolVersion => 0x84,
        C::BadClientId | C::ClientIdentifierNotValid => 0x85,
        C::ServiceUnavailable | C::ServerUnavailable => 0x88,
        C::UnspecifiedError => 0x80,
        C::MalformedPacket => 0x81,
        C::ProtocolError => 0x82,
        C::ImplementationSpecificError => 0x83,
        C::BadUserNamePassword => 0x86,
        C::NotAuthorized => 0x87,
        C::ServerBusy => 0x89,
        C::Banned => 0x8A,
        C::BadAuthenticationMethod => 0x8C,
        C::TopicNameInvalid => 0x90,
        C::PacketTooLarge => 0x95,
        C::QuotaExceeded => 0x97,
        C::PayloadFormatInvalid => 0x99,
        C::RetainNotSupported => 0x9A,
        C::QoSNotSupported => 0x9B,
        C::UseAnotherServer => 0x9C,
        C::ServerMoved => 0x9D,
        C::ConnectionRateExceeded => 0x9F,
    }
}

fn puback_code5(r: v5::PubAckReason) -> u8 {
    use v5::PubAckReason as R;
    match r {
        R::Success => 0,
        R::NoMatchingSubscribers => 0x10,
        R::UnspecifiedError => 0x80,
        R::ImplementationSpecificError => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicNameInvalid => 0x90,
        R::PacketIdentifierInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::PayloadFormatInvalid => 0x99,
    }
}

fn pubrec_code5(r: v5::PubRecReason) -> u8 {
    use v5::PubRecReason as R;
    match r {
        R::Success => 0,
        R::NoMatchingSubscribers => 0x10,
        R::UnspecifiedError => 0x80,
        R::ImplementationSpecificError => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicNameInvalid => 0x90,
        R::PacketIdentifierInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::PayloadFormatInvalid => 0x99,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg() -> Message {
        Message {
            topic: "a/b".into(),
            payload: Bytes::from_static(b"hello"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: Properties {
                content_type: Some("text/plain".into()),
                user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
                message_expiry: Some(30),
                ..Properties::default()
            }
            .into(),
        }
    }

    /// Encodes a PUBLISH as the server would send it and decodes it as the client.
    #[test]
    fn a_v5_publish_keeps_its_properties_through_the_codec() {
        let mut buf = BytesMut::new();
        let m = msg();
        encode_publish(Version::V5, 7, false, &m, &mut buf, None, None).unwrap();
        let got = decode(Version::V5, &mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(
            got,
            Incoming::Publish {
                pkid: 7,
                dup: false,
                msg: m
            }
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn a_v4_publish_drops_properties_and_keeps_retain() {
        let mut buf = BytesMut::new();
        encode_publish(Version::V4, 3, true, &msg(), &mut buf, None, None).unwrap();
        let Some(Incoming::Publish { pkid, dup, msg: m }) =
            decode(Version::V4, &mut buf, 1 << 20).unwrap()
        else {
            panic!("not a publish")
        };
        assert_eq!((pkid, dup, m.retain), (3, true, true));
        assert!(m.properties.is_empty());
    }

    /// The plain path allocates nothing per message: the decoded topic and payload are views
    /// of the read buffer, and a message without properties holds none.
    #[test]
    fn a_decoded_publish_shares_the_read_buffer_and_holds_no_properties() {
        for version in [Version::V4, Version::V5] {
            let m = Message {
                properties: Props::default(),
                ..msg()
            };
            let mut buf = BytesMut::new();
            encode_publish(version, 9, false, &m, &mut buf, None, None).unwrap();
            let range = buf.as_ptr_range();
            let Some(Incoming::Publish { msg: got, .. }) =
                decode(version, &mut buf, 1 << 20).unwrap()
            else {
                panic!("not a publish")
            };
            assert_eq!(got.topic, "a/b");
            assert!(range.contains(&got.payload.as_ptr()));
            if version == Version::V5 {
                // rumqttc's 3.1.1 decoder hands the topic over as its own `String`.
                assert!(
                    range.contains(&got.topic.as_bytes().as_ptr()),
                    "topic copied"
                );
            }
            assert!(got.properties.is_empty());
            assert_eq!(got.properties, Props::default());
        }
    }

    #[test]
    fn a_partial_packet_needs_more_bytes() {
        let mut buf = BytesMut::new();
        encode_publish(Version::V5, 1, false, &msg(), &mut buf, None, None).unwrap();
        let mut half = buf.split_to(buf.len() / 2);
        assert_eq!(decode(Version::V5, &mut half, 1 << 20).unwrap(), None);
    }

    /// The direct PUBLISH encoder against rumqttc's decoder: every property, both versions,
    /// QoS 0 (no packet id), and sizes whose Remaining Length needs 1 to 3 bytes.
    #[test]
    fn the_direct_publish_encoder_round_trips_through_rumqttc() {
        for version in [Version::V4, Version::V5] {
            for (qos, size) in [
                (QoS::AtMostOnce, 0),
                (QoS::AtLeastOnce, 100),
                (QoS::ExactlyOnce, 20_000),
                (QoS::AtLeastOnce, 3_000_000),
            ] {
                let m = Message {
                    topic: "factory/line-3/é".into(),
                    payload: Bytes::from(vec![7u8; size]),
                    qos,
                    retain: size == 100,
                    properties: Properties {
                        payload_format: Some(1),
                        message_expiry: Some(70_000),
                        content_type: Some("application/json".into()),
                        response_topic: Some("reply/here".into()),
                        correlation_data: Some(Bytes::from_static(b"\x00\x01")),
                        user_properties: vec![("a".into(), "1".into()), ("a".into(), "2".into())],
                    }
                    .into(),
                };
                let mut buf = BytesMut::new();
                encode_publish(
                    version,
                    513,
                    qos == QoS::ExactlyOnce,
                    &m,
                    &mut buf,
                    None,
                    None,
                )
                .unwrap();
                let got = decode(version, &mut buf, 1 << 23).unwrap().unwrap();
                let want = Message {
                    properties: match version {
                        Version::V4 => Props::default(),
                        Version::V5 => m.properties.clone(),
                    },
                    ..m
                };
                let pkid = if qos == QoS::AtMostOnce { 0 } else { 513 };
                assert_eq!(
                    got,
                    Incoming::Publish {
                        pkid,
                        dup: qos == QoS::ExactlyOnce,
                        msg: want
                    },
                    "{version:?} {qos:?} {size}"
                );
                assert!(buf.is_empty());
            }
        }
    }

    #[test]
    fn a_publish_over_the_brokers_maximum_packet_size_is_refused_alone() {
        let mut buf = BytesMut::new();
        let m = Message {
            payload: Bytes::from(vec![0u8; 1000]),
            ..msg()
        };
        let err =
            encode_publish(Version::V5, 1, false, &m, &mut buf, Some(1000), None).unwrap_err();
        assert!(
            matches!(err, CodecError::TooLarge { max: 1000, size } if size > 1000),
            "{err}"
        );
        assert!(buf.is_empty(), "nothing half-written");
        encode_publish(Version::V5, 1, false, &m, &mut buf, Some(2000), None).unwrap();
    }

    #[test]
    fn a_stamp_is_the_last_user_property_on_mqtt_5_only() {
        let stamp = Some(("edgebridge-via", "b-1"));
        let mut buf = BytesMut::new();
        encode_publish(Version::V5, 1, false, &msg(), &mut buf, None, stamp).unwrap();
        let Some(Incoming::Publish { msg: got, .. }) =
            decode(Version::V5, &mut buf, 1 << 20).unwrap()
        else {
            panic!("not a publish")
        };
        let mut want = msg().properties.user_properties.clone();
        want.push(("edgebridge-via".into(), "b-1".into()));
        assert_eq!(got.properties.user_properties, want);
        encode_publish(Version::V4, 1, false, &msg(), &mut buf, None, stamp).unwrap();
        let Some(Incoming::Publish { msg: got, .. }) =
            decode(Version::V4, &mut buf, 1 << 20).unwrap()
        else {
            panic!("not a publish")
        };
        assert!(got.properties.is_empty());
    }

    #[test]
    fn a_puback_with_a_reason_code_mqtt_5_does_not_define_refuses_that_message_only() {
        // Mosquitto 2.0.11 with message_size_limit: PUBACK, pkid 7, reason 0x95.
        let mut buf = BytesMut::from(&b"\x40\x03\x00\x07\x95\x40\x02\x00\x08"[..]);
        assert_eq!(
            decode(Version::V5, &mut buf, 1 << 20).unwrap(),
            Some(Incoming::PubAck {
                pkid: 7,
                code: 0x95
            })
        );
        // The next packet is read as usual.
        assert_eq!(
            decode(Version::V5, &mut buf, 1 << 20).unwrap(),
            Some(Incoming::PubAck { pkid: 8, code: 0 })
        );
        // An undefined code below 0x80 is a refusal too.
        let mut buf = BytesMut::from(&b"\x40\x03\x00\x09\x05"[..]);
        assert_eq!(
            decode(Version::V5, &mut buf, 1 << 20).unwrap(),
            Some(Incoming::PubAck {
                pkid: 9,
                code: 0x80
            })
        );
    }

    #[test]
    fn an_auth_packet_is_written_as_section_3_15_lays_it_out() {
        let mut buf = BytesMut::new();
        let auth = Outgoing::Auth {
            reason: 0x19,
            method: "OAUTH2-JWT".into(),
            data: Secret::new("tok"),
        };
        encode(Version::V5, &auth, &mut buf, None).unwrap();
        let mut want = vec![0xF0, 21, 0x19, 19, 0x15, 0, 10];
        want.extend_from_slice(b"OAUTH2-JWT");
        want.extend_from_slice(&[0x16, 0, 3]);
        want.extend_from_slice(b"tok");
        assert_eq!(&buf[..], &want[..]);
        // Read back (the server's AUTH has the same layout).
        let got = decode(Version::V5, &mut buf, 1024).unwrap();
        assert_eq!(
            got,
            Some(Incoming::Auth {
                reason: 0x19,
                method: Some("OAUTH2-JWT".into())
            })
        );
        assert!(buf.is_empty());
        assert!(encode(Version::V4, &auth, &mut buf, None).is_err());
    }

    #[test]
    fn auth_packets_from_the_server_decode_whole_or_wait_or_fail_named() {
        // Remaining Length 0: success without properties.
        let mut buf = BytesMut::from(&[0xF0u8, 0][..]);
        assert_eq!(
            decode(Version::V5, &mut buf, 1024).unwrap(),
            Some(Incoming::Auth {
                reason: 0,
                method: None
            })
        );
        // Success with a reason string and a user property.
        let mut body = vec![0x00, 0];
        let props: Vec<u8> =
            [&[0x1F, 0, 2][..], b"ok", &[0x26, 0, 1], b"k", &[0, 1], b"v"].concat();
        body[1] = props.len() as u8;
        body.extend_from_slice(&props);
        let mut packet = vec![0xF0, body.len() as u8];
        packet.extend_from_slice(&body);
        let mut part = BytesMut::from(&packet[..packet.len() - 1]);
        assert_eq!(decode(Version::V5, &mut part, 1024).unwrap(), None);
        let mut whole = BytesMut::from(&packet[..]);
        assert_eq!(
            decode(Version::V5, &mut whole, 1024).unwrap(),
            Some(Incoming::Auth {
                reason: 0,
                method: None
            })
        );
        // Undefined reason code; a property AUTH does not allow; truncated properties.
        for bad in [
            &[0xF0u8, 2, 0x05, 0][..],
            &[0xF0, 4, 0x00, 2, 0x01, 1],
            &[0xF0, 5, 0x00, 3, 0x15, 0, 9],
        ] {
            let mut b = BytesMut::from(bad);
            let e = decode(Version::V5, &mut b, 1024).unwrap_err();
            assert!(e.to_string().contains("AUTH"), "{e}");
        }
    }
}
