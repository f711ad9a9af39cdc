//! The one place that wires sessions to routes: for every pipe this instance runs, a source
//! session (persistent, manual acks) and a target session, and the task between them that
//! forwards each message and acknowledges it to the source only after the target
//! acknowledged the forwarded copy.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use crate::config::{Config, Connector, Protocol};
use crate::model::{Message, Properties};
use crate::mqtt::session::{self, SessionEvent, SessionOptions};
use crate::mqtt::{AckToken, StateEvent, SubFilter, Token, Version};
use crate::routing::{self, LoopGuard, LoopVerdict, Pipe, Side};
use crate::{embedded, topic};

/// Runtime settings that are not part of the YAML.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// This process's instance index (0-based) among `bridgeInstances`; `None` runs all routes
    /// when `bridgeInstances` is 1 and is an error otherwise (see [`resolve_instance`]).
    pub instance: Option<u32>,
    /// Loop-prevention identity; default `{connector}-{random}` per process.
    pub bridge_id: Option<String>,
    /// Most messages one pipe forwards before their target acknowledgements arrive.
    pub max_inflight: u16,
    /// Session expiry requested for the persistent source sessions (MQTT 5), seconds.
    pub session_expiry: u32,
    /// Keep alive of every session.
    pub keep_alive: Duration,
    /// Reconnect backoff (first delay, cap).
    pub backoff: (Duration, Duration),
    /// How long shutdown waits for in-flight messages to be acknowledged.
    pub drain_timeout: Duration,
    /// Largest packet accepted from a broker, bytes.
    pub max_packet: usize,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            instance: None,
            bridge_id: None,
            max_inflight: 256,
            session_expiry: 24 * 3600,
            keep_alive: Duration::from_secs(30),
            backoff: (Duration::from_millis(100), Duration::from_secs(30)),
            drain_timeout: Duration::from_secs(5),
            max_packet: 16 * 1024 * 1024,
        }
    }
}

/// Errors that stop the bridge from starting.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// An embedded broker did not start.
    #[error(transparent)]
    Embedded(#[from] embedded::EmbeddedError),
    /// The instance index does not fit `bridgeInstances`.
    #[error("connector \"{connector}\": {message}")]
    Instance {
        /// Connector name.
        connector: String,
        /// What is wrong.
        message: String,
    },
}

/// Live counters of one route client (one pipe).
#[derive(Debug, Default)]
pub struct PipeStats {
    /// Messages received from the source broker.
    pub received: AtomicU64,
    /// Messages acknowledged by the target broker (QoS 0: written to it).
    pub forwarded: AtomicU64,
    /// Dropped: carried our loop mark or matched our recent echo.
    pub dropped_loop: AtomicU64,
    /// Dropped: topic does not match the route (e.g. a stale subscription of a resumed session).
    pub dropped_unmatched: AtomicU64,
    /// Dropped: QoS 0 message while the route was behind.
    pub dropped_qos0_overflow: AtomicU64,
    /// Refused by the target broker (MQTT 5 reason code >= 0x80); acknowledged to the source.
    pub rejected: AtomicU64,
    /// Messages received flagged as redeliveries.
    pub redelivered: AtomicU64,
    /// Successful SUBACKs on the source session (one per connect).
    pub subscribed: AtomicU64,
    /// Successful CONNACKs on the target session.
    pub target_connects: AtomicU64,
}

impl PipeStats {
    /// Subscribed on the source and connected to the target at least once.
    pub fn ready(&self) -> bool {
        self.subscribed.load(Ordering::Relaxed) > 0
            && self.target_connects.load(Ordering::Relaxed) > 0
    }

    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Counts {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counts {
            received: g(&self.received),
            forwarded: g(&self.forwarded),
            dropped_loop: g(&self.dropped_loop),
            dropped_unmatched: g(&self.dropped_unmatched),
            dropped_qos0_overflow: g(&self.dropped_qos0_overflow),
            rejected: g(&self.rejected),
            redelivered: g(&self.redelivered),
        }
    }
}

/// A snapshot of [`PipeStats`] (or their sum over a route's clients).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// See [`PipeStats::received`].
    pub received: u64,
    /// See [`PipeStats::forwarded`].
    pub forwarded: u64,
    /// See [`PipeStats::dropped_loop`].
    pub dropped_loop: u64,
    /// See [`PipeStats::dropped_unmatched`].
    pub dropped_unmatched: u64,
    /// See [`PipeStats::dropped_qos0_overflow`].
    pub dropped_qos0_overflow: u64,
    /// See [`PipeStats::rejected`].
    pub rejected: u64,
    /// See [`PipeStats::redelivered`].
    pub redelivered: u64,
}

