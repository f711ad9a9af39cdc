//! The one place that wires sessions to routes: for every pipe this instance runs, a source
//! session (persistent, manual acks) and a target session, and the task between them that
//! forwards each message and acknowledges it to the source only after the target
//! acknowledged the forwarded copy.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use crate::config::{Config, Connector, OnPluginError, Protocol};
use crate::credentials::Provider;
use crate::model::{Message, Properties};
use crate::mqtt::SessionHandle;
use crate::mqtt::session::{self, SessionEvent, SessionOptions};
use crate::mqtt::{AckToken, StateEvent, SubFilter, Token, Version};
use crate::plugin::stage::{Outcome, RouteInfo, Stage};
use crate::plugin::{PluginError, Registry, Runtime, Uses};
use crate::policy::Policies;
use crate::routing::{self, LoopGuard, LoopVerdict, Pipe, Side};
use crate::{embedded, topic};

/// Default plugins folder.
pub const DEFAULT_PLUGINS_DIR: &str = "/etc/edgebridge/plugins";
/// Default policies folder.
pub const DEFAULT_POLICIES_DIR: &str = "/etc/edgebridge/policies";

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
    /// Folder of plugin components (`<name>.wasm`), watched for changes.
    pub plugins_dir: PathBuf,
    /// Folder of plugin policies (`*.yaml`).
    pub policies_dir: PathBuf,
    /// How often the plugins folder is checked for changes.
    pub reload_interval: Duration,
    /// Where managed-identity tokens come from.
    pub identity: crate::credentials::IdentityOptions,
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
            plugins_dir: PathBuf::from(DEFAULT_PLUGINS_DIR),
            policies_dir: PathBuf::from(DEFAULT_POLICIES_DIR),
            reload_interval: Duration::from_secs(1),
            identity: crate::credentials::IdentityOptions::from_env(),
        }
    }
}

/// Errors that stop the bridge from starting.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// An embedded broker did not start.
    #[error(transparent)]
    Embedded(#[from] embedded::EmbeddedError),
    /// A policy file is invalid.
    #[error("invalid plugin policies:\n{0}")]
    Policies(crate::config::ConfigReport),
    /// A plugin that a route uses could not be loaded or refused the route's config.
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Plugins(Vec<PluginError>),
    /// The plugin runtime could not start.
    #[error("plugin runtime: {0}")]
    Runtime(String),
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
    /// Dropped by a plugin's decision (filtered out), acknowledged.
    pub dropped_by_plugin: AtomicU64,
    /// Plugin failures (trap, error, refused decision, missing plugin, open breaker).
    pub plugin_errors: AtomicU64,
    /// Messages dropped because a plugin failed and the route's policy is `drop`.
    pub dropped_plugin_error: AtomicU64,
    /// Messages published to the dead-letter topic.
    pub dead_lettered: AtomicU64,
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
            dropped_by_plugin: g(&self.dropped_by_plugin),
            plugin_errors: g(&self.plugin_errors),
            dropped_plugin_error: g(&self.dropped_plugin_error),
            dead_lettered: g(&self.dead_lettered),
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
    /// See [`PipeStats::dropped_by_plugin`].
    pub dropped_by_plugin: u64,
    /// See [`PipeStats::plugin_errors`].
    pub plugin_errors: u64,
    /// See [`PipeStats::dropped_plugin_error`].
    pub dropped_plugin_error: u64,
    /// See [`PipeStats::dead_lettered`].
    pub dead_lettered: u64,
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
            dropped_by_plugin: self.dropped_by_plugin + o.dropped_by_plugin,
            plugin_errors: self.plugin_errors + o.plugin_errors,
            dropped_plugin_error: self.dropped_plugin_error + o.dropped_plugin_error,
            dead_lettered: self.dead_lettered + o.dead_lettered,
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
    /// The running plugin versions (empty when no route uses plugins).
    pub plugins: Arc<Registry>,
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
    let loaded = load_plugins(config, &opts.plugins_dir, &opts.policies_dir).await?;
    let registry = loaded
        .as_ref()
        .map(|l| l.registry.clone())
        .unwrap_or_default();
    let runtime = loaded.map(|l| {
        tasks.push(l.registry.clone().watch(
            l.runtime.clone(),
            opts.plugins_dir.clone(),
            l.policies,
            l.uses,
            opts.reload_interval,
            stop_rx.clone(),
        ));
        l.runtime
    });
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
        let guard = Arc::new(Mutex::new(LoopGuard::new(Duration::from_secs(10), 100_000)));
        let shared = Arc::new(Shared {
            connector: connector.clone(),
            local: Arc::new(connector.local.clone()),
            remote: Arc::new(connector.remote.clone()),
            local_credentials: Arc::new(Provider::new(
                connector.local.auth.clone(),
                opts.identity.clone(),
            )),
            remote_credentials: Arc::new(Provider::new(
                connector.remote.auth.clone(),
                opts.identity.clone(),
            )),
            opts: opts.clone(),
            bridge_id,
            guard,
            sessions: sessions.clone(),
            plugins: runtime.clone().map(|rt| (rt, registry.clone())),
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
        plugins: registry,
    })
}

