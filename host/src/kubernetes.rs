//! Kubernetes as a configuration source (`edgebridge run --kubernetes`): the bridge watches
//! `MqttBridgeConnector` and `MqttBridgeTopicMap` resources in its namespace — under every
//! group and version the CRDs serve — through the API server, runs them exactly as if the same
//! documents were files (same parser, same validation, the field named), and writes each
//! resource's `status` back.
//!
//! The parts:
//! - [`watch`]: one kube-runtime watcher per (group, version, kind). It lists, then watches
//!   from the list's resource version; it relists after `410 Gone`, resumes after dropped
//!   connections and API server restarts, with kube-runtime's bounded backoff. The resources
//!   it sees are sent as a whole snapshot (debounced), never as a half-applied change.
//! - [`assemble`]: a snapshot → one [`Config`] and a [`Verdict`] per resource. Each connector
//!   is parsed with the topic maps that reference it, so a broken resource breaks only its
//!   own connector (which keeps running its last valid version, if it had one); the others
//!   run.
//! - [`StatusWriter`]: `status` (observedGeneration, `Ready` and `Degraded` conditions, the
//!   routes with their instance and state, the last error), patched with a JSON merge patch on
//!   the status subresource when it changed, at most once per [`STATUS_INTERVAL`] per
//!   resource, by instance 0 only.
//!
//! The client is configured the standard way (kube's `Config::infer`): the in-cluster service
//! account, or `KUBECONFIG` / `~/.kube/config`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::config::{Config, Connector, LoadOptions, parse};
use crate::counters::Stats;
use crate::routing;

/// The groups and versions the CRDs serve (`deploy/kubernetes/base/crds.yaml`).
pub const GROUP_VERSIONS: [(&str, &str); 3] = [
    ("mq.iotoperations.azure.com", "v1beta1"),
    ("az-edge.com", "v1alpha4"),
    ("e4kpreview.com", "v1alpha4"),
];

/// The two kinds, with their plural resource names.
pub const KINDS: [(&str, &str); 2] = [
    ("MqttBridgeConnector", "mqttbridgeconnectors"),
    ("MqttBridgeTopicMap", "mqttbridgetopicmaps"),
];

/// Wait after a change for the changes that come with it (one `kubectl apply -f` of a file
/// with both kinds is two events).
pub const DEBOUNCE: Duration = Duration::from_millis(300);
/// The least time between two status writes of one resource.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(2);
/// Time limit of one status write.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

/// Failures of the Kubernetes source.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// No client configuration: neither in-cluster nor a kubeconfig.
    #[error(
        "no Kubernetes client configuration (in a pod: the service account; elsewhere: KUBECONFIG or ~/.kube/config)"
    )]
    Config(#[source] kube::config::InferConfigError),
    /// The client could not be built from the configuration.
    #[error("cannot build the Kubernetes client")]
    Client(#[source] kube::Error),
}

/// One resource as the API server has it.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    /// `MqttBridgeConnector` or `MqttBridgeTopicMap`.
    pub kind: String,
    /// API group.
    pub group: String,
    /// API version.
    pub version: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// `spec`.
    pub spec: Value,
}

impl Resource {
    fn from_object(kind: &str, group: &str, version: &str, o: &DynamicObject) -> Resource {
        Resource {
            kind: kind.to_string(),
            group: group.to_string(),
            version: version.to_string(),
            namespace: o.metadata.namespace.clone().unwrap_or_default(),
            name: o.metadata.name.clone().unwrap_or_default(),
            generation: o.metadata.generation,
            spec: o.data.get("spec").cloned().unwrap_or(Value::Null),
        }
    }

    /// `Kind namespace/name` (the "file" of its configuration errors).
    pub fn label(&self) -> String {
        format!("{} {}/{}", self.kind, self.namespace, self.name)
    }

    /// The document the parser reads: JSON is YAML.
    fn document(&self) -> String {
        let doc = json!({
            "apiVersion": format!("{}/{}", self.group, self.version),
            "kind": self.kind,
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": self.spec,
        });
        serde_json::to_string_pretty(&doc).unwrap_or_default()
    }

    fn api_resource(&self) -> ApiResource {
        let plural = KINDS
            .iter()
            .find(|(k, _)| *k == self.kind)
            .map(|(_, p)| *p)
            .unwrap_or("");
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(&self.group, &self.version, &self.kind),
            plural,
        )
    }
}

