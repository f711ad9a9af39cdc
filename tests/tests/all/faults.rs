//! The fault suite: real Mosquitto brokers, one fault injected per test (a half-open
//! connection, broker restarts with and without their sessions, a slow remote, hostile peers,
//! poison messages), QoS 1 traffic counted against what the source broker acknowledged.
//! Every test is bounded in messages and time; each prints its figures.

use std::time::{Duration, Instant};

use edgebridge::bridge::{self, RunOptions, RunningBridge};
use edgebridge::config::{self, Config, LoadOptions};
use edgebridge::counters::DropReason;
use edgebridge_tests::faults::{AckedPublisher, HostileBroker, Hostility, Mode, Proxy};
use edgebridge_tests::{
    Collector, Mosquitto, MosquittoOptions, bridge_yaml, eventually, init_tracing, write_file,
};

const SECOND: Duration = Duration::from_secs(1);

fn opts() -> RunOptions {
    RunOptions {
        backoff: (Duration::from_millis(50), Duration::from_millis(500)),
        drain_timeout: Duration::from_secs(3),
        keep_alive: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(2),
        ..RunOptions::default()
    }
}

fn load(dir: &std::path::Path, yaml: &str) -> Config {
    let path = write_file(dir, "bridge.yaml", yaml);
    config::load(&[path], &LoadOptions::default())
        .unwrap_or_else(|r| panic!("invalid test configuration:\n{r}\n{yaml}"))
}

async fn start(cfg: &Config, opts: &RunOptions) -> RunningBridge {
    let b = bridge::start(cfg, opts).await.expect("bridge starts");
    assert!(
        b.wait_ready(10 * SECOND).await,
        "bridge not ready: {:?}",
        b.stats.all()
    );
    b
}

/// Sequence numbers the collector received (payloads are `<seq>` or `<seq>:<padding>`).
fn received(c: &Collector) -> (std::collections::BTreeSet<u64>, usize) {
    let (seen, dups) = c.distinct_and_duplicates();
    let seqs = seen
        .keys()
        .filter_map(|p| p.split(':').next().and_then(|n| n.parse().ok()))
        .collect();
    (seqs, dups)
}

