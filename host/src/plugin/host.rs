//! The plugin interfaces the host implements (`log`, `clock`, `kv`), each on a narrow view of
//! the store's state that holds only what that interface needs, linked with one
//! `add_to_linker` per interface (as wasmtime's own WASI crates do) — no state type
//! implements every interface.

use std::sync::Mutex;
use std::time::SystemTime;

use wasmtime::component::{HasData, Linker};

use super::bindings::mapper::edgebridge::plugin::{clock, kv, log};
use super::{HostState, KvStore};

/// What a plugin's key-value state may hold, from its policy.
#[derive(Debug, Clone, Copy)]
pub(super) struct KvQuota {
    /// The policy grants `kv` (a component importing it without the grant is refused at
    /// load; this is the second line).
    pub(super) granted: bool,
    pub(super) max_keys: usize,
    pub(super) max_bytes: usize,
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

/// `clock`: needs nothing.
struct ClockView;

impl clock::Host for ClockView {
    fn now_millis(&mut self) -> u64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// `kv`: the (plugin, route)'s state and its quota.
struct KvView<'a> {
    store: &'a Mutex<KvStore>,
    quota: KvQuota,
}

impl kv::Host for KvView<'_> {
    fn get(&mut self, key: String) -> Option<Vec<u8>> {
        if !self.quota.granted {
            return None;
        }
        self.store.lock().expect("kv lock").map.get(&key).cloned()
    }

    fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), String> {
        if !self.quota.granted {
            return Err("kv is not granted by this plugin's policy".into());
        }
        let mut kv = self.store.lock().expect("kv lock");
        let old = kv.map.get(&key).map(|v| key.len() + v.len()).unwrap_or(0);
        let new_bytes = kv.bytes - old + key.len() + value.len();
        if old == 0 && kv.map.len() >= self.quota.max_keys {
            return Err(format!("kv quota: {} keys used", self.quota.max_keys));
        }
        if new_bytes > self.quota.max_bytes {
            return Err(format!(
                "kv quota: {} bytes would be used, {} allowed",
                new_bytes, self.quota.max_bytes
            ));
        }
        kv.bytes = new_bytes;
        kv.map.insert(key, value);
        Ok(())
    }

    fn delete(&mut self, key: String) {
        if !self.quota.granted {
            return;
        }
        let mut kv = self.store.lock().expect("kv lock");
        if let Some(v) = kv.map.remove(&key) {
            kv.bytes -= key.len() + v.len();
        }
    }
}

struct Log;
impl HasData for Log {
    type Data<'a> = LogView<'a>;
}

struct Clock;
impl HasData for Clock {
    type Data<'a> = ClockView;
}

struct Kv;
impl HasData for Kv {
    type Data<'a> = KvView<'a>;
}

/// Links the three interfaces, each to its view of [`HostState`].
pub(super) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    log::add_to_linker::<HostState, Log>(linker, |s| LogView {
        plugin: &s.plugin,
        route: &s.route,
        limit: &mut s.log_limit,
    })?;
    clock::add_to_linker::<HostState, Clock>(linker, |_| ClockView)?;
    kv::add_to_linker::<HostState, Kv>(linker, |s| KvView {
        store: &s.kv,
        quota: s.kv_quota,
    })?;
    Ok(())
}
