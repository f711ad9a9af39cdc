//! Heap allocations on the forwarding path's protocol state: a QoS 1 message that arrives on
//! a source session, is published on a target session, acknowledged there and then
//! acknowledged at the source allocates nothing once the sessions have warmed up (#17: "no
//! allocation per message on the plain path"). The bench counts the whole bridge process with
//! perf's malloc probes; this test holds the protocol state to it exactly, with dhat's
//! counting allocator.

use std::collections::VecDeque;

use bytes::Bytes;
use edgebridge::model::{Message, QoS};
use edgebridge::mqtt::codec::{ConnAckInfo, Incoming, Version};
use edgebridge::mqtt::outbuf::{OutBuf, SHARE_FROM};
use edgebridge::mqtt::state::{AckToken, SessionState, StateEvent, Writer};

// dhat's allocator counts every allocation of the process while its profiler runs; this file
// has one test, so the only other thread is the test harness's, waiting for it.
#[global_allocator]
static ALLOCATOR: dhat::Alloc = dhat::Alloc;

/// Allocations (and reallocations) made while `f` ran.
fn allocations(f: impl FnOnce()) -> u64 {
    let before = dhat::HeapStats::get().total_blocks;
    f();
    dhat::HeapStats::get().total_blocks - before
}

/// Encodes what `s` has queued into `out` and drops it again, as a connection that wrote it
/// all would; returns the bytes written.
fn write(s: &mut SessionState, out: &mut OutBuf, qos0: &mut VecDeque<(u64, u64)>) -> usize {
    let mut ping = None;
    s.write_outgoing(&mut Writer {
        version: Version::V5,
        buf: out,
        share_from: SHARE_FROM,
        high_water: usize::MAX,
        stamp: None,
        base: 0,
        qos0,
        ping_end: &mut ping,
    })
    .expect("encodes");
    let n = out.len();
    out.advance(n);
    n
}

/// The broker's packet ids, in the order the sessions hand them out (1, 2, ... wrapping past
/// 65,535 to 1).
struct Pkids(u16);

impl Pkids {
    fn next(&mut self) -> u16 {
        self.0 = if self.0 == u16::MAX { 1 } else { self.0 + 1 };
        self.0
    }
}

/// A source and a target session with everything a route client keeps between turns.
struct Route {
    source: SessionState,
    target: SessionState,
    /// Packet ids of the publishes the source's broker sends.
    from_broker: Pkids,
    /// Packet ids the target hands out, which its broker acknowledges.
    to_broker: Pkids,
    events: Vec<StateEvent>,
    /// Tokens published on the target, with the source's ack for each, in order.
    acks: VecDeque<(u64, AckToken)>,
    next_token: u64,
    out: OutBuf,
    qos0: VecDeque<(u64, u64)>,
    msg: Message,
}

impl Route {
    fn new(msg: Message) -> Route {
        let connected = || {
            let mut s = SessionState::new(vec![], 1_000);
            s.on_connack(&ConnAckInfo::default()).expect("connack");
            s.take_events();
            s
        };
        Route {
            source: connected(),
            target: connected(),
            from_broker: Pkids(0),
            to_broker: Pkids(0),
            events: Vec::new(),
            acks: VecDeque::new(),
            next_token: 0,
            out: OutBuf::default(),
            qos0: VecDeque::new(),
            msg,
        }
    }

    /// `turns` turns of `batch` QoS 1 messages: each turn the source receives the batch, the
    /// target publishes it and writes it, the target's broker acknowledges it, and the source
    /// writes its acknowledgements. Returns the messages that crossed and the bytes both
    /// sessions wrote.
    fn turns(&mut self, turns: usize, batch: usize) -> (u64, usize) {
        let mut crossed = 0;
        let mut wrote = 0;
        for _ in 0..turns {
            for _ in 0..batch {
                self.source
                    .on_incoming(Incoming::Publish {
                        pkid: self.from_broker.next(),
                        dup: false,
                        msg: self.msg.clone(),
                    })
                    .expect("a valid publish");
            }
            self.source.swap_events(&mut self.events);
            for ev in self.events.drain(..) {
                if let StateEvent::Message {
                    msg,
                    ack: Some(ack),
                    ..
                } = ev
                {
                    self.next_token += 1;
                    self.acks.push_back((self.next_token, ack));
                    self.target.publish(msg, self.next_token);
                }
            }
            wrote += write(&mut self.target, &mut self.out, &mut self.qos0);
            for _ in 0..batch {
                self.target
                    .on_incoming(Incoming::PubAck {
                        pkid: self.to_broker.next(),
                        code: 0,
                    })
                    .expect("an ack of a publish in flight");
            }
            self.target.swap_events(&mut self.events);
            for ev in self.events.drain(..) {
                if let StateEvent::Delivered(t) = ev {
                    let (expected, ack) = self.acks.pop_front().expect("a message in flight");
                    assert_eq!(t, expected, "delivered in order");
                    self.source.ack(ack);
                    crossed += 1;
                }
            }
            wrote += write(&mut self.source, &mut self.out, &mut self.qos0);
        }
        (crossed, wrote)
    }
}

#[test]
fn a_qos_1_message_forwarded_and_acknowledged_allocates_nothing_once_warm() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let mut route = Route::new(Message {
        topic: "factory/line1/temp".into(),
        payload: Bytes::from_static(&[7u8; 64]),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Default::default(),
    });
    // Warm up: every buffer grows to what the largest turn needs, and the table of messages
    // in flight to where the entries that left make it rehash in place instead of growing.
    let (crossed, _) = route.turns(150, 500);
    assert_eq!(crossed, 75_000);
    // Turns of every size up to the warm-up's, packet ids wrapping past 65,535.
    let mut crossed = 0;
    let mut wrote = 0;
    let n = allocations(|| {
        for batch in [1, 7, 64, 499, 500, 3, 250] {
            let (c, w) = route.turns(100_000 / batch / 7 + 1, batch);
            crossed += c;
            wrote += w;
        }
    });
    assert!(
        crossed > 100_000,
        "{crossed} messages crossed (packet ids wrap)"
    );
    assert!(
        wrote as u64 > crossed * 64,
        "{wrote} bytes written for {crossed} messages"
    );
    assert_eq!(
        n, 0,
        "{n} allocations for {crossed} messages forwarded and acknowledged"
    );
}
