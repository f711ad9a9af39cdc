//! The one place that wires sessions to routes to plugins: for every route client this
//! instance runs, its source and target connection settings, its pipeline (with the plugin
//! stages) and its counters, handed to one [`route_client`] task; plus the embedded brokers,
//! the plugin runtime and its folder watcher; the supervisor that applies a [`crate::plan`]
//! (only what changed restarts); and shutdown. Where configurations come from is
//! [`crate::sources`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::config::{self, BrokerConnection, Config, Connector, Protocol};
use crate::counters::{RouteCounters, Stats};
use crate::credentials::Provider;
use crate::embedded;
use crate::mqtt::Version;
use crate::mqtt::link::LinkOptions;
use crate::pipeline::Pipeline;
use crate::plan;
use crate::plugin::stage::{RouteInfo, Stage};
use crate::plugin::{PluginError, Registry, Runtime, Uses};
use crate::policy::Policies;
use crate::route_client::{self, RouteClientSetup};
use crate::routing::{self, LoopGuard, RouteClient, Side};
pub use crate::sources::{ConfigSource, reload_from, run, run_kubernetes};

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
    /// Most messages one route client forwards before their target acknowledgements arrive.
    pub max_inflight: u16,
    /// Most bytes (payloads and topics) of those messages, per route client.
    pub max_inflight_bytes: usize,
    /// Session expiry requested for the persistent source sessions (MQTT 5), seconds.
    pub session_expiry: u32,
    /// Keep alive of every session (a dead connection is detected within 1.5x this).
    pub keep_alive: Duration,
    /// Time limit of one connection attempt (transport, token, CONNECT, CONNACK).
    pub connect_timeout: Duration,
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
    /// A route with messages in flight and none acknowledged for this long makes `/healthz`
    /// fail.
    pub stall_timeout: Duration,
    /// Where to serve `/metrics`, `/healthz`, `/readyz` and `/status` ([`run`] only).
    pub http: Option<std::net::SocketAddr>,
    /// `--spool-dir`: every route client is spooled under this folder (the YAML's `spool`
    /// settings override it per connector or route).
    pub spool_dir: Option<PathBuf>,
}

/// The default of [`RunOptions::max_inflight`] (`--max-inflight`). Under load a route client
/// reads, forwards and acknowledges in batches as large as what is in flight allows: at 256,
/// QoS 1 traffic of small messages went in batches of about three (0.35 reads and 0.65 writes
/// per message, 7.4 µs of the bridge's CPU per message); at 4096, 0.11 and 0.13 (2.6 µs), and
/// the throughput rose from 0.85× to 1.01× Mosquitto's bridge (docs/benchmarks.md). The bytes
/// bound ([`RunOptions::max_inflight_bytes`]) still caps large messages.
pub const DEFAULT_MAX_INFLIGHT: u16 = 4096;

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            instance: None,
            bridge_id: None,
            max_inflight: DEFAULT_MAX_INFLIGHT,
            max_inflight_bytes: 32 * 1024 * 1024,
            session_expiry: 24 * 3600,
            keep_alive: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            backoff: (Duration::from_millis(100), Duration::from_secs(30)),
            drain_timeout: Duration::from_secs(5),
            max_packet: 16 * 1024 * 1024,
            plugins_dir: PathBuf::from(DEFAULT_PLUGINS_DIR),
            policies_dir: PathBuf::from(DEFAULT_POLICIES_DIR),
            reload_interval: Duration::from_secs(1),
            identity: crate::credentials::IdentityOptions::from_env(),
            stall_timeout: Duration::from_secs(60),
            http: None,
            spool_dir: None,
        }
    }
}

/// Errors that stop the bridge from starting (or a reload from being applied).
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
    /// The HTTP endpoint could not listen.
    #[error("cannot serve HTTP on {addr}")]
    Http {
        /// The address.
        addr: std::net::SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The route clients need more file descriptors than the process may open.
    #[error(
        "this instance runs {clients} route client(s), which need about {needed} file descriptors (two connections each, the spool's files, a margin), but the process may open {limit}: raise the limit (ulimit -n; a container's nofile) or split the routes across instances (bridgeInstances)"
    )]
    FileDescriptors {
        /// Route clients this instance runs.
        clients: usize,
        /// What they need, about.
        needed: u64,
        /// The limit (after raising the soft limit to the hard one).
        limit: u64,
    },
    /// The instance index does not fit `bridgeInstances`.
    #[error("connector \"{connector}\": {message}")]
    Instance {
        /// Connector name.
        connector: String,
        /// What is wrong.
        message: String,
    },
}

