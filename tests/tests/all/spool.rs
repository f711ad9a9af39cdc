//! Store and forward against real Mosquitto brokers: a local broker configured as Debian
//! installs it (`max_queued_messages 1000`, `max_inflight_messages 20`), the remote stopped
//! for an outage while publishers keep sending, and every message the local broker
//! acknowledged counted at the remote. Bounded in messages and time; each test prints its
//! figures.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgebridge::bridge::{self, RunOptions};
use edgebridge::config::{self, LoadOptions};
use edgebridge::model::QoS;
use edgebridge_tests::faults::AckedPublisher;
use edgebridge_tests::{
    Collector, Mosquitto, MosquittoOptions, bridge_yaml, init_tracing, write_file,
};

const SECOND: Duration = Duration::from_secs(1);
/// Mosquitto 2.0's defaults, which the test harness otherwise lifts.
const DEBIAN_DEFAULTS: &str = "max_queued_messages 1000\nmax_inflight_messages 20\n";

/// Publishes `n` messages on `topic` at `rate` per second (in steps of 10 ms).
async fn publish_at(
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
        let due = started + Duration::from_micros((seq - first + 1) * 1_000_000 / rate);
        if (seq - first) % 20 == 19 {
            tokio::time::sleep_until(due).await;
        }
    }
}

/// Sequence numbers received (payloads are the numbers), and duplicates.
fn received(c: &Collector) -> (std::collections::BTreeSet<u64>, usize) {
    let (seen, dups) = c.distinct_and_duplicates();
    (seen.keys().filter_map(|p| p.parse().ok()).collect(), dups)
}

