//! Criterion micro-benchmarks of the per-message work: topic matching and target mapping, the
//! PUBLISH encoder, and one plugin call for 64 B to 256 KiB payloads with the payload unchanged
//! (topic-template: a topic rewrite) and changed (enrich: a JSON envelope), and the delivery
//! ledger's record and settle of a forwarded copy.
//!
//! `cargo bench -p edgebridge-tests --bench micro` (`-- --quick` for a shorter run, or a name
//! filter such as `-- plugin_call`). Each group has a reference beside it in the same run.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use edgebridge::config::Direction;
use edgebridge::model::{Message, Props, QoS};
use edgebridge::mqtt::codec::{self, Version};
use edgebridge::plugin::stage::{RouteInfo, Stage};
use edgebridge::plugin::{Registry, Runtime};
use edgebridge::policy::Policy;
use edgebridge::topic;

fn message(size: usize) -> Message {
    // A JSON object of `size` bytes, so enrich can embed it as JSON.
    let mut p = String::from("{\"severity\":4,\"pad\":\"");
    while p.len() < size.saturating_sub(2) {
        p.push('x');
    }
    p.push_str("\"}");
    Message {
        topic: "factory/line3/telemetry/temperature".into(),
        payload: Bytes::from(p),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Props::default(),
    }
}

fn topics(c: &mut Criterion) {
    let mut g = c.benchmark_group("topic");
    let t = "factory/line3/telemetry/temperature/celsius";
    for (name, filter) in [
        ("exact", "factory/line3/telemetry/temperature/celsius"),
        ("plus", "factory/+/telemetry/+/celsius"),
        ("hash", "factory/#"),
        ("miss", "factory/+/alerts/#"),
    ] {
        g.bench_function(BenchmarkId::new("matches", name), |b| {
            b.iter(|| topic::matches(black_box(filter), black_box(t)))
        });
    }
    // Reference: comparing the two strings, the least any matcher does.
    g.bench_function(BenchmarkId::new("matches", "reference str eq"), |b| {
        b.iter(|| black_box("factory/line3/telemetry/temperature/celsius") == black_box(t))
    });
    // Target mapping of a route with a static target, as the pipe does it per message.
    let msg = message(64);
    g.bench_function("map to static target", |b| {
        b.iter(|| {
            let m = black_box(&msg).clone();
            Message {
                topic: black_box("site/alerts").into(),
                ..m
            }
        })
    });
    g.finish();
}

fn encoder(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode_publish");
    for size in [64usize, 4096] {
        let msg = message(size);
        g.throughput(Throughput::Elements(1));
        let mut buf = BytesMut::with_capacity(1 << 20);
        g.bench_function(BenchmarkId::new("v5", size), |b| {
            b.iter(|| {
                if buf.len() > 1 << 19 {
                    buf.clear();
                }
                codec::encode_publish(
                    Version::V5,
                    7,
                    false,
                    black_box(&msg),
                    &mut buf,
                    None,
                    Some(("edgebridge-via", "bench-0001")),
                )
                .unwrap()
            })
        });
        // Reference: copying the payload into the buffer, the least any encoder does.
        g.bench_function(BenchmarkId::new("reference copy", size), |b| {
            b.iter(|| {
                if buf.len() > 1 << 19 {
                    buf.clear();
                }
                buf.extend_from_slice(black_box(&msg.payload));
            })
        });
    }
    g.finish();
}

