//! End-to-end benchmark: edgebridge beside Mosquitto's own bridge, in one run, on loopback.
//!
//! `bash bench/run` (builds the release binary, then runs this). Cases, in turns:
//! (a) publish and subscribe on one broker (baseline, no bridge); (b) Mosquitto's built-in
//! bridge; (c) edgebridge, one same-topic route; (d) the same through one plugin
//! (topic-template); (e) through two (topic-template, json-filter); (f) edgebridge with its
//! `/metrics` and `/status` scraped every second. Sections: publishers at QoS 0 through bridges
//! configured for QoS 1 (as users configure them), QoS 1 through QoS 1, QoS 0 through QoS 0,
//! each at 64 B and 4 KiB: throughput (first publish to last receive, loss and duplicates),
//! latency p50/p99 at a fixed rate, and the bridge process's peak RSS and CPU seconds per
//! million messages. Each case repeats; medians are printed with ratios against (a) and (b),
//! and the lowest and highest of each turn's ratio against (b) in the same turn.
//! `-- --quick` for fewer messages and repeats; `--only p1r1-64` and `--cases bc` pick sections
//! and cases (letters a-l; (k) is (c) with the build in `BENCH_OTHER_BIN`, to compare two
//! builds in one run; (l) is (c) with `--scheduling batch`), `--n 200000` sets the message
//! count, `--repeats 6` the repeats (every other one runs the cases in reverse order),
//! `--soak 600` runs the memory soak, `--scale` the 1,000-route and 10-route runs. Bounded:
//! every wait has a timeout.

use std::collections::HashSet;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgebridge::config::parse::parse_endpoint;
use edgebridge::model::{Message, Props, QoS};
use edgebridge::mqtt::session::{self, SessionEvent, SessionOptions};
use edgebridge::mqtt::{LinkOptions, StateEvent, SubFilter, Version};
use edgebridge_tests::{Mosquitto, MosquittoOptions, free_port, install_plugin};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Case {
    Baseline,
    MosquittoBridge,
    Edgebridge,
    OnePlugin,
    TwoPlugins,
    Metrics,
    Spooled,
    PassV1,
    PassV2,
    Embedded,
    OtherBuild,
    Batch,
}

impl Case {
    fn label(self) -> &'static str {
        match self {
            Case::Baseline => "(a) same broker",
            Case::MosquittoBridge => "(b) mosquitto bridge",
            Case::Edgebridge => "(c) edgebridge",
            Case::OnePlugin => "(d) edgebridge + 1 plugin",
            Case::TwoPlugins => "(e) edgebridge + 2 plugins",
            Case::Metrics => "(f) edgebridge, /metrics scraped every second",
            Case::Spooled => "(g) edgebridge with a spool (--spool-dir, sync: always)",
            Case::PassV1 => "(h) edgebridge + a pass-through 0.1 mapper",
            Case::PassV2 => "(i) edgebridge + a pass-through 0.2 aggregator",
            Case::Embedded => "(j) edgebridge's embedded broker as the local one",
            Case::OtherBuild => "(k) as (c), the build in BENCH_OTHER_BIN",
            Case::Batch => "(l) as (c), --scheduling batch",
        }
    }
}

/// CPU seconds of a process so far (`/proc/PID/stat`, every thread) and the part of them
/// spent in the kernel.
#[derive(Default, Clone, Copy, Debug)]
struct Usage {
    cpu_s: f64,
    sys_s: f64,
}

/// A process's system calls per message, counted by [`count_syscalls`] in a run of their own:
/// the socket reads, the socket writes, every system call (`raw_syscalls:sys_enter`: the reads
/// and writes, and the polling around them), and its context switches (each a sleep and a
/// wake-up, or a preemption).
#[derive(Default, Clone, Copy, Debug)]
struct Calls {
    reads: f64,
    writes: f64,
    all: f64,
    switches: f64,
}

fn usage(pid: u32) -> Usage {
    let (user, kernel) = cpu_seconds(pid);
    Usage {
        cpu_s: user + kernel,
        sys_s: kernel,
    }
}

/// System calls that read a socket and that write one.
const READ_CALLS: [&str; 4] = ["read", "readv", "recvfrom", "recvmsg"];
const WRITE_CALLS: [&str; 4] = ["write", "writev", "sendto", "sendmsg"];

/// `perf stat -e EVENTS -p PID` running beside one process until stopped; `None` where perf
/// is not available.
struct PerfStat {
    perf: Child,
    out: std::path::PathBuf,
}

impl PerfStat {
    fn start(pid: u32, events: &[String]) -> Option<PerfStat> {
        if pid == 0 {
            return None;
        }
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let out =
            std::env::temp_dir().join(format!("bench-perf-{}-{pid}-{n}.csv", std::process::id()));
        let perf = Command::new("perf")
            .args([
                "stat",
                "-x",
                ",",
                "-e",
                &events.join(","),
                "-p",
                &pid.to_string(),
                "-o",
            ])
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        Some(PerfStat { perf, out })
    }

    /// Stops counting; (event, count) for every event perf counted.
    fn stop(mut self) -> Vec<(String, u64)> {
        let _ = Command::new("kill")
            .args(["-INT", &self.perf.id().to_string()])
            .status();
        let _ = self.perf.wait();
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        let _ = std::fs::remove_file(&self.out);
        text.lines()
            .filter_map(|line| {
                let cols: Vec<&str> = line.split(',').collect();
                let count = cols.first()?.trim().parse::<u64>().ok()?;
                Some((cols.get(2)?.trim().to_string(), count))
            })
            .collect()
    }
}

/// The socket reads and writes, all system calls and the context switches of one process
/// (syscall tracepoints and perf's software counter).
fn count_syscalls(pid: u32) -> Option<PerfStat> {
    let events: Vec<String> = READ_CALLS
        .iter()
        .chain(WRITE_CALLS.iter())
        .map(|c| format!("syscalls:sys_enter_{c}"))
        .chain(["raw_syscalls:sys_enter".into(), "context-switches".into()])
        .collect();
    PerfStat::start(pid, &events)
}

/// The [`Calls`] per message of what [`count_syscalls`] counted over `messages`.
fn syscalls(counted: Vec<(String, u64)>, messages: u64) -> Calls {
    let mut calls = Calls::default();
    for (event, count) in counted {
        let count = count as f64 / messages.max(1) as f64;
        match event.as_str() {
            "raw_syscalls:sys_enter" => calls.all += count,
            "context-switches" => calls.switches += count,
            _ => {
                let call = event.trim_start_matches("syscalls:sys_enter_");
                if READ_CALLS.contains(&call) {
                    calls.reads += count;
                } else if WRITE_CALLS.contains(&call) {
                    calls.writes += count;
                }
            }
        }
    }
    calls
}

/// The libc the bridge links (glibc's path on Debian).
const LIBC: &str = "/usr/lib/x86_64-linux-gnu/libc.so.6";
const ALLOC_CALLS: [&str; 3] = ["malloc", "calloc", "realloc"];

