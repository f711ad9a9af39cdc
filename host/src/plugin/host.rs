//! The plugin interfaces the host implements (0.1.0's `log`, `clock`, `kv`; 0.2.0's
//! `timers`, `metrics`, `state`), each on a narrow view of
//! the store's state that holds only what that interface needs, linked with one
//! `add_to_linker` per interface (as wasmtime's own WASI crates do) — no state type
//! implements every interface.

use std::sync::Mutex;
use std::time::Duration;

use wasmtime::component::{HasData, Linker};

use super::bindings::aggregator::edgebridge::plugin0_2_0::{metrics, state, timers};
use super::bindings::mapper::edgebridge::plugin::{clock, kv, log};
use super::own_metrics::{Kind, Op, OwnMetrics};
use super::timers::{HostClock, Timers};
use super::{HostState, KvStore};

/// What a plugin's key-value state may hold, from its policy.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KvQuota {
    /// The policy grants `kv` (a component importing it without the grant is refused at
    /// load; this is the second line).
    pub(crate) granted: bool,
    pub(crate) max_keys: usize,
    pub(crate) max_bytes: usize,
}

/// The `tracing` target of the lines plugins write (`edgebridge plugin test` shows exactly
/// these; `RUST_LOG=edgebridge::plugin::guest=debug` selects them).
pub const GUEST_LOG: &str = "edgebridge::plugin::guest";

/// How much a (plugin, route) may log, from its policy: a token bucket of lines (burst: one
/// second's worth) and a line length; dropped lines are counted.
#[derive(Debug)]
pub(super) struct LogLimit {
    pub(super) per_second: f64,
    pub(super) max_line: usize,
    tokens: f64,
    last: std::time::Instant,
    pub(super) dropped: Option<std::sync::Arc<crate::counters::PluginCounters>>,
}

impl LogLimit {
    pub(super) fn new(
        per_second: u32,
        max_line: usize,
        dropped: Option<std::sync::Arc<crate::counters::PluginCounters>>,
    ) -> LogLimit {
        LogLimit {
            per_second: f64::from(per_second),
            max_line,
            tokens: f64::from(per_second),
            last: std::time::Instant::now(),
            dropped,
        }
    }

    /// Whether a line may be written now.
    fn take(&mut self) -> bool {
        let now = std::time::Instant::now();
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.per_second).min(self.per_second.max(1.0));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return true;
        }
        if let Some(c) = &self.dropped {
            c.log_dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        false
    }
}

/// `log`: the plugin and route its lines are tagged with, and its limit.
struct LogView<'a> {
    plugin: &'a str,
    route: &'a str,
    limit: &'a mut LogLimit,
}

impl log::Host for LogView<'_> {
    fn write(&mut self, level: log::Level, mut message: String) {
        if !self.limit.take() {
            return;
        }
        let max = self.limit.max_line;
        if message.len() > max {
            let mut cut = max;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        let (plugin, route) = (self.plugin, self.route);
        match level {
            log::Level::Trace => tracing::trace!(target: GUEST_LOG, plugin, route, "{message}"),
            log::Level::Debug => tracing::debug!(target: GUEST_LOG, plugin, route, "{message}"),
            log::Level::Info => tracing::info!(target: GUEST_LOG, plugin, route, "{message}"),
            log::Level::Warn => tracing::warn!(target: GUEST_LOG, plugin, route, "{message}"),
            log::Level::Error => tracing::error!(target: GUEST_LOG, plugin, route, "{message}"),
        }
    }
}

/// `clock`: the host's clock (virtual in `plugin test --messages`).
struct ClockView<'a>(&'a HostClock);

impl clock::Host for ClockView<'_> {
    fn now_millis(&mut self) -> u64 {
        self.0.now_millis()
    }
}

/// `kv` and `state`: the (plugin, route)'s state, its quota and the clock of its TTLs.
struct KvView<'a> {
    store: &'a Mutex<KvStore>,
    quota: KvQuota,
    clock: &'a HostClock,
}

impl kv::Host for KvView<'_> {
    fn get(&mut self, key: String) -> Option<Vec<u8>> {
        if !self.quota.granted {
            return None;
        }
        let now = self.clock.now_millis();
        self.store.lock().expect("kv lock").get(&key, now)
    }

    fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), String> {
        if !self.quota.granted {
            return Err("kv is not granted by this plugin's policy".into());
        }
        let now = self.clock.now_millis();
        self.store
            .lock()
            .expect("kv lock")
            .set(key, value, None, now, self.quota)
    }

    fn delete(&mut self, key: String) {
        if !self.quota.granted {
            return;
        }
        self.store.lock().expect("kv lock").delete(&key);
    }
}

