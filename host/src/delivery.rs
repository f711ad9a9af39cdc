//! The delivery ledger of a route client (sans-I/O): which source message each forwarded copy
//! belongs to, and when a source message may be acknowledged.
//!
//! A source message forwarded as one copy (the usual case) waits on that copy alone; the
//! copies of a fanned-out message share a group, and the source message is acknowledged when
//! the last copy is settled (acknowledged by the target, or refused by it). The ledger returns
//! the acknowledgement as a value; the source session sends acknowledgements in arrival order
//! whatever order they are returned in (see [`crate::mqtt::state`]). Never is a message
//! acknowledged to its source before every copy was settled.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::ops::Range;
use std::time::Instant;

use crate::mqtt::{AckToken, Token};

/// Hashes the numbers this module gives its own records (tokens, group and input ids) with one
/// multiplication (the Fx hash): no peer chooses them, so SipHash's defence against chosen
/// keys buys nothing here, and it was one of the per-message costs in profiles.
#[derive(Debug, Default, Clone, Copy)]
pub struct SeqHasher(u64);

impl Hasher for SeqHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

/// A map keyed by a number this module assigned.
type SeqMap<V> = HashMap<u64, V, BuildHasherDefault<SeqHasher>>;

/// What settling a copy completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// Not a copy this ledger waits for (already settled, or never forwarded).
    Unknown,
    /// A copy of a group whose other copies are still waiting.
    Copy,
    /// The last copy: the source message is done; acknowledge it with `ack` (QoS 1/2).
    Message {
        /// The source acknowledgement, if the message had one.
        ack: Option<AckToken>,
        /// When the source message was received.
        since: Instant,
    },
    /// The last copy of messages published for held source messages (a window's result, or
    /// a message an aggregator also held): each of these [`Held`] inputs has one obligation
    /// fewer.
    Inputs {
        /// The inputs.
        ids: Vec<u64>,
        /// When the messages were published.
        since: Instant,
    },
}

#[derive(Debug)]
enum Waiting {
    /// The only copy of a source message, and its size in bytes.
    Single(Option<AckToken>, Instant, usize),
    /// One copy of a group, and its size in bytes.
    Copy(u64, usize),
}

#[derive(Debug)]
struct Group {
    left: usize,
    ack: Option<AckToken>,
    since: Instant,
    /// [`Held`] inputs the group stands for (then `ack` is `None`).
    inputs: Vec<u64>,
}

/// How many tokens the ring of [`Waits`] may span at least; it may span up to four times the
/// copies waiting if that is more. A copy still waiting when the ring would span more moves to
/// the stragglers. Copies settled in about the order they were forwarded never move (a route
/// keeps at most about twice its `--max-inflight` copies waiting, 4,096 by default); a copy
/// its target never settles costs one map entry, and the ring stays within 16,384 slots of at
/// most 64 bytes (1 MiB) or four times what waits, instead of growing with every message
/// after it.
const RING_MIN_SPAN: usize = 16_384;

/// The copies waiting, by token. Tokens are handed out in order and mostly settled in
/// order, so the copies sit in a ring indexed by `token - base`: an insert and a settle are a
/// push and an index, no hashing, the cost the hash map had in 4 KiB profiles (issue #17). A
/// copy settled out of order leaves a hole until the copies before it are settled.
#[derive(Debug, Default)]
struct Waits {
    /// Slot `i` holds the copy with token `base + i` (`None`: settled).
    ring: VecDeque<Option<Waiting>>,
    /// The token of `ring[0]`.
    base: Token,
    /// Copies with a token below `base`: waiting when the ring moved on ([`RING_MIN_SPAN`]).
    stragglers: SeqMap<Waiting>,
    /// Copies waiting, in the ring and among the stragglers.
    live: usize,
}

