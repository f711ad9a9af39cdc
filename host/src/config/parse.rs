//! Walks the YAML node tree into [`Config`], collecting every problem.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use super::yaml::{Node, NodeKind, parse_documents};
use super::*;
use crate::topic;

/// Parses and validates documents from several sources together (topic maps may reference a
/// connector in another file).
pub fn parse_sources(
    sources: &[(&Path, &str)],
    opts: &LoadOptions,
) -> Result<Config, ConfigReport> {
    let mut errors = Vec::new();
    let mut connectors: Vec<Connector> = Vec::new();
    let mut maps: Vec<TopicMap> = Vec::new();
    // Connectors whose document had errors: a topic map referencing one of them is not
    // reported again as referencing an unknown connector.
    let mut broken: Vec<String> = Vec::new();
    for (file, text) in sources {
        for_each_document(file, text, &mut errors, |cx, node| {
            match read_document(cx, node, opts) {
                Ok(Doc::Connector(c)) => connectors.push(*c),
                Ok(Doc::TopicMap(m)) => maps.push(m),
                Err(Some(name)) => broken.push(name),
                Err(None) => {}
            }
        });
    }
    link(&mut connectors, maps, &broken, &mut errors);
    if errors.is_empty() {
        Ok(Config { connectors })
    } else {
        Err(ConfigReport { errors })
    }
}

/// Parses `text` and calls `read` with an error context for every non-empty document; a
/// YAML syntax error is reported once for the file.
pub(crate) fn for_each_document(
    file: &Path,
    text: &str,
    errors: &mut Vec<ConfigError>,
    mut read: impl FnMut(&mut Cx, &Node),
) {
    let docs = match parse_documents(text) {
        Ok(d) => d,
        Err(e) => {
            errors.push(ConfigError {
                file: file.to_path_buf(),
                line: Some(e.line),
                document: None,
                field: None,
                message: format!("YAML syntax error at column {}: {}", e.col, e.message),
            });
            return;
        }
    };
    for (index, node) in docs.iter().enumerate() {
        if node.is_null() {
            continue;
        }
        let mut cx = Cx {
            file,
            document: format!("document {}", index + 1),
            errors,
        };
        read(&mut cx, node);
    }
}

struct TopicMap {
    connector_ref: String,
    ref_origin: Origin,
    document: String,
    routes: Vec<Route>,
}

enum Doc {
    Connector(Box<Connector>),
    TopicMap(TopicMap),
}

/// Error context: the file and the document being read.
pub(crate) struct Cx<'a> {
    pub(crate) file: &'a Path,
    pub(crate) document: String,
    pub(crate) errors: &'a mut Vec<ConfigError>,
}

impl Cx<'_> {
    pub(crate) fn err(&mut self, line: usize, field: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line: Some(line),
            document: Some(self.document.clone()),
            field: (!field.is_empty()).then(|| field.to_string()),
            message: message.into(),
        });
    }

    fn origin(&self, line: usize) -> Origin {
        Origin {
            file: self.file.to_path_buf(),
            line,
        }
    }
}

pub(crate) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// The entries of one YAML mapping, tracking which keys were read so that unknown (for
/// example misspelled) keys are reported instead of silently ignored.
pub(crate) struct Fields<'n> {
    path: String,
    line: usize,
    entries: Vec<(&'n str, &'n Node)>,
    used: Vec<bool>,
    known: Vec<&'static str>,
}

