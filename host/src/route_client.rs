//! The task of one route client: its source connection, its target connection, the route's
//! [`Pipeline`] and the delivery [`Ledger`], in one loop.
//!
//! Each turn polls both [`Link`]s (which write what their session states queued, read, and
//! keep their connections alive), then hands what the target settled to the ledger (whose
//! acknowledgements go to the source session) and what the source delivered to the pipeline
//! (whose messages go to the target session). No channels and no other tasks: a message is
//! read, mapped, encoded into the target's write buffer and acknowledged to the source in the
//! same task.
//!
//! Backpressure is "stop reading the source": while [`RouteClientSetup::max_inflight`] copies
//! wait for the target, the source link does not read (it still writes acknowledgements and
//! keeps its connection alive). A route stalled for longer than [`QOS0_WAIT`] (its target is
//! down, say) reads again to shed QoS 0 messages, counted as `qos0_overflow`; QoS 1/2
//! messages are never dropped: past twice the window the source is not read at all.

use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::counters::{DropReason, RouteCounters, uptime_ms};
use crate::delivery::{Ledger, Settled};
use crate::model::{Message, QoS};
use crate::mqtt::SubFilter;
use crate::mqtt::link::{Link, LinkOptions};
use crate::mqtt::state::{SessionState, StateEvent, Undeliverable};
use crate::pipeline::{Pipeline, Stage};
use crate::routing::RouteClient;

/// How long a stalled route stops reading its source before it sheds QoS 0 messages.
pub const QOS0_WAIT: Duration = Duration::from_millis(500);

/// Everything a route client's task needs.
pub struct RouteClientSetup<S> {
    /// Which route client this is.
    pub plan: RouteClient,
    /// The source connection (persistent session, subscribed to the route's filter).
    pub source: LinkOptions,
    /// The target connection.
    pub target: LinkOptions,
    /// Most copies forwarded and not yet acknowledged by the target.
    pub max_inflight: u16,
    /// How long a stop waits for in-flight messages to be acknowledged.
    pub drain_timeout: Duration,
    /// The route's logic.
    pub pipeline: Pipeline<S>,
}

/// Runs a route client until `stop` turns true; then it stops reading, waits (up to the
/// drain timeout) for what is in flight, acknowledges it, and disconnects both sessions.
pub async fn run<S: Stage>(
    setup: RouteClientSetup<S>,
    counters: Arc<RouteCounters>,
    mut stop: watch::Receiver<bool>,
) {
    let RouteClientSetup {
        plan,
        source,
        target,
        max_inflight,
        drain_timeout,
        mut pipeline,
    } = setup;
    let max = max_inflight as usize;
    let mut src_state = SessionState::new(
        vec![SubFilter {
            filter: plan.subscription.clone(),
            qos: plan.route.qos,
        }],
        max_inflight,
    );
    let mut dst_state = SessionState::new(vec![], max_inflight);
    let mut src = Link::new(source, counters.source.clone());
    let mut dst = Link::new(target, counters.target.clone());
    let mut ledger = Ledger::default();
    let (mut events, mut out) = (Vec::new(), Vec::<Message>::new());
    let mut stopping = *stop.borrow();
    let mut drain_at: Option<Instant> = stopping.then(|| Instant::now() + drain_timeout);
    let mut stalled_since: Option<Instant> = None;
    let wake = tokio::time::sleep(Duration::from_secs(86_400));
    tokio::pin!(wake);
    let mut wake_at: Option<Instant> = None;
    loop {
        let room = ledger.len() < max;
        let shedding = !room
            && ledger.len() < 2 * max
            && stalled_since.is_some_and(|t| t.elapsed() >= QOS0_WAIT);
        let read = !stopping && (room || shedding);
        let want_wake = match (drain_at, stalled_since) {
            (Some(d), _) => Some(d),
            (None, Some(s)) if !room && !shedding => Some(s + QOS0_WAIT),
            _ => None,
        };
        if want_wake != wake_at {
            wake_at = want_wake;
            if let Some(at) = want_wake {
                wake.as_mut().reset(at);
            }
        }
        tokio::select! {
            () = poll_fn(|cx| {
                let a = dst.poll(cx, &mut dst_state, true).is_ready();
                let b = src.poll(cx, &mut src_state, read).is_ready();
                if a || b { Poll::Ready(()) } else { Poll::Pending }
            }) => {}
            changed = stop.changed(), if !stopping => {
                if changed.is_err() || *stop.borrow() {
                    stopping = true;
                    drain_at = Some(Instant::now() + drain_timeout);
                }
            }
            () = &mut wake, if wake_at.is_some() => {}
        }
        // The target first: what it settled frees room and acknowledges the source.
        dst_state.swap_events(&mut events);
        if !events.is_empty() {
            let now = std::time::Instant::now();
            let mut settled = false;
            for ev in events.drain(..) {
                settled |= on_target_event(
                    ev,
                    &plan,
                    &mut ledger,
                    &mut src_state,
                    &mut dst_state,
                    &counters,
                    now,
                );
            }
            if settled {
                counters
                    .last_progress_ms
                    .store(uptime_ms(), Ordering::Relaxed);
            }
        }
        src_state.swap_events(&mut events);
        if !events.is_empty() {
            let was_idle = ledger.is_empty();
            let now = std::time::Instant::now();
            for ev in events.drain(..) {
                match ev {
                    StateEvent::Message { msg, ack, dup } => {
                        RouteCounters::add(&counters.received);
                        if dup {
                            RouteCounters::add(&counters.redelivered);
                        }
                        if shedding && msg.qos == QoS::AtMostOnce {
                            counters.count_drop(DropReason::Qos0Overflow);
                            continue;
                        }
                        pipeline.process(msg, &mut out, &counters).await;
                        if out.is_empty() {
                            // Handled (dropped or filtered): acknowledged at once.
                            if let Some(ack) = ack {
                                src_state.ack(ack);
                            }
                            continue;
                        }
                        let tokens = ledger.forward(out.len(), ack, now);
                        for (m, token) in out.drain(..).zip(tokens) {
                            dst_state.publish(m, token);
                        }
                    }
                    StateEvent::Subscribed(result) => {
                        for (filter, code) in result {
                            if code >= 0x80 {
                                error!(route = %plan.route.name, client_id = %plan.client_id, filter = %filter, "Source broker refused the subscription (code {code:#04x}); no messages flow on this client until it reconnects");
                            } else {
                                counters.source.subscribed.store(true, Ordering::Relaxed);
                                info!(route = %plan.route.name, client_id = %plan.client_id, filter = %filter, granted_qos = code, "Subscribed");
                            }
                        }
                    }
                    StateEvent::InvalidTopic { topic, error } => {
                        counters.count_drop(DropReason::InvalidTopic);
                        warn!(route = %plan.route.name, client_id = %plan.client_id, side = counters.source.side, "The source broker sent a message to the invalid topic {topic:?} ({error}); acknowledged and dropped");
                    }
                    _ => {}
                }
            }
            if was_idle && !ledger.is_empty() {
                counters.busy_since_ms.store(uptime_ms(), Ordering::Relaxed);
            }
        }
        counters
            .in_flight
            .store(ledger.len() as u64, Ordering::Relaxed);
        stalled_since = match (ledger.len() < max, stalled_since) {
            (true, _) => None,
            (false, None) => Some(Instant::now()),
            (false, since) => since,
        };
        if stopping {
            if ledger.is_empty() {
                break;
            }
            if drain_at.is_some_and(|d| Instant::now() >= d) {
                warn!(route = %plan.route.name, client_id = %plan.client_id, in_flight = ledger.len(), "Stopping: in-flight messages not acknowledged in time; the source broker redelivers them");
                break;
            }
        }
    }
    // The acknowledgements of what settled, then DISCONNECT, on both sessions.
    src.close(&mut src_state).await;
    dst.close(&mut dst_state).await;
    counters.in_flight.store(0, Ordering::Relaxed);
}

