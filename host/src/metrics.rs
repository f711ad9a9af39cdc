//! `/metrics`: the counters in the Prometheus text exposition format, encoded by
//! `prometheus-client` from a collector that reads [`crate::counters`] at scrape time (so the
//! hot path pays only its relaxed atomic adds). The metric names and labels are a contract,
//! documented in the README.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::counters::{CallOutcome, DropReason, Histogram};
use crate::status::Observed;

/// Encodes every metric of `observed`.
pub fn render(observed: std::sync::Arc<Observed>) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape(observed)));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

struct Scrape(std::sync::Arc<Observed>);

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("edgebridge metrics")
    }
}

type Labels = Vec<(&'static str, String)>;

/// A family of counters or gauges: (labels, value).
fn family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in rows {
        if labels.is_empty() {
            // `name_total 3`, not `name_total{} 3`.
            match kind {
                MetricType::Counter => m.encode_counter::<NoLabelSet, u64, u64>(v, None)?,
                _ => m.encode_gauge(&(*v as i64))?,
            }
            continue;
        }
        let mut e = m.encode_family(labels)?;
        match kind {
            MetricType::Counter => e.encode_counter::<NoLabelSet, u64, u64>(v, None)?,
            _ => e.encode_gauge(&(*v as i64))?,
        }
    }
    Ok(())
}

/// A family of histograms: (labels, [histograms summed]).
fn histograms(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, Vec<&Histogram>)],
) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, hs) in rows {
        let mut buckets: Vec<(f64, u64)> = Vec::new();
        let (mut sum, mut count) = (0.0, 0);
        for h in hs {
            let (b, s, c) = h.snapshot();
            if buckets.is_empty() {
                buckets = b;
            } else {
                for (acc, x) in buckets.iter_mut().zip(b) {
                    acc.1 += x.1;
                }
            }
            sum += s;
            count += c;
        }
        m.encode_family(labels)?
            .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
    }
    Ok(())
}

/// The metrics plugins declared themselves: `edgebridge_plugin_<plugin>_<name>` with the
/// labels `plugin`, `route` and the plugin's own; one family per name, over the routes.
fn own_metrics(
    encoder: &mut DescriptorEncoder,
    plugins: &[std::sync::Arc<crate::counters::PluginCounters>],
) -> Result<(), std::fmt::Error> {
    use crate::plugin::own_metrics::{Kind, Value};
    type Row = (Vec<(String, String)>, Value);
    let mut families: BTreeMap<String, (String, Kind, Vec<f64>, Vec<Row>)> = BTreeMap::new();
    for p in plugins {
        let own = p.own.lock().expect("metrics lock");
        let prefix: String = p
            .plugin
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect();
        for d in &own.declared {
            let name = format!("edgebridge_plugin_{prefix}_{}", d.name);
            let entry = families
                .entry(name)
                .or_insert_with(|| (d.help.clone(), d.kind, d.buckets.clone(), Vec::new()));
            // Another version declared it otherwise: only the first is exported.
            if entry.1 != d.kind || entry.2 != d.buckets {
                continue;
            }
            for (values, v) in &d.series {
                let mut labels = vec![
                    ("plugin".to_string(), p.plugin.clone()),
                    ("route".to_string(), p.route.clone()),
                ];
                labels.extend(d.labels.iter().cloned().zip(values.iter().cloned()));
                entry.3.push((labels, v.clone()));
            }
        }
    }
    for (name, (help, kind, buckets, rows)) in families {
        let ty = match kind {
            Kind::Counter => MetricType::Counter,
            Kind::Gauge => MetricType::Gauge,
            Kind::Histogram => MetricType::Histogram,
        };
        let mut m = encoder.encode_descriptor(&name, &help, None, ty)?;
        for (labels, v) in rows {
            let mut e = m.encode_family(&labels)?;
            match v {
                Value::Number(x) if kind == Kind::Counter => {
                    e.encode_counter::<NoLabelSet, f64, u64>(&x, None)?
                }
                Value::Number(x) => e.encode_gauge(&x)?,
                Value::Histogram { counts, sum, count } => {
                    // The encoder takes the count of each bucket alone (it accumulates).
                    let mut below = 0;
                    let mut b: Vec<(f64, u64)> = Vec::with_capacity(buckets.len() + 1);
                    for (bound, cumulative) in buckets.iter().zip(counts) {
                        b.push((*bound, cumulative - below));
                        below = cumulative;
                    }
                    b.push((f64::MAX, count - below));
                    e.encode_histogram::<NoLabelSet>(sum, count, &b, None)?
                }
            }
        }
    }
    Ok(())
}