impl<'n> Fields<'n> {
    /// Reads a mapping; `null` counts as an empty mapping (e.g. `kubernetes:`).
    pub(crate) fn of(cx: &mut Cx, node: &'n Node, path: &str) -> Option<Fields<'n>> {
        let mut entries = Vec::new();
        match &node.kind {
            NodeKind::Map(kv) => {
                let mut seen = HashSet::new();
                for (k, v) in kv {
                    match k.as_scalar() {
                        Some(key) => {
                            if !seen.insert(key) {
                                cx.err(k.line, &join(path, key), "key appears twice");
                            }
                            entries.push((key, v));
                        }
                        None => cx.err(k.line, path, "mapping keys must be plain strings"),
                    }
                }
            }
            _ if node.is_null() => {}
            _ => {
                cx.err(
                    node.line,
                    path,
                    format!("expected a mapping, found {}", node.type_name()),
                );
                return None;
            }
        }
        let used = vec![false; entries.len()];
        Some(Fields {
            path: path.to_string(),
            line: node.line,
            entries,
            used,
            known: Vec::new(),
        })
    }

    /// The value of the first of `names` present (all are accepted spellings of one field);
    /// giving two spellings at once is an error.
    pub(crate) fn get(
        &mut self,
        cx: &mut Cx,
        names: &[&'static str],
    ) -> Option<(String, &'n Node)> {
        self.known.extend_from_slice(names);
        let mut found: Option<(String, &'n Node)> = None;
        for (i, (key, value)) in self.entries.iter().enumerate() {
            if names.contains(key) {
                self.used[i] = true;
                if let Some((first, _)) = &found {
                    cx.err(
                        value.line,
                        &join(&self.path, key),
                        format!(
                            "`{key}` and `{first}` are two spellings of one field; give only one"
                        ),
                    );
                } else {
                    found = Some((join(&self.path, key), *value));
                }
            }
        }
        found
    }

    pub(crate) fn required(
        &mut self,
        cx: &mut Cx,
        names: &[&'static str],
    ) -> Option<(String, &'n Node)> {
        let found = self.get(cx, names);
        if found.is_none() {
            cx.err(
                self.line,
                &join(&self.path, names[0]),
                "required field is missing",
            );
        }
        found
    }

    /// Reports every key that no `get` asked for.
    pub(crate) fn finish(self, cx: &mut Cx) {
        for (i, (key, value)) in self.entries.iter().enumerate() {
            if !self.used[i] {
                let mut known = self.known.clone();
                known.sort_unstable();
                known.dedup();
                cx.err(
                    value.line,
                    &join(&self.path, key),
                    format!(
                        "unknown field `{key}`; expected one of: {}",
                        known.join(", ")
                    ),
                );
            }
        }
    }
}

pub(crate) fn string(cx: &mut Cx, (path, node): (String, &Node)) -> Option<String> {
    match node.as_scalar() {
        Some(_) if node.is_null() => {
            cx.err(node.line, &path, "expected a string, found null");
            None
        }
        Some(s) => Some(s.to_string()),
        None => {
            cx.err(
                node.line,
                &path,
                format!("expected a string, found {}", node.type_name()),
            );
            None
        }
    }
}

pub(crate) fn integer(
    cx: &mut Cx,
    (path, node): (String, &Node),
    min: i64,
    max: i64,
) -> Option<i64> {
    let s = string(cx, (path.clone(), node))?;
    match s.trim().parse::<i64>() {
        Ok(v) if (min..=max).contains(&v) => Some(v),
        Ok(v) => {
            cx.err(
                node.line,
                &path,
                format!("{v} is out of range; expected {min} to {max}"),
            );
            None
        }
        Err(_) => {
            cx.err(
                node.line,
                &path,
                format!("expected an integer, found \"{s}\""),
            );
            None
        }
    }
}

pub(crate) fn boolean(cx: &mut Cx, (path, node): (String, &Node)) -> Option<bool> {
    let s = string(cx, (path.clone(), node))?;
    match s.as_str() {
        "true" | "True" | "TRUE" => Some(true),
        "false" | "False" | "FALSE" => Some(false),
        _ => {
            cx.err(
                node.line,
                &path,
                format!("expected true or false, found \"{s}\""),
            );
            None
        }
    }
}

pub(crate) fn one_of<T: Copy>(
    cx: &mut Cx,
    field: (String, &Node),
    choices: &[(&str, T)],
) -> Option<T> {
    let line = field.1.line;
    let path = field.0.clone();
    let s = string(cx, field)?;
    match choices.iter().find(|(name, _)| *name == s) {
        Some((_, v)) => Some(*v),
        None => {
            let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
            cx.err(
                line,
                &path,
                format!(
                    "\"{s}\" is not valid; expected one of: {}",
                    names.join(", ")
                ),
            );
            None
        }
    }
}

/// A document, or on error the name of the connector it defined (if that much was readable).
fn read_document(cx: &mut Cx, node: &Node, opts: &LoadOptions) -> Result<Doc, Option<String>> {
    let mut top = Fields::of(cx, node, "").ok_or(None)?;
    let api = top
        .required(cx, &["apiVersion"])
        .and_then(|f| string(cx, f));
    let kind = top.required(cx, &["kind"]).and_then(|f| string(cx, f));
    let metadata = top.required(cx, &["metadata"]);
    let spec = top.required(cx, &["spec"]);
    // Kubernetes adds `status` to objects read back from a cluster; accept and ignore it.
    let _ = top.get(cx, &["status"]);
    top.finish(cx);

    let (name, namespace) = match metadata {
        Some((path, m)) => read_metadata(cx, m, &path),
        None => (None, None),
    };
    if let Some(kind) = &kind {
        cx.document = match &name {
            Some(n) => format!("{kind} \"{n}\""),
            None => format!("{kind} ({})", cx.document),
        };
    }
    if let Some(api) = &api
        && !API_VERSIONS.contains(&api.as_str())
    {
        cx.err(
            node.line,
            "apiVersion",
            format!(
                "\"{api}\" is not supported; expected one of: {}",
                API_VERSIONS.join(", ")
            ),
        );
    }
    let is_connector = kind.as_deref() == Some("MqttBridgeConnector");
    let failed = || if is_connector { name.clone() } else { None };
    let (spec_path, spec) = spec.ok_or_else(failed)?;
    match kind.as_deref() {
        Some("MqttBridgeConnector") => {
            let n = name.clone().ok_or(None)?;
            read_connector(cx, spec, &spec_path, opts, n, namespace, node.line)
                .map(|c| Doc::Connector(Box::new(c)))
                .ok_or_else(failed)
        }
        Some("MqttBridgeTopicMap") => {
            let n = name.clone().ok_or(None)?;
            read_topic_map(cx, spec, &spec_path, n)
                .map(Doc::TopicMap)
                .ok_or(None)
        }
        Some(other) => {
            cx.err(
                node.line,
                "kind",
                format!(
                    "\"{other}\" is not a kind edgebridge reads; expected MqttBridgeConnector or MqttBridgeTopicMap"
                ),
            );
            Err(None)
        }
        None => Err(None),
    }
}

fn read_metadata(cx: &mut Cx, node: &Node, path: &str) -> (Option<String>, Option<String>) {
    let Some(mut m) = Fields::of(cx, node, path) else {
        return (None, None);
    };
    let name = m.required(cx, &["name"]).and_then(|f| string(cx, f));
    let namespace = m.get(cx, &["namespace"]).and_then(|f| string(cx, f));
    for ignored in [
        "labels",
        "annotations",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "managedFields",
    ] {
        let _ = m.get(cx, &[ignored]);
    }
    m.finish(cx);
    if let Some(n) = &name
        && n.trim().is_empty()
    {
        cx.err(node.line, &join(path, "name"), "must not be empty");
        return (None, namespace);
    }
    (name, namespace)
}

fn read_connector(
    cx: &mut Cx,
    node: &Node,
    path: &str,
    opts: &LoadOptions,
    name: String,
    namespace: Option<String>,
    line: usize,
) -> Option<Connector> {
    let mut s = Fields::of(cx, node, path)?;
    if let Some((p, image)) = s.get(cx, &["image"]) {
        // Only meaningful to the Kubernetes operator; accepted so existing YAML loads unchanged.
        if let Some(mut img) = Fields::of(cx, image, &p) {
            for f in ["repository", "tag", "pullPolicy"] {
                if let Some(v) = img.get(cx, &[f]) {
                    let _ = string(cx, v);
                }
            }
            img.finish(cx);
        }
    }
    let protocol = s
        .required(cx, &["protocol"])
        .and_then(|f| one_of(cx, f, &[("v5", Protocol::V5), ("v3", Protocol::V3)]));
    let bridge_instances = match s.get(cx, &["bridgeInstances"]) {
        Some(f) => integer(cx, f, 1, 1000).map(|v| v as u32),
        None => Some(1),
    };
    let client_id_prefix = match s.get(cx, &["clientIdPrefix"]) {
        Some(f) if f.1.is_null() => Some(String::new()),
        Some(f) => string(cx, f),
        None => Some(String::new()),
    };
    let log_level = match s.get(cx, &["logLevel"]) {
        Some(f) => one_of(
            cx,
            f,
            &[
                ("info", LogLevel::Info),
                ("debug", LogLevel::Debug),
                ("warn", LogLevel::Warn),
                ("error", LogLevel::Error),
                ("trace", LogLevel::Trace),
            ],
        ),
        None => Some(LogLevel::Info),
    };
    let spool = match s.get(cx, &["spool"]) {
        Some((p, n)) => read_spool(cx, n, &p).map(Some),
        None => Some(None),
    };
    let remote = s
        .required(cx, &["remoteBrokerConnection"])
        .and_then(|(p, n)| read_broker(cx, n, &p, opts, true));
    let local_given = s.get(cx, &["localBrokerConnection"]);
    let local_is_default = local_given.is_none();
    let local = match local_given {
        Some((p, n)) => read_broker(cx, n, &p, opts, false),
        None => Some(default_local()),
    };
    s.finish(cx);

    let protocol = protocol?;
    let (remote, local) = (remote?, local?);
    for (conn, field) in [
        (&remote, "remoteBrokerConnection"),
        (&local, "localBrokerConnection"),
    ] {
        if protocol == Protocol::V3
            && matches!(
                conn.auth,
                Auth::ManagedIdentity { .. } | Auth::Kubernetes { .. }
            )
        {
            let message = if field == "localBrokerConnection" && local_is_default {
                "localBrokerConnection is omitted, and its documented default authenticates with a Kubernetes service-account token, which needs MQTT 5 enhanced authentication; set `protocol: v5` or write localBrokerConnection"
            } else {
                "token authentication (managed identity, Kubernetes) needs MQTT 5 enhanced authentication; set `protocol: v5`"
            };
            cx.err(
                line,
                &join(path, &format!("{field}.authentication")),
                message,
            );
        }
    }
    if remote.endpoint.embedded && local.endpoint.embedded && remote.endpoint == local.endpoint {
        cx.err(
            line,
            path,
            "the local and remote connections start embedded brokers on the same address",
        );
    }
    Some(Connector {
        name,
        namespace,
        origin: cx.origin(line),
        protocol,
        bridge_instances: bridge_instances?,
        client_id_prefix: client_id_prefix?,
        log_level: log_level?,
        remote,
        local,
        routes: Vec::new(),
        spool: spool?,
    })
}

fn default_local() -> BrokerConnection {
    BrokerConnection {
        endpoint: parse_endpoint(DEFAULT_LOCAL_ENDPOINT).expect("default endpoint is valid"),
        transport: Transport::Mqtt,
        tls: None,
        auth: Auth::Kubernetes {
            token_path: PathBuf::from(DEFAULT_SAT_PATH),
        },
        reach: Reach::default(),
        embedded_log: None,
    }
}

/// Parses `host:port`, `[v6]:port`, optionally `host:port/path` (WebSocket path) and the
/// extension `embedded://host:port`.
pub fn parse_endpoint(text: &str) -> Result<Endpoint, String> {
    let mut rest = text.trim();
    let mut embedded = false;
    if let Some(r) = rest.strip_prefix("embedded://") {
        embedded = true;
        rest = r;
    } else if let Some((scheme, _)) = rest.split_once("://") {
        return Err(format!(
            "unsupported scheme \"{scheme}://\"; write host:port (TLS and WebSocket are chosen by `tls` and `protocol`), or embedded://host:port"
        ));
    }
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], Some(rest[i..].to_string())),
        None => (rest, None),
    };
    let (host, port) = if let Some(r) = hostport.strip_prefix('[') {
        let (h, p) = r
            .split_once("]:")
            .ok_or_else(|| "expected [ipv6]:port".to_string())?;
        (h.to_string(), p)
    } else {
        let (h, p) = hostport.rsplit_once(':').ok_or_else(|| {
            format!("\"{text}\" has no port; write host:port, e.g. broker.example.com:8883")
        })?;
        (h.to_string(), p)
    };
    if host.is_empty() {
        return Err(format!("\"{text}\" has no host"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| format!("\"{port}\" is not a valid port number"))?;
    if port == 0 && !embedded {
        return Err("port 0 is only valid for embedded://".into());
    }
    Ok(Endpoint {
        host,
        port,
        path,
        embedded,
    })
}

fn read_broker(
    cx: &mut Cx,
    node: &Node,
    path: &str,
    opts: &LoadOptions,
    remote: bool,
) -> Option<BrokerConnection> {
    let mut b = Fields::of(cx, node, path)?;
    let endpoint = b.required(cx, &["endpoint"]).and_then(|(p, n)| {
        let text = string(cx, (p.clone(), n))?;
        parse_endpoint(&text)
            .map_err(|m| cx.err(n.line, &p, m))
            .ok()
    });
    let transport = match b.get(cx, &["protocol"]) {
        Some(f) => one_of(
            cx,
            f,
            &[
                ("mqtt", Transport::Mqtt),
                ("webSocket", Transport::WebSocket),
            ],
        ),
        None => Some(Transport::Mqtt),
    };
    let tls = match b.get(cx, &["tls"]) {
        Some((p, n)) => read_tls(cx, n, &p, opts),
        None if remote => {
            cx.err(
                b.line,
                &join(path, "tls"),
                "required field is missing; write `tls: {tlsEnabled: true}` or `tls: {tlsEnabled: false}`",
            );
            None
        }
        None => Some(None),
    };
    let auth = match b.get(cx, &["authentication"]) {
        Some((p, n)) => read_auth(cx, n, &p, opts),
        None => Some(Auth::Anonymous),
    };
    let reach = read_reach(cx, &mut b, opts, remote);
    let embedded_log = match b.get(cx, &["embeddedLogSize"]) {
        Some(f) => {
            let line = f.1.line;
            let p = f.0.clone();
            size(cx, f, MIN_EMBEDDED_LOG).map(|v| Some((v, line, p)))
        }
        None => Some(None),
    };
    b.finish(cx);
    let endpoint = endpoint?;
    let tls = tls?;
    let mut reach = reach?;
    let embedded_log = embedded_log?;
    if let Some((_, line, p)) = &embedded_log
        && !endpoint.embedded
    {
        cx.err(
            *line,
            p,
            "applies only to an embedded:// endpoint (the size of the in-process broker's log)",
        );
        return None;
    }
    if endpoint.embedded && reach.proxy == ProxySetting::Environment {
        // The environment's proxy is for the cloud; an embedded broker is in process.
        reach.proxy = ProxySetting::None;
    }
    if endpoint.embedded && (!reach.failover.is_empty() || reach.proxy != ProxySetting::None) {
        cx.err(
            node.line,
            path,
            "an embedded broker is reached in process: failoverEndpoints and proxy do not apply",
        );
        return None;
    }
    if endpoint.embedded && tls.is_some() {
        cx.err(
            node.line,
            &join(path, "tls"),
            "an embedded broker listens without TLS; set `tlsEnabled: false`",
        );
        return None;
    }
    Some(BrokerConnection {
        endpoint,
        transport: transport?,
        tls,
        auth: auth?,
        reach,
        embedded_log: embedded_log.map(|(v, _, _)| v),
    })
}

/// The smallest `embeddedLogSize`: 1 MiB, ten segments of about 100 KiB.
const MIN_EMBEDDED_LOG: u64 = 1 << 20;

/// The extensions `failoverEndpoints`, `failoverMode`, `primaryCheckInterval` and `proxy` of
/// a broker connection. A remote connection without `proxy` uses the environment's
/// (`HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY`); a local one goes direct.
fn read_reach(cx: &mut Cx, b: &mut Fields, opts: &LoadOptions, remote: bool) -> Option<Reach> {
    let mut reach = Reach {
        proxy: if remote {
            ProxySetting::Environment
        } else {
            ProxySetting::None
        },
        ..Reach::default()
    };
    let mut ok = true;
    if let Some((p, n)) = b.get(cx, &["failoverEndpoints"]) {
        match &n.kind {
            NodeKind::Seq(items) => {
                for (i, item) in items.iter().enumerate() {
                    let ip = format!("{p}[{i}]");
                    let parsed = string(cx, (ip.clone(), item)).and_then(|t| {
                        parse_endpoint(&t)
                            .and_then(|e| {
                                if e.embedded {
                                    Err("a failover address cannot be embedded://".into())
                                } else {
                                    Ok(e)
                                }
                            })
                            .map_err(|m| cx.err(item.line, &ip, m))
                            .ok()
                    });
                    match parsed {
                        Some(e) => reach.failover.push(e),
                        None => ok = false,
                    }
                }
            }
            _ => {
                cx.err(
                    n.line,
                    &p,
                    format!(
                        "expected a list of host:port addresses, found {}",
                        n.type_name()
                    ),
                );
                ok = false;
            }
        }
    }
    if let Some(f) = b.get(cx, &["failoverMode"]) {
        match one_of(cx, f, &[("priority", false), ("round-robin", true)]) {
            Some(v) => reach.round_robin = v,
            None => ok = false,
        }
    }
    if let Some(f) = b.get(cx, &["primaryCheckInterval"]) {
        // `duration` refuses 0.
        match duration(cx, f) {
            Some(d) => reach.primary_check = d,
            None => ok = false,
        }
    }
    if let Some((p, n)) = b.get(cx, &["proxy"]) {
        let proxy = Fields::of(cx, n, &p).and_then(|mut f| {
            let url = f.required(cx, &["url"]);
            let secret = f.get(cx, &["secretName"]);
            f.finish(cx);
            let (up, un) = url?;
            let text = string(cx, (up.clone(), un))?;
            let mut proxy = HttpProxy::parse(&text)
                .map_err(|m| cx.err(un.line, &up, m))
                .ok()?;
            if let Some(secret) = secret {
                let dir = login_secret(cx, secret, opts)?;
                proxy.credentials = Some(ProxyCredentials::Secret(dir));
            }
            Some(proxy)
        });
        match proxy {
            Some(p) => reach.proxy = ProxySetting::Http(p),
            None => ok = false,
        }
    }
    ok.then_some(reach)
}

fn read_tls(cx: &mut Cx, node: &Node, path: &str, opts: &LoadOptions) -> Option<Option<Tls>> {
    let mut t = Fields::of(cx, node, path)?;
    let enabled = t.required(cx, &["tlsEnabled"]).and_then(|f| boolean(cx, f));
    let ca = t
        .get(
            cx,
            &["trustedCaCertificateConfigMap", "trustedCaCertificateName"],
        )
        .and_then(|(p, n)| {
            if n.is_null() {
                return Some(None);
            }
            let name = string(cx, (p.clone(), n))?;
            let dir = opts.configmaps_dir.join(&name);
            match ca_files(&dir) {
                Ok(files) if !files.is_empty() => Some(Some(dir)),
                Ok(_) => {
                    cx.err(
                        n.line,
                        &p,
                        format!(
                            "ConfigMap \"{name}\": folder {} holds no *.crt or *.pem file",
                            dir.display()
                        ),
                    );
                    None
                }
                Err(e) => {
                    cx.err(
                        n.line,
                        &p,
                        format!(
                            "ConfigMap \"{name}\": cannot read folder {} ({e}); set --configmaps-dir or create it",
                            dir.display()
                        ),
                    );
                    None
                }
            }
        });
    t.finish(cx);
    let ca = ca.unwrap_or(None);
    match enabled? {
        true => Some(Some(Tls { trusted_ca_dir: ca })),
        false => Some(None),
    }
}

/// The CA certificate files of a ConfigMap folder (`*.crt`, `*.pem`), sorted.
pub fn ca_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            matches!(p.extension().and_then(|e| e.to_str()), Some("crt" | "pem")) && p.is_file()
        })
        .collect();
    files.sort();
    Ok(files)
}

