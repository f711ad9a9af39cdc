use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgebridge::model::QoS;
use edgebridge_tests::Collector;
use edgebridge_tests::faults::AckedPublisher;
use edgebridge_tests::spool::{Outage, publish_at, received};

const SECOND: Duration = Duration::from_secs(1);

/// The outage of the spool issue: 20,000 messages at 2,000 msg/s while the remote is down
/// for 16 s, through a local broker with Mosquitto's default queue limit.
fn sixteen_seconds(qos: QoS, spooled: bool) -> Outage {
    Outage {
        qos,
        n: 20_000,
        rate: 2_000,
        down: 16 * SECOND,
        spooled,
        route_extra: String::new(),
        drain_timeout: if spooled { 60 * SECOND } else { 3 * SECOND },
    }
}

async fn spooled_outage(qos: QoS) {
    let r = sixteen_seconds(qos, true).run().await;
    println!(
        "outage at QoS {}: 16 s down, {}/20000 acknowledged at the edge, {} spooled at the end of the burst ({} bytes), {} arrived, {} duplicates, {} lost; drained at {:.0} msg/s",
        qos.as_u8(),
        r.acked,
        r.backlog,
        r.backlog_bytes,
        r.arrived,
        r.duplicates,
        r.lost,
        r.drain_rate
    );
    assert_eq!(
        r.acked, 20_000,
        "the local broker acknowledged every publish"
    );
    assert_eq!(r.lost, 0, "every acknowledged message arrived");
    assert!(
        r.duplicates <= edgebridge::bridge::DEFAULT_MAX_INFLIGHT as usize,
        "duplicates are bounded by the in-flight window: {}",
        r.duplicates
    );
    assert_eq!(r.broker_drops, 0, "the local broker dropped nothing");
    assert!(
        r.drain_rate >= 5.0 * 2_000.0,
        "the backlog drains at 5x the publish rate or more: {:.0} msg/s",
        r.drain_rate
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sixteen_second_outage_at_2000_messages_a_second_loses_nothing_at_qos_1() {
    spooled_outage(QoS::AtLeastOnce).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sixteen_second_outage_at_2000_messages_a_second_loses_nothing_at_qos_0() {
    spooled_outage(QoS::AtMostOnce).await;
}

/// The same outage without a spool: the bridge holds its in-flight window in memory (the
/// default `--max-inflight`, 4,096), the local broker keeps 1,000 messages for the bridge's
/// session and drops the rest (what the README's delivery section says of brokers' limits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_spool_the_same_outage_loses_what_the_local_broker_drops() {
    let r = sixteen_seconds(QoS::AtLeastOnce, false).run().await;
    println!(
        "outage at QoS 1 without a spool: {}/20000 acknowledged at the edge, {} arrived, {} lost; the local broker logged {} drop notice(s)",
        r.acked, r.arrived, r.lost, r.broker_drops
    );
    // What can arrive: the window, the broker's queue of 1,000, and a margin for what crossed
    // before the outage began.
    let window = edgebridge::bridge::DEFAULT_MAX_INFLIGHT as usize;
    assert!(
        r.lost + window + 1_000 + 500 >= 20_000,
        "the local broker's queue limit applies without a spool: {} lost",
        r.lost
    );
}

/// `drainRate.messagesPerSecond: 1000`: after the outage the backlog goes to the remote at
/// that rate, within 5 %.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_drain_keeps_to_its_rate() {
    let r = Outage {
        qos: QoS::AtLeastOnce,
        n: 6_000,
        rate: 2_000,
        down: 4 * SECOND,
        spooled: true,
        route_extra: "spool: {drainRate: {messagesPerSecond: 1000}}".into(),
        drain_timeout: 30 * SECOND,
    }
    .run()
    .await;
    println!(
        "limited drain: {} arrived, {} lost, {:.0} msg/s (limit 1000)",
        r.arrived, r.lost, r.drain_rate
    );
    assert_eq!(r.lost, 0);
    assert!(
        (950.0..=1050.0).contains(&r.drain_rate),
        "drained at {:.0} msg/s",
        r.drain_rate
    );
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
    let bin = edgebridge_tests::bridge_binary();
    let (local, mut remote) = edgebridge_tests::spool::brokers();
    let spool = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = edgebridge_tests::spool::route_file(dir.path(), &local, &remote, "");
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
