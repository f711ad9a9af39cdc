//! Builds the plugins workspace for wasm32-wasip2 so the tests run real plugin components
//! built from `plugins/`. The components land in `plugins/target/wasm32-wasip2/release/`
//! (shared by `cargo clippy` and `cargo test`, so they build once); the folder is passed to
//! the tests as `EDGEBRIDGE_PLUGIN_ARTIFACTS`.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    let plugins = root.join("plugins");
    for watched in [
        "wit",
        "plugins/Cargo.toml",
        "plugins/Cargo.lock",
        "plugins/sdk",
        "plugins/topic-template",
        "plugins/json-filter",
        "plugins/enrich",
        "plugins/dedupe",
        "plugins/fan-out",
        "plugins/fixtures",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    let target_dir = plugins.join("target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&plugins)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--workspace",
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    // Settings of the outer build that must not leak into the guest build.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    let out = cmd.output().expect("run cargo to build the plugins");
    if !out.status.success() {
        panic!(
            "building plugins/ for wasm32-wasip2 failed (is the target installed? `rustup target add wasm32-wasip2`):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    println!(
        "cargo:rustc-env=EDGEBRIDGE_PLUGIN_ARTIFACTS={}",
        target_dir.join("wasm32-wasip2/release").display()
    );
}
