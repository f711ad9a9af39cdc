//! The one place that wires sessions to routes to plugins: for every route client this
//! instance runs, its source and target connection settings, its pipeline (with the plugin
//! stages) and its counters, handed to one [`route_client`] task; plus the embedded brokers,
//! the plugin runtime and its folder watcher, and shutdown.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::config::{BrokerConnection, Config, Connector, Protocol};
use crate::counters::{RouteCounters, Stats};
use crate::credentials::Provider;
use crate::embedded;
use crate::mqtt::Version;
use crate::mqtt::link::LinkOptions;
use crate::pipeline::Pipeline;
use crate::plugin::stage::{RouteInfo, Stage};
use crate::plugin::{PluginError, Registry, Runtime, Uses};
use crate::policy::Policies;
use crate::route_client::{self, RouteClientSetup};
use crate::routing::{self, LoopGuard, RouteClient, Side};

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
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            instance: None,
            bridge_id: None,
            max_inflight: 256,
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

/// A route client's running task.
struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// A started bridge.
pub struct RunningBridge {
    stop: watch::Sender<bool>,
    clients: Vec<Running>,
    tasks: Vec<JoinHandle<()>>,
    /// Live counters.
    pub stats: Arc<Stats>,
    /// The route clients this instance runs.
    pub route_clients: Vec<RouteClient>,
    /// The running plugin versions (empty when no route uses plugins).
    pub plugins: Arc<Registry>,
}

impl RunningBridge {
    /// Stops taking new messages, waits (up to the drain timeout) for in-flight ones to be
    /// acknowledged end to end, then disconnects every session.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for c in &self.clients {
            let _ = c.stop.send(true);
        }
        for c in self.clients {
            let _ = c.task.await;
        }
        for t in self.tasks {
            let _ = t.await;
        }
    }

    /// Ends every task and drops every connection at once without draining or acknowledging
    /// anything more, as a crash would (for tests of restarts).
    pub fn abort(self) {
        for c in &self.clients {
            c.task.abort();
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

/// Starts embedded brokers and every route client of every connector.
pub async fn start(config: &Config, opts: &RunOptions) -> Result<RunningBridge, BridgeError> {
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let stats = Arc::new(Stats::default());
    let mut clients = Vec::new();
    let mut route_clients = Vec::new();
    let loaded = load_plugins(config, &opts.plugins_dir, &opts.policies_dir).await?;
    let registry = loaded
        .as_ref()
        .map(|l| l.registry.clone())
        .unwrap_or_default();
    let runtime = loaded.map(|l| {
        for m in &l.missing {
            warn!("{m}: the route waits for it, reading nothing from its source until it is there");
        }
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
        let planned = routing::plan(connector, index, connector.bridge_instances);
        if connector.routes.is_empty() {
            warn!(connector = %connector.name, "No MqttBridgeTopicMap references this connector; nothing to bridge");
        }
        info!(
            connector = %connector.name,
            instance = index,
            instances = connector.bridge_instances,
            routes = connector.routes.len(),
            clients = planned.len(),
            "Starting"
        );
        let shared = Shared::new(
            connector,
            opts,
            runtime.clone().map(|rt| (rt, registry.clone())),
        );
        for plan in planned {
            route_clients.push(plan.clone());
            clients.push(shared.spawn(plan, &stats));
        }
    }
    Ok(RunningBridge {
        stop,
        clients,
        tasks,
        stats,
        route_clients,
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
    /// Plugins a route names that are not in the folder ([`PluginError::Missing`]): not an
    /// error, their routes wait for them (the folder is watched).
    pub missing: Vec<PluginError>,
}

/// Loads the policies and every plugin the routes use, canary-testing each with every route
/// config that uses it. A file that is refused (not a component, wrong world, an import its
/// policy does not grant, a config its `init` refuses...) is an error naming the file, plugin
/// or route; a plugin that is not in the folder at all is not (see
/// [`LoadedPlugins::missing`]). `Ok(None)` when no route uses plugins.
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
    let errors: Vec<PluginError> = registry
        .scan(&runtime, plugins_dir, &policies, &uses)
        .await
        .into_iter()
        .filter(|e| uses.contains_key(&e.plugin()))
        .collect();
    if !errors.is_empty() {
        return Err(BridgeError::Plugins(errors));
    }
    let mut names: Vec<&String> = uses.keys().collect();
    names.sort();
    let missing = names
        .into_iter()
        .filter(|plugin| registry.current(plugin).is_none())
        .map(|plugin| PluginError::Missing {
            route: uses[plugin][0].0.clone(),
            plugin: plugin.clone(),
            dir: plugins_dir.display().to_string(),
        })
        .collect();
    Ok(Some(LoadedPlugins {
        runtime,
        registry,
        policies,
        uses,
        missing,
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

/// What the route clients of one connector share: connection settings, credentials (one
/// token fetch serves every session of a broker side), loop prevention and the plugins.
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

    /// Starts the task of one route client.
    fn spawn(&self, plan: RouteClient, stats: &Stats) -> Running {
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
        let stages: Vec<Stage> = match &self.plugins {
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
        let pipeline = Pipeline::new(
            route.clone(),
            (plan.source, plan.target),
            v5,
            self.bridge_id.clone(),
            self.guard.clone(),
            stages,
        );
        let counters = Arc::new(RouteCounters::new(
            &route.name,
            route.direction,
            &plan.client_id,
            plan.source.as_str(),
            plan.target.as_str(),
        ));
        stats.register(counters.clone());
        let (stop, stop_rx) = watch::channel(false);
        let setup = RouteClientSetup {
            plan,
            source,
            target,
            max_inflight: opts.max_inflight,
            drain_timeout: opts.drain_timeout,
            pipeline,
        };
        let task = tokio::spawn(route_client::run(setup, counters, stop_rx));
        Running { stop, task }
    }
}
