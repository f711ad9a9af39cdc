//! Live counters of the route clients, their sessions and their plugin stages.
//!
//! Plain atomics, bumped with relaxed adds where things happen (a few per message on the hot
//! path); `/metrics`, `/status`, readiness and the tests read the same values. Nothing here
//! does I/O.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use crate::config::Direction;

static START: std::sync::LazyLock<std::time::Instant> =
    std::sync::LazyLock::new(std::time::Instant::now);

/// Milliseconds since the process started counting (a clock for "how long ago" in counters).
pub fn uptime_ms() -> u64 {
    uptime_ms_at(std::time::Instant::now())
}

/// [`uptime_ms`] at a clock reading the caller already has.
pub fn uptime_ms_at(now: std::time::Instant) -> u64 {
    now.saturating_duration_since(*START).as_millis() as u64
}

/// Why a received message was not forwarded to its target. The names are the `reason` label
/// of `edgebridge_messages_dropped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// A plugin decided to drop it (a filter said no, a mapper returned `drop`).
    Filtered,
    /// A plugin failed and the route's `onPluginError` is `drop`.
    PluginError,
    /// A plugin failed and the message went to the route's dead-letter topic instead.
    DeadLettered,
    /// It carried the bridge's own loop mark (or matched its MQTT 3.1.1 echo window).
    Loop,
    /// The target broker refused it (MQTT 5 reason code >= 0x80).
    RejectedByTarget,
    /// Larger than the target broker's Maximum Packet Size.
    Oversize,
    /// The target broker closed the connection right after it, three times in a row.
    Undeliverable,
    /// A QoS 0 message that arrived while the route was stalled.
    Qos0Overflow,
    /// Its topic does not match the route (a stale subscription of a resumed session).
    Unmatched,
    /// The source broker sent a topic name with wildcards or otherwise invalid.
    InvalidTopic,
    /// MQTT 3.1.1: a retained message the source broker sent again because the bridge
    /// subscribed again on a resumed session (already forwarded when it was new).
    RetainedReplay,
    /// A QoS 0 message read while the route's spool could not write (a QoS 1/2 one is not
    /// acknowledged and comes again).
    SpoolUnavailable,
}

impl DropReason {
    /// Every reason, in label order.
    pub const ALL: [DropReason; 12] = [
        DropReason::Filtered,
        DropReason::PluginError,
        DropReason::DeadLettered,
        DropReason::Loop,
        DropReason::RejectedByTarget,
        DropReason::Oversize,
        DropReason::Undeliverable,
        DropReason::Qos0Overflow,
        DropReason::Unmatched,
        DropReason::InvalidTopic,
        DropReason::RetainedReplay,
        DropReason::SpoolUnavailable,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Filtered => "filtered",
            DropReason::PluginError => "plugin_error",
            DropReason::DeadLettered => "dead_lettered",
            DropReason::Loop => "loop",
            DropReason::RejectedByTarget => "rejected_by_target",
            DropReason::Oversize => "oversize",
            DropReason::Undeliverable => "undeliverable",
            DropReason::Qos0Overflow => "qos0_overflow",
            DropReason::Unmatched => "unmatched",
            DropReason::InvalidTopic => "invalid_topic",
            DropReason::RetainedReplay => "retained_replay",
            DropReason::SpoolUnavailable => "spool_unavailable",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Upper bounds of the forward-latency histogram buckets, seconds (`+Inf` is implied).
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

/// Upper bounds of the plugin-call histogram buckets, seconds (`+Inf` is implied).
pub const CALL_BUCKETS: [f64; 16] = [
    0.000_001,
    0.000_002_5,
    0.000_005,
    0.000_01,
    0.000_025,
    0.000_05,
    0.000_1,
    0.000_25,
    0.000_5,
    0.001,
    0.002_5,
    0.005,
    0.01,
    0.025,
    0.1,
    1.0,
];

/// A histogram of durations with fixed buckets: an observation is three relaxed adds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Counts per bucket (not cumulative), then the `+Inf` bucket.
    buckets: Vec<AtomicU64>,
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// A histogram with these bucket bounds (seconds, ascending).
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// (count per bucket, not cumulative, by upper bound with `f64::MAX` for `+Inf`; sum in
    /// seconds; count).
    pub fn snapshot(&self) -> (Vec<(f64, u64)>, f64, u64) {
        let out = self
            .bounds
            .iter()
            .copied()
            .chain([f64::MAX])
            .zip(&self.buckets)
            .map(|(b, c)| (b, c.load(Ordering::Relaxed)))
            .collect();
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        (out, sum, self.count.load(Ordering::Relaxed))
    }
}

/// Connection state of a session, as `/status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Opening the transport or waiting for CONNACK.
    Connecting = 0,
    /// Connected.
    Up = 1,
    /// Waiting before the next attempt.
    BackingOff = 2,
    /// Closed for good (route stopped).
    Closed = 3,
}

