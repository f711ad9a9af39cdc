//! Kubernetes as the configuration source, through the real binary (`edgebridge run
//! --kubernetes`) against the test harness's stand-in API server (`tests/src/kube.rs`: the
//! API's wire protocol for these resources; no Kubernetes API server can run on these
//! machines) and real Mosquitto brokers.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use edgebridge_tests::kube::StandIn;
use edgebridge_tests::{Collector, Mosquitto, MosquittoOptions, Publisher, eventually, free_port};
use serde_json::{Value, json};

const SECOND: Duration = Duration::from_secs(1);
const API: &str = "mq.iotoperations.azure.com/v1beta1";
const NS: &str = "factory";

async fn status(port: u16) -> Option<Value> {
    let r = edgebridge::http_client::get(
        &format!("http://127.0.0.1:{port}/status"),
        &[],
        5 * SECOND,
        16 << 20,
    )
    .await
    .ok()?;
    serde_json::from_slice(&r.body).ok()
}

/// The route clients in `/status` by route name: (client id, source reconnects, ready).
async fn clients(port: u16) -> Vec<(String, u64, bool)> {
    let Some(s) = status(port).await else {
        return Vec::new();
    };
    s["route_clients"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|c| {
            (
                c["route"].as_str().unwrap_or("").to_string(),
                c["source"]["reconnects"].as_u64().unwrap_or(0),
                c["source"]["state"] == "connected" && c["target"]["state"] == "connected",
            )
        })
        .collect()
}

/// Polls `check` (async) every 100 ms until it holds or `limit` passes.
async fn until<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < end {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    check().await
}

fn connector(name: &str, remote: &str, local: &str) -> Value {
    // The source documents' MqttBridgeConnector, with the test brokers' addresses.
    json!({
        "apiVersion": API, "kind": "MqttBridgeConnector",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "image": {"repository": "mcr.microsoft.com/azureiotoperations/mqttbridge", "tag": "0.1.0-preview", "pullPolicy": "IfNotPresent"},
            "protocol": "v5", "bridgeInstances": 1, "clientIdPrefix": format!("{name}-"), "logLevel": "debug",
            "remoteBrokerConnection": {"endpoint": remote, "tls": {"tlsEnabled": false}},
            "localBrokerConnection": {"endpoint": local, "tls": {"tlsEnabled": false}}
        }
    })
}

fn topic_map(name: &str, connector: &str, routes: Value) -> Value {
    json!({
        "apiVersion": API, "kind": "MqttBridgeTopicMap",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"mqttBridgeConnectorRef": connector, "routes": routes}
    })
}

fn routes(b_source: &str) -> Value {
    json!([
        {"direction": "local-to-remote", "name": "a", "qos": 1, "source": "ka/#"},
        {"direction": "local-to-remote", "name": "b", "qos": 1, "source": b_source}
    ])
}