/// The folder of a Secret with files `username` and `password` (`usernamePassword`, a
/// proxy's `secretName`), named by the field `secretName`; an error when it has no `username`.
fn login_secret(cx: &mut Cx, (sp, sn): (String, &Node), opts: &LoadOptions) -> Option<PathBuf> {
    let name = string(cx, (sp.clone(), sn))?;
    let dir = opts.secrets_dir.join(&name);
    if !dir.join("username").is_file() {
        cx.err(
            sn.line,
            &sp,
            format!(
                "Secret \"{name}\": missing file {} (files `username` and `password`)",
                dir.join("username").display()
            ),
        );
        return None;
    }
    Some(dir)
}

fn read_auth(cx: &mut Cx, node: &Node, path: &str, opts: &LoadOptions) -> Option<Auth> {
    let mut a = Fields::of(cx, node, path)?;
    let mut found: Vec<(String, Option<Auth>)> = Vec::new();
    if let Some((p, n)) = a.get(cx, &["systemAssignedManagedIdentity"]) {
        let auth = Fields::of(cx, n, &p).and_then(|mut m| {
            let audience = m.required(cx, &["audience"]).and_then(|f| string(cx, f));
            m.finish(cx);
            Some(Auth::ManagedIdentity {
                audience: audience?,
            })
        });
        found.push((p, auth));
    }
    if let Some((p, n)) = a.get(cx, &["x509"]) {
        let auth = Fields::of(cx, n, &p).and_then(|mut m| {
            let secret = m.required(cx, &["secretName", "clientK8sSecret"]);
            m.finish(cx);
            let (sp, sn) = secret?;
            let name = string(cx, (sp.clone(), sn))?;
            let dir = opts.secrets_dir.join(&name);
            let cert = dir.join("client_cert.pem");
            let key = dir.join("client_key.pem");
            let inter = dir.join("client_intermediate_certs.pem");
            let mut ok = true;
            for f in [&cert, &key] {
                if !f.is_file() {
                    cx.err(
                        sn.line,
                        &sp,
                        format!(
                            "Secret \"{name}\": missing file {} (set --secrets-dir, or create the secret folder)",
                            f.display()
                        ),
                    );
                    ok = false;
                }
            }
            if ok && let Err(problem) = check_pem_pair(&cert, &key) {
                cx.err(sn.line, &sp, format!("Secret \"{name}\": {problem}"));
                ok = false;
            }
            ok.then(|| Auth::X509 {
                cert,
                key,
                intermediates: inter.is_file().then_some(inter),
            })
        });
        found.push((p, auth));
    }
    if let Some((p, n)) = a.get(cx, &["kubernetes"]) {
        let auth = Fields::of(cx, n, &p).map(|mut m| {
            let dir = m.get(cx, &["secretPath"]).and_then(|f| string(cx, f));
            let file = m
                .get(cx, &["serviceAccountTokenName"])
                .and_then(|f| string(cx, f));
            m.finish(cx);
            let default = PathBuf::from(DEFAULT_SAT_PATH);
            let dir = dir
                .map(PathBuf::from)
                .unwrap_or_else(|| default.parent().map(Path::to_path_buf).unwrap_or_default());
            let file = file.unwrap_or_else(|| "sat-token".into());
            Auth::Kubernetes {
                token_path: dir.join(file),
            }
        });
        found.push((p, auth));
    }
    if let Some((p, n)) = a.get(cx, &["usernamePassword"]) {
        let auth = Fields::of(cx, n, &p).and_then(|mut m| {
            let secret = m.required(cx, &["secretName"]);
            m.finish(cx);
            let dir = login_secret(cx, secret?, opts)?;
            Some(Auth::UsernamePassword { dir })
        });
        found.push((p, auth));
    }
    a.finish(cx);
    match found.len() {
        0 => Some(Auth::Anonymous),
        1 => found.pop().and_then(|(_, a)| a),
        _ => {
            let names: Vec<&str> = found.iter().map(|(p, _)| p.as_str()).collect();
            cx.err(
                node.line,
                path,
                format!(
                    "give exactly one authentication method, found {}",
                    names.join(" and ")
                ),
            );
            None
        }
    }
}

