//! What a running bridge says about itself: liveness (forward progress, not socket state),
//! readiness (every session connected and subscribed), the `/status` document, and the table
//! `edgebridge status` prints from it. Reads the counters; does no I/O.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::counters::{CallOutcome, DropReason, RouteCounters, SessionCounters, Stats, uptime_ms};
use crate::plugin::Registry;

/// What the HTTP endpoint reports on.
pub struct Observed {
    /// The counters.
    pub stats: Arc<Stats>,
    /// The running plugin versions.
    pub plugins: Arc<Registry>,
    /// A route with messages in flight and none acknowledged for this long is not live.
    pub stall_timeout: Duration,
    /// When the process started.
    pub started: SystemTime,
}

/// Liveness: `Err` with a one-line reason when a route has had messages in flight and none
/// acknowledged for longer than the stall timeout, or an internal task died.
pub fn health(o: &Observed) -> Result<(), String> {
    let dead = o.stats.dead_tasks.lock().expect("stats lock").clone();
    if !dead.is_empty() {
        return Err(format!("internal task ended: {}", dead.join(", ")));
    }
    let now = uptime_ms();
    let clients = o.stats.clients();
    let up_for = SystemTime::now()
        .duration_since(o.started)
        .unwrap_or_default();
    if !clients.is_empty()
        && up_for > o.stall_timeout
        && clients.iter().all(|c| {
            c.source.connects.load(Ordering::Relaxed) == 0
                && c.target.connects.load(Ordering::Relaxed) == 0
        })
    {
        let why = clients
            .iter()
            .flat_map(|c| [c.source.last_error(), c.target.last_error()])
            .flatten()
            .map(|(e, _)| e)
            .next()
            .unwrap_or_else(|| "no attempt finished".into());
        return Err(format!(
            "no route client has connected to a broker in {} s since the start (stall timeout {} s): {why}",
            up_for.as_secs(),
            o.stall_timeout.as_secs()
        ));
    }
    for c in clients {
        if let Some(spool) = &c.spool {
            // A spooled route waiting for its target is what the spool is for; a spool that
            // cannot write is not live.
            if let Some(e) = spool.failure() {
                return Err(format!(
                    "route \"{}\" (client {}): the spool cannot write: {e}",
                    c.route, c.client_id
                ));
            }
            continue;
        }
        let in_flight = c.in_flight.load(Ordering::Relaxed);
        if in_flight == 0 {
            continue;
        }
        let since = c
            .last_progress_ms
            .load(Ordering::Relaxed)
            .max(c.busy_since_ms.load(Ordering::Relaxed));
        let stalled = Duration::from_millis(now.saturating_sub(since));
        if stalled > o.stall_timeout {
            return Err(format!(
                "route \"{}\" (client {}) has {in_flight} message(s) in flight and none acknowledged by its {} broker for {} s (stall timeout {} s)",
                c.route,
                c.client_id,
                c.target.side,
                stalled.as_secs(),
                o.stall_timeout.as_secs()
            ));
        }
    }
    Ok(())
}

/// Readiness: every session of every route client connected, every source subscribed;
/// `Err` lists what is not.
pub fn readiness(o: &Observed) -> Result<(), Vec<String>> {
    let mut not = Vec::new();
    for c in o.stats.clients() {
        for (role, s) in [("source", &c.source), ("target", &c.target)] {
            // A spooled route stores what its target cannot take: ready without it.
            if role == "target" && c.spool.is_some() {
                continue;
            }
            if !s.connected() {
                let error = s
                    .last_error()
                    .map(|(e, _)| format!(": {e}"))
                    .unwrap_or_default();
                not.push(format!(
                    "route \"{}\" client {} {role} ({}) {}{error}",
                    c.route,
                    c.client_id,
                    s.side,
                    s.state().as_str()
                ));
            } else if role == "source" && !s.subscribed.load(Ordering::Relaxed) {
                not.push(format!(
                    "route \"{}\" client {} source ({}) not subscribed",
                    c.route, c.client_id, s.side
                ));
            }
        }
    }
    if not.is_empty() { Ok(()) } else { Err(not) }
}