impl LinkState {
    /// The name shown in `/status`.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Up => "connected",
            LinkState::BackingOff => "backing off",
            LinkState::Closed => "closed",
        }
    }
}

/// Counters of one MQTT session (the source or the target of a route client).
#[derive(Debug)]
pub struct SessionCounters {
    /// `local` or `remote`.
    pub side: &'static str,
    state: AtomicU8,
    /// Successful CONNACKs.
    pub connects: AtomicU64,
    /// Failed connection attempts and lost connections.
    pub failures: AtomicU64,
    /// The broker answered session-present = 0 where the bridge expected its persistent
    /// session: messages it queued for the bridge may be lost.
    pub source_lost: AtomicU64,
    /// The subscription of the current connection was granted (source sessions).
    pub subscribed: AtomicBool,
    last_error: Mutex<Option<(String, SystemTime)>>,
    /// Fresh tokens presented with AUTH on the open connection (MQTT 5 re-authentication).
    pub reauth_in_place: AtomicU64,
    /// Fresh tokens presented by reconnecting: the broker granted no authentication method,
    /// refused the AUTH, or did not answer it in time.
    pub reauth_reconnect: AtomicU64,
    /// Where the connection goes and how it last presented a token.
    link: Mutex<LinkInfo>,
}

/// The address of a session's current (or last) connection, whether it goes through an HTTP
/// proxy, and its last token refresh.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkInfo {
    /// `host:port` of the broker connected to (or being tried).
    pub address: String,
    /// The proxy's `host:port`, when the connection is tunnelled through one.
    pub proxy: Option<String>,
    /// The last fresh token presented, and how: `in-place` (AUTH) or `reconnect`.
    pub last_refresh: Option<(SystemTime, &'static str)>,
}

impl SessionCounters {
    /// Counters of a session on `side`.
    pub fn new(side: &'static str) -> SessionCounters {
        SessionCounters {
            side,
            state: AtomicU8::new(LinkState::Connecting as u8),
            connects: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            source_lost: AtomicU64::new(0),
            subscribed: AtomicBool::new(false),
            last_error: Mutex::new(None),
            reauth_in_place: AtomicU64::new(0),
            reauth_reconnect: AtomicU64::new(0),
            link: Mutex::new(LinkInfo::default()),
        }
    }

    /// Records the address (and proxy) of the connection being made.
    pub fn set_address(&self, address: String, proxy: Option<String>) {
        let mut l = self.link.lock().expect("link info lock");
        l.address = address;
        l.proxy = proxy;
    }

    /// Records a fresh token presented `how` (`in-place` or `reconnect`).
    pub fn token_refreshed(&self, how: &'static str) {
        match how {
            "in-place" => &self.reauth_in_place,
            _ => &self.reauth_reconnect,
        }
        .fetch_add(1, Ordering::Relaxed);
        self.link.lock().expect("link info lock").last_refresh = Some((SystemTime::now(), how));
    }

    /// Address, proxy and last token refresh.
    pub fn link_info(&self) -> LinkInfo {
        self.link.lock().expect("link info lock").clone()
    }

    /// Sets the connection state.
    pub fn set_state(&self, s: LinkState) {
        self.state.store(s as u8, Ordering::Relaxed);
        if s != LinkState::Up {
            self.subscribed.store(false, Ordering::Relaxed);
        }
    }

    /// The connection state.
    pub fn state(&self) -> LinkState {
        match self.state.load(Ordering::Relaxed) {
            0 => LinkState::Connecting,
            1 => LinkState::Up,
            2 => LinkState::BackingOff,
            _ => LinkState::Closed,
        }
    }

    /// Whether connected now.
    pub fn connected(&self) -> bool {
        self.state() == LinkState::Up
    }

