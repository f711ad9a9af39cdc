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

/// The configuration of one route (`route`, the YAML flow mapping of a `routes` item) between
/// the broker at `local` and the one at `remote`, on `protocol`, written into `dir`.
fn one_route(
    dir: &std::path::Path,
    protocol: &str,
    local: &str,
    remote: &str,
    route: &str,
) -> Config {
    load(
        dir,
        &bridge_yaml(protocol, local, remote, 1, &format!("    - {route}\n")),
    )
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

/// Two Mosquitto brokers, the remote one behind a fault proxy, and a bridge (started with
/// `opts`, ready) with one MQTT 5 local-to-remote route `name` from `source`.
struct ProxiedRemote {
    local: Mosquitto,
    remote: Mosquitto,
    proxy: Proxy,
    bridge: RunningBridge,
    _dir: tempfile::TempDir,
}

async fn proxied_remote(name: &str, source: &str, opts: &RunOptions) -> ProxiedRemote {
    init_tracing();
    edgebridge_tests::faults::reset_peak_rss();
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
            &format!("    - {{direction: local-to-remote, name: {name}, source: \"{source}\"}}\n"),
        ),
    );
    let bridge = start(&cfg, opts).await;
    ProxiedRemote {
        local,
        remote,
        proxy,
        bridge,
        _dir: dir,
    }
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
    let keep_alive = 2 * SECOND;
    let o = RunOptions {
        keep_alive,
        ..opts()
    };
    let ProxiedRemote {
        local,
        remote,
        proxy,
        bridge: b,
        _dir,
    } = proxied_remote("big", "big/#", &o).await;
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
    edgebridge_tests::faults::print_peak("half-open");
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