impl Waits {
    /// Records the copy with `token`, the token after the last one recorded.
    fn insert(&mut self, token: Token, w: Waiting) {
        if self.ring.is_empty() {
            self.base = token;
        }
        debug_assert_eq!(
            token,
            self.base + self.ring.len() as Token,
            "tokens are recorded in order"
        );
        self.ring.push_back(Some(w));
        self.live += 1;
        let span = RING_MIN_SPAN.max(4 * self.live);
        while self.ring.len() > span {
            if let Some(Some(w)) = self.ring.pop_front() {
                self.stragglers.insert(self.base, w);
            }
            self.base += 1;
            self.trim();
        }
    }

    /// The copy with `token`, removed; `None` if it is not waiting.
    fn remove(&mut self, token: Token) -> Option<Waiting> {
        let w = if token < self.base {
            self.stragglers.remove(&token)
        } else {
            let w = self.ring.get_mut((token - self.base) as usize)?.take();
            self.trim();
            w
        };
        if w.is_some() {
            self.live -= 1;
        }
        w
    }

    /// Drops the settled slots at the front.
    fn trim(&mut self) {
        while let Some(None) = self.ring.front() {
            self.ring.pop_front();
            self.base += 1;
        }
    }
}

/// The ledger (see the module docs).
#[derive(Debug, Default)]
pub struct Ledger {
    waiting: Waits,
    groups: SeqMap<Group>,
    next_token: Token,
    next_group: u64,
    /// Bytes of the copies waiting.
    bytes: usize,
}

impl Ledger {
    /// Records a source message (received at `since`, acknowledged with `ack`) forwarded as
    /// `copies` messages (at least one); returns the tokens to publish the copies with.
    pub fn forward(
        &mut self,
        copies: usize,
        ack: Option<AckToken>,
        since: Instant,
    ) -> Range<Token> {
        self.forward_sized(&vec![0; copies], ack, since)
    }

    /// [`Ledger::forward`] with the size in bytes of each copy (counted in [`Ledger::bytes`]
    /// until it is settled).
    pub fn forward_sized(
        &mut self,
        sizes: &[usize],
        ack: Option<AckToken>,
        since: Instant,
    ) -> Range<Token> {
        let copies = sizes.len();
        debug_assert!(
            copies > 0,
            "a message forwarded as nothing is handled, not forwarded"
        );
        let first = self.next_token + 1;
        self.next_token += copies as Token;
        self.bytes += sizes.iter().sum::<usize>();
        if copies == 1 {
            self.waiting
                .insert(first, Waiting::Single(ack, since, sizes[0]));
        } else {
            self.next_group += 1;
            let group = self.next_group;
            self.groups.insert(
                group,
                Group {
                    left: copies,
                    ack,
                    since,
                    inputs: Vec::new(),
                },
            );
            for (t, size) in (first..=self.next_token).zip(sizes) {
                self.waiting.insert(t, Waiting::Copy(group, *size));
            }
        }
        first..self.next_token + 1
    }

    /// Records messages published for the [`Held`] inputs `ids` (at least one message);
    /// settling the last one returns [`Settled::Inputs`]. The tokens to publish them with.
    pub fn forward_for_inputs(
        &mut self,
        sizes: &[usize],
        ids: Vec<u64>,
        since: Instant,
    ) -> Range<Token> {
        debug_assert!(!sizes.is_empty());
        let first = self.next_token + 1;
        self.next_token += sizes.len() as Token;
        self.bytes += sizes.iter().sum::<usize>();
        self.next_group += 1;
        let group = self.next_group;
        self.groups.insert(
            group,
            Group {
                left: sizes.len(),
                ack: None,
                since,
                inputs: ids,
            },
        );
        for (t, size) in (first..=self.next_token).zip(sizes) {
            self.waiting.insert(t, Waiting::Copy(group, *size));
        }
        first..self.next_token + 1
    }