    /// Connections after the first one.
    pub fn reconnects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed).saturating_sub(1)
    }

    /// Records the error that ended or prevented a connection.
    pub fn set_error(&self, message: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().expect("last error lock") = Some((message, SystemTime::now()));
    }

    /// The last error and when it happened.
    pub fn last_error(&self) -> Option<(String, SystemTime)> {
        self.last_error.lock().expect("last error lock").clone()
    }
}

/// Counters of one route client: what it received, forwarded and dropped, and its sessions.
#[derive(Debug)]
pub struct RouteCounters {
    /// Route name.
    pub route: String,
    /// Route direction.
    pub direction: Direction,
    /// Client ID on both brokers.
    pub client_id: String,
    /// Messages received from the source broker.
    pub received: AtomicU64,
    /// Copies acknowledged by the target broker (QoS 0: written to it).
    pub forwarded: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
    /// Messages received flagged as redeliveries.
    pub redelivered: AtomicU64,
    /// Plugin failures (trap, error, refused decision, missing plugin, open breaker).
    pub plugin_errors: AtomicU64,
    /// Copies forwarded and not yet acknowledged by the target (gauge).
    pub in_flight: AtomicU64,
    /// Their payload and topic bytes (gauge).
    pub in_flight_bytes: AtomicU64,
    /// Source messages an aggregator holds in windows (gauge).
    pub held: AtomicU64,
    /// Source receipt to target acknowledgement of each message.
    pub latency: Histogram,
    /// The session subscribed on the source broker.
    pub source: Arc<SessionCounters>,
    /// The session publishing to the target broker.
    pub target: Arc<SessionCounters>,
    /// [`uptime_ms`] when the target last settled a message.
    pub last_progress_ms: AtomicU64,
    /// [`uptime_ms`] when messages started waiting (nothing in flight before).
    pub busy_since_ms: AtomicU64,
    /// The plugin the route waits for (not loaded): it does not read its source meanwhile.
    pub waiting_for_plugin: Mutex<Option<String>>,
    /// The route's plugin chain, in order.
    pub plugins: Vec<String>,
    /// The route client's spool, when it has one.
    pub spool: Option<Arc<crate::spool::SpoolCounters>>,
}

impl RouteCounters {
    /// Counters for a route client reading from `source` and writing to `target`.
    pub fn new(
        route: &str,
        direction: Direction,
        client_id: &str,
        source: &'static str,
        target: &'static str,
    ) -> RouteCounters {
        RouteCounters {
            route: route.to_string(),
            direction,
            client_id: client_id.to_string(),
            received: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            dropped: Default::default(),
            redelivered: AtomicU64::new(0),
            plugin_errors: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            in_flight_bytes: AtomicU64::new(0),
            held: AtomicU64::new(0),
            latency: Histogram::new(&LATENCY_BUCKETS),
            source: Arc::new(SessionCounters::new(source)),
            target: Arc::new(SessionCounters::new(target)),
            last_progress_ms: AtomicU64::new(0),
            busy_since_ms: AtomicU64::new(0),
            waiting_for_plugin: Mutex::new(None),
            plugins: Vec::new(),
            spool: None,
        }
    }

    /// Adds one to a counter.
    pub fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a message not forwarded.
    pub fn count_drop(&self, reason: DropReason) {
        self.dropped[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Messages dropped for `reason` so far.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason.index()].load(Ordering::Relaxed)
    }

    /// Subscribed on the source and connected to the target.
    pub fn ready(&self) -> bool {
        self.source.subscribed.load(Ordering::Relaxed) && self.target.connected()
    }

    /// A snapshot of the message counters.
    pub fn snapshot(&self) -> Counts {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut dropped = [0; DropReason::ALL.len()];
        for (i, c) in self.dropped.iter().enumerate() {
            dropped[i] = g(c);
        }
        Counts {
            received: g(&self.received),
            forwarded: g(&self.forwarded),
            dropped,
            redelivered: g(&self.redelivered),
            plugin_errors: g(&self.plugin_errors),
            in_flight: g(&self.in_flight),
            held: g(&self.held),
        }
    }
}

/// A snapshot of [`RouteCounters`] (or their sum over a route's clients).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// See [`RouteCounters::received`].
    pub received: u64,
    /// See [`RouteCounters::forwarded`].
    pub forwarded: u64,
    dropped: [u64; DropReason::ALL.len()],
    /// See [`RouteCounters::redelivered`].
    pub redelivered: u64,
    /// See [`RouteCounters::plugin_errors`].
    pub plugin_errors: u64,
    /// See [`RouteCounters::in_flight`].
    pub in_flight: u64,
    /// See [`RouteCounters::held`].
    pub held: u64,
}