/// Waits until every acknowledged sequence number arrived; returns (acked, received, dups, lost).
async fn settle(
    p: &AckedPublisher,
    c: &Collector,
    timeout: Duration,
) -> (usize, usize, usize, usize) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let acked = p.acked();
        let (got, dups) = received(c);
        let lost = acked.difference(&got).count();
        if lost == 0 || tokio::time::Instant::now() >= deadline {
            return (acked.len(), got.len(), dups, lost);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A proxy between the bridge and the remote broker stops moving bytes (both ways, sockets
/// open) while 256 KiB messages are in flight: the bridge notices within 1.5x its keep-alive,
/// reconnects, resends, and nothing is lost; a stop while the connection is frozen ends
/// within its bounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_connection_is_detected_within_one_and_a_half_keep_alives() {
    init_tracing();
    let local = Mosquitto::start(MosquittoOptions::default());
    let remote = Mosquitto::start(MosquittoOptions::default());
    let proxy = Proxy::start(remote.port).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = load(
        dir.path(),
        &bridge_yaml(
            "v5",
            &local.endpoint(),
            &format!("127.0.0.1:{}", proxy.port),
            1,
            "    - {direction: local-to-remote, name: big, source: \"big/#\"}\n",
        ),
    );
    let keep_alive = 2 * SECOND;
    let o = RunOptions {
        keep_alive,
        ..opts()
    };
    let b = start(&cfg, &o).await;
    let at_remote = Collector::start(remote.port, "ho-sub", "big/#", false).await;
    let publisher = AckedPublisher::start(local.port, "ho-pub");
    let padding = "x".repeat(256 * 1024);
    let total = 60u64;
    for seq in 0..20 {
        publisher.publish("big/a", seq, Some(format!("{seq}:{padding}").into()));
    }
    assert!(eventually(20 * SECOND, || at_remote.count() >= 5).await);
    let connections = proxy.accepted();
    proxy.set(Mode::Freeze);
    let frozen = Instant::now();
    for seq in 20..total {
        publisher.publish("big/a", seq, Some(format!("{seq}:{padding}").into()));
    }
    assert!(
        eventually(20 * SECOND, || proxy.accepted() > connections).await,
        "the bridge reconnected"
    );
    let detected = frozen.elapsed();
    assert!(
        detected <= keep_alive * 3 / 2 + SECOND,
        "a half-open connection is noticed within 1.5x the keep-alive (plus the first backoff): {detected:?}"
    );
    assert_eq!(
        publisher.wait_acked(total as usize, 30 * SECOND).await,
        total as usize
    );
    let (acked, got, dups, lost) = settle(&publisher, &at_remote, 60 * SECOND).await;
    println!(
        "half-open: detected after {detected:?} (keep-alive {keep_alive:?}); sent {acked}, received {got}, duplicates {dups}, lost {lost}; last error: {:?}",
        b.stats.clients()[0].target.last_error().map(|e| e.0)
    );
    assert_eq!(lost, 0);
    let error = b.stats.clients()[0].target.last_error().unwrap().0;
    assert!(
        error.contains("the peer stopped reading") || error.contains("no answer to PINGREQ"),
        "{error}"
    );
    // Freeze again and stop: bounded by the drain timeout and the close timeout, not hung.
    publisher.publish("big/a", total, Some(format!("{total}:{padding}").into()));
    proxy.set(Mode::Freeze);
    publisher.publish(
        "big/a",
        total + 1,
        Some(format!("{}:{padding}", total + 1).into()),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = Instant::now();
    tokio::time::timeout(10 * SECOND, b.shutdown())
        .await
        .expect("shutdown is bounded even with a frozen connection");
    println!(
        "half-open: shutdown with a frozen connection took {:?}",
        stopping.elapsed()
    );
}

/// A single-connection configuration whose remote is `remote` (host:port).
fn hostile_config(
    dir: &std::path::Path,
    local: &Mosquitto,
    remote: &str,
    healthy: &Mosquitto,
) -> Config {
    let yaml = format!(
        "{}---\n{}",
        bridge_yaml(
            "v5",
            &local.endpoint(),
            remote,
            1,
            "    - {direction: remote-to-local, name: hostile, source: \"x/#\", qos: 1}\n",
        ),
        bridge_yaml(
            "v5",
            &local.endpoint(),
            &healthy.endpoint(),
            1,
            "    - {direction: local-to-remote, name: healthy, source: \"ok/#\"}\n",
        )
        .replace("test-bridge", "healthy-bridge")
        .replace("test-map", "healthy-map")
        .replace("clientIdPrefix: edge-", "clientIdPrefix: good-")
    );
    load(dir, &yaml)
}

/// Peers that answer CONNECT with an HTTP page, with garbage, or not at all: each is a clear
/// error naming the route and side, retried with backoff (not in a tight loop), and another
/// route keeps forwarding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_that_do_not_speak_mqtt_are_named_and_retried_with_backoff() {
    init_tracing();
    let local = Mosquitto::start(MosquittoOptions::default());
    let healthy = Mosquitto::start(MosquittoOptions::default());
    for (how, expect) in [
        (
            Hostility::Http,
            "the peer does not speak MQTT; it answered \"HTTP/1.1 400 Bad Request\"",
        ),
        (Hostility::Garbage, "the peer does not speak MQTT"),
        (Hostility::Silent, "no CONNACK within 2s"),
        (
            Hostility::ConnackThenClose,
            "the broker closed the connection",
        ),
    ] {
        let peer = HostileBroker::start(how.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = hostile_config(
            dir.path(),
            &local,
            &format!("127.0.0.1:{}", peer.port),
            &healthy,
        );
        let b = bridge::start(&cfg, &opts()).await.unwrap();
        let at_healthy = Collector::start(healthy.port, "h-sub", "ok/#", false).await;
        let lp = edgebridge_tests::Publisher::connect(local.port, "h-pub").await;
        let window = 4 * SECOND;
        let started = Instant::now();
        let mut sent = 0;
        while started.elapsed() < window {
            lp.publish("ok/x", 1, false, &sent.to_string()).await;
            sent += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let hostile = b
            .stats
            .clients()
            .into_iter()
            .find(|c| c.route == "hostile")
            .unwrap();
        let error = hostile.source.last_error().map(|e| e.0).unwrap_or_default();
        assert!(error.contains(expect), "{how:?}: {error}");
        // 50 ms doubling to 500 ms (with the connect timeout for the silent one): a handful of
        // attempts in 4 s, never a tight loop. A CONNACK followed at once by a close does not
        // reset the backoff.
        let attempts = peer.connections();
        assert!(
            (1..=14).contains(&attempts),
            "{how:?}: {attempts} attempts in {window:?}"
        );
        assert!(
            eventually(10 * SECOND, || at_healthy.count() == sent).await,
            "{how:?}: the other route goes on ({} of {sent})",
            at_healthy.count()
        );
        println!("hostile {how:?}: {attempts} connection attempts in {window:?}; error: {error}");
        b.shutdown().await;
    }
}

/// A peer that sends a PUBLISH to a wildcard topic: acknowledged, dropped and counted as
/// `invalid_topic`, never forwarded (the local broker would disconnect the bridge), and the
/// valid message after it is forwarded on the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_to_a_wildcard_topic_is_dropped_and_the_connection_kept() {
    init_tracing();
    let local = Mosquitto::start(MosquittoOptions::default());
    let healthy = Mosquitto::start(MosquittoOptions::default());
    let peer = HostileBroker::start(Hostility::WildcardTopic).await;
    let dir = tempfile::tempdir().unwrap();
    let at_local = Collector::start(local.port, "w-sub", "x/#", false).await;
    let cfg = hostile_config(
        dir.path(),
        &local,
        &format!("127.0.0.1:{}", peer.port),
        &healthy,
    );
    let b = bridge::start(&cfg, &opts()).await.unwrap();
    assert!(eventually(10 * SECOND, || at_local.count() == 1).await);
    assert_eq!(at_local.messages()[0].payload, "after");
    assert!(
        eventually(5 * SECOND, || b
            .stats
            .route("hostile")
            .dropped(DropReason::InvalidTopic)
            == 1)
        .await
    );
    assert!(
        eventually(5 * SECOND, || peer.pubacks() == [7, 8]).await,
        "{:?}",
        peer.pubacks()
    );
    tokio::time::sleep(SECOND).await;
    assert_eq!(peer.connections(), 1, "the connection was kept");
    b.shutdown().await;
}

/// A PUBLISH announcing 256 MB is refused when its header arrives (the limit is the maximum
/// incoming packet size, 16 MiB), before the bytes are buffered; a peer answering an unused
/// packet id is ignored; and bytes that came in the same read as the CONNACK are handled at
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_announcements_stray_acks_and_coalesced_connacks() {
    init_tracing();
    let local = Mosquitto::start(MosquittoOptions::default());
    let healthy = Mosquitto::start(MosquittoOptions::default());

    let huge = HostileBroker::start(Hostility::HugeLength).await;
    let dir = tempfile::tempdir().unwrap();
    let rss_before = edgebridge_tests::faults::rss_kib();
    let cfg = hostile_config(
        dir.path(),
        &local,
        &format!("127.0.0.1:{}", huge.port),
        &healthy,
    );
    let b = bridge::start(&cfg, &opts()).await.unwrap();
    let hostile = || {
        b.stats
            .clients()
            .into_iter()
            .find(|c| c.route == "hostile")
            .unwrap()
    };
    assert!(eventually(5 * SECOND, || hostile().source.last_error().is_some()).await);
    let error = hostile().source.last_error().unwrap().0;
    assert!(
        error.contains("malformed packet") && error.contains("268435455"),
        "{error}"
    );
    let grew = edgebridge_tests::faults::rss_kib().saturating_sub(rss_before);
    println!("hostile 256 MB announcement: {error}; RSS grew {grew} KiB");
    assert!(
        grew < 64 * 1024,
        "nothing near 256 MB was allocated: {grew} KiB"
    );
    b.shutdown().await;

    let stray = HostileBroker::start(Hostility::UnknownPuback).await;
    let cfg = hostile_config(
        dir.path(),
        &local,
        &format!("127.0.0.1:{}", stray.port),
        &healthy,
    );
    let b = bridge::start(&cfg, &opts()).await.unwrap();
    tokio::time::sleep(2 * SECOND).await;
    assert_eq!(
        stray.connections(),
        1,
        "a PUBACK for an unused packet id is ignored"
    );
    b.shutdown().await;

    let at_local = Collector::start(local.port, "c-sub", "x/#", false).await;
    let early = HostileBroker::start(Hostility::CoalescedConnack).await;
    let cfg = hostile_config(
        dir.path(),
        &local,
        &format!("127.0.0.1:{}", early.port),
        &healthy,
    );
    let started = Instant::now();
    let b = bridge::start(&cfg, &opts()).await.unwrap();
    assert!(eventually(10 * SECOND, || at_local.count() == 1).await);
    assert_eq!(at_local.messages()[0].payload, "coalesced");
    println!(
        "coalesced CONNACK + PUBLISH forwarded after {:?}",
        started.elapsed()
    );
    assert!(started.elapsed() < 3 * SECOND);
    b.shutdown().await;
}

/// MQTT 3.1.1 cannot refuse one message: a broker whose maximum packet size a message exceeds
/// closes the connection. The bridge gives that message up after three such closes (counted
/// `undeliverable`, logged with its topic), the messages after it cross, and a later message
/// as large is refused at once without another reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_on_mqtt_3_1_1_is_given_up_not_retried_forever() {
    init_tracing();
    let local = Mosquitto::start(MosquittoOptions::default());
    let remote = Mosquitto::start(MosquittoOptions {
        extra: "max_packet_size 2000\n".into(),
        ..MosquittoOptions::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = load(
        dir.path(),
        &bridge_yaml(
            "v3",
            &local.endpoint(),
            &remote.endpoint(),
            1,
            "    - {direction: local-to-remote, name: big, source: \"big/#\"}\n",
        ),
    );
    let b = start(&cfg, &opts()).await;
    let at_remote = Collector::start(remote.port, "p-sub", "big/#", false).await;
    let lp = edgebridge_tests::Publisher::connect(local.port, "p-pub").await;
    lp.publish("big/a", 1, false, "before").await;
    lp.publish("big/a", 1, false, &"x".repeat(5000)).await;
    lp.publish("big/a", 1, false, "after").await;
    assert!(
        eventually(20 * SECOND, || at_remote.count() >= 2).await,
        "{:?}",
        b.stats.all()
    );
    assert!(
        eventually(5 * SECOND, || b
            .stats
            .route("big")
            .dropped(DropReason::Undeliverable)
            == 1)
        .await
    );
    let connects = |log: String| {
        log.lines()
            .filter(|l| l.contains("New client connected") && l.contains("as edge-big"))
            .count()
    };
    let after_poison = connects(remote.log());
    lp.publish("big/a", 1, false, &"y".repeat(5000)).await;
    lp.publish("big/a", 1, false, "last").await;
    assert!(eventually(10 * SECOND, || at_remote.count() >= 3).await);
    assert!(
        eventually(5 * SECOND, || b
            .stats
            .route("big")
            .dropped(DropReason::Oversize)
            == 1)
        .await
    );
    let got: Vec<String> = at_remote
        .messages()
        .into_iter()
        .map(|m| m.payload)
        .collect();
    assert_eq!(got, ["before", "after", "last"]);
    assert_eq!(
        connects(remote.log()),
        after_poison,
        "the second large message cost no reconnect"
    );
    println!(
        "poison on 3.1.1: {} connections to the remote in all (1 + 3 strikes), counts {:?}",
        connects(remote.log()),
        b.stats.route("big")
    );
    assert!(after_poison <= 4, "{}", remote.log());
    b.shutdown().await;
}