/// What a client certificate file and its key file hold: certificates and no key in the
/// first, a private key in the second (files are read again at every connect; this catches
/// the mix-ups at `check`).
fn check_pem_pair(cert: &Path, key: &Path) -> Result<(), String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: cannot read: {e}", cert.display()))?
        .filter(Result::is_ok)
        .count();
    if PrivateKeyDer::from_pem_file(cert).is_ok() {
        return Err(format!(
            "{} holds a private key; it must hold only the client certificate (the key goes in {})",
            cert.display(),
            key.display()
        ));
    }
    if certs == 0 {
        return Err(format!("{} holds no PEM certificate", cert.display()));
    }
    if PrivateKeyDer::from_pem_file(key).is_err() {
        return Err(format!(
            "{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
            key.display()
        ));
    }
    Ok(())
}

fn read_topic_map(cx: &mut Cx, node: &Node, path: &str, name: String) -> Option<TopicMap> {
    let mut s = Fields::of(cx, node, path)?;
    let connector_ref = s
        .required(cx, &["mqttBridgeConnectorRef"])
        .and_then(|(p, n)| Some((string(cx, (p, n))?, n.line)));
    let routes = s
        .required(cx, &["routes"])
        .and_then(|(p, n)| match &n.kind {
            NodeKind::Seq(items) if !items.is_empty() => Some(
                items
                    .iter()
                    .enumerate()
                    .filter_map(|(i, item)| read_route(cx, item, &format!("{p}[{i}]"), &name))
                    .collect::<Vec<_>>(),
            ),
            NodeKind::Seq(_) => {
                cx.err(n.line, &p, "must list at least one route");
                None
            }
            _ => {
                cx.err(
                    n.line,
                    &p,
                    format!("expected a list of routes, found {}", n.type_name()),
                );
                None
            }
        });
    s.finish(cx);
    let (connector_ref, ref_line) = connector_ref?;
    Some(TopicMap {
        connector_ref,
        ref_origin: cx.origin(ref_line),
        document: cx.document.clone(),
        routes: routes?,
    })
}