/// A route client's running task.
struct Running {
    plan: RouteClient,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    counters: Arc<RouteCounters>,
}

/// The route clients of one connector, and what they share.
struct ConnectorRun {
    shared: Arc<Shared>,
    clients: Vec<Running>,
}

/// The plugin runtime, once a route uses plugins.
struct PluginHost {
    runtime: Arc<Runtime>,
    /// What the folder watcher canary-tests new files with.
    config: watch::Sender<(Policies, Uses)>,
}

/// What a reload changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadSummary {
    /// Route clients started (new routes).
    pub started: Vec<String>,
    /// Route clients restarted (their route or connector changed).
    pub restarted: Vec<String>,
    /// Route clients stopped (their route is gone).
    pub stopped: Vec<String>,
    /// Route clients left running untouched.
    pub kept: usize,
}

impl std::fmt::Display for ReloadSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(", ")
            }
        };
        write!(
            f,
            "started {}; restarted {}; stopped {}; {} unchanged",
            list(&self.started),
            list(&self.restarted),
            list(&self.stopped),
            self.kept
        )
    }
}

/// A started bridge.
pub struct RunningBridge {
    pub(crate) opts: RunOptions,
    pub(crate) config: Config,
    connectors: HashMap<String, ConnectorRun>,
    plugin_host: Option<PluginHost>,
    pub(crate) stop: watch::Sender<bool>,
    /// Internal tasks (the plugin folder watcher), by name, for health.
    pub(crate) background: Vec<(String, JoinHandle<()>)>,
    /// Route clients being stopped (removed or replaced), until they finished.
    retiring: Vec<JoinHandle<()>>,
    /// Live counters.
    pub stats: Arc<Stats>,
    /// The running plugin versions (empty when no route uses plugins).
    pub plugins: Arc<Registry>,
}

impl RunningBridge {
    /// The route clients this instance runs.
    pub fn route_clients(&self) -> Vec<RouteClient> {
        let mut names: Vec<&String> = self.connectors.keys().collect();
        names.sort();
        names
            .into_iter()
            .flat_map(|n| self.connectors[n].clients.iter().map(|c| c.plan.clone()))
            .collect()
    }

    /// The configuration running now.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Internal tasks that ended although nothing asked them to; recorded in the counters.
    pub fn check_tasks(&self) {
        if *self.stop.borrow() {
            return;
        }
        let mut dead: Vec<String> = self
            .background
            .iter()
            .filter(|(_, t)| t.is_finished())
            .map(|(n, _)| n.clone())
            .collect();
        for c in self.connectors.values() {
            for r in &c.clients {
                if r.task.is_finished() && !*r.stop.borrow() {
                    dead.push(format!("route client {}", r.plan.client_id));
                }
            }
        }
        *self.stats.dead_tasks.lock().expect("stats lock") = dead;
    }

