//! Sans-I/O MQTT client session state.
//!
//! Methods only change state, queue "what to send" (written into a buffer by
//! [`SessionState::write_outgoing`]) and record "what happened" ([`SessionState::swap_events`]);
//! the driver in [`super::link`] owns the socket and the timers. This is where the delivery
//! guarantees live:
//!
//! - an outgoing QoS 1/2 publish is reported [`StateEvent::Delivered`] only on PUBACK /
//!   PUBCOMP from the broker; QoS 0 only once its bytes were written (the driver confirms);
//! - unacknowledged publishes are sent again after a reconnect, in the order they were first
//!   sent (MQTT §4.6; packet ids wrap, so their order is not the send order);
//! - the broker's Maximum QoS and Receive Maximum apply to every publish when it is sent,
//!   including those queued before the first CONNACK;
//! - an incoming QoS 1/2 publish is acknowledged only when the application calls
//!   [`SessionState::ack`], and acknowledgements go out in the order the publishes arrived
//!   (MQTT 3.1.1 §4.6 requires it); an ack from an earlier connection is ignored, because the
//!   broker redelivers that message on the new one;
//! - an incoming publish whose topic is not a valid topic name (wildcards, empty) is a broker
//!   error: it is acknowledged, dropped and reported, never handed on;
//! - a publish the broker keeps closing the connection over (MQTT 3.1.1 cannot refuse one
//!   message: a broker whose maximum packet size it exceeds disconnects) is given up after
//!   [`POISON_STRIKES`] such disconnects in a row, and no later publish of its size or more is
//!   sent on that session: it is reported [`StateEvent::Undeliverable`], never retried forever.

use std::collections::{HashMap, HashSet, VecDeque};

use super::codec::{self, CodecError, ConnAckInfo, Incoming, Outgoing, SubFilter, Version};
use super::outbuf::OutBuf;
use crate::model::{Message, QoS};
use crate::topic::{self, TopicError};
use bytes::BufMut;

/// Identifies an outgoing publish to the application (chosen by the caller).
pub type Token = u64;

/// Disconnects right after a publish was sent, in a row, that make it undeliverable.
pub const POISON_STRIKES: u32 = 3;

/// Handle to acknowledge an incoming QoS 1/2 message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckToken {
    epoch: u64,
    pkid: u16,
}

/// Why a publish was given up without the broker refusing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Undeliverable {
    /// Larger than the broker's Maximum Packet Size (announced in CONNACK, or learned from
    /// disconnects), or than MQTT allows.
    TooLarge {
        /// Encoded size, bytes.
        size: usize,
        /// The limit, bytes.
        max: usize,
    },
    /// The broker closed the connection right after it was sent, [`POISON_STRIKES`] times in
    /// a row.
    Poison {
        /// Encoded size, bytes.
        size: usize,
    },
}

/// What happened, for the application.
#[derive(Debug, Clone, PartialEq)]
pub enum StateEvent {
    /// CONNACK accepted.
    Connected {
        /// The broker resumed a stored session.
        session_present: bool,
    },
    /// A message arrived; `ack` is `Some` for QoS 1/2 and must be passed to [`SessionState::ack`].
    Message {
        /// The message.
        msg: Message,
        /// Ack handle.
        ack: Option<AckToken>,
        /// The broker marked it as a redelivery.
        dup: bool,
    },
    /// The broker acknowledged (or, for QoS 0, we wrote) the publish with this token.
    Delivered(Token),
    /// The broker refused the publish with this reason code (MQTT 5 PUBACK/PUBREC >= 0x80).
    Rejected(Token, u8),
    /// The publish with this token was given up: it cannot be delivered on this session.
    Undeliverable {
        /// Its token.
        token: Token,
        /// Its topic (for the log).
        topic: String,
        /// Why.
        why: Undeliverable,
    },
    /// A publish from the broker with an invalid topic name was acknowledged and dropped.
    InvalidTopic {
        /// The topic, cut to 200 characters.
        topic: String,
        /// What is wrong with it.
        error: TopicError,
    },
    /// SUBACK: granted QoS or failure code per filter.
    Subscribed(Vec<(String, u8)>),
    /// The broker accepted re-authentication on the open connection (AUTH reason 0x00 after
    /// our AUTH 0x19).
    Reauthenticated,
}

/// Protocol violations and refusals that end the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// CONNACK with a failure code.
    #[error("broker refused the connection: {reason} (code {code:#04x})")]
    Refused {
        /// Code.
        code: u8,
        /// Reason.
        reason: String,
    },
    /// The broker sent DISCONNECT.
    #[error("broker sent DISCONNECT with reason code {code:#04x}{why}", code = .0, why = disconnect_reason(*.0))]
    Disconnected(u8),
    /// A packet that makes no sense at this point.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// What an MQTT 5 DISCONNECT reason code means, for the log (§3.14.2.1).
pub fn disconnect_reason(code: u8) -> &'static str {
    match code {
        0x8e => {
            ": session taken over (another client connected with the same client ID: two bridges or instances with one clientIdPrefix?)"
        }
        0x8b => ": the broker is shutting down",
        0x87 => ": not authorized",
        0x89 => ": server busy",
        0x8d => ": keep alive timeout",
        0x93 => ": receive maximum exceeded",
        0x95 => ": packet too large",
        0x96 => ": message rate too high",
        0x97 => ": quota exceeded",
        0x9c => ": use another server",
        0x9d => ": server moved",
        0xa2 => ": wildcard subscriptions not supported",
        _ => "",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Published,
    /// QoS 2: PUBREL sent, waiting for PUBCOMP.
    Released,
}

#[derive(Debug)]
struct Inflight {
    msg: Message,
    token: Token,
    stage: Stage,
    /// Order of the first send (packet ids wrap; this does not).
    seq: u64,
    /// Written on this connection.
    written: bool,
    /// Encoded size when last written.
    size: usize,
    /// Disconnects in a row right after it was the oldest publish written and unacknowledged.
    strikes: u32,
}

/// A packet waiting to be written.
#[derive(Debug)]
enum Out {
    /// An inflight QoS 1/2 publish, by packet id (the message stays in `inflight`).
    Publish { pkid: u16, dup: bool },
    /// A QoS 0 publish.
    Publish0(Message, Token),
    /// A SUBSCRIBE with the session's filters.
    Subscribe(u16),
    /// Anything else.
    Packet(Outgoing),
}