/// Heap allocations of one process counted with uprobes on libc's `malloc`, `calloc` and
/// `realloc` (`perf probe`, root only): exact counts, but each probe traps into the kernel, so
/// they are counted in a run of their own, never during a timed one. `None` where perf cannot
/// set the probes. The probes are set once per benchmark process.
fn count_allocations(pid: u32) -> Option<PerfStat> {
    static READY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ready = *READY.get_or_init(|| {
        let listed = Command::new("perf")
            .args(["probe", "-l"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        ALLOC_CALLS.iter().all(|f| {
            listed.contains(&format!("probe_libc:{f} "))
                || Command::new("perf")
                    .args(["probe", "-q", "-x", LIBC, f])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
        })
    });
    if !ready {
        return None;
    }
    let events: Vec<String> = ALLOC_CALLS
        .iter()
        .map(|f| format!("probe_libc:{f}"))
        .collect();
    PerfStat::start(pid, &events)
}

/// The allocations of what [`count_allocations`] counted (`None`: nothing readable).
fn allocations(counted: Vec<(String, u64)>) -> Option<u64> {
    let counts: Vec<u64> = counted
        .into_iter()
        .filter(|(event, _)| event.starts_with("probe_libc:"))
        .map(|(_, n)| n)
        .collect();
    (!counts.is_empty()).then(|| counts.iter().sum())
}

impl std::ops::Sub for Usage {
    type Output = Usage;
    fn sub(self, o: Usage) -> Usage {
        Usage {
            cpu_s: self.cpu_s - o.cpu_s,
            sys_s: self.sys_s - o.sys_s,
        }
    }
}

/// Per message of a throughput run, for each process: the local broker, the remote broker,
/// the bridge process (none for Mosquitto's bridge, which runs in the local broker) and the
/// load clients (this benchmark's process); and the system calls of the first three, per
/// message of a run of their own.
#[derive(Default, Clone, Copy, Debug)]
struct System {
    local: Usage,
    remote: Usage,
    bridge: Usage,
    clients: Usage,
    calls: [Calls; 3],
}

#[derive(Default, Clone, Copy)]
struct Run {
    rate: f64,
    lost: u64,
    dups: u64,
    p50_us: f64,
    p99_us: f64,
    rss_kib: u64,
    cpu_s_per_m: f64,
    /// Lines of the brokers' logs saying they dropped messages (then the brokers, not the
    /// bridge, were the limit).
    broker_drops: usize,
    /// Every process's CPU over the throughput run and its system calls over a run of their
    /// own, per message.
    system: System,
    /// The bridge process's heap allocations per message, in a run of their own.
    allocs: Option<f64>,
}

/// Mosquitto's notices of dropped messages in a log.
fn drop_notices(log: &str) -> usize {
    log.lines()
        .filter(|l| l.to_ascii_lowercase().contains("dropped"))
        .count()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// A broker as the benchmark needs it; `BENCH_MOSQUITTO_EXTRA='set_tcp_nodelay true\n'` adds
/// configuration lines to both brokers for experiments.
fn tuned_mosquitto(bridge_to: Option<(u16, u8)>) -> Mosquitto {
    let m = Mosquitto::start(MosquittoOptions {
        extra: std::env::var("BENCH_MOSQUITTO_EXTRA")
            .unwrap_or_default()
            .replace("\\n", "\n"),
        ..MosquittoOptions::default()
    });
    if let Some((remote, qos)) = bridge_to {
        // Restart with a bridge section appended. Its default protocol (3.1.1): with
        // `max_inflight_messages 0` Mosquitto 2.0.11's MQTT 5 bridge announces Receive Maximum 0,
        // which the remote refuses as a protocol error.
        let conf = m.conf_path();
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str(&format!(
            "connection bench-bridge\naddress 127.0.0.1:{remote}\ntopic bench/# out {qos}\ncleansession true\n"
        ));
        std::fs::write(&conf, text).unwrap();
        let mut m = m;
        m.restart();
        std::thread::sleep(Duration::from_millis(500));
        return m;
    }
    m
}

fn bridge_yaml(local: u16, remote: u16, qos: u8, plugins: &str) -> String {
    // `BENCH_PROTOCOL=v3` runs edgebridge on MQTT 3.1.1, as Mosquitto's bridge is.
    let protocol = std::env::var("BENCH_PROTOCOL").unwrap_or_else(|_| "v5".into());
    format!(
        "apiVersion: mq.iotoperations.azure.com/v1beta1
kind: MqttBridgeConnector
metadata: {{name: bench}}
spec:
  protocol: {protocol}
  clientIdPrefix: bench-
  remoteBrokerConnection: {{endpoint: \"127.0.0.1:{remote}\", tls: {{tlsEnabled: false}}}}
  localBrokerConnection: {{endpoint: \"127.0.0.1:{local}\", tls: {{tlsEnabled: false}}}}
---
apiVersion: mq.iotoperations.azure.com/v1beta1
kind: MqttBridgeTopicMap
metadata: {{name: bench}}
spec:
  mqttBridgeConnectorRef: bench
  routes:
    - direction: local-to-remote
      name: bench
      source: \"bench/#\"
      qos: {qos}
{plugins}"
    )
}

fn edgebridge_binary(case: Case) -> PathBuf {
    // Case (k): `BENCH_OTHER_BIN=/path/to/edgebridge` runs another build (e.g. an older
    // commit) beside (c), in the same run and in turns.
    if case == Case::OtherBuild {
        let bin = std::env::var_os("BENCH_OTHER_BIN")
            .expect("case (k) runs the build named by BENCH_OTHER_BIN=/path/to/edgebridge");
        return PathBuf::from(bin);
    }
    // `BENCH_BRIDGE_BIN=/path/to/edgebridge` runs another build in every case.
    if let Some(bin) = std::env::var_os("BENCH_BRIDGE_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join("edgebridge");
    assert!(
        bin.exists(),
        "{} is missing: run `bash bench/run` (it builds the release binary first)",
        bin.display()
    );
    bin
}

/// The bridge's log level in the benchmark: errors, and the route clients' connections and
/// subscriptions (a few lines per route, none per message), which [`bridge_ready`] waits for.
const BENCH_LOG: &str = "error,edgebridge::route_client=info,edgebridge::mqtt::link=info";

/// Where [`spawn_bridge`] keeps the log of the bridge it starts on `cfg`.
fn bridge_log(cfg: &Path) -> PathBuf {
    cfg.with_extension("log")
}

/// Waits (at most 20 s) until the bridge started on `cfg` has `routes` route clients up: each
/// connected to both its brokers (`Connected`, two a route) and subscribed to its source
/// (`Subscribed`), so that nothing published from now on is missed (a QoS 0 message published
/// before the subscription is gone). Says so and returns false if they are not up in time.
async fn bridge_ready(cfg: &Path, routes: usize) -> bool {
    let log = bridge_log(cfg);
    let count = |text: &str, word: &str| text.lines().filter(|l| l.contains(word)).count();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if count(&text, " Connected ") >= 2 * routes && count(&text, " Subscribed ") >= routes {
            return true;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "the bridge on {} did not have its {routes} route client(s) connected and subscribed within 20 s; its log:\n{text}",
                cfg.display()
            );
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts the release binary on `cfg` in its own process group, its log (at [`BENCH_LOG`]) in
/// [`bridge_log`]`(cfg)`.
/// `BENCH_BRIDGE_WRAP="perf record -g -o /tmp/p.data --"` runs it under a profiler.
fn spawn_bridge(
    case: Case,
    cfg: &Path,
    plugins_dir: &Path,
    policies_dir: &Path,
    extra: &[String],
) -> Child {
    let wrap = std::env::var("BENCH_BRIDGE_WRAP").unwrap_or_default();
    let mut words: Vec<String> = wrap.split_whitespace().map(String::from).collect();
    words.push(edgebridge_binary(case).display().to_string());
    Command::new(&words[0])
        .args(&words[1..])
        .args(["run", "-f"])
        .arg(cfg)
        .arg("--plugins-dir")
        .arg(plugins_dir)
        .arg("--policies-dir")
        .arg(policies_dir)
        .arg("--log-level")
        .arg(BENCH_LOG)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(bridge_log(cfg)).unwrap())
        .process_group(0)
        .spawn()
        .unwrap()
}

/// CPU seconds of a process so far, in user space and in the kernel (`utime` and `stime` of
/// `/proc/PID/stat`, every thread).
fn cpu_seconds(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) as f64 / 100.0, ticks(12) as f64 / 100.0)
}

fn proc_stats(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (user, kernel) = cpu_seconds(pid);
    (rss, user + kernel)
}

fn session_options(port: u16, client_id: String, subscriptions: Vec<SubFilter>) -> SessionOptions {
    let endpoint = parse_endpoint(&format!("127.0.0.1:{port}")).unwrap();
    SessionOptions {
        link: LinkOptions {
            receive_maximum: 1000,
            backoff: (Duration::from_millis(50), Duration::from_millis(500)),
            max_packet: 1 << 20,
            ..LinkOptions::anonymous(endpoint, Version::V5, client_id)
        },
        subscriptions,
        max_inflight: 1000,
    }
}

/// A subscriber recording (sequence, latency) of every message. The load generator is
/// edgebridge's own session driver (every packet of a turn in one write, reads in batches),
/// the same for every case.
async fn subscriber(
    port: u16,
    qos: QoS,
) -> (Arc<Mutex<Vec<(u64, u64)>>>, tokio::task::JoinHandle<()>) {
    let subs = vec![SubFilter {
        filter: "bench/#".into(),
        qos,
    }];
    let (handle, mut events, _task) = session::spawn(
        session_options(port, format!("bench-sub-{}", free_port()), subs),
        4096,
    );
    let seen = Arc::new(Mutex::new(Vec::with_capacity(200_000)));
    let s = seen.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let mut ready = Some(tx);
    let start = *EPOCH;
    let task = tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            match ev {
                SessionEvent::State(StateEvent::Subscribed(_)) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                SessionEvent::State(StateEvent::Message { msg, ack, .. }) => {
                    let now = start.elapsed().as_micros() as u64;
                    if msg.payload.len() >= 16 {
                        let seq = u64::from_le_bytes(msg.payload[0..8].try_into().unwrap());
                        let sent = u64::from_le_bytes(msg.payload[8..16].try_into().unwrap());
                        s.lock().unwrap().push((seq, now.saturating_sub(sent)));
                    }
                    if let Some(ack) = ack {
                        handle.ack(ack);
                    }
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .expect("subscribed")
        .unwrap();
    (seen, task)
}

static EPOCH: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

fn payload(seq: u64, size: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(size);
    p.extend_from_slice(&seq.to_le_bytes());
    p.extend_from_slice(&(EPOCH.elapsed().as_micros() as u64).to_le_bytes());
    // JSON-ish tail so json-filter has something to parse: bytes 16.. are `{"k":1,"p":"xxx"}`.
    let tail = b"{\"k\":1,\"p\":\"";
    p.extend_from_slice(tail);
    while p.len() + 2 < size {
        p.push(b'x');
    }
    p.extend_from_slice(b"\"}");
    p.truncate(size.max(16));
    p
}

/// Publishes `n` messages (`rate` per second, or as fast as the broker takes them) and
/// waits until the broker acknowledged them (QoS 1) or they were written (QoS 0).
async fn publish(port: u16, qos: QoS, n: u64, size: usize, rate: Option<u64>) -> f64 {
    publish_over(port, qos, n, size, rate, 1).await
}

/// Publishes `k` messages as fast as the publisher goes and waits (up to 30 s) until they
/// arrived at `seen`; how many did (at least 1).
async fn burst(port: u16, qos: QoS, k: u64, size: usize, seen: &Mutex<Vec<(u64, u64)>>) -> u64 {
    let before = seen.lock().unwrap().len();
    publish(port, qos, k, size, None).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while ((seen.lock().unwrap().len() - before) as u64) < k && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (seen.lock().unwrap().len() - before).max(1) as u64
}

/// [`publish`] over `routes` topics `bench/r<i>/t` in turn (1: the single topic `bench/t`).
async fn publish_over(
    port: u16,
    qos: QoS,
    n: u64,
    size: usize,
    rate: Option<u64>,
    routes: u64,
) -> f64 {
    let (handle, mut events, task) = session::spawn(
        session_options(port, format!("bench-pub-{}", free_port()), vec![]),
        4096,
    );
    let start = Instant::now();
    let mut done = 0u64;
    for seq in 0..n {
        if let Some(r) = rate {
            let due = start + Duration::from_micros(seq * 1_000_000 / r);
            let now = Instant::now();
            if due > now {
                tokio::time::sleep(due - now).await;
            }
        }
        let msg = Message {
            topic: if routes > 1 {
                format!("bench/r{}/t", seq % routes).into()
            } else {
                "bench/t".into()
            },
            payload: payload(seq, size).into(),
            qos,
            retain: false,
            properties: Props::default(),
        };
        handle.publish(msg, seq);
        // Keep the queue bounded: at most 2,000 unconfirmed publishes.
        while seq + 1 - done > 2_000 {
            if let Some(SessionEvent::State(StateEvent::Delivered(_))) = events.recv().await {
                done += 1;
            }
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while done < n {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(SessionEvent::State(StateEvent::Delivered(_)))) => done += 1,
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    drop(handle);
    let _ = task.await;
    secs
}

/// Scrapes `/metrics` and `/status` on `port` every second until aborted.
fn scraper(port: u16) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            for path in ["/metrics", "/status"] {
                let _ = edgebridge::http_client::get(
                    &format!("http://127.0.0.1:{port}{path}"),
                    &[],
                    Duration::from_secs(5),
                    16 << 20,
                )
                .await;
            }
        }
    })
}

/// One case: publishers at `pub_qos`, both bridges configured for `bridge_qos` (Mosquitto's
/// `topic bench/# out <bridge_qos>`, edgebridge's route `qos:`), as users configure them.
async fn run_case(
    case: Case,
    pub_qos: u8,
    bridge_qos: u8,
    size: usize,
    n: u64,
    plugins_dir: &Path,
) -> Run {
    let qos = if pub_qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let qos_n = bridge_qos;
    let remote = tuned_mosquitto(None);
    let local = match case {
        Case::MosquittoBridge => tuned_mosquitto(Some((remote.port, qos_n))),
        _ => tuned_mosquitto(None),
    };
    // Where the publisher connects: the local broker, or the bridge's embedded one (then the
    // local Mosquitto idles, and the local broker's CPU is the bridge process's).
    let pub_port = if case == Case::Embedded {
        free_port()
    } else {
        local.port
    };
    let sub_port = if case == Case::Baseline {
        local.port
    } else {
        remote.port
    };
    if case == Case::MosquittoBridge {
        // The bridge connects on its own schedule: measure only once it is connected.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !remote.log().contains(".bench-bridge") && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !remote.log().contains(".bench-bridge") {
            eprintln!(
                "mosquitto's bridge did not connect\n--- local conf:\n{}\n--- local log:\n{}\n--- remote log:\n{}",
                std::fs::read_to_string(local.conf_path()).unwrap_or_default(),
                local.log(),
                remote.log()
            );
            return Run::default();
        }
    }
    let mut bridge: Option<Child> = None;
    let mut scraping = None;
    if matches!(
        case,
        Case::Edgebridge
            | Case::OnePlugin
            | Case::TwoPlugins
            | Case::Metrics
            | Case::Spooled
            | Case::PassV1
            | Case::PassV2
            | Case::Embedded
            | Case::OtherBuild
            | Case::Batch
    ) {
        let plugins = match case {
            Case::OnePlugin => {
                "      plugins:\n        - {name: topic-template, config: {template: \"{#}\"}}\n"
            }
            Case::TwoPlugins => {
                "      plugins:\n        - {name: topic-template, config: {template: \"{#}\"}}\n        - {name: json-filter, config: {field: k, exists: true, onInvalid: keep}}\n"
            }
            Case::PassV1 => "      plugins:\n        - {name: pass-through}\n",
            Case::PassV2 => "      plugins:\n        - {name: pass-through-aggregator}\n",
            _ => "",
        };
        let dir = tempfile::tempdir().unwrap().keep();
        let cfg = dir.join("bench.yaml");
        let mut yaml = bridge_yaml(local.port, remote.port, qos_n, plugins);
        if case == Case::Embedded {
            // The single-binary topology: publishers connect to the bridge process itself.
            yaml = yaml.replace(
                &format!("\"127.0.0.1:{}\"", local.port),
                &format!("\"embedded://127.0.0.1:{pub_port}\""),
            );
            assert!(yaml.contains("embedded://"), "{yaml}");
        }
        std::fs::write(&cfg, yaml).unwrap();
        let mut extra = Vec::new();
        if case == Case::Metrics {
            let port = free_port();
            extra = vec!["--http".to_string(), format!("127.0.0.1:{port}")];
            scraping = Some(scraper(port));
        }
        if case == Case::Batch {
            extra = vec!["--scheduling".to_string(), "batch".to_string()];
        }
        if case == Case::Spooled {
            extra = vec![
                "--spool-dir".to_string(),
                dir.join("spool").display().to_string(),
            ];
        }
        let child = spawn_bridge(case, &cfg, plugins_dir, &dir.join("none"), &extra);
        bridge = Some(child);
        // Measure only once the route client is connected and subscribed: QoS 0 messages
        // published before it subscribed are gone (a fixed wait of 1.5 s once left a QoS 0 run
        // with nothing delivered). A bridge not up in 20 s is measured anyway: the loss shows.
        bridge_ready(&cfg, 1).await;
    }
    // The subscriber takes up to QoS 1: it sees each message at the QoS it was forwarded with.
    let (seen, task) = subscriber(sub_port, QoS::AtLeastOnce).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = bridge.as_ref().map(|b| proc_stats(b.id()));
    let pids = (
        if case == Case::Embedded {
            0
        } else {
            local.pid().unwrap_or(0)
        },
        remote.pid().unwrap_or(0),
        bridge.as_ref().map_or(0, Child::id),
        std::process::id(),
    );
    let snapshot = |(l, r, b, c): (u32, u32, u32, u32)| {
        [l, r, b, c].map(|pid| {
            if pid == 0 {
                Usage::default()
            } else {
                usage(pid)
            }
        })
    };
    let sys0 = snapshot(pids);

    // Throughput: as fast as the publisher goes.
    let t0 = Instant::now();
    publish(pub_port, qos, n, size, None).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last_len = 0;
    let mut last_change = Instant::now();
    loop {
        let len = seen.lock().unwrap().len();
        if len as u64 >= n
            || Instant::now() > deadline
            || last_change.elapsed() > Duration::from_secs(5)
        {
            break;
        }
        if len != last_len {
            last_len = len;
            last_change = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = t0.elapsed().as_secs_f64()
        - if (seen.lock().unwrap().len() as u64) < n {
            5.0
        } else {
            0.0
        };
    let sys1 = snapshot(pids);
    let got: Vec<(u64, u64)> = std::mem::take(&mut *seen.lock().unwrap());
    let distinct: HashSet<u64> = got.iter().map(|(s, _)| *s).collect();
    let per = |u: Usage| Usage {
        cpu_s: u.cpu_s / n as f64,
        sys_s: u.sys_s / n as f64,
    };
    let system = System {
        local: per(sys1[0] - sys0[0]),
        remote: per(sys1[1] - sys0[1]),
        bridge: per(sys1[2] - sys0[2]),
        clients: per(sys1[3] - sys0[3]),
        calls: [Calls::default(); 3],
    };
    let mut run = Run {
        system,
        rate: distinct.len() as f64 / elapsed.max(1e-9),
        lost: n - distinct.len() as u64,
        dups: got.len() as u64 - distinct.len() as u64,
        ..Run::default()
    };
    if let (Some(b), Some((_, cpu0))) = (&bridge, before) {
        let (rss, cpu1) = proc_stats(b.id());
        run.rss_kib = rss;
        run.cpu_s_per_m = (cpu1 - cpu0) / (n as f64 / 1e6);
    }

    // Latency at a fixed rate of 5,000 msg/s.
    let m = (n / 4).clamp(2_000, 10_000);
    publish(pub_port, qos, m, size, Some(5_000)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut lat: Vec<f64> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|(_, l)| *l as f64)
        .collect();
    if !lat.is_empty() {
        lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
        run.p50_us = lat[lat.len() / 2];
        run.p99_us = lat[(lat.len() * 99) / 100];
    }
    // System calls and context switches: a run of their own at full speed (perf's
    // tracepoints slow every system call they count, so never during the timed runs).
    let counting = [pids.0, pids.1, pids.2].map(count_syscalls);
    if counting.iter().any(Option::is_some) {
        // perf attaches in a few milliseconds.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let k = (n / 4).clamp(2_000, 25_000);
        let forwarded = burst(pub_port, qos, k, size, &seen).await;
        run.system.calls =
            counting.map(|c| c.map_or(Calls::default(), |c| syscalls(c.stop(), forwarded)));
    }
    // Allocations: a run of its own (the probes slow the bridge), after the timed ones.
    if let Some(b) = &bridge
        && let Some(counting) = count_allocations(b.id())
    {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let k = (n / 10).clamp(1_000, 20_000);
        let forwarded = burst(pub_port, qos, k, size, &seen).await;
        run.allocs = allocations(counting.stop()).map(|a| a as f64 / forwarded as f64);
    }
    run.broker_drops = drop_notices(&local.log()) + drop_notices(&remote.log());
    if run.broker_drops > 0 {
        eprintln!(
            "{}: the brokers logged {} dropped-message notice(s)",
            case.label(),
            run.broker_drops
        );
    }
    task.abort();
    if let Some(s) = scraping {
        s.abort();
    }
    if let Some(mut b) = bridge {
        // SIGTERM first, so a profiler wrapped around the bridge can write its data.
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{}", b.id())])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while matches!(b.try_wait(), Ok(None)) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = b.kill();
        let _ = b.wait();
    }
    run
}

/// `--soak SECS`: one edgebridge with 10 routes (two of them through topic-template and
/// json-filter) forwarding QoS 1 at 2,000 msg/s for SECS; its resident memory is sampled every
/// 10 s. Reports loss, duplicates, latency and whether memory grew after the first minute.
async fn soak(secs: u64, plugins_dir: &Path) {
    let rate = 2_000u64;
    let remote = tuned_mosquitto(None);
    let local = tuned_mosquitto(None);
    let mut routes = String::new();
    for i in 0..10 {
        routes.push_str(&format!(
            "    - direction: local-to-remote\n      name: r{i}\n      source: \"bench/r{i}/#\"\n      qos: 1\n"
        ));
        if i < 2 {
            routes.push_str("      plugins:\n        - {name: topic-template, config: {template: \"{#}\"}}\n        - {name: json-filter, config: {field: k, exists: true, onInvalid: keep}}\n");
        }
    }
    let yaml = bridge_yaml(local.port, remote.port, 1, "").replace(
        "    - direction: local-to-remote\n      name: bench\n      source: \"bench/#\"\n      qos: 1\n",
        &routes,
    );
    assert!(yaml.contains("name: r9"), "{yaml}");
    let dir = tempfile::tempdir().unwrap().keep();
    let cfg = dir.join("soak.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let mut bridge = spawn_bridge(Case::Edgebridge, &cfg, plugins_dir, &dir.join("none"), &[]);
    bridge_ready(&cfg, 10).await;
    let (seen, task) = subscriber(remote.port, QoS::AtLeastOnce).await;
    let n = secs * rate;
    let pid = bridge.id();
    let samples = Arc::new(Mutex::new(Vec::new()));
    let record = samples.clone();
    let sampler = tokio::spawn(async move {
        let t0 = Instant::now();
        loop {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let rss: u64 = status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            record.lock().unwrap().push((t0.elapsed().as_secs(), rss));
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    });
    publish_over(local.port, QoS::AtLeastOnce, n, 64, Some(rate), 10).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while (seen.lock().unwrap().len() as u64) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sampler.abort();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let got: Vec<(u64, u64)> = std::mem::take(&mut *seen.lock().unwrap());
    task.abort();
    let distinct: HashSet<u64> = got.iter().map(|(s, _)| *s).collect();
    let mut lat: Vec<u64> = got.iter().map(|(_, l)| *l).collect();
    lat.sort_unstable();
    let _ = bridge.kill();
    let _ = bridge.wait();
    println!("soak: {secs} s at {rate} msg/s QoS 1, 64 B, 10 routes (2 with 2 plugins each)");
    println!(
        "published {n}, received {} distinct, lost {}, duplicates {}, p50 {} µs, p99 {} µs",
        distinct.len(),
        n - distinct.len() as u64,
        got.len() - distinct.len(),
        lat.get(lat.len() / 2).copied().unwrap_or(0),
        lat.get(lat.len() * 99 / 100).copied().unwrap_or(0)
    );
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .unwrap_or("VmHWM: ?")
        .to_string();
    let samples = samples.lock().unwrap().clone();
    let after_warmup: Vec<u64> = samples
        .iter()
        .filter(|(t, _)| *t >= 60)
        .map(|(_, r)| *r)
        .collect();
    let mib = |k: u64| k as f64 / 1024.0;
    println!(
        "bridge RSS: at 60 s {:.1} MiB, at the end {:.1} MiB, highest after 60 s {:.1} MiB; {hwm}",
        mib(after_warmup.first().copied().unwrap_or(0)),
        mib(after_warmup.last().copied().unwrap_or(0)),
        mib(after_warmup.iter().copied().max().unwrap_or(0)),
    );
    let line: Vec<String> = samples
        .iter()
        .map(|(t, r)| format!("{t}s:{:.1}", mib(*r)))
        .collect();
    println!("samples (MiB): {}", line.join(" "));
}

/// `routes` same-shaped QoS 1 routes `r<i>` on `bench/r<i>/#`.
fn many_routes(local: u16, remote: u16, routes: usize) -> String {
    let mut list = String::new();
    for i in 0..routes {
        list.push_str(&format!(
            "    - {{direction: local-to-remote, name: r{i}, source: \"bench/r{i}/#\", qos: 1}}\n"
        ));
    }
    bridge_yaml(local, remote, 1, "").replace(
        "    - direction: local-to-remote\n      name: bench\n      source: \"bench/#\"\n      qos: 1\n",
        &list,
    )
}

/// `--scale`: (1) 1,000 routes on one bridge: time from start to `/readyz` answering 200 (every
/// session connected and subscribed) and resident memory then; (2) 10 routes forwarding QoS 1
/// at once against one route, total throughput.
async fn scale(n: u64) {
    let remote = tuned_mosquitto(None);
    let local = tuned_mosquitto(None);
    let dir = tempfile::tempdir().unwrap().keep();
    for routes in [1000usize] {
        let cfg = dir.join(format!("scale-{routes}.yaml"));
        std::fs::write(&cfg, many_routes(local.port, remote.port, routes)).unwrap();
        let port = free_port();
        let extra = vec!["--http".to_string(), format!("127.0.0.1:{port}")];
        let t0 = Instant::now();
        let mut bridge = spawn_bridge(Case::Edgebridge, &cfg, &dir, &dir.join("none"), &extra);
        let url = format!("http://127.0.0.1:{port}/readyz");
        let mut ready = None;
        while t0.elapsed() < Duration::from_secs(60) {
            if let Ok(r) =
                edgebridge::http_client::get(&url, &[], Duration::from_secs(1), 1 << 20).await
                && r.status == 200
            {
                ready = Some(t0.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (rss_hwm, _) = proc_stats(bridge.id());
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", bridge.id())).unwrap_or_default();
        let rss: u64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        println!(
            "scale: {routes} routes ({} sessions) ready after {} ms; RSS {:.1} MiB (peak {:.1} MiB)",
            routes * 2,
            ready
                .map(|d| d.as_millis().to_string())
                .unwrap_or_else(|| "- (not ready in 60 s)".into()),
            rss as f64 / 1024.0,
            rss_hwm as f64 / 1024.0
        );
        let _ = Command::new("kill")
            .args(["-TERM", &bridge.id().to_string()])
            .status();
        let _ = bridge.wait();
    }
    // 10 routes at once against 1, each run publishing n messages in all.
    for routes in [1usize, 10] {
        let remote = tuned_mosquitto(None);
        let local = tuned_mosquitto(None);
        let cfg = dir.join(format!("parallel-{routes}.yaml"));
        std::fs::write(&cfg, many_routes(local.port, remote.port, routes)).unwrap();
        let mut bridge = spawn_bridge(Case::Edgebridge, &cfg, &dir, &dir.join("none"), &[]);
        bridge_ready(&cfg, routes).await;
        let (seen, task) = subscriber(remote.port, QoS::AtLeastOnce).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t0 = Instant::now();
        // One publisher per route, in parallel.
        let per = n / routes as u64;
        let mut pubs = Vec::new();
        for r in 0..routes {
            pubs.push(tokio::spawn(publish_on(
                local.port,
                format!("bench/r{r}/t"),
                per,
                r as u64 * per,
            )));
        }
        for p in pubs {
            let _ = p.await;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while (seen.lock().unwrap().len() as u64) < per * routes as u64 && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let rate = seen.lock().unwrap().len() as f64 / t0.elapsed().as_secs_f64();
        task.abort();
        println!(
            "scale: {routes} route(s) forwarding at once: {rate:.0} msg/s in total (QoS 1, 64 B)"
        );
        let _ = bridge.kill();
        let _ = bridge.wait();
    }
}

/// Resident memory of a process now, KiB.
fn rss_now(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Two tuned brokers and the release binary bridging `bench/#` at QoS 0 through one plugin
/// (`plugin`: its YAML entry), configured in `cfg`; returns once its route client is connected and subscribed.
async fn plugin_bridge(
    cfg: &Path,
    (plugins_dir, policies_dir): (&Path, &Path),
    plugin: &str,
    extra: &[String],
) -> (Mosquitto, Mosquitto, Child) {
    let remote = tuned_mosquitto(None);
    let local = tuned_mosquitto(None);
    let plugins = format!("      plugins:\n        - {plugin}\n");
    std::fs::write(cfg, bridge_yaml(local.port, remote.port, 0, &plugins)).unwrap();
    let bridge = spawn_bridge(Case::Edgebridge, cfg, plugins_dir, policies_dir, extra);
    bridge_ready(cfg, 1).await;
    (local, remote, bridge)
}

/// `--aggregate TOPICS [--windows N]`: (1) `window-average` (5 s windows, route at QoS 0) over
/// TOPICS topics, N windows in a row (default 3): the bridge's RSS before, after each window, and the averages
/// received; (2) `heartbeat` with 1,000 timers (one per topic, 1 s of silence), fired three
/// times each: the timer lateness percentiles from `/metrics`.
async fn aggregate(topics: u64, windows: u64, plugins_dir: &Path) {
    let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let dir = tempfile::tempdir().unwrap().keep();
    // (1) Windows over many topics.
    {
        let (local, remote, mut bridge) = plugin_bridge(
            &dir.join("avg.yaml"),
            (plugins_dir, &policies),
            "{name: window-average, config: {field: v, windowSeconds: 5}}",
            &[],
        )
        .await;
        let (seen, task) = subscriber(remote.port, QoS::AtLeastOnce).await;
        let before = rss_now(bridge.id());
        println!(
            "aggregate: window-average over {topics} topics, 5 s windows, QoS 0; bridge RSS {:.1} MiB before",
            before as f64 / 1024.0
        );
        for round in 1..=windows {
            let t0 = Instant::now();
            publish_topics(local.port, topics, 3, round).await;
            let published = t0.elapsed();
            let deadline = Instant::now() + Duration::from_secs(30);
            while (seen.lock().unwrap().len() as u64) < topics * round && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            println!(
                "aggregate: window {round}: {} readings published in {:.2} s, {} averages received in all; bridge RSS {:.1} MiB (peak {:.1} MiB)",
                topics * 3,
                published.as_secs_f64(),
                seen.lock().unwrap().len(),
                rss_now(bridge.id()) as f64 / 1024.0,
                proc_stats(bridge.id()).0 as f64 / 1024.0
            );
        }
        task.abort();
        let _ = bridge.kill();
        let _ = bridge.wait();
    }
    // (2) 1,000 timers.
    {
        let port = free_port();
        let (local, _remote, mut bridge) = plugin_bridge(
            &dir.join("hb.yaml"),
            (plugins_dir, &policies),
            "{name: heartbeat, config: {silenceSeconds: 1}}",
            &["--http".to_string(), format!("127.0.0.1:{port}")],
        )
        .await;
        publish_topics(local.port, 1000, 1, 0).await;
        tokio::time::sleep(Duration::from_millis(3500)).await;
        let url = format!("http://127.0.0.1:{port}/metrics");
        let text = edgebridge::http_client::get(&url, &[], Duration::from_secs(5), 16 << 20)
            .await
            .map(|r| String::from_utf8_lossy(&r.body).into_owned())
            .unwrap_or_default();
        let mut buckets: Vec<(f64, f64)> = Vec::new();
        let mut count = 0.0;
        for line in text.lines() {
            if let Some(rest) =
                line.strip_prefix("edgebridge_plugin_timer_lateness_seconds_bucket{")
            {
                let le = rest
                    .split("le=\"")
                    .nth(1)
                    .and_then(|v| v.split('"').next())
                    .unwrap_or("");
                let v: f64 = line
                    .rsplit(' ')
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0.0);
                let le: f64 = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap_or(0.0)
                };
                buckets.push((le, v));
            }
            if line.starts_with("edgebridge_plugin_timer_lateness_seconds_count") {
                count = line
                    .rsplit(' ')
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0.0);
            }
        }
        let at = |q: f64| {
            buckets
                .iter()
                .find(|(_, c)| *c >= q * count)
                .map(|(le, _)| format!("≤ {} ms", le * 1000.0))
                .unwrap_or_else(|| "-".into())
        };
        println!(
            "aggregate: heartbeat with 1,000 timers (1 s): {count} fired; lateness p50 {}, p99 {}, max bucket {}",
            at(0.5),
            at(0.99),
            at(1.0)
        );
        let _ = bridge.kill();
        let _ = bridge.wait();
    }
}

/// Publishes `per_topic` readings `{"v": N}` at QoS 1 on each of `topics` topics `bench/t<i>`.
async fn publish_topics(port: u16, topics: u64, per_topic: u64, round: u64) {
    let readings = (0..per_topic).flat_map(|k| {
        (0..topics).map(move |t| {
            (
                format!("bench/t{t}"),
                format!("{{\"v\": {}}}", round * 10 + k).into_bytes(),
            )
        })
    });
    publish_messages(port, readings).await;
}

/// Publishes `n` QoS 1 messages on `topic`, sequence numbers from `first`.
async fn publish_on(port: u16, topic: String, n: u64, first: u64) {
    publish_messages(
        port,
        (0..n).map(|i| (topic.clone(), payload(first + i, 64))),
    )
    .await;
}

/// Publishes (topic, payload) pairs at QoS 1, at most 2,000 unacknowledged at a time, and
/// waits (up to 60 s) for the last acknowledgement.
async fn publish_messages(port: u16, messages: impl Iterator<Item = (String, Vec<u8>)>) {
    let (handle, mut events, task) = session::spawn(
        session_options(port, format!("bench-pub-{}", free_port()), vec![]),
        4096,
    );
    let mut sent = 0u64;
    let mut done = 0u64;
    for (topic, body) in messages {
        let msg = Message {
            topic: topic.into(),
            payload: body.into(),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Props::default(),
        };
        handle.publish(msg, sent);
        sent += 1;
        while sent - done > 2_000 {
            match events.recv().await {
                Some(SessionEvent::State(StateEvent::Delivered(_))) => done += 1,
                Some(_) => {}
                None => return,
            }
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while done < sent {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(SessionEvent::State(StateEvent::Delivered(_)))) => done += 1,
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    drop(handle);
    let _ = task.await;
}

/// `--spool-recovery MIB`: a spool of MIB mebibytes of 64-byte QoS 1 messages, written and
/// synced as the bridge writes it; then the time and the memory its recovery takes (what a
/// restart after a long outage costs), and the append and release rates on this disk.
fn spool_recovery(mib: u64) {
    use edgebridge::spool::{Spool, SpoolCounters, SpoolSettings, fs::RealFs};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let settings = SpoolSettings {
        max_bytes: (mib + 64) << 20,
        min_free_bytes: 0,
        ..SpoolSettings::new(dir.path().join("spool"))
    };
    let counters = || Arc::new(SpoolCounters::new(settings.dir.clone()));
    let mut sp = Spool::open(settings.clone(), Arc::new(RealFs), counters()).unwrap();
    let msg = Message {
        topic: "bench/spool/x".into(),
        payload: vec![b'x'; 64].into(),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Props::default(),
    };
    let t0 = Instant::now();
    let mut n = 0u64;
    while sp
        .counters()
        .bytes
        .load(std::sync::atomic::Ordering::Relaxed)
        < mib << 20
    {
        for _ in 0..1000 {
            sp.append(&msg);
        }
        n += 1000;
        while let Some(job) = sp.begin_job(true) {
            sp.finish_job(job.run()).unwrap();
        }
        sp.publish_gauges();
    }
    let append_s = t0.elapsed().as_secs_f64();
    drop(sp);
    // A cold start, as after a reboot: the page cache is dropped where this process may
    // (root on Linux); the table says which.
    let cold = std::process::Command::new("sync").status().is_ok()
        && std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok();
    let rss0 = edgebridge_tests::faults::rss_kib();
    edgebridge_tests::faults::reset_peak_rss();
    let t1 = Instant::now();
    let mut sp = Spool::open(settings.clone(), Arc::new(RealFs), counters()).unwrap();
    let open_s = t1.elapsed().as_secs_f64();
    let peak = edgebridge_tests::faults::peak_rss_kib().saturating_sub(rss0);
    let t2 = Instant::now();
    let mut released = 0u64;
    while let Some(o) = sp.next_to_send().unwrap() {
        sp.release(o.seq);
        released += 1;
        if released.is_multiple_of(100_000) {
            while let Some(job) = sp.begin_job(true) {
                sp.finish_job(job.run()).unwrap();
            }
        }
    }
    while let Some(job) = sp.begin_job(true) {
        sp.finish_job(job.run()).unwrap();
    }
    let release_s = t2.elapsed().as_secs_f64();
    println!("| spool of {mib} MiB ({n} records of 64 B) | figure |");
    println!("| --- | --- |");
    println!(
        "| append + group commit (1,000 records per fdatasync) | {:.0} records/s, {:.0} MiB/s |",
        n as f64 / append_s,
        mib as f64 / append_s
    );
    println!(
        "| recovery (open after the writer stopped; page cache {}) | {open_s:.3} s |",
        if cold { "dropped first" } else { "warm" }
    );
    println!(
        "| memory added by the recovery (peak RSS) | {:.1} MiB |",
        peak as f64 / 1024.0
    );
    println!(
        "| read back and release from the head (every record) | {:.0} records/s ({released} records) |",
        released as f64 / release_s
    );
}

/// `--spool-outage SECS`: the remote down for SECS + 2 s while 1,000 QoS 1 msg/s are
/// published on a local broker with Mosquitto's default limits, through a spooled route.
async fn spool_outage(secs: u64) {
    let r = edgebridge_tests::spool::Outage {
        qos: QoS::AtLeastOnce,
        n: secs * 1_000,
        rate: 1_000,
        down: Duration::from_secs(secs + 2),
        spooled: true,
        route_extra: String::new(),
        drain_timeout: Duration::from_secs(600),
    }
    .run()
    .await;
    println!(
        "| outage of {} s at 1,000 msg/s (QoS 1) | acknowledged at the edge {} | spooled {} ({:.1} MiB) | arrived {} | duplicates {} | lost {} | drained at {:.0} msg/s |",
        secs + 2,
        r.acked,
        r.backlog,
        r.backlog_bytes as f64 / 1048576.0,
        r.arrived,
        r.duplicates,
        r.lost,
        r.drain_rate
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--only qos1-64` (or `qos0`, `4096`): run only the sections whose name contains it;
    // `--cases ce`: only those cases (letters a-l).
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let only = flag("--only").unwrap_or_default();
    let letters = flag("--cases").unwrap_or_else(|| "abcdefgj".into());
    let (n, repeats) = if quick {
        (10_000u64, 1)
    } else {
        (100_000u64, 3)
    };
    let n = flag("--n").and_then(|v| v.parse().ok()).unwrap_or(n);
    let repeats = flag("--repeats")
        .and_then(|v| v.parse().ok())
        .unwrap_or(repeats);
    let soak_secs: Option<u64> = flag("--soak").and_then(|v| v.parse().ok());
    let plugins_dir = tempfile::tempdir().unwrap().keep();
    install_plugin(&plugins_dir, "topic-template", "topic-template");
    install_plugin(&plugins_dir, "json-filter", "json-filter");
    install_plugin(&plugins_dir, "pass-through", "pass-through");
    install_plugin(
        &plugins_dir,
        "pass-through-aggregator",
        "pass-through-aggregator",
    );
    install_plugin(&plugins_dir, "window-average", "window-average");
    install_plugin(&plugins_dir, "heartbeat", "heartbeat");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if let Some(secs) = soak_secs {
        rt.block_on(soak(secs, &plugins_dir));
        return;
    }
    if let Some(mib) = flag("--spool-recovery").and_then(|v| v.parse::<u64>().ok()) {
        spool_recovery(mib);
        return;
    }
    if let Some(secs) = flag("--spool-outage").and_then(|v| v.parse::<u64>().ok()) {
        rt.block_on(spool_outage(secs));
        return;
    }
    if args.iter().any(|a| a == "--scale") {
        rt.block_on(scale(n));
        return;
    }
    if let Some(topics) = flag("--aggregate").and_then(|v| v.parse::<u64>().ok()) {
        let windows = flag("--windows").and_then(|v| v.parse().ok()).unwrap_or(3);
        rt.block_on(aggregate(topics, windows, &plugins_dir));
        return;
    }
    let cases: Vec<Case> = [
        ('a', Case::Baseline),
        ('b', Case::MosquittoBridge),
        ('c', Case::Edgebridge),
        ('d', Case::OnePlugin),
        ('e', Case::TwoPlugins),
        ('f', Case::Metrics),
        ('g', Case::Spooled),
        ('h', Case::PassV1),
        ('i', Case::PassV2),
        ('j', Case::Embedded),
        ('k', Case::OtherBuild),
        ('l', Case::Batch),
    ]
    .into_iter()
    .filter(|(l, _)| letters.contains(*l))
    .map(|(_, c)| c)
    .collect();
    println!(
        "edgebridge end-to-end benchmark: {n} messages per throughput run, {repeats} repeat(s), medians"
    );
    // (publishers' QoS, the bridges' configured QoS): QoS 0 telemetry through bridges set up
    // for QoS 1 (what users run), QoS 1 through QoS 1, and QoS 0 through QoS 0.
    for (pub_qos, bridge_qos) in [(0u8, 1u8), (1, 1), (0, 0)] {
        for size in [64usize, 4096] {
            if !format!("p{pub_qos}r{bridge_qos}-{size}").contains(&only) {
                continue;
            }
            println!();
            println!(
                "### publishers at QoS {pub_qos}, bridges configured for QoS {bridge_qos}, {size} B"
            );
            println!(
                "| case | msg/s | vs (a) | vs (b) | vs (b) by turn, lowest–highest | lost | dup | p50 µs @5k/s | p99 µs | bridge RSS MiB | CPU s / M msgs | broker drop notices |"
            );
            println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
            let mut base = (0.0, 0.0);
            let mut plain_and_spooled = (0.0, 0.0, 0.0, 0.0);
            // In turns: every repeat runs every case once, so a slow spell of the shared
            // machine hits all cases alike instead of one case's repeats; every other repeat
            // runs them in reverse, so no case always runs first.
            let mut all: Vec<Vec<Run>> = vec![Vec::new(); cases.len()];
            for r in 0..repeats {
                let order: Vec<usize> = if r % 2 == 0 {
                    (0..cases.len()).collect()
                } else {
                    (0..cases.len()).rev().collect()
                };
                for i in order {
                    let case = cases[i];
                    all[i].push(rt.block_on(run_case(
                        case,
                        pub_qos,
                        bridge_qos,
                        size,
                        n,
                        &plugins_dir,
                    )));
                }
            }
            let whole = all.clone();
            // Each turn's msg/s against (b)'s in the same turn: the spread of the ratio, which
            // the medians' ratio hides (the machine's slow spells hit a turn's cases alike).
            let by_turn: Option<Vec<f64>> = cases
                .iter()
                .position(|c| *c == Case::MosquittoBridge)
                .map(|i| all[i].iter().map(|r| r.rate).collect());
            for (&case, runs) in cases.iter().zip(all) {
                let rate = median(runs.iter().map(|r| r.rate).collect());
                let p50 = median(runs.iter().map(|r| r.p50_us).collect());
                match case {
                    Case::Baseline => base.0 = rate,
                    Case::MosquittoBridge => base.1 = rate,
                    Case::Edgebridge => (plain_and_spooled.0, plain_and_spooled.2) = (rate, p50),
                    Case::Spooled => (plain_and_spooled.1, plain_and_spooled.3) = (rate, p50),
                    _ => {}
                }
                let ratio = |b: f64| {
                    if b > 0.0 {
                        format!("{:.2}", rate / b)
                    } else {
                        "-".into()
                    }
                };
                let turns: Vec<f64> = by_turn
                    .iter()
                    .flat_map(|b| runs.iter().zip(b))
                    .filter(|(_, b)| **b > 0.0)
                    .map(|(r, b)| r.rate / b)
                    .collect();
                let spread = match (
                    turns.iter().copied().reduce(f64::min),
                    turns.iter().copied().reduce(f64::max),
                ) {
                    (Some(lo), Some(hi)) => format!("{lo:.2}–{hi:.2}"),
                    _ => "-".into(),
                };
                let rss = median(runs.iter().map(|r| r.rss_kib as f64).collect());
                let cpu = median(runs.iter().map(|r| r.cpu_s_per_m).collect());
                println!(
                    "| {} | {:.0} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {} | {} | {} |",
                    case.label(),
                    rate,
                    ratio(base.0),
                    ratio(base.1),
                    spread,
                    runs.iter().map(|r| r.lost).max().unwrap_or(0),
                    runs.iter().map(|r| r.dups).max().unwrap_or(0),
                    median(runs.iter().map(|r| r.p50_us).collect()),
                    median(runs.iter().map(|r| r.p99_us).collect()),
                    if rss > 0.0 {
                        format!("{:.1}", rss / 1024.0)
                    } else {
                        "-".into()
                    },
                    if rss > 0.0 {
                        format!("{cpu:.2}")
                    } else {
                        "-".into()
                    },
                    runs.iter().map(|r| r.broker_drops).sum::<usize>(),
                );
            }
            println!();
            println!(
                "whole system, per message of the throughput run (medians): CPU µs of each process (for the bridge, the part in the kernel in brackets), and per message its socket reads / socket writes / all system calls / context switches (perf's syscall tracepoints and its context-switch counter, in a run of their own at full speed; 0 where perf is not available); the bridge's heap allocations per message (uprobes on malloc, calloc and realloc, in a run of their own; - where perf cannot set them)"
            );
            println!(
                "| case | local broker µs | remote broker µs | bridge µs (kernel) | load clients µs | total µs | local reads / writes / calls / switches | remote reads / writes / calls / switches | bridge reads / writes / calls / switches | bridge allocations |"
            );
            println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
            for (&case, runs) in cases.iter().zip(&whole) {
                let us = |f: &dyn Fn(&System) -> Usage| {
                    median(runs.iter().map(|r| f(&r.system).cpu_s * 1e6).collect())
                };
                let bridge_kernel =
                    median(runs.iter().map(|r| r.system.bridge.sys_s * 1e6).collect());
                let calls = |i: usize| {
                    let per = |g: &dyn Fn(Calls) -> f64| {
                        median(runs.iter().map(|r| g(r.system.calls[i])).collect())
                    };
                    format!(
                        "{:.2} / {:.2} / {:.2} / {:.2}",
                        per(&|c| c.reads),
                        per(&|c| c.writes),
                        per(&|c| c.all),
                        per(&|c| c.switches)
                    )
                };
                let (l, r, b, c) = (
                    us(&|s| s.local),
                    us(&|s| s.remote),
                    us(&|s| s.bridge),
                    us(&|s| s.clients),
                );
                let allocs: Vec<f64> = runs.iter().filter_map(|r| r.allocs).collect();
                println!(
                    "| {} | {} | {r:.2} | {} | {c:.2} | {:.2} | {} | {} | {} | {} |",
                    case.label(),
                    if case == Case::Embedded {
                        "in the bridge".to_string()
                    } else {
                        format!("{l:.2}")
                    },
                    if matches!(case, Case::Baseline | Case::MosquittoBridge) {
                        "-".to_string()
                    } else {
                        format!("{b:.2} ({bridge_kernel:.2})")
                    },
                    l + r + b + c,
                    if case == Case::Embedded {
                        "-".to_string()
                    } else {
                        calls(0)
                    },
                    calls(1),
                    if matches!(case, Case::Baseline | Case::MosquittoBridge) {
                        "-".to_string()
                    } else {
                        calls(2)
                    },
                    if allocs.is_empty() {
                        "-".to_string()
                    } else {
                        format!("{:.2}", median(allocs))
                    },
                );
            }
            let (plain, spooled, plain_p50, spooled_p50) = plain_and_spooled;
            if plain > 0.0 && spooled > 0.0 {
                println!();
                println!(
                    "spool on / off (g)/(c): throughput {:.2}, p50 latency added {:.0} µs",
                    spooled / plain,
                    spooled_p50 - plain_p50
                );
            }
        }
    }
}
