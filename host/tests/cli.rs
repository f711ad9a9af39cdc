//! The `edgebridge` binary: `check` exit codes and messages, and `run` refusing bad input.

mod common;
use common::free_port;

use std::process::Command;

fn edgebridge() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edgebridge"))
}

fn quickstart() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart.yaml")
}

/// A copy of the quick start in `dir` with its brokers on free ports: (file, local port,
/// remote port).
fn quickstart_on_free_ports(dir: &std::path::Path) -> (std::path::PathBuf, u16, u16) {
    let (lp, rp) = (free_port(), free_port());
    let cfg = dir.join("quick.yaml");
    let text = std::fs::read_to_string(quickstart())
        .unwrap()
        .replace("127.0.0.1:1883", &format!("127.0.0.1:{lp}"))
        .replace("127.0.0.1:1884", &format!("127.0.0.1:{rp}"));
    std::fs::write(&cfg, text).unwrap();
    (cfg, lp, rp)
}

#[test]
fn check_accepts_the_quickstart() {
    let out = edgebridge()
        .arg("check")
        .arg("-f")
        .arg(quickstart())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("MqttBridgeConnector \"quickstart-bridge\": 2 route(s)"),
        "{stdout}"
    );
}

#[test]
fn check_prints_every_problem_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    let text = std::fs::read_to_string(quickstart())
        .unwrap()
        .replace("protocol: v5", "protocol: v7")
        .replace("source: command/#", "source: command/#/x");
    std::fs::write(&bad, text).unwrap();
    let out = edgebridge()
        .arg("check")
        .arg("-f")
        .arg(&bad)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("bad.yaml:15: MqttBridgeConnector \"quickstart-bridge\", spec.protocol"),
        "{stderr}"
    );
    assert!(stderr.contains("spec.routes[1].source"), "{stderr}");
    assert!(stderr.contains("2 problem(s) found."), "{stderr}");
}

#[test]
fn run_starts_nothing_when_the_configuration_is_invalid() {
    let out = edgebridge()
        .arg("run")
        .arg("-f")
        .arg("/nonexistent/bridge.yaml")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("/nonexistent/bridge.yaml: no such file or folder"),
        "{stderr}"
    );
    assert!(stderr.contains("nothing started"), "{stderr}");
}

/// The README's quick start, on free ports: `run` with two embedded brokers, `sub` on the
/// remote one, `pub` on the local one; then SIGTERM ends the bridge cleanly.
#[test]
fn the_quick_start_bridges_with_nothing_installed() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, lp, rp) = quickstart_on_free_ports(dir.path());
    let mut bridge = edgebridge()
        .args(["run", "-f"])
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The bridge is up once its embedded remote broker takes a subscriber.
    let mut sub = None;
    for _ in 0..100 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        if std::net::TcpStream::connect(("127.0.0.1", rp)).is_ok() {
            sub = Some(
                edgebridge()
                    .args([
                        "sub",
                        "-b",
                        &format!("127.0.0.1:{rp}"),
                        "-t",
                        "factory/#",
                        "-C",
                        "3",
                    ])
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .unwrap(),
            );
            break;
        }
    }
    let sub = sub.expect("the embedded remote broker came up");
    std::thread::sleep(std::time::Duration::from_millis(700));
    let publish = edgebridge()
        .args([
            "pub",
            "-b",
            &format!("127.0.0.1:{lp}"),
            "-t",
            "factory/telemetry/temperature",
        ])
        .args(["-m", "reading {n}", "-n", "3"])
        .status()
        .unwrap();
    assert!(publish.success());
    let out = sub.wait_with_output().unwrap();
    let lines = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        lines,
        "factory/telemetry/temperature reading 0\nfactory/telemetry/temperature reading 1\nfactory/telemetry/temperature reading 2\n"
    );
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(bridge.id().to_string())
        .status();
    let status = bridge.wait().unwrap();
    let mut log = String::new();
    std::io::Read::read_to_string(&mut bridge.stderr.take().unwrap(), &mut log).unwrap();
    assert!(status.success(), "{status:?}\n{log}");
    assert!(log.contains("Shutting down"), "{log}");
}

