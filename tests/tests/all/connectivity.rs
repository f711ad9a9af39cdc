//! Reaching the cloud side: an HTTP CONNECT proxy (a real tinyproxy) for TLS, WebSocket and
//! the environment's `HTTPS_PROXY`, a proxy's refusals as named errors, and failover between
//! several remote addresses (real Mosquitto brokers going down and up).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use edgebridge::bridge::{self, RunOptions, RunningBridge};
use edgebridge::config::Config;
use edgebridge::counters::SessionCounters;
use edgebridge_tests::proxy::{ProxyOptions, Tinyproxy};
use edgebridge_tests::{
    Collector, Mosquitto, MosquittoOptions, Pki, Publisher, bridge_yaml, connector_yaml,
    eventually, init_tracing, write_file,
};

const SECOND: Duration = Duration::from_secs(1);

fn opts() -> RunOptions {
    RunOptions {
        backoff: (Duration::from_millis(50), Duration::from_millis(400)),
        drain_timeout: Duration::from_secs(3),
        keep_alive: Duration::from_secs(10),
        ..RunOptions::default()
    }
}

fn load(dir: &Path, yaml: &str) -> Config {
    edgebridge_tests::load_config(dir, yaml)
}

/// The remote session of the route client of route `route`.
fn remote_session(b: &RunningBridge, route: &str) -> std::sync::Arc<SessionCounters> {
    b.stats
        .clients()
        .into_iter()
        .find(|c| c.route == route)
        .map(|c| c.target.clone())
        .expect("the route runs")
}

fn proxy_login(dir: &Path) {
    let s = dir.join("secrets/proxy-login");
    std::fs::create_dir_all(&s).unwrap();
    std::fs::write(s.join("username"), "bridge\n").unwrap();
    std::fs::write(s.join("password"), "pr0xy-pass\n").unwrap();
}

/// TLS to the remote through a proxy with basic authentication: the handshake runs inside
/// the tunnel and is verified against the broker's name (`localhost`, the only name of its
/// certificate), not the proxy's address (127.0.0.1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_remote_goes_through_an_http_proxy_with_basic_authentication() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::with_server(&dir.path().join("pki"), &["localhost"], false);
    let local = Mosquitto::start(MosquittoOptions::default());
    let remote = Mosquitto::start(MosquittoOptions {
        tls: Some(pki.server_files()),
        ..Default::default()
    });
    let tls_port = remote.tls_port.unwrap();
    let proxy = Tinyproxy::start(ProxyOptions {
        login: Some(("bridge".into(), "pr0xy-pass".into())),
        connect_ports: vec![tls_port],
    });
    std::fs::create_dir_all(dir.path().join("configmaps/remote-ca")).unwrap();
    std::fs::copy(&pki.ca, dir.path().join("configmaps/remote-ca/ca.crt")).unwrap();
    pki.client_secret(&dir.path().join("secrets/bridge-client-cert"), "mqttbridge");
    proxy_login(dir.path());
    let yaml = bridge_yaml(
        "v5",
        &local.endpoint(),
        &format!("localhost:{tls_port}"),
        1,
        "    - {direction: local-to-remote, name: up, source: \"px/#\"}\n",
    )
    .replacen(
        "    tls:\n      tlsEnabled: false\n",
        &format!(
            "    tls:\n      tlsEnabled: true\n      trustedCaCertificateConfigMap: remote-ca\n    authentication:\n      x509:\n        secretName: bridge-client-cert\n    proxy:\n      url: {}\n      secretName: proxy-login\n",
            proxy.url()
        ),
        1,
    );
    let cfg = load(dir.path(), &yaml);
    let b = bridge::start(&cfg, &opts()).await.unwrap();
    assert!(b.wait_ready(10 * SECOND).await, "{:?}", b.stats.all());
    let at_remote = Collector::start(remote.port, "px-sub", "px/#", false).await;
    let lp = Publisher::connect(local.port, "px-pub").await;
    for i in 0..20 {
        lp.publish("px/t", 1, false, &i.to_string()).await;
    }
    assert_eq!(at_remote.wait_for(20, 10 * SECOND).await, 20);
    let log = proxy.log();
    assert!(
        log.contains(&format!("localhost:{tls_port}")) || log.contains("CONNECT"),
        "the connection went through the proxy:\n{log}"
    );
    let link = remote_session(&b, "up").link_info();
    assert_eq!(link.address, format!("localhost:{tls_port}"));
    assert_eq!(link.proxy, Some(format!("127.0.0.1:{}", proxy.port)));
    b.shutdown().await;
}

