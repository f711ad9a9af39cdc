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
//! messages are never dropped: past twice the window (in messages or in bytes) the source is
//! not read at all.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::counters::{DropReason, RouteCounters, uptime_ms, uptime_ms_at};
use crate::delivery::{Held, Ledger, Settled};
use crate::model::{Message, QoS};
use crate::mqtt::link::{LARGE_PACKET, Link, LinkOptions};
use crate::mqtt::state::{SessionState, StateEvent, Undeliverable};
use crate::mqtt::{AckToken, SubFilter, Version};
use crate::pipeline::{Pipeline, Processed, Released, Stage};
use crate::plugin::stage::FlushReason;
use crate::plugin::timers::HostClock;
use crate::routing::RouteClient;
use crate::spool::{Spool, SpoolSettings, SyncDone};

/// How long a stalled route stops reading its source before it sheds QoS 0 messages.
pub const QOS0_WAIT: Duration = Duration::from_millis(500);
/// How often a route waiting for a plugin looks for it again.
const HOLD_RETRY: Duration = Duration::from_millis(250);
/// Source events in one turn from which the route client yields its thread once before the
/// next read, when they are small messages, under [`LARGE_PACKET`] on average: with larger
/// ones, copying bytes costs more than the turn, and a pause only fills the socket buffers
/// (see the run loop).
const BUSY_TURN: usize = 4;

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
    /// Most bytes (payloads and topics) of those copies: past it the source is not read.
    pub max_inflight_bytes: usize,
    /// How long a stop waits for in-flight messages to be acknowledged.
    pub drain_timeout: Duration,
    /// The route's logic.
    pub pipeline: Pipeline<S>,
    /// Store and forward: the spool's settings (its counters are in the route's counters).
    pub spool: Option<SpoolSettings>,
    /// Filters the persistent source session may still hold from the route's previous
    /// configuration: unsubscribed once on the first connection.
    pub unsubscribe: Vec<String>,
}

/// Delay before a failed spool is opened again (doubling up to [`SPOOL_RETRY_MAX`]).
const SPOOL_RETRY: Duration = Duration::from_secs(1);
const SPOOL_RETRY_MAX: Duration = Duration::from_secs(30);

/// What a stored record completes once it is on disk.
#[derive(Debug)]
enum Pending {
    /// A source message's acknowledgement.
    Ack(AckToken),
    /// One obligation of each of these held inputs (see [`Held`]).
    Inputs(Vec<u64>),
}

/// A route client's spool and the source acknowledgements that wait for it.
struct Lane {
    settings: SpoolSettings,
    counters: Arc<crate::spool::SpoolCounters>,
    /// `None` until open, and after a failure until it is open again.
    spool: Option<Spool>,
    /// Source acknowledgements (or held inputs), each with the sequence number of its
    /// message's last record.
    acks: VecDeque<(u64, Pending)>,
    /// When to open the spool (again).
    open_at: Option<Instant>,
    retry: Duration,
    /// The source session must reconnect (its unacknowledged messages come again).
    reconnect_source: bool,
}

impl Lane {
    fn new(settings: SpoolSettings, counters: Arc<crate::spool::SpoolCounters>) -> Lane {
        Lane {
            settings,
            counters,
            spool: None,
            acks: VecDeque::new(),
            open_at: Some(Instant::now()),
            retry: SPOOL_RETRY,
            reconnect_source: false,
        }
    }

    /// Opens (recovers) the spool if it is time; bounded by the recovery of one folder.
    async fn open_if_due(&mut self, route: &str) {
        if self.spool.is_some() || self.open_at.is_none_or(|t| Instant::now() < t) {
            return;
        }
        let (settings, counters) = (self.settings.clone(), self.counters.clone());
        let opened = tokio::task::spawn_blocking(move || {
            Spool::open(settings, Arc::new(crate::spool::fs::RealFs), counters)
        })
        .await;
        match opened {
            Ok(Ok(spool)) => {
                info!(route = %route, dir = %self.settings.dir.display(), messages = self.counters.messages.load(Ordering::Relaxed), recovery_ms = self.counters.recovery_us.load(Ordering::Relaxed) / 1000, "Spool open");
                self.spool = Some(spool);
                self.open_at = None;
                self.retry = SPOOL_RETRY;
            }
            Ok(Err(e)) => self.failed(route, &e),
            Err(join) => {
                error!(route = %route, "Spool recovery ended abnormally: {join}");
                self.open_at = Some(Instant::now() + self.retry);
            }
        }
    }