impl Counts {
    /// Messages dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason.index()]
    }
}

impl std::ops::Add for Counts {
    type Output = Counts;
    fn add(self, o: Counts) -> Counts {
        let mut dropped = self.dropped;
        for (d, x) in dropped.iter_mut().zip(o.dropped) {
            *d += x;
        }
        Counts {
            received: self.received + o.received,
            forwarded: self.forwarded + o.forwarded,
            dropped,
            redelivered: self.redelivered + o.redelivered,
            plugin_errors: self.plugin_errors + o.plugin_errors,
            in_flight: self.in_flight + o.in_flight,
            held: self.held + o.held,
        }
    }
}

/// What a plugin call ended in; the `outcome` label of `edgebridge_plugin_calls_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    /// Forward unchanged (a filter's `true`, a mapper's `pass`).
    Pass,
    /// Drop (a filter's `false`, a mapper's `drop`).
    Drop,
    /// Emit messages.
    Emit,
    /// The plugin returned an error.
    Error,
    /// The call trapped (panic, time budget, memory limit).
    Trap,
    /// The decision broke the policy or the route's limits.
    Refused,
    /// Not called: the circuit breaker is open.
    BreakerOpen,
    /// An aggregator held the message in a window.
    Hold,
    /// Its instance could not be started.
    StartFailed,
}

impl CallOutcome {
    /// Every outcome, in label order.
    pub const ALL: [CallOutcome; 9] = [
        CallOutcome::Pass,
        CallOutcome::Drop,
        CallOutcome::Emit,
        CallOutcome::Error,
        CallOutcome::Trap,
        CallOutcome::Refused,
        CallOutcome::BreakerOpen,
        CallOutcome::StartFailed,
        CallOutcome::Hold,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            CallOutcome::Pass => "pass",
            CallOutcome::Drop => "drop",
            CallOutcome::Emit => "emit",
            CallOutcome::Error => "error",
            CallOutcome::Trap => "trap",
            CallOutcome::Refused => "refused",
            CallOutcome::BreakerOpen => "breaker_open",
            CallOutcome::StartFailed => "start_failed",
            CallOutcome::Hold => "hold",
        }
    }
}

/// Bounds of the timer lateness histogram, seconds.
pub const LATENESS_BUCKETS: [f64; 9] = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0];

/// Counters of one plugin on one route (shared by the route's clients).
#[derive(Debug)]
pub struct PluginCounters {
    /// Plugin name.
    pub plugin: String,
    /// Route name.
    pub route: String,
    calls: [AtomicU64; CallOutcome::ALL.len()],
    /// Duration of each call that ran.
    pub duration: Histogram,
    /// Whether the circuit breaker of a stage is open now (gauge, 0/1).
    pub breaker_open: AtomicU64,
    /// Log lines the plugin wrote beyond its policy's rate, dropped.
    pub log_dropped: AtomicU64,
    /// The metrics the plugin declared itself (WIT 0.2 `metrics`).
    pub own: Arc<std::sync::Mutex<crate::plugin::own_metrics::OwnMetrics>>,
    /// Timers that fired (WIT 0.2 `timers`).
    pub timers_fired: AtomicU64,
    /// How late each timer fired.
    pub timer_lateness: Histogram,
    /// Timers set now (gauge).
    pub timers_set: AtomicU64,
    /// Messages held in windows now (gauge).
    pub held: AtomicU64,
    /// Flushes by reason: stop, upgrade, pressure.
    pub flushes: [AtomicU64; 3],
}

impl PluginCounters {
    /// Counters for `plugin` on `route` (a running bridge keeps them in [`Stats::plugin`]).
    pub fn new(plugin: &str, route: &str) -> PluginCounters {
        PluginCounters {
            plugin: plugin.to_string(),
            route: route.to_string(),
            calls: Default::default(),
            duration: Histogram::new(&CALL_BUCKETS),
            breaker_open: AtomicU64::new(0),
            log_dropped: AtomicU64::new(0),
            own: Default::default(),
            timers_fired: AtomicU64::new(0),
            timer_lateness: Histogram::new(&LATENESS_BUCKETS),
            timers_set: AtomicU64::new(0),
            held: AtomicU64::new(0),
            flushes: Default::default(),
        }
    }