    /// Stops taking new messages, waits (up to the drain timeout) for in-flight ones to be
    /// acknowledged end to end, then disconnects every session.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        let mut tasks = Vec::new();
        for (_, c) in self.connectors.drain() {
            for r in c.clients {
                let _ = r.stop.send(true);
                tasks.push(r.task);
            }
        }
        tasks.append(&mut self.retiring);
        tasks.extend(self.background.drain(..).map(|(_, t)| t));
        for t in tasks {
            let _ = t.await;
        }
        // The windows were flushed as the route clients stopped: the plugins' kept state is
        // final now.
        if let Some(host) = &self.plugin_host {
            let runtime = host.runtime.clone();
            let _ = tokio::task::spawn_blocking(move || runtime.save_states()).await;
        }
    }

    /// Ends every task and drops every connection at once without draining or acknowledging
    /// anything more, as a crash would (for tests of restarts).
    pub fn abort(self) {
        for c in self.connectors.values() {
            for r in &c.clients {
                r.task.abort();
            }
        }
        for t in &self.retiring {
            t.abort();
        }
        for (_, t) in &self.background {
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

    /// Applies a new configuration as a difference. Everything that can fail is checked
    /// first (instance indices, embedded brokers, policies, every plugin a route uses, each
    /// with every route configuration that uses it); on any problem nothing changes. Then:
    /// routes that are new start; routes that are gone stop (they stop reading, finish what is
    /// in flight, disconnect); routes whose settings changed, and every route of a connector
    /// whose connection changed, restart (the old client finishes before the new one
    /// connects, so they never share the client ID); all others keep running untouched.
    pub async fn reload(&mut self, config: Config) -> Result<ReloadSummary, BridgeError> {
        // Check.
        let mut plans = Vec::new();
        for connector in &config.connectors {
            let index = resolve_instance(connector, self.opts.instance)?;
            plans.push(routing::plan(connector, index, connector.bridge_instances));
        }
        start_embedded(&config).await?;
        let plugins = self.prepare_plugins(&config).await?;
        let wanted: Vec<(&Connector, Vec<RouteClient>)> =
            config.connectors.iter().zip(plans).collect();
        let running: Vec<(&Connector, Vec<&RouteClient>)> = self
            .connectors
            .values()
            .map(|c| {
                (
                    &c.shared.connector,
                    c.clients.iter().map(|r| &r.plan).collect(),
                )
            })
            .collect();
        let decided = plan::plan(&running, &wanted);
        let (started, restarted, stopped, kept) = decided.summary();
        let summary = ReloadSummary {
            started,
            restarted,
            stopped,
            kept,
        };
        // Apply.
        let mut old = std::mem::take(&mut self.connectors);
        if let Some((host, uses, policies)) = plugins {
            let _ = host.config.send((policies, uses));
            if self.plugin_host.is_none() {
                let rx = host.config.subscribe();
                self.background.push((
                    "plugin folder watcher".into(),
                    self.plugins.clone().watch(
                        host.runtime.clone(),
                        self.opts.plugins_dir.clone(),
                        rx,
                        self.opts.reload_interval,
                        self.stop.subscribe(),
                    ),
                ));
                self.plugin_host = Some(host);
            }
        }
        for ((connector, _), decision) in wanted.iter().zip(decided.connectors) {
            let previous = old.remove(&connector.name);
            let shared = match &previous {
                Some(p) if decision.same_connection => {
                    let mut s = (*p.shared).clone();
                    s.connector = (*connector).clone();
                    s.plugins = self.plugin_runtime();
                    Arc::new(s)
                }
                _ => Arc::new(Shared::new(connector, &self.opts, self.plugin_runtime())),
            };
            let mut running: HashMap<String, Running> = previous
                .map(|p| {
                    p.clients
                        .into_iter()
                        .map(|r| (r.plan.client_id.clone(), r))
                        .collect()
                })
                .unwrap_or_default();
            if connector.routes.is_empty() {
                warn!(connector = %connector.name, "No MqttBridgeTopicMap references this connector; nothing to bridge");
            }
            let mut clients = Vec::new();
            for (client, action) in decision.clients {
                let now = running.remove(&client.client_id);
                match (action, now) {
                    (plan::Action::Keep, Some(r)) => clients.push(r),
                    (plan::Action::Restart { unsubscribe }, Some(r)) => {
                        let predecessor = self.retire(r);
                        clients.push(shared.spawn(
                            client,
                            &self.stats,
                            Some(predecessor),
                            unsubscribe,
                        ));
                    }
                    (_, now) => {
                        let predecessor = now.map(|r| self.retire(r));
                        clients.push(shared.spawn(client, &self.stats, predecessor, Vec::new()));
                    }
                }
            }
            for (_, r) in running {
                let t = self.retire(r);
                self.retiring.push(t);
            }
            self.connectors
                .insert(connector.name.clone(), ConnectorRun { shared, clients });
        }
        for (_, gone) in old {
            for r in gone.clients {
                let t = self.retire(r);
                self.retiring.push(t);
            }
        }
        self.retiring.retain(|t| !t.is_finished());
        self.config = config;
        Ok(summary)
    }

    fn plugin_runtime(&self) -> Option<(Arc<Runtime>, Arc<Registry>)> {
        self.plugin_host
            .as_ref()
            .map(|h| (h.runtime.clone(), self.plugins.clone()))
    }

    /// Stops a route client; the returned task ends when it has drained and disconnected
    /// (and its counters are gone).
    fn retire(&self, r: Running) -> JoinHandle<()> {
        let _ = r.stop.send(true);
        let stats = self.stats.clone();
        tokio::spawn(async move {
            let _ = r.task.await;
            stats.unregister(&r.counters);
        })
    }

    /// Loads what the plugins of `config` need and canary-tests every (plugin, route
    /// config) the current one does not already run; `None` when no route uses plugins.
    async fn prepare_plugins(
        &self,
        config: &Config,
    ) -> Result<Option<(PluginHost, Uses, Policies)>, BridgeError> {
        let uses = plugin_uses(config);
        if uses.is_empty() {
            return Ok(None);
        }
        let policies =
            Policies::load_dir(&self.opts.policies_dir).map_err(BridgeError::Policies)?;
        let runtime = match &self.plugin_host {
            Some(h) => h.runtime.clone(),
            None => Runtime::new().map_err(BridgeError::Runtime)?,
        };
        let missing = self
            .plugins
            .prepare(
                &runtime,
                &self.opts.plugins_dir,
                &policies,
                &uses,
                &plugin_uses(&self.config),
            )
            .await
            .map_err(BridgeError::Plugins)?;
        for m in missing {
            warn!("{m}");
        }
        let host = match &self.plugin_host {
            Some(h) => PluginHost {
                runtime: h.runtime.clone(),
                config: h.config.clone(),
            },
            None => PluginHost {
                runtime,
                config: watch::channel((policies.clone(), uses.clone())).0,
            },
        };
        Ok(Some((host, uses, policies)))
    }
}

/// Which routes use which plugin, with which config.
fn plugin_uses(config: &Config) -> Uses {
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
    uses
}

/// Starts the embedded brokers `config` names that are not running yet.
async fn start_embedded(config: &Config) -> Result<(), BridgeError> {
    for connector in &config.connectors {
        for conn in [&connector.local, &connector.remote] {
            if conn.endpoint.embedded {
                let endpoint = conn.endpoint.clone();
                let protocol = connector.protocol;
                let log = conn.embedded_log;
                tokio::task::spawn_blocking(move || embedded::start(&endpoint, protocol, log))
                    .await
                    .expect("embedded broker start does not panic")?;
            }
        }
    }
    Ok(())
}

/// Starts embedded brokers and every route client of every connector.
pub async fn start(config: &Config, opts: &RunOptions) -> Result<RunningBridge, BridgeError> {
    let mut bridge = RunningBridge {
        opts: opts.clone(),
        config: Config {
            connectors: Vec::new(),
        },
        connectors: HashMap::new(),
        plugin_host: None,
        stop: watch::channel(false).0,
        background: Vec::new(),
        retiring: Vec::new(),
        stats: Arc::new(Stats::default()),
        plugins: Arc::new(Registry::default()),
    };
    let summary = bridge.reload(config.clone()).await?;
    for connector in &config.connectors {
        info!(
            connector = %connector.name,
            instances = connector.bridge_instances,
            routes = connector.routes.len(),
            "Started"
        );
    }
    tracing::debug!("{summary}");
    Ok(bridge)
}

/// Policies, runtime and loaded plugins of a configuration whose routes use plugins.
pub struct LoadedPlugins {
    /// The running versions.
    pub registry: Arc<Registry>,
    /// Plugins a route names that are not in the folder ([`PluginError::Missing`]): not an
    /// error, their routes wait for them (the folder is watched).
    pub missing: Vec<PluginError>,
}

/// Loads the policies and every plugin the routes use, canary-testing each with every route
/// config that uses it (what `check` does). A file that is refused (not a component, wrong
/// world, an import its policy does not grant, a config its `init` refuses...) is an error
/// naming the file, plugin or route; a plugin that is not in the folder at all is not (see
/// [`LoadedPlugins::missing`]). `Ok(None)` when no route uses plugins.
pub async fn load_plugins(
    config: &Config,
    plugins_dir: &std::path::Path,
    policies_dir: &std::path::Path,
) -> Result<Option<LoadedPlugins>, BridgeError> {
    let uses = plugin_uses(config);
    if uses.is_empty() {
        return Ok(None);
    }
    let policies = Policies::load_dir(policies_dir).map_err(BridgeError::Policies)?;
    let runtime = Runtime::new().map_err(BridgeError::Runtime)?;
    let registry = Arc::new(Registry::default());
    let missing = registry
        .prepare(&runtime, plugins_dir, &policies, &uses, &Uses::new())
        .await
        .map_err(BridgeError::Plugins)?;
    Ok(Some(LoadedPlugins { registry, missing }))
}

/// What the route clients of one connector share: connection settings, credentials (one
/// token fetch serves every session of a broker side), loop prevention and the plugins.
#[derive(Clone)]
struct Shared {
    connector: Connector,
    local: Arc<BrokerConnection>,
    remote: Arc<BrokerConnection>,
    local_credentials: Arc<Provider>,
    remote_credentials: Arc<Provider>,
    opts: RunOptions,
    /// This process's id in MQTT 5 loop marks.
    bridge_id: Arc<str>,
    /// MQTT 3.1.1 loop prevention (remembers what was published).
    guard: Arc<Mutex<LoopGuard>>,
    plugins: Option<(Arc<Runtime>, Arc<Registry>)>,
}

impl Shared {
    fn new(
        connector: &Connector,
        opts: &RunOptions,
        plugins: Option<(Arc<Runtime>, Arc<Registry>)>,
    ) -> Shared {
        let bridge_id = opts
            .bridge_id
            .clone()
            .unwrap_or_else(|| format!("{}-{:08x}", connector.name, fastrand::u32(..)));
        let provider =
            |c: &BrokerConnection| Arc::new(Provider::new(c.auth.clone(), opts.identity.clone()));
        Shared {
            connector: connector.clone(),
            local: Arc::new(connector.local.clone()),
            remote: Arc::new(connector.remote.clone()),
            local_credentials: provider(&connector.local),
            remote_credentials: provider(&connector.remote),
            opts: opts.clone(),
            bridge_id: bridge_id.into(),
            guard: Arc::new(Mutex::new(LoopGuard::new(Duration::from_secs(10), 100_000))),
            plugins,
        }
    }

    fn conn(&self, side: Side) -> (Arc<BrokerConnection>, Arc<Provider>) {
        match side {
            Side::Local => (self.local.clone(), self.local_credentials.clone()),
            Side::Remote => (self.remote.clone(), self.remote_credentials.clone()),
        }
    }

    /// Starts the task of one route client (after `predecessor`, the client it replaces
    /// under the same client ID, has finished).
    fn spawn(
        &self,
        plan: RouteClient,
        stats: &Stats,
        predecessor: Option<JoinHandle<()>>,
        unsubscribe: Vec<String>,
    ) -> Running {
        let v5 = self.connector.protocol == Protocol::V5;
        let opts = &self.opts;
        let route = &plan.route;
        let label = match plan.share_index {
            Some(i) => format!("route \"{}\" client {i}", route.name),
            None => format!("route \"{}\"", route.name),
        };
        let link = |side: Side, role: &str| {
            let (conn, credentials) = self.conn(side);
            LinkOptions {
                label: format!("{label} {role} ({})", side.as_str()),
                version: if v5 { Version::V5 } else { Version::V4 },
                conn,
                credentials,
                client_id: plan.client_id.clone(),
                clean_start: false,
                session_expiry: None,
                receive_maximum: opts.max_inflight,
                keep_alive: opts.keep_alive,
                backoff: opts.backoff,
                max_packet: opts.max_packet,
                connect_timeout: opts.connect_timeout,
                stamp: None,
            }
        };
        // Source: a persistent session, so that whatever the bridge has not acknowledged stays
        // with the source broker across remote outages and bridge restarts.
        let source = LinkOptions {
            session_expiry: v5.then_some(opts.session_expiry),
            ..link(plan.source, "source")
        };
        // Target: a clean session per process. Packet ids restart at 1 after a bridge restart,
        // and a resumed target session could take a new QoS 2 publish for a stale duplicate.
        let target = LinkOptions {
            clean_start: true,
            stamp: v5.then(|| {
                (
                    routing::VIA_PROPERTY.to_string(),
                    self.bridge_id.to_string(),
                )
            }),
            ..link(plan.target, "target")
        };
        let spool = config::SpoolSpec::resolve(
            &self.connector,
            route,
            &plan.client_id,
            opts.spool_dir.as_deref(),
        );
        let stages: Vec<Stage> = match &self.plugins {
            Some((runtime, registry)) => route
                .plugins
                .iter()
                .map(|p| {
                    // A spooled route keeps its plugins' state across restarts beside the
                    // spools of its connector.
                    if let Some(base) = spool.as_ref().and_then(|s| s.dir.parent()) {
                        runtime.keep_state(
                            &p.name,
                            &route.name,
                            crate::plugin::persist::file_for(base, &route.name, &p.name),
                        );
                    }
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
                        stats.plugin(&p.name, &route.name),
                    )
                })
                .collect(),
            None => Vec::new(),
        };
        let pipeline = Pipeline::new(
            route.clone(),
            (plan.source, plan.target),
            v5,
            self.bridge_id.clone(),
            self.guard.clone(),
            stages,
        );
        let mut counters = RouteCounters::new(
            &route.name,
            route.direction,
            &plan.client_id,
            plan.source.as_str(),
            plan.target.as_str(),
        );
        counters.plugins = route.plugins.iter().map(|p| p.name.clone()).collect();
        counters.spool = spool
            .as_ref()
            .map(|s| Arc::new(crate::spool::SpoolCounters::new(s.dir.clone())));
        let counters = Arc::new(counters);
        stats.register(counters.clone());
        let (stop, stop_rx) = watch::channel(false);
        let setup = RouteClientSetup {
            plan: plan.clone(),
            source,
            target,
            max_inflight: opts.max_inflight,
            max_inflight_bytes: opts.max_inflight_bytes,
            drain_timeout: opts.drain_timeout,
            pipeline,
            spool,
            unsubscribe,
        };
        let c = counters.clone();
        let task = tokio::spawn(async move {
            if let Some(p) = predecessor {
                let _ = p.await;
            }
            route_client::run(setup, c, stop_rx).await
        });
        Running {
            plan,
            stop,
            task,
            counters,
        }
    }
}

