//! The outage of the store-and-forward issue, as the tests and the benchmark run it: a local
//! Mosquitto configured as Debian installs it, the remote stopped while a publisher keeps
//! sending at a fixed rate, every message the local broker acknowledged looked for at the
//! remote once it is back.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use edgebridge::bridge::{self, RunOptions};
use edgebridge::config::{self, LoadOptions};
use edgebridge::model::QoS;

use crate::faults::AckedPublisher;
use crate::{Collector, Mosquitto, MosquittoOptions, bridge_yaml, init_tracing, write_file};

/// Mosquitto 2.0's defaults, which the test harness otherwise lifts.
pub const DEBIAN_DEFAULTS: &str = "max_queued_messages 1000\nmax_inflight_messages 20\n";

/// Publishes `range` on `topic` at `rate` per second (paced every 20 messages).
pub async fn publish_at(
    p: &AckedPublisher,
    topic: &str,
    range: std::ops::Range<u64>,
    rate: u64,
    qos: QoS,
) {
    let started = tokio::time::Instant::now();
    let first = range.start;
    for seq in range {
        p.publish_qos(topic, seq, None, qos);
        if (seq - first) % 20 == 19 {
            let due = started + Duration::from_micros((seq - first + 1) * 1_000_000 / rate);
            tokio::time::sleep_until(due).await;
        }
    }
}

/// Sequence numbers received (payloads are the numbers), and duplicates.
pub fn received(c: &Collector) -> (BTreeSet<u64>, usize) {
    let (seen, dups) = c.distinct_and_duplicates();
    (seen.keys().filter_map(|p| p.parse().ok()).collect(), dups)
}

/// The brokers of an outage: the local one configured as Debian installs Mosquitto, the
/// remote one persistent (its subscribers' sessions survive its restart) and queueing QoS 0
/// for them: after the restart the bridge may drain its whole backlog before the test's
/// subscriber is back, and the remote must keep what it cannot deliver yet.
pub fn brokers() -> (Mosquitto, Mosquitto) {
    init_tracing();
    let local = Mosquitto::start(MosquittoOptions {
        extra: DEBIAN_DEFAULTS.into(),
        ..Default::default()
    });
    let remote = Mosquitto::start(MosquittoOptions {
        persistence: true,
        extra: "queue_qos0_messages true\n".into(),
        ..Default::default()
    });
    (local, remote)
}

/// The configuration file of the outage's route `up` (QoS 1, `up/#`, from the local broker to
/// the remote one), with `extra` added to the route's YAML flow mapping (e.g.
/// `spool: {maxBytes: 64Mi}`), written into `dir`.
pub fn route_file(
    dir: &std::path::Path,
    local: &Mosquitto,
    remote: &Mosquitto,
    extra: &str,
) -> std::path::PathBuf {
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(", {extra}")
    };
    write_file(
        dir,
        "bridge.yaml",
        &bridge_yaml(
            "v5",
            &local.endpoint(),
            &remote.endpoint(),
            1,
            &format!(
                "    - {{direction: local-to-remote, name: up, source: \"up/#\", qos: 1{extra}}}\n"
            ),
        ),
    )
}

/// One outage.
#[derive(Debug, Clone)]
pub struct Outage {
    /// The publisher's QoS.
    pub qos: QoS,
    /// Messages published while the remote is down.
    pub n: u64,
    /// Their rate, per second.
    pub rate: u64,
    /// How long the remote is down (at least the publishing time).
    pub down: Duration,
    /// Spool every route client under a temporary folder (`--spool-dir`).
    pub spooled: bool,
    /// More of the route's YAML flow mapping, e.g. `spool: {maxBytes: 64Mi}`.
    pub route_extra: String,
    /// How long to wait for the backlog after the remote is back.
    pub drain_timeout: Duration,
}