/// Policies, runtime and loaded plugins of a configuration whose routes use plugins.
pub struct LoadedPlugins {
    /// The engine.
    pub runtime: Arc<Runtime>,
    /// The running versions.
    pub registry: Arc<Registry>,
    /// The policies they were checked against.
    pub policies: Policies,
    /// Which routes use which plugin, with which config.
    pub uses: Uses,
}

/// Loads the policies and every plugin the routes use, canary-testing each with every route
/// config that uses it. Any problem is an error naming the file, plugin or route; `Ok(None)`
/// when no route uses plugins.
pub async fn load_plugins(
    config: &Config,
    plugins_dir: &std::path::Path,
    policies_dir: &std::path::Path,
) -> Result<Option<LoadedPlugins>, BridgeError> {
    let mut uses: Uses = HashMap::new();
    for c in &config.connectors {
        for r in &c.routes {
            for p in &r.plugins {
                uses.entry(p.name.clone())
                    .or_default()
                    .push((r.name.clone(), p.config.clone()));
            }
        }
    }
    if uses.is_empty() {
        return Ok(None);
    }
    let policies = Policies::load_dir(policies_dir).map_err(BridgeError::Policies)?;
    let runtime = Runtime::new().map_err(BridgeError::Runtime)?;
    let registry = Arc::new(Registry::default());
    // Files in the folder that no route uses do not stop the bridge.
    let mut errors: Vec<PluginError> = registry
        .scan(&runtime, plugins_dir, &policies, &uses)
        .await
        .into_iter()
        .filter(|e| uses.contains_key(&e.plugin()))
        .collect();
    let mut names: Vec<&String> = uses.keys().collect();
    names.sort();
    for plugin in names {
        let already = errors.iter().any(|e| e.plugin() == *plugin);
        if registry.current(plugin).is_none() && !already {
            errors.push(PluginError::Missing {
                route: uses[plugin][0].0.clone(),
                plugin: plugin.clone(),
                dir: plugins_dir.display().to_string(),
            });
        }
    }
    if !errors.is_empty() {
        return Err(BridgeError::Plugins(errors));
    }
    Ok(Some(LoadedPlugins {
        runtime,
        registry,
        policies,
        uses,
    }))
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
    local_credentials: Arc<Provider>,
    remote_credentials: Arc<Provider>,
    opts: RunOptions,
    /// This process's id in MQTT 5 loop marks.
    bridge_id: String,
    /// MQTT 3.1.1 loop prevention (remembers what was published).
    guard: Arc<Mutex<LoopGuard>>,
    sessions: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    plugins: Option<(Arc<Runtime>, Arc<Registry>)>,
}

impl Shared {
    fn conn(&self, side: Side) -> Arc<crate::config::BrokerConnection> {
        match side {
            Side::Local => self.local.clone(),
            Side::Remote => self.remote.clone(),
        }
    }