/// Starts a bridge with two connectors: route `hostile` from the hostile `peer` (as its remote)
/// to `local`, and route `healthy` from `local` to `healthy`, which must keep forwarding.
async fn bridge_to_hostile(
    dir: &std::path::Path,
    local: &Mosquitto,
    peer: &HostileBroker,
    healthy: &Mosquitto,
) -> RunningBridge {
    let remote = format!("127.0.0.1:{}", peer.port);
    let yaml = format!(
        "{}---\n{}",
        bridge_yaml(
            "v5",
            &local.endpoint(),
            &remote,
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
    bridge::start(&load(dir, &yaml), &opts())
        .await
        .expect("bridge starts")
}

/// Peers that answer CONNECT with an HTTP page, with garbage, or not at all: each is a clear
/// error naming the route and side, retried with backoff (not in a tight loop), and another
/// route keeps forwarding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_that_do_not_speak_mqtt_are_named_and_retried_with_backoff() {
    init_tracing();
    edgebridge_tests::faults::reset_peak_rss();
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
        let b = bridge_to_hostile(dir.path(), &local, &peer, &healthy).await;
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
        // 50 ms doubling to 500 ms, each delay between half and all of its step (with the
        // connect timeout for the silent one): at most 20 attempts in 4 s, never a tight loop
        // (a reset to 50 ms after every CONNACK would make that about 80).
        let attempts = peer.connections();
        assert!(
            (1..=20).contains(&attempts),
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

/// A burst of QoS 1 messages in one write and then silence: every message arrives once and
/// every one is acknowledged to the source, with nothing after the burst to wake the bridge
/// (an acknowledgement left in a buffer would be redelivered by the broker on the next
/// connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_of_a_burst_is_acknowledged_to_the_source_when_it_ends() {
    init_tracing();
    let local = Mosquitto::start(MosquittoOptions::default());
    let healthy = Mosquitto::start(MosquittoOptions::default());
    const N: u16 = 500;
    let peer = HostileBroker::start(Hostility::Burst(N)).await;
    let dir = tempfile::tempdir().unwrap();
    let at_local = Collector::start(local.port, "burst-sub", "x/#", false).await;
    let b = bridge_to_hostile(dir.path(), &local, &peer, &healthy).await;
    assert!(
        eventually(10 * SECOND, || at_local.count() == N as usize).await,
        "{} of {N} forwarded",
        at_local.count()
    );
    let all: Vec<u16> = (1..=N).collect();
    assert!(
        eventually(2 * SECOND, || {
            let mut got = peer.pubacks();
            got.sort_unstable();
            got == all
        })
        .await,
        "acknowledged to the source: {} of {N}",
        peer.pubacks().len()
    );
    let (distinct, duplicates) = at_local.distinct_and_duplicates();
    assert_eq!((distinct.len(), duplicates), (N as usize, 0));
    assert_eq!(
        peer.connections(),
        1,
        "one connection: nothing was redelivered"
    );
    b.shutdown().await;
}

/// A peer that sends a PUBLISH to a wildcard topic: acknowledged, dropped and counted as
/// `invalid_topic`, never forwarded (the local broker would disconnect the bridge), and the
/// valid message after it is forwarded on the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_to_a_wildcard_topic_is_dropped_and_the_connection_kept() {
    init_tracing();
    edgebridge_tests::faults::reset_peak_rss();
    let local = Mosquitto::start(MosquittoOptions::default());
    let healthy = Mosquitto::start(MosquittoOptions::default());
    let peer = HostileBroker::start(Hostility::WildcardTopic).await;
    let dir = tempfile::tempdir().unwrap();
    let at_local = Collector::start(local.port, "w-sub", "x/#", false).await;
    let b = bridge_to_hostile(dir.path(), &local, &peer, &healthy).await;
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
    edgebridge_tests::faults::reset_peak_rss();
    let local = Mosquitto::start(MosquittoOptions::default());
    let healthy = Mosquitto::start(MosquittoOptions::default());

    let huge = HostileBroker::start(Hostility::HugeLength).await;
    let dir = tempfile::tempdir().unwrap();
    let rss_before = edgebridge_tests::faults::rss_kib();
    let b = bridge_to_hostile(dir.path(), &local, &huge, &healthy).await;
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
    let b = bridge_to_hostile(dir.path(), &local, &stray, &healthy).await;
    tokio::time::sleep(2 * SECOND).await;
    assert_eq!(
        stray.connections(),
        1,
        "a PUBACK for an unused packet id is ignored"
    );
    b.shutdown().await;

    let at_local = Collector::start(local.port, "c-sub", "x/#", false).await;
    let early = HostileBroker::start(Hostility::CoalescedConnack).await;
    let started = Instant::now();
    let b = bridge_to_hostile(dir.path(), &local, &early, &healthy).await;
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
    edgebridge_tests::faults::reset_peak_rss();
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
    edgebridge_tests::faults::print_peak("poison on 3.1.1");
    assert!(after_poison <= 4, "{}", remote.log());
    b.shutdown().await;
}

/// Publishes `n` numbered QoS 1 messages on `topic`, `burst` at a time with a pause between.
async fn publish_paced(p: &AckedPublisher, topic: &str, range: std::ops::Range<u64>, burst: u64) {
    for seq in range {
        p.publish(topic, seq, None);
        if seq % burst == burst - 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The local (source) broker restarts with its persistence under QoS 1 load: the bridge's
/// persistent session and what the broker acknowledged survive; everything arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_broker_restart_with_persistence_loses_nothing() {
    init_tracing();
    edgebridge_tests::faults::reset_peak_rss();
    let local = Mosquitto::start(MosquittoOptions {
        persistence: true,
        ..Default::default()
    });
    let remote = Mosquitto::start(MosquittoOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let cfg = load(
        dir.path(),
        &bridge_yaml(
            "v5",
            &local.endpoint(),
            &remote.endpoint(),
            1,
            "    - {direction: local-to-remote, name: up, source: \"lr/#\"}\n",
        ),
    );
    let b = start(&cfg, &opts()).await;
    let at_remote = Collector::start(remote.port, "lr-sub", "lr/#", false).await;
    let publisher = AckedPublisher::start(local.port, "lr-pub");
    let total = 3000u64;
    let p = &publisher;
    let publishing = async move { publish_paced(p, "lr/t", 0..total, 20).await };
    let restarting = async {
        tokio::time::sleep(Duration::from_millis(600)).await;
        tokio::task::spawn_blocking(move || {
            let mut local = local;
            local.restart();
            local
        })
        .await
        .unwrap()
    };
    let ((), local) = tokio::join!(publishing, restarting);
    let acked = publisher.wait_acked(total as usize, 60 * SECOND).await;
    let (acked_n, got, dups, lost) = settle(&publisher, &at_remote, 60 * SECOND).await;
    println!(
        "local restart (persistent): published {total}, acknowledged by the local broker {acked}, received {got}, duplicates {dups}, lost {lost}; bridge source reconnects {}",
        b.stats.clients()[0].source.reconnects()
    );
    edgebridge_tests::faults::print_peak("local restart");
    assert_eq!(
        acked_n, total as usize,
        "the publisher's session resent across the restart"
    );
    assert_eq!(lost, 0);
    assert!(
        b.stats.clients()[0].source.reconnects() >= 1,
        "the restart was seen"
    );
    b.shutdown().await;
    drop(local);
}

/// The remote (target) broker restarts without persistence under QoS 1 load: it lost the
/// bridge's target session (session present = 0), and the bridge sends again what it had not
/// acknowledged. The collector is connected again before the bridge is let back in, so that
/// only the bridge's own behaviour is measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_broker_restart_without_persistence_loses_nothing() {
    let ProxiedRemote {
        local,
        remote,
        proxy,
        bridge: b,
        _dir,
    } = proxied_remote("up", "rr/#", &opts()).await;
    let at_remote = Collector::start(remote.port, "rr-sub", "rr/#", false).await;
    let publisher = AckedPublisher::start(local.port, "rr-pub");
    let total = 3000u64;
    let p = &publisher;
    let publishing = async move { publish_paced(p, "rr/t", 0..total, 20).await };
    let restarting = async {
        tokio::time::sleep(Duration::from_millis(600)).await;
        proxy.set(Mode::Refuse);
        let remote = tokio::task::spawn_blocking(move || {
            let mut remote = remote;
            remote.restart();
            remote
        })
        .await
        .unwrap();
        // The collector subscribes again (its session was lost too), then the bridge may
        // return.
        assert!(
            eventually(15 * SECOND, || at_remote.subscriptions() >= 2).await,
            "the collector is back"
        );
        proxy.set(Mode::Forward);
        remote
    };
    let ((), remote) = tokio::join!(publishing, restarting);
    let acked = publisher.wait_acked(total as usize, 30 * SECOND).await;
    let (acked_n, got, dups, lost) = settle(&publisher, &at_remote, 60 * SECOND).await;
    println!(
        "remote restart (no persistence): published {total}, acknowledged by the local broker {acked}, received {got}, duplicates {dups}, lost {lost}; bridge target reconnects {}",
        b.stats.clients()[0].target.reconnects()
    );
    edgebridge_tests::faults::print_peak("remote restart");
    assert_eq!(acked_n, total as usize);
    assert_eq!(lost, 0);
    b.shutdown().await;
    drop(remote);
}

/// The source broker restarts without persistence: it lost the bridge's session. The bridge
/// subscribes again, counts `session_source_lost`, and the traffic after it flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_broker_that_lost_the_session_is_resubscribed_and_counted() {
    init_tracing();
    edgebridge_tests::faults::reset_peak_rss();
    let local = Mosquitto::start(MosquittoOptions::default());
    let remote = Mosquitto::start(MosquittoOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let cfg = load(
        dir.path(),
        &bridge_yaml(
            "v5",
            &local.endpoint(),
            &remote.endpoint(),
            1,
            "    - {direction: local-to-remote, name: up, source: \"sl/#\"}\n",
        ),
    );
    let b = start(&cfg, &opts()).await;
    let at_remote = Collector::start(remote.port, "sl-sub", "sl/#", false).await;
    let first = AckedPublisher::start(local.port, "sl-pub");
    publish_paced(&first, "sl/t", 0..500, 50).await;
    assert_eq!(first.wait_acked(500, 20 * SECOND).await, 500);
    let (_, got, _, lost) = settle(&first, &at_remote, 20 * SECOND).await;
    assert_eq!((got, lost), (500, 0));
    drop(first);
    let local = tokio::task::spawn_blocking(move || {
        let mut local = local;
        local.restart();
        local
    })
    .await
    .unwrap();
    let source = b.stats.clients()[0].source.clone();
    assert!(
        eventually(15 * SECOND, || source
            .source_lost
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1)
        .await,
        "the lost session is counted"
    );
    assert!(
        eventually(10 * SECOND, || b.stats.ready()).await,
        "subscribed again"
    );
    let second = AckedPublisher::start(local.port, "sl-pub-2");
    publish_paced(&second, "sl/t", 500..1000, 50).await;
    assert_eq!(second.wait_acked(500, 20 * SECOND).await, 500);
    let (_, got, dups, lost) = settle(&second, &at_remote, 20 * SECOND).await;
    println!(
        "source session lost: 500 before, 500 after; received {got}, duplicates {dups}, lost {lost}; session_source_lost = 1"
    );
    edgebridge_tests::faults::print_peak("source session lost");
    assert_eq!(lost, 0);
    b.shutdown().await;
}

/// A slow remote (a proxy passing 20 KB/s) while 50,000 QoS 1 messages queue up: the bridge
/// stops reading its source (the local broker holds them), its memory stays bounded, and once
/// the remote is fast again everything arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_remote_keeps_memory_bounded_and_loses_nothing() {
    let ProxiedRemote {
        local,
        remote,
        proxy,
        bridge: b,
        _dir,
    } = proxied_remote("up", "slow/#", &opts()).await;
    let at_remote = Collector::start(remote.port, "slow-sub", "slow/#", false).await;
    proxy.set(Mode::Throttle(20_000));
    let rss_before = edgebridge_tests::faults::rss_kib();
    let publisher = AckedPublisher::start(local.port, "slow-pub");
    let total = 50_000u64;
    publish_paced(&publisher, "slow/t", 0..total, 500).await;
    assert_eq!(
        publisher.wait_acked(total as usize, 60 * SECOND).await,
        total as usize
    );
    tokio::time::sleep(2 * SECOND).await;
    let in_flight = b.stats.clients()[0]
        .in_flight
        .load(std::sync::atomic::Ordering::Relaxed);
    let queued_at_bridge = total as usize - at_remote.count();
    let rss_queued = edgebridge_tests::faults::rss_kib();
    proxy.set(Mode::Forward);
    let (acked, got, dups, lost) = settle(&publisher, &at_remote, 120 * SECOND).await;
    println!(
        "slow remote: {queued_at_bridge} of {total} waiting while throttled, {in_flight} of them in flight in the bridge; test process RSS {} KiB before, {rss_queued} KiB with the queue (+{} KiB; other tests share the process); sent {acked}, received {got}, duplicates {dups}, lost {lost}",
        rss_before,
        rss_queued.saturating_sub(rss_before)
    );
    edgebridge_tests::faults::print_peak("slow remote");
    // The window (the default `--max-inflight`); a route stalled past 500 ms reads again (to
    // shed QoS 0) up to twice the window, which one read (at most 16 KiB) may pass by its own
    // number of messages: here at most 16 KiB / 14 B, the smallest PUBLISH of this test (fixed
    // header 2, topic 2 + 6, packet id 2, property length 1, payload "0" to "49999": 1 to 5).
    // (Mosquitto with `max_inflight_messages 0` does not hold to the Receive Maximum the
    // bridge announces.)
    let window = opts().max_inflight as u64;
    assert!(
        in_flight <= 2 * window + 16 * 1024 / 14,
        "the bridge holds at most twice its in-flight window and one read: {in_flight}"
    );
    assert_eq!(lost, 0);
    b.shutdown().await;
}

/// MQTT 3.1.1: a retained message crosses once, with its retain flag, even though the bridge
/// subscribes again after a local broker restart and after two bridge restarts (each resumes
/// its session, and 3.1.1 brokers replay retained messages on every SUBSCRIBE).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_message_crosses_once_on_mqtt_3_1_1() {
    init_tracing();
    edgebridge_tests::faults::reset_peak_rss();
    let local = Mosquitto::start(MosquittoOptions {
        persistence: true,
        ..Default::default()
    });
    let remote = Mosquitto::start(MosquittoOptions::default());
    let lp = edgebridge_tests::Publisher::connect(local.port, "ret-pub").await;
    lp.publish("ret/state", 1, true, "on").await;
    assert_eq!(lp.wait_acked(1, 5 * SECOND).await, 1);
    drop(lp);
    let dir = tempfile::tempdir().unwrap();
    let cfg = load(
        dir.path(),
        &bridge_yaml(
            "v3",
            &local.endpoint(),
            &remote.endpoint(),
            1,
            "    - {direction: local-to-remote, name: ret, source: \"ret/#\"}\n",
        ),
    );
    let at_remote = Collector::start(remote.port, "ret-sub", "ret/#", false).await;
    let b = start(&cfg, &opts()).await;
    assert!(eventually(10 * SECOND, || at_remote.count() == 1).await);
    let local = tokio::task::spawn_blocking(move || {
        let mut local = local;
        local.restart();
        local
    })
    .await
    .unwrap();
    assert!(
        eventually(10 * SECOND, || b.stats.clients()[0].source.reconnects()
            >= 1)
        .await
    );
    assert!(eventually(10 * SECOND, || b.stats.ready()).await);
    let mut b = b;
    for _ in 0..2 {
        b.abort();
        b = start(&cfg, &opts()).await;
    }
    tokio::time::sleep(2 * SECOND).await;
    let copies = at_remote.count();
    let late = Collector::start(remote.port, "ret-late", "ret/#", false).await;
    assert_eq!(late.wait_for(1, 5 * SECOND).await, 1);
    println!(
        "retained on 3.1.1: {copies} copy at the remote across a local restart and two bridge restarts; a late subscriber sees it retained: {}",
        late.messages()[0].retain
    );
    edgebridge_tests::faults::print_peak("retained on 3.1.1");
    assert_eq!(copies, 1, "{:?}", at_remote.messages());
    assert!(late.messages()[0].retain);
    b.shutdown().await;
    drop(local);
}