    /// A copy was acknowledged or refused by the target.
    pub fn settle(&mut self, token: Token) -> Settled {
        match self.waiting.remove(token) {
            None => Settled::Unknown,
            Some(Waiting::Single(ack, since, size)) => {
                self.bytes -= size;
                Settled::Message { ack, since }
            }
            Some(Waiting::Copy(group, size)) => {
                self.bytes -= size;
                let g = self.groups.get_mut(&group).expect("a copy's group exists");
                g.left -= 1;
                if g.left > 0 {
                    return Settled::Copy;
                }
                let g = self.groups.remove(&group).expect("just found");
                if !g.inputs.is_empty() {
                    return Settled::Inputs {
                        ids: g.inputs,
                        since: g.since,
                    };
                }
                Settled::Message {
                    ack: g.ack,
                    since: g.since,
                }
            }
        }
    }

    /// Copies forwarded and not yet settled.
    pub fn len(&self) -> usize {
        self.waiting.live
    }

    /// Bytes of the copies forwarded and not yet settled.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.waiting.live == 0
    }
}

/// Source messages an aggregator holds in windows, each with the obligations left before it
/// may be acknowledged: one per window holding it, one per group of messages published for
/// it. A window's release turns its hold into the obligations of what the release published
/// (or none). Sans-I/O, like the ledger.
#[derive(Debug, Default)]
pub struct Held {
    inputs: SeqMap<HeldInput>,
    windows: HashMap<(usize, String), Vec<u64>>,
    next: u64,
    /// Inputs with an acknowledgement (QoS 1/2) not yet done.
    acked: usize,
}

#[derive(Debug)]
struct HeldInput {
    ack: Option<AckToken>,
    left: usize,
}

impl Held {
    /// A source message with `obligations` (≥ 1) to meet; its id.
    pub fn input(&mut self, ack: Option<AckToken>, obligations: usize) -> u64 {
        self.next += 1;
        if ack.is_some() {
            self.acked += 1;
        }
        self.inputs.insert(
            self.next,
            HeldInput {
                ack,
                left: obligations.max(1),
            },
        );
        self.next
    }

    /// `id` is held in window `key`.
    pub fn park(&mut self, id: u64, key: (usize, String)) {
        self.windows.entry(key).or_default().push(id);
    }

    /// The inputs window `key` held, taken (the window is empty again).
    pub fn release(&mut self, key: &(usize, String)) -> Vec<u64> {
        self.windows.remove(key).unwrap_or_default()
    }

    /// Adds `n` obligations to `id`.
    pub fn add(&mut self, id: u64, n: usize) {
        if let Some(i) = self.inputs.get_mut(&id) {
            i.left += n;
        }
    }

    /// One obligation of `id` is met; its acknowledgement when that was the last (`Some(None)`
    /// for a QoS 0 message), `None` while some are left or for an unknown id.
    pub fn done(&mut self, id: u64) -> Option<Option<AckToken>> {
        let i = self.inputs.get_mut(&id)?;
        i.left -= 1;
        if i.left > 0 {
            return None;
        }
        let i = self.inputs.remove(&id).expect("just seen");
        if i.ack.is_some() {
            self.acked -= 1;
        }
        Some(i.ack)
    }

    /// QoS 1/2 messages held (they hold back their source's later acknowledgements).
    pub fn holding(&self) -> usize {
        self.acked
    }

    /// Messages held in windows.
    pub fn len(&self) -> usize {
        self.inputs.len()
    }

    /// Nothing is held.
    pub fn is_empty(&self) -> bool {
        self.inputs.is_empty()
    }