/// Where [`SessionState::write_outgoing`] writes, and what it reports back.
pub struct Writer<'a> {
    /// Wire version.
    pub version: Version,
    /// The connection's write queue.
    pub buf: &'a mut OutBuf,
    /// Payloads of at least this many bytes are queued where they are, not copied
    /// ([`super::outbuf::SHARE_FROM`] where the connection writes vectored, else `usize::MAX`).
    pub share_from: usize,
    /// Stop encoding once the buffer holds this many bytes (the rest waits for room).
    pub high_water: usize,
    /// User property stamped on every PUBLISH (MQTT 5).
    pub stamp: Option<(&'a str, &'a str)>,
    /// Stream offset of `buf[0]` (bytes written to the connection before it).
    pub base: u64,
    /// Tokens of QoS 0 publishes with the stream offset of their last byte: delivered once
    /// the connection has written that far.
    pub qos0: &'a mut VecDeque<(u64, Token)>,
    /// Set to the stream offset of the end of a PINGREQ written now.
    pub ping_end: &'a mut Option<u64>,
}

impl Writer<'_> {
    /// Queues a PUBLISH: copied whole, or its header with the payload shared.
    fn publish(
        &mut self,
        pkid: u16,
        dup: bool,
        msg: &Message,
        max_packet: Option<u32>,
    ) -> Result<(), CodecError> {
        let share = msg.payload.len() >= self.share_from;
        codec::encode_publish_head(
            self.version,
            pkid,
            dup,
            msg,
            self.buf.bytes(),
            max_packet,
            self.stamp,
            !share,
        )?;
        if share {
            self.buf.share(msg.payload.clone());
        } else {
            self.buf.bytes().put_slice(&msg.payload);
        }
        Ok(())
    }
}

/// The client side of one MQTT session.
#[derive(Debug)]
pub struct SessionState {
    /// Increases on every new connection; stale [`AckToken`]s are ignored.
    epoch: u64,
    connected: bool,
    /// Our cap on unacknowledged outgoing QoS 1/2 publishes.
    max_inflight: u16,
    /// min(our cap, broker's receive maximum).
    quota: u16,
    /// Unacknowledged QoS 1/2 publishes by packet id; `seq` orders them. A hash map keeps its
    /// table when entries leave, so once it has held the quota a publish and its
    /// acknowledgement allocate nothing (a `BTreeMap` split and merged nodes as the window
    /// moved: one allocation every 6-8 messages at QoS 1, measured with perf's malloc probes).
    inflight: HashMap<u16, Inflight>,
    /// Publishes accepted while the quota was used up or while disconnected.
    waiting: VecDeque<(Message, Token)>,
    next_pkid: u16,
    next_seq: u64,
    /// Incoming QoS 1/2 pkids in arrival order, with "application acked" flags.
    incoming: VecDeque<(u16, QoS, bool)>,
    /// QoS 2 pkids we sent PUBREC for and await PUBREL.
    awaiting_rel: HashSet<u16>,
    subscriptions: Vec<SubFilter>,
    sub_pkid: Option<u16>,
    /// Filters to UNSUBSCRIBE once, on the next connection (a persistent session's
    /// subscriptions that its route no longer has).
    unsubscribe: Vec<String>,
    max_qos: QoS,
    /// The broker's Maximum Packet Size: announced (MQTT 5) or learned from poison publishes.
    max_packet: Option<u32>,
    /// Largest publish the broker acknowledged (encoded bytes): a poison publish larger than
    /// this is evidence of a size limit.
    largest_delivered: usize,
    out: VecDeque<Out>,
    events: Vec<StateEvent>,
    /// The authentication method the broker accepted in CONNACK (MQTT 5 enhanced
    /// authentication): re-authentication in place is possible with it.
    auth_method: Option<String>,
    /// An AUTH 0x19 was queued on this connection and not yet answered.
    reauthenticating: bool,
}

/// Why [`SessionState::reauthenticate`] could not start a re-authentication.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReauthError {
    /// Not connected.
    #[error("not connected")]
    NotConnected,
    /// The broker's CONNACK named no authentication method (it does not support enhanced
    /// authentication, or not this method): a reconnect presents new credentials instead.
    #[error("the broker's CONNACK granted no authentication method{}", .0.as_ref().map(|m| format!(" \"{m}\" as asked")).unwrap_or_default())]
    NotGranted(Option<String>),
    /// One is already waiting for the broker's answer.
    #[error("a re-authentication is already waiting for the broker's answer")]
    InProgress,
}

impl SessionState {
    /// A session that will subscribe to `subscriptions` on every connect and keep at most
    /// `max_inflight` outgoing QoS 1/2 publishes unacknowledged.
    pub fn new(subscriptions: Vec<SubFilter>, max_inflight: u16) -> SessionState {
        let max_inflight = max_inflight.max(1);
        SessionState {
            epoch: 0,
            connected: false,
            max_inflight,
            quota: max_inflight,
            inflight: HashMap::new(),
            waiting: VecDeque::new(),
            next_pkid: 0,
            next_seq: 0,
            incoming: VecDeque::new(),
            awaiting_rel: HashSet::new(),
            subscriptions,
            sub_pkid: None,
            unsubscribe: Vec::new(),
            max_qos: QoS::ExactlyOnce,
            max_packet: None,
            largest_delivered: 0,
            out: VecDeque::new(),
            events: Vec::new(),
            auth_method: None,
            reauthenticating: false,
        }
    }

    /// Re-authenticates on the open connection (MQTT 5 §4.12.1): queues AUTH with reason
    /// 0x19, `method` and `data` (a fresh token). Possible only when the broker's CONNACK
    /// granted this same method; the answer arrives as [`StateEvent::Reauthenticated`], or the
    /// broker refuses with DISCONNECT (an error of [`Self::on_incoming`]).
    pub fn reauthenticate(
        &mut self,
        method: &str,
        data: crate::secret::Secret,
    ) -> Result<(), ReauthError> {
        if !self.connected {
            return Err(ReauthError::NotConnected);
        }
        if self.auth_method.as_deref() != Some(method) {
            return Err(ReauthError::NotGranted(Some(method.to_string())));
        }
        if self.reauthenticating {
            return Err(ReauthError::InProgress);
        }
        self.reauthenticating = true;
        self.out.push_back(Out::Packet(Outgoing::Auth {
            reason: 0x19,
            method: method.to_string(),
            data,
        }));
        Ok(())
    }

    /// Whether the broker granted `method` in CONNACK (re-authentication in place possible).
    pub fn auth_granted(&self, method: &str) -> bool {
        self.connected && self.auth_method.as_deref() == Some(method)
    }

    /// Whether an AUTH 0x19 waits for its answer.
    pub fn is_reauthenticating(&self) -> bool {
        self.reauthenticating
    }

