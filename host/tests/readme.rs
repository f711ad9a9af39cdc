//! The shell blocks of the README and of `docs/`, replayed through the real binary: the quick
//! start, the shipped plugins, and writing a plugin outside the repository (`plugin new` to a
//! message crossing); and every relative link of the documentation resolved.
//!
//! A block marked `<!-- replay: NAME -->` is run by bash as it is written, with only these
//! changes, so that it runs beside other tests and without a terminal:
//! - `edgebridge` is the binary under test, on the PATH (`cargo run --release --` is replaced
//!   by it);
//! - the brokers' ports 1883 / 1884 become free ports (in the block and in a copy of the
//!   `examples/` file it runs), `/tmp/eb-plugins` and `/tmp/eb-spool` folders of the test;
//! - `scripts/test` is skipped (it is what CI runs; replaying it here would recurse);
//! - `edgebridge run` goes to the background (as in its own terminal) with `--http`, and the
//!   next line waits until `/status` says ready; a `sub … &` is followed by a wait for its
//!   `subscribed to` line (a person typing gives it that time);
//! - at the end the subscribers are waited for and the bridge is stopped with SIGTERM.
//!
//! Full-line comments of a block are the output it promises: each must be found in a line of
//! what the block printed.

mod common;
use common::{free_port, repo};

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The documentation: the README, then `docs/*.md` in name order.
fn documents() -> Vec<std::path::PathBuf> {
    let mut docs: Vec<std::path::PathBuf> = std::fs::read_dir(repo().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    let mut all = vec![repo().join("README.md")];
    all.extend(docs);
    all
}

/// The `sh` blocks marked `<!-- replay: name -->` in the documentation, in order.
fn blocks(name: &str) -> Vec<Vec<String>> {
    let text: String = documents()
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap() + "\n")
        .collect();
    let marker = format!("<!-- replay: {name} -->");
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.trim() != marker {
            continue;
        }
        assert_eq!(lines.next().map(str::trim), Some("```sh"), "{marker}");
        let block: Vec<String> = lines
            .by_ref()
            .take_while(|l| l.trim() != "```")
            .map(str::to_string)
            .collect();
        out.push(block);
    }
    assert!(!out.is_empty(), "no {marker} block in the README or docs/");
    out
}

struct Replay {
    script: String,
    expected: Vec<String>,
    dir: tempfile::TempDir,
}

fn prepare(name: &str) -> Replay {
    let dir = tempfile::tempdir().unwrap();
    let (lp, rp, hp) = (free_port(), free_port(), free_port());
    let ports = |s: &str| {
        s.replace("127.0.0.1:1883", &format!("127.0.0.1:{lp}"))
            .replace("127.0.0.1:1884", &format!("127.0.0.1:{rp}"))
            .replace(
                "/tmp/eb-plugins",
                &dir.path().join("eb-plugins").display().to_string(),
            )
            .replace(
                "/tmp/eb-spool",
                &dir.path().join("eb-spool").display().to_string(),
            )
    };
    let mut script = format!(
        r#"set -euo pipefail
export PS4='+ [$(date +%s.%N)] '
SUBS=""; BRIDGES=""
trap 'kill $BRIDGES $SUBS 2>/dev/null || true' EXIT
wait_ready() {{
  for _ in $(seq 600); do
    if edgebridge status --http 127.0.0.1:{hp} --json 2>/dev/null | grep -q '"ready": true'; then return 0; fi
    sleep 0.1
  done
  echo "replay: the bridge did not become ready; its log:" >&2; cat "$REPLAY_DIR/bridge.log" >&2; return 1
}}
wait_subscribed() {{
  for _ in $(seq 600); do
    if [ "$(grep -c '^subscribed to' "$REPLAY_DIR/sub.err" 2>/dev/null || true)" -ge "$1" ]; then return 0; fi
    sleep 0.1
  done
  echo "replay: a subscriber did not subscribe:" >&2; cat "$REPLAY_DIR/sub.err" >&2; return 1
}}
set -x
"#
    );
    let mut expected = Vec::new();
    let mut subs = 0;
    for block in blocks(name) {
        let mut heredoc: Option<String> = None;
        for raw in block {
            if let Some(end) = &heredoc {
                if raw.trim() == end {
                    heredoc = None;
                }
                script.push_str(&ports(&raw));
                script.push('\n');
                continue;
            }
            let trimmed = raw.trim();
            if let Some(out) = trimmed.strip_prefix("# ") {
                expected.push(out.trim().to_string());
                continue;
            }
            if trimmed.is_empty() || trimmed.starts_with("scripts/test") {
                continue;
            }
            let mut line = ports(&raw).replace("cargo run --release -- ", "edgebridge ");
            // An example file: run a copy with the ports changed.
            if let Some(at) = line.find("-f examples/") {
                let rel = line[at + 3..]
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .to_string();
                let copy = dir.path().join(&rel);
                std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
                let text = std::fs::read_to_string(repo().join(&rel)).unwrap();
                std::fs::write(&copy, ports(&text)).unwrap();
                line = line.replacen(&rel, &copy.display().to_string(), 1);
            }
            if let Some(at) = line.find("<<'") {
                let end = line[at + 3..].split('\'').next().unwrap().to_string();
                heredoc = Some(end);
            }
            // The command without its trailing comment, to see whether it ends with `&`.
            let command = match line.find("  #") {
                Some(at) => line[..at].trim_end().to_string(),
                None => line.trim_end().to_string(),
            };
            let background = command.ends_with('&');
            let command = command.trim_end_matches('&').trim_end().to_string();
            if command.trim_start().starts_with("edgebridge run ") {
                script.push_str(&format!(
                    "{command} --http 127.0.0.1:{hp} 2>>\"$REPLAY_DIR/bridge.log\" &\nBRIDGES=\"$BRIDGES $!\"\nwait_ready\n"
                ));
            } else if background {
                subs += 1;
                script.push_str(&format!(
                    "{command} 2>>\"$REPLAY_DIR/sub.err\" &\nSUBS=\"$SUBS $!\"\nwait_subscribed {subs}\n"
                ));
            } else {
                script.push_str(&line);
                script.push('\n');
            }
        }
    }
    script.push_str(
        "for p in $SUBS; do wait $p; done\nSUBS=\"\"\nif [ -n \"$BRIDGES\" ]; then kill -TERM $BRIDGES; wait $BRIDGES; fi\nBRIDGES=\"\"\n",
    );
    Replay {
        script,
        expected,
        dir,
    }
}

