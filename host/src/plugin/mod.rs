//! WebAssembly plugins: loading components, checking them against their policy, and running
//! them under limits.
//!
//! - [`Runtime`]: one wasmtime `Engine` (epoch interruption, a 1 ms ticker thread), the
//!   linkers, and the key-value state that outlives plugin reloads.
//! - [`Runtime::load`]: compile, find the world, check imports and hash against the policy,
//!   pre-instantiate. A file that fails any step is refused with the reason.
//! - [`Registry`]: the running version of every plugin, swapped atomically on reload;
//!   [`Registry::watch`] polls the plugins folder.
//! - [`stage::Stage`]: one plugin in one route's chain, with its live instance, rebuilt after a
//!   trap, behind a circuit breaker.

pub mod bindings;
mod host;
pub use host::GUEST_LOG;
pub mod own_metrics;
pub mod persist;
mod sandbox;
pub mod stage;
pub mod timers;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use tracing::{error, info, warn};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use self::bindings::aggregator::{RouteAggregator, RouteAggregatorPre};
use self::bindings::filter::{MessageFilter, MessageFilterPre};
use self::bindings::mapper::edgebridge::plugin::types;
use self::bindings::mapper::{RouteMapper, RouteMapperPre};
use crate::policy::{Import, Policies, Policy};

/// How often the epoch advances; time budgets are counted in these ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);
/// WIT package version of the `route-mapper` and `message-filter` worlds.
pub const WIT_VERSION: &str = "0.1.0";
/// WIT package version of the `route-aggregator` world (and of `timers`, `metrics`, `state`).
pub const WIT_VERSION_2: &str = "0.2.0";

/// Which world a component targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum World {
    /// `route-mapper` (0.1.0).
    Mapper,
    /// `message-filter` (0.1.0).
    Filter,
    /// `route-aggregator` (0.2.0).
    Aggregator,
}

impl World {
    /// The world's name.
    pub fn as_str(self) -> &'static str {
        match self {
            World::Mapper => "route-mapper",
            World::Filter => "message-filter",
            World::Aggregator => "route-aggregator",
        }
    }

    /// The WIT package version of the world.
    pub fn version(self) -> &'static str {
        match self {
            World::Mapper | World::Filter => WIT_VERSION,
            World::Aggregator => WIT_VERSION_2,
        }
    }
}

/// Why a plugin could not be loaded or started; every message names the file or plugin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginError {
    /// Unreadable file.
    #[error("{file}: cannot read: {message}")]
    Read {
        /// File.
        file: PathBuf,
        /// Cause.
        message: String,
    },
    /// Not a valid WebAssembly component.
    #[error("{file}: not a valid WebAssembly component: {message}")]
    Compile {
        /// File.
        file: PathBuf,
        /// Cause.
        message: String,
    },
    /// Exports neither plugin world (or another version of it).
    #[error(
        "{file}: exports none of edgebridge:plugin/mapper@{WIT_VERSION}, edgebridge:plugin/filter@{WIT_VERSION} or edgebridge:plugin/aggregator@{WIT_VERSION_2} (it exports: {exports})"
    )]
    WrongWorld {
        /// File.
        file: PathBuf,
        /// What it exports.
        exports: String,
    },
    /// Imports something its policy does not grant, or that no host provides.
    #[error("{file}: imports {import}, which {reason}")]
    Import {
        /// File.
        file: PathBuf,
        /// The import.
        import: String,
        /// Why it is refused.
        reason: String,
    },
    /// The file's hash is not the one its policy pins.
    #[error("{file}: sha256 {actual} does not match the policy's pinned sha256 {expected}")]
    Hash {
        /// File.
        file: PathBuf,
        /// Hash of the file.
        actual: String,
        /// Pinned hash.
        expected: String,
    },
    /// Instantiation or `init` failed.
    #[error("plugin \"{plugin}\" on route \"{route}\": {message}")]
    Init {
        /// Plugin.
        plugin: String,
        /// Route.
        route: String,
        /// Cause.
        message: String,
    },
    /// A route names a plugin that is not in the plugins folder.
    #[error("route \"{route}\" uses plugin \"{plugin}\", but {dir} has no {plugin}.wasm")]
    Missing {
        /// Route.
        route: String,
        /// Plugin.
        plugin: String,
        /// Plugins folder.
        dir: String,
    },
}

impl PluginError {
    /// The plugin the error is about: the file stem for file errors, else the named plugin.
    pub fn plugin(&self) -> String {
        match self {
            PluginError::Read { file, .. }
            | PluginError::Compile { file, .. }
            | PluginError::WrongWorld { file, .. }
            | PluginError::Import { file, .. }
            | PluginError::Hash { file, .. } => file
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            PluginError::Init { plugin, .. } | PluginError::Missing { plugin, .. } => {
                plugin.clone()
            }
        }
    }
}

/// Per-plugin, per-route key-value state (0.1.0 `kv`, 0.2.0 `state`) with its quota
/// accounting and times to live.
#[derive(Debug, Default)]
pub struct KvStore {
    /// Value and expiry (Unix milliseconds) by key.
    map: HashMap<String, (Vec<u8>, Option<u64>)>,
    bytes: usize,
    /// The `state-format` of the aggregator version that last ran on it (`None`: a 0.1.0
    /// plugin, or none yet).
    pub format: Option<u32>,
    /// Changes so far (what [`persist`] saved is compared with it).
    changes: u64,
}