/// What an [`Outage`] did.
#[derive(Debug, Clone, Default)]
pub struct OutageReport {
    /// Messages the local broker acknowledged (QoS 0: written to it).
    pub acked: usize,
    /// Distinct messages that arrived at the remote.
    pub arrived: usize,
    /// Copies that arrived more than once.
    pub duplicates: usize,
    /// Acknowledged and never arrived.
    pub lost: usize,
    /// Records in the spool when publishing ended.
    pub backlog: u64,
    /// Bytes of the spool when publishing ended.
    pub backlog_bytes: u64,
    /// Arrival rate of the drain between 10 % and 90 % of the backlog, per second.
    pub drain_rate: f64,
    /// Lines of the local broker's log saying it dropped messages.
    pub broker_drops: usize,
    /// Records the spool dropped as `full`.
    pub spool_dropped_full: u64,
}

impl Outage {
    /// Runs it (two brokers and an in-process bridge).
    pub async fn run(&self) -> OutageReport {
        let (local, mut remote) = brokers();
        let spool_dir = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = route_file(dir.path(), &local, &remote, &self.route_extra);
        let cfg = config::load(&[path], &LoadOptions::default()).unwrap();
        let opts = RunOptions {
            backoff: (Duration::from_millis(50), Duration::from_millis(500)),
            connect_timeout: Duration::from_secs(2),
            spool_dir: self.spooled.then(|| spool_dir.path().to_path_buf()),
            ..RunOptions::default()
        };
        let b = bridge::start(&cfg, &opts).await.expect("bridge starts");
        assert!(b.wait_ready(Duration::from_secs(10)).await);
        let at_remote = Collector::start(remote.port, "outage-sub", "up/#", true).await;
        let publisher = AckedPublisher::start(local.port, "outage-pub");
        remote.stop();
        let down = Instant::now();
        publish_at(&publisher, "up/x", 0..self.n, self.rate, self.qos).await;
        publisher
            .wait_acked(self.n as usize, Duration::from_secs(10))
            .await;
        let spool = b.stats.clients()[0].spool.clone();
        let gauge = |f: fn(&edgebridge::spool::SpoolCounters) -> u64| spool.as_deref().map_or(0, f);
        let backlog = gauge(|s| s.messages.load(std::sync::atomic::Ordering::Relaxed));
        let backlog_bytes = gauge(|s| s.bytes.load(std::sync::atomic::Ordering::Relaxed));
        tokio::time::sleep(self.down.saturating_sub(down.elapsed())).await;
        // Arrivals are sampled every 5 ms from before the restart, by a task of their own.
        let at_remote = std::sync::Arc::new(at_remote);
        let samples = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(f64, usize)>::new()));
        let back = Instant::now();
        let sampler = {
            let (c, samples) = (at_remote.clone(), samples.clone());
            tokio::spawn(async move {
                loop {
                    let n = c.count();
                    samples
                        .lock()
                        .unwrap()
                        .push((back.elapsed().as_secs_f64(), n));
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        let mut remote = tokio::task::spawn_blocking(move || {
            remote.restart();
            remote
        })
        .await
        .unwrap();
        let acked = publisher.acked();
        let deadline = back + self.drain_timeout;
        let (mut got, mut dups) = received(&at_remote);
        while acked.difference(&got).next().is_some() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            (got, dups) = received(&at_remote);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        sampler.abort();
        let lost = acked.difference(&got).count();
        let samples = samples.lock().unwrap().clone();
        let total = samples.last().map_or(0, |s| s.1).max(1);
        let at = |frac: f64| {
            samples
                .iter()
                .find(|(_, n)| *n as f64 >= frac * total as f64)
                .copied()
        };
        let drain_rate = match (at(0.1), at(0.9)) {
            (Some((t1, n1)), Some((t2, n2))) => (n2 - n1) as f64 / (t2 - t1).max(0.005),
            _ => 0.0,
        };
        remote.stop();
        let broker_drops = local
            .log()
            .lines()
            .filter(|l| l.contains("Outgoing messages are being dropped"))
            .count();
        let spool_dropped_full = gauge(|s| s.dropped(edgebridge::spool::SpoolDrop::Full));
        b.shutdown().await;
        OutageReport {
            acked: acked.len(),
            arrived: got.len(),
            duplicates: dups,
            lost,
            backlog,
            backlog_bytes,
            drain_rate,
            broker_drops,
            spool_dropped_full,
        }
    }
}