/// `pub --help` names the payload's placeholder: clap turns a `{n}` of a help text into a line
/// break, which left the help saying "Payload; `" and "` is replaced by ..." on two lines.
#[test]
fn pub_help_names_the_sequence_number_placeholder() {
    let out = edgebridge().args(["pub", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let line = help
        .lines()
        .find(|l| l.contains("--message"))
        .unwrap_or_else(|| panic!("no --message line in:\n{help}"));
    assert!(
        line.contains("Payload; `{n}` is replaced by the message's sequence number"),
        "{line:?}"
    );
    assert!(
        !help.contains('\x1b'),
        "escape sequences in plain output:\n{help}"
    );
}

/// `run --http --log-format json` and `status`: the log is one JSON object per line (no
/// terminal colours), `status` prints the running routes as a table, SIGHUP reloads.
#[test]
fn status_json_logs_and_sighup_through_the_binary() {
    let hp = free_port();
    let dir = tempfile::tempdir().unwrap();
    let (cfg, _, _) = quickstart_on_free_ports(dir.path());
    let mut bridge = edgebridge()
        .args([
            "run",
            "--log-format",
            "json",
            "--http",
            &format!("127.0.0.1:{hp}"),
            "-f",
        ])
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = || {
        edgebridge()
            .args(["status", "--http", &format!("127.0.0.1:{hp}")])
            .output()
            .unwrap()
    };
    let mut out = status();
    for _ in 0..100 {
        if out.status.success() && String::from_utf8_lossy(&out.stdout).contains(" ready") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        out = status();
    }
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        table.contains("healthy") && table.contains(" ready"),
        "{table}"
    );
    assert!(
        table.contains("ROUTE") && table.contains("MSG/S"),
        "{table}"
    );
    assert!(
        table.contains("telemetry") && table.contains("factory-gateway-commands"),
        "{table}"
    );
    assert!(table.contains("local connected"), "{table}");
    let _ = Command::new("kill")
        .arg("-HUP")
        .arg(bridge.id().to_string())
        .status();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(bridge.id().to_string())
        .status();
    assert!(bridge.wait().unwrap().success());
    let mut log = String::new();
    std::io::Read::read_to_string(&mut bridge.stderr.take().unwrap(), &mut log).unwrap();
    assert!(
        !log.contains('\u{1b}'),
        "no terminal colour codes when stderr is not a terminal"
    );
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let connected = lines
        .iter()
        .find(|l| l["message"] == "Connected")
        .expect("a Connected line");
    for key in ["timestamp", "level", "session", "client_id"] {
        assert!(!connected[key].is_null(), "{key} in {connected}");
    }
    assert!(
        lines.iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("Configuration reloaded"))),
        "SIGHUP reloads: {log}"
    );
}

/// The quick start on free ports with standard error going to `stderr`; returns the bridge
/// and its (local, remote) ports once the remote embedded broker accepts connections.
fn quickstart_with_stderr(
    stderr: std::process::Stdio,
    extra: &[&str],
) -> (std::process::Child, u16, u16) {
    let dir = tempfile::tempdir().unwrap().keep();
    let (cfg, lp, rp) = quickstart_on_free_ports(&dir);
    let mut bridge = edgebridge()
        .args(["run", "-f"])
        .arg(&cfg)
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", rp)).is_ok() {
            std::thread::sleep(std::time::Duration::from_millis(500));
            return (bridge, lp, rp);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = bridge.kill();
    let _ = bridge.wait();
    panic!("the quick start bridge did not come up");
}