impl KvStore {
    /// The value of `key` unless it expired at `now` (Unix ms).
    pub fn get(&mut self, key: &str, now: u64) -> Option<Vec<u8>> {
        match self.map.get(key) {
            Some((_, Some(exp))) if *exp <= now => {
                self.delete(key);
                None
            }
            Some((v, _)) => Some(v.clone()),
            None => None,
        }
    }

    /// Stores `value` under `key` until `expires` (Unix ms), within `quota`; expired keys
    /// are removed first when the quota would be exceeded.
    pub(crate) fn set(
        &mut self,
        key: String,
        value: Vec<u8>,
        expires: Option<u64>,
        now: u64,
        quota: host::KvQuota,
    ) -> Result<(), String> {
        let fits = |kv: &KvStore| {
            let old = kv.map.get(&key).map(|(v, _)| key.len() + v.len());
            let bytes = kv.bytes - old.unwrap_or(0) + key.len() + value.len();
            if old.is_none() && kv.map.len() >= quota.max_keys {
                return Err(format!("kv quota: {} keys used", quota.max_keys));
            }
            if bytes > quota.max_bytes {
                return Err(format!(
                    "kv quota: {bytes} bytes would be used, {} allowed",
                    quota.max_bytes
                ));
            }
            Ok(bytes)
        };
        let bytes = match fits(self) {
            Ok(b) => b,
            Err(_) => {
                self.expire(now);
                fits(self)?
            }
        };
        self.bytes = bytes;
        self.map.insert(key, (value, expires));
        self.changes += 1;
        Ok(())
    }

    /// Removes `key`.
    pub fn delete(&mut self, key: &str) {
        if let Some((v, _)) = self.map.remove(key) {
            self.bytes -= key.len() + v.len();
            self.changes += 1;
        }
    }

    /// Removes every key expired at `now`.
    pub fn expire(&mut self, now: u64) {
        let gone: Vec<String> = self
            .map
            .iter()
            .filter(|(_, (_, e))| e.is_some_and(|e| e <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            self.delete(&k);
        }
    }

    /// Up to `limit` live keys starting with `prefix`, in byte order.
    pub fn keys(&mut self, prefix: &str, limit: usize, now: u64) -> Vec<String> {
        self.expire(now);
        let mut keys: Vec<String> = self
            .map
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        keys.sort_unstable();
        keys.truncate(limit);
        keys
    }

    /// Keys stored.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Nothing stored.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bytes of keys and values stored.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Forgets everything (a new version that cannot read this state).
    pub fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
        self.changes += 1;
    }

    /// Where the state is: changes so far (sets, deletions, expiries, clears) and its
    /// `format`. Equal values mean nothing to save.
    pub fn revision(&self) -> Revision {
        (self.changes, self.format)
    }
}

/// Where a [`KvStore`] is: its changes so far and its `format`.
pub type Revision = (u64, Option<u32>);

/// One (plugin, route)'s state, shared by its instances across rebuilds and reloads.
type SharedKv = Arc<Mutex<KvStore>>;

/// Everything a plugin instance's store holds.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    plugin: Arc<str>,
    route: Arc<str>,
    kv: Arc<Mutex<KvStore>>,
    kv_quota: host::KvQuota,
    log_limit: host::LogLimit,
    stderr: MemoryOutputPipe,
    budget: Option<CallBudget>,
    /// The policy grants `wasi-clocks`: sleeping waits.
    clocks_granted: bool,
    /// The time the plugin sees (`clock`, TTLs, timers).
    clock: timers::HostClock,
    /// An aggregator's timers.
    pub(crate) timers: timers::Timers,
    /// The (plugin, route)'s own metrics.
    own_metrics: Arc<Mutex<own_metrics::OwnMetrics>>,
    metrics_max_series: usize,
    metrics_granted: bool,
}

/// The time budget of the call in progress. A call may run for its budget in wall time (the
/// first epoch deadline; nothing is measured before it, so a normal call costs no clock reads);
/// past that it runs on until it has also used its budget in CPU time of its thread. A busy
/// machine that deschedules the thread therefore does not make a well-behaved plugin trap,
/// while an endless loop traps after 1-2x the budget. A wall-clock backstop stops any call.
#[derive(Debug, Clone, Copy)]
struct CallBudget {
    cpu: Duration,
    /// Thread, its CPU time and the wall time at the first deadline.
    first: Option<(std::thread::ThreadId, Duration, std::time::Instant)>,
}

impl CallBudget {
    /// Wall time allowed per unit of budget before the call is stopped regardless.
    const WALL_FACTOR: u32 = 100;
    /// Smallest wall-time backstop.
    const WALL_MIN: Duration = Duration::from_secs(2);

    fn start(cpu: Duration) -> CallBudget {
        CallBudget { cpu, first: None }
    }

    /// Called when the epoch deadline is reached: trap, or extend by the CPU time left.
    fn on_deadline(&mut self) -> wasmtime::UpdateDeadline {
        let thread = std::thread::current().id();
        let Some((t0, cpu0, wall0)) = self.first else {
            self.first = Some((thread, thread_cpu_time(), std::time::Instant::now()));
            return wasmtime::UpdateDeadline::Continue(ticks(self.cpu));
        };
        let wall = wall0.elapsed();
        if wall >= wall_backstop(self.cpu) {
            return wasmtime::UpdateDeadline::Interrupt;
        }
        // Host imports do not suspend a call, but if the fiber ever resumed on another thread
        // its CPU time is not comparable: count wall time then.
        let used = if thread == t0 {
            thread_cpu_time().saturating_sub(cpu0)
        } else {
            wall
        };
        match self.cpu.checked_sub(used) {
            Some(left) if !left.is_zero() => wasmtime::UpdateDeadline::Continue(ticks(left)),
            _ => wasmtime::UpdateDeadline::Interrupt,
        }
    }
}