/// `2026-11-30T05:10:43Z` (UTC, seconds).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn session_json(s: &SessionCounters) -> Value {
    let link = s.link_info();
    json!({
        "side": s.side,
        "state": s.state().as_str(),
        "address": link.address,
        "proxy": link.proxy,
        "token_refreshed": link.last_refresh.map(|(at, how)| json!({"at": rfc3339(at), "how": how})),
        "reauth_in_place": s.reauth_in_place.load(Ordering::Relaxed),
        "reauth_reconnect": s.reauth_reconnect.load(Ordering::Relaxed),
        "reconnects": s.reconnects(),
        "source_lost": s.source_lost.load(Ordering::Relaxed),
        "last_error": s.last_error().map(|(message, at)| json!({"message": message, "at": rfc3339(at)})),
    })
}

fn client_json(c: &RouteCounters, o: &Observed) -> Value {
    let n = c.snapshot();
    let dropped: serde_json::Map<String, Value> = DropReason::ALL
        .iter()
        .map(|r| (r.as_str().to_string(), json!(n.dropped(*r))))
        .collect();
    let (_, sum, count) = c.latency.snapshot();
    let plugins: Vec<Value> = c
        .plugins
        .iter()
        .map(|name| {
            let counters = o.stats.plugin(name, &c.route);
            let calls: serde_json::Map<String, Value> = CallOutcome::ALL
                .iter()
                .map(|k| (k.as_str().to_string(), json!(counters.calls(*k))))
                .collect();
            let running = o.plugins.current(name);
            json!({
                "name": name,
                "loaded": running.is_some(),
                "version": running.as_ref().map(|l| l.version),
                "sha256": running.as_ref().map(|l| l.sha256.clone()),
                "loaded_at": running.as_ref().map(|l| rfc3339(l.loaded_at)),
                "calls": calls,
                "breaker_open": counters.breaker_open.load(Ordering::Relaxed) == 1,
                "world": running.as_ref().map(|l| l.world.as_str()),
                "timers": counters.timers_set.load(Ordering::Relaxed),
                "timers_fired": counters.timers_fired.load(Ordering::Relaxed),
            })
        })
        .collect();
    json!({
        "route": c.route,
        "direction": c.direction.as_str(),
        "client_id": c.client_id,
        "source": session_json(&c.source),
        "target": session_json(&c.target),
        "received": n.received,
        "forwarded": n.forwarded,
        "dropped": dropped,
        "in_flight": n.in_flight,
        "in_flight_bytes": c.in_flight_bytes.load(Ordering::Relaxed),
        "held_in_windows": c.held.load(Ordering::Relaxed),
        "redelivered": n.redelivered,
        "plugin_errors": n.plugin_errors,
        "waiting_for_plugin": c.waiting_for_plugin.lock().expect("counters lock").clone(),
        "forward_latency_seconds": {"count": count, "sum": sum},
        "plugins": plugins,
        "spool": c.spool.as_ref().map(|s| spool_json(s)),
    })
}

fn spool_json(s: &crate::spool::SpoolCounters) -> Value {
    let dropped: serde_json::Map<String, Value> = crate::spool::SpoolDrop::ALL
        .iter()
        .map(|r| (r.as_str().to_string(), json!(s.dropped(*r))))
        .collect();
    let oldest = s.oldest_us.load(Ordering::Relaxed);
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    json!({
        "dir": s.dir.display().to_string(),
        "messages": s.messages.load(Ordering::Relaxed),
        "bytes": s.bytes.load(Ordering::Relaxed),
        "oldest_age_seconds": if oldest == 0 { 0.0 } else { now_us.saturating_sub(oldest) as f64 / 1e6 },
        "appended": s.appended.load(Ordering::Relaxed),
        "released": s.released.load(Ordering::Relaxed),
        "dropped": dropped,
        "blocked": s.blocked.load(Ordering::Relaxed),
        "failed": s.failure(),
        "recovery_seconds": s.recovery_us.load(Ordering::Relaxed) as f64 / 1e6,
    })
}