    /// Forgets everything (the source reconnects: what was held comes again).
    pub fn clear(&mut self) {
        *self = Held {
            next: self.next,
            ..Held::default()
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Message, QoS};
    use crate::mqtt::codec::{ConnAckInfo, Incoming};
    use crate::mqtt::state::{SessionState, StateEvent};

    #[test]
    fn sequential_keys_spread_over_the_hash_bits() {
        use std::hash::BuildHasher;
        let b = BuildHasherDefault::<SeqHasher>::default();
        let hashes: std::collections::HashSet<u64> =
            (0..10_000u64).map(|k| b.hash_one(k)).collect();
        assert_eq!(hashes.len(), 10_000);
        // hashbrown takes its 7-bit tags from the top bits: they differ across neighbours.
        let tags: std::collections::HashSet<u64> =
            (0..1_000u64).map(|k| b.hash_one(k) >> 57).collect();
        assert!(tags.len() > 100, "{} distinct tags", tags.len());
    }

    /// A source session that received `n` QoS 1 messages (packet ids 1..=n); their acks.
    fn source_with(n: u16) -> (SessionState, Vec<AckToken>) {
        let mut s = SessionState::new(vec![], 100);
        s.on_connack(&ConnAckInfo::default()).unwrap();
        for pkid in 1..=n {
            s.on_incoming(Incoming::Publish {
                pkid,
                dup: false,
                msg: Message {
                    topic: "t".into(),
                    payload: Default::default(),
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    properties: Default::default(),
                },
            })
            .unwrap();
        }
        let acks = s
            .take_events()
            .into_iter()
            .filter_map(|e| match e {
                StateEvent::Message { ack, .. } => ack,
                _ => None,
            })
            .collect();
        (s, acks)
    }

    /// The PUBACKs the source session would write now.
    fn pubacks(s: &mut SessionState) -> Vec<u16> {
        use crate::mqtt::state::Writer;
        let mut out = crate::mqtt::outbuf::OutBuf::default();
        s.write_outgoing(&mut Writer {
            version: crate::mqtt::Version::V5,
            buf: &mut out,
            share_from: usize::MAX,
            high_water: usize::MAX,
            stamp: None,
            base: 0,
            qos0: &mut Default::default(),
            ping_end: &mut None,
        })
        .unwrap();
        let mut buf = out.to_bytes();
        let mut out = vec![];
        while !buf.is_empty() {
            if let rumqttc::v5::mqttbytes::v5::Packet::PubAck(a) =
                rumqttc::v5::mqttbytes::v5::Packet::read(&mut buf, None).unwrap()
            {
                out.push(a.pkid);
            }
        }
        out
    }

    fn ack_of(s: Settled) -> Option<AckToken> {
        match s {
            Settled::Message { ack, .. } => ack,
            _ => None,
        }
    }

    #[test]
    fn a_single_copy_acknowledges_its_message_when_settled() {
        let (mut src, acks) = source_with(1);
        let mut l = Ledger::default();
        let t = l.forward(1, Some(acks[0]), Instant::now());
        assert_eq!(t.clone().count(), 1);
        assert_eq!(l.len(), 1);
        assert!(
            pubacks(&mut src).is_empty(),
            "nothing acknowledged before the target"
        );
        src.ack(ack_of(l.settle(t.start)).unwrap());
        assert_eq!(pubacks(&mut src), [1]);
        assert!(l.is_empty());
        assert_eq!(l.settle(t.start), Settled::Unknown, "settled once");
    }

    #[test]
    fn a_fanned_out_message_is_acknowledged_after_its_last_copy() {
        let (mut src, acks) = source_with(1);
        let mut l = Ledger::default();
        let tokens: Vec<Token> = l.forward(3, Some(acks[0]), Instant::now()).collect();
        assert_eq!(l.settle(tokens[2]), Settled::Copy);
        assert_eq!(l.settle(tokens[0]), Settled::Copy);
        assert!(pubacks(&mut src).is_empty());
        src.ack(ack_of(l.settle(tokens[1])).unwrap());
        assert_eq!(pubacks(&mut src), [1]);
    }

    #[test]
    fn acks_settled_out_of_order_go_to_the_source_in_arrival_order() {
        let (mut src, acks) = source_with(3);
        let mut l = Ledger::default();
        let now = Instant::now();
        let t: Vec<Token> = acks
            .iter()
            .map(|a| l.forward(1, Some(*a), now).start)
            .collect();
        src.ack(ack_of(l.settle(t[2])).unwrap());
        src.ack(ack_of(l.settle(t[1])).unwrap());
        assert!(pubacks(&mut src).is_empty(), "3 and 2 wait for 1");
        src.ack(ack_of(l.settle(t[0])).unwrap());
        assert_eq!(pubacks(&mut src), [1, 2, 3]);
    }

    #[test]
    fn a_dropped_message_is_acknowledged_without_the_ledger_and_does_not_block_others() {
        // A message a plugin dropped (or that was dead-lettered and its dead letter
        // acknowledged) is handled: its ack goes straight to the source, in order.
        let (mut src, acks) = source_with(2);
        let mut l = Ledger::default();
        let t = l.forward(1, Some(acks[1]), Instant::now());
        src.ack(acks[0]);
        assert_eq!(pubacks(&mut src), [1]);
        src.ack(ack_of(l.settle(t.start)).unwrap());
        assert_eq!(pubacks(&mut src), [2]);
    }

    #[test]
    fn a_refused_copy_still_completes_its_group() {
        let (mut src, acks) = source_with(1);
        let mut l = Ledger::default();
        let tokens: Vec<Token> = l.forward(2, Some(acks[0]), Instant::now()).collect();
        // The target refused the first copy (e.g. not authorized): settled all the same.
        assert_eq!(l.settle(tokens[0]), Settled::Copy);
        src.ack(ack_of(l.settle(tokens[1])).unwrap());
        assert_eq!(pubacks(&mut src), [1]);
    }

    #[test]
    fn after_a_source_reconnect_old_acks_are_void_and_the_redelivery_is_acknowledged() {
        let (mut src, acks) = source_with(1);
        let mut l = Ledger::default();
        let first = l.forward(1, Some(acks[0]), Instant::now());
        // The source connection drops before the target acknowledged: the broker keeps the
        // message and redelivers it on the next connection.
        src.on_disconnect(false);
        src.on_connack(&ConnAckInfo {
            session_present: true,
            ..Default::default()
        })
        .unwrap();
        src.take_events();
        src.on_incoming(Incoming::Publish {
            pkid: 1,
            dup: true,
            msg: Message {
                topic: "t".into(),
                payload: Default::default(),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: Default::default(),
            },
        })
        .unwrap();
        let redelivered = match src.take_events().pop() {
            Some(StateEvent::Message { ack: Some(a), .. }) => a,
            other => panic!("{other:?}"),
        };
        let second = l.forward(1, Some(redelivered), Instant::now());
        src.ack(ack_of(l.settle(first.start)).unwrap());
        assert!(
            pubacks(&mut src).is_empty(),
            "the first connection's ack is void"
        );
        src.ack(ack_of(l.settle(second.start)).unwrap());
        assert_eq!(
            pubacks(&mut src),
            [1],
            "the redelivered copy is acknowledged"
        );
    }

    /// The ring against a plain map of the same records: tokens settled in a scrambled order,
    /// twice, and tokens never recorded, with the ring's span crossed so that copies move to
    /// the stragglers and are still found.
    #[test]
    fn the_ring_finds_every_copy_once_in_any_settling_order_and_past_its_span() {
        assert!(
            std::mem::size_of::<Option<Waiting>>() <= 64,
            "a slot as documented"
        );
        let mut l = Ledger::default();
        let mut model = std::collections::BTreeMap::new();
        let now = Instant::now();
        // A stuck copy: the first, settled only at the end, after the ring moved past it.
        let stuck = l.forward_sized(&[7], None, now).start;
        model.insert(stuck, 7);
        let mut rng = fastrand::Rng::with_seed(0x2545_f491_4f6c_dd1d);
        for round in 0..(RING_MIN_SPAN as u64 / 256 + 8) {
            for _ in 0..1_000 {
                let size = rng.usize(..100);
                let t = l.forward_sized(&[size], None, now).start;
                model.insert(t, size);
            }
            // Settle about half of what waits, in a scrambled order, some twice, and tokens
            // never handed out.
            let keys: Vec<Token> = model.keys().copied().filter(|t| *t != stuck).collect();
            for _ in 0..keys.len() / 2 {
                let t = keys[rng.usize(..keys.len())];
                let expect = model.remove(&t);
                match l.settle(t) {
                    Settled::Message { .. } => assert!(expect.is_some(), "token {t} settled twice"),
                    Settled::Unknown => assert!(expect.is_none(), "token {t} lost"),
                    other => panic!("{other:?}"),
                }
            }
            assert_eq!(l.settle(l.next_token + 1 + round), Settled::Unknown);
            assert_eq!(l.len(), model.len());
            assert_eq!(l.bytes(), model.values().sum::<usize>());
            assert!(
                l.waiting.ring.len() <= RING_MIN_SPAN.max(4 * l.len()),
                "the ring is bounded"
            );
        }
        assert!(
            !l.waiting.stragglers.is_empty(),
            "the run crossed the ring's span: copies moved to the stragglers"
        );
        assert!(matches!(l.settle(stuck), Settled::Message { .. }));
        model.remove(&stuck);
        for t in model.keys() {
            assert!(matches!(l.settle(*t), Settled::Message { .. }), "{t}");
        }
        assert!(l.is_empty());
        assert_eq!(l.bytes(), 0);
        assert!(l.waiting.stragglers.is_empty() && l.waiting.ring.is_empty());
        // Settled in the usual order, the ring keeps nothing settled.
        for _ in 0..10 {
            let t = l.forward(1, None, now).start;
            assert_eq!(l.waiting.ring.len(), 1);
            assert!(matches!(l.settle(t), Settled::Message { .. }));
            assert!(l.waiting.ring.is_empty());
        }
    }

    #[test]
    fn qos0_messages_carry_no_ack() {
        let mut l = Ledger::default();
        let t = l.forward(1, None, Instant::now());
        assert!(matches!(
            l.settle(t.start),
            Settled::Message { ack: None, .. }
        ));
    }

    #[test]
    fn a_held_message_is_done_when_its_window_release_is_acknowledged() {
        let (_, acks) = source_with(2);
        let mut held = Held::default();
        let mut ledger = Ledger::default();
        let now = Instant::now();
        let a = held.input(Some(acks[0]), 1);
        let b = held.input(Some(acks[1]), 1);
        held.park(a, (0, "w".into()));
        held.park(b, (0, "w".into()));
        assert_eq!(held.holding(), 2);
        // The window closes with one message: its hold becomes that message's obligation.
        let ids = held.release(&(0, "w".into()));
        for id in &ids {
            held.add(*id, 1);
            assert_eq!(
                held.done(*id),
                None,
                "the published result is not acknowledged yet"
            );
        }
        let tokens = ledger.forward_for_inputs(&[10], ids, now);
        let Settled::Inputs { ids, .. } = ledger.settle(tokens.start) else {
            panic!("a release settles as its inputs")
        };
        let acked: Vec<_> = ids.into_iter().filter_map(|id| held.done(id)).collect();
        assert_eq!(acked, vec![Some(acks[0]), Some(acks[1])]);
        assert_eq!((held.holding(), held.len(), ledger.len()), (0, 0, 0));
        // A window released with nothing to publish: done at once.
        let c = held.input(None, 1);
        held.park(c, (1, "x".into()));
        let ids = held.release(&(1, "x".into()));
        assert_eq!(held.done(ids[0]), Some(None));
        assert!(held.release(&(1, "x".into())).is_empty());
    }
}