/// The longest a call with this time budget may take in wall time, whatever it does:
/// [`CallBudget::WALL_FACTOR`] times the budget, at least [`CallBudget::WALL_MIN`].
pub(crate) fn wall_backstop(budget: Duration) -> Duration {
    (budget * CallBudget::WALL_FACTOR).max(CallBudget::WALL_MIN)
}

/// CPU time consumed by the current thread.
fn thread_cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        t.tv_sec.max(0) as u64,
        t.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// Arms the time budget of the next call into `store`.
pub(crate) fn arm_budget(store: &mut Store<HostState>, cpu: Duration) {
    store.data_mut().budget = Some(CallBudget::start(cpu));
    store.set_epoch_deadline(ticks(cpu));
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

enum Pre {
    Mapper(RouteMapperPre<HostState>),
    Filter(MessageFilterPre<HostState>),
    Aggregator(RouteAggregatorPre<HostState>),
}

/// One loaded (compiled, checked, pre-instantiated) version of a plugin.
pub struct Loaded {
    /// Plugin name (file stem).
    pub name: String,
    /// The file it came from.
    pub file: PathBuf,
    /// sha256 of the file, lowercase hex.
    pub sha256: String,
    /// Its world.
    pub world: World,
    /// File size, bytes.
    pub size: usize,
    /// The policy it was checked against and runs under.
    pub policy: Arc<Policy>,
    /// This plugin's version in this process: 1 for the first file loaded under its name, one
    /// more for every replacement (set when it is installed in a [`Registry`]).
    pub version: u64,
    /// When it was loaded.
    pub loaded_at: SystemTime,
    pre: Pre,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("name", &self.name)
            .field("sha256", &self.sha256)
            .field("world", &self.world)
            .field("version", &self.version)
            .finish()
    }
}

/// A live instance of a plugin in a store.
pub(crate) enum Instance {
    Mapper(RouteMapper),
    Filter(MessageFilter),
    Aggregator(RouteAggregator),
}