/// The `edgebridge_spool_*` families, one series per spooled route client.
fn spool_families(
    encoder: &mut DescriptorEncoder,
    spooled: &[(
        &std::sync::Arc<crate::counters::RouteCounters>,
        &std::sync::Arc<crate::spool::SpoolCounters>,
    )],
) -> Result<(), std::fmt::Error> {
    let labels = |c: &crate::counters::RouteCounters| -> Labels {
        vec![
            ("route", c.route.clone()),
            ("client_id", c.client_id.clone()),
        ]
    };
    let rows = |f: &dyn Fn(&crate::spool::SpoolCounters) -> u64| -> Vec<(Labels, u64)> {
        spooled.iter().map(|(c, s)| (labels(c), f(s))).collect()
    };
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    for (name, help, kind, f) in [
        (
            "edgebridge_spool_bytes",
            "Bytes of the spool's segment files.",
            MetricType::Gauge,
            &(|s: &crate::spool::SpoolCounters| s.bytes.load(Ordering::Relaxed))
                as &dyn Fn(&crate::spool::SpoolCounters) -> u64,
        ),
        (
            "edgebridge_spool_messages",
            "Records in the spool not yet acknowledged by the target.",
            MetricType::Gauge,
            &|s| s.messages.load(Ordering::Relaxed),
        ),
        (
            "edgebridge_spool_oldest_age_seconds",
            "Age of the oldest record not yet acknowledged by the target (0 when empty).",
            MetricType::Gauge,
            &|s| match s.oldest_us.load(Ordering::Relaxed) {
                0 => 0,
                t => now_us.saturating_sub(t) / 1_000_000,
            },
        ),
        (
            "edgebridge_spool_appended",
            "Records appended to the spool.",
            MetricType::Counter,
            &|s| s.appended.load(Ordering::Relaxed),
        ),
        (
            "edgebridge_spool_released",
            "Records the target acknowledged (or refused), which left the spool.",
            MetricType::Counter,
            &|s| s.released.load(Ordering::Relaxed),
        ),
        (
            "edgebridge_spool_recovered",
            "Records found in the spool when it was last opened (appended + recovered = released + dropped + messages).",
            MetricType::Gauge,
            &|s| s.recovered.load(Ordering::Relaxed),
        ),
        (
            "edgebridge_spool_failures",
            "Times a spool write or fdatasync failed (the route stopped reading its source until the spool was open again).",
            MetricType::Counter,
            &|s| s.failures.load(Ordering::Relaxed),
        ),
        (
            "edgebridge_spool_blocked",
            "1 while the spool takes nothing more (full with whenFull: block, or below minFreeBytes).",
            MetricType::Gauge,
            &|s| u64::from(s.blocked.load(Ordering::Relaxed)),
        ),
        (
            "edgebridge_spool_truncated_bytes",
            "Bytes of torn tails cut off at recovery (written, never synced, before a crash).",
            MetricType::Counter,
            &|s| s.truncated_bytes.load(Ordering::Relaxed),
        ),
    ] {
        family(encoder, name, help, kind, &rows(f))?;
    }
    let mut dropped = Vec::new();
    for (c, s) in spooled {
        for r in crate::spool::SpoolDrop::ALL {
            let mut l = labels(c);
            l.push(("reason", r.as_str().to_string()));
            dropped.push((l, s.dropped(r)));
        }
    }
    family(
        encoder,
        "edgebridge_spool_dropped",
        "Records that left the spool unsent, by reason (full: whenFull drop-oldest; max_age; expired: MQTT 5 message expiry; corrupt: damaged on disk).",
        MetricType::Counter,
        &dropped,
    )?;
    let mut m = encoder.encode_descriptor(
        "edgebridge_spool_recovery_seconds",
        "How long the last opening (recovery) of the spool took.",
        None,
        MetricType::Gauge,
    )?;
    for (c, s) in spooled {
        m.encode_family(&labels(c))?
            .encode_gauge(&(s.recovery_us.load(Ordering::Relaxed) as f64 / 1e6))?;
    }
    let fsync: Vec<(Labels, Vec<&Histogram>)> = spooled
        .iter()
        .map(|(c, s)| (labels(c), vec![&s.fsync]))
        .collect();
    histograms(
        encoder,
        "edgebridge_spool_fsync_seconds",
        "Time of each group commit's fdatasync (data files and cursor).",
        &fsync,
    )
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let o = &self.0;
        let clients = o.stats.clients();
        // Per route: the sum over its clients (a shared subscription has several).
        let mut routes: BTreeMap<(String, &'static str), Vec<_>> = BTreeMap::new();
        for c in &clients {
            routes
                .entry((c.route.clone(), c.direction.as_str()))
                .or_default()
                .push(c.clone());
        }
        let route_labels = |(r, d): &(String, &'static str)| -> Labels {
            vec![("route", r.clone()), ("direction", d.to_string())]
        };
        let sum = |f: &dyn Fn(&crate::counters::RouteCounters) -> u64| -> Vec<(Labels, u64)> {
            routes
                .iter()
                .map(|(k, cs)| (route_labels(k), cs.iter().map(|c| f(c)).sum()))
                .collect()
        };
        family(
            &mut encoder,
            "edgebridge_messages_received",
            "Messages received from the route's source broker.",
            MetricType::Counter,
            &sum(&|c| c.received.load(Ordering::Relaxed)),
        )?;
        family(
            &mut encoder,
            "edgebridge_messages_forwarded",
            "Messages acknowledged by the route's target broker (QoS 0: written to it).",
            MetricType::Counter,
            &sum(&|c| c.forwarded.load(Ordering::Relaxed)),
        )?;
        let mut dropped = Vec::new();
        for (k, cs) in &routes {
            for r in DropReason::ALL {
                let mut labels = route_labels(k);
                labels.push(("reason", r.as_str().to_string()));
                dropped.push((labels, cs.iter().map(|c| c.dropped(r)).sum()));
            }
        }
        family(
            &mut encoder,
            "edgebridge_messages_dropped",
            "Messages received and not forwarded to the target, by reason.",
            MetricType::Counter,
            &dropped,
        )?;
        family(
            &mut encoder,
            "edgebridge_messages_in_flight",
            "Messages forwarded and not yet acknowledged by the target broker.",
            MetricType::Gauge,
            &sum(&|c| c.in_flight.load(Ordering::Relaxed)),
        )?;
        family(
            &mut encoder,
            "edgebridge_messages_held",
            "Source messages an aggregator plugin holds in windows (acknowledged when the window's result is).",
            MetricType::Gauge,
            &sum(&|c| c.held.load(Ordering::Relaxed)),
        )?;
        family(
            &mut encoder,
            "edgebridge_messages_in_flight_bytes",
            "Payload and topic bytes of the messages in flight (bounded by --max-inflight-mib).",
            MetricType::Gauge,
            &sum(&|c| c.in_flight_bytes.load(Ordering::Relaxed)),
        )?;
        let latency: Vec<(Labels, Vec<&Histogram>)> = routes
            .iter()
            .map(|(k, cs)| (route_labels(k), cs.iter().map(|c| &c.latency).collect()))
            .collect();
        histograms(
            &mut encoder,
            "edgebridge_forward_latency_seconds",
            "Time from receipt at the source to acknowledgement by the target, per message.",
            &latency,
        )?;
        // Per spooled route client.
        let spooled: Vec<_> = clients
            .iter()
            .filter_map(|c| Some((c, c.spool.as_ref()?)))
            .collect();
        if !spooled.is_empty() {
            spool_families(&mut encoder, &spooled)?;
        }
        // Per session.
        let mut connected = Vec::new();
        let mut reconnects = Vec::new();
        let mut lost = Vec::new();
        let mut refreshes = Vec::new();
        let mut address = Vec::new();
        for c in &clients {
            for s in [&c.source, &c.target] {
                let labels: Labels = vec![
                    ("route", c.route.clone()),
                    ("side", s.side.to_string()),
                    ("client_id", c.client_id.clone()),
                ];
                for (how, n) in [
                    ("in-place", &s.reauth_in_place),
                    ("reconnect", &s.reauth_reconnect),
                ] {
                    let mut l = labels.clone();
                    l.push(("how", how.to_string()));
                    refreshes.push((l, n.load(Ordering::Relaxed)));
                }
                let link = s.link_info();
                if !link.address.is_empty() {
                    let mut l = labels.clone();
                    l.push(("address", link.address));
                    l.push(("proxy", link.proxy.unwrap_or_default()));
                    address.push((l, u64::from(s.connected())));
                }
                connected.push((labels.clone(), u64::from(s.connected())));
                reconnects.push((labels.clone(), s.reconnects()));
                lost.push((labels, s.source_lost.load(Ordering::Relaxed)));
            }
        }
        family(
            &mut encoder,
            "edgebridge_session_connected",
            "1 while the session is connected.",
            MetricType::Gauge,
            &connected,
        )?;
        family(
            &mut encoder,
            "edgebridge_session_reconnects",
            "Connections of the session after its first.",
            MetricType::Counter,
            &reconnects,
        )?;
        family(
            &mut encoder,
            "edgebridge_session_source_lost",
            "The broker did not resume the bridge's persistent session (session present = 0): messages it held for the bridge may be lost.",
            MetricType::Counter,
            &lost,
        )?;
        family(
            &mut encoder,
            "edgebridge_session_token_refreshes",
            "Fresh tokens presented: in-place (MQTT 5 AUTH on the open connection) or by reconnecting.",
            MetricType::Counter,
            &refreshes,
        )?;
        family(
            &mut encoder,
            "edgebridge_session_address",
            "The broker address (and HTTP proxy, empty when none) of the session's current or last connection; 1 while connected.",
            MetricType::Gauge,
            &address,
        )?;
        // Per plugin on a route.
        let plugins = o.stats.plugins();
        let plugin_labels = |p: &crate::counters::PluginCounters| -> Labels {
            vec![("plugin", p.plugin.clone()), ("route", p.route.clone())]
        };
        let mut calls = Vec::new();
        for p in &plugins {
            for k in CallOutcome::ALL {
                let mut labels = plugin_labels(p);
                labels.push(("outcome", k.as_str().to_string()));
                calls.push((labels, p.calls(k)));
            }
        }
        family(
            &mut encoder,
            "edgebridge_plugin_calls",
            "Plugin calls by outcome.",
            MetricType::Counter,
            &calls,
        )?;
        let durations: Vec<(Labels, Vec<&Histogram>)> = plugins
            .iter()
            .map(|p| (plugin_labels(p), vec![&p.duration]))
            .collect();
        histograms(
            &mut encoder,
            "edgebridge_plugin_call_duration_seconds",
            "Duration of plugin calls.",
            &durations,
        )?;
        let breaker: Vec<(Labels, u64)> = plugins
            .iter()
            .map(|p| (plugin_labels(p), p.breaker_open.load(Ordering::Relaxed)))
            .collect();
        let log_dropped: Vec<(Labels, u64)> = plugins
            .iter()
            .map(|p| (plugin_labels(p), p.log_dropped.load(Ordering::Relaxed)))
            .collect();
        family(
            &mut encoder,
            "edgebridge_plugin_log_lines_dropped",
            "Log lines the plugin wrote beyond its policy's log.linesPerSecond, dropped.",
            MetricType::Counter,
            &log_dropped,
        )?;
        family(
            &mut encoder,
            "edgebridge_plugin_breaker_open",
            "1 while the plugin's circuit breaker is open on the route.",
            MetricType::Gauge,
            &breaker,
        )?;
        let each = |f: &dyn Fn(&crate::counters::PluginCounters) -> u64| -> Vec<(Labels, u64)> {
            plugins.iter().map(|p| (plugin_labels(p), f(p))).collect()
        };
        family(
            &mut encoder,
            "edgebridge_plugin_timers",
            "Timers an aggregator has set.",
            MetricType::Gauge,
            &each(&|p| p.timers_set.load(Ordering::Relaxed)),
        )?;
        family(
            &mut encoder,
            "edgebridge_plugin_timers_fired",
            "Timers that fired.",
            MetricType::Counter,
            &each(&|p| p.timers_fired.load(Ordering::Relaxed)),
        )?;
        let lateness: Vec<(Labels, Vec<&Histogram>)> = plugins
            .iter()
            .map(|p| (plugin_labels(p), vec![&p.timer_lateness]))
            .collect();
        histograms(
            &mut encoder,
            "edgebridge_plugin_timer_lateness_seconds",
            "How long after its due time each timer fired.",
            &lateness,
        )?;
        let mut flushes = Vec::new();
        for p in &plugins {
            for (i, reason) in ["stop", "upgrade", "pressure"].iter().enumerate() {
                let mut labels = plugin_labels(p);
                labels.push(("reason", reason.to_string()));
                flushes.push((labels, p.flushes[i].load(Ordering::Relaxed)));
            }
        }
        family(
            &mut encoder,
            "edgebridge_plugin_flushes",
            "Flushes an aggregator was asked for, by reason.",
            MetricType::Counter,
            &flushes,
        )?;
        family(
            &mut encoder,
            "edgebridge_plugin_metric_series_refused",
            "Updates of a plugin's own metrics refused: a new series beyond its policy's metrics.maxSeries.",
            MetricType::Counter,
            &each(&|p| p.own.lock().expect("metrics lock").refused),
        )?;
        own_metrics(&mut encoder, &plugins)?;
        let mut info = encoder.encode_descriptor(
            "edgebridge_plugin",
            "The running version of each plugin.",
            None,
            MetricType::Info,
        )?;
        for l in o.plugins.list() {
            let labels: Labels = vec![
                ("plugin", l.name.clone()),
                ("sha256", l.sha256.clone()),
                ("version", l.version.to_string()),
            ];
            info.encode_info(&labels)?;
        }
        // Process.
        let mut build = encoder.encode_descriptor(
            "edgebridge_build",
            "The edgebridge build.",
            None,
            MetricType::Info,
        )?;
        build.encode_info(&vec![("version", env!("CARGO_PKG_VERSION").to_string())])?;
        family(
            &mut encoder,
            "edgebridge_config_reloads",
            "Configuration reloads: ok (applied, or nothing changed) and failed (refused; nothing changed).",
            MetricType::Counter,
            &[
                (
                    vec![("result", "ok".to_string())],
                    o.stats.reloads_ok.load(Ordering::Relaxed),
                ),
                (
                    vec![("result", "failed".to_string())],
                    o.stats.reloads_failed.load(Ordering::Relaxed),
                ),
            ],
        )?;
        family(
            &mut encoder,
            "edgebridge_log_lines_dropped",
            "Log lines dropped instead of blocking: queue_full (standard error not read fast enough) and write_error (a full disk, a reader gone).",
            MetricType::Counter,
            &[
                (
                    vec![("reason", "queue_full".to_string())],
                    crate::logging::dropped_full(),
                ),
                (
                    vec![("reason", "write_error".to_string())],
                    crate::logging::dropped_write_errors(),
                ),
            ],
        )?;
        family(
            &mut encoder,
            "edgebridge_embedded_log_skips",
            "Times a subscriber of an embedded broker (embedded://) was further behind than the broker's in-memory log (embeddedLogSize) and skipped to the oldest message kept; what it skipped is lost to it.",
            MetricType::Counter,
            &[(Vec::new(), crate::embedded::log_skips())],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Direction;
    use crate::counters::{RouteCounters, Stats};
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    #[test]
    fn routes_sessions_and_the_process_are_exposed_with_their_labels() {
        let stats = Arc::new(Stats::default());
        for id in ["c-r-0", "c-r-1"] {
            let c = Arc::new(RouteCounters::new(
                "r",
                Direction::LocalToRemote,
                id,
                "local",
                "remote",
            ));
            c.received.fetch_add(2, Ordering::Relaxed);
            c.count_drop(DropReason::Loop);
            c.latency.observe(Duration::from_micros(300));
            stats.register(c);
        }
        stats.reloads_failed.fetch_add(1, Ordering::Relaxed);
        let o = Arc::new(Observed {
            stats,
            plugins: Arc::new(crate::plugin::Registry::default()),
            stall_timeout: Duration::from_secs(60),
            started: SystemTime::now(),
        });
        let text = render(o).unwrap();
        for line in [
            "edgebridge_messages_received_total{route=\"r\",direction=\"local-to-remote\"} 4",
            "edgebridge_messages_dropped_total{route=\"r\",direction=\"local-to-remote\",reason=\"loop\"} 2",
            "edgebridge_forward_latency_seconds_count{route=\"r\",direction=\"local-to-remote\"} 2",
            "edgebridge_forward_latency_seconds_bucket{le=\"0.0005\",route=\"r\",direction=\"local-to-remote\"} 2",
            "edgebridge_session_connected{route=\"r\",side=\"remote\",client_id=\"c-r-1\"} 0",
            "edgebridge_config_reloads_total{result=\"failed\"} 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(text.contains("edgebridge_build_info{version=\""), "{text}");
    }
}