impl state::Host for KvView<'_> {
    fn get(&mut self, key: String) -> Option<Vec<u8>> {
        kv::Host::get(self, key)
    }

    fn set(&mut self, key: String, value: Vec<u8>, ttl: Option<u64>) -> Result<(), String> {
        if !self.quota.granted {
            return Err("state is not granted by this plugin's policy (kv)".into());
        }
        let now = self.clock.now_millis();
        let expires = ttl.map(|t| now.saturating_add(t));
        self.store
            .lock()
            .expect("kv lock")
            .set(key, value, expires, now, self.quota)
    }

    fn delete(&mut self, key: String) {
        kv::Host::delete(self, key)
    }

    fn keys(&mut self, prefix: String, limit: u32) -> Vec<String> {
        if !self.quota.granted {
            return Vec::new();
        }
        let now = self.clock.now_millis();
        self.store
            .lock()
            .expect("kv lock")
            .keys(&prefix, limit.min(10_000) as usize, now)
    }
}

/// `timers`: the instance's timers and the clock they count on.
struct TimersView<'a> {
    timers: &'a mut Timers,
    clock: &'a HostClock,
}

impl timers::Host for TimersView<'_> {
    fn set(&mut self, name: String, after_millis: u64) -> Result<(), String> {
        let now = self.clock.timer_now();
        self.timers
            .set(name, Duration::from_millis(after_millis), now)
    }

    fn cancel(&mut self, name: String) {
        self.timers.cancel(&name)
    }

    fn count(&mut self) -> u32 {
        self.timers.len() as u32
    }
}

/// `metrics`: the (plugin, route)'s own metrics and the policy's bound on series.
struct MetricsView<'a> {
    own: &'a Mutex<OwnMetrics>,
    max_series: usize,
    granted: bool,
}

impl MetricsView<'_> {
    fn update(&mut self, metric: u32, values: Vec<String>, op: Op) -> Result<(), String> {
        if !self.granted {
            return Err("metrics are not granted by this plugin's policy".into());
        }
        self.own
            .lock()
            .expect("metrics lock")
            .update(metric, values, op, self.max_series)
    }
}

impl metrics::Host for MetricsView<'_> {
    fn declare(
        &mut self,
        name: String,
        help: String,
        kind: metrics::Kind,
        labels: Vec<String>,
        buckets: Vec<f64>,
    ) -> Result<u32, String> {
        if !self.granted {
            return Err("metrics are not granted by this plugin's policy".into());
        }
        let kind = match kind {
            metrics::Kind::Counter => Kind::Counter,
            metrics::Kind::Gauge => Kind::Gauge,
            metrics::Kind::Histogram => Kind::Histogram,
        };
        self.own
            .lock()
            .expect("metrics lock")
            .declare(&name, &help, kind, labels, buckets)
    }

    fn add(&mut self, metric: u32, values: Vec<String>, value: f64) -> Result<(), String> {
        self.update(metric, values, Op::Add(value))
    }

    fn set(&mut self, metric: u32, values: Vec<String>, value: f64) -> Result<(), String> {
        self.update(metric, values, Op::Set(value))
    }

    fn observe(&mut self, metric: u32, values: Vec<String>, value: f64) -> Result<(), String> {
        self.update(metric, values, Op::Observe(value))
    }
}

struct Log;
impl HasData for Log {
    type Data<'a> = LogView<'a>;
}

struct Clock;
impl HasData for Clock {
    type Data<'a> = ClockView<'a>;
}

struct TimersData;
impl HasData for TimersData {
    type Data<'a> = TimersView<'a>;
}

struct MetricsData;
impl HasData for MetricsData {
    type Data<'a> = MetricsView<'a>;
}

struct Kv;
impl HasData for Kv {
    type Data<'a> = KvView<'a>;
}

/// Links the six interfaces, each to its view of [`HostState`].
pub(super) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    log::add_to_linker::<HostState, Log>(linker, |s| LogView {
        plugin: &s.plugin,
        route: &s.route,
        limit: &mut s.log_limit,
    })?;
    clock::add_to_linker::<HostState, Clock>(linker, |s| ClockView(&s.clock))?;
    kv::add_to_linker::<HostState, Kv>(linker, |s| KvView {
        store: &s.kv,
        quota: s.kv_quota,
        clock: &s.clock,
    })?;
    state::add_to_linker::<HostState, Kv>(linker, |s| KvView {
        store: &s.kv,
        quota: s.kv_quota,
        clock: &s.clock,
    })?;
    timers::add_to_linker::<HostState, TimersData>(linker, |s| TimersView {
        timers: &mut s.timers,
        clock: &s.clock,
    })?;
    metrics::add_to_linker::<HostState, MetricsData>(linker, |s| MetricsView {
        own: &s.own_metrics,
        max_series: s.metrics_max_series,
        granted: s.metrics_granted,
    })?;
    Ok(())
}