/// The wasmtime engine, linkers and shared plugin state of a process.
pub struct Runtime {
    engine: Engine,
    /// WASI and the plugin interfaces; serves both worlds (they import the same interfaces).
    linker: Linker<HostState>,
    kv: Mutex<HashMap<(String, String), SharedKv>>,
    /// States kept across restarts: (plugin, route) → file and the changes it holds.
    kept: Mutex<HashMap<(String, String), (PathBuf, Revision)>>,
    /// The task that saves them every [`persist::SAVE_EVERY`] runs.
    saving: AtomicBool,
    stop_ticker: Arc<AtomicBool>,
    /// The time plugins see.
    clock: timers::HostClock,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

impl Runtime {
    /// A runtime with its epoch ticker thread.
    pub fn new() -> Result<Arc<Runtime>, String> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.max_wasm_stack(512 * 1024);
        let engine = Engine::new(&config).map_err(|e| format!("wasmtime engine: {e}"))?;
        let mut linker: Linker<HostState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| format!("linking WASI: {e}"))?;
        sandbox::add_sleep_to_linker(&mut linker).map_err(|e| format!("linking WASI: {e}"))?;
        host::add_to_linker(&mut linker).map_err(|e| format!("linking host interfaces: {e}"))?;
        let stop_ticker = Arc::new(AtomicBool::new(false));
        let (e, stop) = (engine.clone(), stop_ticker.clone());
        std::thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    e.increment_epoch();
                }
            })
            .map_err(|e| format!("epoch thread: {e}"))?;
        Ok(Arc::new(Runtime {
            engine,
            linker,
            kv: Mutex::new(HashMap::new()),
            kept: Mutex::new(HashMap::new()),
            saving: AtomicBool::new(false),
            stop_ticker,
            clock: timers::HostClock::Real,
        }))
    }

    /// A runtime whose plugins see `clock` (`plugin test --messages` moves a virtual one).
    pub fn with_clock(clock: timers::HostClock) -> Result<Arc<Runtime>, String> {
        let rt = Runtime::new()?;
        let mut rt = Arc::try_unwrap(rt).map_err(|_| "runtime is shared".to_string())?;
        rt.clock = clock;
        Ok(Arc::new(rt))
    }

    /// The clock plugins of this runtime see.
    pub fn clock(&self) -> &timers::HostClock {
        &self.clock
    }

    /// Compiles and checks a component (blocking: run it off the async threads).
    pub fn load(
        &self,
        name: &str,
        file: &Path,
        bytes: &[u8],
        policy: Policy,
    ) -> Result<Loaded, PluginError> {
        let sha256 = hex(&Sha256::digest(bytes));
        if let Some(pinned) = &policy.sha256
            && *pinned != sha256
        {
            return Err(PluginError::Hash {
                file: file.to_path_buf(),
                actual: sha256,
                expected: pinned.clone(),
            });
        }
        if !bytes.starts_with(b"\0asm") {
            let head: String = String::from_utf8_lossy(&bytes[..bytes.len().min(16)])
                .chars()
                .map(|c| if c.is_control() { '.' } else { c })
                .collect();
            return Err(PluginError::Compile {
                file: file.to_path_buf(),
                message: format!(
                    "not WebAssembly: it starts with \"{head}\" ({} bytes); a WebAssembly file starts with \"\\0asm\"",
                    bytes.len()
                ),
            });
        }
        let component = Component::new(&self.engine, bytes).map_err(|e| PluginError::Compile {
            file: file.to_path_buf(),
            // One line: wasmtime's causes, without the multi-line layout of its details.
            message: format!("{e:#}")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
        })?;
        let ty = component.component_type();
        let exports: Vec<String> = ty
            .exports(&self.engine)
            .map(|(n, _)| n.to_string())
            .collect();
        let world = if exports
            .iter()
            .any(|e| e == &format!("edgebridge:plugin/aggregator@{WIT_VERSION_2}"))
        {
            World::Aggregator
        } else if exports
            .iter()
            .any(|e| e == &format!("edgebridge:plugin/mapper@{WIT_VERSION}"))
        {
            World::Mapper
        } else if exports
            .iter()
            .any(|e| e == &format!("edgebridge:plugin/filter@{WIT_VERSION}"))
        {
            World::Filter
        } else {
            return Err(PluginError::WrongWorld {
                file: file.to_path_buf(),
                exports: if exports.is_empty() {
                    "nothing".into()
                } else {
                    exports.join(", ")
                },
            });
        };
        for (import, _) in ty.imports(&self.engine) {
            let err = |reason: String| PluginError::Import {
                file: file.to_path_buf(),
                import: import.to_string(),
                reason,
            };
            if import == format!("edgebridge:plugin/types@{WIT_VERSION}") {
                // Type definitions only: no functions, nothing to grant.
                continue;
            }
            if let Some(i) = Import::from_interface(import) {
                // log, clock and kv are 0.1.0's (an aggregator reuses log and clock);
                // timers, metrics and state are 0.2.0's.
                let version = match i {
                    Import::Timers | Import::Metrics => WIT_VERSION_2,
                    Import::Kv if import.contains("/state@") => WIT_VERSION_2,
                    _ => WIT_VERSION,
                };
                if !import.ends_with(&format!("@{version}")) {
                    return Err(err(format!(
                        "is not version {version} of the plugin interface"
                    )));
                }
                if !policy.grants(i) {
                    return Err(err(format!(
                        "its policy does not grant (grants: {}; add `{}` to `imports` in the plugin's policy)",
                        policy
                            .imports
                            .iter()
                            .map(|i| i.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                        i.as_str()
                    )));
                }
            } else if let Some(reason) = sandbox::refused_wasi_import(import) {
                return Err(err(reason.into()));
            } else if !import.starts_with("wasi:") {
                return Err(err("the bridge does not provide".into()));
            }
        }
        let pre = match world {
            World::Mapper => self
                .linker
                .instantiate_pre(&component)
                .and_then(|p| RouteMapperPre::new(p).map(Pre::Mapper)),
            World::Filter => self
                .linker
                .instantiate_pre(&component)
                .and_then(|p| MessageFilterPre::new(p).map(Pre::Filter)),
            World::Aggregator => self
                .linker
                .instantiate_pre(&component)
                .and_then(|p| RouteAggregatorPre::new(p).map(Pre::Aggregator)),
        }
        .map_err(|e| PluginError::Import {
            file: file.to_path_buf(),
            import: "(linking)".into(),
            reason: format!("cannot be linked: {e:#}"),
        })?;
        Ok(Loaded {
            name: name.to_string(),
            file: file.to_path_buf(),
            sha256,
            world,
            size: bytes.len(),
            policy: Arc::new(policy),
            version: 0,
            loaded_at: SystemTime::now(),
            pre,
        })
    }

    /// Keeps the state of `plugin` on `route` in `file` across restarts: loads it now if this
    /// runtime has none for them yet (a damaged file is logged and set aside: empty state),
    /// saves it every [`persist::SAVE_EVERY`] when it changed, and in [`Runtime::save_states`].
    pub fn keep_state(self: &Arc<Self>, plugin: &str, route: &str, file: PathBuf) {
        let id = (plugin.to_string(), route.to_string());
        let mut kept = self.kept.lock().expect("kept states lock");
        if kept.contains_key(&id) {
            return;
        }
        // The store may exist already (an instance made to check the route's config holds it,
        // having set only its format): what was saved fills it in place when it is empty.
        let shared = self.kv_for(plugin, route);
        let mut store = shared.lock().expect("kv lock");
        if store.is_empty() {
            match persist::load(&file) {
                Ok(Some(saved)) => match (store.format, saved.format) {
                    (Some(now), Some(was)) if now != was => {
                        tracing::warn!(
                            plugin,
                            route,
                            saved = was,
                            now,
                            "The saved plugin state has another state format than the running version: it starts empty"
                        );
                    }
                    (now, _) => {
                        tracing::info!(plugin, route, keys = saved.len(), file = %file.display(), "Plugin state restored");
                        *store = KvStore {
                            format: now.or(saved.format),
                            ..saved
                        };
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(plugin, route, "{e}");
                    let _ = std::fs::rename(&file, file.with_extension("kv.damaged"));
                }
            }
        }
        let loaded = store.revision();
        drop(store);
        kept.insert(id, (file, loaded));
        drop(kept);
        if !self.saving.swap(true, Ordering::Relaxed)
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            let weak = Arc::downgrade(self);
            handle.spawn(async move {
                loop {
                    tokio::time::sleep(persist::SAVE_EVERY).await;
                    let Some(rt) = weak.upgrade() else { break };
                    let _ = tokio::task::spawn_blocking(move || rt.save_states()).await;
                }
            });
        }
    }

    /// Saves every kept state that changed since it was last saved (or loaded); the errors are
    /// logged and returned. Blocking: file writes and syncs.
    pub fn save_states(&self) -> Vec<persist::PersistError> {
        type Due = ((String, String), PathBuf, Revision);
        let due: Vec<Due> = self
            .kept
            .lock()
            .expect("kept states lock")
            .iter()
            .map(|(id, (file, saved))| (id.clone(), file.clone(), *saved))
            .collect();
        let mut errors = Vec::new();
        for (id, file, saved) in due {
            let Some(store) = self.kv.lock().expect("kv map lock").get(&id).cloned() else {
                continue;
            };
            let (bytes, revision) = {
                let kv = store.lock().expect("kv lock");
                if kv.revision() == saved {
                    continue;
                }
                (persist::encode(&kv), kv.revision())
            };
            match persist::save(&file, &bytes) {
                Ok(()) => {
                    if let Some(entry) = self.kept.lock().expect("kept states lock").get_mut(&id) {
                        entry.1 = revision;
                    }
                }
                Err(e) => {
                    tracing::error!(plugin = %id.0, route = %id.1, "{e}");
                    errors.push(e);
                }
            }
        }
        errors
    }

    fn kv_for(&self, plugin: &str, route: &str) -> Arc<Mutex<KvStore>> {
        self.kv
            .lock()
            .expect("kv map lock")
            .entry((plugin.to_string(), route.to_string()))
            .or_default()
            .clone()
    }

    /// A fresh store for `loaded` on `route`, with the policy's limits.
    pub(crate) fn store(
        &self,
        loaded: &Loaded,
        route: &str,
        counters: Option<Arc<crate::counters::PluginCounters>>,
    ) -> Store<HostState> {
        let stderr = MemoryOutputPipe::new(16 * 1024);
        let p = &loaded.policy;
        // Nothing of the host: no files, no network, no environment. What a plugin may observe
        // of the world — the time, random numbers — is a policy grant; without it, it is
        // fixed, so a plugin decides the same way every time.
        let mut wasi = WasiCtxBuilder::new();
        wasi.stderr(stderr.clone()).stdout(stderr.clone());
        wasi.monotonic_clock(sandbox::Monotonic {
            real: p.grants(Import::WasiClocks),
        });
        if !p.grants(Import::WasiClocks) {
            wasi.wall_clock(sandbox::Epoch);
        }
        if !p.grants(Import::WasiRandom) {
            use rand::SeedableRng;
            wasi.secure_random(rand::rngs::StdRng::seed_from_u64(0))
                .insecure_random(rand::rngs::StdRng::seed_from_u64(1))
                .insecure_random_seed(0);
        }
        let wasi = wasi.build();
        let state = HostState {
            wasi,
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(p.memory)
                .instances(64)
                .tables(64)
                .memories(16)
                .trap_on_grow_failure(true)
                .build(),
            plugin: loaded.name.as_str().into(),
            route: route.into(),
            kv: self.kv_for(&loaded.name, route),
            kv_quota: host::KvQuota {
                granted: p.grants(Import::Kv),
                max_keys: p.kv_max_keys,
                max_bytes: p.kv_max_bytes,
            },
            log_limit: host::LogLimit::new(
                p.log_lines_per_second,
                p.log_max_line,
                counters.clone(),
            ),
            stderr,
            budget: None,
            clocks_granted: p.grants(Import::WasiClocks),
            clock: self.clock.clone(),
            timers: timers::Timers::new(
                p.grants(Import::Timers),
                p.timers_max,
                p.timers_min_period,
            ),
            own_metrics: counters.as_ref().map(|c| c.own.clone()).unwrap_or_default(),
            metrics_max_series: p.metrics_max_series,
            metrics_granted: p.grants(Import::Metrics),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_callback(|mut ctx| {
            Ok(match &mut ctx.data_mut().budget {
                Some(b) => b.on_deadline(),
                None => wasmtime::UpdateDeadline::Interrupt,
            })
        });
        store
    }

    /// Instantiates `loaded` and calls `init(config)` (budget: 100 × the per-message time).
    pub(crate) async fn instantiate(
        &self,
        loaded: &Loaded,
        route: &str,
        config: &str,
    ) -> Result<(Store<HostState>, Instance), PluginError> {
        self.instantiate_counted(loaded, route, config, None).await
    }

    /// [`Runtime::instantiate`], counting what the instance's limits drop (its log lines) in
    /// `counters`.
    pub(crate) async fn instantiate_counted(
        &self,
        loaded: &Loaded,
        route: &str,
        config: &str,
        counters: Option<Arc<crate::counters::PluginCounters>>,
    ) -> Result<(Store<HostState>, Instance), PluginError> {
        let mut store = self.store(loaded, route, counters);
        let fail = |message: String| PluginError::Init {
            plugin: loaded.name.clone(),
            route: route.to_string(),
            message,
        };
        let budget = loaded.policy.time_per_message * 100;
        arm_budget(&mut store, budget);
        let backstop = wall_backstop(budget);
        let init = async {
            let result = match &loaded.pre {
                Pre::Mapper(pre) => {
                    let inst = pre
                        .instantiate_async(&mut store)
                        .await
                        .map_err(|e| fail(format!("instantiation failed: {e:#}")))?;
                    let r = inst
                        .edgebridge_plugin_mapper()
                        .call_init(&mut store, config)
                        .await;
                    (r, Instance::Mapper(inst))
                }
                Pre::Filter(pre) => {
                    let inst = pre
                        .instantiate_async(&mut store)
                        .await
                        .map_err(|e| fail(format!("instantiation failed: {e:#}")))?;
                    let r = inst
                        .edgebridge_plugin_filter()
                        .call_init(&mut store, config)
                        .await;
                    (r, Instance::Filter(inst))
                }
                Pre::Aggregator(pre) => {
                    let inst = pre
                        .instantiate_async(&mut store)
                        .await
                        .map_err(|e| fail(format!("instantiation failed: {e:#}")))?;
                    // The state is kept for a version that reads the same format.
                    let format = inst
                        .edgebridge_plugin0_2_0_aggregator()
                        .call_state_format(&mut store)
                        .await
                        .map_err(|e| fail(format!("state-format trapped: {e:#}")))?;
                    {
                        let kv = store.data().kv.clone();
                        let mut kv = kv.lock().expect("kv lock");
                        if let Some(old) = kv.format
                            && old != format
                            && !kv.is_empty()
                        {
                            warn!(plugin = %loaded.name, route, from = old, to = format, keys = kv.len(), "The new plugin version reads another state format: its state starts empty");
                            kv.clear();
                        }
                        kv.format = Some(format);
                    }
                    let r = inst
                        .edgebridge_plugin0_2_0_aggregator()
                        .call_init(&mut store, config)
                        .await;
                    (r, Instance::Aggregator(inst))
                }
            };
            Ok(result)
        };
        let result = match tokio::time::timeout(backstop, init).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(fail(format!(
                    "init did not return within {backstop:?} (the wall-clock backstop)"
                )));
            }
        };
        match result {
            (Ok(Ok(())), inst) => Ok((store, inst)),
            (Ok(Err(types::InitError::InvalidConfig(m))), _) => {
                Err(fail(format!("invalid config: {m}")))
            }
            (Ok(Err(types::InitError::Other(m))), _) => Err(fail(format!("init failed: {m}"))),
            (Err(trap), _) => Err(fail(format!(
                "init trapped: {}",
                describe_trap(&trap, &store)
            ))),
        }
    }
}