/// A Kubernetes client from the standard configuration, and its namespace (`namespace`, or
/// the service account's / kubeconfig context's, or `default`).
pub async fn client(namespace: Option<String>) -> Result<(kube::Client, String), KubeError> {
    let config = kube::Config::infer().await.map_err(KubeError::Config)?;
    let ns = namespace.unwrap_or_else(|| config.default_namespace.clone());
    let client = kube::Client::try_from(config).map_err(KubeError::Client)?;
    Ok((client, ns))
}

type Key = (String, String, String, String);

/// Watches both kinds under every group and version in `namespace`; each change (debounced)
/// sends the whole set of resources. The task ends when the receiver is dropped.
pub fn watch(client: kube::Client, namespace: &str) -> mpsc::Receiver<Vec<Resource>> {
    let (tx, rx) = mpsc::channel(4);
    let mut streams = Vec::new();
    for (group, version) in GROUP_VERSIONS {
        for (kind, plural) in KINDS {
            let ar = ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk(group, version, kind),
                plural,
            );
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &ar);
            let stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .map(move |e| (kind, group, version, e));
            streams.push(stream.boxed());
        }
    }
    let ns = namespace.to_string();
    tokio::spawn(async move {
        let mut all = futures::stream::select_all(streams);
        // Objects by (kind, group, name, version); an initial listing in progress per stream.
        let mut store: BTreeMap<Key, Resource> = BTreeMap::new();
        let mut listing: HashMap<(String, String, String), Vec<Resource>> = HashMap::new();
        let mut synced: std::collections::HashSet<(String, String, String)> = Default::default();
        let mut dirty = false;
        let mut said: HashMap<(String, String, String), String> = HashMap::new();
        loop {
            let next = if dirty && synced.len() == GROUP_VERSIONS.len() * KINDS.len() {
                match tokio::time::timeout(DEBOUNCE, all.next()).await {
                    Ok(n) => n,
                    Err(_) => {
                        dirty = false;
                        if tx.send(store.values().cloned().collect()).await.is_err() {
                            return;
                        }
                        continue;
                    }
                }
            } else {
                all.next().await
            };
            let Some((kind, group, version, event)) = next else {
                return;
            };
            let stream_key = (kind.to_string(), group.to_string(), version.to_string());
            let key = |r: &Resource| {
                (
                    r.kind.clone(),
                    r.group.clone(),
                    r.name.clone(),
                    r.version.clone(),
                )
            };
            match event {
                Ok(watcher::Event::Init) => {
                    listing.insert(stream_key, Vec::new());
                }
                Ok(watcher::Event::InitApply(o)) => {
                    listing
                        .entry(stream_key)
                        .or_default()
                        .push(Resource::from_object(kind, group, version, &o));
                }
                Ok(watcher::Event::InitDone) => {
                    let fresh = listing.remove(&stream_key).unwrap_or_default();
                    store.retain(|k, _| {
                        !(k.0 == stream_key.0 && k.1 == stream_key.1 && k.3 == stream_key.2)
                    });
                    for r in fresh {
                        store.insert(key(&r), r);
                    }
                    if said.remove(&stream_key).is_some() {
                        info!(kind, group, version, namespace = %ns, "Watching again");
                    }
                    synced.insert(stream_key);
                    dirty = true;
                }
                Ok(watcher::Event::Apply(o)) => {
                    let r = Resource::from_object(kind, group, version, &o);
                    store.insert(key(&r), r);
                    dirty = true;
                }
                Ok(watcher::Event::Delete(o)) => {
                    let r = Resource::from_object(kind, group, version, &o);
                    store.remove(&key(&r));
                    dirty = true;
                }
                Err(e) => {
                    // The watcher recovers by itself (relist on 410, reconnect with backoff).
                    // A stream that fails before its first listing (a group the cluster does
                    // not serve is 404 for ever; a Role without it, 403) does not hold back
                    // the others: it counts as listed, with what it had (nothing at the
                    // start; its last objects later, so an API outage stops nothing).
                    let text = crate::error::chain(&e);
                    let missing = text.contains("404") || text.contains("NotFound");
                    synced.insert(stream_key.clone());
                    if said.get(&stream_key) != Some(&text) {
                        if missing {
                            debug!(
                                kind,
                                group, version, "Not served by this API server: {text}"
                            );
                        } else {
                            warn!(kind, group, version, namespace = %ns, "Watch failed, retrying with backoff: {text}");
                        }
                        said.insert(stream_key, text);
                    }
                }
            }
        }
    });
    rx
}

