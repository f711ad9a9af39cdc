//! End to end through real brokers: Mosquitto processes (and the embedded broker) on
//! ephemeral loopback ports, the bridge library in-process, independent test clients.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use edgebridge::bridge::{self, RunOptions, RunningBridge};
use edgebridge::config::{self, Config};
use edgebridge::counters::DropReason;
use edgebridge_tests::{
    Collector, Mosquitto, MosquittoOptions, Pki, Publisher, bridge_yaml, eventually, free_port,
    init_tracing, write_file,
};
use rumqttc::v5::mqttbytes::v5::PublishProperties;

const SECOND: Duration = Duration::from_secs(1);

fn opts() -> RunOptions {
    RunOptions {
        backoff: (Duration::from_millis(50), Duration::from_millis(500)),
        drain_timeout: Duration::from_secs(3),
        keep_alive: Duration::from_secs(10),
        ..RunOptions::default()
    }
}

fn load(dir: &Path, yaml: &str) -> Config {
    edgebridge_tests::load_config(dir, yaml)
}

/// A connector plus a topic map whose `routes:` block is `routes` (already indented by 4).
/// The configuration of one MQTT 5 bridge between `local` and `remote` with `routes`.
fn v5_config(dir: &Path, local: &Mosquitto, remote: &Mosquitto, routes: &str) -> Config {
    load(
        dir,
        &bridge_yaml("v5", &local.endpoint(), &remote.endpoint(), 1, routes),
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

fn payloads_on(c: &Collector, topic: &str) -> Vec<String> {
    c.messages()
        .into_iter()
        .filter(|m| m.topic == topic)
        .map(|m| m.payload)
        .collect()
}

const MATRIX_ROUTES: &str = "    - {direction: local-to-remote, name: tele, source: \"tele/#\"}
    - {direction: local-to-remote, name: alerts, source: \"alerts/+/high\", target: cloud/alerts}
    - {direction: local-to-remote, name: lossy, source: \"q0/#\", qos: 0}
    - {direction: remote-to-local, name: cmd, source: \"cmd/#\"}
    - {direction: remote-to-local, name: cfg, source: cfg/device, target: edge/cfg, qos: 2}
";

async fn route_matrix(protocol: &str) {
    init_tracing();
    let local = Mosquitto::start(MosquittoOptions::default());
    let remote = Mosquitto::start(MosquittoOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let cfg = load(
        dir.path(),
        &bridge_yaml(
            protocol,
            &local.endpoint(),
            &remote.endpoint(),
            1,
            MATRIX_ROUTES,
        ),
    );
    let b = start(&cfg, &opts()).await;
    let at_remote = Collector::start(remote.port, "remote-sub", "#", false).await;
    let at_local = Collector::start(local.port, "local-sub", "#", false).await;
    let lp = Publisher::connect(local.port, "local-pub").await;
    let rp = Publisher::connect(remote.port, "remote-pub").await;

    lp.publish("tele/furnace/temperature", 1, false, "t1").await;
    lp.publish("alerts/furnace/high", 1, false, "a1").await;
    lp.publish("alerts/furnace/low", 1, false, "not-bridged")
        .await;
    lp.publish("q0/x", 0, false, "z").await;
    rp.publish("cmd/reboot", 1, false, "c1").await;
    rp.publish("cfg/device", 2, false, "f1").await;

    // 3 bridged + 3 local originals seen by the remote collector, and so on: wait for the
    // bridged copies specifically.
    let deadline = tokio::time::Instant::now() + 10 * SECOND;
    while tokio::time::Instant::now() < deadline
        && (payloads_on(&at_remote, "cloud/alerts").is_empty()
            || payloads_on(&at_remote, "q0/x").is_empty()
            || payloads_on(&at_local, "edge/cfg").is_empty()
            || payloads_on(&at_local, "cmd/reboot").is_empty()
            || payloads_on(&at_remote, "tele/furnace/temperature").is_empty())
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        payloads_on(&at_remote, "tele/furnace/temperature"),
        ["t1"],
        "same-topic route"
    );
    assert_eq!(
        payloads_on(&at_remote, "cloud/alerts"),
        ["a1"],
        "static target, + wildcard"
    );
    assert!(
        payloads_on(&at_remote, "alerts/furnace/low").is_empty(),
        "filter respected"
    );
    assert_eq!(payloads_on(&at_remote, "q0/x"), ["z"], "QoS 0 route");
    // The remote collector also sees the remote originals; the local one the local originals.
    assert_eq!(
        payloads_on(&at_local, "cmd/reboot"),
        ["c1"],
        "remote-to-local, same topic"
    );
    assert_eq!(
        payloads_on(&at_local, "edge/cfg"),
        ["f1"],
        "remote-to-local, static, QoS 2"
    );
    assert!(eventually(15 * SECOND, || b.stats.route("alerts").forwarded == 1).await);
    assert!(eventually(15 * SECOND, || b.stats.route("cfg").forwarded == 1).await);
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_kind_bridges_over_mqtt_5() {
    route_matrix("v5").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_kind_bridges_over_mqtt_3_1_1() {
    route_matrix("v3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_5_properties_and_the_retain_flag_pass_through() {
    init_tracing();
    let local = Mosquitto::start(MosquittoOptions::default());
    let remote = Mosquitto::start(MosquittoOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let cfg = v5_config(
        dir.path(),
        &local,
        &remote,
        "    - {direction: local-to-remote, name: props, source: \"props/#\"}\n",
    );
    let b = start(&cfg, &opts()).await;
    let live = Collector::start(remote.port, "live-sub", "props/#", false).await;
    let lp = Publisher::connect(local.port, "props-pub").await;
    let props = PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(300),
        topic_alias: None,
        response_topic: Some("props/replies".into()),
        correlation_data: Some(Bytes::from_static(b"corr-1")),
        user_properties: vec![("site".into(), "a".into()), ("line".into(), "3".into())],
        subscription_identifiers: vec![],
        content_type: Some("application/json".into()),
    };
    lp.publish_with("props/x", true, "{\"v\":1}", props).await;
    assert_eq!(live.wait_for(1, 10 * SECOND).await, 1);
    let got = live.messages()[0].properties.clone().expect("properties");
    assert_eq!(got.content_type.as_deref(), Some("application/json"));
    assert_eq!(got.response_topic.as_deref(), Some("props/replies"));
    assert_eq!(got.correlation_data.as_deref(), Some(&b"corr-1"[..]));
    assert_eq!(got.payload_format_indicator, Some(1));
    let expiry = got.message_expiry_interval.expect("expiry kept");
    assert!((295..=300).contains(&expiry), "{expiry}");
    assert_eq!(
        &got.user_properties[..2],
        &[
            ("site".to_string(), "a".to_string()),
            ("line".to_string(), "3".to_string())
        ],
        "user properties keep their order"
    );
    assert!(
        got.user_properties[2].0 == "edgebridge-via",
        "{:?}",
        got.user_properties
    );
    // The forwarded copy kept the retain flag: a late subscriber gets it as retained.
    let late = Collector::start(remote.port, "late-sub", "props/#", false).await;
    assert_eq!(late.wait_for(1, 5 * SECOND).await, 1);
    assert!(late.messages()[0].retain, "retained at the remote broker");
    b.shutdown().await;
}

/// A route's `qos` is a ceiling: a message goes on at the QoS it came with, at most the
/// route's. QoS 0 through a QoS 1 route arrives as QoS 0 (no acknowledgements nobody asked
/// for); QoS 1 through a QoS 0 route as QoS 0; QoS 1 through a QoS 1 route as QoS 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_route_qos_is_a_maximum_in_both_directions() {
    init_tracing();
    let local = Mosquitto::start(MosquittoOptions::default());
    let remote = Mosquitto::start(MosquittoOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let cfg = v5_config(
        dir.path(),
        &local,
        &remote,
        "    - {direction: local-to-remote, name: one, source: \"q1/#\", qos: 1}
    - {direction: local-to-remote, name: zero, source: \"q0/#\", qos: 0}
",
    );
    let b = start(&cfg, &opts()).await;
    let at_remote = Collector::start(remote.port, "qos-sub", "#", false).await;
    let lp = Publisher::connect(local.port, "qos-pub").await;
    lp.publish("q1/at0", 0, false, "a").await;
    lp.publish("q1/at1", 1, false, "b").await;
    lp.publish("q0/at1", 1, false, "c").await;
    assert_eq!(at_remote.wait_for(3, 10 * SECOND).await, 3);
    let mut got: Vec<(String, u8)> = at_remote
        .messages()
        .into_iter()
        .map(|m| (m.topic, m.qos))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("q0/at1".to_string(), 0),
            ("q1/at0".to_string(), 0),
            ("q1/at1".to_string(), 1)
        ]
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_targets_maximum_packet_size_is_refused_alone() {
    init_tracing();
    let local = Mosquitto::start(MosquittoOptions::default());
    let remote = Mosquitto::start(MosquittoOptions {
        extra: "max_packet_size 2000\n".into(),
        ..MosquittoOptions::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = v5_config(
        dir.path(),
        &local,
        &remote,
        "    - {direction: local-to-remote, name: big, source: \"big/#\"}\n",
    );
    let b = start(&cfg, &opts()).await;
    let at_remote = Collector::start(remote.port, "big-sub", "big/#", false).await;
    let lp = Publisher::connect(local.port, "big-pub").await;
    lp.publish("big/a", 1, false, "before").await;
    lp.publish("big/a", 1, false, &"x".repeat(5000)).await;
    lp.publish("big/a", 1, false, "after").await;
    assert_eq!(at_remote.wait_for(2, 15 * SECOND).await, 2);
    assert_eq!(payloads_on(&at_remote, "big/a"), ["before", "after"]);
    assert!(
        eventually(15 * SECOND, || b
            .stats
            .route("big")
            .dropped(DropReason::Oversize)
            == 1)
        .await
    );
    // Refused alone: the bridge's target connection was never dropped over it.
    let log = remote.log();
    let connects = log
        .lines()
        .filter(|l| l.contains("New client connected") && l.contains("-big ("))
        .count();
    assert_eq!(connects, 1, "{log}");
    b.shutdown().await;
}

/// Payload sizes on both sides of the size from which the bridge writes a payload from the
/// read buffer it arrived in (1 KiB, `mqtt::outbuf::SHARE_FROM`) instead of copying it.
const SIZES: [usize; 8] = [0, 1, 1023, 1024, 1025, 4096, 65_536, 200_000];

/// Message `i` of [`SIZES`]: its number, then letters that depend on the number and position.
fn sized_payload(i: usize) -> String {
    let size = SIZES[i % SIZES.len()];
    let head = format!("{i}:");
    let mut p: String = head.chars().take(size).collect();
    p.extend((p.len()..size).map(|j| char::from(b'a' + ((i * 7 + j) % 26) as u8)));
    p
}

/// Publishes five messages of each size in [`SIZES`] on `{prefix}/{i}` of every route and
/// checks the remote subscriber got each, byte for byte and in order.
async fn every_size_arrives_intact(local_port: u16, remote_port: u16, routes: &[(&str, u8)]) {
    let n = 5 * SIZES.len();
    let name = routes[0].0;
    let at_remote = Collector::start(remote_port, &format!("{name}-sub"), "#", false).await;
    let lp = Publisher::connect(local_port, &format!("{name}-pub")).await;
    for i in 0..n {
        for (prefix, _) in routes {
            lp.publish(&format!("{prefix}/{i}"), 1, false, &sized_payload(i))
                .await;
        }
    }
    assert_eq!(
        at_remote.wait_for(n * routes.len(), 30 * SECOND).await,
        n * routes.len()
    );
    for (prefix, qos) in routes {
        let got: Vec<_> = at_remote
            .messages()
            .into_iter()
            .filter(|m| m.topic.starts_with(&format!("{prefix}/")))
            .collect();
        assert_eq!(got.len(), n, "{prefix}: every message once");
        for (i, m) in got.iter().enumerate() {
            assert_eq!(m.topic, format!("{prefix}/{i}"), "{prefix}: in order");
            assert!(
                m.payload == sized_payload(i),
                "{prefix}: message {i} ({} bytes) arrived with {} bytes, not as sent",
                SIZES[i % SIZES.len()],
                m.payload.len()
            );
            assert_eq!(m.qos, *qos, "{prefix}: delivered at the route's QoS");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_of_every_size_arrive_byte_for_byte_over_tcp_and_tls() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let local = Mosquitto::start(MosquittoOptions::default());
    let remote = Mosquitto::start(MosquittoOptions {
        tls: Some(pki.server_files()),
        ..Default::default()
    });
    let routes = "    - {direction: local-to-remote, name: sz1, source: \"sz1/#\"}
    - {direction: local-to-remote, name: sz0, source: \"sz0/#\", qos: 0}
";
    // Plain TCP (vectored writes), a QoS 1 and a QoS 0 route.
    let cfg = v5_config(dir.path(), &local, &remote, routes);
    let b = start(&cfg, &opts()).await;
    every_size_arrives_intact(local.port, remote.port, &[("sz1", 1), ("sz0", 0)]).await;
    b.shutdown().await;
    // TLS (rustls takes the pieces of a vectored write into its records).
    let cfg = x509_config(
        dir.path(),
        &pki,
        &local,
        &remote,
        "    - {direction: local-to-remote, name: tls1, source: \"tls1/#\"}\n",
    );
    let b = start(&cfg, &opts()).await;
    every_size_arrives_intact(local.port, remote.port, &[("tls1", 1)]).await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_subscription_route_runs_n_clients_that_split_the_messages() {
    init_tracing();
    let local = Mosquitto::start(MosquittoOptions::default());
    let remote = Mosquitto::start(MosquittoOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let cfg = v5_config(
        dir.path(),
        &local,
        &remote,
        "    - direction: local-to-remote
      name: shared
      source: \"shared/#\"
      target: cloud/shared
      sharedSubscription:
        groupMinimumShareNumber: 3
        groupName: sub-group
",
    );
    let b = start(&cfg, &opts()).await;
    let ids: Vec<String> = b
        .route_clients()
        .iter()
        .map(|p| p.client_id.clone())
        .collect();
    assert_eq!(ids, ["edge-shared-0", "edge-shared-1", "edge-shared-2"]);
    assert!(
        b.route_clients()
            .iter()
            .all(|p| p.subscription == "$share/sub-group/shared/#")
    );
    let at_remote = Collector::start(remote.port, "shared-sub", "cloud/shared", false).await;
    let lp = Publisher::connect(local.port, "shared-pub").await;
    let n = 300;
    for i in 0..n {
        lp.publish(&format!("shared/{}", i % 7), 1, false, &i.to_string())
            .await;
    }
    assert_eq!(
        at_remote.wait_for(n, 20 * SECOND).await,
        n,
        "bridge: {:?}\ncollector errors: {:?}",
        b.stats.all(),
        at_remote.errors()
    );
    let (distinct, dups) = at_remote.distinct_and_duplicates();
    assert_eq!(
        (distinct.len(), dups),
        (n, 0),
        "bridge: {:?}\ncollector errors: {:?}\nremote log: {}",
        b.stats.all(),
        at_remote.errors(),
        remote.log()
    );
    // The collector can see a message before the bridge processed the PUBACK that counts it.
    let per_client = || -> Vec<u64> {
        ids.iter()
            .map(|id| b.stats.client(id).unwrap().forwarded)
            .collect()
    };
    eventually(15 * SECOND, || per_client().iter().sum::<u64>() == n as u64).await;
    let per_client = per_client();
    assert_eq!(per_client.iter().sum::<u64>(), n as u64);
    assert!(
        per_client.iter().all(|f| *f > 0),
        "every client took a share: {per_client:?}"
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_split_the_routes_and_cover_each_once() {
    init_tracing();
    let local = Mosquitto::start(MosquittoOptions::default());
    let remote = Mosquitto::start(MosquittoOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let mut routes = String::new();
    for i in 0..6 {
        routes.push_str(&format!(
            "    - {{direction: local-to-remote, name: r{i}, source: \"two/{i}/#\"}}\n"
        ));
    }
    routes.push_str("    - {direction: local-to-remote, name: sh, source: \"two/shared\", sharedSubscription: {groupMinimumShareNumber: 2, groupName: g}}\n");
    let cfg = load(
        dir.path(),
        &bridge_yaml("v5", &local.endpoint(), &remote.endpoint(), 2, &routes),
    );
    let b0 = start(
        &cfg,
        &RunOptions {
            instance: Some(0),
            ..opts()
        },
    )
    .await;
    let b1 = start(
        &cfg,
        &RunOptions {
            instance: Some(1),
            ..opts()
        },
    )
    .await;
    assert!(
        !b0.route_clients().is_empty() && !b1.route_clients().is_empty(),
        "both instances work"
    );
    let mut all: Vec<String> = b0
        .route_clients()
        .iter()
        .chain(&b1.route_clients())
        .map(|p| p.client_id.clone())
        .collect();
    all.sort();
    assert_eq!(all.len(), 8);
    all.dedup();
    assert_eq!(all.len(), 8, "no client runs twice");
    let at_remote = Collector::start(remote.port, "two-sub", "two/#", false).await;
    let lp = Publisher::connect(local.port, "two-pub").await;
    for i in 0..6 {
        lp.publish(&format!("two/{i}/x"), 1, false, &format!("m{i}"))
            .await;
    }
    for k in 0..20 {
        lp.publish("two/shared", 1, false, &format!("s{k}")).await;
    }
    // The remote collector sees only bridged copies (nothing is published there directly).
    assert_eq!(at_remote.wait_for(26, 10 * SECOND).await, 26);
    let (distinct, dups) = at_remote.distinct_and_duplicates();
    assert_eq!(
        (distinct.len(), dups),
        (26, 0),
        "every route forwarded exactly once"
    );
    let forwarded = |name: &str| b0.stats.route(name).forwarded + b1.stats.route(name).forwarded;
    assert!(eventually(15 * SECOND, || forwarded("sh") == 20).await);
    for i in 0..6 {
        let name = format!("r{i}");
        assert!(
            eventually(15 * SECOND, || forwarded(&name) == 1).await,
            "{name}"
        );
    }
    let shared = (
        b0.stats.route("sh").forwarded,
        b1.stats.route("sh").forwarded,
    );
    assert_eq!(shared.0 + shared.1, 20);
    assert!(
        shared.0 > 0 && shared.1 > 0,
        "both instances take shared clients: {shared:?}"
    );
    b0.shutdown().await;
    b1.shutdown().await;
}

async fn loop_prevention(protocol: &str) {
    init_tracing();
    let local = Mosquitto::start(MosquittoOptions::default());
    let remote = Mosquitto::start(MosquittoOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let cfg = load(
        dir.path(),
        &bridge_yaml(
            protocol,
            &local.endpoint(),
            &remote.endpoint(),
            1,
            "    - {direction: local-to-remote, name: sync-out, source: \"sync/#\"}
    - {direction: remote-to-local, name: sync-in, source: \"sync/#\"}
",
        ),
    );
    let b = start(&cfg, &opts()).await;
    let at_remote = Collector::start(remote.port, "loop-remote", "sync/#", false).await;
    let at_local = Collector::start(local.port, "loop-local", "sync/#", false).await;
    let lp = Publisher::connect(local.port, "loop-lpub").await;
    let rp = Publisher::connect(remote.port, "loop-rpub").await;
    lp.publish("sync/a", 1, false, "from-local").await;
    rp.publish("sync/b", 1, false, "from-remote").await;
    assert_eq!(at_remote.wait_for(2, 10 * SECOND).await, 2);
    assert_eq!(at_local.wait_for(2, 10 * SECOND).await, 2);
    // Give a loop time to show itself.
    tokio::time::sleep(2 * SECOND).await;
    assert_eq!(at_remote.count(), 2, "remote: {:?}", at_remote.messages());
    assert_eq!(at_local.count(), 2, "local: {:?}", at_local.messages());
    assert_eq!(b.stats.route("sync-in").dropped(DropReason::Loop), 1);
    assert_eq!(b.stats.route("sync-out").dropped(DropReason::Loop), 1);
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opposite_routes_over_one_topic_do_not_ping_pong_on_mqtt_5() {
    loop_prevention("v5").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opposite_routes_over_one_topic_do_not_ping_pong_on_mqtt_3_1_1() {
    loop_prevention("v3").await;
}

/// The configuration of one MQTT 5 bridge with `routes` whose remote side is `remote`'s TLS
/// listener, trusted through the ConfigMap `remote-ca` and authenticated with a client
/// certificate (CN `mqttbridge`) from the Secret `bridge-client-cert`, both written into `dir`.
fn x509_config(
    dir: &Path,
    pki: &Pki,
    local: &Mosquitto,
    remote: &Mosquitto,
    routes: &str,
) -> Config {
    std::fs::create_dir_all(dir.join("configmaps/remote-ca")).unwrap();
    std::fs::copy(&pki.ca, dir.join("configmaps/remote-ca/ca.crt")).unwrap();
    pki.client_secret(&dir.join("secrets/bridge-client-cert"), "mqttbridge");
    let yaml = bridge_yaml(
        "v5",
        &local.endpoint(),
        &format!("localhost:{}", remote.tls_port.unwrap()),
        1,
        routes,
    )
    .replacen(
        "    tls:\n      tlsEnabled: false\n",
        "    tls:\n      tlsEnabled: true\n      trustedCaCertificateConfigMap: remote-ca\n    authentication:\n      x509:\n        secretName: bridge-client-cert\n",
        1,
    );
    load(dir, &yaml)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_client_certificate_and_intermediate_chain() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let local = Mosquitto::start(MosquittoOptions::default());
    let remote = Mosquitto::start(MosquittoOptions {
        tls: Some(pki.server_files()),
        ..Default::default()
    });
    let cfg = x509_config(
        dir.path(),
        &pki,
        &local,
        &remote,
        "    - {direction: local-to-remote, name: secure, source: \"secure/#\"}\n",
    );
    let b = start(&cfg, &opts()).await;
    let at_remote = Collector::start(remote.port, "tls-sub", "secure/#", false).await;
    let lp = Publisher::connect(local.port, "tls-pub").await;
    lp.publish("secure/x", 1, false, "over-tls").await;
    assert_eq!(at_remote.wait_for(1, 10 * SECOND).await, 1);
    assert_eq!(at_remote.messages()[0].payload, "over-tls");
    assert!(
        remote.log().contains("as edge-secure (p5") && remote.log().contains("u'mqttbridge'"),
        "the bridge connected over TLS with its client ID:\n{}",
        remote.log()
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_and_secure_websocket_transports() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let local = Mosquitto::start(MosquittoOptions {
        tls: Some(pki.server_files()),
        websockets: true,
        ..Default::default()
    });
    let remote = Mosquitto::start(MosquittoOptions {
        websockets: true,
        ..Default::default()
    });
    std::fs::create_dir_all(dir.path().join("configmaps/local-ca")).unwrap();
    std::fs::copy(&pki.ca, dir.path().join("configmaps/local-ca/ca.crt")).unwrap();
    // Remote over ws:// (plain), local over wss:// (TLS, trusting the test CA).
    let yaml = format!(
        "apiVersion: mq.iotoperations.azure.com/v1beta1
kind: MqttBridgeConnector
metadata:
  name: ws-bridge
spec:
  protocol: v5
  clientIdPrefix: edge-
  remoteBrokerConnection:
    endpoint: 127.0.0.1:{}
    protocol: webSocket
    tls:
      tlsEnabled: false
  localBrokerConnection:
    endpoint: localhost:{}
    protocol: webSocket
    tls:
      tlsEnabled: true
      trustedCaCertificateConfigMap: local-ca
---
apiVersion: mq.iotoperations.azure.com/v1beta1
kind: MqttBridgeTopicMap
metadata:
  name: ws-map
spec:
  mqttBridgeConnectorRef: ws-bridge
  routes:
    - {{direction: local-to-remote, name: up, source: \"ws/up/#\"}}
    - {{direction: remote-to-local, name: down, source: \"ws/down/#\"}}
",
        remote.ws_port.unwrap(),
        local.wss_port.unwrap()
    );
    let cfg = load(dir.path(), &yaml);
    assert_eq!(
        cfg.connectors[0].local.transport,
        config::Transport::WebSocket
    );
    assert!(cfg.connectors[0].local.tls.is_some(), "{yaml}");
    let b = start(&cfg, &opts()).await;
    let at_remote = Collector::start(remote.port, "ws-remote", "ws/#", false).await;
    let at_local = Collector::start(local.port, "ws-local", "ws/down/#", false).await;
    let lp = Publisher::connect(local.port, "ws-lpub").await;
    let rp = Publisher::connect(remote.port, "ws-rpub").await;
    for i in 0..20 {
        lp.publish("ws/up/x", 1, false, &format!("u{i}")).await;
        rp.publish("ws/down/y", 1, false, &format!("d{i}")).await;
    }
    assert_eq!(at_local.wait_for(20, 10 * SECOND).await, 20);
    assert!(
        eventually(10 * SECOND, || payloads_on(&at_remote, "ws/up/x").len()
            == 20)
        .await
    );
    let log = remote.log();
    assert!(log.contains("as edge-up (p5"), "{log}");
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn username_and_password_from_a_secret_folder() {
    init_tracing();
    let local = Mosquitto::start(MosquittoOptions::default());
    let remote = Mosquitto::start(MosquittoOptions {
        password: Some(("bridge-user".into(), "s3cret-pass".into())),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secrets/remote-login");
    std::fs::create_dir_all(&secret).unwrap();
    write_file(&secret, "username", "bridge-user\n");
    write_file(&secret, "password", "s3cret-pass\n");
    let yaml = bridge_yaml(
        "v3",
        &local.endpoint(),
        &remote.endpoint(),
        1,
        "    - {direction: local-to-remote, name: login, source: \"login/#\"}\n",
    )
    .replacen(
        "      tlsEnabled: false\n",
        "      tlsEnabled: false\n    authentication:\n      usernamePassword:\n        secretName: remote-login\n",
        1,
    );
    let cfg = load(dir.path(), &yaml);
    assert!(
        !format!("{cfg:?}").contains("s3cret-pass"),
        "the password is not part of the loaded configuration"
    );
    let b = start(&cfg, &opts()).await;
    let lp = Publisher::connect(local.port, "login-pub").await;
    lp.publish("login/x", 1, false, "authenticated").await;
    assert!(eventually(10 * SECOND, || b.stats.route("login").forwarded == 1).await);
    assert!(
        remote
            .log()
            .contains("as edge-login (p2, c1, k10, u'bridge-user')"),
        "{}",
        remote.log()
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_brokers_stand_in_for_both_sides() {
    init_tracing();
    let (lport, rport) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let cfg = load(
        dir.path(),
        &bridge_yaml(
            "v5",
            &format!("embedded://127.0.0.1:{lport}"),
            &format!("embedded://127.0.0.1:{rport}"),
            1,
            "    - {direction: local-to-remote, name: up, source: \"factory/#\"}
    - {direction: remote-to-local, name: down, source: \"command/#\", target: factory/commands}
",
        ),
    );
    let b = start(&cfg, &opts()).await;
    let at_remote = Collector::start(rport, "emb-remote", "factory/#", false).await;
    let at_local = Collector::start(lport, "emb-local", "factory/commands", false).await;
    let lp = Publisher::connect(lport, "emb-lpub").await;
    let rp = Publisher::connect(rport, "emb-rpub").await;
    for i in 0..50 {
        lp.publish("factory/telemetry", 1, false, &format!("t{i}"))
            .await;
    }
    rp.publish("command/stop", 1, false, "stop").await;
    assert_eq!(at_remote.wait_for(50, 10 * SECOND).await, 50);
    assert_eq!(at_local.wait_for(1, 10 * SECOND).await, 1);
    assert_eq!(at_local.messages()[0].payload, "stop");
    b.shutdown().await;
}

/// The no-loss test: thousands of QoS 1 messages while the remote broker is stopped and
/// restarted and the bridge itself crashes and restarts. Every message arrives; duplicates
/// are allowed and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_qos1_message_is_lost_across_remote_restart_and_bridge_crash() {
    init_tracing();
    let local = Mosquitto::start(MosquittoOptions::default());
    let remote = Mosquitto::start(MosquittoOptions {
        persistence: true,
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = v5_config(
        dir.path(),
        &local,
        &remote,
        "    - {direction: local-to-remote, name: noloss, source: \"noloss/#\", qos: 1}\n",
    );
    let b = start(&cfg, &opts()).await;
    let at_remote = Collector::start(remote.port, "noloss-sub", "noloss/#", true).await;
    let lp = Publisher::connect(local.port, "noloss-pub").await;
    let total = 4000usize;
    let publishing = tokio::spawn(async move {
        for i in 0..total {
            lp.publish(&format!("noloss/{}", i % 10), 1, false, &i.to_string())
                .await;
            if i % 5 == 4 {
                tokio::time::sleep(Duration::from_millis(8)).await;
            }
        }
        let acked = lp.wait_acked(total, 60 * SECOND).await;
        (lp, acked)
    });

    // Remote outage mid-stream.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let before_outage = at_remote.count();
    let remote = tokio::task::spawn_blocking(move || {
        let mut remote = remote;
        remote.stop();
        std::thread::sleep(Duration::from_millis(1500));
        remote.restart();
        remote
    })
    .await
    .unwrap();

    // Bridge crash mid-stream: connections dropped, nothing drained or acknowledged.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before_crash = at_remote.count();
    b.abort();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let b = bridge::start(&cfg, &opts()).await.expect("bridge restarts");

    let (_lp, acked) = publishing.await.unwrap();
    assert_eq!(acked, total, "the local broker accepted every message");
    let deadline = tokio::time::Instant::now() + 60 * SECOND;
    let mut distinct = 0;
    while tokio::time::Instant::now() < deadline {
        distinct = at_remote.distinct_and_duplicates().0.len();
        if distinct == total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (seen, dups) = at_remote.distinct_and_duplicates();
    let missing: Vec<usize> = (0..total)
        .filter(|i| !seen.contains_key(&i.to_string()))
        .take(20)
        .collect();
    println!(
        "no-loss: published {total}, received {} ({distinct} distinct, {dups} duplicates); \
         {before_outage} had arrived before the remote outage, {before_crash} before the bridge crash",
        at_remote.count()
    );
    assert!(
        before_outage > 0 && before_outage < total,
        "outage hit mid-stream"
    );
    assert!(before_crash < total, "crash hit mid-stream");
    assert!(missing.is_empty(), "lost messages, first ones: {missing:?}");
    b.shutdown().await;
    drop(remote);
}
