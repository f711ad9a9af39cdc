//! Operating a running bridge: `/metrics`, `/healthz`, `/readyz`, `/status` against real
//! Mosquitto brokers, and live configuration reload under QoS 1 traffic.

use std::path::Path;
use std::time::Duration;

use edgebridge::bridge::{self, ConfigSource, RunOptions};
use edgebridge::config::{self, LoadOptions};
use edgebridge_tests::faults::AckedPublisher;
use edgebridge_tests::{
    Collector, Mosquitto, MosquittoOptions, bridge_yaml, eventually, free_port, init_tracing,
};

const SECOND: Duration = Duration::from_secs(1);

async fn get(port: u16, path: &str) -> (u16, String) {
    let r = edgebridge::http_client::get(
        &format!("http://127.0.0.1:{port}{path}"),
        &[],
        5 * SECOND,
        16 << 20,
    )
    .await
    .unwrap_or_else(|e| panic!("{path}: {}", edgebridge::error::chain(&e)));
    (r.status, String::from_utf8_lossy(&r.body).into_owned())
}

/// The value of the sample `name{labels}` in a Prometheus text exposition.
fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A bridge run by [`bridge::run`] (as the binary runs it) on its own task, stopped on drop
/// of the sender.
fn run_in_background(
    cfg: config::Config,
    source: Option<ConfigSource>,
    opts: RunOptions,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), bridge::BridgeError>>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        bridge::run(&cfg, source.as_ref(), &opts, async {
            let _ = stopped.await;
        })
        .await
    });
    (stop, task)
}