/// The `/status` document.
pub fn status_json(o: &Observed) -> Value {
    let last = o.stats.last_reload.lock().expect("stats lock").clone();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "started": rfc3339(o.started),
        "uptime_seconds": o.started.elapsed().map(|d| d.as_secs()).unwrap_or(0),
        "healthy": health(o).is_ok(),
        "health": health(o).err(),
        "ready": readiness(o).is_ok(),
        "not_ready": readiness(o).err().unwrap_or_default(),
        "config": {
            "reloads_ok": o.stats.reloads_ok.load(Ordering::Relaxed),
            "reloads_failed": o.stats.reloads_failed.load(Ordering::Relaxed),
            "last_reload": last.map(|r| json!({
                "at": rfc3339(r.at),
                "ok": r.errors.is_empty(),
                "errors": r.errors,
                "summary": r.summary,
            })),
        },
        "route_clients": o.stats.clients().iter().map(|c| client_json(c, o)).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Direction;

    fn observed() -> Observed {
        Observed {
            stats: Arc::new(Stats::default()),
            plugins: Arc::new(Registry::default()),
            stall_timeout: Duration::from_secs(60),
            started: SystemTime::now(),
        }
    }

    /// The counters of a route client "r", registered in `o`.
    fn registered(o: &Observed) -> Arc<RouteCounters> {
        let c = Arc::new(RouteCounters::new(
            "r",
            Direction::LocalToRemote,
            "c-r",
            "local",
            "remote",
        ));
        o.stats.register(c.clone());
        c
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_796_015_443);
        assert_eq!(rfc3339(t), "2026-11-30T05:10:43Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn a_bridge_none_of_whose_route_clients_ever_connected_is_not_live() {
        let mut o = observed();
        o.stall_timeout = Duration::from_millis(50);
        let c = registered(&o);
        assert!(health(&o).is_ok(), "within the stall timeout of the start");
        c.source
            .set_error("broker refused the connection: protocol error (code 0x82)".into());
        std::thread::sleep(Duration::from_millis(80));
        let e = health(&o).unwrap_err();
        assert!(
            e.contains("no route client has connected") && e.contains("code 0x82"),
            "{e}"
        );
        c.target.connects.store(1, Ordering::Relaxed);
        assert!(health(&o).is_ok(), "one connection is enough");
    }

    #[test]
    fn a_route_with_messages_in_flight_and_no_acknowledgement_is_not_live() {
        let mut o = observed();
        o.stall_timeout = Duration::from_millis(50);
        let c = registered(&o);
        c.source.connects.store(1, Ordering::Relaxed);
        assert!(health(&o).is_ok(), "idle is healthy");
        c.in_flight.store(3, Ordering::Relaxed);
        c.busy_since_ms.store(uptime_ms(), Ordering::Relaxed);
        assert!(health(&o).is_ok(), "busy, within the bound");
        std::thread::sleep(Duration::from_millis(120));
        let e = health(&o).unwrap_err();
        assert!(
            e.contains("route \"r\"") && e.contains("3 message(s) in flight"),
            "{e}"
        );
        c.last_progress_ms.store(uptime_ms(), Ordering::Relaxed);
        assert!(health(&o).is_ok(), "an acknowledgement is progress");
        o.stats
            .dead_tasks
            .lock()
            .unwrap()
            .push("plugin folder watcher".into());
        assert!(health(&o).unwrap_err().contains("plugin folder watcher"));
    }

    #[test]
    fn readiness_lists_what_is_not_connected_or_subscribed() {
        let o = observed();
        let c = registered(&o);
        c.source.set_error("cannot connect".into());
        let not = readiness(&o).unwrap_err();
        assert_eq!(not.len(), 2, "{not:?}");
        assert!(
            not[0].contains("source (local) connecting: cannot connect"),
            "{not:?}"
        );
        c.source.set_state(crate::counters::LinkState::Up);
        c.target.set_state(crate::counters::LinkState::Up);
        assert!(readiness(&o).unwrap_err()[0].contains("not subscribed"));
        c.source.subscribed.store(true, Ordering::Relaxed);
        assert!(readiness(&o).is_ok());
        let table =
            crate::tools::status_table::render(&status_json(&o), None, Duration::from_secs(1));
        assert!(table.contains("ROUTE") && table.contains("c-r"), "{table}");
    }
}