/// The bridge crashes (every connection dropped, nothing drained) while a fan-out plugin has
/// emitted some copies of a message and not others: after the restart every copy arrives at
/// least once (the source message was acknowledged only after all its copies were).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_fanned_out_copies_loses_none_of_them() {
    init_tracing();
    edgebridge_tests::faults::reset_peak_rss();
    let local = Mosquitto::start(MosquittoOptions::default());
    let remote = Mosquitto::start(MosquittoOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    edgebridge_tests::install_plugin(&plugins, "fan-out", "fan-out");
    let o = RunOptions {
        plugins_dir: plugins,
        policies_dir: dir.path().join("policies"),
        ..opts()
    };
    let cfg = load(
        dir.path(),
        &bridge_yaml(
            "v5",
            &local.endpoint(),
            &remote.endpoint(),
            1,
            "    - direction: local-to-remote
      name: split
      source: batch/in
      target: batch/out
      plugins:
        - name: fan-out
",
        ),
    );
    let b = start(&cfg, &o).await;
    let at_remote = Collector::start(remote.port, "fan-sub", "batch/out", false).await;
    let publisher = AckedPublisher::start(local.port, "fan-pub");
    let (batches, width) = (400u64, 5u64);
    for i in 0..batches {
        let items: Vec<String> = (0..width)
            .map(|j| format!("\"{}\"", i * width + j))
            .collect();
        publisher.publish("batch/in", i, Some(format!("[{}]", items.join(",")).into()));
        if i % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if i == batches / 2 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Crash while copies are in flight.
    assert!(
        eventually(20 * SECOND, || at_remote.count() as u64
            >= width * batches / 3)
        .await
    );
    let before_crash = at_remote.count();
    b.abort();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = start(&cfg, &o).await;
    assert_eq!(
        publisher.wait_acked(batches as usize, 30 * SECOND).await,
        batches as usize
    );
    let want = batches * width;
    let complete = || {
        let (seen, _) = at_remote.distinct_and_duplicates();
        (0..want).all(|n| seen.contains_key(&format!("\"{n}\"")))
    };
    assert!(
        eventually(60 * SECOND, complete).await,
        "every copy arrives"
    );
    let (seen, dups) = at_remote.distinct_and_duplicates();
    println!(
        "crash during fan-out: {batches} messages x {width} copies = {want}; {before_crash} had arrived at the crash; received {} distinct, {dups} duplicates, 0 lost",
        seen.len()
    );
    edgebridge_tests::faults::print_peak("crash during fan-out");
    b.shutdown().await;
}

/// 4 MB QoS 1 messages while the remote is down: the bridge stops reading its source at its
/// in-flight byte bound (8 MiB here; a stalled route reads on to twice that to shed QoS 0)
/// instead of holding them all (300 of them took one route to 1.5 GB before); once the remote
/// is back every one arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_in_flight_are_bounded_in_bytes() {
    init_tracing();
    let local = Mosquitto::start(MosquittoOptions::default());
    let mut remote = Mosquitto::start(MosquittoOptions {
        persistence: true,
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = one_route(
        dir.path(),
        "v5",
        &local.endpoint(),
        &remote.endpoint(),
        "{direction: local-to-remote, name: big, source: \"big/#\"}",
    );
    let bound = 8 << 20;
    let b = start(
        &cfg,
        &RunOptions {
            max_inflight_bytes: bound,
            ..opts()
        },
    )
    .await;
    let at_remote = Collector::start(remote.port, "bytes-sub", "big/#", true).await;
    remote.stop();
    let publisher = AckedPublisher::start(local.port, "bytes-pub");
    let padding = "x".repeat(4 << 20);
    let n = 20u64;
    for seq in 0..n {
        publisher.publish("big/a", seq, Some(format!("{seq}:{padding}").into()));
    }
    let counters = b.stats.clients()[0].clone();
    let mut peak = 0;
    let watch_until = Instant::now() + 4 * SECOND;
    while Instant::now() < watch_until {
        peak = peak.max(
            counters
                .in_flight_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    remote.restart();
    let (acked, got, dups, lost) = settle(&publisher, &at_remote, 60 * SECOND).await;
    println!(
        "4 MB messages, remote down: peak {:.1} MiB in flight (bound 8 MiB, twice that while shedding QoS 0); {acked} acknowledged, {got} received, {dups} duplicates, {lost} lost",
        peak as f64 / 1048576.0
    );
    assert!(peak > 0, "messages were in flight");
    assert!(
        peak <= (2 * bound + 2 * (4 << 20) + 1024) as u64,
        "in flight {peak} bytes, bound {bound}"
    );
    assert_eq!(lost, 0);
    assert_eq!(acked, n as usize);
    b.shutdown().await;
}

/// MQTT 3.1.1: a retained message changed while the bridge was away. The broker sends the
/// queued change with retain = 0 and then, for the bridge's SUBSCRIBE, the retained message
/// again: that replay carries the newest state and is forwarded (it used to be dropped as a
/// replay, leaving the old retained state at the remote for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_message_changed_while_the_bridge_was_away_reaches_the_remote_on_3_1_1() {
    init_tracing();
    let local = Mosquitto::start(MosquittoOptions {
        persistence: true,
        ..Default::default()
    });
    let remote = Mosquitto::start(MosquittoOptions::default());
    let lp = edgebridge_tests::Publisher::connect(local.port, "chg-pub").await;
    lp.publish("chg/state", 1, true, "on").await;
    assert_eq!(lp.wait_acked(1, 5 * SECOND).await, 1);
    let dir = tempfile::tempdir().unwrap();
    let cfg = one_route(
        dir.path(),
        "v3",
        &local.endpoint(),
        &remote.endpoint(),
        "{direction: local-to-remote, name: chg, source: \"chg/#\"}",
    );
    let b = start(&cfg, &opts()).await;
    let first = Collector::start(remote.port, "chg-first", "chg/#", false).await;
    assert_eq!(first.wait_for(1, 10 * SECOND).await, 1);
    b.abort();
    lp.publish("chg/state", 1, true, "off").await;
    assert_eq!(lp.wait_acked(2, 5 * SECOND).await, 2);
    let b = start(&cfg, &opts()).await;
    tokio::time::sleep(2 * SECOND).await;
    let late = Collector::start(remote.port, "chg-late", "chg/#", false).await;
    assert_eq!(late.wait_for(1, 5 * SECOND).await, 1);
    let m = &late.messages()[0];
    println!(
        "retained changed while away on 3.1.1: the remote holds {:?} (retain {})",
        m.payload, m.retain
    );
    assert_eq!((m.payload.as_str(), m.retain), ("off", true));
    b.shutdown().await;
}

/// The source broker refuses the route's subscription (SUBACK 0x87) and grants it when asked
/// again: the bridge says so and subscribes again with backoff on the same connection, and
/// messages flow (a refused subscription used to stay refused until the connection dropped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_subscription_is_tried_again() {
    init_tracing();
    let local = HostileBroker::start(Hostility::RefuseFirstSubscribe).await;
    let remote = Mosquitto::start(MosquittoOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let cfg = one_route(
        dir.path(),
        "v5",
        &format!("127.0.0.1:{}", local.port),
        &remote.endpoint(),
        "{direction: local-to-remote, name: acl, source: \"acl/#\"}",
    );
    let at_remote = Collector::start(remote.port, "acl-sub", "acl/#", false).await;
    let started = Instant::now();
    let b = bridge::start(&cfg, &opts()).await.expect("bridge starts");
    assert_eq!(
        at_remote.wait_for(1, 20 * SECOND).await,
        1,
        "the message after the second SUBSCRIBE arrived: {:?}",
        b.stats.all()
    );
    println!(
        "refused subscription: granted and flowing {:.1} s after the start, on {} connection(s)",
        started.elapsed().as_secs_f64(),
        local.connections()
    );
    assert_eq!(at_remote.messages()[0].payload, "granted");
    assert_eq!(local.connections(), 1, "no reconnect was needed");
    b.shutdown().await;
}

/// MQTT 5, a remote Mosquitto with `message_size_limit`: it answers an oversize QoS 1 PUBLISH
/// with PUBACK reason 0x95, a code MQTT 5 does not define for PUBACK (and resets the
/// connection around it). That one message is refused (counted `rejected_by_target`), never
/// sent again, and the next 300 arrive at once (the bridge used to read the PUBACK as a broken
/// connection and resend the message first at every reconnect, forever: 2 of 300 in 30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_message_refused_with_an_undefined_puback_code_is_refused_alone_on_mqtt_5() {
    init_tracing();
    let local = Mosquitto::start(MosquittoOptions::default());
    let remote = Mosquitto::start(MosquittoOptions {
        extra: "message_size_limit 1000\n".into(),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = one_route(
        dir.path(),
        "v5",
        &local.endpoint(),
        &remote.endpoint(),
        "{direction: local-to-remote, name: sz, source: \"sz/#\"}",
    );
    let b = start(&cfg, &opts()).await;
    let at_remote = Collector::start(remote.port, "sz-sub", "sz/#", false).await;
    let publisher = AckedPublisher::start(local.port, "sz-pub");
    publisher.publish("sz/a", 0, None);
    publisher.publish("sz/a", 1, Some(format!("1:{}", "x".repeat(2000)).into()));
    for seq in 2..302 {
        publisher.publish("sz/a", seq, None);
    }
    let started = Instant::now();
    let (mut got, _) = received(&at_remote);
    while got.len() < 301 && started.elapsed() < 30 * SECOND {
        tokio::time::sleep(Duration::from_millis(50)).await;
        (got, _) = received(&at_remote);
    }
    let c = b.stats.clients()[0].clone();
    let rejected = c.dropped(DropReason::RejectedByTarget);
    println!(
        "oversize on MQTT 5 (PUBACK 0x95): {} of the 301 others arrived in {:.1} s, {rejected} refused, {} target reconnects",
        got.len(),
        started.elapsed().as_secs_f64(),
        c.target.reconnects()
    );
    assert_eq!(got.len(), 301, "every other message arrived");
    assert!(!got.contains(&1));
    assert_eq!(rejected, 1);
    assert!(started.elapsed() < 10 * SECOND, "the route went on at once");
    assert!(
        c.target.reconnects() <= 3,
        "the refused message is not retried on every reconnect: {} reconnects",
        c.target.reconnects()
    );
    b.shutdown().await;
}

/// A reload changes a route's source: its persistent session on the source broker would keep
/// the old subscription (and deliver its messages to be dropped as `unmatched`, for as long as
/// the session lives); the new client unsubscribes it on its first connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_a_source_unsubscribes_the_old_filter() {
    init_tracing();
    let local = Mosquitto::start(MosquittoOptions::default());
    let remote = Mosquitto::start(MosquittoOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let yaml = |source: &str| {
        bridge_yaml(
            "v5",
            &local.endpoint(),
            &remote.endpoint(),
            1,
            &format!("    - {{direction: local-to-remote, name: moved, source: \"{source}\"}}\n"),
        )
    };
    let mut b = start(&load(dir.path(), &yaml("old/#")), &opts()).await;
    let summary = b
        .reload(load(dir.path(), &yaml("new/#")))
        .await
        .expect("reload");
    assert_eq!(summary.restarted, vec!["edge-moved".to_string()]);
    assert!(eventually(10 * SECOND, || b.stats.ready()).await);
    let at_remote = Collector::start(remote.port, "moved-sub", "#", false).await;
    let lp = edgebridge_tests::Publisher::connect(local.port, "moved-pub").await;
    lp.publish("old/x", 1, false, "old").await;
    lp.publish("new/x", 1, false, "new").await;
    assert_eq!(at_remote.wait_for(1, 10 * SECOND).await, 1);
    tokio::time::sleep(SECOND).await;
    let c = b.stats.route("moved");
    println!(
        "source changed by a reload: received {}, unmatched {}",
        c.received,
        c.dropped(DropReason::Unmatched)
    );
    assert_eq!(at_remote.messages()[0].payload, "new");
    assert_eq!(
        c.dropped(DropReason::Unmatched),
        0,
        "the old filter is gone"
    );
    assert_eq!(c.received, 1);
    b.shutdown().await;
}