fn write_atomically(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// `/metrics` counts what was sent; `/healthz` is forward progress (a route with messages in
/// flight and no acknowledgement past the stall timeout fails it, and it recovers); `/readyz`
/// lists the sessions that are not connected; `/status` is the same picture as JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_readiness_and_status_tell_the_truth() {
    init_tracing();
    let local = Mosquitto::start(MosquittoOptions::default());
    let mut remote = Mosquitto::start(MosquittoOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bridge.yaml");
    std::fs::write(
        &path,
        bridge_yaml(
            "v5",
            &local.endpoint(),
            &remote.endpoint(),
            1,
            "    - {direction: local-to-remote, name: up, source: \"m/#\"}\n",
        ),
    )
    .unwrap();
    let cfg = config::load(std::slice::from_ref(&path), &LoadOptions::default()).unwrap();
    let port = free_port();
    let opts = RunOptions {
        http: Some(format!("127.0.0.1:{port}").parse().unwrap()),
        stall_timeout: 2 * SECOND,
        backoff: (Duration::from_millis(50), Duration::from_millis(500)),
        drain_timeout: 2 * SECOND,
        ..RunOptions::default()
    };
    let (stop, task) = run_in_background(cfg, None, opts);
    assert!(
        eventually(15 * SECOND, || std::net::TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_ok())
        .await
    );
    let mut ready = (0, String::new());
    for _ in 0..100 {
        ready = get(port, "/readyz").await;
        if ready.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready, (200, "ready\n".into()));
    let at_remote = Collector::start(remote.port, "m-sub", "m/#", false).await;
    let publisher = AckedPublisher::start(local.port, "m-pub");
    let n = 500u64;
    for seq in 0..n {
        publisher.publish("m/t", seq, None);
    }
    assert_eq!(
        publisher.wait_acked(n as usize, 20 * SECOND).await,
        n as usize
    );
    assert_eq!(
        at_remote.wait_for(n as usize, 20 * SECOND).await,
        n as usize
    );
    let labels = "{route=\"up\",direction=\"local-to-remote\"}";
    let mut text = String::new();
    for _ in 0..100 {
        text = get(port, "/metrics").await.1;
        if sample(
            &text,
            &format!("edgebridge_messages_forwarded_total{labels}"),
        ) == Some(n as f64)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = |name: &str| sample(&text, &format!("{name}{labels}"));
    assert_eq!(
        m("edgebridge_messages_received_total"),
        Some(n as f64),
        "{text}"
    );
    assert_eq!(
        m("edgebridge_messages_forwarded_total"),
        Some(n as f64),
        "{text}"
    );
    assert_eq!(m("edgebridge_messages_in_flight"), Some(0.0));
    assert_eq!(
        m("edgebridge_forward_latency_seconds_count"),
        Some(n as f64)
    );
    for side in ["local", "remote"] {
        let s = format!(
            "edgebridge_session_connected{{route=\"up\",side=\"{side}\",client_id=\"edge-up\"}}"
        );
        assert_eq!(sample(&text, &s), Some(1.0), "{s}\n{text}");
    }
    assert!(text.contains("edgebridge_build_info{version=\""), "{text}");
    assert!(text.ends_with("# EOF\n"), "OpenMetrics text");
    assert_eq!(get(port, "/healthz").await, (200, "ok\n".into()));
    let status: serde_json::Value = serde_json::from_str(&get(port, "/status").await.1).unwrap();
    let client = &status["route_clients"][0];
    assert_eq!(client["route"], "up");
    assert_eq!(client["forwarded"], n);
    assert_eq!(client["source"]["state"], "connected");

    // The remote goes away while messages wait: not ready at once, not live after the stall
    // timeout, both again once it is back.
    let sent = tokio::task::spawn_blocking(move || {
        remote.stop();
        remote
    })
    .await
    .unwrap();
    remote = sent;
    for seq in n..n + 20 {
        publisher.publish("m/t", seq, None);
    }
    let (code, body) = get(port, "/readyz").await;
    let mut not_ready = (code, body);
    for _ in 0..50 {
        if not_ready.0 == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        not_ready = get(port, "/readyz").await;
    }
    assert_eq!(not_ready.0, 503);
    assert!(
        not_ready
            .1
            .contains("route \"up\" client edge-up target (remote)"),
        "{}",
        not_ready.1
    );
    let mut health = get(port, "/healthz").await;
    for _ in 0..100 {
        if health.0 == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        health = get(port, "/healthz").await;
    }
    assert_eq!(health.0, 503, "{}", health.1);
    assert!(
        health.1.contains("route \"up\"") && health.1.contains("none acknowledged"),
        "{}",
        health.1
    );
    println!("healthz while the remote is down: {}", health.1.trim());
    let remote = tokio::task::spawn_blocking(move || {
        remote.restart();
        remote
    })
    .await
    .unwrap();
    let mut back = get(port, "/healthz").await;
    for _ in 0..150 {
        if back.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        back = get(port, "/healthz").await;
    }
    assert_eq!(back, (200, "ok\n".into()));
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    drop(remote);
}

const CONNECTOR: &str = "apiVersion: mq.iotoperations.azure.com/v1beta1
kind: MqttBridgeConnector
metadata:
  name: test-bridge
spec:
  protocol: v5
  clientIdPrefix: edge-
  remoteBrokerConnection:
    endpoint: \"REMOTE\"
    tls:
      tlsEnabled: false
  localBrokerConnection:
    endpoint: \"LOCAL\"
    tls:
      tlsEnabled: false
";

fn topic_map(routes: &str) -> String {
    format!(
        "apiVersion: mq.iotoperations.azure.com/v1beta1
kind: MqttBridgeTopicMap
metadata:
  name: test-map
spec:
  mqttBridgeConnectorRef: test-bridge
  routes:
{routes}"
    )
}

/// Under QoS 1 traffic on an unchanged route: a route is added, another changed, a third
/// removed (by editing the topic-map file, as an editor or a ConfigMap update does), then the
/// file is broken. The unchanged route loses nothing and its client never reconnects (each
/// broker's log shows one CONNECT for it); the new route forwards within seconds; the changed
/// one forwards from its new source; the removed one stops; the broken edit is refused and
/// counted, and everything goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_reload_changes_only_what_changed() {
    init_tracing();
    let local = Mosquitto::start(MosquittoOptions::default());
    let remote = Mosquitto::start(MosquittoOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("conf");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(
        conf.join("connector.yaml"),
        CONNECTOR
            .replace("REMOTE", &remote.endpoint())
            .replace("LOCAL", &local.endpoint()),
    )
    .unwrap();
    let routes_before = "    - {direction: local-to-remote, name: keep, source: \"keep/#\"}
    - {direction: local-to-remote, name: change, source: \"old/#\"}
    - {direction: local-to-remote, name: remove, source: \"gone/#\"}
";
    write_atomically(&conf, "routes.yaml", &topic_map(routes_before));
    let source = ConfigSource {
        files: vec![conf.clone()],
        load: LoadOptions::default(),
    };
    let cfg = config::load(&source.files, &source.load).unwrap();
    let port = free_port();
    let opts = RunOptions {
        http: Some(format!("127.0.0.1:{port}").parse().unwrap()),
        backoff: (Duration::from_millis(50), Duration::from_millis(500)),
        drain_timeout: 2 * SECOND,
        ..RunOptions::default()
    };
    let (stop, task) = run_in_background(cfg, Some(source), opts);
    let at_remote = Collector::start(remote.port, "rl-sub", "#", false).await;
    assert!(
        eventually(15 * SECOND, || std::net::TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_ok())
        .await
    );
    let status = || async {
        serde_json::from_str::<serde_json::Value>(&get(port, "/status").await.1).unwrap()
    };
    for _ in 0..100 {
        if status().await["ready"] == true {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Steady QoS 1 traffic on the unchanged route for the whole test.
    let publisher = AckedPublisher::start(local.port, "rl-pub");
    let (done_tx, mut done_rx) = tokio::sync::watch::channel(false);
    let p = &publisher;
    let traffic = async move {
        let mut seq = 0u64;
        while !*done_rx.borrow_and_update() && seq < 20_000 {
            p.publish("keep/t", seq, None);
            seq += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        seq
    };
    let edits = async {
        tokio::time::sleep(SECOND).await;
        let other = AckedPublisher::start(local.port, "rl-other");
        write_atomically(
            &conf,
            "routes.yaml",
            &topic_map(
                "    - {direction: local-to-remote, name: keep, source: \"keep/#\"}
    - {direction: local-to-remote, name: change, source: \"new/#\"}
    - {direction: local-to-remote, name: added, source: \"added/#\"}
",
            ),
        );
        let started = std::time::Instant::now();
        let mut applied = false;
        for _ in 0..100 {
            let s = status().await;
            if s["config"]["reloads_ok"] == 1 && s["ready"] == true {
                applied = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(applied, "{:#}", status().await);
        other.publish("added/x", 1_000_000, None);
        other.publish("new/x", 1_000_001, None);
        other.publish("old/x", 1_000_002, None);
        other.publish("gone/x", 1_000_003, None);
        let arrived = |topic: &str| at_remote.messages().iter().any(|m| m.topic == topic);
        assert!(eventually(10 * SECOND, || arrived("added/x") && arrived("new/x")).await);
        let took = started.elapsed();
        let s = status().await;
        println!(
            "reload applied and the new route forwarded {took:?} after the edit: {}",
            s["config"]["last_reload"]["summary"]
        );
        // A broken edit changes nothing.
        write_atomically(
            &conf,
            "routes.yaml",
            &topic_map(
                "    - {direction: local-to-remote, name: keep, source: \"keep/#\", qos: 7}\n",
            ),
        );
        let mut refused = serde_json::Value::Null;
        for _ in 0..100 {
            refused = status().await;
            if refused["config"]["reloads_failed"] == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(refused["config"]["reloads_failed"], 1, "{refused:#}");
        let errors = refused["config"]["last_reload"]["errors"].to_string();
        assert!(
            errors.contains("routes.yaml:") && errors.contains("spec.routes[0].qos"),
            "{errors}"
        );
        assert_eq!(
            refused["route_clients"].as_array().unwrap().len(),
            3,
            "still running"
        );
        other.publish("added/x", 1_000_004, None);
        assert!(
            eventually(10 * SECOND, || {
                at_remote
                    .messages()
                    .iter()
                    .filter(|m| m.topic == "added/x")
                    .count()
                    == 2
            })
            .await
        );
        tokio::time::sleep(SECOND).await;
        assert!(
            !arrived("old/x") && !arrived("gone/x"),
            "old routes stopped"
        );
        let (_, metrics) = get(port, "/metrics").await;
        assert!(
            metrics.contains("edgebridge_config_reloads_total{result=\"failed\"} 1"),
            "{}",
            metrics
                .lines()
                .filter(|l| l.contains("reload"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        done_tx.send(true).unwrap();
    };
    let (sent, ()) = tokio::join!(traffic, edits);
    assert_eq!(
        publisher.wait_acked(sent as usize, 20 * SECOND).await,
        sent as usize
    );
    let got = |seq: u64| {
        at_remote
            .messages()
            .iter()
            .any(|m| m.topic == "keep/t" && m.payload == seq.to_string())
    };
    assert!(
        eventually(20 * SECOND, || (0..sent).all(got)).await,
        "the unchanged route lost nothing"
    );
    let connects = |log: String| {
        log.lines()
            .filter(|l| l.contains("New client connected") && l.contains(" as edge-keep "))
            .count()
    };
    println!(
        "reload under traffic: {sent} messages on the unchanged route, all received; its client connected {} time(s) to the local and {} to the remote broker",
        connects(local.log()),
        connects(remote.log())
    );
    assert_eq!(connects(local.log()), 1, "{}", local.log());
    assert_eq!(connects(remote.log()), 1, "{}", remote.log());
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}
