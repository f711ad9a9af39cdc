//! The configuration sources, each feeding the supervisor ([`crate::bridge::RunningBridge`]):
//! files and folders (reloaded when they change or on SIGHUP, [`crate::reload`]) and the
//! Kubernetes API ([`crate::kubernetes`]). Each produces a [`Config`]; the supervisor applies
//! it as a [`crate::plan`]. Also the HTTP endpoint's start beside the bridge.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::{error, info, warn};

use crate::bridge::{BridgeError, RunOptions, RunningBridge, resolve_instance, start};
use crate::config::{self, Config, LoadOptions};
use crate::counters::{ReloadOutcome, Stats};
use crate::status::Observed;
use crate::{http, kubernetes, reload};

/// Where the configuration comes from, so that it can be read again.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    /// The `-f` files and folders.
    pub files: Vec<PathBuf>,
    /// Where secrets and ConfigMaps are.
    pub load: LoadOptions,
}

/// Runs `config` until `shutdown` completes, then drains and stops. With a `source`, the
/// configuration is reloaded when its files change or on SIGHUP; with `opts.http`, the
/// endpoints are served.
pub async fn run(
    config: &Config,
    source: Option<&ConfigSource>,
    opts: &RunOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), BridgeError> {
    let mut bridge = start_serving(config, opts).await?;
    let mut triggers = source.map(|s| reload::Triggers::start(&s.files));
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(()) = async {
                match &mut triggers {
                    Some(t) => t.next().await,
                    None => std::future::pending().await,
                }
            } => {
                if let Some(source) = source {
                    reload_from(&mut bridge, source).await;
                }
            }
            _ = tick.tick() => bridge.check_tasks(),
        }
    }
    info!("Shutting down: finishing in-flight messages");
    bridge.shutdown().await;
    Ok(())
}

/// Runs what the Kubernetes API server has (`edgebridge run --kubernetes`): the
/// `MqttBridgeConnector` and `MqttBridgeTopicMap` resources of the namespace, applied as a
/// difference whenever they change, each resource's status written back (by instance 0),
/// until `shutdown` completes.
pub async fn run_kubernetes(
    client: kube::Client,
    namespace: &str,
    load: &LoadOptions,
    opts: &RunOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), BridgeError> {
    let mut bridge = start_serving(&Config::default(), opts).await?;
    info!(
        namespace,
        "Watching MqttBridgeConnector and MqttBridgeTopicMap resources"
    );
    let mut snapshots = kubernetes::watch(client.clone(), namespace);
    let mut writer = kubernetes::StatusWriter::new(client);
    let mut last_good = std::collections::BTreeMap::new();
    let mut seen: (Vec<kubernetes::Resource>, Vec<kubernetes::Verdict>) = Default::default();
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(resources) = snapshots.recv() => {
                // Our own status writes come back as changes: nothing to apply.
                if resources == seen.0 && !seen.0.is_empty() {
                    continue;
                }
                let (config, mut verdicts) = kubernetes::assemble(&resources, load, &mut last_good);
                for v in verdicts.iter().filter(|v| !v.errors.is_empty()) {
                    for e in &v.errors {
                        error!(resource = %v.label, "Not run as written: {e}");
                    }
                }
                match bridge.reload(config).await {
                    Ok(summary) => {
                        info!("Configuration applied: {summary}");
                        let errors = verdicts.iter().flat_map(|v| v.errors.iter().map(|e| format!("{}: {e}", v.label))).collect();
                        record_reload(&bridge.stats, true, errors, summary.to_string());
                    }
                    Err(e) => {
                        // Nothing changed; every resource says why.
                        let text = crate::error::chain(&e);
                        error!("Configuration not applied: {text}");
                        for v in &mut verdicts {
                            v.errors.push(format!("not applied: {}", text.replace('\n', "; ")));
                        }
                        let errors = text.lines().map(str::to_string).collect();
                        record_reload(&bridge.stats, false, errors, String::new());
                    }
                }
                seen = (resources, verdicts);
                write_statuses(&mut writer, &bridge, &seen).await;
            }
            _ = tick.tick() => {
                bridge.check_tasks();
                write_statuses(&mut writer, &bridge, &seen).await;
            }
        }
    }
    info!("Shutting down: finishing in-flight messages");
    bridge.shutdown().await;
    Ok(())
}