/// WebSocket through the proxy (no TLS), and a proxy that refuses: no credentials (407),
/// wrong ones (tinyproxy answers 401),
/// a port it does not allow (403), a broker it cannot reach (500): each a named error, the
/// session retrying with backoff, the bridge running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_through_the_proxy_and_the_proxys_refusals_are_named() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let local = Mosquitto::start(MosquittoOptions::default());
    let remote = Mosquitto::start(MosquittoOptions {
        websockets: true,
        ..Default::default()
    });
    let ws_port = remote.ws_port.unwrap();
    let closed = edgebridge_tests::free_port();
    let proxy = Tinyproxy::start(ProxyOptions {
        login: Some(("bridge".into(), "pr0xy-pass".into())),
        connect_ports: vec![ws_port, closed],
    });
    proxy_login(dir.path());
    let wrong = dir.path().join("secrets/wrong-login");
    std::fs::create_dir_all(&wrong).unwrap();
    std::fs::write(wrong.join("username"), "bridge").unwrap();
    std::fs::write(wrong.join("password"), "nope").unwrap();
    // Four connectors: a good one over WebSocket, and three the proxy refuses.
    let connector = |name: &str, endpoint: &str, secret: &str| {
        let secret = if secret.is_empty() {
            String::new()
        } else {
            format!("      secretName: {secret}\n")
        };
        connector_yaml(
            "v5",
            1,
            (&local.endpoint(), ""),
            (
                endpoint,
                &format!(
                    "    protocol: webSocket\n    proxy:\n      url: {}\n{secret}",
                    proxy.url()
                ),
            ),
            &format!("    - {{direction: local-to-remote, name: {name}, source: \"{name}/#\"}}\n"),
        )
        .replace("name: test-bridge", &format!("name: {name}-bridge"))
        .replace(
            "mqttBridgeConnectorRef: test-bridge",
            &format!("mqttBridgeConnectorRef: {name}-bridge"),
        )
        .replace("name: test-map", &format!("name: {name}-map"))
        .replace("clientIdPrefix: edge-", &format!("clientIdPrefix: {name}-"))
    };
    let yaml = [
        connector("ws", &format!("127.0.0.1:{ws_port}"), "proxy-login"),
        connector("denied", &format!("127.0.0.1:{ws_port}"), "wrong-login"),
        connector("anonymous", &format!("127.0.0.1:{ws_port}"), ""),
        connector("forbidden", "127.0.0.1:1", "proxy-login"),
        connector("unreachable", &format!("127.0.0.1:{closed}"), "proxy-login"),
    ]
    .join("---\n");
    let cfg = load(dir.path(), &yaml);
    let b = bridge::start(&cfg, &opts()).await.unwrap();
    let at_remote = Collector::start(remote.port, "ws-sub", "ws/#", false).await;
    let lp = Publisher::connect(local.port, "ws-pub").await;
    assert!(
        eventually(10 * SECOND, || remote_session(&b, "ws").connected()).await,
        "{:?}",
        remote_session(&b, "ws").last_error()
    );
    lp.publish("ws/t", 1, false, "through the tunnel").await;
    assert_eq!(at_remote.wait_for(1, 10 * SECOND).await, 1);
    for (route, want) in [
        ("denied", "401"),
        ("anonymous", "407"),
        ("forbidden", "403"),
        ("unreachable", "500"),
    ] {
        let s = remote_session(&b, route);
        assert!(
            eventually(10 * SECOND, || s.failures.load(Ordering::Relaxed) >= 3).await,
            "{route}: retries with backoff"
        );
        let (error, _) = s.last_error().unwrap();
        println!("{route}: {error}");
        assert!(
            error.contains(&format!(
                "HTTP proxy 127.0.0.1:{} answered {want}",
                proxy.port
            )),
            "{route}: {error}"
        );
        assert!(!s.connected());
    }
    let (denied, _) = remote_session(&b, "denied").last_error().unwrap();
    assert!(denied.contains("proxy.secretName"), "{denied}");
    let (anonymous, _) = remote_session(&b, "anonymous").last_error().unwrap();
    assert!(anonymous.contains("proxy.secretName"), "{anonymous}");
    assert!(
        !denied.contains("nope"),
        "the password never prints: {denied}"
    );
    b.shutdown().await;
}