    /// UNSUBSCRIBE from `filters` once, on the next connection (after the SUBSCRIBE): what a
    /// persistent session still holds of a subscription its route no longer has.
    pub fn unsubscribe_once(&mut self, filters: Vec<String>) {
        self.unsubscribe = filters;
    }

    /// Moves the events recorded so far into the driver's (empty) `spare` vector, so that the
    /// two vectors are reused turn after turn instead of allocated.
    pub fn swap_events(&mut self, spare: &mut Vec<StateEvent>) {
        debug_assert!(spare.is_empty());
        std::mem::swap(&mut self.events, spare);
    }

    /// Events for the application.
    pub fn take_events(&mut self) -> Vec<StateEvent> {
        std::mem::take(&mut self.events)
    }

    /// Whether events are waiting to be taken.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// Whether anything is waiting to be written.
    pub fn has_outgoing(&self) -> bool {
        !self.out.is_empty()
    }

    /// Outgoing publishes not yet acknowledged by the broker (sent or waiting).
    pub fn pending_publishes(&self) -> usize {
        self.inflight.len() + self.waiting.len()
    }

    /// Whether a CONNACK was accepted and the connection is not known to be gone.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Handles CONNACK: sends again what the last connection left unacknowledged, in the
    /// order it was first sent, and subscribes.
    pub fn on_connack(&mut self, info: &ConnAckInfo) -> Result<(), StateError> {
        if info.code != 0 {
            return Err(StateError::Refused {
                code: info.code,
                reason: info.reason.clone(),
            });
        }
        self.connected = true;
        self.auth_method = info.auth_method.clone();
        self.reauthenticating = false;
        self.quota = info
            .receive_max
            .unwrap_or(u16::MAX)
            .min(self.max_inflight)
            .max(1);
        self.max_qos = info
            .max_qos
            .and_then(QoS::from_u8)
            .unwrap_or(QoS::ExactlyOnce);
        if let Some(m) = info.max_packet_size {
            self.max_packet = Some(self.max_packet.map_or(m, |learned| learned.min(m)));
        }
        let resumed = info.session_present;
        let mut resend: Vec<(u64, u16)> = self.inflight.iter().map(|(p, e)| (e.seq, *p)).collect();
        resend.sort_unstable();
        let max_qos = self.max_qos;
        for (_, pkid) in resend {
            let entry = self.inflight.get_mut(&pkid).expect("key from map");
            if resumed && entry.stage == Stage::Released {
                self.out.push_back(Out::Packet(Outgoing::PubRel(pkid)));
            } else {
                // A new session lost the QoS 2 state: publish again (a duplicate is possible,
                // a loss is not), within what this broker accepts.
                entry.stage = Stage::Published;
                if entry.msg.qos > max_qos {
                    entry.msg.qos = max_qos;
                }
                self.out.push_back(Out::Publish { pkid, dup: resumed });
            }
        }
        // A QoS 0 broker (Maximum QoS 0): what was inflight at QoS 1/2 goes as QoS 0 now.
        if max_qos == QoS::AtMostOnce {
            let mut pkids: Vec<(u64, u16)> =
                self.inflight.iter().map(|(p, e)| (e.seq, *p)).collect();
            pkids.sort_unstable();
            self.out.retain(|o| !matches!(o, Out::Publish { .. }));
            for (_, pkid) in pkids {
                let e = self.inflight.remove(&pkid).expect("key from map");
                self.out.push_back(Out::Publish0(e.msg, e.token));
            }
        }
        if !self.subscriptions.is_empty() {
            let pkid = self.alloc_pkid();
            self.sub_pkid = Some(pkid);
            self.out.push_back(Out::Subscribe(pkid));
        }
        if !self.unsubscribe.is_empty() {
            let pkid = self.alloc_pkid();
            let filters = std::mem::take(&mut self.unsubscribe);
            self.out
                .push_back(Out::Packet(Outgoing::Unsubscribe { pkid, filters }));
        }
        self.events.push(StateEvent::Connected {
            session_present: resumed,
        });
        self.pump();
        Ok(())
    }

    /// The connection is gone: acks of its messages are void, unacknowledged publishes wait
    /// for the next connection. `right_after_send` says the broker closed the connection soon
    /// after the oldest unacknowledged publish was written: that publish gets a strike, and at
    /// [`POISON_STRIKES`] it is given up as [`Undeliverable::Poison`] (and, on a session with
    /// no announced limit, its size becomes the learned Maximum Packet Size).
    pub fn on_disconnect(&mut self, right_after_send: bool) {
        self.connected = false;
        self.auth_method = None;
        self.reauthenticating = false;
        self.epoch += 1;
        self.incoming.clear();
        self.awaiting_rel.clear();
        self.sub_pkid = None;
        // Anything queued but not written (acks, pings) belongs to the dead connection; QoS 0
        // publishes among them are lost with it and are not confirmed.
        self.out.clear();
        let suspect = self
            .inflight
            .iter()
            .filter(|(_, e)| e.written && e.stage == Stage::Published)
            .min_by_key(|(_, e)| e.seq)
            .map(|(p, _)| *p);
        for (pkid, e) in self.inflight.iter_mut() {
            if right_after_send && Some(*pkid) == suspect {
                e.strikes += 1;
            } else if e.written {
                e.strikes = 0;
            }
            e.written = false;
        }
        if let Some(pkid) = suspect
            && self.inflight[&pkid].strikes >= POISON_STRIKES
        {
            let e = self.inflight.remove(&pkid).expect("suspect is inflight");
            let size = e.size;
            if size > self.largest_delivered {
                // Larger than anything the broker took: its size limit is the likely cause.
                // Remember it, so the next such message is refused at once instead of costing
                // three reconnects.
                let learned = (size - 1) as u32;
                self.max_packet = Some(self.max_packet.map_or(learned, |m| m.min(learned)));
            }
            self.events.push(StateEvent::Undeliverable {
                token: e.token,
                topic: e.msg.topic.into(),
                why: Undeliverable::Poison { size },
            });
        }
    }

    /// Sends the session's SUBSCRIBE again on this connection (after the broker refused it);
    /// false when not connected or one is still unanswered.
    pub fn resubscribe(&mut self) -> bool {
        if !self.connected || self.sub_pkid.is_some() || self.subscriptions.is_empty() {
            return false;
        }
        let pkid = self.alloc_pkid();
        self.sub_pkid = Some(pkid);
        self.out.push_back(Out::Subscribe(pkid));
        true
    }

    /// Queues a publish. QoS 1/2 beyond the broker's quota wait in order.
    pub fn publish(&mut self, msg: Message, token: Token) {
        self.waiting.push_back((msg, token));
        self.pump();
    }