/// Handles one event of the target session; true when a message was settled.
fn on_target_event(
    ev: StateEvent,
    plan: &RouteClient,
    ledger: &mut Ledger,
    src_state: &mut SessionState,
    dst_state: &mut SessionState,
    counters: &RouteCounters,
    now: std::time::Instant,
) -> bool {
    let token = match ev {
        StateEvent::Delivered(token) => {
            RouteCounters::add(&counters.forwarded);
            token
        }
        StateEvent::Rejected(token, code) => {
            counters.count_drop(DropReason::RejectedByTarget);
            error!(route = %plan.route.name, client_id = %plan.client_id, "The target broker refused a message (reason code {code:#04x}); it is acknowledged to the source and lost");
            token
        }
        StateEvent::Undeliverable { token, topic, why } => {
            let topic: String = topic.chars().take(200).collect();
            match why {
                Undeliverable::TooLarge { size, max } => {
                    counters.count_drop(DropReason::Oversize);
                    error!(route = %plan.route.name, client_id = %plan.client_id, topic = %topic, "A message of {size} bytes exceeds the target broker's maximum packet size of {max} bytes; it is acknowledged to the source and lost");
                }
                Undeliverable::Poison { size } => {
                    counters.count_drop(DropReason::Undeliverable);
                    error!(route = %plan.route.name, client_id = %plan.client_id, topic = %topic, "The target broker closed the connection right after this message of {size} bytes three times in a row (on MQTT 3.1.1 this is how a broker refuses a message over its maximum packet size); it is acknowledged to the source and lost");
                }
            }
            token
        }
        StateEvent::InvalidTopic { topic, error } => {
            counters.count_drop(DropReason::InvalidTopic);
            warn!(route = %plan.route.name, client_id = %plan.client_id, side = counters.target.side, "The target broker sent a message to the invalid topic {topic:?} ({error}); acknowledged and dropped");
            return false;
        }
        StateEvent::Message { ack, .. } => {
            // Nothing is subscribed on the target session: not ours to forward.
            if let Some(ack) = ack {
                dst_state.ack(ack);
            }
            return false;
        }
        _ => return false,
    };
    match ledger.settle(token) {
        Settled::Message { ack, since } => {
            counters
                .latency
                .observe(now.saturating_duration_since(since));
            if let Some(ack) = ack {
                src_state.ack(ack);
            }
            true
        }
        Settled::Copy => true,
        Settled::Unknown => false,
    }
}