/// What became of one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// `Kind namespace/name`.
    pub label: String,
    /// Problems, each naming the field; empty when it runs as written.
    pub errors: Vec<String>,
    /// The connector's last valid version runs instead (it had one and this one is broken).
    pub running_previous: bool,
}

/// Turns the resources into one configuration: each connector with the topic maps that
/// reference it, parsed together as files would be. A connector whose documents have
/// problems runs its last valid version from `last_good` (if any); the others run as
/// written. Returns the configuration and a verdict per resource (in `resources` order).
pub fn assemble(
    resources: &[Resource],
    load: &LoadOptions,
    last_good: &mut BTreeMap<String, Connector>,
) -> (Config, Vec<Verdict>) {
    let mut verdicts: Vec<Verdict> = resources
        .iter()
        .map(|r| Verdict {
            label: r.label(),
            errors: Vec::new(),
            running_previous: false,
        })
        .collect();
    let mut connectors = Vec::new();
    let connector_ref = |r: &Resource| {
        r.spec
            .get("mqttBridgeConnectorRef")
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (i, c) in resources.iter().enumerate() {
        if c.kind != KINDS[0].0 {
            continue;
        }
        if let Some(first) = seen.get(&c.name) {
            verdicts[i].errors.push(format!(
                "a connector named \"{}\" exists already as {} ({}/{}); only that one runs",
                c.name,
                resources[*first].label(),
                resources[*first].group,
                resources[*first].version
            ));
            continue;
        }
        seen.insert(c.name.clone(), i);
        let maps: Vec<usize> = resources
            .iter()
            .enumerate()
            .filter(|(_, m)| m.kind == KINDS[1].0 && connector_ref(m).as_deref() == Some(&c.name))
            .map(|(j, _)| j)
            .collect();
        let labels: Vec<String> = std::iter::once(i)
            .chain(maps.iter().copied())
            .map(|j| resources[j].label())
            .collect();
        let texts: Vec<String> = std::iter::once(i)
            .chain(maps.iter().copied())
            .map(|j| resources[j].document())
            .collect();
        let sources: Vec<(&Path, &str)> = labels
            .iter()
            .zip(&texts)
            .map(|(l, t)| (Path::new(l.as_str()), t.as_str()))
            .collect();
        match parse::parse_sources(&sources, load) {
            Ok(mut config) => {
                let connector = config.connectors.remove(0);
                last_good.insert(c.name.clone(), connector.clone());
                connectors.push(connector);
            }
            Err(report) => {
                for e in &report.errors {
                    let who = labels
                        .iter()
                        .position(|l| Path::new(l) == e.file.as_path())
                        .map(|k| if k == 0 { i } else { maps[k - 1] })
                        .unwrap_or(i);
                    let field = e
                        .field
                        .as_deref()
                        .map(|f| format!("{f}: "))
                        .unwrap_or_default();
                    verdicts[who].errors.push(format!("{field}{}", e.message));
                }
                if let Some(previous) = last_good.get(&c.name) {
                    connectors.push(previous.clone());
                    for j in std::iter::once(i).chain(maps.iter().copied()) {
                        verdicts[j].running_previous = true;
                    }
                }
            }
        }
    }
    last_good.retain(|name, _| seen.contains_key(name));
    for (j, m) in resources.iter().enumerate() {
        if m.kind != KINDS[1].0 {
            continue;
        }
        match connector_ref(m) {
            None => verdicts[j]
                .errors
                .push("spec.mqttBridgeConnectorRef: required field is missing".into()),
            Some(name) if !seen.contains_key(&name) => verdicts[j].errors.push(format!(
                "spec.mqttBridgeConnectorRef: no MqttBridgeConnector \"{name}\" in namespace {}",
                m.namespace
            )),
            Some(_) => {}
        }
    }
    (Config { connectors }, verdicts)
}

/// A resource's key in [`StatusWriter`]'s record of what it wrote.
fn written_key(r: &Resource) -> String {
    format!("{}/{}/{}", r.group, r.kind, r.name)
}

/// Writes `status` back to the resources.
pub struct StatusWriter {
    client: kube::Client,
    /// What was written last per resource, and when.
    written: HashMap<String, (Value, tokio::time::Instant)>,
    /// When each resource's conditions last changed (for `lastTransitionTime`).
    transitions: HashMap<(String, String), (String, String)>,
}

fn now_rfc3339() -> String {
    crate::status::rfc3339(SystemTime::now())
}

fn condition(kind: &str, ok: bool, reason: &str, message: &str, at: &str) -> Value {
    json!({
        "type": kind,
        "status": if ok { "True" } else { "False" },
        "reason": reason,
        "message": message,
        "lastTransitionTime": at,
    })
}

impl StatusWriter {
    /// A writer using `client`.
    pub fn new(client: kube::Client) -> StatusWriter {
        StatusWriter {
            client,
            written: HashMap::new(),
            transitions: HashMap::new(),
        }
    }

    /// The status of each resource of `resources` (by `verdicts`), with the state of the
    /// routes this instance runs (`stats`) for connectors.
    pub fn statuses(
        &mut self,
        resources: &[Resource],
        verdicts: &[Verdict],
        running: &Config,
        stats: &Stats,
        instance: Option<u32>,
    ) -> Vec<(usize, Value)> {
        let clients = stats.clients();
        let mut out = Vec::new();
        for (i, (r, v)) in resources.iter().zip(verdicts).enumerate() {
            let mut routes = Vec::new();
            let (mut ready_routes, mut mine_routes, mut total_routes) = (0, 0, 0);
            let mut last_error: Option<String> = v.errors.first().cloned();
            let mut unreachable = None;
            let connector = match r.kind.as_str() {
                "MqttBridgeConnector" => running.connectors.iter().find(|c| c.name == r.name),
                _ => None,
            };
            if let Some(c) = connector {
                let count = c.bridge_instances.max(1);
                let mine = crate::bridge::resolve_instance(c, instance).unwrap_or(0);
                for index in 0..count {
                    for rc in routing::plan(c, index, count) {
                        total_routes += 1;
                        let state = if index == mine {
                            mine_routes += 1;
                            match clients.iter().find(|k| k.client_id == rc.client_id) {
                                Some(k) if k.ready() => {
                                    ready_routes += 1;
                                    "forwarding".to_string()
                                }
                                Some(k) => {
                                    for s in [&k.source, &k.target] {
                                        if let Some((e, _)) = s.last_error()
                                            && !s.connected()
                                        {
                                            unreachable = Some(format!("{} broker: {e}", s.side));
                                        }
                                    }
                                    "connecting".to_string()
                                }
                                None => "starting".to_string(),
                            }
                        } else {
                            "unknown (another instance)".to_string()
                        };
                        routes.push(json!({
                            "name": rc.route.name,
                            "clientId": rc.client_id,
                            "instance": index,
                            "state": state,
                        }));
                    }
                }
            }
            if unreachable.is_some() {
                last_error = unreachable.clone();
            }
            let (ready, reason, message) = if !v.errors.is_empty() {
                let what = if v.running_previous {
                    "; the last valid version keeps running"
                } else {
                    ""
                };
                (
                    false,
                    "ValidationError",
                    format!("{}{what}", v.errors.join("; ")),
                )
            } else if let Some(u) = &unreachable {
                (false, "BrokerUnreachable", u.clone())
            } else if ready_routes < mine_routes {
                (
                    false,
                    "Connecting",
                    "route clients are connecting".to_string(),
                )
            } else {
                (
                    true,
                    "Running",
                    match connector {
                        Some(_) => format!(
                            "{ready_routes} of {mine_routes} route clients forwarding on this instance"
                        ),
                        None => "running with its connector".to_string(),
                    },
                )
            };
            let degraded = !v.errors.is_empty() || unreachable.is_some();
            let key = r.label();
            let mut at = |kind: &str, state: &str| {
                let entry = self
                    .transitions
                    .entry((key.clone(), kind.to_string()))
                    .or_insert_with(|| (state.to_string(), now_rfc3339()));
                if entry.0 != state {
                    *entry = (state.to_string(), now_rfc3339());
                }
                entry.1.clone()
            };
            let ready_at = at("Ready", if ready { "True" } else { "False" });
            let degraded_at = at("Degraded", if degraded { "True" } else { "False" });
            let mut status = json!({
                "observedGeneration": r.generation,
                "conditions": [
                    condition("Ready", ready, reason, &message, &ready_at),
                    condition("Degraded", degraded, if degraded { reason } else { "AsExpected" }, if degraded { &message } else { "" }, &degraded_at),
                ],
                "lastError": last_error,
            });
            if connector.is_some() {
                status["routes"] = Value::Array(routes);
                status["readyRoutes"] = json!(format!("{ready_routes}/{total_routes}"));
            }
            out.push((i, status));
        }
        out
    }

    /// Patches the status of every resource whose status changed since it was last written,
    /// at most once per [`STATUS_INTERVAL`] each. Failures are logged and tried again later.
    pub async fn write(&mut self, resources: &[Resource], statuses: Vec<(usize, Value)>) {
        let now = tokio::time::Instant::now();
        for (i, status) in statuses {
            let r = &resources[i];
            let key = written_key(r);
            if let Some((last, at)) = self.written.get(&key)
                && (*last == status || now.duration_since(*at) < STATUS_INTERVAL)
            {
                continue;
            }
            let api: Api<DynamicObject> =
                Api::namespaced_with(self.client.clone(), &r.namespace, &r.api_resource());
            let patch = json!({"status": status});
            let result = tokio::time::timeout(
                STATUS_TIMEOUT,
                api.patch_status(&r.name, &PatchParams::default(), &Patch::Merge(&patch)),
            )
            .await;
            match result {
                Ok(Ok(_)) => {
                    self.written.insert(key, (status, now));
                }
                Ok(Err(e)) => {
                    warn!(resource = %r.label(), "Cannot write its status: {}", crate::error::chain(&e));
                    self.written.insert(key, (Value::Null, now));
                }
                Err(_) => {
                    warn!(resource = %r.label(), "Cannot write its status: no answer within {STATUS_TIMEOUT:?}");
                    self.written.insert(key, (Value::Null, now));
                }
            }
        }
        let live: std::collections::HashSet<String> = resources.iter().map(written_key).collect();
        self.written.retain(|k, _| live.contains(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(kind: &str, name: &str, spec: Value) -> Resource {
        Resource {
            kind: kind.into(),
            group: "mq.iotoperations.azure.com".into(),
            version: "v1beta1".into(),
            namespace: "factory".into(),
            name: name.into(),
            generation: Some(1),
            spec,
        }
    }

    fn connector(name: &str, endpoint: &str) -> Resource {
        resource(
            "MqttBridgeConnector",
            name,
            json!({"protocol": "v5", "remoteBrokerConnection": {"endpoint": endpoint, "tls": {"tlsEnabled": false}},
                   "localBrokerConnection": {"endpoint": "local:1883", "tls": {"tlsEnabled": false}}}),
        )
    }

    fn map(name: &str, connector: &str, source: &str) -> Resource {
        resource(
            "MqttBridgeTopicMap",
            name,
            json!({"mqttBridgeConnectorRef": connector, "routes": [{"name": format!("{name}-r"), "direction": "local-to-remote", "source": source}]}),
        )
    }

    #[test]
    fn resources_become_the_same_configuration_as_files() {
        let rs = vec![connector("a", "remote:1883"), map("m", "a", "t/#")];
        let mut last = BTreeMap::new();
        let (config, verdicts) = assemble(&rs, &LoadOptions::default(), &mut last);
        assert_eq!(config.connectors.len(), 1);
        assert_eq!(config.connectors[0].routes[0].name, "m-r");
        assert!(verdicts.iter().all(|v| v.errors.is_empty()), "{verdicts:?}");
    }

    #[test]
    fn a_broken_resource_breaks_only_its_connector_which_keeps_its_last_valid_version() {
        let mut last = BTreeMap::new();
        let good = vec![
            connector("a", "remote:1883"),
            map("ma", "a", "t/#"),
            connector("b", "remote:1883"),
            map("mb", "b", "u/#"),
        ];
        assemble(&good, &LoadOptions::default(), &mut last);
        let broken = vec![
            connector("a", "remote:1883"),
            map("ma", "a", "t/#/x"),
            connector("b", "remote:1883"),
            map("mb", "b", "u/#"),
            map("orphan", "nope", "v/#"),
        ];
        let (config, verdicts) = assemble(&broken, &LoadOptions::default(), &mut last);
        assert_eq!(
            config.connectors.len(),
            2,
            "b runs, a runs its last valid version"
        );
        assert_eq!(config.connectors[0].routes[0].source, "t/#");
        assert!(
            verdicts[1].errors[0].contains("spec.routes[0].source"),
            "{:?}",
            verdicts[1]
        );
        assert!(verdicts[1].running_previous);
        assert!(verdicts[2].errors.is_empty() && verdicts[3].errors.is_empty());
        assert!(verdicts[4].errors[0].contains("no MqttBridgeConnector \"nope\""));
        // A connector broken from the start runs nothing.
        let (config, verdicts) = assemble(
            &[connector("c", "no-port")],
            &LoadOptions::default(),
            &mut BTreeMap::new(),
        );
        assert!(config.connectors.is_empty());
        assert!(
            verdicts[0].errors[0].contains("endpoint"),
            "{:?}",
            verdicts[0]
        );
    }
}