    fn credentials(&self, side: Side) -> Arc<Provider> {
        match side {
            Side::Local => self.local_credentials.clone(),
            Side::Remote => self.remote_credentials.clone(),
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
        credentials: shared.credentials(pipe.source),
        client_id: pipe.client_id.clone(),
        clean_start: false,
        session_expiry: v5.then_some(opts.session_expiry),
        subscriptions: Vec::new(),
        max_inflight: opts.max_inflight,
        receive_maximum: opts.max_inflight,
        keep_alive: opts.keep_alive,
        backoff: opts.backoff,
        max_packet: opts.max_packet,
        stamp: None,
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
        credentials: shared.credentials(pipe.target),
        clean_start: true,
        session_expiry: None,
        stamp: v5.then(|| (routing::VIA_PROPERTY.to_string(), shared.bridge_id.clone())),
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

    let mut stages: Vec<Stage> = match &shared.plugins {
        Some((runtime, registry)) => route
            .plugins
            .iter()
            .map(|p| {
                Stage::new(
                    runtime.clone(),
                    registry.clone(),
                    &p.name,
                    &p.config,
                    RouteInfo {
                        name: route.name.clone(),
                        direction: route.direction,
                        source: route.source.clone(),
                        qos: route.qos,
                        target_namespace: route
                            .target
                            .clone()
                            .unwrap_or_else(|| route.source.clone()),
                    },
                )
            })
            .collect(),
        None => Vec::new(),
    };
    let mut book = Book::default();
    let mut stopping = false;
    let drain = tokio::time::sleep(Duration::from_secs(86_400 * 365));
    tokio::pin!(drain);
    let max_pending = opts.max_inflight as usize;
    loop {
        let can_take = !stopping && book.pending.len() < max_pending;
        tokio::select! {
            ev = src_ev.recv(), if can_take => {
                let Some(ev) = ev else { break };
                on_source_event(ev, &pipe, &shared, &mut stages, &stats, v5, &src, &dst, &mut book).await;
                // Take what else is already there in the same turn.
                while book.pending.len() < max_pending {
                    match src_ev.try_recv() {
                        Ok(ev) => on_source_event(ev, &pipe, &shared, &mut stages, &stats, v5, &src, &dst, &mut book).await,
                        Err(_) => break,
                    }
                }
            }
            ev = dst_ev.recv() => {
                let Some(ev) = ev else { break };
                on_target_event(ev, &pipe, &stats, &src, &mut book);
                while let Ok(ev) = dst_ev.try_recv() {
                    on_target_event(ev, &pipe, &stats, &src, &mut book);
                }
            }
            _ = stop.changed(), if !stopping => {
                stopping = true;
                drain.as_mut().reset(tokio::time::Instant::now() + opts.drain_timeout);
            }
            _ = &mut drain, if stopping => {
                warn!(route = %route.name, in_flight = book.pending.len(), "Shutdown: in-flight messages not acknowledged in time; the source broker redelivers them");
                break;
            }
        }
        if stopping && book.pending.is_empty() {
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

/// What a pipe is waiting for: every forwarded copy has a token; a source message forwarded
/// as one copy (the usual case) waits on that token alone, the copies of a fanned-out message
/// share a group, and the source message is acknowledged when the last copy of its group is.
#[derive(Default)]
struct Book {
    pending: HashMap<Token, Waiting>,
    groups: HashMap<u64, (usize, Option<AckToken>)>,
    next_token: Token,
    next_group: u64,
}

enum Waiting {
    /// The only copy of a source message (with its ack, if it has one).
    Single(Option<AckToken>),
    /// One copy of a group.
    Group(u64),
}

impl Book {
    fn send(&mut self, dst: &SessionHandle, outputs: Vec<Message>, ack: Option<AckToken>) {
        if outputs.len() == 1 {
            self.next_token += 1;
            self.pending.insert(self.next_token, Waiting::Single(ack));
            for out in outputs {
                dst.publish(out, self.next_token);
            }
            return;
        }
        self.next_group += 1;
        self.groups.insert(self.next_group, (outputs.len(), ack));
        for out in outputs {
            self.next_token += 1;
            self.pending
                .insert(self.next_token, Waiting::Group(self.next_group));
            dst.publish(out, self.next_token);
        }
    }

    /// A copy was acknowledged (or refused) by the target: true if it was ours.
    fn done(&mut self, token: Token, src: &SessionHandle) -> bool {
        match self.pending.remove(&token) {
            None => false,
            Some(Waiting::Single(ack)) => {
                if let Some(ack) = ack {
                    src.ack(ack);
                }
                true
            }
            Some(Waiting::Group(group)) => {
                complete(&mut self.groups, group, src);
                true
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn on_source_event(
    ev: SessionEvent,
    pipe: &Pipe,
    shared: &Shared,
    stages: &mut [Stage],
    stats: &PipeStats,
    v5: bool,
    src: &SessionHandle,
    dst: &SessionHandle,
    book: &mut Book,
) {
    let route = &pipe.route;
    match ev {
        SessionEvent::State(StateEvent::Message { msg, ack, dup }) => {
            PipeStats::add(&stats.received);
            if dup {
                PipeStats::add(&stats.redelivered);
            }
            match forward(pipe, shared, stages, stats, msg, v5).await {
                Ok(outputs) if !outputs.is_empty() => book.send(dst, outputs, ack),
                Ok(_) => {
                    if let Some(ack) = ack {
                        src.ack(ack);
                    }
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
        SessionEvent::State(StateEvent::Subscribed(result)) => {
            for (filter, code) in result {
                if code >= 0x80 {
                    error!(route = %route.name, client_id = %pipe.client_id, filter = %filter, "Source broker refused the subscription (code {code:#04x}); no messages flow on this client until it reconnects");
                } else {
                    PipeStats::add(&stats.subscribed);
                    info!(route = %route.name, client_id = %pipe.client_id, filter = %filter, granted_qos = code, "Subscribed");
                }
            }
        }
        SessionEvent::DroppedQos0 => PipeStats::add(&stats.dropped_qos0_overflow),
        _ => {}
    }
}

fn on_target_event(
    ev: SessionEvent,
    pipe: &Pipe,
    stats: &PipeStats,
    src: &SessionHandle,
    book: &mut Book,
) {
    match ev {
        SessionEvent::State(StateEvent::Delivered(token)) if book.done(token, src) => {
            PipeStats::add(&stats.forwarded);
        }
        SessionEvent::State(StateEvent::Rejected(token, code)) if book.done(token, src) => {
            PipeStats::add(&stats.rejected);
            error!(route = %pipe.route.name, client_id = %pipe.client_id, "Target broker refused a message (reason code {code:#04x}); it is acknowledged to the source and lost");
        }
        SessionEvent::State(StateEvent::Connected { .. }) => {
            PipeStats::add(&stats.target_connects);
        }
        _ => {}
    }
}

#[derive(Debug, Clone, Copy)]
enum Skip {
    Loop,
    Unmatched,
}

/// One copy of a group was acknowledged; the last one acknowledges the source message.
fn complete(groups: &mut HashMap<u64, (usize, Option<AckToken>)>, group: u64, src: &SessionHandle) {
    if let Some(entry) = groups.get_mut(&group) {
        entry.0 -= 1;
        if entry.0 == 0 {
            if let Some((_, Some(ack))) = groups.remove(&group) {
                src.ack(ack);
            } else {
                groups.remove(&group);
            }
        }
    }
}

/// User property carrying the plugin error on dead-lettered messages (MQTT 5).
pub const ERROR_PROPERTY: &str = "edgebridge-error";

/// Everything between receiving a message and publishing it: source filter check, loop
/// guard, the plugin chain and the route's plugin error policy, topic mapping and loop mark.
/// Returns the messages to publish (empty: handled, nothing to send).
async fn forward(
    pipe: &Pipe,
    shared: &Shared,
    stages: &mut [Stage],
    stats: &PipeStats,
    msg: Message,
    v5: bool,
) -> Result<Vec<Message>, Skip> {
    let route = &pipe.route;
    if !topic::matches(&route.source, &msg.topic) {
        return Err(Skip::Unmatched);
    }
    // MQTT 5 needs no shared state (the mark travels in the message): no lock, no clock.
    let verdict = if v5 {
        routing::check_via(&shared.bridge_id, &msg)
    } else {
        shared
            .guard
            .lock()
            .expect("loop guard lock")
            .check(pipe.source, &msg, Instant::now())
    };
    if verdict != LoopVerdict::Forward {
        return Err(Skip::Loop);
    }
    let msg = Message {
        qos: route.qos,
        properties: if v5 {
            msg.properties
        } else {
            Properties::default()
        },
        ..msg
    };
    let mut outputs = if stages.is_empty() {
        // Same-as-source routes keep the received topic string: no copy.
        let topic = match &route.target {
            Some(t) => t.clone(),
            None => msg.topic,
        };
        vec![Message { topic, ..msg }]
    } else {
        let target = routing::target_topic(route, &msg.topic).to_string();
        match run_chain(stages, &msg, target.clone(), stats).await {
            Ok(out) => out,
            Err(e) => {
                PipeStats::add(&stats.plugin_errors);
                match &route.on_plugin_error {
                    OnPluginError::Drop => {
                        PipeStats::add(&stats.dropped_plugin_error);
                        error!(route = %route.name, topic = %msg.topic, "{e}; message dropped (onPluginError: drop)");
                        Vec::new()
                    }
                    OnPluginError::Pass => {
                        warn!(route = %route.name, topic = %msg.topic, "{e}; forwarding the original (onPluginError: pass)");
                        vec![Message {
                            topic: target,
                            ..msg
                        }]
                    }
                    OnPluginError::DeadLetter(dlq) => {
                        PipeStats::add(&stats.dead_lettered);
                        warn!(route = %route.name, topic = %msg.topic, dead_letter = %dlq, "{e}; message dead-lettered");
                        let mut m = Message {
                            topic: dlq.clone(),
                            ..msg
                        };
                        if v5 {
                            m.properties
                                .user_properties
                                .push((ERROR_PROPERTY.to_string(), e.to_string()));
                        }
                        vec![m]
                    }
                }
            }
        }
    };
    // MQTT 5: the target session stamps the loop mark as it encodes (`SessionOptions::stamp`).
    if !v5 {
        let now = Instant::now();
        let mut guard = shared.guard.lock().expect("loop guard lock");
        for out in &mut outputs {
            out.properties = Properties::default();
            guard.mark(pipe.target, out, now);
        }
    }
    Ok(outputs)
}

/// Runs the message through every stage. The message handed to each stage keeps the source
/// topic; what it is going to is the `target` beside it.
async fn run_chain(
    stages: &mut [Stage],
    msg: &Message,
    target: String,
    stats: &PipeStats,
) -> Result<Vec<Message>, crate::plugin::stage::StageError> {
    let mut current = vec![(msg.clone(), target)];
    for stage in stages.iter_mut() {
        let mut next = Vec::with_capacity(current.len());
        for (m, target) in current {
            match stage.run(&m, &target).await? {
                Outcome::Pass => next.push((m, target)),
                Outcome::Drop(reason) => {
                    PipeStats::add(&stats.dropped_by_plugin);
                    debug!(plugin = %stage.plugin, topic = %m.topic, %reason, "Dropped by plugin");
                }
                Outcome::Emit(list) => {
                    for e in list {
                        let target = e.topic;
                        next.push((
                            Message {
                                topic: m.topic.clone(),
                                ..e
                            },
                            target,
                        ));
                    }
                }
            }
        }
        current = next;
    }
    Ok(current
        .into_iter()
        .map(|(m, target)| Message { topic: target, ..m })
        .collect())
}