/// Epoch ticks for a time budget (at least 1, plus one for the tick in progress).
pub(crate) fn ticks(budget: Duration) -> u64 {
    (budget.as_micros() / EPOCH_TICK.as_micros()).max(1) as u64 + 1
}

/// A trap as one line: the cause (deadline, memory, panic message from stderr) first.
pub(crate) fn describe_trap(trap: &wasmtime::Error, store: &Store<HostState>) -> String {
    let stderr = store.data().stderr.contents();
    let text = String::from_utf8_lossy(&stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("note: run with"))
        .collect();
    // Rust prints "thread '..' panicked at src/lib.rs:L:C:" and the message on the next line.
    let panic = match lines.iter().rposition(|l| l.contains("panicked at")) {
        Some(i) => {
            let at = lines[i]
                .split("panicked at ")
                .nth(1)
                .unwrap_or("")
                .trim_end_matches(':');
            let msg = lines.get(i + 1).copied().unwrap_or("");
            format!("panicked at {at}: {msg}")
        }
        None => lines.last().copied().unwrap_or("").to_string(),
    };
    let cause = match trap.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => "time budget exceeded (epoch deadline)".to_string(),
        Some(t) => t.to_string(),
        None => format!("{trap:#}")
            .lines()
            .next()
            .unwrap_or("trap")
            .to_string(),
    };
    let cause = if format!("{trap:#}").contains("forcing trap when growing memory") {
        "memory limit reached".to_string()
    } else {
        cause
    };
    if panic.is_empty() {
        cause
    } else {
        format!("{cause}; guest said: {panic}")
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The running version of every plugin, swapped atomically on reload.
#[derive(Default)]
pub struct Registry {
    plugins: RwLock<HashMap<String, Arc<Loaded>>>,
    /// Bumped on every install or removal, so stages notice a change without a lookup.
    changes: AtomicU64,
    /// The last version installed under each name.
    versions: Mutex<HashMap<String, u64>>,
    seen: Mutex<HashMap<PathBuf, (SystemTime, u64)>>,
}

/// A plugin route configuration needed to canary-test a new version: (route, JSON config).
pub type Uses = HashMap<String, Vec<(String, String)>>;

impl Registry {
    /// The running version of `name`.
    pub fn current(&self, name: &str) -> Option<Arc<Loaded>> {
        self.plugins
            .read()
            .expect("registry lock")
            .get(name)
            .cloned()
    }

    /// How many installs and removals there were so far.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    /// Makes `loaded` the running version of its plugin, numbering it; returns the version
    /// it replaced.
    pub fn install(&self, mut loaded: Loaded) -> Option<Arc<Loaded>> {
        {
            let mut versions = self.versions.lock().expect("versions lock");
            let v = versions.entry(loaded.name.clone()).or_insert(0);
            *v += 1;
            loaded.version = *v;
        }
        let previous = self
            .plugins
            .write()
            .expect("registry lock")
            .insert(loaded.name.clone(), Arc::new(loaded));
        self.changes.fetch_add(1, Ordering::AcqRel);
        previous
    }

    /// Every running plugin, by name.
    pub fn list(&self) -> Vec<Arc<Loaded>> {
        let mut v: Vec<_> = self
            .plugins
            .read()
            .expect("registry lock")
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The one preparation of the plugins a configuration uses, for start, reload and
    /// `check` alike: scans `dir` (new or changed files canary-tested with every route
    /// configuration that uses them), then canary-tests each running plugin with every (route,
    /// config) of `uses` not in `known` (what already runs). Errors of files no route uses do
    /// not count. `Ok` holds the plugins a route names that are not in the folder
    /// ([`PluginError::Missing`]: their routes wait for them); `Err` every refusal.
    pub async fn prepare(
        &self,
        runtime: &Arc<Runtime>,
        dir: &Path,
        policies: &Policies,
        uses: &Uses,
        known: &Uses,
    ) -> Result<Vec<PluginError>, Vec<PluginError>> {
        let errors: Vec<PluginError> = self
            .scan(runtime, dir, policies, uses)
            .await
            .into_iter()
            .filter(|e| uses.contains_key(&e.plugin()))
            .collect();
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut names: Vec<&String> = uses.keys().collect();
        names.sort();
        let (mut missing, mut errors) = (Vec::new(), Vec::new());
        for plugin in names {
            let list = &uses[plugin];
            let Some(loaded) = self.current(plugin) else {
                missing.push(PluginError::Missing {
                    route: list[0].0.clone(),
                    plugin: plugin.clone(),
                    dir: dir.display().to_string(),
                });
                continue;
            };
            for (route, cfg) in list {
                let runs = known
                    .get(plugin)
                    .is_some_and(|l| l.iter().any(|(r, c)| r == route && c == cfg));
                if !runs && let Err(e) = runtime.instantiate(&loaded, route, cfg).await {
                    errors.push(e);
                }
            }
        }
        if errors.is_empty() {
            Ok(missing)
        } else {
            Err(errors)
        }
    }

    /// Scans `dir` once: loads new or changed `*.wasm` files (after a canary `init` with every
    /// route configuration that uses them) and unloads removed ones. A file that fails keeps
    /// the previous version running. Returns the errors, each naming its file.
    pub async fn scan(
        &self,
        runtime: &Arc<Runtime>,
        dir: &Path,
        policies: &Policies,
        uses: &Uses,
    ) -> Vec<PluginError> {
        let mut errors = Vec::new();
        let mut present = Vec::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect::<Vec<_>>(),
            Err(_) => Vec::new(),
        };
        for path in entries {
            let Some(name) = plugin_name(&path) else {
                continue;
            };
            present.push(name.clone());
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let stamp = (
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                meta.len(),
            );
            if self.seen.lock().expect("seen lock").get(&path) == Some(&stamp) {
                continue;
            }
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    errors.push(PluginError::Read {
                        file: path.clone(),
                        message: e.to_string(),
                    });
                    continue;
                }
            };
            self.seen
                .lock()
                .expect("seen lock")
                .insert(path.clone(), stamp);
            if let Some(cur) = self.current(&name)
                && cur.sha256 == hex(&Sha256::digest(&bytes))
            {
                continue;
            }
            let policy = policies.for_plugin(&name);
            let (rt, p, n) = (runtime.clone(), path.clone(), name.clone());
            let loaded = tokio::task::spawn_blocking(move || rt.load(&n, &p, &bytes, policy))
                .await
                .unwrap_or_else(|e| {
                    Err(PluginError::Compile {
                        file: path.clone(),
                        message: e.to_string(),
                    })
                });
            let loaded = match loaded {
                Ok(l) => l,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            // Canary: every route that uses the plugin must accept the new version's init.
            let mut ok = true;
            for (route, config) in uses.get(&name).map(Vec::as_slice).unwrap_or_default() {
                if let Err(e) = runtime.instantiate(&loaded, route, config).await {
                    errors.push(e);
                    ok = false;
                    break;
                }
            }
            if !ok {
                continue;
            }
            let previous = self.install(loaded);
            let now = self.current(&name).expect("just inserted");
            info!(
                plugin = %name,
                file = %now.file.display(),
                sha256 = %now.sha256,
                world = now.world.as_str(),
                version = now.version,
                replaced = previous.as_ref().map(|p| p.version),
                "Plugin loaded"
            );
        }
        let removed: Vec<String> = self
            .plugins
            .read()
            .expect("registry lock")
            .keys()
            .filter(|n| !present.contains(n))
            .cloned()
            .collect();
        for name in removed {
            if let Some(old) = self.plugins.write().expect("registry lock").remove(&name) {
                self.changes.fetch_add(1, Ordering::AcqRel);
                self.seen.lock().expect("seen lock").remove(&old.file);
                warn!(plugin = %name, version = old.version, "Plugin file removed: unloaded; routes using it wait for it (they read nothing from their source until it is back)");
            }
        }
        errors
    }

    /// Polls `dir` every `interval` until `stop` turns true, logging refused files; the
    /// policies and the routes' uses are the latest sent on `config` (a configuration reload
    /// changes them).
    pub fn watch(
        self: Arc<Self>,
        runtime: Arc<Runtime>,
        dir: PathBuf,
        config: tokio::sync::watch::Receiver<(Policies, Uses)>,
        interval: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut reported: HashMap<String, String> = HashMap::new();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = stop.changed() => return,
                }
                let (policies, uses) = config.borrow().clone();
                for e in self.scan(&runtime, &dir, &policies, &uses).await {
                    let text = e.to_string();
                    let key = e.plugin();
                    if reported.get(&key) != Some(&text) {
                        error!("Plugin refused, previous version keeps running: {text}");
                        reported.insert(key, text);
                    }
                }
            }
        })
    }
}