impl std::ops::Add for Counts {
    type Output = Counts;
    fn add(self, o: Counts) -> Counts {
        Counts {
            received: self.received + o.received,
            forwarded: self.forwarded + o.forwarded,
            dropped_loop: self.dropped_loop + o.dropped_loop,
            dropped_unmatched: self.dropped_unmatched + o.dropped_unmatched,
            dropped_qos0_overflow: self.dropped_qos0_overflow + o.dropped_qos0_overflow,
            rejected: self.rejected + o.rejected,
            redelivered: self.redelivered + o.redelivered,
        }
    }
}

/// Counters of every route client this process runs.
#[derive(Debug, Default)]
pub struct Stats {
    clients: Vec<(String, String, Arc<PipeStats>)>,
}

impl Stats {
    /// Sum over the clients of `route` (zero if this process runs none of them).
    pub fn route(&self, route: &str) -> Counts {
        self.clients
            .iter()
            .filter(|(_, r, _)| r == route)
            .fold(Counts::default(), |acc, (_, _, s)| acc + s.snapshot())
    }

    /// One client, by client ID.
    pub fn client(&self, client_id: &str) -> Option<Counts> {
        self.clients
            .iter()
            .find(|(c, _, _)| c == client_id)
            .map(|(_, _, s)| s.snapshot())
    }

    /// Whether every client subscribed on its source and connected to its target.
    pub fn ready(&self) -> bool {
        self.clients.iter().all(|(_, _, s)| s.ready())
    }

    /// Client IDs, route names and counters of every client.
    pub fn all(&self) -> Vec<(String, String, Counts)> {
        self.clients
            .iter()
            .map(|(c, r, s)| (c.clone(), r.clone(), s.snapshot()))
            .collect()
    }
}

/// A started bridge.
pub struct RunningBridge {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    sessions: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    /// Live counters.
    pub stats: Arc<Stats>,
    /// The pipes this instance runs.
    pub pipes: Vec<Pipe>,
}

impl RunningBridge {
    /// Stops taking new messages, waits (up to the drain timeout) for in-flight ones to be
    /// acknowledged end to end, then disconnects every session.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }

    /// Ends every task and drops every connection at once without draining or acknowledging
    /// anything more, as a crash would (for tests of restarts).
    pub fn abort(self) {
        for s in self.sessions.lock().expect("sessions lock").iter() {
            s.abort();
        }
        for t in &self.tasks {
            t.abort();
        }
    }

    /// Waits until every client is subscribed and connected, or `timeout` passes.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if self.stats.ready() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.stats.ready()
    }
}