/// Writes the resources' status (instance 0 of each connector only; see
/// [`kubernetes::StatusWriter`]).
async fn write_statuses(
    writer: &mut kubernetes::StatusWriter,
    bridge: &RunningBridge,
    (resources, verdicts): &(Vec<kubernetes::Resource>, Vec<kubernetes::Verdict>),
) {
    let statuses = writer.statuses(
        resources,
        verdicts,
        &bridge.config,
        &bridge.stats,
        bridge.opts.instance,
    );
    // A connector's status is written by the instance that runs its index 0; a topic map's by
    // instance 0 of its connector, or by anyone when it has none.
    let mine: Vec<(usize, serde_json::Value)> = statuses
        .into_iter()
        .filter(|(i, _)| {
            let r = &resources[*i];
            let name = if r.kind == kubernetes::KINDS[0].0 {
                Some(r.name.clone())
            } else {
                r.spec
                    .get("mqttBridgeConnectorRef")
                    .and_then(|v| v.as_str())
                    .map(str::to_string)
            };
            match name.and_then(|n| bridge.config.connectors.iter().find(|c| c.name == n)) {
                Some(c) => resolve_instance(c, bridge.opts.instance).unwrap_or(0) == 0,
                None => bridge.opts.instance.unwrap_or(0) == 0,
            }
        })
        .collect();
    writer.write(resources, mine).await;
}

/// Starts `config` and, with `opts.http`, the HTTP endpoint.
async fn start_serving(config: &Config, opts: &RunOptions) -> Result<RunningBridge, BridgeError> {
    let listener = match opts.http {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| BridgeError::Http { addr, source })?,
        ),
        None => None,
    };
    let started = std::time::SystemTime::now();
    let mut bridge = start(config, opts).await?;
    if let Some(listener) = listener {
        let observed = Arc::new(Observed {
            stats: bridge.stats.clone(),
            plugins: bridge.plugins.clone(),
            stall_timeout: opts.stall_timeout,
            started,
        });
        if let Ok(addr) = listener.local_addr() {
            info!(address = %addr, "Serving /metrics, /healthz, /readyz and /status");
        }
        let stop = bridge.stop.subscribe();
        bridge.background.push((
            "HTTP endpoint".into(),
            tokio::spawn(http::serve(listener, http::router(observed), stop)),
        ));
    }
    Ok(bridge)
}

/// Reads the configuration again and applies it; a configuration with problems changes
/// nothing (every problem is logged as `check` prints it and counted).
pub async fn reload_from(bridge: &mut RunningBridge, source: &ConfigSource) {
    let outcome = match config::load(&source.files, &source.load) {
        Err(report) => {
            for e in &report.errors {
                error!("Configuration not reloaded: {e}");
            }
            Err(report.errors.iter().map(ToString::to_string).collect())
        }
        Ok(new) => {
            for w in new.warnings() {
                warn!("{w}");
            }
            match bridge.reload(new).await {
                Ok(summary) => {
                    info!("Configuration reloaded: {summary}");
                    Ok(summary)
                }
                Err(e) => {
                    let text = crate::error::chain(&e);
                    for line in text.lines() {
                        error!("Configuration not reloaded: {line}");
                    }
                    Err(text.lines().map(str::to_string).collect())
                }
            }
        }
    };
    let stats = &bridge.stats;
    match outcome {
        Ok(summary) => record_reload(stats, true, Vec::new(), summary.to_string()),
        Err(errors) => record_reload(stats, false, errors, String::new()),
    }
}

/// Counts a reload, applied or refused, and keeps its outcome for `/status`: the problems
/// found, and what changed (`summary`) or that nothing did.
fn record_reload(stats: &Stats, applied: bool, errors: Vec<String>, summary: String) {
    let (counter, summary) = if applied {
        (&stats.reloads_ok, summary)
    } else {
        (
            &stats.reloads_failed,
            "refused; the running configuration is unchanged".to_string(),
        )
    };
    counter.fetch_add(1, Ordering::Relaxed);
    *stats.last_reload.lock().expect("stats lock") = Some(ReloadOutcome {
        at: std::time::SystemTime::now(),
        errors,
        summary,
    });
}