/// `name` for `<dir>/name.wasm`; dotfiles and temporary files are ignored.
pub fn plugin_name(path: &Path) -> Option<String> {
    if path.extension().and_then(|e| e.to_str()) != Some("wasm") || !path.is_file() {
        return None;
    }
    let stem = path.file_stem()?.to_str()?;
    if stem.starts_with('.') || stem.is_empty() {
        return None;
    }
    Some(stem.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_state_is_restored_saved_when_changed_and_a_damaged_file_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let file = persist::file_for(dir.path(), "r", "p");
        let quota = host::KvQuota {
            granted: true,
            max_keys: 10,
            max_bytes: 1 << 10,
        };
        let rt = Runtime::new().unwrap();
        rt.keep_state("p", "r", file.clone());
        assert!(rt.save_states().is_empty());
        assert!(!file.exists(), "nothing changed: nothing written");
        rt.kv_for("p", "r")
            .lock()
            .unwrap()
            .set("k".into(), b"v".to_vec(), None, 0, quota)
            .unwrap();
        assert!(rt.save_states().is_empty());
        let written = std::fs::metadata(&file).unwrap().modified().unwrap();
        assert!(rt.save_states().is_empty());
        assert_eq!(
            std::fs::metadata(&file).unwrap().modified().unwrap(),
            written,
            "unchanged since: not written again"
        );
        // A new process: restored.
        let rt = Runtime::new().unwrap();
        rt.keep_state("p", "r", file.clone());
        assert_eq!(
            rt.kv_for("p", "r").lock().unwrap().get("k", 0),
            Some(b"v".to_vec())
        );
        // A damaged file: set aside, empty state, and the next save writes a good one.
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[6] ^= 1;
        std::fs::write(&file, bytes).unwrap();
        let rt = Runtime::new().unwrap();
        rt.keep_state("p", "r", file.clone());
        assert!(rt.kv_for("p", "r").lock().unwrap().is_empty());
        assert!(file.with_extension("kv.damaged").exists());
        assert!(!file.exists());
    }

    #[test]
    fn the_sdk_carries_the_same_wit() {
        assert!(
            include_str!("../../../wit/plugin.wit")
                == include_str!("../../../plugins/sdk/wit/plugin.wit"),
            "plugins/sdk/wit/plugin.wit must be a copy of wit/plugin.wit (cp wit/plugin.wit plugins/sdk/wit/)"
        );
        assert!(
            include_str!("../../../wit/v0.2/plugin.wit")
                == include_str!("../../../plugins/sdk/wit/v0.2/plugin.wit"),
            "plugins/sdk/wit/v0.2/plugin.wit must be a copy of wit/v0.2/plugin.wit"
        );
        // 0.2.0 reuses the released 0.1.0 types: its dependency is the released file itself.
        for dep in [
            include_str!("../../../wit/v0.2/deps/plugin-0.1.0/plugin.wit"),
            include_str!("../../../plugins/sdk/wit/v0.2/deps/plugin-0.1.0/plugin.wit"),
        ] {
            assert!(
                dep == include_str!("../../../wit/plugin.wit"),
                "wit/v0.2/deps/plugin-0.1.0/plugin.wit (and the SDK's) must be a copy of wit/plugin.wit"
            );
        }
    }

    /// The SDK's version is the newest WIT package version it implements (0.2.x for
    /// `edgebridge:plugin@0.2.0`, with 0.1.0's worlds too), so a plugin's dependency says
    /// which contract it speaks.
    #[test]
    fn the_sdk_version_is_the_wit_package_version() {
        let wit = include_str!("../../../wit/v0.2/plugin.wit");
        let package = wit
            .lines()
            .find_map(|l| l.trim().strip_prefix("package edgebridge:plugin@"))
            .expect("a package line")
            .trim_end_matches(';');
        let cargo = include_str!("../../../plugins/sdk/Cargo.toml");
        let version = cargo
            .lines()
            .find_map(|l| l.trim().strip_prefix("version = \""))
            .expect("a version")
            .trim_end_matches('"');
        let minor = |v: &str| v.rsplit_once('.').map(|(a, _)| a.to_string());
        assert_eq!(
            minor(version),
            minor(package),
            "edgebridge-plugin-sdk {version} must implement edgebridge:plugin@{package} (same major.minor)"
        );
    }

    #[test]
    fn the_time_budget_counts_cpu_time_not_waiting() {
        let mut budget = CallBudget::start(Duration::from_millis(5));
        // First deadline: the budget in wall time is up; CPU time is counted from here.
        assert!(matches!(
            budget.on_deadline(),
            wasmtime::UpdateDeadline::Continue(_)
        ));
        // Descheduled (here: asleep) for 6x the budget: not the plugin's fault.
        std::thread::sleep(Duration::from_millis(30));
        assert!(matches!(
            budget.on_deadline(),
            wasmtime::UpdateDeadline::Continue(_)
        ));
        let t0 = thread_cpu_time();
        while thread_cpu_time().saturating_sub(t0) < Duration::from_millis(6) {}
        assert!(matches!(
            budget.on_deadline(),
            wasmtime::UpdateDeadline::Interrupt
        ));
    }

    #[test]
    fn the_wall_clock_backstop_still_stops_a_call() {
        let mut budget = CallBudget::start(Duration::from_millis(1));
        budget.on_deadline();
        if let Some((_, _, wall)) = &mut budget.first {
            *wall -= CallBudget::WALL_MIN;
        }
        assert!(matches!(
            budget.on_deadline(),
            wasmtime::UpdateDeadline::Interrupt
        ));
    }
}