/// The real binary with `HTTPS_PROXY` in its environment: a remote without `proxy` goes
/// through it (the broker's name is resolved by the proxy, never by the bridge: a name that
/// does not resolve is the proxy's 500), and `NO_PROXY` naming the domain takes it out.
/// (Loopback remotes never use the environment's proxy, as in Go's net/http.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environments_proxy_and_no_proxy_apply_to_the_remote() {
    let bin = edgebridge_tests::bridge_binary();
    let dir = tempfile::tempdir().unwrap();
    let local = Mosquitto::start(MosquittoOptions::default());
    let proxy = Tinyproxy::start(ProxyOptions::default());
    let yaml = bridge_yaml(
        "v5",
        &local.endpoint(),
        "broker.invalid:8883",
        1,
        "    - {direction: local-to-remote, name: up, source: \"env/#\"}\n",
    )
    .replacen(
        "    tls:\n      tlsEnabled: false\n",
        "    tls:\n      tlsEnabled: true\n",
        1,
    );
    let config = write_file(dir.path(), "bridge.yaml", &yaml);
    let run = |no_proxy: Option<&str>, name: &str| {
        let log = dir.path().join(name);
        let mut cmd = std::process::Command::new(&bin);
        cmd.arg("run")
            .arg("-f")
            .arg(&config)
            .arg("--max-backoff")
            .arg("1")
            .env("HTTPS_PROXY", proxy.url())
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(v) = no_proxy {
            cmd.env("NO_PROXY", v);
        }
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + 15 * SECOND;
        let mut text = String::new();
        while Instant::now() < deadline {
            text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.matches("Connection failed").count() >= 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        text
    };
    let through = run(None, "with-proxy.log");
    assert!(
        through.contains(&format!("HTTP proxy 127.0.0.1:{} answered 500", proxy.port))
            && through.contains("CONNECT broker.invalid:8883"),
        "{through}"
    );
    assert!(proxy.log().contains("broker.invalid"), "{}", proxy.log());
    let direct = run(Some("localhost,.invalid"), "no-proxy.log");
    assert!(
        direct.contains("cannot connect to broker.invalid:8883") && !direct.contains("HTTP proxy"),
        "{direct}"
    );
}

/// Failover, priority mode (as Mosquitto's `round_robin false`): the primary goes down, the
/// bridge goes to the second address; the primary comes back, the bridge returns to it within
/// the check interval. QoS 1 traffic throughout: nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_goes_to_the_next_address_and_back_to_the_primary() {
    failover("priority").await;
}

/// Round-robin: after the first address fails the bridge stays on the second, even when the
/// first is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_failover_stays_on_the_address_that_works() {
    failover("round-robin").await;
}

async fn failover(mode: &str) {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let local = Mosquitto::start(MosquittoOptions::default());
    let persistent = || {
        Mosquitto::start(MosquittoOptions {
            persistence: true,
            ..Default::default()
        })
    };
    let (mut primary, secondary) = (persistent(), persistent());
    let yaml = connector_yaml(
        "v5",
        1,
        (&local.endpoint(), ""),
        (
            &primary.endpoint(),
            &format!(
                "    failoverEndpoints: [\"{}\"]\n    failoverMode: {mode}\n    primaryCheckInterval: 1s\n",
                secondary.endpoint()
            ),
        ),
        "    - {direction: local-to-remote, name: up, source: \"fo/#\", qos: 1}\n",
    );
    let cfg = load(dir.path(), &yaml);
    let b = bridge::start(&cfg, &opts()).await.unwrap();
    assert!(b.wait_ready(10 * SECOND).await);
    let session = remote_session(&b, "up");
    assert_eq!(session.link_info().address, primary.endpoint());
    let at_primary = Collector::start(primary.port, "fo-sub-a", "fo/#", true).await;
    let at_secondary = Collector::start(secondary.port, "fo-sub-b", "fo/#", true).await;
    let lp = Publisher::connect(local.port, "fo-pub").await;
    let mut sent = 0usize;
    let mut publish = async |n: usize| {
        for _ in 0..n {
            lp.publish("fo/t", 1, false, &sent.to_string()).await;
            sent += 1;
            if sent.is_multiple_of(10) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    publish(100).await;
    primary.stop();
    let moved = Instant::now();
    publish(100).await;
    let connected_to =
        |address: String| session.connected() && session.link_info().address == address;
    assert!(
        eventually(10 * SECOND, || connected_to(secondary.endpoint())).await,
        "moved to the second address: {:?}",
        session.link_info()
    );
    println!(
        "{mode}: on the second address {:?} after the primary stopped",
        moved.elapsed()
    );
    publish(100).await;
    primary.restart();
    let back = Instant::now();
    publish(100).await;
    if mode == "priority" {
        assert!(
            eventually(10 * SECOND, || connected_to(primary.endpoint())).await,
            "back on the primary: {:?}",
            session.link_info()
        );
        println!(
            "{mode}: back on the primary {:?} after it restarted",
            back.elapsed()
        );
    } else {
        tokio::time::sleep(3 * SECOND).await;
        assert_eq!(session.link_info().address, secondary.endpoint());
    }
    publish(100).await;
    let total = sent;
    let arrived = || {
        let mut all = at_primary.distinct_and_duplicates().0;
        for (k, v) in at_secondary.distinct_and_duplicates().0 {
            *all.entry(k).or_default() += v;
        }
        all
    };
    assert!(
        eventually(20 * SECOND, || arrived().len() == total).await,
        "{} of {total} arrived",
        arrived().len()
    );
    println!(
        "{mode}: {total} sent, {} distinct arrived ({} at the primary, {} at the second address)",
        arrived().len(),
        at_primary.distinct_and_duplicates().0.len(),
        at_secondary.distinct_and_duplicates().0.len()
    );
    assert!(at_secondary.distinct_and_duplicates().0.len() >= 100);
    b.shutdown().await;
}
