//! The plugin author's commands through the binary, on the real components of `plugins/`:
//! `plugin test` (log lines, decisions, times, messages from a file, exit code), `plugin
//! install`, `plugins list` and `check`'s plugin problems.

mod common;
use common::repo;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The components of `plugins/`, built with the README's command (nothing to do when the
/// integration tests' build script built them already).
fn artifacts() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let target = repo().join("plugins/target");
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["build", "--manifest-path"])
            .arg(repo().join("plugins/Cargo.toml"))
            .args(["--target", "wasm32-wasip2", "--release", "--workspace"])
            .arg("--target-dir")
            .arg(&target);
        for var in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_BUILD_TARGET"] {
            cmd.env_remove(var);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        target.join("wasm32-wasip2/release")
    })
}

fn edgebridge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgebridge"))
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn wasm(name: &str) -> String {
    artifacts().join(name).display().to_string()
}

fn policies() -> String {
    repo().join("policies").display().to_string()
}

#[test]
fn plugin_test_shows_the_plugins_log_each_decision_and_fails_when_it_fails() {
    let misbehave = wasm("misbehave.wasm");
    let o = edgebridge(&["plugin", "test", &misbehave, "-m", "log"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("plugin misbehave (route-mapper)"), "{out}");
    assert!(out.contains("init with {}: ok"), "{out}");
    assert!(out.contains("  log info: asked to log\n"), "{out}");
    assert!(out.contains("  log warn: and to warn\n"), "{out}");
    assert!(
        out.contains("  pass: forward unchanged to factory/line1/telemetry  ["),
        "{out}"
    );
    assert!(out.contains(" µs]"), "{out}");

    let o = edgebridge(&["plugin", "test", &misbehave, "-m", "err"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(
        out.contains("  error: plugin \"misbehave\" returned an error: asked to fail"),
        "{out}"
    );
    assert!(err.contains("the plugin failed on a message"), "{err}");

    let o = edgebridge(&["plugin", "test", &misbehave, "-m", "panic"]);
    assert_eq!(o.status.code(), Some(1), "{:?}", text(&o));
    assert!(text(&o).0.contains("trapped"), "{:?}", text(&o));

    let o = edgebridge(&[
        "plugin",
        "test",
        &misbehave,
        "--config",
        r#"{"failInit": true}"#,
    ]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(err.contains("failInit is set"), "{err}");
}

#[test]
fn plugin_test_takes_messages_from_json_lines_files_and_properties() {
    let dir = tempfile::tempdir().unwrap();
    let lines = dir.path().join("readings.jsonl");
    std::fs::write(
        &lines,
        "# two readings\n{\"topic\": \"plant/a\", \"payload\": {\"severity\": 4}}\n{\"topic\": \"plant/b\", \"payload\": {\"severity\": 1}, \"qos\": 0}\n",
    )
    .unwrap();
    let filter = wasm("json_filter.wasm");
    let o = edgebridge(&[
        "plugin",
        "test",
        &filter,
        "--config",
        r#"{"field": "severity", "min": 3}"#,
        "--messages",
        lines.to_str().unwrap(),
        "--repeat",
        "20",
        "--policies-dir",
        &policies(),
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("plugin json-filter (message-filter)"), "{out}");
    assert!(
        out.contains("message 1: plant/a (14 bytes, qos 1)"),
        "{out}"
    );
    assert!(
        out.contains("  pass: forward unchanged to plant/a"),
        "{out}"
    );
    assert!(
        out.contains("message 2: plant/b (14 bytes, qos 0)"),
        "{out}"
    );
    assert!(out.contains("  drop: filtered out"), "{out}");
    assert_eq!(out.matches("  20 more calls: median ").count(), 2, "{out}");

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"topic\": \"a/+\"}\n").unwrap();
    let o = edgebridge(&[
        "plugin",
        "test",
        &filter,
        "--messages",
        bad.to_str().unwrap(),
    ]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("bad.jsonl:1: topic \"a/+\""), "{err}");

    let payload = dir.path().join("reading.json");
    std::fs::write(&payload, r#"{"v": 21.5}"#).unwrap();
    let at = format!("@{}", payload.display());
    let o = edgebridge(&[
        "plugin",
        "test",
        &wasm("enrich.wasm"),
        "--config",
        r#"{"userProperties": {"site": "s7"}, "envelope": true}"#,
        "-m",
        &at,
        "-p",
        "unit=C",
        "--topic",
        "plant/temp",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains(r#"\"payload\":{\"v\":21.5}"#), "{out}");
    assert!(out.contains("      user property unit: C\n"), "{out}");
    assert!(out.contains("      user property site: s7\n"), "{out}");
    assert!(
        out.contains("      content type: application/json"),
        "{out}"
    );
}

#[test]
fn plugin_install_checks_then_copies_under_the_plugin_name() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    let plugins_arg = plugins.display().to_string();
    let o = edgebridge(&[
        "plugin",
        "install",
        &wasm("topic_template.wasm"),
        "--plugins-dir",
        &plugins_arg,
        "--policies-dir",
        &policies(),
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(
        out.starts_with("installed topic-template (route-mapper, "),
        "{out}"
    );
    let names: Vec<String> = std::fs::read_dir(&plugins)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["topic-template.wasm"]);

    // A file that does not load is not installed, and leaves nothing behind.
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"not a component").unwrap();
    let o = edgebridge(&[
        "plugin",
        "install",
        junk.to_str().unwrap(),
        "--plugins-dir",
        &plugins_arg,
    ]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("not installed: ") && err.contains("junk.wasm"),
        "{err}"
    );
    // One that imports what its policy does not grant (kv) neither.
    let o = edgebridge(&[
        "plugin",
        "install",
        &wasm("kv_user.wasm"),
        "--plugins-dir",
        &plugins_arg,
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).1.contains("edgebridge:plugin/kv"),
        "{:?}",
        text(&o)
    );
    assert_eq!(std::fs::read_dir(&plugins).unwrap().count(), 1);

    let o = edgebridge(&["plugins", "list", "--plugins-dir", &plugins_arg]);
    let (out, _) = text(&o);
    assert!(o.status.success());
    assert!(
        out.starts_with("topic-template       route-mapper"),
        "{out}"
    );
    let missing = dir.path().join("nowhere");
    let o = edgebridge(&[
        "plugins",
        "list",
        "--plugins-dir",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).1.contains("nowhere: No such file"),
        "{:?}",
        text(&o)
    );
}

#[test]
fn check_places_plugin_problems_at_the_route_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(wasm("json_filter.wasm"), plugins.join("json-filter.wasm")).unwrap();
    let cfg = dir.path().join("bridge.yaml");
    let text_cfg = std::fs::read_to_string(repo().join("examples/plugins.yaml"))
        .unwrap()
        .replace("{ field: severity, min: 3 }", "{ field: severity, mni: 3 }");
    std::fs::write(&cfg, text_cfg).unwrap();
    let line = std::fs::read_to_string(&cfg)
        .unwrap()
        .lines()
        .position(|l| l.contains("name: alerts"))
        .unwrap();
    let check = || {
        edgebridge(&[
            "check",
            "-f",
            cfg.to_str().unwrap(),
            "--plugins-dir",
            plugins.to_str().unwrap(),
            "--policies-dir",
            &policies(),
        ])
    };
    let o = check();
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    // The route's entry starts on the line before its `name:`.
    let want = format!(
        "{}:{}: plugin \"json-filter\" on route \"alerts\": invalid config: unknown field `mni`",
        cfg.display(),
        line
    );
    assert!(err.contains(&want), "{want}\n{err}");
    assert!(err.contains("1 problem(s) found."), "{err}");

    // Plugins not in the folder are warnings at their routes; the configuration is valid.
    let good = std::fs::read_to_string(repo().join("examples/plugins.yaml")).unwrap();
    std::fs::write(&cfg, good).unwrap();
    let o = check();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(
        err.contains(&format!("{}:", cfg.display()))
            && err.contains("warning: route \"alerts\" uses plugin \"topic-template\""),
        "{err}"
    );
}