/// Sends `n` messages from the local to the remote broker of a quick start bridge; how many
/// arrived.
fn cross(lp: u16, rp: u16, n: usize) -> usize {
    let sub = edgebridge()
        .args(["sub", "-b", &format!("127.0.0.1:{rp}"), "-t", "factory/#"])
        .args(["-C", &n.to_string(), "--wait", "10"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    let ok = edgebridge()
        .args([
            "pub",
            "-b",
            &format!("127.0.0.1:{lp}"),
            "-t",
            "factory/telemetry/x",
        ])
        .args(["-m", "m {n}", "-n", &n.to_string()])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "pub failed");
    let out = sub.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// SIGTERM; the exit status and how long it took (killed after 15 s).
fn terminate(
    mut bridge: std::process::Child,
) -> (Option<std::process::ExitStatus>, std::time::Duration) {
    let started = std::time::Instant::now();
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(bridge.id().to_string())
        .status();
    while started.elapsed() < std::time::Duration::from_secs(15) {
        if let Ok(Some(status)) = bridge.try_wait() {
            return (Some(status), started.elapsed());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = bridge.kill();
    let _ = bridge.wait();
    (None, started.elapsed())
}

/// SIGTERM, and the bridge exits with success within the bound of [`terminate`].
fn stop_cleanly(bridge: std::process::Child) {
    let (status, took) = terminate(bridge);
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?} after {took:?}"
    );
}

/// Standard error on a full disk: log lines are dropped and counted, the bridge forwards and
/// stops as usual (it used to panic at the first log line, exit 101).
#[test]
fn a_full_disk_under_standard_error_does_not_stop_the_bridge() {
    let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
        eprintln!("no /dev/full here; skipped");
        return;
    };
    let (mut bridge, lp, rp) = quickstart_with_stderr(full.into(), &["--log-level", "debug"]);
    assert!(
        bridge.try_wait().unwrap().is_none(),
        "the bridge is running"
    );
    assert_eq!(cross(lp, rp, 50), 50);
    stop_cleanly(bridge);
}

/// Standard error a pipe nobody reads (trace logging fills it at once): forwarding goes on
/// and SIGTERM stops the bridge within its bounds (it used to stop forwarding and ignore
/// SIGTERM).
#[test]
fn a_standard_error_nobody_reads_stops_neither_forwarding_nor_shutdown() {
    let (bridge, lp, rp) =
        quickstart_with_stderr(std::process::Stdio::piped(), &["--log-level", "trace"]);
    assert_eq!(cross(lp, rp, 300), 300);
    let (status, took) = terminate(bridge);
    assert!(
        status.is_some() && took < std::time::Duration::from_secs(10),
        "{status:?} after {took:?}"
    );
}

/// The log reader goes away (`edgebridge run … 2>&1 | head -1`): the bridge goes on.
#[test]
fn a_log_reader_that_went_away_does_not_stop_the_bridge() {
    let (mut bridge, lp, rp) =
        quickstart_with_stderr(std::process::Stdio::piped(), &["--log-level", "debug"]);
    let mut stderr = bridge.stderr.take().unwrap();
    let mut first = [0u8; 64];
    let _ = std::io::Read::read(&mut stderr, &mut first).unwrap();
    drop(stderr);
    assert_eq!(cross(lp, rp, 50), 50);
    assert!(
        bridge.try_wait().unwrap().is_none(),
        "the bridge is running"
    );
    let (status, took) = terminate(bridge);
    assert!(status.is_some(), "stopped after {took:?}");
}

/// `--max-inflight 0` would be announced as Receive Maximum 0, a protocol error: refused at
/// start with the range.
#[test]
fn a_max_inflight_of_zero_is_refused_at_start() {
    let out = edgebridge()
        .args(["run", "--max-inflight", "0", "-f"])
        .arg(quickstart())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--max-inflight") && stderr.contains("1..=65535"),
        "{stderr}"
    );
}

/// Mosquitto's own clients with their defaults (MQTT 3.1.1) against the quick start: the
/// embedded brokers take 3.1.1 and 5 on one port, and messages cross between them both ways
/// (a 3.1.1 client used to be cut off without a word).
#[test]
fn mosquitto_clients_with_their_defaults_cross_the_quick_start() {
    let has = Command::new("mosquitto_pub")
        .arg("--help")
        .output()
        .is_ok_and(|o| !o.stdout.is_empty() || !o.stderr.is_empty());
    assert!(
        has,
        "mosquitto_pub is not installed (scripts/test installs mosquitto-clients)"
    );
    let (bridge, lp, rp) = quickstart_with_stderr(std::process::Stdio::null(), &[]);
    let sub = |port: u16, topic: &str, version: &[&str]| {
        Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", topic])
            .args(version)
            .args(["-C", "1", "-W", "10", "-v"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let publish = |port: u16, topic: &str, msg: &str, version: &[&str]| {
        let ok = Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-t",
                topic,
                "-m",
                msg,
            ])
            .args(version)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mosquitto_pub {version:?} was refused");
    };
    let cases: [(&[&str], &[&str]); 3] = [
        (&[], &[]),
        (&["-V", "mqttv5"], &[]),
        (&[], &["-V", "mqttv5"]),
    ];
    for (pub_version, sub_version) in cases {
        let up = sub(rp, "factory/#", sub_version);
        std::thread::sleep(std::time::Duration::from_millis(500));
        publish(lp, "factory/telemetry/x", "hi", pub_version);
        let out = up.wait_with_output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "factory/telemetry/x hi\n",
            "publisher {pub_version:?}, subscriber {sub_version:?}"
        );
    }
    let down = sub(lp, "factory/commands", &[]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    publish(rp, "command/stop", "stop", &[]);
    let out = down.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "factory/commands stop\n"
    );
    stop_cleanly(bridge);
}

