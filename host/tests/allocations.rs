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

/// `turns` turns of `batch` QoS 1 messages through a source and a target session: each turn
/// the source receives the batch, the target publishes it and writes it, the target's broker
/// acknowledges it, and the source writes its acknowledgements. Returns the messages that
/// crossed and the bytes both sessions wrote.
#[allow(clippy::too_many_arguments)]
fn turns(
    source: &mut SessionState,
    target: &mut SessionState,
    from_broker: &mut Pkids,
    to_broker: &mut Pkids,
    events: &mut Vec<StateEvent>,
    acks: &mut VecDeque<(u64, AckToken)>,
    out: &mut OutBuf,
    qos0: &mut VecDeque<(u64, u64)>,
    msg: &Message,
    turns: usize,
    batch: usize,
) -> (u64, usize) {
    let mut crossed = 0;
    let mut wrote = 0;
    let mut token = 0u64;
    for _ in 0..turns {
        for _ in 0..batch {
            source
                .on_incoming(Incoming::Publish {
                    pkid: from_broker.next(),
                    dup: false,
                    msg: msg.clone(),
                })
                .expect("a valid publish");
        }
        source.swap_events(events);
        for ev in events.drain(..) {
            if let StateEvent::Message {
                msg,
                ack: Some(ack),
                ..
            } = ev
            {
                token += 1;
                acks.push_back((token, ack));
                target.publish(msg, token);
            }
        }
        wrote += write(target, out, qos0);
        for _ in 0..batch {
            target
                .on_incoming(Incoming::PubAck {
                    pkid: to_broker.next(),
                    code: 0,
                })
                .expect("an ack of a publish in flight");
        }
        target.swap_events(events);
        for ev in events.drain(..) {
            if let StateEvent::Delivered(t) = ev {
                let (expected, ack) = acks.pop_front().expect("a message in flight");
                assert_eq!(t, expected, "delivered in order");
                source.ack(ack);
                crossed += 1;
            }
        }
        wrote += write(source, out, qos0);
    }
    (crossed, wrote)
}

#[test]
fn a_qos_1_message_forwarded_and_acknowledged_allocates_nothing_once_warm() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let connected = |max_inflight| {
        let mut s = SessionState::new(vec![], max_inflight);
        s.on_connack(&ConnAckInfo::default()).expect("connack");
        s.take_events();
        s
    };
    let mut source = connected(1_000);
    let mut target = connected(1_000);
    let (mut from_broker, mut to_broker) = (Pkids(0), Pkids(0));
    let mut events = Vec::new();
    let mut acks = VecDeque::new();
    let mut out = OutBuf::default();
    let mut qos0 = VecDeque::new();
    let msg = Message {
        topic: "factory/line1/temp".into(),
        payload: Bytes::from_static(&[7u8; 64]),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Default::default(),
    };
    let mut run = |n: usize, batch: usize| {
        turns(
            &mut source,
            &mut target,
            &mut from_broker,
            &mut to_broker,
            &mut events,
            &mut acks,
            &mut out,
            &mut qos0,
            &msg,
            n,
            batch,
        )
    };
    // Warm up: every buffer grows to what the largest turn needs, and the table of messages
    // in flight to where the entries that left make it rehash in place instead of growing.
    let (crossed, _) = run(150, 500);
    assert_eq!(crossed, 75_000);
    // Turns of every size up to the warm-up's, packet ids wrapping past 65,535.
    let mut crossed = 0;
    let mut wrote = 0;
    let n = allocations(|| {
        for batch in [1, 7, 64, 499, 500, 3, 250] {
            let (c, w) = run(100_000 / batch / 7 + 1, batch);
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