    fn pump(&mut self) {
        if !self.connected {
            return;
        }
        while let Some((msg, _)) = self.waiting.front() {
            let qos = msg.qos.min(self.max_qos);
            if qos != QoS::AtMostOnce && self.inflight.len() >= self.quota as usize {
                break;
            }
            let (mut msg, token) = self.waiting.pop_front().expect("front exists");
            msg.qos = qos;
            if qos == QoS::AtMostOnce {
                self.out.push_back(Out::Publish0(msg, token));
            } else {
                let pkid = self.alloc_pkid();
                self.next_seq += 1;
                self.out.push_back(Out::Publish { pkid, dup: false });
                self.inflight.insert(
                    pkid,
                    Inflight {
                        msg,
                        token,
                        stage: Stage::Published,
                        seq: self.next_seq,
                        written: false,
                        size: 0,
                        strikes: 0,
                    },
                );
            }
        }
    }

    fn alloc_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1);
            if self.next_pkid == 0 {
                self.next_pkid = 1;
            }
            let p = self.next_pkid;
            if !self.inflight.contains_key(&p) && self.sub_pkid != Some(p) {
                return p;
            }
        }
    }

    /// Encodes queued packets into `w.buf` until it holds `w.high_water` bytes or nothing is
    /// left. A publish larger than the broker accepts is given up alone
    /// ([`StateEvent::Undeliverable`]); the connection is fine.
    pub fn write_outgoing(&mut self, w: &mut Writer<'_>) -> Result<(), CodecError> {
        let max_packet = self.max_packet;
        while w.buf.len() < w.high_water {
            let Some(out) = self.out.pop_front() else {
                break;
            };
            let before = w.buf.len();
            match out {
                Out::Publish { pkid, dup } => {
                    let Some(e) = self.inflight.get_mut(&pkid) else {
                        continue;
                    };
                    match w.publish(pkid, dup, &e.msg, max_packet) {
                        Ok(()) => {
                            e.written = true;
                            e.size = w.buf.len() - before;
                        }
                        Err(CodecError::TooLarge { size, max }) => {
                            let e = self.inflight.remove(&pkid).expect("just found");
                            self.events.push(StateEvent::Undeliverable {
                                token: e.token,
                                topic: e.msg.topic.into(),
                                why: Undeliverable::TooLarge { size, max },
                            });
                            self.pump();
                        }
                        Err(e) => return Err(e),
                    }
                }
                Out::Publish0(msg, token) => match w.publish(0, false, &msg, max_packet) {
                    Ok(()) => w.qos0.push_back((w.base + w.buf.len() as u64, token)),
                    Err(CodecError::TooLarge { size, max }) => {
                        self.events.push(StateEvent::Undeliverable {
                            token,
                            topic: msg.topic.into(),
                            why: Undeliverable::TooLarge { size, max },
                        })
                    }
                    Err(e) => return Err(e),
                },
                Out::Subscribe(pkid) => codec::encode(
                    w.version,
                    &Outgoing::Subscribe {
                        pkid,
                        filters: self.subscriptions.clone(),
                    },
                    w.buf.bytes(),
                    max_packet,
                )?,
                Out::Packet(p) => {
                    codec::encode(w.version, &p, w.buf.bytes(), max_packet)?;
                    if matches!(p, Outgoing::PingReq) {
                        *w.ping_end = Some(w.base + w.buf.len() as u64);
                    }
                }
            }
        }
        Ok(())
    }

    /// The driver wrote a QoS 0 publish.
    pub fn confirm_written(&mut self, token: Token) {
        self.events.push(StateEvent::Delivered(token));
    }

    /// The application is done with an incoming message.
    pub fn ack(&mut self, ack: AckToken) {
        if ack.epoch != self.epoch {
            return;
        }
        if let Some(entry) = self
            .incoming
            .iter_mut()
            .find(|(p, _, done)| *p == ack.pkid && !*done)
        {
            entry.2 = true;
        }
        self.release_acks();
    }

    /// Sends the acks of the front of the arrival queue that the application is done with.
    fn release_acks(&mut self) {
        while let Some(&(pkid, qos, true)) = self.incoming.front() {
            self.incoming.pop_front();
            if qos == QoS::ExactlyOnce {
                self.awaiting_rel.insert(pkid);
                self.out.push_back(Out::Packet(Outgoing::PubRec(pkid)));
            } else {
                self.out.push_back(Out::Packet(Outgoing::PubAck(pkid)));
            }
        }
    }

    /// Queues a PINGREQ.
    pub fn ping(&mut self) {
        self.out.push_back(Out::Packet(Outgoing::PingReq));
    }

    /// Queues a DISCONNECT (normal); nothing is queued after it.
    pub fn disconnect(&mut self) {
        self.out.push_back(Out::Packet(Outgoing::Disconnect));
    }

    /// Handles one packet from the broker (CONNACK goes to [`Self::on_connack`]).
    pub fn on_incoming(&mut self, packet: Incoming) -> Result<(), StateError> {
        match packet {
            Incoming::Publish { pkid, dup, msg } => {
                if msg.qos != QoS::AtMostOnce && pkid == 0 {
                    return Err(StateError::Protocol(
                        "QoS > 0 publish with packet id 0".into(),
                    ));
                }
                if let Err(error) = topic::validate_name(&msg.topic) {
                    // Acknowledged (in order) so that the broker does not send it forever.
                    if msg.qos != QoS::AtMostOnce {
                        self.incoming.push_back((pkid, msg.qos, true));
                        self.release_acks();
                    }
                    self.events.push(StateEvent::InvalidTopic {
                        topic: msg.topic.chars().take(200).collect(),
                        error,
                    });
                    return Ok(());
                }
                match msg.qos {
                    QoS::AtMostOnce => self.events.push(StateEvent::Message {
                        msg,
                        ack: None,
                        dup,
                    }),
                    QoS::ExactlyOnce if self.awaiting_rel.contains(&pkid) => {
                        // Already accepted; the broker missed our PUBREC.
                        self.out.push_back(Out::Packet(Outgoing::PubRec(pkid)));
                    }
                    qos => {
                        self.incoming.push_back((pkid, qos, false));
                        self.events.push(StateEvent::Message {
                            msg,
                            ack: Some(AckToken {
                                epoch: self.epoch,
                                pkid,
                            }),
                            dup,
                        });
                    }
                }
            }
            Incoming::PubAck { pkid, code } => {
                if let Some(entry) = self.inflight.remove(&pkid) {
                    self.events.push(if code >= 0x80 {
                        StateEvent::Rejected(entry.token, code)
                    } else {
                        self.largest_delivered = self.largest_delivered.max(entry.size);
                        StateEvent::Delivered(entry.token)
                    });
                    self.pump();
                }
            }
            Incoming::PubRec { pkid, code } => {
                if code >= 0x80 {
                    if let Some(entry) = self.inflight.remove(&pkid) {
                        self.events.push(StateEvent::Rejected(entry.token, code));
                        self.pump();
                    }
                } else {
                    if let Some(entry) = self.inflight.get_mut(&pkid) {
                        entry.stage = Stage::Released;
                    }
                    // Reply even for an unknown pkid so the broker can release its state.
                    self.out.push_back(Out::Packet(Outgoing::PubRel(pkid)));
                }
            }
            Incoming::PubComp(pkid) => {
                if let Some(entry) = self.inflight.remove(&pkid) {
                    self.largest_delivered = self.largest_delivered.max(entry.size);
                    self.events.push(StateEvent::Delivered(entry.token));
                    self.pump();
                }
            }
            Incoming::PubRel(pkid) => {
                self.awaiting_rel.remove(&pkid);
                self.out.push_back(Out::Packet(Outgoing::PubComp(pkid)));
            }
            Incoming::SubAck { pkid, codes } => {
                if self.sub_pkid == Some(pkid) {
                    self.sub_pkid = None;
                    let result = self
                        .subscriptions
                        .iter()
                        .map(|f| f.filter.clone())
                        .zip(codes)
                        .collect();
                    self.events.push(StateEvent::Subscribed(result));
                }
            }
            Incoming::Disconnect(code) => return Err(StateError::Disconnected(code)),
            Incoming::Auth { reason, method } => {
                if !self.reauthenticating {
                    return Err(StateError::Protocol(format!(
                        "AUTH (reason {reason:#04x}) without a re-authentication in progress"
                    )));
                }
                if method.is_some() && method != self.auth_method {
                    return Err(StateError::Protocol(format!(
                        "AUTH names method {:?}, not the connection's {:?}",
                        method.unwrap_or_default(),
                        self.auth_method.clone().unwrap_or_default()
                    )));
                }
                match reason {
                    0x00 => {
                        self.reauthenticating = false;
                        self.events.push(StateEvent::Reauthenticated);
                    }
                    // A token method has no further step: the broker wants something else.
                    _ => {
                        return Err(StateError::Protocol(format!(
                            "the broker asked for a further authentication step (AUTH reason {reason:#04x}), which {} does not have",
                            self.auth_method.clone().unwrap_or_default()
                        )));
                    }
                }
            }
            Incoming::ConnAck(_) => {
                return Err(StateError::Protocol("unexpected second CONNACK".into()));
            }
            Incoming::PingResp | Incoming::Other => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ByteString;
    use bytes::Bytes;

    fn msg(qos: QoS) -> Message {
        Message {
            topic: "t".into(),
            payload: Bytes::from_static(b"x"),
            qos,
            retain: false,
            properties: Default::default(),
        }
    }

    fn connack(session_present: bool) -> ConnAckInfo {
        ConnAckInfo {
            session_present,
            ..Default::default()
        }
    }

    /// Writes everything queued and decodes it back as the broker would see it.
    fn sent(s: &mut SessionState) -> Vec<Incoming> {
        sent_with(s, &mut VecDeque::new())
    }

    fn sent_with(s: &mut SessionState, qos0: &mut VecDeque<(u64, Token)>) -> Vec<Incoming> {
        let mut out = OutBuf::default();
        let mut ping = None;
        s.write_outgoing(&mut Writer {
            version: Version::V5,
            buf: &mut out,
            share_from: crate::mqtt::outbuf::SHARE_FROM,
            high_water: usize::MAX,
            stamp: None,
            base: 0,
            qos0,
            ping_end: &mut ping,
        })
        .unwrap();
        let mut buf = out.to_bytes();
        let mut packets = Vec::new();
        // Client packets decoded with rumqttc's server-side reader.
        while !buf.is_empty() {
            use rumqttc::v5::mqttbytes::v5::Packet;
            // AUTH: rumqttc does not read it; ours does (same layout both ways).
            if buf[0] == 0xF0 {
                packets.push(
                    codec::decode(Version::V5, &mut buf, 1 << 20)
                        .unwrap()
                        .unwrap(),
                );
                continue;
            }
            let p = Packet::read(&mut buf, None).unwrap();
            packets.push(match p {
                Packet::Publish(p) => Incoming::Publish {
                    pkid: p.pkid,
                    dup: p.dup,
                    msg: Message {
                        topic: ByteString::try_from(p.topic).unwrap(),
                        payload: p.payload,
                        qos: QoS::from_u8(p.qos as u8).unwrap(),
                        retain: p.retain,
                        properties: Default::default(),
                    },
                },
                Packet::PubAck(a) => Incoming::PubAck {
                    pkid: a.pkid,
                    code: 0,
                },
                Packet::PubRec(a) => Incoming::PubRec {
                    pkid: a.pkid,
                    code: 0,
                },
                Packet::PubRel(a) => Incoming::PubRel(a.pkid),
                Packet::PubComp(a) => Incoming::PubComp(a.pkid),
                Packet::Subscribe(s) => Incoming::SubAck {
                    pkid: s.pkid,
                    codes: vec![],
                },
                _ => Incoming::Other,
            });
        }
        packets
    }

    fn published(packets: &[Incoming]) -> Vec<(u16, bool)> {
        packets
            .iter()
            .filter_map(|p| match p {
                Incoming::Publish { pkid, dup, .. } => Some((*pkid, *dup)),
                _ => None,
            })
            .collect()
    }

    fn publishes_with_qos(packets: &[Incoming]) -> Vec<(Token, QoS)> {
        packets
            .iter()
            .filter_map(|p| match p {
                Incoming::Publish { msg, .. } => Some((
                    String::from_utf8_lossy(&msg.payload).parse().unwrap_or(0),
                    msg.qos,
                )),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_qos1_publish_is_delivered_only_on_puback() {
        let mut s = SessionState::new(vec![], 10);
        s.on_connack(&connack(false)).unwrap();
        s.take_events();
        s.publish(msg(QoS::AtLeastOnce), 42);
        assert_eq!(published(&sent(&mut s)), vec![(1, false)]);
        assert!(
            s.take_events().is_empty(),
            "nothing is delivered before the ack"
        );
        s.on_incoming(Incoming::PubAck { pkid: 1, code: 0 })
            .unwrap();
        assert_eq!(s.take_events(), vec![StateEvent::Delivered(42)]);
    }

    #[test]
    fn a_qos0_publish_is_delivered_once_its_bytes_are_written() {
        let mut s = SessionState::new(vec![], 10);
        s.on_connack(&connack(false)).unwrap();
        s.take_events();
        s.publish(msg(QoS::AtMostOnce), 5);
        let mut qos0 = VecDeque::new();
        let packets = sent_with(&mut s, &mut qos0);
        assert_eq!(published(&packets), vec![(0, false)]);
        assert_eq!(qos0.len(), 1, "the driver confirms it when written");
        assert!(s.take_events().is_empty());
    }

    #[test]
    fn a_qos2_publish_is_delivered_only_on_pubcomp() {
        let mut s = SessionState::new(vec![], 10);
        s.on_connack(&connack(false)).unwrap();
        s.take_events();
        s.publish(msg(QoS::ExactlyOnce), 7);
        sent(&mut s);
        s.on_incoming(Incoming::PubRec { pkid: 1, code: 0 })
            .unwrap();
        assert_eq!(sent(&mut s), vec![Incoming::PubRel(1)]);
        assert!(s.take_events().is_empty());
        s.on_incoming(Incoming::PubComp(1)).unwrap();
        assert_eq!(s.take_events(), vec![StateEvent::Delivered(7)]);
    }

    #[test]
    fn a_refused_publish_is_reported_as_rejected() {
        let mut s = SessionState::new(vec![], 10);
        s.on_connack(&connack(false)).unwrap();
        s.take_events();
        s.publish(msg(QoS::AtLeastOnce), 1);
        s.on_incoming(Incoming::PubAck {
            pkid: 1,
            code: 0x87,
        })
        .unwrap();
        assert_eq!(s.take_events(), vec![StateEvent::Rejected(1, 0x87)]);
    }

    /// From 1 KiB a payload is queued as the buffer it arrived in (no copy), below it copied;
    /// both decode as sent, and a QoS 0 message's end is the stream offset after its payload.
    #[test]
    fn large_payloads_are_queued_where_they_are_and_small_ones_copied() {
        use crate::mqtt::outbuf::SHARE_FROM;
        let mut s = SessionState::new(vec![], 10);
        s.on_connack(&connack(false)).unwrap();
        s.take_events();
        let large = Bytes::from(vec![5u8; SHARE_FROM]);
        let small = Bytes::from(vec![6u8; SHARE_FROM - 1]);
        s.publish(
            Message {
                payload: large.clone(),
                ..msg(QoS::AtLeastOnce)
            },
            1,
        );
        s.publish(
            Message {
                payload: small.clone(),
                ..msg(QoS::AtMostOnce)
            },
            2,
        );
        let mut out = OutBuf::default();
        let mut qos0 = VecDeque::new();
        s.write_outgoing(&mut Writer {
            version: Version::V5,
            buf: &mut out,
            share_from: SHARE_FROM,
            high_water: usize::MAX,
            stamp: None,
            base: 100,
            qos0: &mut qos0,
            ping_end: &mut None,
        })
        .unwrap();
        let mut pieces = [std::io::IoSlice::new(&[]); 4];
        let n = out.pieces(&mut pieces);
        assert_eq!(
            n, 3,
            "header, the large payload itself, the small packet copied"
        );
        assert_eq!(pieces[1].as_ptr(), large.as_ptr());
        assert!(pieces[2].ends_with(&small));
        assert_eq!(qos0, [(100 + out.len() as u64, 2)]);
        let mut bytes = out.to_bytes();
        let payloads: Vec<_> =
            std::iter::from_fn(|| codec::decode(Version::V5, &mut bytes, 1 << 20).unwrap())
                .map(|p| match p {
                    Incoming::Publish { msg, .. } => msg.payload,
                    other => panic!("not a publish: {other:?}"),
                })
                .collect();
        assert_eq!(payloads, [large, small]);
    }

    #[test]
    fn publishes_beyond_the_quota_wait_for_acks() {
        let mut s = SessionState::new(vec![], 100);
        s.on_connack(&ConnAckInfo {
            receive_max: Some(2),
            ..Default::default()
        })
        .unwrap();
        for t in 0..5 {
            s.publish(msg(QoS::AtLeastOnce), t);
        }
        assert_eq!(published(&sent(&mut s)).len(), 2);
        assert_eq!(s.pending_publishes(), 5);
        s.on_incoming(Incoming::PubAck { pkid: 1, code: 0 })
            .unwrap();
        assert_eq!(published(&sent(&mut s)), vec![(3, false)]);
    }

    #[test]
    fn unacked_publishes_are_resent_with_dup_after_a_resumed_reconnect() {
        let mut s = SessionState::new(vec![], 10);
        s.on_connack(&connack(false)).unwrap();
        s.publish(msg(QoS::AtLeastOnce), 1);
        s.publish(msg(QoS::AtLeastOnce), 2);
        sent(&mut s);
        s.on_incoming(Incoming::PubAck { pkid: 1, code: 0 })
            .unwrap();
        s.on_disconnect(false);
        s.publish(msg(QoS::AtLeastOnce), 3);
        assert!(
            sent(&mut s).is_empty(),
            "nothing is sent while disconnected"
        );
        s.on_connack(&connack(true)).unwrap();
        assert_eq!(published(&sent(&mut s)), vec![(2, true), (3, false)]);
    }

    /// A session with four QoS 1 publishes written and unacknowledged (tokens and payloads
    /// 100 to 103) whose packet ids wrapped: 65534, 65535, 1, 2.
    fn four_in_flight_across_the_packet_id_wrap() -> SessionState {
        let mut s = SessionState::new(vec![], 10);
        s.on_connack(&connack(false)).unwrap();
        // Use up packet ids up to the wrap.
        for t in 0..65_533u64 {
            s.publish(msg(QoS::AtLeastOnce), t);
            let pkid = published(&sent(&mut s))[0].0;
            s.on_incoming(Incoming::PubAck { pkid, code: 0 }).unwrap();
        }
        s.take_events();
        for t in 100..104u64 {
            let mut m = msg(QoS::AtLeastOnce);
            m.payload = Bytes::from(t.to_string());
            s.publish(m, t);
        }
        let first: Vec<u16> = published(&sent(&mut s)).iter().map(|p| p.0).collect();
        assert_eq!(first, [65534, 65535, 1, 2]);
        s
    }

    #[test]
    fn resends_keep_the_original_order_when_packet_ids_wrapped() {
        let mut s = four_in_flight_across_the_packet_id_wrap();
        s.on_disconnect(false);
        s.on_connack(&connack(true)).unwrap();
        let again: Vec<Token> = publishes_with_qos(&sent(&mut s))
            .iter()
            .map(|p| p.0)
            .collect();
        assert_eq!(
            again,
            [100, 101, 102, 103],
            "first-sent order, not packet-id order"
        );
    }

    #[test]
    fn a_broker_that_grants_only_qos_0_gets_the_publishes_in_flight_in_first_sent_order() {
        let mut s = four_in_flight_across_the_packet_id_wrap();
        s.on_disconnect(false);
        s.on_connack(&ConnAckInfo {
            max_qos: Some(0),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            publishes_with_qos(&sent(&mut s)),
            [100, 101, 102, 103].map(|t| (t, QoS::AtMostOnce)),
            "first-sent order, at QoS 0"
        );
    }

    #[test]
    fn publishes_queued_before_the_first_connack_respect_the_brokers_maximum_qos() {
        let mut s = SessionState::new(vec![], 10);
        let mut m = msg(QoS::ExactlyOnce);
        m.payload = Bytes::from_static(b"1");
        s.publish(m, 1);
        s.on_connack(&ConnAckInfo {
            max_qos: Some(1),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            publishes_with_qos(&sent(&mut s)),
            [(1, QoS::AtLeastOnce)],
            "Event Grid's Maximum QoS is 1"
        );
    }

    #[test]
    fn a_released_qos2_publish_is_republished_when_the_session_was_lost() {
        let mut s = SessionState::new(vec![], 10);
        s.on_connack(&connack(false)).unwrap();
        s.publish(msg(QoS::ExactlyOnce), 9);
        sent(&mut s);
        s.on_incoming(Incoming::PubRec { pkid: 1, code: 0 })
            .unwrap();
        sent(&mut s);
        s.on_disconnect(false);
        s.on_connack(&connack(false)).unwrap();
        assert_eq!(published(&sent(&mut s)), vec![(1, false)]);
        s.on_disconnect(false);
        s.on_incoming(Incoming::PubRec { pkid: 1, code: 0 }).ok();
        s.on_connack(&connack(true)).unwrap();
        assert!(sent(&mut s).contains(&Incoming::PubRel(1)));
    }

    fn message_acks(s: &mut SessionState) -> Vec<AckToken> {
        s.take_events()
            .into_iter()
            .filter_map(|e| match e {
                StateEvent::Message { ack, .. } => ack,
                _ => None,
            })
            .collect()
    }

    #[test]
    fn incoming_acks_go_out_in_arrival_order() {
        let mut s = SessionState::new(vec![], 10);
        s.on_connack(&connack(false)).unwrap();
        s.take_events();
        for pkid in [5, 6, 7] {
            s.on_incoming(Incoming::Publish {
                pkid,
                dup: false,
                msg: msg(QoS::AtLeastOnce),
            })
            .unwrap();
        }
        let acks = message_acks(&mut s);
        s.ack(acks[2]);
        s.ack(acks[1]);
        assert!(sent(&mut s).is_empty(), "7 and 6 wait for 5");
        s.ack(acks[0]);
        let out: Vec<u16> = sent(&mut s)
            .into_iter()
            .map(|p| match p {
                Incoming::PubAck { pkid, .. } => pkid,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(out, vec![5, 6, 7]);
    }

    #[test]
    fn an_ack_from_a_previous_connection_is_ignored() {
        let mut s = SessionState::new(vec![], 10);
        s.on_connack(&connack(false)).unwrap();
        s.take_events();
        s.on_incoming(Incoming::Publish {
            pkid: 5,
            dup: false,
            msg: msg(QoS::AtLeastOnce),
        })
        .unwrap();
        let ack = message_acks(&mut s)[0];
        s.on_disconnect(false);
        s.on_connack(&connack(true)).unwrap();
        sent(&mut s);
        s.ack(ack);
        assert!(sent(&mut s).is_empty());
    }

    #[test]
    fn qos2_incoming_is_pubrec_on_ack_and_pubcomp_on_pubrel() {
        let mut s = SessionState::new(vec![], 10);
        s.on_connack(&connack(false)).unwrap();
        s.take_events();
        s.on_incoming(Incoming::Publish {
            pkid: 3,
            dup: false,
            msg: msg(QoS::ExactlyOnce),
        })
        .unwrap();
        let ack = message_acks(&mut s)[0];
        s.ack(ack);
        assert_eq!(sent(&mut s), vec![Incoming::PubRec { pkid: 3, code: 0 }]);
        // A redelivered copy before PUBREL is not a new message.
        s.on_incoming(Incoming::Publish {
            pkid: 3,
            dup: true,
            msg: msg(QoS::ExactlyOnce),
        })
        .unwrap();
        assert!(s.take_events().is_empty());
        sent(&mut s);
        s.on_incoming(Incoming::PubRel(3)).unwrap();
        assert_eq!(sent(&mut s), vec![Incoming::PubComp(3)]);
    }

    #[test]
    fn an_incoming_publish_with_a_wildcard_topic_is_acknowledged_and_dropped() {
        let mut s = SessionState::new(vec![], 10);
        s.on_connack(&connack(false)).unwrap();
        s.take_events();
        let mut bad = msg(QoS::AtLeastOnce);
        bad.topic = "x/#".into();
        s.on_incoming(Incoming::Publish {
            pkid: 4,
            dup: false,
            msg: bad,
        })
        .unwrap();
        assert_eq!(
            s.take_events(),
            vec![StateEvent::InvalidTopic {
                topic: "x/#".into(),
                error: TopicError::Wildcard
            }]
        );
        assert_eq!(sent(&mut s), vec![Incoming::PubAck { pkid: 4, code: 0 }]);
    }

    #[test]
    fn subscriptions_are_sent_on_every_connect() {
        let subs = vec![SubFilter {
            filter: "a/#".into(),
            qos: QoS::AtLeastOnce,
        }];
        let mut s = SessionState::new(subs, 10);
        s.on_connack(&connack(false)).unwrap();
        let Incoming::SubAck { pkid, .. } = sent(&mut s)[0] else {
            panic!()
        };
        s.on_incoming(Incoming::SubAck {
            pkid,
            codes: vec![1],
        })
        .unwrap();
        assert!(
            s.take_events()
                .contains(&StateEvent::Subscribed(vec![("a/#".into(), 1)]))
        );
        s.on_disconnect(false);
        s.on_connack(&connack(true)).unwrap();
        assert!(matches!(sent(&mut s)[0], Incoming::SubAck { .. }));
    }

    #[test]
    fn a_refused_connection_is_an_error() {
        let mut s = SessionState::new(vec![], 10);
        let err = s
            .on_connack(&ConnAckInfo {
                code: 0x87,
                reason: "NotAuthorized".into(),
                ..Default::default()
            })
            .unwrap_err();
        assert!(err.to_string().contains("NotAuthorized"));
    }

    #[test]
    fn a_publish_the_broker_disconnects_over_three_times_is_given_up_and_its_size_learned() {
        let mut s = SessionState::new(vec![], 10);
        let mut big = msg(QoS::AtLeastOnce);
        big.payload = Bytes::from(vec![0u8; 100_000]);
        s.on_connack(&connack(false)).unwrap();
        s.publish(big.clone(), 1);
        s.publish(msg(QoS::AtLeastOnce), 2);
        for strike in 1..=POISON_STRIKES {
            assert_eq!(published(&sent(&mut s)).len(), 2, "strike {strike}");
            s.take_events();
            s.on_disconnect(true);
            s.on_connack(&connack(false)).unwrap();
        }
        let events = s.take_events();
        assert!(
            events.iter().any(|e| matches!(
                e,
                StateEvent::Undeliverable {
                    token: 1,
                    why: Undeliverable::Poison { .. },
                    ..
                }
            )),
            "{events:?}"
        );
        // The small one goes on; a later message as large is refused without a reconnect.
        assert_eq!(published(&sent(&mut s)).len(), 1);
        s.publish(big, 3);
        sent(&mut s);
        assert!(s.take_events().iter().any(|e| matches!(
            e,
            StateEvent::Undeliverable {
                token: 3,
                why: Undeliverable::TooLarge { .. },
                ..
            }
        )));
    }

    #[test]
    fn an_outage_is_not_a_poison_message() {
        let mut s = SessionState::new(vec![], 10);
        s.on_connack(&connack(false)).unwrap();
        s.publish(msg(QoS::AtLeastOnce), 1);
        for _ in 0..10 {
            sent(&mut s);
            // The broker went away, not right after the publish.
            s.on_disconnect(false);
            s.on_connack(&connack(false)).unwrap();
        }
        assert_eq!(published(&sent(&mut s)).len(), 1, "still sent");
        s.take_events();
        // Two strikes, then an ack in between: the count starts over.
        s.on_disconnect(true);
        s.on_connack(&connack(false)).unwrap();
        sent(&mut s);
        s.on_disconnect(true);
        s.on_connack(&connack(false)).unwrap();
        sent(&mut s);
        s.on_disconnect(false);
        s.on_connack(&connack(false)).unwrap();
        sent(&mut s);
        s.on_disconnect(true);
        s.on_connack(&connack(false)).unwrap();
        assert_eq!(published(&sent(&mut s)).len(), 1);
        assert!(
            !s.take_events()
                .iter()
                .any(|e| matches!(e, StateEvent::Undeliverable { .. }))
        );
    }

    #[test]
    fn a_session_taken_over_says_so() {
        let e = StateError::Disconnected(0x8e).to_string();
        assert!(
            e.contains("0x8e") && e.contains("session taken over"),
            "{e}"
        );
        assert_eq!(
            StateError::Disconnected(0x00).to_string(),
            "broker sent DISCONNECT with reason code 0x00"
        );
    }

    fn granted(method: &str) -> ConnAckInfo {
        ConnAckInfo {
            auth_method: Some(method.into()),
            ..Default::default()
        }
    }

    #[test]
    fn re_authentication_sends_auth_0x19_and_keeps_the_inflight_publishes_on_the_connection() {
        let mut s = SessionState::new(vec![], 10);
        s.on_connack(&granted("OAUTH2-JWT")).unwrap();
        s.publish(msg(QoS::AtLeastOnce), 1);
        sent(&mut s);
        s.reauthenticate("OAUTH2-JWT", crate::secret::Secret::new("fresh"))
            .unwrap();
        assert_eq!(
            s.reauthenticate("OAUTH2-JWT", crate::secret::Secret::new("again")),
            Err(ReauthError::InProgress)
        );
        let out = sent(&mut s);
        assert_eq!(
            out,
            vec![Incoming::Auth {
                reason: 0x19,
                method: Some("OAUTH2-JWT".into())
            }]
        );
        s.on_incoming(Incoming::Auth {
            reason: 0,
            method: Some("OAUTH2-JWT".into()),
        })
        .unwrap();
        assert!(s.take_events().contains(&StateEvent::Reauthenticated));
        assert!(!s.is_reauthenticating());
        // The publish sent before is still waiting for its PUBACK on the same connection.
        s.on_incoming(Incoming::PubAck { pkid: 1, code: 0 })
            .unwrap();
        assert!(s.take_events().contains(&StateEvent::Delivered(1)));
    }

    #[test]
    fn re_authentication_needs_the_method_granted_in_connack() {
        let mut s = SessionState::new(vec![], 10);
        let token = || crate::secret::Secret::new("t");
        assert_eq!(
            s.reauthenticate("OAUTH2-JWT", token()),
            Err(ReauthError::NotConnected)
        );
        s.on_connack(&connack(false)).unwrap();
        assert!(matches!(
            s.reauthenticate("OAUTH2-JWT", token()),
            Err(ReauthError::NotGranted(_))
        ));
        s.on_disconnect(false);
        s.on_connack(&granted("K8S-SAT")).unwrap();
        assert!(s.reauthenticate("OAUTH2-JWT", token()).is_err());
        assert!(s.reauthenticate("K8S-SAT", token()).is_ok());
        // The connection ends before the answer: the next one starts afresh.
        s.on_disconnect(false);
        s.on_connack(&granted("K8S-SAT")).unwrap();
        assert!(!s.is_reauthenticating());
        assert!(s.reauthenticate("K8S-SAT", token()).is_ok());
    }

    #[test]
    fn an_auth_the_client_did_not_ask_for_or_a_further_step_ends_the_connection() {
        let mut s = SessionState::new(vec![], 10);
        s.on_connack(&granted("OAUTH2-JWT")).unwrap();
        let e = s
            .on_incoming(Incoming::Auth {
                reason: 0,
                method: None,
            })
            .unwrap_err();
        assert!(e.to_string().contains("without a re-authentication"), "{e}");
        s.reauthenticate("OAUTH2-JWT", crate::secret::Secret::new("t"))
            .unwrap();
        let e = s
            .on_incoming(Incoming::Auth {
                reason: 0x18,
                method: None,
            })
            .unwrap_err();
        assert!(e.to_string().contains("further authentication step"), "{e}");
        // A refusal is a DISCONNECT (§4.12.1): the connection ends, named.
        let mut s = SessionState::new(vec![], 10);
        s.on_connack(&granted("OAUTH2-JWT")).unwrap();
        s.reauthenticate("OAUTH2-JWT", crate::secret::Secret::new("t"))
            .unwrap();
        assert_eq!(
            s.on_incoming(Incoming::Disconnect(0x87)),
            Err(StateError::Disconnected(0x87))
        );
    }
}