fn read_route(cx: &mut Cx, node: &Node, path: &str, map: &str) -> Option<Route> {
    let mut r = Fields::of(cx, node, path)?;
    let direction = r.required(cx, &["direction"]).and_then(|f| {
        one_of(
            cx,
            f,
            &[
                ("local-to-remote", Direction::LocalToRemote),
                ("remote-to-local", Direction::RemoteToLocal),
            ],
        )
    });
    let name = r.required(cx, &["name"]).and_then(|(p, n)| {
        let s = string(cx, (p.clone(), n))?;
        if s.is_empty() || s.contains(['/', '+', '#']) || s.chars().any(char::is_whitespace) {
            cx.err(
                n.line,
                &p,
                format!("\"{s}\" cannot be part of a client ID; use letters, digits, '-' or '_'"),
            );
            return None;
        }
        Some(s)
    });
    let qos = match r.get(cx, &["qos"]) {
        Some(f) => integer(cx, f, 0, 2).and_then(|v| QoS::from_u8(v as u8)),
        None => Some(QoS::AtLeastOnce),
    };
    let source = r.required(cx, &["source"]).and_then(|(p, n)| {
        let s = string(cx, (p.clone(), n))?;
        match topic::validate_filter(&s) {
            Ok(()) if s.starts_with("$share/") => {
                cx.err(
                    n.line,
                    &p,
                    "write the plain filter and use `sharedSubscription` for $share groups",
                );
                None
            }
            Ok(()) => Some(s),
            Err(e) => {
                cx.err(
                    n.line,
                    &p,
                    format!("invalid topic filter \"{}\": {e}", topic::shorten(&s)),
                );
                None
            }
        }
    });
    let target = match r.get(cx, &["target"]) {
        Some((_, n)) if n.is_null() => Some(None),
        Some((p, n)) => string(cx, (p.clone(), n)).and_then(|s| match topic::validate_name(&s) {
            Ok(()) => Some(Some(s)),
            Err(e) => {
                cx.err(
                    n.line,
                    &p,
                    format!("invalid target topic \"{}\": {e}", topic::shorten(&s)),
                );
                None
            }
        }),
        None => Some(None),
    };
    let shared = match r.get(cx, &["sharedSubscription"]) {
        Some((_, n)) if n.is_null() => Some(None),
        Some((p, n)) => Fields::of(cx, n, &p).and_then(|mut m| {
            let clients = m
                .required(cx, &["groupMinimumShareNumber"])
                .and_then(|f| integer(cx, f, 1, 1000));
            let group = m.required(cx, &["groupName"]).and_then(|(gp, gn)| {
                let g = string(cx, (gp.clone(), gn))?;
                if g.is_empty() || g.contains(['/', '+', '#']) {
                    cx.err(
                        gn.line,
                        &gp,
                        format!("\"{g}\" is not a valid share name (no '/', '+' or '#')"),
                    );
                    return None;
                }
                Some(g)
            });
            m.finish(cx);
            Some(Some(SharedSubscription {
                clients: clients? as u32,
                group: group?,
            }))
        }),
        None => Some(None),
    };
    let plugins = match r.get(cx, &["plugins"]) {
        None => Some(Vec::new()),
        Some((p, n)) => match &n.kind {
            NodeKind::Seq(items) => {
                let mut list = Some(Vec::new());
                for (i, item) in items.iter().enumerate() {
                    let ip = format!("{p}[{i}]");
                    let one = Fields::of(cx, item, &ip).and_then(|mut f| {
                        let name = f.required(cx, &["name"]).and_then(|(np, nn)| {
                            let s = string(cx, (np.clone(), nn))?;
                            if s.is_empty()
                                || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                            {
                                cx.err(nn.line, &np, format!("\"{s}\" is not a plugin name (letters, digits, '-', '_'; the file is <name>.wasm)"));
                                return None;
                            }
                            Some(s)
                        });
                        let config = match f.get(cx, &["config"]) {
                            None => Some("{}".to_string()),
                            Some((_, c)) if c.is_null() => Some("{}".to_string()),
                            Some((cp, c)) => match &c.kind {
                                NodeKind::Map(_) => Some(super::yaml::to_json(c).to_string()),
                                _ => {
                                    cx.err(c.line, &cp, format!("expected a mapping, found {}", c.type_name()));
                                    None
                                }
                            },
                        };
                        f.finish(cx);
                        Some(PluginRef { name: name?, config: config? })
                    });
                    match (one, list.as_mut()) {
                        (Some(pr), Some(l)) => l.push(pr),
                        _ => list = None,
                    }
                }
                list
            }
            _ => {
                cx.err(
                    n.line,
                    &p,
                    format!("expected a list of plugins, found {}", n.type_name()),
                );
                None
            }
        },
    };
    let spool = match r.get(cx, &["spool"]) {
        Some((p, n)) => read_spool(cx, n, &p).map(Some),
        None => Some(None),
    };
    let on_error = r
        .get(cx, &["onPluginError"])
        .and_then(|f| one_of(cx, f, &[("drop", 0u8), ("pass", 1), ("dead-letter", 2)]));
    let dead_letter = r.get(cx, &["deadLetterTopic"]).and_then(|(p, n)| {
        let s = string(cx, (p.clone(), n))?;
        match topic::validate_name(&s) {
            Ok(()) => Some((s, n.line, p)),
            Err(e) => {
                cx.err(
                    n.line,
                    &p,
                    format!("invalid dead-letter topic \"{}\": {e}", topic::shorten(&s)),
                );
                None
            }
        }
    });
    let on_plugin_error = match (on_error, dead_letter) {
        (Some(1), None) => Some(OnPluginError::Pass),
        (Some(2), Some((t, _, _))) => Some(OnPluginError::DeadLetter(t)),
        (Some(2), None) => {
            cx.err(
                node.line,
                &join(path, "deadLetterTopic"),
                "`onPluginError: dead-letter` needs `deadLetterTopic`",
            );
            None
        }
        (_, Some((_, line, p))) => {
            cx.err(
                line,
                &p,
                "`deadLetterTopic` is only used with `onPluginError: dead-letter`",
            );
            None
        }
        (_, None) => Some(OnPluginError::Drop),
    };
    r.finish(cx);
    Some(Route {
        spool: spool?,
        plugins: plugins?,
        on_plugin_error: on_plugin_error?,
        name: name?,
        topic_map: map.to_string(),
        direction: direction?,
        qos: qos?,
        source: source?,
        target: target?,
        shared: shared?,
        origin: cx.origin(node.line),
    })
}