/// The outage of the spool issue: 20,000 messages at 2,000 msg/s while the remote is down
/// for 16 s, through a local broker with Mosquitto's default queue limit.
async fn outage(qos: QoS, spooled: bool) -> (usize, usize) {
    init_tracing();
    let local = Mosquitto::start(MosquittoOptions {
        extra: DEBIAN_DEFAULTS.into(),
        ..Default::default()
    });
    let mut remote = Mosquitto::start(MosquittoOptions {
        persistence: true,
        ..Default::default()
    });
    let spool_dir = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(
        dir.path(),
        "bridge.yaml",
        &bridge_yaml(
            "v5",
            &local.endpoint(),
            &remote.endpoint(),
            1,
            "    - {direction: local-to-remote, name: up, source: \"up/#\", qos: 1}\n",
        ),
    );
    let cfg = config::load(&[path], &LoadOptions::default()).unwrap();
    let opts = RunOptions {
        backoff: (Duration::from_millis(50), Duration::from_millis(500)),
        connect_timeout: 2 * SECOND,
        spool_dir: spooled.then(|| spool_dir.path().to_path_buf()),
        ..RunOptions::default()
    };
    let b = bridge::start(&cfg, &opts).await.expect("bridge starts");
    assert!(b.wait_ready(10 * SECOND).await);
    let at_remote = Collector::start(remote.port, "outage-sub", "up/#", true).await;
    let publisher = AckedPublisher::start(local.port, "outage-pub");
    let (n, rate) = (20_000u64, 2_000);
    remote.stop();
    let down = Instant::now();
    publish_at(&publisher, "up/x", 0..n, rate, qos).await;
    let acked = publisher.wait_acked(n as usize, 10 * SECOND).await;
    let backlog = b.stats.clients()[0]
        .spool
        .as_ref()
        .map(|s| s.messages.load(std::sync::atomic::Ordering::Relaxed))
        .unwrap_or(0);
    tokio::time::sleep((16 * SECOND).saturating_sub(down.elapsed())).await;
    let outage = down.elapsed();
    remote.restart();
    let back = Instant::now();
    let deadline = back + if spooled { 60 * SECOND } else { 3 * SECOND };
    let acked_set = publisher.acked();
    let (mut got, mut dups) = received(&at_remote);
    while acked_set.difference(&got).next().is_some() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        (got, dups) = received(&at_remote);
    }
    let drained = back.elapsed();
    let lost = acked_set.difference(&got).count();
    println!(
        "outage at QoS {}{}: {} s down, {acked}/{n} acknowledged at the edge, {backlog} spooled at the end of the burst, {} arrived, {dups} duplicates, {lost} lost; drained in {:.1} s ({:.0} msg/s)",
        qos.as_u8(),
        if spooled { "" } else { " without a spool" },
        outage.as_secs(),
        got.len(),
        drained.as_secs_f64(),
        got.len() as f64 / drained.as_secs_f64()
    );
    assert_eq!(
        acked, n as usize,
        "the local broker acknowledged every publish"
    );
    b.shutdown().await;
    if !spooled {
        return (lost, dups);
    }
    assert_eq!(lost, 0, "every acknowledged message arrived");
    assert!(
        dups <= 256,
        "duplicates are bounded by the in-flight window: {dups}"
    );
    assert!(
        local
            .log()
            .lines()
            .all(|l| !l.contains("Outgoing messages are being dropped")),
        "the local broker dropped nothing:\n{}",
        local.log()
    );
    (lost, dups)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sixteen_second_outage_at_2000_messages_a_second_loses_nothing_at_qos_1() {
    outage(QoS::AtLeastOnce, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sixteen_second_outage_at_2000_messages_a_second_loses_nothing_at_qos_0() {
    outage(QoS::AtMostOnce, true).await;
}

/// The same outage without a spool: the local broker keeps 1,000 messages for the bridge's
/// session and drops the rest (what the README's delivery section says of brokers' limits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_spool_the_same_outage_loses_what_the_local_broker_drops() {
    let (lost, _) = outage(QoS::AtLeastOnce, false).await;
    assert!(
        lost >= 15_000,
        "the local broker's queue limit applies without a spool: {lost} lost"
    );
}

/// The bridge binary, built if it is not there (the workspace's tests build it).
fn binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap().to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let ok = Command::new(cargo)
        .args(["build", "-q", "-p", "edgebridge", "--bin", "edgebridge"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "cargo build -p edgebridge failed");
    dir.join("edgebridge")
}

fn run_bridge(bin: &std::path::Path, config: &std::path::Path, spool: &std::path::Path) -> Child {
    Command::new(bin)
        .arg("run")
        .arg("-f")
        .arg(config)
        .arg("--spool-dir")
        .arg(spool)
        .arg("--max-backoff")
        .arg("1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the bridge starts")
}

/// `kill -9` of the bridge every 1.5 s, five times while the remote is down and five times
/// while the backlog drains: no message the local broker acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_an_outage_and_during_the_drain_loses_no_acknowledged_message() {
    init_tracing();
    let bin = binary();
    let local = Mosquitto::start(MosquittoOptions {
        extra: DEBIAN_DEFAULTS.into(),
        ..Default::default()
    });
    let mut remote = Mosquitto::start(MosquittoOptions {
        persistence: true,
        ..Default::default()
    });
    let spool = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_file(
        dir.path(),
        "bridge.yaml",
        &bridge_yaml(
            "v5",
            &local.endpoint(),
            &remote.endpoint(),
            1,
            "    - {direction: local-to-remote, name: up, source: \"up/#\", qos: 1}\n",
        ),
    );
    let at_remote = Collector::start(remote.port, "kill-sub", "up/#", true).await;
    let publisher = AckedPublisher::start(local.port, "kill-pub");
    let mut bridge = run_bridge(&bin, &config, spool.path());
    tokio::time::sleep(SECOND).await;
    remote.stop();
    let n = 12_000u64;
    let sender = {
        let p = std::sync::Arc::new(publisher);
        let q = p.clone();
        (
            tokio::spawn(
                async move { publish_at(&q, "up/k", 0..n, 1_000, QoS::AtLeastOnce).await },
            ),
            p,
        )
    };
    let mut kills = 0;
    for round in 0..10 {
        if round == 5 {
            remote.restart();
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let _ = bridge.kill(); // SIGKILL
        let _ = bridge.wait();
        kills += 1;
        bridge = run_bridge(&bin, &config, spool.path());
    }
    sender.0.await.unwrap();
    let publisher = sender.1;
    publisher.wait_acked(n as usize, 10 * SECOND).await;
    let acked = publisher.acked();
    let deadline = Instant::now() + 60 * SECOND;
    let (mut got, mut dups) = received(&at_remote);
    while acked.difference(&got).next().is_some() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        (got, dups) = received(&at_remote);
    }
    let _ = bridge.kill();
    let _ = bridge.wait();
    let lost = acked.difference(&got).count();
    println!(
        "kill -9 x{kills}: {}/{n} acknowledged at the edge, {} arrived, {dups} duplicates, {lost} lost",
        acked.len(),
        got.len()
    );
    assert_eq!(kills, 10);
    assert_eq!(lost, 0, "no acknowledged message is lost");
}