/// More route clients than the process may open connections for: `run` refuses to start and
/// says how many it needs (some routes used to start and the rest retry forever).
#[test]
fn run_refuses_more_route_clients_than_file_descriptors_allow() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("many.yaml");
    let mut text = std::fs::read_to_string(quickstart())
        .unwrap()
        .replace("127.0.0.1:1883", &format!("127.0.0.1:{}", free_port()))
        .replace("127.0.0.1:1884", &format!("127.0.0.1:{}", free_port()));
    for i in 0..100 {
        text.push_str(&format!(
            "    - direction: local-to-remote\n      name: r{i}\n      source: many/{i}/#\n"
        ));
    }
    std::fs::write(&cfg, text).unwrap();
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "ulimit -n 128 && exec {} run -f {}",
            env!("CARGO_BIN_EXE_edgebridge"),
            cfg.display()
        ))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("102 route client(s)") && stderr.contains("may open 128"),
        "{stderr}"
    );
}

/// The scheduling policy of every thread of process `pid` (field 41 of
/// `/proc/PID/task/TID/stat`), by thread name.
fn thread_policies(pid: u32) -> Vec<(String, Option<u32>)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        out.push((
            name.trim().to_string(),
            edgebridge::scheduling::policy_of(pid, tid),
        ));
    }
    out
}

/// `--scheduling batch` puts every thread of the bridge (runtime workers, log writer, embedded
/// brokers) under SCHED_BATCH, says so in the log, and the bridge forwards and stops as
/// usual; without it every thread keeps the policy the bridge was started with.
#[test]
fn scheduling_batch_applies_to_every_thread_of_the_bridge() {
    let own = edgebridge::scheduling::policy_of(std::process::id(), std::process::id())
        .expect("own policy readable");
    for (extra, want) in [(&["--scheduling", "batch"][..], 3), (&[][..], own)] {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stderr");
        let (bridge, lp, rp) =
            quickstart_with_stderr(std::fs::File::create(&log).unwrap().into(), extra);
        let threads = thread_policies(bridge.id());
        assert!(
            threads.len() >= 4,
            "runtime workers, log writer, embedded brokers: {threads:?}"
        );
        assert!(
            threads.iter().all(|(_, p)| *p == Some(want)),
            "{extra:?}: every thread's policy is {want}: {threads:?}"
        );
        assert_eq!(cross(lp, rp, 50), 50, "{extra:?}");
        stop_cleanly(bridge);
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(
            text.contains("Scheduling policy: SCHED_BATCH"),
            want == 3,
            "{text}"
        );
    }
}

/// An MQTT 3.1.1 client (the bridge's own codec over a plain socket) subscribed to `filter`
/// at QoS 0 on `port`, which reads nothing until asked: a subscriber that falls behind.
fn lagging_subscriber(port: u16, filter: &str) -> std::net::TcpStream {
    use edgebridge::model::QoS;
    use edgebridge::mqtt::codec::{self, ConnectSpec, Incoming, Outgoing, SubFilter, Version};
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let connect = Outgoing::Connect(Box::new(ConnectSpec {
        client_id: "lagging".into(),
        keep_alive: 60,
        clean_start: true,
        session_expiry: None,
        receive_maximum: None,
        max_packet_size: None,
        username: None,
        password: None,
        auth_method: None,
        auth_data: None,
    }));
    let subscribe = Outgoing::Subscribe {
        pkid: 1,
        filters: vec![SubFilter {
            filter: filter.into(),
            qos: QoS::AtMostOnce,
        }],
    };
    let mut rbuf = bytes::BytesMut::new();
    for packet in [connect, subscribe] {
        let mut wbuf = bytes::BytesMut::new();
        codec::encode(Version::V4, &packet, &mut wbuf, None).unwrap();
        s.write_all(&wbuf).unwrap();
        match next_packet(&mut s, &mut rbuf) {
            Some(Incoming::ConnAck(c)) => assert_eq!(c.code, 0, "CONNACK"),
            Some(Incoming::SubAck { codes, .. }) => assert_eq!(codes, [0], "SUBACK"),
            other => panic!("{other:?} instead of CONNACK or SUBACK"),
        }
    }
    s
}