    /// Counts one call.
    pub fn call(&self, outcome: CallOutcome) {
        self.calls[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Calls with `outcome` so far.
    pub fn calls(&self, outcome: CallOutcome) -> u64 {
        self.calls[outcome as usize].load(Ordering::Relaxed)
    }
}

/// The outcome of the last configuration reload.
#[derive(Debug, Clone)]
pub struct ReloadOutcome {
    /// When it happened.
    pub at: SystemTime,
    /// Every problem found (empty: applied).
    pub errors: Vec<String>,
    /// What changed: routes started, restarted, stopped.
    pub summary: String,
}

/// Everything this process counts: its route clients (which come and go with configuration
/// reloads), their plugins, configuration reloads, and its internal tasks.
#[derive(Debug, Default)]
pub struct Stats {
    clients: RwLock<Vec<Arc<RouteCounters>>>,
    plugins: RwLock<Vec<Arc<PluginCounters>>>,
    /// Reloads applied (including ones that changed nothing).
    pub reloads_ok: AtomicU64,
    /// Reloads refused (the configuration had problems; nothing changed).
    pub reloads_failed: AtomicU64,
    /// The last reload.
    pub last_reload: Mutex<Option<ReloadOutcome>>,
    /// Internal tasks that ended although nothing asked them to (a failure of the process).
    pub dead_tasks: Mutex<Vec<String>>,
}

impl Stats {
    /// Adds a route client.
    pub fn register(&self, c: Arc<RouteCounters>) {
        self.clients.write().expect("stats lock").push(c);
    }

    /// Removes a route client.
    pub fn unregister(&self, c: &Arc<RouteCounters>) {
        self.clients
            .write()
            .expect("stats lock")
            .retain(|x| !Arc::ptr_eq(x, c));
    }

    /// Every route client, in start order.
    pub fn clients(&self) -> Vec<Arc<RouteCounters>> {
        self.clients.read().expect("stats lock").clone()
    }

    /// The counters of `plugin` on `route` (created on first use, shared afterwards).
    pub fn plugin(&self, plugin: &str, route: &str) -> Arc<PluginCounters> {
        let mut all = self.plugins.write().expect("stats lock");
        if let Some(p) = all.iter().find(|p| p.plugin == plugin && p.route == route) {
            return p.clone();
        }
        let p = Arc::new(PluginCounters::new(plugin, route));
        all.push(p.clone());
        p
    }

    /// Every plugin's counters.
    pub fn plugins(&self) -> Vec<Arc<PluginCounters>> {
        self.plugins.read().expect("stats lock").clone()
    }

    /// Sum over the clients of `route` (zero if this process runs none of them).
    pub fn route(&self, route: &str) -> Counts {
        self.clients()
            .iter()
            .filter(|c| c.route == route)
            .fold(Counts::default(), |acc, c| acc + c.snapshot())
    }

    /// One client, by client ID.
    pub fn client(&self, client_id: &str) -> Option<Counts> {
        self.clients()
            .iter()
            .find(|c| c.client_id == client_id)
            .map(|c| c.snapshot())
    }

    /// Whether every client subscribed on its source and connected to its target.
    pub fn ready(&self) -> bool {
        self.clients().iter().all(|c| c.ready())
    }

    /// Client IDs, route names and counters of every client.
    pub fn all(&self) -> Vec<(String, String, Counts)> {
        self.clients()
            .iter()
            .map(|c| (c.client_id.clone(), c.route.clone(), c.snapshot()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_histogram_counts_per_bucket_with_sum_and_count() {
        let h = Histogram::new(&LATENCY_BUCKETS);
        h.observe(Duration::from_micros(40));
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_secs(60));
        let (buckets, sum, count) = h.snapshot();
        assert_eq!(count, 3);
        assert!((sum - 60.00034).abs() < 1e-6, "{sum}");
        assert_eq!(buckets[0], (0.000_05, 1));
        assert_eq!(buckets[3], (0.000_5, 1));
        assert_eq!(buckets.len(), LATENCY_BUCKETS.len() + 1);
        assert_eq!(
            *buckets.last().unwrap(),
            (f64::MAX, 1),
            "60 s is in +Inf only"
        );
    }

    #[test]
    fn drop_reasons_have_distinct_labels_in_index_order() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        let mut labels: Vec<&str> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
        labels.sort();
        labels.dedup();
        assert_eq!(labels.len(), DropReason::ALL.len());
    }
}