    fn failed(&mut self, route: &str, e: &crate::spool::SpoolError) {
        let text = crate::error::chain(e);
        error!(route = %route, "{text}");
        self.counters.failures.fetch_add(1, Ordering::Relaxed);
        *self.counters.failed.lock().expect("spool failure lock") = Some(text);
        self.reopen_later();
    }

    /// Drops the spool (it failed; what it said is logged and counted) and opens it again
    /// after the retry delay, from disk; the source reconnects to send again what was not
    /// acknowledged.
    fn reopen_later(&mut self) {
        info!(dir = %self.settings.dir.display(), "The spool is opened again in {} s", self.retry.as_secs());
        self.spool = None;
        self.acks.clear();
        self.reconnect_source = true;
        self.open_at = Some(Instant::now() + self.retry);
        self.retry = (self.retry * 2).min(SPOOL_RETRY_MAX);
    }

    fn has_room(&mut self) -> bool {
        self.spool.as_mut().is_some_and(Spool::has_room)
    }

    /// Nothing waits to be written, synced or acknowledged, and nothing is in flight.
    fn settled(&self, job: &Option<tokio::task::JoinHandle<SyncDone>>) -> bool {
        job.is_none()
            && self
                .spool
                .as_ref()
                .is_none_or(|sp| sp.in_flight() == 0 && sp.idle())
    }