fn plugin_calls(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let runtime = Runtime::new().unwrap();
    let registry = Arc::new(Registry::default());
    let artifacts = std::path::Path::new(env!("EDGEBRIDGE_PLUGIN_ARTIFACTS"));
    for (name, file) in [
        ("topic-template", "topic_template.wasm"),
        ("enrich", "enrich.wasm"),
        ("pass-through", "pass_through.wasm"),
        ("pass-through-aggregator", "pass_through_aggregator.wasm"),
    ] {
        let path = artifacts.join(file);
        let bytes = std::fs::read(&path).unwrap();
        let mut policy = Policy::default_for(name);
        policy.max_payload = 1 << 24;
        policy.memory = 64 << 20;
        registry.install(runtime.load(name, &path, &bytes, policy).unwrap());
    }
    let route = || RouteInfo {
        name: "bench".into(),
        direction: Direction::LocalToRemote,
        source: "factory/+/telemetry/#".into(),
        qos: QoS::AtLeastOnce,
        target_namespace: "site".into(),
    };
    let mut g = c.benchmark_group("plugin_call");
    for size in [64usize, 1024, 16 * 1024, 256 * 1024] {
        let msg = message(size);
        for (label, plugin, config) in [
            (
                "unchanged payload (topic-template)",
                "topic-template",
                r#"{"template":"site/{2}/{4..}"}"#,
            ),
            (
                "changed payload (enrich envelope)",
                "enrich",
                r#"{"envelope":true}"#,
            ),
            ("pass-through 0.1 mapper", "pass-through", "{}"),
            (
                "pass-through 0.2 aggregator",
                "pass-through-aggregator",
                "{}",
            ),
        ] {
            let counters =
                std::sync::Arc::new(edgebridge::counters::PluginCounters::new(plugin, "bench"));
            let mut stage = Stage::new(
                runtime.clone(),
                registry.clone(),
                plugin,
                config,
                route(),
                counters,
            );
            rt.block_on(stage.decide(&msg, "site")).unwrap();
            g.bench_function(BenchmarkId::new(label, size), |b| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let t = Instant::now();
                        for _ in 0..iters {
                            black_box(stage.decide(black_box(&msg), "site").await.unwrap());
                        }
                        t.elapsed()
                    })
                })
            });
        }
        // Reference: what a route without plugins does per message (clone, new topic).
        g.bench_function(BenchmarkId::new("reference no plugin", size), |b| {
            b.iter(|| Message {
                topic: black_box("site/line3/temperature").into(),
                ..black_box(&msg).clone()
            })
        });
    }
    g.finish();
}

/// The delivery ledger's work per forwarded copy: record it, and settle the oldest of the 64
/// in flight, beside a hash map's insert and remove of a like record with the same hasher (the
/// structure the ledger kept its copies in before its ring), in the same run.
fn ledger(c: &mut Criterion) {
    use edgebridge::delivery::{Ledger, SeqHasher};
    use std::collections::HashMap;
    use std::hash::BuildHasherDefault;
    const IN_FLIGHT: u64 = 64;
    let now = Instant::now();
    let mut g = c.benchmark_group("ledger");
    g.throughput(Throughput::Elements(1));
    g.bench_function("forward and settle, 64 in flight", |b| {
        let mut l = Ledger::default();
        let mut oldest = l.forward_sized(&[4096], None, now).start;
        for _ in 1..IN_FLIGHT {
            l.forward_sized(&[4096], None, now);
        }
        b.iter(|| {
            black_box(l.forward_sized(black_box(&[4096]), None, now));
            black_box(l.settle(oldest));
            oldest += 1;
        })
    });
    g.bench_function("reference hash map insert and remove, 64 in flight", |b| {
        let mut m: HashMap<u64, (Option<u64>, Instant, usize), BuildHasherDefault<SeqHasher>> =
            HashMap::default();
        let mut next = 0u64;
        for _ in 0..IN_FLIGHT {
            next += 1;
            m.insert(next, (None, now, 4096));
        }
        b.iter(|| {
            next += 1;
            m.insert(black_box(next), (None, now, 4096));
            black_box(m.remove(&(next - IN_FLIGHT)));
        })
    });
    g.finish();
}

fn config() -> Criterion {
    let quick = std::env::args().any(|a| a == "--quick");
    let c = Criterion::default().configure_from_args();
    if quick {
        c.warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1))
            .sample_size(20)
    } else {
        c.warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3))
    }
}

criterion_group! {
    name = benches;
    config = config();
    targets = topics, encoder, plugin_calls, ledger
}
criterion_main!(benches);
