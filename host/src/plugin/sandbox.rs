//! The WASI environment of a plugin: what it may observe of the host.
//!
//! `wasmtime-wasi` gives a component the host's clocks, sleeping and random numbers by
//! default. Here they are policy grants (`wasi-clocks`, `wasi-random`), like the plugin
//! interfaces: without `wasi-clocks` the wall clock reads 1970-01-01T00:00:00Z, the monotonic
//! clock never moves and sleeping returns at once (so a plugin cannot block its route in a
//! host call, where no epoch deadline fires); without `wasi-random`, random numbers are a
//! fixed sequence. Network interfaces cannot be imported at all.

use std::time::Duration;

use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::clocks::{HostMonotonicClock, HostWallClock};
use wasmtime_wasi::p2::{DynPollable, Pollable, subscribe};

use super::HostState;

/// The WASI version whose `monotonic-clock` functions are replaced.
const CLOCKS: &str = "wasi:clocks/monotonic-clock@0.2.12";

/// A wall clock stopped at the Unix epoch.
pub(super) struct Epoch;

impl HostWallClock for Epoch {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

static START: std::sync::LazyLock<std::time::Instant> =
    std::sync::LazyLock::new(std::time::Instant::now);

/// The monotonic clock: the host's (nanoseconds since the process started) when `real`,
/// else stopped at 0.
pub(super) struct Monotonic {
    pub(super) real: bool,
}

impl HostMonotonicClock for Monotonic {
    fn resolution(&self) -> u64 {
        1
    }
    fn now(&self) -> u64 {
        if self.real {
            START.elapsed().as_nanos() as u64
        } else {
            0
        }
    }
}

/// A sleep: ready at its deadline, or at once when there is none.
struct Sleep(Option<tokio::time::Instant>);

#[wasmtime_wasi::async_trait]
impl Pollable for Sleep {
    async fn ready(&mut self) {
        if let Some(at) = self.0 {
            tokio::time::sleep_until(at).await;
        }
    }
}

fn sleep(state: &mut HostState, nanos: u64) -> wasmtime::Result<Resource<DynPollable>> {
    let until = state
        .clocks_granted
        .then(|| tokio::time::Instant::now() + Duration::from_nanos(nanos));
    let r = state.table.push(Sleep(until))?;
    subscribe(&mut state.table, r)
}

/// Replaces `subscribe-duration` and `subscribe-instant` of the monotonic clock so that
/// sleeping follows the plugin's grant (the WASI implementation always waits real time).
pub(super) fn add_sleep_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut clocks = linker.instance(CLOCKS)?;
    clocks.func_wrap("subscribe-duration", |mut store, (nanos,): (u64,)| {
        Ok((sleep(store.data_mut(), nanos)?,))
    })?;
    clocks.func_wrap("subscribe-instant", |mut store, (when,): (u64,)| {
        let state = store.data_mut();
        let now = Monotonic {
            real: state.clocks_granted,
        }
        .now();
        Ok((sleep(state, when.saturating_sub(now))?,))
    })?;
    linker.allow_shadowing(false);
    Ok(())
}

/// Why a WASI import is refused, if it is: plugins get no network.
pub(super) fn refused_wasi_import(import: &str) -> Option<&'static str> {
    (import.starts_with("wasi:sockets/") || import.starts_with("wasi:http/"))
        .then_some("gives network access, which plugins never have")
}