/// Decides the instance index of this process for a connector.
pub fn resolve_instance(connector: &Connector, requested: Option<u32>) -> Result<u32, BridgeError> {
    let n = connector.bridge_instances;
    let index = match requested {
        Some(i) => i,
        None if n == 1 => 0,
        None => {
            let host = hostname();
            routing::ordinal_from_hostname(&host).ok_or_else(|| BridgeError::Instance {
                connector: connector.name.clone(),
                message: format!(
                    "bridgeInstances is {n}: give --instance <0..{}> or run with a host name ending in -<index> (this host: \"{host}\")",
                    n - 1
                ),
            })?
        }
    };
    if index >= n {
        return Err(BridgeError::Instance {
            connector: connector.name.clone(),
            message: format!("instance {index} is out of range for bridgeInstances {n}"),
        });
    }
    Ok(index)
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Starts embedded brokers and every pipe of every connector.
pub async fn start(config: &Config, opts: &RunOptions) -> Result<RunningBridge, BridgeError> {
    let (stop, stop_rx) = watch::channel(false);
    let sessions = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    let mut stats = Stats::default();
    let mut all_pipes = Vec::new();
    for connector in &config.connectors {
        for conn in [&connector.local, &connector.remote] {
            if conn.endpoint.embedded {
                let endpoint = conn.endpoint.clone();
                let protocol = connector.protocol;
                tokio::task::spawn_blocking(move || embedded::start(&endpoint, protocol))
                    .await
                    .expect("embedded broker start does not panic")?;
            }
        }
        let index = resolve_instance(connector, opts.instance)?;
        let pipes = routing::plan(connector, index, connector.bridge_instances);
        if connector.routes.is_empty() {
            warn!(connector = %connector.name, "No MqttBridgeTopicMap references this connector; nothing to bridge");
        }
        info!(
            connector = %connector.name,
            instance = index,
            instances = connector.bridge_instances,
            routes = connector.routes.len(),
            clients = pipes.len(),
            "Starting"
        );
        let bridge_id = opts
            .bridge_id
            .clone()
            .unwrap_or_else(|| format!("{}-{:08x}", connector.name, fastrand::u32(..)));
        let guard = Arc::new(Mutex::new(LoopGuard::new(
            bridge_id,
            Duration::from_secs(10),
            100_000,
        )));
        let shared = Arc::new(Shared {
            connector: connector.clone(),
            local: Arc::new(connector.local.clone()),
            remote: Arc::new(connector.remote.clone()),
            opts: opts.clone(),
            guard,
            sessions: sessions.clone(),
        });
        for pipe in pipes {
            let route_stats = Arc::new(PipeStats::default());
            stats.clients.push((
                pipe.client_id.clone(),
                pipe.route.name.clone(),
                route_stats.clone(),
            ));
            all_pipes.push(pipe.clone());
            tasks.push(tokio::spawn(run_pipe(
                pipe,
                shared.clone(),
                route_stats,
                stop_rx.clone(),
            )));
        }
    }
    Ok(RunningBridge {
        stop,
        tasks,
        sessions,
        stats: Arc::new(stats),
        pipes: all_pipes,
    })
}

/// Runs until `shutdown` completes, then drains and stops.
pub async fn run(
    config: &Config,
    opts: &RunOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), BridgeError> {
    let bridge = start(config, opts).await?;
    shutdown.await;
    info!("Shutting down: finishing in-flight messages");
    bridge.shutdown().await;
    Ok(())
}

struct Shared {
    connector: Connector,
    local: Arc<crate::config::BrokerConnection>,
    remote: Arc<crate::config::BrokerConnection>,
    opts: RunOptions,
    guard: Arc<Mutex<LoopGuard>>,
    sessions: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Shared {
    fn conn(&self, side: Side) -> Arc<crate::config::BrokerConnection> {
        match side {
            Side::Local => self.local.clone(),
            Side::Remote => self.remote.clone(),
        }
    }
}

async fn run_pipe(
    pipe: Pipe,
    shared: Arc<Shared>,
    stats: Arc<PipeStats>,
    mut stop: watch::Receiver<bool>,
) {
    let v5 = shared.connector.protocol == Protocol::V5;
    let version = if v5 { Version::V5 } else { Version::V4 };
    let opts = &shared.opts;
    let route = &pipe.route;
    let label = match pipe.share_index {
        Some(i) => format!("route \"{}\" client {i}", route.name),
        None => format!("route \"{}\"", route.name),
    };
    let base = SessionOptions {
        label: String::new(),
        version,
        conn: shared.conn(pipe.source),
        client_id: pipe.client_id.clone(),
        clean_start: false,
        session_expiry: v5.then_some(opts.session_expiry),
        subscriptions: Vec::new(),
        max_inflight: opts.max_inflight,
        receive_maximum: opts.max_inflight,
        keep_alive: opts.keep_alive,
        backoff: opts.backoff,
        max_packet: opts.max_packet,
    };
    // Source: a persistent session, so that whatever the bridge has not acknowledged stays
    // with the source broker across remote outages and bridge restarts.
    let source_opts = SessionOptions {
        label: format!("{label} source ({})", pipe.source.as_str()),
        subscriptions: vec![SubFilter {
            filter: pipe.subscription.clone(),
            qos: route.qos,
        }],
        ..base.clone()
    };
    // Target: a clean session per process. Packet ids restart at 1 after a bridge restart, and
    // a resumed target session could take a new QoS 2 publish for a stale duplicate.
    let target_opts = SessionOptions {
        label: format!("{label} target ({})", pipe.target.as_str()),
        conn: shared.conn(pipe.target),
        clean_start: true,
        session_expiry: None,
        ..base
    };
    let capacity = opts.max_inflight as usize * 2 + 64;
    let (src, mut src_ev, src_task) = session::spawn(source_opts, capacity);
    let (dst, mut dst_ev, dst_task) = session::spawn(target_opts, capacity);
    shared
        .sessions
        .lock()
        .expect("sessions lock")
        .extend([src_task.abort_handle(), dst_task.abort_handle()]);

    let mut pending: HashMap<Token, Option<AckToken>> = HashMap::new();
    let mut next_token: Token = 0;
    let mut stopping: Option<tokio::time::Instant> = None;
    let max_pending = opts.max_inflight as usize;
    loop {
        let can_take = stopping.is_none() && pending.len() < max_pending;
        let drain_deadline = stopping.unwrap_or_else(tokio::time::Instant::now);
        tokio::select! {
            ev = src_ev.recv(), if can_take => match ev {
                Some(SessionEvent::State(StateEvent::Message { msg, ack, dup })) => {
                    PipeStats::add(&stats.received);
                    if dup {
                        PipeStats::add(&stats.redelivered);
                    }
                    match prepare(&pipe, &shared, msg, v5) {
                        Ok(out) => {
                            next_token += 1;
                            pending.insert(next_token, ack);
                            dst.publish(out, next_token);
                        }
                        Err(reason) => {
                            match reason {
                                Skip::Loop => PipeStats::add(&stats.dropped_loop),
                                Skip::Unmatched => PipeStats::add(&stats.dropped_unmatched),
                            }
                            debug!(route = %route.name, ?reason, "Message not forwarded");
                            if let Some(ack) = ack {
                                src.ack(ack);
                            }
                        }
                    }
                }
                Some(SessionEvent::State(StateEvent::Subscribed(result))) => {
                    for (filter, code) in result {
                        if code >= 0x80 {
                            error!(route = %route.name, client_id = %pipe.client_id, filter = %filter, "Source broker refused the subscription (code {code:#04x}); no messages flow on this client until it reconnects");
                        } else {
                            PipeStats::add(&stats.subscribed);
                            info!(route = %route.name, client_id = %pipe.client_id, filter = %filter, granted_qos = code, "Subscribed");
                        }
                    }
                }
                Some(SessionEvent::DroppedQos0) => {
                    PipeStats::add(&stats.dropped_qos0_overflow);
                }
                Some(_) => {}
                None => break,
            },
            ev = dst_ev.recv() => match ev {
                Some(SessionEvent::State(StateEvent::Delivered(token))) => {
                    if let Some(ack) = pending.remove(&token) {
                        PipeStats::add(&stats.forwarded);
                        if let Some(ack) = ack {
                            src.ack(ack);
                        }
                    }
                }
                Some(SessionEvent::State(StateEvent::Rejected(token, code))) => {
                    if let Some(ack) = pending.remove(&token) {
                        PipeStats::add(&stats.rejected);
                        error!(route = %route.name, client_id = %pipe.client_id, "Target broker refused a message (reason code {code:#04x}); it is acknowledged to the source and lost");
                        if let Some(ack) = ack {
                            src.ack(ack);
                        }
                    }
                }
                Some(SessionEvent::State(StateEvent::Connected { .. })) => {
                    PipeStats::add(&stats.target_connects);
                }
                Some(_) => {}
                None => break,
            },
            _ = stop.changed(), if stopping.is_none() => {
                stopping = Some(tokio::time::Instant::now() + opts.drain_timeout);
            }
            _ = tokio::time::sleep_until(drain_deadline), if stopping.is_some() => {
                warn!(route = %route.name, in_flight = pending.len(), "Shutdown: in-flight messages not acknowledged in time; the source broker redelivers them");
                break;
            }
        }
        if stopping.is_some() && pending.is_empty() {
            break;
        }
    }
    // Dropping the handles makes both sessions write what is queued (the last acks), send
    // DISCONNECT and end.
    drop(src);
    drop(dst);
    drop(src_ev);
    drop(dst_ev);
    let _ = src_task.await;
    let _ = dst_task.await;
}

#[derive(Debug, Clone, Copy)]
enum Skip {
    Loop,
    Unmatched,
}

fn prepare(pipe: &Pipe, shared: &Shared, msg: Message, v5: bool) -> Result<Message, Skip> {
    let route = &pipe.route;
    if !topic::matches(&route.source, &msg.topic) {
        return Err(Skip::Unmatched);
    }
    let now = Instant::now();
    let mut guard = shared.guard.lock().expect("loop guard lock");
    if guard.check(pipe.source, &msg, v5, now) != LoopVerdict::Forward {
        return Err(Skip::Loop);
    }
    let mut out = Message {
        topic: routing::target_topic(route, &msg.topic).to_string(),
        payload: msg.payload,
        qos: route.qos,
        retain: msg.retain,
        properties: if v5 {
            msg.properties
        } else {
            Properties::default()
        },
    };
    guard.mark(pipe.target, &mut out, v5, now);
    Ok(out)
}