/// Runs the replay from `cwd` within `limit`; returns stdout after checking the promised
/// lines. On failure the panic shows the script, its output and its trace.
fn run(r: &Replay, cwd: &Path, limit: Duration) -> String {
    let out_path = r.dir.path().join("stdout");
    let err_path = r.dir.path().join("stderr");
    // `edgebridge` on the PATH, as after `cargo install --path host`.
    let bin = r.dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let link = bin.join("edgebridge");
    if !link.exists() {
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_edgebridge"), &link).unwrap();
    }
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(&r.script)
        .current_dir(cwd)
        .env("PATH", path)
        .env("REPLAY_DIR", r.dir.path())
        .env("TMPDIR", r.dir.path())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap());
    // What a reader's shell would not have: the settings of the `cargo test` running us.
    for var in [
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_MANIFEST_DIR",
        "CARGO_PKG_NAME",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if started.elapsed() > limit {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(format!("-{}", child.id()))
                .status();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let report = format!(
        "--- script\n{}\n--- stdout\n{stdout}\n--- stderr (trace)\n{stderr}",
        r.script
    );
    match status {
        None => panic!("the replay did not finish within {limit:?}\n{report}"),
        Some(s) if !s.success() => panic!("the replay failed ({s})\n{report}"),
        Some(_) => {}
    }
    let mut lines: Vec<&str> = stdout.lines().collect();
    for want in &r.expected {
        match lines.iter().position(|l| l.contains(want.as_str())) {
            Some(i) => {
                lines.remove(i);
            }
            None => panic!("the README promises the output line \"{want}\"\n{report}"),
        }
    }
    print_times(&stderr);
    stdout
}

/// The time each traced command took (from bash's trace), for the record.
fn print_times(trace: &str) {
    let mut last: Option<(f64, String)> = None;
    for line in trace.lines() {
        let Some(rest) = line.strip_prefix("+ [") else {
            continue;
        };
        let Some((at, command)) = rest.split_once("] ") else {
            continue;
        };
        let Ok(at) = at.parse::<f64>() else { continue };
        if let Some((t, c)) = last.take()
            && at - t >= 0.05
        {
            eprintln!("{:>8.2} s  {c}", at - t);
        }
        last = Some((at, command.chars().take(110).collect()));
    }
}

#[test]
fn the_quick_start_replays() {
    let r = prepare("quickstart");
    assert!(r.script.contains("wait_ready"), "{}", r.script);
    assert_eq!(r.expected.len(), 4, "{:?}", r.expected);
    run(&r, &repo(), Duration::from_secs(120));
}

#[test]
fn the_spool_walkthrough_replays() {
    let r = prepare("spool");
    run(&r, &repo(), Duration::from_secs(120));
}

/// `plugin new --aggregator` tested natively, then the shipped `window-average` turning a
/// 10 Hz sensor into a 10-second average at the cloud broker.
#[test]
fn the_aggregator_walkthrough_replays() {
    let r = prepare("aggregate");
    let out = run(&r, &repo(), Duration::from_secs(900));
    assert!(out.contains("\"count\":"), "{out}");
}

#[test]
fn the_shipped_plugins_replay() {
    let r = prepare("plugins");
    run(&r, &repo(), Duration::from_secs(600));
}

/// `plugin new` in a fresh folder outside the repository, built with cargo from scratch (its
/// own target folder: the SDK's dependencies compile once), tested, installed and used by a
/// running bridge.
#[test]
fn the_plugin_walkthrough_replays() {
    let r = prepare("walkthrough");
    assert!(r.script.contains("plugin new site-prefix"), "{}", r.script);
    let out = run(&r, &repo(), Duration::from_secs(900));
    assert!(out.contains("test result: ok. 3 passed"), "{out}");
}

/// `cargo component build --release` builds what `plugin new` makes, and the bridge's engine
/// runs the component. Needs cargo-component (0.21.1 was checked); without it the test says
/// so and checks nothing.
#[test]
fn cargo_component_builds_a_new_plugin() {
    let has = Command::new("cargo")
        .args(["component", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has {
        eprintln!("cargo-component is not installed: nothing checked");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_edgebridge");
    let ok = Command::new(bin)
        .args(["plugin", "new", "via-component", "--filter"])
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(ok.success());
    let krate = dir.path().join("via-component");
    let mut build = Command::new("cargo");
    build
        .args(["component", "build", "--release"])
        .current_dir(&krate);
    for var in [
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
    ] {
        build.env_remove(var);
    }
    let out = build.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let wasm = krate.join("target/wasm32-wasip1/release/via_component.wasm");
    let out = Command::new(bin)
        .arg("plugin")
        .arg("test")
        .arg(&wasm)
        .args(["--config", r#"{"maxBytes": 4}"#, "-m", "12345"])
        .args(["--policies-dir", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("via-component (message-filter)"),
        "{stdout}"
    );
    assert!(stdout.contains("  drop: filtered out"), "{stdout}");
}

/// The anchor GitHub gives a heading: lower case, spaces to `-`, punctuation but `-` and `_`
/// dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// Every relative link of the README, `docs/`, CONTRIBUTING.md and the plugin, policy and WIT
/// references points at a file or folder that exists, and a `#anchor` at a heading of it.
#[test]
fn every_relative_link_of_the_documentation_resolves() {
    let mut files = documents();
    for f in [
        "CONTRIBUTING.md",
        "plugins/README.md",
        "policies/README.md",
        "wit/README.md",
    ] {
        files.push(repo().join(f));
    }
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let mut in_code = false;
        for line in text.lines() {
            if line.trim_start().starts_with("```") {
                in_code = !in_code;
            }
            if in_code {
                continue;
            }
            let mut rest = line;
            while let Some(at) = rest.find("](") {
                rest = &rest[at + 2..];
                let Some(end) = rest.find(')') else { break };
                let target = &rest[..end];
                rest = &rest[end..];
                if target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                checked += 1;
                let (path, frag) = match target.split_once('#') {
                    Some((p, f)) => (p, Some(f)),
                    None => (target, None),
                };
                let resolved = if path.is_empty() {
                    file.clone()
                } else {
                    file.parent().unwrap().join(path)
                };
                if !resolved.exists() {
                    broken.push(format!("{}: {target} (no such file)", file.display()));
                    continue;
                }
                if let Some(frag) = frag
                    && resolved.is_file()
                {
                    let doc = std::fs::read_to_string(&resolved).unwrap();
                    let found = doc
                        .lines()
                        .filter_map(|l| l.trim_start().strip_prefix('#'))
                        .map(|h| anchor(h.trim_start_matches('#')))
                        .any(|a| a == frag);
                    if !found {
                        broken.push(format!("{}: {target} (no such heading)", file.display()));
                    }
                }
            }
        }
    }
    assert!(checked > 30, "only {checked} links found");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}
