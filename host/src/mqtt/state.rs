//! Sans-I/O MQTT client session state.
//!
//! Methods only change state and queue "what to send" ([`SessionState::take_outgoing`]) and
//! "what happened" ([`SessionState::take_events`]); the driver in [`super::session`] owns the
//! socket and the timers. This is where the delivery guarantees live:
//!
//! - an outgoing QoS 1/2 publish is reported [`StateEvent::Delivered`] only on PUBACK /
//!   PUBCOMP from the broker; QoS 0 only once its bytes were written (the driver confirms);
//! - unacknowledged publishes are re-sent after a reconnect (DUP set when the session resumed);
//! - an incoming QoS 1/2 publish is acknowledged only when the application calls
//!   [`SessionState::ack`], and acknowledgements go out in the order the publishes arrived
//!   (MQTT 3.1.1 §4.6 requires it); an ack from an earlier connection is ignored, because the
//!   broker redelivers that message on the new one.

use std::collections::{BTreeMap, HashSet, VecDeque};

use super::codec::{ConnAckInfo, Incoming, Outgoing, SubFilter};
use crate::model::{Message, QoS};

/// Identifies an outgoing publish to the application (chosen by the caller).
pub type Token = u64;

/// Handle to acknowledge an incoming QoS 1/2 message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckToken {
    epoch: u64,
    pkid: u16,
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
    /// SUBACK: granted QoS or failure code per filter.
    Subscribed(Vec<(String, u8)>),
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
    #[error("broker sent DISCONNECT with reason code {0:#04x}")]
    Disconnected(u8),
    /// A packet that makes no sense at this point.
    #[error("protocol error: {0}")]
    Protocol(String),
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
    inflight: BTreeMap<u16, Inflight>,
    /// Publishes accepted while the quota was used up or while disconnected.
    waiting: VecDeque<(Message, Token)>,
    next_pkid: u16,
    /// Incoming QoS 1/2 pkids in arrival order, with "application acked" flags.
    incoming: VecDeque<(u16, QoS, bool)>,
    /// QoS 2 pkids we sent PUBREC for and await PUBREL.
    awaiting_rel: HashSet<u16>,
    subscriptions: Vec<SubFilter>,
    sub_pkid: Option<u16>,
    max_qos: QoS,
    out: Vec<(Outgoing, Option<Token>)>,
    events: Vec<StateEvent>,
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
            inflight: BTreeMap::new(),
            waiting: VecDeque::new(),
            next_pkid: 0,
            incoming: VecDeque::new(),
            awaiting_rel: HashSet::new(),
            subscriptions,
            sub_pkid: None,
            max_qos: QoS::ExactlyOnce,
            out: Vec::new(),
            events: Vec::new(),
        }
    }

    /// Packets to write, each with the token of a QoS 0 publish to confirm once written.
    pub fn take_outgoing(&mut self) -> Vec<(Outgoing, Option<Token>)> {
        std::mem::take(&mut self.out)
    }

    /// Like [`Self::take_outgoing`], into the driver's (empty) `spare` vector, so that the
    /// two vectors are reused turn after turn instead of allocated.
    pub fn swap_outgoing(&mut self, spare: &mut Vec<(Outgoing, Option<Token>)>) {
        debug_assert!(spare.is_empty());
        std::mem::swap(&mut self.out, spare);
    }

    /// Like [`Self::take_events`], into the driver's (empty) `spare` vector.
    pub fn swap_events(&mut self, spare: &mut Vec<StateEvent>) {
        debug_assert!(spare.is_empty());
        std::mem::swap(&mut self.events, spare);
    }

    /// Whether anything is waiting to be written.
    pub fn has_outgoing(&self) -> bool {
        !self.out.is_empty()
    }

    /// Events for the application.
    pub fn take_events(&mut self) -> Vec<StateEvent> {
        std::mem::take(&mut self.events)
    }

    /// Outgoing publishes not yet acknowledged by the broker (sent or waiting).
    pub fn pending_publishes(&self) -> usize {
        self.inflight.len() + self.waiting.len()
    }

    /// Handles CONNACK: re-sends what the last connection left unacknowledged and subscribes.
    pub fn on_connack(&mut self, info: &ConnAckInfo) -> Result<(), StateError> {
        if info.code != 0 {
            return Err(StateError::Refused {
                code: info.code,
                reason: info.reason.clone(),
            });
        }
        self.connected = true;
        self.quota = info
            .receive_max
            .unwrap_or(u16::MAX)
            .min(self.max_inflight)
            .max(1);
        self.max_qos = info
            .max_qos
            .and_then(QoS::from_u8)
            .unwrap_or(QoS::ExactlyOnce);
        let resumed = info.session_present;
        // Re-send in packet-id order of the original sends is not guaranteed by BTreeMap order
        // after wrap-around, but MQTT only requires order per QoS flow, which holds per pkid.
        let pkids: Vec<u16> = self.inflight.keys().copied().collect();
        for pkid in pkids {
            let entry = self.inflight.get_mut(&pkid).expect("key from map");
            if resumed && entry.stage == Stage::Released {
                self.out.push((Outgoing::PubRel(pkid), None));
            } else {
                // A new session lost the QoS 2 state: publish again (a duplicate is possible,
                // a loss is not).
                entry.stage = Stage::Published;
                self.out.push((
                    Outgoing::Publish {
                        pkid,
                        dup: resumed,
                        msg: entry.msg.clone(),
                    },
                    None,
                ));
            }
        }
        if !self.subscriptions.is_empty() {
            let pkid = self.alloc_pkid();
            self.sub_pkid = Some(pkid);
            self.out.push((
                Outgoing::Subscribe {
                    pkid,
                    filters: self.subscriptions.clone(),
                },
                None,
            ));
        }
        self.events.push(StateEvent::Connected {
            session_present: resumed,
        });
        self.pump();
        Ok(())
    }

    /// The connection is gone: acks of its messages are void, unacknowledged publishes wait
    /// for the next connection.
    pub fn on_disconnect(&mut self) {
        self.connected = false;
        self.epoch += 1;
        self.incoming.clear();
        self.awaiting_rel.clear();
        self.sub_pkid = None;
        // Anything queued but not written (acks, pings) belongs to the dead connection; QoS 0
        // publishes among them are lost with it and are not confirmed.
        self.out.clear();
    }

    /// Queues a publish. QoS 1/2 beyond the broker's quota wait in order.
    pub fn publish(&mut self, mut msg: Message, token: Token) {
        if msg.qos > self.max_qos {
            msg.qos = self.max_qos;
        }
        self.waiting.push_back((msg, token));
        self.pump();
    }

    fn pump(&mut self) {
        if !self.connected {
            return;
        }
        while let Some((msg, _)) = self.waiting.front() {
            if msg.qos != QoS::AtMostOnce && self.inflight.len() >= self.quota as usize {
                break;
            }
            let (msg, token) = self.waiting.pop_front().expect("front exists");
            if msg.qos == QoS::AtMostOnce {
                self.out.push((
                    Outgoing::Publish {
                        pkid: 0,
                        dup: false,
                        msg,
                    },
                    Some(token),
                ));
            } else {
                let pkid = self.alloc_pkid();
                self.out.push((
                    Outgoing::Publish {
                        pkid,
                        dup: false,
                        msg: msg.clone(),
                    },
                    None,
                ));
                self.inflight.insert(
                    pkid,
                    Inflight {
                        msg,
                        token,
                        stage: Stage::Published,
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

    /// The driver could not send a publish it took from [`Self::take_outgoing`] (e.g. larger
    /// than the broker accepts): it is given up with reason `code` and reported as
    /// [`StateEvent::Rejected`]. `token` is the one that came with the packet (QoS 0); QoS 1/2
    /// publishes are found by `pkid`.
    pub fn refuse_publish(&mut self, pkid: u16, token: Option<Token>, code: u8) {
        let token = token.or_else(|| self.inflight.remove(&pkid).map(|e| e.token));
        if let Some(token) = token {
            self.events.push(StateEvent::Rejected(token, code));
            self.pump();
        }
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
        while let Some(&(pkid, qos, true)) = self.incoming.front() {
            self.incoming.pop_front();
            if qos == QoS::ExactlyOnce {
                self.awaiting_rel.insert(pkid);
                self.out.push((Outgoing::PubRec(pkid), None));
            } else {
                self.out.push((Outgoing::PubAck(pkid), None));
            }
        }
    }

    /// Queues a PINGREQ.
    pub fn ping(&mut self) {
        self.out.push((Outgoing::PingReq, None));
    }

    /// Handles one packet from the broker (CONNACK goes to [`Self::on_connack`]).
    pub fn on_incoming(&mut self, packet: Incoming) -> Result<(), StateError> {
        match packet {
            Incoming::Publish { pkid, dup, msg } => match msg.qos {
                QoS::AtMostOnce => self.events.push(StateEvent::Message {
                    msg,
                    ack: None,
                    dup,
                }),
                QoS::ExactlyOnce if self.awaiting_rel.contains(&pkid) => {
                    // Already accepted; the broker missed our PUBREC.
                    self.out.push((Outgoing::PubRec(pkid), None));
                }
                qos => {
                    if pkid == 0 {
                        return Err(StateError::Protocol(
                            "QoS > 0 publish with packet id 0".into(),
                        ));
                    }
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
            },
            Incoming::PubAck { pkid, code } => {
                if let Some(entry) = self.inflight.remove(&pkid) {
                    self.events.push(if code >= 0x80 {
                        StateEvent::Rejected(entry.token, code)
                    } else {
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
                    self.out.push((Outgoing::PubRel(pkid), None));
                }
            }
            Incoming::PubComp(pkid) => {
                if let Some(entry) = self.inflight.remove(&pkid) {
                    self.events.push(StateEvent::Delivered(entry.token));
                    self.pump();
                }
            }
            Incoming::PubRel(pkid) => {
                self.awaiting_rel.remove(&pkid);
                self.out.push((Outgoing::PubComp(pkid), None));
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

    fn published_pkids(out: &[(Outgoing, Option<Token>)]) -> Vec<(u16, bool)> {
        out.iter()
            .filter_map(|(o, _)| match o {
                Outgoing::Publish { pkid, dup, .. } => Some((*pkid, *dup)),
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
        let out = s.take_outgoing();
        assert_eq!(published_pkids(&out), vec![(1, false)]);
        assert!(
            s.take_events().is_empty(),
            "nothing is delivered before the ack"
        );
        s.on_incoming(Incoming::PubAck { pkid: 1, code: 0 })
            .unwrap();
        assert_eq!(s.take_events(), vec![StateEvent::Delivered(42)]);
    }

    #[test]
    fn a_qos2_publish_is_delivered_only_on_pubcomp() {
        let mut s = SessionState::new(vec![], 10);
        s.on_connack(&connack(false)).unwrap();
        s.take_events();
        s.publish(msg(QoS::ExactlyOnce), 7);
        s.take_outgoing();
        s.on_incoming(Incoming::PubRec { pkid: 1, code: 0 })
            .unwrap();
        assert!(matches!(s.take_outgoing()[0].0, Outgoing::PubRel(1)));
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
        assert_eq!(published_pkids(&s.take_outgoing()).len(), 2);
        assert_eq!(s.pending_publishes(), 5);
        s.on_incoming(Incoming::PubAck { pkid: 1, code: 0 })
            .unwrap();
        assert_eq!(published_pkids(&s.take_outgoing()), vec![(3, false)]);
    }

    #[test]
    fn unacked_publishes_are_resent_with_dup_after_a_resumed_reconnect() {
        let mut s = SessionState::new(vec![], 10);
        s.on_connack(&connack(false)).unwrap();
        s.publish(msg(QoS::AtLeastOnce), 1);
        s.publish(msg(QoS::AtLeastOnce), 2);
        s.take_outgoing();
        s.on_incoming(Incoming::PubAck { pkid: 1, code: 0 })
            .unwrap();
        s.on_disconnect();
        s.publish(msg(QoS::AtLeastOnce), 3);
        assert!(
            s.take_outgoing().is_empty(),
            "nothing is sent while disconnected"
        );
        s.on_connack(&connack(true)).unwrap();
        assert_eq!(
            published_pkids(&s.take_outgoing()),
            vec![(2, true), (3, false)]
        );
    }

    #[test]
    fn a_released_qos2_publish_is_republished_when_the_session_was_lost() {
        let mut s = SessionState::new(vec![], 10);
        s.on_connack(&connack(false)).unwrap();
        s.publish(msg(QoS::ExactlyOnce), 9);
        s.on_incoming(Incoming::PubRec { pkid: 1, code: 0 })
            .unwrap();
        s.take_outgoing();
        s.on_disconnect();
        s.on_connack(&connack(false)).unwrap();
        assert_eq!(published_pkids(&s.take_outgoing()), vec![(1, false)]);
        s.on_disconnect();
        s.on_incoming(Incoming::PubRec { pkid: 1, code: 0 }).ok();
        s.on_connack(&connack(true)).unwrap();
        assert!(
            s.take_outgoing()
                .iter()
                .any(|(o, _)| matches!(o, Outgoing::PubRel(1)))
        );
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
        let acks: Vec<AckToken> = s
            .take_events()
            .into_iter()
            .filter_map(|e| match e {
                StateEvent::Message { ack, .. } => ack,
                _ => None,
            })
            .collect();
        s.ack(acks[2]);
        s.ack(acks[1]);
        assert!(s.take_outgoing().is_empty(), "7 and 6 wait for 5");
        s.ack(acks[0]);
        let out: Vec<u16> = s
            .take_outgoing()
            .into_iter()
            .map(|(o, _)| match o {
                Outgoing::PubAck(p) => p,
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
        let Some(StateEvent::Message { ack: Some(ack), .. }) = s.take_events().pop() else {
            panic!()
        };
        s.on_disconnect();
        s.on_connack(&connack(true)).unwrap();
        s.take_outgoing();
        s.ack(ack);
        assert!(s.take_outgoing().is_empty());
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
        let Some(StateEvent::Message { ack: Some(ack), .. }) = s.take_events().pop() else {
            panic!()
        };
        s.ack(ack);
        assert!(matches!(s.take_outgoing()[0].0, Outgoing::PubRec(3)));
        // A redelivered copy before PUBREL is not a new message.
        s.on_incoming(Incoming::Publish {
            pkid: 3,
            dup: true,
            msg: msg(QoS::ExactlyOnce),
        })
        .unwrap();
        assert!(s.take_events().is_empty());
        s.take_outgoing();
        s.on_incoming(Incoming::PubRel(3)).unwrap();
        assert!(matches!(s.take_outgoing()[0].0, Outgoing::PubComp(3)));
    }

    #[test]
    fn subscriptions_are_sent_on_every_connect() {
        let subs = vec![SubFilter {
            filter: "a/#".into(),
            qos: QoS::AtLeastOnce,
        }];
        let mut s = SessionState::new(subs, 10);
        s.on_connack(&connack(false)).unwrap();
        let out = s.take_outgoing();
        let Outgoing::Subscribe { pkid, .. } = out[0].0 else {
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
        s.on_disconnect();
        s.on_connack(&connack(true)).unwrap();
        assert!(matches!(s.take_outgoing()[0].0, Outgoing::Subscribe { .. }));
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
}