    /// What the loop waits for besides the links: a job due, the drain rate, a reopen.
    fn wake_at(&self) -> Option<Instant> {
        let mut at = self.open_at;
        if let Some(sp) = &self.spool {
            for t in [sp.job_due_at(), sp.next_send_at()].into_iter().flatten() {
                at = Some(at.map_or(t.into(), |a: Instant| a.min(t.into())));
            }
        }
        at
    }
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
        max_inflight_bytes,
        drain_timeout,
        pipeline,
        spool,
        unsubscribe,
    } = setup;
    let max = max_inflight as usize;
    let mut src_state = SessionState::new(
        vec![SubFilter {
            filter: plan.subscription.clone(),
            qos: plan.route.qos,
        }],
        max_inflight,
    );
    src_state.unsubscribe_once(unsubscribe);
    let mut c = Client {
        v3: source.version == Version::V4,
        plan,
        pipeline,
        counters,
        ledger: Ledger::default(),
        dst_state: SessionState::new(vec![], max_inflight),
        out: Vec::new(),
        waiting: VecDeque::new(),
        retry_at: None,
        src_resumed: false,
        lane: None,
        sizes: Vec::new(),
        resubscribe_at: None,
        resubscribe_backoff: RESUBSCRIBE_FIRST,
        held: Held::default(),
        pressure_mark: 0,
        reconnect_source: false,
    };
    c.lane = match (spool, c.counters.spool.clone()) {
        (Some(settings), Some(counters)) => Some(Lane::new(settings, counters)),
        _ => None,
    };
    let mut job: Option<tokio::task::JoinHandle<SyncDone>> = None;
    let source_opts = source.clone();
    let subscriptions = vec![SubFilter {
        filter: c.plan.subscription.clone(),
        qos: c.plan.route.qos,
    }];
    let mut src = Link::new(source, c.counters.source.clone());
    let mut dst = Link::new(target, c.counters.target.clone());
    let mut events = Vec::new();
    let mut stopping = *stop.borrow();
    let mut drain_at: Option<Instant> = stopping.then(|| Instant::now() + drain_timeout);
    let mut stalled_since: Option<Instant> = None;
    let wake = tokio::time::sleep(Duration::from_secs(86_400));
    tokio::pin!(wake);
    let mut wake_at: Option<Instant> = None;
    loop {
        if let Some(lane) = &mut c.lane {
            // Never while a group commit of the previous spool still writes its files.
            if !stopping && job.is_none() {
                lane.open_if_due(&c.plan.route.name).await;
            }
            if lane.reconnect_source {
                // Its unacknowledged messages were not stored: the broker sends them again on
                // a new connection.
                lane.reconnect_source = false;
                c.reconnect_source = true;
            }
        }
        if c.reconnect_source {
            c.reconnect_source = false;
            c.held.clear();
            src.close(&mut src_state).await;
            src = Link::new(source_opts.clone(), c.counters.source.clone());
            src_state = SessionState::new(subscriptions.clone(), max_inflight);
        }
        let room = c.ledger.len() < max && c.ledger.bytes() < max_inflight_bytes;
        let spooled = c.lane.is_some();
        let shedding = !spooled
            && !room
            && c.ledger.len() < 2 * max
            && c.ledger.bytes() < 2 * max_inflight_bytes
            && stalled_since.is_some_and(|t| t.elapsed() >= QOS0_WAIT);
        let read = !stopping
            && c.waiting.is_empty()
            && match &mut c.lane {
                Some(lane) => lane.has_room(),
                None => room || shedding,
            };
        let lane_wake = c.lane.as_ref().and_then(Lane::wake_at);
        let want_wake = match (drain_at, c.retry_at, stalled_since) {
            (Some(d), _, _) => Some(d),
            (None, Some(r), _) => Some(r),
            (None, None, Some(s)) if !spooled && !room && !shedding => Some(s + QOS0_WAIT),
            _ => None,
        };
        if c.resubscribe_at.is_some_and(|t| Instant::now() >= t) {
            c.resubscribe_at = None;
            src_state.resubscribe();
        }
        let lane_wake = match (lane_wake, c.resubscribe_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let want_wake = match (want_wake, lane_wake) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // An aggregator's soonest timer.
        let timer_at = c.pipeline.next_timer();
        let want_wake = match (
            want_wake,
            timer_at.map(|t| Instant::from_std(HostClock::instant_of(t))),
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if want_wake != wake_at {
            wake_at = want_wake;
            if let Some(at) = want_wake {
                wake.as_mut().reset(at);
            }
        }
        // One clock reading per turn: the links' keep-alive bookkeeping and, when the links
        // woke the turn, the events' (read when first needed otherwise).
        let (mut polled_at, mut links_woke) = (None, false);
        tokio::select! {
            () = poll_fn(|cx| {
                let now = Instant::now();
                polled_at = Some(now);
                let a = dst.poll_at(cx, &mut c.dst_state, true, now).is_ready();
                let b = src.poll_at(cx, &mut src_state, read, now).is_ready();
                if a || b { Poll::Ready(()) } else { Poll::Pending }
            }) => links_woke = true,
            changed = stop.changed(), if !stopping => {
                if changed.is_err() || *stop.borrow() {
                    stopping = true;
                    drain_at = Some(Instant::now() + drain_timeout);
                    // What the windows hold goes out now; what a plugin keeps stays
                    // unacknowledged, and its source sends it again.
                    c.pipeline.flush(FlushReason::Stop, &c.counters).await;
                    c.forward_released(&mut src_state);
                }
            }
            () = &mut wake, if wake_at.is_some() => {}
            done = async { job.as_mut().expect("guarded").await }, if job.is_some() => {
                job = None;
                c.finish_job(done);
            }
        }
        // The target first: what it settled frees room and acknowledges the source.
        let mut turn_clock = polled_at.filter(|_| links_woke).map(Instant::into_std);
        c.dst_state.swap_events(&mut events);
        if !events.is_empty() {
            let now = *turn_clock.get_or_insert_with(std::time::Instant::now);
            let mut settled = false;
            for ev in events.drain(..) {
                settled |= c.on_target_event(ev, &mut src_state, now);
            }
            if settled {
                c.counters
                    .last_progress_ms
                    .store(uptime_ms_at(now), Ordering::Relaxed);
            }
        }
        let was_idle = match &c.lane {
            Some(lane) => lane.spool.as_ref().is_none_or(|sp| sp.in_flight() == 0),
            None => c.ledger.is_empty(),
        };
        if let Some(at) = timer_at {
            let now = HostClock::Real.timer_now();
            if now >= at {
                c.pipeline.fire_timers(now, &c.counters).await;
                c.forward_released(&mut src_state);
                turn_clock = None; // plugin calls took time
            }
        }
        if !c.waiting.is_empty() && c.retry_at.is_none_or(|t| Instant::now() >= t) {
            c.retry_held(&mut src_state).await;
            turn_clock = None;
        }
        src_state.swap_events(&mut events);
        // Many small messages in one turn: the turn's own cost (wake-up, system calls)
        // outweighs theirs, and a pause lets the next read take more of them.
        let busy = events.len() >= BUSY_TURN && src.last_read() < events.len() * LARGE_PACKET;
        if !events.is_empty() {
            let now = *turn_clock.get_or_insert_with(std::time::Instant::now);
            for ev in events.drain(..) {
                c.on_source_event(ev, &mut src_state, shedding, now).await;
            }
        }
        c.after_plugins(&mut src_state, max).await;
        if let Some(lane) = &mut c.lane {
            lane_turn(
                lane,
                &mut job,
                &mut src_state,
                &mut c.dst_state,
                (max, max_inflight_bytes),
                stopping,
                (&c.counters, &mut c.held),
            );
        }
        let (in_flight, in_flight_bytes) = match &c.lane {
            Some(lane) => lane
                .spool
                .as_ref()
                .map_or((0, 0), |sp| (sp.in_flight(), sp.in_flight_bytes())),
            None => (c.ledger.len(), c.ledger.bytes()),
        };
        c.counters
            .in_flight_bytes
            .store(in_flight_bytes as u64, Ordering::Relaxed);
        if was_idle && in_flight > 0 {
            c.counters
                .busy_since_ms
                .store(uptime_ms(), Ordering::Relaxed);
        }
        c.counters
            .in_flight
            .store(in_flight as u64, Ordering::Relaxed);
        c.counters
            .held
            .store(c.held.len() as u64, Ordering::Relaxed);
        stalled_since = match (
            in_flight < max && in_flight_bytes < max_inflight_bytes,
            stalled_since,
        ) {
            (true, _) => None,
            (false, None) => Some(Instant::now()),
            (false, since) => since,
        };
        if busy {
            // Under load, the thread is offered to the OS scheduler once before the next
            // read. Where brokers and bridge share the cores, the brokers run meanwhile and
            // the next read takes a larger batch; otherwise the bridge sleeps and is woken
            // (a cost to it and to the broker that writes) every few messages. It returns at
            // once when nothing else waits for the core; a turn of fewer messages (every turn
            // at a moderate rate) never yields, so latency at such rates is unchanged.
            std::thread::yield_now();
        }
        if stopping {
            let settled = match &c.lane {
                Some(lane) => lane.settled(&job),
                None => c.ledger.is_empty(),
            };
            if settled {
                break;
            }
            if drain_at.is_some_and(|d| Instant::now() >= d) {
                warn!(route = %c.plan.route.name, client_id = %c.plan.client_id, in_flight, "Stopping: in-flight messages not acknowledged in time; the source broker redelivers them");
                break;
            }
        }
    }
    // A group commit still running finishes (what it stores may be acknowledged), and what
    // the spool has not written yet is written now.
    if let Some(j) = job.take() {
        c.finish_job(j.await);
    }
    if let Some(lane) = &mut c.lane
        && let Some(sp) = &mut lane.spool
    {
        while let Some(j) = sp.begin_job(true) {
            match tokio::task::spawn_blocking(move || j.run()).await {
                Ok(done) => {
                    if sp.finish_job(done).is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        ack_stored(lane, &mut src_state, &mut c.held);
    }
    // The acknowledgements of what settled, then DISCONNECT, on both sessions.
    src.close(&mut src_state).await;
    dst.close(&mut c.dst_state).await;
    c.counters.in_flight.store(0, Ordering::Relaxed);
}

/// A received message waiting for a plugin, with its acknowledgement and receipt time.
type HeldMessage = (Message, Option<AckToken>, std::time::Instant);

/// The state of a route client besides its two links and the source session.
struct Client<S> {
    plan: RouteClient,
    pipeline: Pipeline<S>,
    counters: Arc<RouteCounters>,
    ledger: Ledger,
    dst_state: SessionState,
    /// Reused for the pipeline's output.
    out: Vec<Message>,
    /// Messages waiting for a plugin that is not loaded, in arrival order.
    waiting: VecDeque<HeldMessage>,
    /// When to look for the plugin again.
    retry_at: Option<Instant>,
    /// The source protocol is MQTT 3.1.1.
    v3: bool,
    /// The current source connection resumed a stored session.
    src_resumed: bool,
    /// Store and forward, when the route has a spool.
    lane: Option<Lane>,
    /// Reused for the sizes of the pipeline's output.
    sizes: Vec<usize>,
    /// When to send a refused SUBSCRIBE again.
    resubscribe_at: Option<Instant>,
    resubscribe_backoff: Duration,
    /// Source messages an aggregator holds in windows.
    held: Held,
    /// QoS 1/2 messages held when the chain was last asked to flush for pressure.
    pressure_mark: usize,
    /// The source session must reconnect: what an aggregator held was lost with its
    /// instance, and comes again from the source.
    reconnect_source: bool,
}

/// First wait before a refused subscription is sent again (doubling up to the max).
const RESUBSCRIBE_FIRST: Duration = Duration::from_secs(5);
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(60);

/// What a message counts for in the in-flight bound: its payload and topic.
fn message_bytes(m: &Message) -> usize {
    m.payload.len() + m.topic.len()
}

/// One turn of the spool: records to the target (within the in-flight window and the drain
/// rate), the next group commit, and the source acknowledgements of what is stored.
fn lane_turn(
    lane: &mut Lane,
    job: &mut Option<tokio::task::JoinHandle<SyncDone>>,
    src_state: &mut SessionState,
    dst_state: &mut SessionState,
    (max, max_bytes): (usize, usize),
    stopping: bool,
    (counters, held): (&RouteCounters, &mut Held),
) {
    if lane.spool.as_ref().is_some_and(Spool::failed) {
        // It failed appending (a new segment could not be created): logged and counted there.
        lane.reopen_later();
        return;
    }
    let Some(sp) = &mut lane.spool else {
        return;
    };
    let mut failure = None;
    // Records leave the spool only for a connected target: handed to a session that is down
    // they would wait in its queue instead, and all go at once on the reconnect, past the
    // drain rate (and out of the spool's accounting of what waits).
    if !stopping && dst_state.is_connected() {
        while sp.in_flight() < max && sp.in_flight_bytes() < max_bytes {
            match sp.next_to_send() {
                Ok(Some(out)) => dst_state.publish(out.msg, out.seq),
                Ok(None) => break,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
    }
    if let Some(e) = failure {
        lane.failed(&counters.route, &e);
        return;
    }
    if job.is_none()
        && let Some(j) = sp.begin_job(stopping)
    {
        *job = Some(tokio::task::spawn_blocking(move || j.run()));
    }
    ack_stored(lane, src_state, held);
    if let Some(sp) = &lane.spool {
        sp.publish_gauges();
    }
}

/// Acknowledges to the source every message whose records are stored.
fn ack_stored(lane: &mut Lane, src_state: &mut SessionState, held: &mut Held) {
    let Some(sp) = &lane.spool else {
        return;
    };
    let stored = sp.ack_threshold();
    while lane.acks.front().is_some_and(|(last, _)| *last < stored) {
        match lane.acks.pop_front().expect("just seen").1 {
            Pending::Ack(ack) => src_state.ack(ack),
            Pending::Inputs(ids) => {
                for id in ids {
                    if let Some(Some(ack)) = held.done(id) {
                        src_state.ack(ack);
                    }
                }
            }
        }
    }
}

impl<S: Stage> Client<S> {
    /// A group commit finished.
    fn finish_job(&mut self, done: Result<SyncDone, tokio::task::JoinError>) {
        let Some(lane) = &mut self.lane else {
            return;
        };
        let result = match done {
            Ok(done) => match &mut lane.spool {
                Some(sp) => sp.finish_job(done),
                None => Ok(()),
            },
            Err(join) => {
                error!(route = %self.plan.route.name, "A spool write ended abnormally: {join}");
                Err(crate::spool::SpoolError::Write {
                    file: lane.settings.dir.clone(),
                    source: std::io::Error::other(join.to_string()),
                })
            }
        };
        if let Err(e) = result {
            lane.failed(&self.plan.route.name, &e);
        }
    }

    async fn on_source_event(
        &mut self,
        ev: StateEvent,
        src_state: &mut SessionState,
        shedding: bool,
        now: std::time::Instant,
    ) {
        let (route, client_id) = (&self.plan.route.name, &self.plan.client_id);
        match ev {
            StateEvent::Message { msg, ack, dup } => {
                RouteCounters::add(&self.counters.received);
                if dup {
                    RouteCounters::add(&self.counters.redelivered);
                }
                if shedding && msg.qos == QoS::AtMostOnce {
                    self.counters.count_drop(DropReason::Qos0Overflow);
                } else if self.v3
                    && msg.retain
                    && retained::seen(&self.plan.client_id, &msg, self.src_resumed)
                {
                    // MQTT 3.1.1 sets retain only on messages sent for a new subscription: on a
                    // resumed session that is our SUBSCRIBE again, replaying what was
                    // forwarded when it was new. A replay whose content changed since (it
                    // changed while the bridge was away) is the newest state: it goes on.
                    self.counters.count_drop(DropReason::RetainedReplay);
                    if let Some(ack) = ack {
                        src_state.ack(ack);
                    }
                } else if !self.waiting.is_empty() {
                    // Nothing overtakes a held message.
                    self.waiting.push_back((msg, ack, now));
                } else {
                    self.process(msg, ack, now, src_state).await;
                }
            }
            StateEvent::Connected { session_present } => {
                self.src_resumed = session_present;
                // The connection subscribes anyway.
                self.resubscribe_at = None;
            }
            StateEvent::Subscribed(result) => {
                for (filter, code) in result {
                    if code >= 0x80 {
                        let wait = self.resubscribe_backoff;
                        error!(route = %route, client_id = %client_id, filter = %filter, "Source broker refused the subscription (code {code:#04x}); no messages flow on this client; subscribing again in {} s", wait.as_secs());
                        self.resubscribe_at = Some(Instant::now() + wait);
                        self.resubscribe_backoff = (wait * 2).min(RESUBSCRIBE_MAX);
                    } else {
                        self.resubscribe_backoff = RESUBSCRIBE_FIRST;
                        self.counters
                            .source
                            .subscribed
                            .store(true, Ordering::Relaxed);
                        info!(route = %route, client_id = %client_id, filter = %filter, granted_qos = code, "Subscribed");
                    }
                }
            }
            StateEvent::InvalidTopic { topic, error } => {
                self.counters.count_drop(DropReason::InvalidTopic);
                warn!(route = %route, client_id = %client_id, side = self.counters.source.side, "The source broker sent a message to the invalid topic {topic:?} ({error}); acknowledged and dropped");
            }
            _ => {}
        }
    }

    /// Runs the pipeline on one message and forwards (or acknowledges) the result; holds the
    /// message when a plugin of the chain is not loaded. False when it was held.
    async fn process(
        &mut self,
        msg: Message,
        ack: Option<AckToken>,
        since: std::time::Instant,
        src_state: &mut SessionState,
    ) -> bool {
        match self
            .pipeline
            .process(msg, &mut self.out, &self.counters)
            .await
        {
            Processed::Done => {
                // Windows an aggregator closed while deciding go first.
                self.forward_released(src_state);
                let holds = self.pipeline.take_holds();
                if !holds.is_empty() {
                    // Held in windows: acknowledged when they are released (and what it was
                    // also forwarded as is acknowledged).
                    let obligations = holds.len() + usize::from(!self.out.is_empty());
                    let id = self.held.input(ack, obligations);
                    for key in holds {
                        self.held.park(id, key);
                    }
                    if !self.out.is_empty() {
                        let out = std::mem::take(&mut self.out);
                        self.forward_for_inputs(out, vec![id], src_state);
                    }
                } else if self.out.is_empty() {
                    // Handled (dropped, filtered): acknowledged at once.
                    if let Some(ack) = ack {
                        src_state.ack(ack);
                    }
                } else if let Some(lane) = &mut self.lane {
                    match &mut lane.spool {
                        Some(sp) => {
                            let mut last = 0;
                            for m in self.out.drain(..) {
                                last = sp.append(&m);
                            }
                            // Acknowledged once stored (see `ack_stored`).
                            if let Some(ack) = ack {
                                lane.acks.push_back((last, Pending::Ack(ack)));
                            }
                        }
                        None => {
                            // The spool failed after this was read: not acknowledged, so the
                            // source sends a QoS 1/2 message again; a QoS 0 one is lost.
                            self.out.clear();
                            if ack.is_none() {
                                self.counters.count_drop(DropReason::SpoolUnavailable);
                            }
                        }
                    }
                } else {
                    self.sizes.clear();
                    self.sizes.extend(self.out.iter().map(message_bytes));
                    let tokens = self.ledger.forward_sized(&self.sizes, ack, since);
                    for (m, token) in self.out.drain(..).zip(tokens) {
                        self.dst_state.publish(m, token);
                    }
                }
                true
            }
            Processed::Hold { msg, plugin } => {
                let mut waiting = self
                    .counters
                    .waiting_for_plugin
                    .lock()
                    .expect("counters lock");
                if waiting.as_deref() != Some(plugin.as_str()) {
                    warn!(route = %self.plan.route.name, client_id = %self.plan.client_id, plugin = %plugin, "The route waits for plugin \"{plugin}\", which is not loaded: it reads nothing from its source until the plugin is in the plugins folder (nothing is lost)");
                    *waiting = Some(plugin);
                }
                self.waiting.push_front((*msg, ack, since));
                self.retry_at = Some(Instant::now() + HOLD_RETRY);
                false
            }
        }
    }

    /// Publishes (or stores) messages for the held inputs `ids`: each has one obligation met
    /// when the last of them is acknowledged (or stored). None: met at once.
    fn forward_for_inputs(
        &mut self,
        out: Vec<Message>,
        ids: Vec<u64>,
        src_state: &mut SessionState,
    ) {
        if out.is_empty() {
            for id in ids {
                if let Some(Some(ack)) = self.held.done(id) {
                    src_state.ack(ack);
                }
            }
            return;
        }
        if let Some(lane) = &mut self.lane {
            // Not stored when the spool failed: the inputs stay unacknowledged; the source
            // reconnects (the spool's failure does it) and sends them again.
            if let Some(sp) = &mut lane.spool {
                let mut last = 0;
                for m in &out {
                    last = sp.append(m);
                }
                lane.acks.push_back((last, Pending::Inputs(ids)));
            }
            return;
        }
        self.sizes.clear();
        self.sizes.extend(out.iter().map(message_bytes));
        let tokens = self
            .ledger
            .forward_for_inputs(&self.sizes, ids, std::time::Instant::now());
        for (m, token) in out.into_iter().zip(tokens) {
            self.dst_state.publish(m, token);
        }
    }

    /// Publishes the window results the chain produced: each turns the hold of its window's
    /// inputs into the obligation of what it publishes (and of later windows holding it).
    fn forward_released(&mut self, src_state: &mut SessionState) {
        for Released {
            key,
            messages,
            holds,
        } in self.pipeline.take_released()
        {
            let ids = self.held.release(&key);
            let extra = holds.len() + usize::from(!messages.is_empty());
            for id in &ids {
                self.held.add(*id, extra);
                for h in &holds {
                    self.held.park(*id, h.clone());
                }
                if let Some(Some(ack)) = self.held.done(*id) {
                    src_state.ack(ack);
                }
            }
            if !messages.is_empty() {
                self.forward_for_inputs(messages, ids, src_state);
            }
        }
    }

    /// After the chain ran: an aggregator that lost its windows makes the source send them
    /// again; one that holds its policy's `maxHeld` QoS 1/2 messages (or the route's
    /// in-flight window) is asked to flush.
    async fn after_plugins(&mut self, src_state: &mut SessionState, max_inflight: usize) {
        if self.pipeline.take_lost() && !self.held.is_empty() {
            warn!(route = %self.plan.route.name, client_id = %self.plan.client_id, held = self.held.len(), "A plugin's instance was discarded with messages in its windows: the source session reconnects and its broker sends them again");
            self.reconnect_source = true;
            return;
        }
        let Some(max_held) = self.pipeline.max_held() else {
            return;
        };
        let bound = max_held.min(max_inflight).max(1);
        let holding = self.held.holding();
        if holding < self.pressure_mark {
            self.pressure_mark = 0;
        }
        if holding >= bound && holding > self.pressure_mark {
            self.pressure_mark = holding;
            self.pipeline
                .flush(FlushReason::Pressure, &self.counters)
                .await;
            self.forward_released(src_state);
        }
    }

    /// Processes the held messages in order, until one is held again.
    async fn retry_held(&mut self, src_state: &mut SessionState) {
        self.retry_at = None;
        while let Some((msg, ack, since)) = self.waiting.pop_front() {
            if !self.process(msg, ack, since, src_state).await {
                return;
            }
        }
        *self
            .counters
            .waiting_for_plugin
            .lock()
            .expect("counters lock") = None;
        info!(route = %self.plan.route.name, client_id = %self.plan.client_id, "The plugins of the route are loaded: it reads its source again");
    }

    /// Handles one event of the target session; true when a message was settled.
    fn on_target_event(
        &mut self,
        ev: StateEvent,
        src_state: &mut SessionState,
        now: std::time::Instant,
    ) -> bool {
        if let Some(lane) = &mut self.lane {
            return on_spooled_target_event(
                ev,
                &self.plan,
                lane,
                &mut self.dst_state,
                &self.counters,
            );
        }
        on_target_event(
            ev,
            &self.plan,
            (&mut self.ledger, &mut self.held),
            src_state,
            &mut self.dst_state,
            &self.counters,
            now,
        )
    }
}

/// Handles one event of the target session of a spooled route: the record (its token is its
/// sequence number) leaves the spool; true when one did.
fn on_spooled_target_event(
    ev: StateEvent,
    plan: &RouteClient,
    lane: &mut Lane,
    dst_state: &mut SessionState,
    counters: &RouteCounters,
) -> bool {
    let Some(seq) = target_outcome(ev, plan, dst_state, counters) else {
        return false;
    };
    if let Some(sp) = &mut lane.spool
        && let Some(appended_us) = sp.release(seq)
    {
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        counters
            .latency
            .observe(Duration::from_micros(now_us.saturating_sub(appended_us)));
    }
    true
}

/// Handles one event of the target session; true when a message was settled.
fn on_target_event(
    ev: StateEvent,
    plan: &RouteClient,
    (ledger, held): (&mut Ledger, &mut Held),
    src_state: &mut SessionState,
    dst_state: &mut SessionState,
    counters: &RouteCounters,
    now: std::time::Instant,
) -> bool {
    let Some(token) = target_outcome(ev, plan, dst_state, counters) else {
        return false;
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
        Settled::Inputs { ids, since } => {
            counters
                .latency
                .observe(now.saturating_duration_since(since));
            for id in ids {
                if let Some(Some(ack)) = held.done(id) {
                    src_state.ack(ack);
                }
            }
            true
        }
        Settled::Copy => true,
        Settled::Unknown => false,
    }
}

/// Counts and logs what the target session reported; the token of a copy it settled
/// (acknowledged, refused or given up), if that is what happened.
fn target_outcome(
    ev: StateEvent,
    plan: &RouteClient,
    dst_state: &mut SessionState,
    counters: &RouteCounters,
) -> Option<crate::mqtt::Token> {
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
            return None;
        }
        StateEvent::Message { ack, .. } => {
            // Nothing is subscribed on the target session: not ours to forward.
            if let Some(ack) = ack {
                dst_state.ack(ack);
            }
            return None;
        }
        _ => return None,
    };
    Some(token)
}

/// MQTT 3.1.1 retained replays: the content of the retained messages each route client
/// forwarded, by topic, for the life of the process (bounded).
mod retained {
    use std::collections::HashMap;
    use std::hash::{Hash, Hasher};
    use std::sync::Mutex;

    use crate::model::Message;

    /// Topics remembered at most; past it, replays of topics not remembered are forwarded.
    const MAX_TOPICS: usize = 100_000;

    static FORWARDED: Mutex<Option<HashMap<(String, String), u64>>> = Mutex::new(None);

    fn digest(msg: &Message) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        msg.payload.hash(&mut h);
        msg.properties.user_properties.hash(&mut h);
        h.finish()
    }

    /// Whether this retained message (on a resumed session: a replay) was forwarded before
    /// with the same content; otherwise it is remembered as forwarded now.
    pub(super) fn seen(client_id: &str, msg: &Message, resumed: bool) -> bool {
        let d = digest(msg);
        let mut map = FORWARDED.lock().expect("retained lock");
        let map = map.get_or_insert_with(HashMap::new);
        let key = (client_id.to_string(), msg.topic.to_string());
        match map.get(&key) {
            Some(old) if *old == d && resumed => true,
            _ => {
                if map.len() < MAX_TOPICS || map.contains_key(&key) {
                    map.insert(key, d);
                }
                false
            }
        }
    }
}