/// File descriptors a route client needs beyond its two connections when it has a spool (the
/// cursor, the segment being written and the one being read).
const SPOOL_FDS: u64 = 3;
/// Descriptors for everything else: listeners, the embedded brokers, configuration and
/// plugin files, the log.
const FD_MARGIN: u64 = 64;

/// Raises the soft limit of open files to the hard one, and checks that the route clients
/// this instance runs for `config` fit in it; returns (route clients, needed, limit).
pub fn check_file_descriptors(
    config: &Config,
    opts: &RunOptions,
) -> Result<(usize, u64, u64), BridgeError> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut clients = 0usize;
    let mut needed = FD_MARGIN;
    for connector in &config.connectors {
        let index = resolve_instance(connector, opts.instance)?;
        for plan in routing::plan(connector, index, connector.bridge_instances) {
            clients += 1;
            needed += 2;
            if config::SpoolSpec::resolve(
                connector,
                &plan.route,
                &plan.client_id,
                opts.spool_dir.as_deref(),
            )
            .is_some()
            {
                needed += SPOOL_FDS;
            }
        }
    }
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            limit = getrlimit(Resource::Nofile);
        }
    }
    let limit = limit.current.unwrap_or(u64::MAX);
    if needed > limit {
        return Err(BridgeError::FileDescriptors {
            clients,
            needed,
            limit,
        });
    }
    Ok((clients, needed, limit))
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