/// The next packet `s` sends (read into `rbuf`), decoded by the bridge's codec; `None` at the
/// end of the stream or when the socket's read timeout passes first.
fn next_packet(
    s: &mut std::net::TcpStream,
    rbuf: &mut bytes::BytesMut,
) -> Option<edgebridge::mqtt::codec::Incoming> {
    use edgebridge::mqtt::codec::{self, Version};
    use std::io::Read;
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        if let Some(p) = codec::decode(Version::V4, rbuf, 1 << 20).unwrap() {
            return Some(p);
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => rbuf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Reads what `s` has until it is quiet for a second (at most 30 s); the PUBLISH packets in it.
fn publishes_read(s: &mut std::net::TcpStream) -> usize {
    s.set_read_timeout(Some(std::time::Duration::from_secs(1)))
        .unwrap();
    let started = std::time::Instant::now();
    let (mut rbuf, mut count) = (bytes::BytesMut::new(), 0);
    while started.elapsed() < std::time::Duration::from_secs(30) {
        match next_packet(s, &mut rbuf) {
            Some(edgebridge::mqtt::codec::Incoming::Publish { .. }) => count += 1,
            Some(_) => {}
            None => break,
        }
    }
    count
}

/// `GET /metrics` of the bridge serving on `port`; the value of `name`.
fn metric(port: u16, name: &str) -> Option<f64> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/metrics");
    let response = runtime
        .block_on(edgebridge::http_client::get(
            &url,
            &[],
            std::time::Duration::from_secs(5),
            16 << 20,
        ))
        .ok()?;
    String::from_utf8_lossy(&response.body)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// `embeddedLogSize` bounds the embedded broker's log per filter. A subscriber further behind
/// than that log skips to the oldest message kept: the skip is counted
/// (`edgebridge_embedded_log_skips_total`) and logged, not silent as in rumqttd. With the
/// default log the same lag loses nothing.
#[test]
fn a_subscriber_behind_the_embedded_broker_s_log_skips_and_is_counted() {
    let messages = 3000;
    let payload = format!("{}{{n}}", "x".repeat(4088)); // 4 KiB: 12 MB in all
    for (setting, skips) in [(Some("1Mi"), true), (None, false)] {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, lp, _) = quickstart_on_free_ports(dir.path());
        if let Some(size) = setting {
            let text = std::fs::read_to_string(&cfg).unwrap().replace(
                &format!("    endpoint: embedded://127.0.0.1:{lp}\n"),
                &format!("    endpoint: embedded://127.0.0.1:{lp}\n    embeddedLogSize: {size}\n"),
            );
            assert!(text.contains("embeddedLogSize"));
            std::fs::write(&cfg, text).unwrap();
        }
        let http = free_port();
        let log = dir.path().join("bridge.log");
        let bridge = edgebridge()
            .args(["run", "-f"])
            .arg(&cfg)
            .args(["--http", &format!("127.0.0.1:{http}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let up = (0..100).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(100));
            metric(http, "edgebridge_embedded_log_skips_total").is_some()
        });
        assert!(up, "{}", std::fs::read_to_string(&log).unwrap());
        let mut lagging = lagging_subscriber(lp, "lag/#");
        let published = edgebridge()
            .args(["pub", "-b", &format!("127.0.0.1:{lp}"), "-q", "0"])
            .args(["-t", "lag/x", "-m", &payload, "-n", &messages.to_string()])
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(published.success());
        std::thread::sleep(std::time::Duration::from_millis(500));
        let received = publishes_read(&mut lagging);
        // The bridge logs a skip within a second of it.
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let counted = metric(http, "edgebridge_embedded_log_skips_total").unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        let logged = text.contains("skipped to the oldest message kept");
        stop_cleanly(bridge);
        if skips {
            assert!(
                0 < received && received < messages,
                "{setting:?}: received {received} of {messages}"
            );
            assert!(counted >= 1.0, "{setting:?}: counted {counted}");
            assert!(logged, "{setting:?}: {text}");
        } else {
            assert_eq!(received, messages, "{setting:?}");
            assert_eq!(counted, 0.0, "{setting:?}");
            assert!(!logged, "{setting:?}: {text}");
        }
    }
}