/// The `spool` extension of a connector or a route.
fn read_spool(cx: &mut Cx, node: &Node, path: &str) -> Option<SpoolSpec> {
    let mut f = Fields::of(cx, node, path)?;
    let mut ok = true;
    let mut spec = SpoolSpec::default();
    macro_rules! field {
        ($name:literal, $parse:expr) => {
            if let Some(v) = f.get(cx, &[$name]) {
                match $parse(cx, v) {
                    Some(v) => Some(v),
                    None => {
                        ok = false;
                        None
                    }
                }
            } else {
                None
            }
        };
    }
    spec.enabled = field!("enabled", boolean);
    spec.path = field!("path", |cx: &mut Cx, v| string(cx, v).map(PathBuf::from));
    spec.max_bytes = field!("maxBytes", |cx: &mut Cx, v| size(cx, v, 64 * 1024));
    spec.max_age = field!("maxAge", duration);
    spec.when_full = field!("whenFull", |cx: &mut Cx, v| one_of(
        cx,
        v,
        &[
            ("block", crate::spool::WhenFull::Block),
            ("drop-oldest", crate::spool::WhenFull::DropOldest),
        ]
    ));
    spec.sync = field!("sync", |cx: &mut Cx, v| one_of(
        cx,
        v,
        &[
            ("always", crate::spool::SyncMode::Always),
            ("interval", crate::spool::SyncMode::Interval),
        ]
    ));
    spec.sync_interval = field!("syncInterval", duration);
    spec.min_free_bytes = field!("minFreeBytes", |cx: &mut Cx, v| size(cx, v, 0));
    if let Some((p, n)) = f.get(cx, &["drainRate"]) {
        match Fields::of(cx, n, &p) {
            Some(mut d) => {
                if let Some(v) = d.get(cx, &["messagesPerSecond"]) {
                    match integer(cx, v, 1, 10_000_000) {
                        Some(v) => spec.rate_messages = Some(v as u32),
                        None => ok = false,
                    }
                }
                if let Some(v) = d.get(cx, &["bytesPerSecond"]) {
                    match size(cx, v, 1) {
                        Some(v) => spec.rate_bytes = Some(v),
                        None => ok = false,
                    }
                }
                d.finish(cx);
            }
            None => ok = false,
        }
    }
    f.finish(cx);
    ok.then_some(spec)
}

