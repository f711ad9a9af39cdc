//! WebAssembly plugins end to end: real plugins built from `plugins/`, real Mosquitto brokers.

use std::time::Duration;

use edgebridge::bridge::{self, BridgeError, RunOptions, RunningBridge};
use edgebridge::config::{self, Config, LoadOptions};
use edgebridge::counters::DropReason;
use edgebridge_tests::{
    Collector, Mosquitto, MosquittoOptions, Publisher, bridge_yaml, eventually, init_tracing,
    install_plugin, write_file,
};

const SECOND: Duration = Duration::from_secs(1);

struct Setup {
    local: Mosquitto,
    remote: Mosquitto,
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        init_tracing();
        Setup {
            local: Mosquitto::start(MosquittoOptions::default()),
            remote: Mosquitto::start(MosquittoOptions::default()),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn plugins(&self) -> std::path::PathBuf {
        self.dir.path().join("plugins")
    }

    fn policies(&self) -> std::path::PathBuf {
        self.dir.path().join("policies")
    }

    fn opts(&self) -> RunOptions {
        RunOptions {
            backoff: (Duration::from_millis(50), Duration::from_millis(500)),
            drain_timeout: Duration::from_secs(3),
            plugins_dir: self.plugins(),
            policies_dir: self.policies(),
            reload_interval: Duration::from_millis(100),
            ..RunOptions::default()
        }
    }

    fn config(&self, routes: &str) -> Config {
        let yaml = bridge_yaml(
            "v5",
            &self.local.endpoint(),
            &self.remote.endpoint(),
            1,
            routes,
        );
        let path = write_file(self.dir.path(), "bridge.yaml", &yaml);
        config::load(&[path], &LoadOptions::default())
            .unwrap_or_else(|r| panic!("invalid test configuration:\n{r}"))
    }

    async fn start(&self, routes: &str) -> RunningBridge {
        let b = bridge::start(&self.config(routes), &self.opts())
            .await
            .unwrap_or_else(|e| panic!("bridge did not start: {e}"));
        assert!(
            b.wait_ready(10 * SECOND).await,
            "not ready: {:?}",
            b.stats.all()
        );
        b
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_filters_rewrites_and_enriches() {
    let s = Setup::new();
    for p in ["json-filter", "topic-template", "enrich"] {
        install_plugin(&s.plugins(), p, p);
    }
    let b = s
        .start(
            "    - direction: local-to-remote
      name: alerts
      source: factory/+/anomaly/#
      target: site
      plugins:
        - name: json-filter
          config: { field: severity, min: 3 }
        - name: topic-template
          config: { template: \"site/{2}/alerts/{4..}\" }
        - name: enrich
          config: { userProperties: { plant: \"7\" } }
",
        )
        .await;
    let at_remote = Collector::start(s.remote.port, "chain-sub", "#", false).await;
    let lp = Publisher::connect(s.local.port, "chain-pub").await;
    lp.publish(
        "factory/line3/anomaly/heat/high",
        1,
        false,
        r#"{"severity":4}"#,
    )
    .await;
    lp.publish(
        "factory/line3/anomaly/heat/low",
        1,
        false,
        r#"{"severity":1}"#,
    )
    .await;
    lp.publish(
        "factory/line9/anomaly/vibration",
        1,
        false,
        r#"{"severity":3}"#,
    )
    .await;
    assert!(eventually(10 * SECOND, || at_remote.count() >= 2).await);
    assert!(
        eventually(15 * SECOND, || b
            .stats
            .route("alerts")
            .dropped(DropReason::Filtered)
            == 1)
        .await
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got: Vec<(String, String)> = at_remote
        .messages()
        .into_iter()
        .map(|m| (m.topic, m.payload))
        .collect();
    assert_eq!(
        got,
        [
            (
                "site/line3/alerts/heat/high".to_string(),
                r#"{"severity":4}"#.to_string()
            ),
            (
                "site/line9/alerts/vibration".to_string(),
                r#"{"severity":3}"#.to_string()
            ),
        ]
    );
    let props = at_remote.messages()[0].properties.clone().unwrap();
    assert!(
        props
            .user_properties
            .contains(&("plant".to_string(), "7".to_string()))
    );
    assert_eq!(b.stats.route("alerts").forwarded, 2);
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_splits_arrays_and_dedupe_uses_granted_kv() {
    let s = Setup::new();
    install_plugin(&s.plugins(), "fan-out", "fan-out");
    install_plugin(&s.plugins(), "dedupe", "dedupe");
    write_file(
        &{
            std::fs::create_dir_all(s.policies()).unwrap();
            s.policies()
        },
        "dedupe.yaml",
        "apiVersion: edgebridge.dev/v1alpha1\nkind: PluginPolicy\nmetadata: {name: dedupe}\nspec:\n  imports: [log, clock, kv]\n  kv: {maxKeys: 100}\n",
    );
    let b = s
        .start(
            "    - direction: local-to-remote
      name: batches
      source: batch/in
      target: batch/out
      plugins:
        - name: fan-out
          config: { indexTopic: true }
    - direction: local-to-remote
      name: once
      source: dedupe/in
      plugins:
        - name: dedupe
          config: { windowSeconds: 60 }
",
        )
        .await;
    let at_remote = Collector::start(s.remote.port, "fan-sub", "#", false).await;
    let lp = Publisher::connect(s.local.port, "fan-pub").await;
    lp.publish("batch/in", 1, false, r#"[{"t":1},{"t":2},{"t":3}]"#)
        .await;
    for _ in 0..3 {
        lp.publish("dedupe/in", 1, false, "same").await;
    }
    lp.publish("dedupe/in", 1, false, "different").await;
    assert!(
        eventually(10 * SECOND, || at_remote.count() >= 5).await,
        "{:?}",
        at_remote.messages()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut got: Vec<(String, String)> = at_remote
        .messages()
        .into_iter()
        .map(|m| (m.topic, m.payload))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("batch/out/0".to_string(), r#"{"t":1}"#.to_string()),
            ("batch/out/1".to_string(), r#"{"t":2}"#.to_string()),
            ("batch/out/2".to_string(), r#"{"t":3}"#.to_string()),
            ("dedupe/in".to_string(), "different".to_string()),
            ("dedupe/in".to_string(), "same".to_string()),
        ]
    );
    assert_eq!(b.stats.route("once").dropped(DropReason::Filtered), 2);
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_plugins_are_contained_and_other_routes_keep_flowing() {
    let s = Setup::new();
    install_plugin(&s.plugins(), "misbehave", "misbehave");
    // A CPU budget that building the 10,000-message "bomb" fits in even on a loaded debug
    // build (so it is refused for maxEmit, not time; "spin" never ends and still traps), and a
    // breaker pause long enough that a slow machine cannot see it close before the last message.
    std::fs::create_dir_all(s.policies()).unwrap();
    std::fs::write(
        s.policies().join("misbehave.yaml"),
        "apiVersion: edgebridge.dev/v1alpha1\nkind: PluginPolicy\nmetadata: {name: misbehave}\nspec:\n  timePerMessage: 250ms\n  circuitBreaker: {failures: 5, pause: 120s}\n",
    )
    .unwrap();
    let b = s
        .start(
            "    - direction: local-to-remote
      name: risky
      source: risky/in
      target: risky/out
      plugins:
        - name: misbehave
      onPluginError: dead-letter
      deadLetterTopic: bridge/dead-letter
    - direction: local-to-remote
      name: plain
      source: plain/#
",
        )
        .await;
    let at_remote = Collector::start(s.remote.port, "risky-sub", "#", false).await;
    let lp = Publisher::connect(s.local.port, "risky-pub").await;
    // Failures never five in a row here, so the circuit breaker stays closed.
    let script = [
        "ok-1",
        "panic",
        "ok-2",
        "spin",
        "ok-3",
        "grow",
        "ok-4",
        "forbidden",
        "ok-5",
        "err",
        "ok-6",
        "bomb",
        "ok-7",
    ];
    for (i, p) in script.iter().enumerate() {
        lp.publish("risky/in", 1, false, p).await;
        lp.publish(&format!("plain/{i}"), 1, false, "plain").await;
    }
    let total = script.len() * 2;
    assert!(
        eventually(20 * SECOND, || at_remote.count() >= total).await,
        "{} of {total}: {:?}\n{:?}",
        at_remote.count(),
        at_remote
            .messages()
            .iter()
            .map(|m| (&m.topic, &m.payload))
            .collect::<Vec<_>>(),
        b.stats.all()
    );
    let msgs = at_remote.messages();
    let on = |t: &str| -> Vec<String> {
        msgs.iter()
            .filter(|m| m.topic == t)
            .map(|m| m.payload.clone())
            .collect()
    };
    assert_eq!(
        on("risky/out"),
        ["ok-1", "ok-2", "ok-3", "ok-4", "ok-5", "ok-6", "ok-7"]
    );
    assert_eq!(
        on("bridge/dead-letter"),
        ["panic", "spin", "grow", "forbidden", "err", "bomb"]
    );
    assert_eq!(
        msgs.iter()
            .filter(|m| m.topic.starts_with("plain/"))
            .count(),
        script.len()
    );
    for (payload, why) in [
        ("panic", "asked to panic"),
        ("spin", "time budget exceeded"),
        ("grow", "memory limit"),
        ("forbidden", "outside what its policy allows"),
        ("err", "asked to fail"),
        ("bomb", "maxEmit"),
    ] {
        let reason = reason_of(&at_remote, payload);
        assert!(reason.contains(why), "{payload}: {reason}");
    }
    let c = b.stats.route("risky");
    assert_eq!(
        (c.plugin_errors, c.dropped(DropReason::DeadLettered)),
        (6, 6)
    );

    // Five failures in a row open the breaker: the next message is not given to the plugin.
    for _ in 0..5 {
        lp.publish("risky/in", 1, false, "err").await;
    }
    lp.publish("risky/in", 1, false, "ok-8").await;
    assert!(
        eventually(10 * SECOND, || b
            .stats
            .route("risky")
            .dropped(DropReason::DeadLettered)
            == 12)
        .await
    );
    assert!(eventually(15 * SECOND, || !reason_of(&at_remote, "ok-8").is_empty()).await);
    assert!(reason_of(&at_remote, "ok-8").contains("circuit breaker open"));
    b.shutdown().await;
}

fn reason_of(c: &Collector, payload: &str) -> String {
    c.messages()
        .into_iter()
        .find(|m| m.topic == "bridge/dead-letter" && m.payload == payload)
        .and_then(|m| m.properties)
        .and_then(|p| {
            p.user_properties
                .into_iter()
                .find(|(k, _)| k == "edgebridge-error")
        })
        .map(|(_, v)| v)
        .unwrap_or_default()
}

async fn start_error(s: &Setup, plugin_file: &str) -> String {
    let routes = format!(
        "    - direction: local-to-remote\n      name: r\n      source: a/#\n      plugins:\n        - name: {plugin_file}\n"
    );
    match bridge::start(&s.config(&routes), &s.opts()).await {
        Ok(_) => panic!("the bridge started with {plugin_file}"),
        Err(e @ BridgeError::Plugins(_)) => e.to_string(),
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_plugins_get_clear_errors_at_start() {
    let s = Setup::new();
    install_plugin(&s.plugins(), "kv-user", "kv-user");
    install_plugin(&s.plugins(), "wrong-world", "wrong-world");
    std::fs::write(
        s.plugins().join("corrupt.wasm"),
        b"\0asm\x0d\0\x01\0garbage",
    )
    .unwrap();
    install_plugin(&s.plugins(), "misbehave", "picky");

    let e = start_error(&s, "kv-user").await;
    assert!(
        e.contains(
            "kv-user.wasm: imports edgebridge:plugin/kv@0.1.0, which its policy does not grant"
        ),
        "{e}"
    );
    let e = start_error(&s, "wrong-world").await;
    assert!(
        e.contains("wrong-world.wasm: exports none of edgebridge:plugin/mapper@0.1.0, edgebridge:plugin/filter@0.1.0 or edgebridge:plugin/aggregator@0.2.0"),
        "{e}"
    );
    assert!(e.contains("wasi:cli/run"), "{e}");
    let e = start_error(&s, "corrupt").await;
    assert!(
        e.contains("corrupt.wasm: not a valid WebAssembly component"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "one line: {e}");
    std::fs::write(s.plugins().join("text.wasm"), b"#!/bin/sh\necho hi\n").unwrap();
    let e = start_error(&s, "text").await;
    assert!(
        e.contains("text.wasm: not a valid WebAssembly component: not WebAssembly: it starts with \"#!/bin/sh.echo h\""),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "one line: {e}");
    // A config the plugin's init refuses.
    let routes = "    - direction: local-to-remote\n      name: r\n      source: a/#\n      plugins:\n        - name: picky\n          config: {failInit: true}\n";
    let e = match bridge::start(&s.config(routes), &s.opts()).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("started"),
    };
    assert!(
        e.contains("plugin \"picky\" on route \"r\": invalid config: failInit is set"),
        "{e}"
    );
    // A policy pinning another sha256.
    std::fs::create_dir_all(s.policies()).unwrap();
    write_file(
        &s.policies(),
        "picky.yaml",
        &format!(
            "apiVersion: edgebridge.dev/v1alpha1\nkind: PluginPolicy\nmetadata: {{name: picky}}\nspec:\n  sha256: {}\n",
            "0".repeat(64)
        ),
    );
    let e = start_error(&s, "picky").await;
    assert!(
        e.contains("does not match the policy's pinned sha256"),
        "{e}"
    );
}

/// Replaces, corrupts and removes a plugin file while QoS 1 traffic flows: nothing is lost,
/// the new version takes over without a restart, broken files leave it running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_under_traffic_loses_nothing() {
    let s = Setup::new();
    install_plugin(&s.plugins(), "enrich", "stamp");
    let b = s
        .start(
            "    - direction: local-to-remote
      name: stamped
      source: hot/in
      target: hot/out
      plugins:
        - name: stamp
          config: { userProperties: { version: \"one\" } }
",
        )
        .await;
    let v1 = b.plugins.current("stamp").unwrap();
    let at_remote = Collector::start(s.remote.port, "hot-sub", "hot/out", false).await;
    let lp = Publisher::connect(s.local.port, "hot-pub").await;
    let plugins_dir = s.plugins();
    // Publish until told to stop (bounded: at most 20,000 messages / 60 s).
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let publishing = tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + 60 * SECOND;
        let mut sent = 0usize;
        while !*stop_rx.borrow_and_update()
            && sent < 20_000
            && tokio::time::Instant::now() < deadline
        {
            lp.publish("hot/in", 1, false, &sent.to_string()).await;
            sent += 1;
            if sent.is_multiple_of(10) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        (lp, sent)
    });
    assert!(eventually(10 * SECOND, || at_remote.count() > 100).await);
    // Version 2: another component under the same name (it accepts the config and passes).
    install_plugin(&plugins_dir, "misbehave", "stamp");
    assert!(
        eventually(30 * SECOND, || b.plugins.current("stamp").unwrap().version
            != v1.version)
        .await,
        "new version loaded"
    );
    let v2 = b.plugins.current("stamp").unwrap();
    // Broken replacements keep version 2 running.
    std::fs::write(plugins_dir.join(".stamp.tmp"), b"not wasm").unwrap();
    std::fs::rename(
        plugins_dir.join(".stamp.tmp"),
        plugins_dir.join("stamp.wasm"),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    install_plugin(&plugins_dir, "wrong-world", "stamp");
    tokio::time::sleep(Duration::from_millis(400)).await;
    install_plugin(&plugins_dir, "kv-user", "stamp");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        b.plugins.current("stamp").unwrap().sha256,
        v2.sha256,
        "broken files do not replace the running version"
    );
    let seen = at_remote.count();
    assert!(
        eventually(10 * SECOND, || at_remote.count() > seen + 100).await,
        "traffic goes on"
    );
    stop_tx.send(true).unwrap();
    let (_lp, total) = publishing.await.unwrap();
    assert!(
        eventually(20 * SECOND, || at_remote.distinct_and_duplicates().0.len()
            == total)
        .await,
        "received {} distinct of {total}; {:?}",
        at_remote.distinct_and_duplicates().0.len(),
        b.stats.all()
    );
    let msgs = at_remote.messages();
    let stamped = |m: &edgebridge_tests::Received| {
        m.properties.as_ref().is_some_and(|p| {
            p.user_properties
                .iter()
                .any(|(k, v)| k == "version" && v == "one")
        })
    };
    let first_unstamped = msgs
        .iter()
        .position(|m| !stamped(m))
        .expect("version 2 handled some");
    assert!(first_unstamped > 0, "version 1 handled the first messages");
    assert!(
        msgs[first_unstamped..].iter().all(|m| !stamped(m)),
        "no message went back to version 1"
    );
    assert_eq!(b.stats.route("stamped").plugin_errors, 0);
    println!(
        "hot reload: {total} published, {} received, version 1 handled {first_unstamped}, version {} the rest",
        msgs.len(),
        v2.version
    );
    b.shutdown().await;
}

/// A route whose plugin is not in the folder starts anyway and waits for it: it reads nothing
/// from its source meanwhile (QoS 1 messages wait in the source broker), says so in its
/// counters, and forwards everything once the plugin is dropped in. Removing the plugin again
/// makes it wait again: nothing is dropped (the default `onPluginError: drop` is for plugin
/// failures, not for a plugin that is not there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_waits_for_a_missing_plugin_and_loses_nothing() {
    let s = Setup::new();
    std::fs::create_dir_all(s.plugins()).unwrap();
    let b = bridge::start(
        &s.config(
            "    - direction: local-to-remote
      name: renamed
      source: rm/in
      target: rm
      plugins:
        - name: rename
          config: { template: \"rm/renamed\" }
    - {direction: local-to-remote, name: plain, source: \"plain/#\"}
",
        ),
        &s.opts(),
    )
    .await
    .expect("a missing plugin does not stop the bridge");
    assert!(b.wait_ready(10 * SECOND).await);
    let at_remote = Collector::start(s.remote.port, "rm-sub", "#", false).await;
    let lp = Publisher::connect(s.local.port, "rm-pub").await;
    for i in 0..5 {
        lp.publish("rm/in", 1, false, &format!("early-{i}")).await;
    }
    lp.publish("plain/x", 1, false, "plain").await;
    assert!(
        eventually(10 * SECOND, || at_remote.count() == 1).await,
        "other routes flow"
    );
    let renamed = || {
        b.stats
            .clients()
            .into_iter()
            .find(|c| c.route == "renamed")
            .unwrap()
    };
    assert!(
        eventually(10 * SECOND, || renamed()
            .waiting_for_plugin
            .lock()
            .unwrap()
            .as_deref()
            == Some("rename"))
        .await
    );
    tokio::time::sleep(SECOND).await;
    assert_eq!(
        at_remote.count(),
        1,
        "nothing of the waiting route went anywhere"
    );
    install_plugin(&s.plugins(), "topic-template", "rename");
    assert!(
        eventually(15 * SECOND, || at_remote.count() == 6).await,
        "{:?}",
        at_remote.messages()
    );
    assert!(renamed().waiting_for_plugin.lock().unwrap().is_none());
    // Removed: the route waits again; back: what was published meanwhile crosses.
    std::fs::remove_file(s.plugins().join("rename.wasm")).unwrap();
    assert!(eventually(15 * SECOND, || b.plugins.current("rename").is_none()).await);
    for i in 0..5 {
        lp.publish("rm/in", 1, false, &format!("late-{i}")).await;
    }
    assert!(
        eventually(10 * SECOND, || renamed()
            .waiting_for_plugin
            .lock()
            .unwrap()
            .is_some())
        .await
    );
    install_plugin(&s.plugins(), "topic-template", "rename");
    assert!(eventually(15 * SECOND, || at_remote.count() == 11).await);
    let got: Vec<(String, String)> = at_remote
        .messages()
        .into_iter()
        .filter(|m| m.topic != "plain/x")
        .map(|m| (m.topic, m.payload))
        .collect();
    let want: Vec<(String, String)> = (0..5)
        .map(|i| format!("early-{i}"))
        .chain((0..5).map(|i| format!("late-{i}")))
        .map(|p| ("rm/renamed".to_string(), p))
        .collect();
    assert_eq!(got, want, "in order, none lost, none dropped");
    let c = b.stats.route("renamed");
    assert_eq!(c.dropped(DropReason::PluginError), 0);
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugins_example_loads_with_the_shipped_policies() {
    let dir = tempfile::tempdir().unwrap();
    for p in [
        "json-filter",
        "topic-template",
        "enrich",
        "fan-out",
        "dedupe",
    ] {
        install_plugin(dir.path(), p, p);
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cfg = config::load(
        &[root.join("examples/plugins.yaml")],
        &LoadOptions::default(),
    )
    .unwrap();
    let loaded = bridge::load_plugins(&cfg, dir.path(), &root.join("policies"))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .expect("routes use plugins");
    assert_eq!(loaded.registry.list().len(), 5);
    // Without the shipped policies, dedupe's kv import is refused.
    let e = match bridge::load_plugins(&cfg, dir.path(), &dir.path().join("none")).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("dedupe loaded without its kv grant"),
    };
    assert!(
        e.contains("dedupe.wasm: imports edgebridge:plugin/kv@0.1.0"),
        "{e}"
    );
}

/// Runs the `observe` fixture once under `policy` (a fresh instance) on `payload`; returns
/// what it reported, or the error.
async fn observe(policy: edgebridge::policy::Policy, payload: &str) -> Result<String, String> {
    use edgebridge::plugin::stage::{Outcome, RouteInfo, Stage};
    use edgebridge::plugin::{Registry, Runtime};
    let file = edgebridge_tests::plugin_wasm("observe");
    let bytes = std::fs::read(&file).unwrap();
    let runtime = Runtime::new().unwrap();
    let loaded = runtime.load("observe", &file, &bytes, policy).unwrap();
    let registry = std::sync::Arc::new(Registry::default());
    registry.install(loaded);
    let route = RouteInfo {
        name: "r".into(),
        direction: edgebridge::config::Direction::LocalToRemote,
        source: "o/#".into(),
        qos: edgebridge::model::QoS::AtLeastOnce,
        target_namespace: "o/#".into(),
    };
    let counters = std::sync::Arc::new(edgebridge::counters::PluginCounters::new("observe", "r"));
    let mut stage = Stage::new(runtime, registry, "observe", "{}", route, counters);
    let msg = edgebridge::model::Message {
        topic: "o/x".into(),
        payload: bytes::Bytes::from(payload.to_string()),
        qos: edgebridge::model::QoS::AtLeastOnce,
        retain: false,
        properties: Default::default(),
    };
    match stage.decide(&msg, "o/x").await {
        Ok(Outcome::Emit(list)) => Ok(String::from_utf8_lossy(&list[0].payload).into_owned()),
        Ok(other) => Err(format!("{other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// What a plugin may observe of the host through WASI is a policy grant: without
/// `wasi-clocks` the wall clock reads 1970, the monotonic clock does not move and a 30 s sleep
/// returns at once; without `wasi-random` random numbers are the same in every instance.
/// Granted, each is real — and a sleep is still bounded by the call's wall-clock backstop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wasi_sandbox_gives_time_and_randomness_only_when_granted() {
    use edgebridge::policy::{Import, Policy};
    let denied = Policy::default_for("observe");
    let mut granted = Policy::default_for("observe");
    granted
        .imports
        .extend([Import::WasiClocks, Import::WasiRandom]);

    assert_eq!(observe(denied.clone(), "wall").await.unwrap(), "0");
    assert_eq!(observe(denied.clone(), "mono").await.unwrap(), "0");
    let r1 = observe(denied.clone(), "random").await.unwrap();
    let r2 = observe(denied.clone(), "random").await.unwrap();
    assert_eq!(r1, r2, "a fixed sequence, the same in every instance");
    let started = std::time::Instant::now();
    assert_eq!(observe(denied.clone(), "sleep").await.unwrap(), "slept");
    // (Bounds with room for a loaded CI machine: the plugin asks for 30 s.)
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a denied sleep returns at once: {:?}",
        started.elapsed()
    );

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let wall: u64 = observe(granted.clone(), "wall")
        .await
        .unwrap()
        .parse()
        .unwrap();
    assert!(wall.abs_diff(now) < 60, "the real time: {wall} vs {now}");
    let mono: u64 = observe(granted.clone(), "mono")
        .await
        .unwrap()
        .parse()
        .unwrap();
    assert!(mono > 0, "the real monotonic clock moves");
    let g1 = observe(granted.clone(), "random").await.unwrap();
    let g2 = observe(granted.clone(), "random").await.unwrap();
    assert_ne!(g1, g2, "real random numbers");
    // Granted sleeping waits, but not past the backstop (100 x 10 ms, at least 2 s).
    let started = std::time::Instant::now();
    let e = observe(granted, "sleep").await.unwrap_err();
    let took = started.elapsed();
    assert!(
        e.contains("time budget exceeded") && e.contains("wall-clock backstop"),
        "{e}"
    );
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "{took:?}"
    );
    println!(
        "sandbox: denied sleep returned at once; granted 30 s sleep stopped after {took:?}: {e}"
    );
}

/// A plugin that logs 1,000 lines of 10 KB per message (it wrote 168 MB of log for 300
/// messages before): its policy's log rate holds, the rest is dropped and counted, and the
/// messages go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_floods_its_log_is_held_to_its_policys_rate() {
    let s = Setup::new();
    install_plugin(&s.plugins(), "misbehave", "misbehave");
    std::fs::create_dir_all(s.policies()).unwrap();
    std::fs::write(
        s.policies().join("misbehave.yaml"),
        "apiVersion: edgebridge.dev/v1alpha1\nkind: PluginPolicy\nmetadata: {name: misbehave}\nspec:\n  timePerMessage: 250ms\n  log: {linesPerSecond: 5, maxLineBytes: 100}\n",
    )
    .unwrap();
    let b = s
        .start(
            "    - direction: local-to-remote
      name: loud
      source: loud/#
      plugins:
        - name: misbehave
",
        )
        .await;
    let at_remote = Collector::start(s.remote.port, "loud-sub", "loud/#", false).await;
    let lp = Publisher::connect(s.local.port, "loud-pub").await;
    let n = 20;
    for _ in 0..n {
        lp.publish("loud/x", 1, false, "flood").await;
    }
    assert!(eventually(20 * SECOND, || at_remote.count() >= n).await);
    let counters = b.stats.plugin("misbehave", "loud");
    let dropped = counters
        .log_dropped
        .load(std::sync::atomic::Ordering::Relaxed);
    println!("20 messages x 1,000 log lines: {dropped} lines dropped");
    // 20,000 lines written; at 5 a second (a burst of 5) over the few seconds this took, at
    // most a few dozen were kept.
    assert!(dropped >= 19_900, "dropped {dropped}");
    b.shutdown().await;
}
