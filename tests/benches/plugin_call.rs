//! Cost of one plugin call in the production engine, side by side with the route's work
//! without a plugin, in the same run. `cargo bench -p edgebridge-tests --bench plugin_call`
//! (`-- --quick` for fewer iterations). Prints medians per payload size and the ratio.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use edgebridge::config::Direction;
use edgebridge::model::{Message, Properties, QoS};
use edgebridge::plugin::stage::{RouteInfo, Stage};
use edgebridge::plugin::{Registry, Runtime};
use edgebridge::policy::Policy;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn route() -> RouteInfo {
    RouteInfo {
        name: "bench".into(),
        direction: Direction::LocalToRemote,
        source: "factory/+/telemetry/#".into(),
        qos: QoS::AtLeastOnce,
        target_namespace: "site".into(),
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (rounds, per_round) = if quick { (5, 2_000) } else { (15, 10_000) };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let runtime = Runtime::new().unwrap();
        let registry = Arc::new(Registry::default());
        let artifacts = std::path::Path::new(env!("EDGEBRIDGE_PLUGIN_ARTIFACTS"));
        for (name, file) in [
            ("topic-template", "topic_template.wasm"),
            ("enrich", "enrich.wasm"),
            ("json-filter", "json_filter.wasm"),
        ] {
            let path = artifacts.join(file);
            let bytes = std::fs::read(&path).unwrap();
            let mut policy = Policy::default_for(name);
            policy.max_payload = 1 << 24;
            let t = Instant::now();
            let loaded = runtime.load(name, &path, &bytes, policy).unwrap();
            println!(
                "compile {name}: {:.1} ms ({} KB)",
                t.elapsed().as_secs_f64() * 1e3,
                bytes.len() / 1024
            );
            registry.install(loaded);
        }
        println!();
        println!("| payload | plugin | no plugin (reference) | plugin call | ratio |");
        println!("| --- | --- | --- | --- | --- |");
        for size in [100usize, 10 * 1024] {
            let payload = {
                let mut p = String::from("{\"severity\":4,\"pad\":\"");
                while p.len() < size - 2 {
                    p.push('x');
                }
                p.push_str("\"}");
                Bytes::from(p)
            };
            let msg = Message {
                topic: "factory/line3/telemetry/temperature".into(),
                payload,
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: Properties::default(),
            };
            for (plugin, config) in [
                ("topic-template", r#"{"template":"site/{2}/{4..}"}"#),
                ("json-filter", r#"{"field":"severity","min":3}"#),
                ("enrich", r#"{"userProperties":{"plant":"7"}}"#),
            ] {
                let mut stage =
                    Stage::new(runtime.clone(), registry.clone(), plugin, config, route());
                stage.run(&msg, "site").await.unwrap();
                let mut with_plugin = Vec::new();
                let mut reference = Vec::new();
                for _ in 0..rounds {
                    let t = Instant::now();
                    for _ in 0..per_round {
                        std::hint::black_box(stage.run(&msg, "site").await.unwrap());
                    }
                    with_plugin.push(t.elapsed() / per_round);
                    // Reference: what a route without plugins does per message before publishing.
                    let t = Instant::now();
                    for _ in 0..per_round {
                        let out = Message {
                            topic: std::hint::black_box("site/line3/temperature").to_string(),
                            ..msg.clone()
                        };
                        std::hint::black_box(out);
                    }
                    reference.push(t.elapsed() / per_round);
                }
                let (p, r) = (median(with_plugin), median(reference));
                println!(
                    "| {size} B | {plugin} | {:.3} µs | {:.2} µs | {:.0}x |",
                    r.as_secs_f64() * 1e6,
                    p.as_secs_f64() * 1e6,
                    p.as_secs_f64() / r.as_secs_f64().max(1e-12)
                );
            }
        }
    });
}