/// A size in bytes: an integer, or with a suffix `Ki`, `Mi`, `Gi`, `Ti` (powers of 1024) or
/// `k`, `M`, `G`, `T` (powers of 1000), as Kubernetes quantities are written.
pub(crate) fn size(cx: &mut Cx, (path, node): (String, &Node), min: u64) -> Option<u64> {
    let s = string(cx, (path.clone(), node))?;
    let t = s.trim();
    let (num, mul) = [
        ("Ki", 1u64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("K", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ]
    .iter()
    .find_map(|(suffix, m)| t.strip_suffix(suffix).map(|n| (n, *m)))
    .unwrap_or((t, 1));
    match num
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
    {
        Some(v) if v >= min => Some(v),
        Some(v) => {
            cx.err(
                node.line,
                &path,
                format!("{v} bytes is too small; at least {min}"),
            );
            None
        }
        None => {
            cx.err(
                node.line,
                &path,
                format!("expected a size in bytes such as 1073741824, 512Mi or 1Gi, found \"{s}\""),
            );
            None
        }
    }
}

/// A duration: a number with a unit `ms`, `s`, `m`, `h` or `d` (`100ms`, `10m`, `7d`).
pub(crate) fn duration(cx: &mut Cx, (path, node): (String, &Node)) -> Option<std::time::Duration> {
    let s = string(cx, (path.clone(), node))?;
    let t = s.trim();
    let parsed = [
        ("ms", 1u64),
        ("s", 1_000),
        ("m", 60_000),
        ("h", 3_600_000),
        ("d", 86_400_000),
    ]
    .iter()
    .find_map(|(unit, ms)| {
        let n = t.strip_suffix(unit)?.trim().parse::<u64>().ok()?;
        n.checked_mul(*ms)
    });
    match parsed {
        Some(ms) if ms > 0 => Some(std::time::Duration::from_millis(ms)),
        _ => {
            cx.err(
                node.line,
                &path,
                format!("expected a duration such as 100ms, 30s, 10m, 24h or 7d, found \"{s}\""),
            );
            None
        }
    }
}

fn link(
    connectors: &mut [Connector],
    maps: Vec<TopicMap>,
    broken: &[String],
    errors: &mut Vec<ConfigError>,
) {
    let mut seen: HashMap<(Option<String>, String), Origin> = HashMap::new();
    for c in connectors.iter() {
        let key = (c.namespace.clone(), c.name.clone());
        if let Some(first) = seen.get(&key) {
            errors.push(ConfigError {
                file: c.origin.file.clone(),
                line: Some(c.origin.line),
                document: Some(format!("MqttBridgeConnector \"{}\"", c.name)),
                field: Some("metadata.name".into()),
                message: format!("a connector with this name is already defined at {first}"),
            });
        } else {
            seen.insert(key, c.origin.clone());
        }
    }
    // Route names per connector (a lookup per route: large files stay linear).
    let mut route_names: HashMap<String, HashMap<String, usize>> = HashMap::new();
    for map in maps {
        let Some(c) = connectors.iter_mut().find(|c| c.name == map.connector_ref) else {
            if broken.contains(&map.connector_ref) {
                continue;
            }
            let known: Vec<&str> = connectors.iter().map(|c| c.name.as_str()).collect();
            errors.push(ConfigError {
                file: map.ref_origin.file.clone(),
                line: Some(map.ref_origin.line),
                document: Some(map.document.clone()),
                field: Some("spec.mqttBridgeConnectorRef".into()),
                message: if known.is_empty() {
                    format!(
                        "no MqttBridgeConnector named \"{}\" is loaded (none is loaded at all)",
                        map.connector_ref
                    )
                } else {
                    format!(
                        "no MqttBridgeConnector named \"{}\" is loaded; loaded: {}",
                        map.connector_ref,
                        known.join(", ")
                    )
                },
            });
            continue;
        };
        let names = route_names.entry(c.name.clone()).or_insert_with(|| {
            c.routes
                .iter()
                .enumerate()
                .map(|(i, r)| (r.name.clone(), i))
                .collect()
        });
        for route in map.routes {
            if let Some(first) = names.get(&route.name).map(|i| &c.routes[*i]) {
                errors.push(ConfigError {
                    file: route.origin.file.clone(),
                    line: Some(route.origin.line),
                    document: Some(map.document.clone()),
                    field: Some("spec.routes[].name".into()),
                    message: format!(
                        "route name \"{}\" is already used by connector \"{}\" at {} (route names make client IDs and must be unique)",
                        route.name, c.name, first.origin
                    ),
                });
                continue;
            }
            names.insert(route.name.clone(), c.routes.len());
            c.routes.push(route);
        }
    }
}