fn condition(obj: &Value, kind: &str) -> Value {
    obj["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == kind).cloned())
        .unwrap_or(Value::Null)
}

struct Bridge(Child);

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Apply → messages cross and the status says Ready; edit a route → only it restarts; a
/// broken resource → Degraded with the field named while the rest runs; 410 Gone and an API
/// server restart → the watch resumes; delete → the routes stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_resources_run_report_their_status_and_follow_every_change() {
    let bin = edgebridge_tests::bridge_binary();
    let local = Mosquitto::start(MosquittoOptions::default());
    let remote = Mosquitto::start(MosquittoOptions::default());
    let mut api = StandIn::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig(NS)).unwrap();
    let http = free_port();
    let log = dir.path().join("bridge.log");
    let _bridge = Bridge(
        Command::new(&bin)
            .args(["run", "--kubernetes", "--max-backoff", "1"])
            .arg("--http")
            .arg(format!("127.0.0.1:{http}"))
            .env("KUBECONFIG", &kubeconfig)
            .env("HOME", dir.path())
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env("RUST_LOG", "info,kube=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    // Nothing applied yet: it runs nothing, healthy.
    assert!(
        until(15 * SECOND, || async { status(http).await.is_some() }).await,
        "{}",
        read_log()
    );
    // kubectl apply.
    api.apply(connector("edge", &remote.endpoint(), &local.endpoint()));
    api.apply(topic_map("edge-map", "edge", routes("kb/#")));
    assert!(
        until(15 * SECOND, || async {
            let c = clients(http).await;
            c.len() == 2 && c.iter().all(|x| x.2)
        })
        .await,
        "{:?}\n{}",
        status(http).await,
        read_log()
    );
    let at_remote = Collector::start(remote.port, "k-sub", "#", false).await;
    let lp = Publisher::connect(local.port, "k-pub").await;
    lp.publish("ka/1", 1, false, "a1").await;
    lp.publish("kb/1", 1, false, "b1").await;
    assert_eq!(at_remote.wait_for(2, 10 * SECOND).await, 2);
    // The status: Ready, both routes forwarding, the generation observed.
    assert!(
        until(10 * SECOND, || async {
            api.get(API, "MqttBridgeConnector", NS, "edge")
                .is_some_and(|o| {
                    condition(&o, "Ready")["status"] == "True"
                        && o["status"]["readyRoutes"] == "2/2"
                })
        })
        .await,
        "{:?}",
        api.get(API, "MqttBridgeConnector", NS, "edge")
    );
    let edge = api.get(API, "MqttBridgeConnector", NS, "edge").unwrap();
    assert_eq!(edge["status"]["observedGeneration"], 1);
    assert_eq!(condition(&edge, "Degraded")["status"], "False");
    assert_eq!(edge["status"]["routes"][0]["instance"], 0);
    let map = api.get(API, "MqttBridgeTopicMap", NS, "edge-map").unwrap();
    assert_eq!(condition(&map, "Ready")["status"], "True", "{map}");
    // After the `n`th edit of route b's source: the bridge applied it as a restart of route
    // b alone (within `limit`), every route forwards again, and a message on `topic` is the
    // `total`th to arrive.
    let route_b_moved = async |n: usize, limit: Duration, topic: &str, total: usize| {
        assert!(
            until(limit, || async {
                let log = read_log();
                log.contains(
                    "Configuration applied: started none; restarted edge-b; stopped none; 1 unchanged",
                ) && log.matches("restarted edge-b").count() >= n
            })
            .await,
            "{}",
            read_log()
        );
        assert!(
            until(10 * SECOND, || async {
                clients(http).await.iter().all(|x| x.2)
            })
            .await
        );
        lp.publish(topic, 1, false, "moved").await;
        assert_eq!(at_remote.wait_for(total, 10 * SECOND).await, total);
    };
    // Edit route b: it restarts on its new source, route a is untouched.
    api.apply(topic_map("edge-map", "edge", routes("kc/#")));
    route_b_moved(1, 10 * SECOND, "kc/1", 3).await;
    let a = clients(http)
        .await
        .into_iter()
        .find(|c| c.0 == "a")
        .unwrap();
    assert_eq!(a.1, 0, "route a never reconnected");
    // A broken connector: Degraded with the field named; the running one keeps forwarding.
    api.apply(connector("broken", "no-port-here", &local.endpoint()));
    assert!(
        until(10 * SECOND, || async {
            api.get(API, "MqttBridgeConnector", NS, "broken")
                .is_some_and(|o| {
                    condition(&o, "Degraded")["status"] == "True"
                        && condition(&o, "Degraded")["message"]
                            .as_str()
                            .unwrap_or("")
                            .contains("spec.remoteBrokerConnection.endpoint")
                })
        })
        .await,
        "{:?}",
        api.get(API, "MqttBridgeConnector", NS, "broken")
    );
    lp.publish("ka/2", 1, false, "a2").await;
    assert_eq!(at_remote.wait_for(4, 10 * SECOND).await, 4);
    // Every watch expires (410 Gone): the bridge lists again and sees the next change.
    api.expire_watches();
    tokio::time::sleep(SECOND).await;
    api.apply(topic_map("edge-map", "edge", routes("kd/#")));
    route_b_moved(2, 15 * SECOND, "kd/1", 5).await;
    // The API server restarts: the watch resumes.
    api.stop();
    tokio::time::sleep(2 * SECOND).await;
    api.restart().await;
    api.apply(topic_map("edge-map", "edge", routes("ke/#")));
    route_b_moved(3, 30 * SECOND, "ke/1", 6).await;
    // kubectl delete: the routes stop.
    api.delete(API, "MqttBridgeTopicMap", NS, "edge-map");
    assert!(
        until(15 * SECOND, || async { clients(http).await.is_empty() }).await,
        "{:?}",
        clients(http).await
    );
    // The wire protocol as the stand-in saw it.
    let requests = api.requests();
    assert!(
        requests.iter().any(|(m, p, _)| m == "GET"
            && p.contains("watch=true")
            && p.contains("allowWatchBookmarks=true")),
        "{requests:?}"
    );
    assert!(requests.iter().any(|(m, p, c)| m == "PATCH"
        && p.ends_with("/status?")
        && c == "application/merge-patch+json"));
    for (group, version) in edgebridge::kubernetes::GROUP_VERSIONS {
        assert!(
            requests.iter().any(|(_, p, _)| p.starts_with(&format!(
                "/apis/{group}/{version}/namespaces/{NS}/mqttbridgeconnectors"
            ))),
            "{group}/{version} watched"
        );
    }
    assert!(eventually(SECOND, || !read_log().contains("panicked")).await);
}
