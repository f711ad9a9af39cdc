//! Configuration: the `MqttBridgeConnector` and `MqttBridgeTopicMap` YAML documents that
//! users of the MQTT bridge already have, loaded into validated domain types.
//!
//! - [`yaml`] builds a node tree that keeps line numbers.
//! - [`parse`] walks the tree, accepting every apiVersion and spelling the source documents
//!   show, and collects *every* problem into a [`ConfigReport`] instead of stopping at the first.
//!
//! Outside Kubernetes, a Secret or ConfigMap named in the YAML is a folder under
//! [`LoadOptions::secrets_dir`] / [`LoadOptions::configmaps_dir`], laid out as Kubernetes mounts it.

pub mod parse;
pub mod yaml;

use std::fmt;
use std::path::{Path, PathBuf};

use crate::model::QoS;

/// apiVersions accepted for both kinds, newest first.
pub const API_VERSIONS: &[&str] = &[
    "mq.iotoperations.azure.com/v1beta1",
    "az-edge.com/v1alpha4",
    "e4kpreview.com/v1alpha4",
];

/// Where the loader finds the folders that stand in for Kubernetes Secrets and ConfigMaps.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// `<secrets_dir>/<secretName>/client_cert.pem` etc.
    pub secrets_dir: PathBuf,
    /// `<configmaps_dir>/<configMapName>/*.crt|*.pem`.
    pub configmaps_dir: PathBuf,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            secrets_dir: PathBuf::from(DEFAULT_SECRETS_DIR),
            configmaps_dir: PathBuf::from(DEFAULT_CONFIGMAPS_DIR),
        }
    }
}

/// Default folder of Secret folders.
pub const DEFAULT_SECRETS_DIR: &str = "/etc/edgebridge/secrets";
/// Default folder of ConfigMap folders.
pub const DEFAULT_CONFIGMAPS_DIR: &str = "/etc/edgebridge/configmaps";
/// Default Kubernetes service-account token file for `authentication.kubernetes: {}`, as in
/// the connector CRD's defaults (`secretPath` + `serviceAccountTokenName`).
pub const DEFAULT_SAT_PATH: &str = "/var/run/serviceaccount/localbroker/sat-token";
/// Default local broker endpoint when `localBrokerConnection` is omitted.
pub const DEFAULT_LOCAL_ENDPOINT: &str = "aio-mq-dmqtt-frontend:1883";

/// Every connector found in the loaded files, each with the routes of its topic maps.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// Connectors, in file order.
    pub connectors: Vec<Connector>,
}

impl Config {
    /// What is valid but unwise: secret files (private keys, passwords, tokens) that other
    /// users of the machine may read. One line each, naming the file and the connector.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for c in &self.connectors {
            for (side, conn) in [
                ("remoteBrokerConnection", &c.remote),
                ("localBrokerConnection", &c.local),
            ] {
                let secrets: Vec<PathBuf> = match &conn.auth {
                    Auth::X509 { key, .. } => vec![key.clone()],
                    Auth::UsernamePassword { dir } => vec![dir.join("password")],
                    Auth::Kubernetes { token_path } => vec![token_path.clone()],
                    Auth::Anonymous | Auth::ManagedIdentity { .. } => vec![],
                };
                for f in secrets {
                    if readable_by_others(&f) {
                        out.push(format!(
                            "{}: MqttBridgeConnector \"{}\", spec.{side}: {} is readable by every user of this machine; make it readable by the bridge only (chmod o-r; in Kubernetes a volume defaultMode such as 0440)",
                            c.origin, c.name, f.display()
                        ));
                    }
                }
            }
        }
        out
    }
}

#[cfg(unix)]
fn readable_by_others(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o004 != 0)
}

#[cfg(not(unix))]
fn readable_by_others(_: &Path) -> bool {
    false
}

/// A position in the configuration files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    /// File the document came from.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// MQTT protocol version spoken on both connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// MQTT 3.1.1 (`v3`).
    V3,
    /// MQTT 5 (`v5`).
    V5,
}

/// Log level from `logLevel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// `error`
    Error,
    /// `warn`
    Warn,
    /// `info` (default)
    Info,
    /// `debug`
    Debug,
    /// `trace`
    Trace,
}

impl LogLevel {
    /// The `tracing` filter directive.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// One `MqttBridgeConnector` with the routes of every topic map that references it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connector {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`, if given.
    pub namespace: Option<String>,
    /// Where the document starts.
    pub origin: Origin,
    /// `spec.protocol`.
    pub protocol: Protocol,
    /// `spec.bridgeInstances` (>= 1).
    pub bridge_instances: u32,
    /// `spec.clientIdPrefix` ("" if omitted).
    pub client_id_prefix: String,
    /// `spec.logLevel`.
    pub log_level: LogLevel,
    /// `spec.remoteBrokerConnection`.
    pub remote: BrokerConnection,
    /// `spec.localBrokerConnection`, or the documented default.
    pub local: BrokerConnection,
    /// Routes of all linked topic maps, in file order.
    pub routes: Vec<Route>,
    /// Extension: `spool`, store and forward for every route of the connector.
    pub spool: Option<SpoolSpec>,
}

/// Extension `spool`: store-and-forward settings on a connector (for all its routes) or on a
/// route (overriding the connector's field by field). Every field is optional; see
/// [`SpoolSpec::resolve`] for the defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpoolSpec {
    /// `enabled` (default true where a `spool` is written or `--spool-dir` is given).
    pub enabled: Option<bool>,
    /// `path`: the folder under which each route client has its own.
    pub path: Option<PathBuf>,
    /// `maxBytes`.
    pub max_bytes: Option<u64>,
    /// `maxAge`.
    pub max_age: Option<std::time::Duration>,
    /// `whenFull: block | drop-oldest`.
    pub when_full: Option<crate::spool::WhenFull>,
    /// `sync: always | interval`.
    pub sync: Option<crate::spool::SyncMode>,
    /// `syncInterval`.
    pub sync_interval: Option<std::time::Duration>,
    /// `drainRate.messagesPerSecond`.
    pub rate_messages: Option<u32>,
    /// `drainRate.bytesPerSecond`.
    pub rate_bytes: Option<u64>,
    /// `minFreeBytes`.
    pub min_free_bytes: Option<u64>,
}

/// Default folder of spools when the YAML gives no `path` and `--spool-dir` is not given.
pub const DEFAULT_SPOOL_DIR: &str = "/var/lib/edgebridge/spool";

/// `name` as one file or folder name: letters, digits, `-`, `_` and `.` are kept, anything else
/// becomes `_`, and leading dots are dropped (no `..`, no hidden files).
pub fn file_name(name: &str) -> String {
    name.chars()
        .map(|ch| {
            if ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.') {
                ch
            } else {
                '_'
            }
        })
        .collect::<String>()
        .trim_start_matches('.')
        .to_string()
}

impl SpoolSpec {
    /// The spool settings of one route client: the route's fields over the connector's, over
    /// `--spool-dir`, over the defaults; `None` when it has no spool (nothing written and no
    /// `--spool-dir`, or `enabled: false`). The folder is `<path>/<connector>/<client id>`.
    pub fn resolve(
        connector: &Connector,
        route: &Route,
        client_id: &str,
        spool_dir: Option<&Path>,
    ) -> Option<crate::spool::SpoolSettings> {
        let c = connector.spool.clone().unwrap_or_default();
        let r = route.spool.clone().unwrap_or_default();
        let written = connector.spool.is_some() || route.spool.is_some();
        let enabled = r
            .enabled
            .or(c.enabled)
            .unwrap_or(written || spool_dir.is_some());
        if !enabled {
            return None;
        }
        let base = r
            .path
            .or(c.path)
            .or_else(|| spool_dir.map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SPOOL_DIR));
        let mut s = crate::spool::SpoolSettings::new(
            base.join(file_name(&connector.name))
                .join(file_name(client_id)),
        );
        if let Some(v) = r.max_bytes.or(c.max_bytes) {
            s.max_bytes = v;
        }
        s.max_age = r.max_age.or(c.max_age);
        if let Some(v) = r.when_full.or(c.when_full) {
            s.when_full = v;
        }
        if let Some(v) = r.sync.or(c.sync) {
            s.sync = v;
        }
        if let Some(v) = r.sync_interval.or(c.sync_interval) {
            s.sync_interval = v;
        }
        s.rate_messages = r.rate_messages.or(c.rate_messages);
        s.rate_bytes = r.rate_bytes.or(c.rate_bytes);
        if let Some(v) = r.min_free_bytes.or(c.min_free_bytes) {
            s.min_free_bytes = v;
        }
        Some(s)
    }
}

/// Where and how to connect to one broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerConnection {
    /// `endpoint`.
    pub endpoint: Endpoint,
    /// `protocol: mqtt | webSocket`.
    pub transport: Transport,
    /// `tls`, when `tlsEnabled: true`.
    pub tls: Option<Tls>,
    /// `authentication`.
    pub auth: Auth,
    /// How the broker is reached: failover addresses and an HTTP proxy (extensions).
    pub reach: Reach,
    /// `embeddedLogSize` (extension, `embedded://` endpoints only): the size of the embedded
    /// broker's in-memory log per subscription filter, as rumqttd counts it (topic and
    /// payload plus 4 bytes a message); `None` is [`crate::embedded::DEFAULT_LOG_BYTES`].
    pub embedded_log: Option<u64>,
}

/// The extensions of a broker connection for reaching it: addresses tried after `endpoint`,
/// and an HTTP CONNECT proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reach {
    /// `failoverEndpoints`: tried in order after `endpoint` when it cannot be reached.
    pub failover: Vec<Endpoint>,
    /// `failoverMode: round-robin`: stay on whichever address works; `priority` (default):
    /// go back to `endpoint` as soon as it is reachable again (as Mosquitto's
    /// `round_robin false`).
    pub round_robin: bool,
    /// `primaryCheckInterval`: in priority mode, how often a connection to a failover
    /// address checks whether `endpoint` is reachable again.
    pub primary_check: std::time::Duration,
    /// `proxy`.
    pub proxy: ProxySetting,
}

impl Default for Reach {
    fn default() -> Reach {
        Reach {
            failover: Vec::new(),
            round_robin: false,
            primary_check: std::time::Duration::from_secs(30),
            proxy: ProxySetting::None,
        }
    }
}

/// Whether and which HTTP CONNECT proxy the connection goes through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxySetting {
    /// Direct.
    None,
    /// From `HTTPS_PROXY` (TLS connections) or `HTTP_PROXY` (others), unless `NO_PROXY`
    /// names the host or the host is loopback: what a remote connection without `proxy`
    /// does.
    Environment,
    /// `proxy: {url, secretName}`.
    Http(HttpProxy),
}

/// An HTTP CONNECT proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpProxy {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Basic authentication: a Secret folder with `username` and `password` (read at every
    /// connect), or the user and password of the proxy URL.
    pub credentials: Option<ProxyCredentials>,
}

/// Where the proxy's basic-authentication credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyCredentials {
    /// Files `username` and `password` in this Secret folder.
    Secret(PathBuf),
    /// From the proxy URL (`http://user:password@host:port`).
    Inline {
        /// User.
        user: String,
        /// Password (never printed).
        password: crate::secret::Secret,
    },
}

impl HttpProxy {
    /// Parses `http://[user:password@]host:port[/]`.
    pub fn parse(url: &str) -> Result<HttpProxy, String> {
        let rest = url.trim().strip_prefix("http://").ok_or_else(|| {
            "the proxy URL must start with http:// (the tunnel itself is HTTP CONNECT; TLS to the broker runs inside it)".to_string()
        })?;
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') {
            return Err("the proxy URL has a path; write http://host:port".into());
        }
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let endpoint = parse::parse_endpoint(hostport)?;
        let credentials = userinfo.map(|u| {
            let (user, password) = u.split_once(':').unwrap_or((u, ""));
            ProxyCredentials::Inline {
                user: percent_decode(user),
                password: crate::secret::Secret::new(percent_decode(password)),
            }
        });
        Ok(HttpProxy {
            host: endpoint.host,
            port: endpoint.port,
            credentials,
        })
    }

    /// `host:port`, for logs and status.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl ProxySetting {
    /// The proxy a connection to `host` uses, over TLS or not: the configured one, or the
    /// environment's (`HTTPS_PROXY` / `https_proxy` for TLS, `HTTP_PROXY` / `http_proxy`
    /// otherwise; none when `NO_PROXY` / `no_proxy` names the host, a parent domain of it, or
    /// `*`). An unusable environment URL is an error naming the variable.
    pub fn resolve(&self, host: &str, tls: bool) -> Result<Option<HttpProxy>, String> {
        match self {
            ProxySetting::None => Ok(None),
            ProxySetting::Http(p) => Ok(Some(p.clone())),
            ProxySetting::Environment => {
                let var = |names: &[&str]| {
                    names.iter().find_map(|n| {
                        std::env::var(n)
                            .ok()
                            .filter(|v| !v.trim().is_empty())
                            .map(|v| (n.to_string(), v))
                    })
                };
                let names: &[&str] = if tls {
                    &["HTTPS_PROXY", "https_proxy"]
                } else {
                    &["HTTP_PROXY", "http_proxy"]
                };
                let Some((name, url)) = var(names) else {
                    return Ok(None);
                };
                // As Go's net/http: the environment's proxy is never used for loopback.
                let loopback = host.eq_ignore_ascii_case("localhost")
                    || host
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback());
                if loopback {
                    return Ok(None);
                }
                if let Some((_, no)) = var(&["NO_PROXY", "no_proxy"])
                    && no_proxy_matches(&no, host)
                {
                    return Ok(None);
                }
                HttpProxy::parse(&url)
                    .map(Some)
                    .map_err(|e| format!("{name}: {e}"))
            }
        }
    }
}

/// Whether a `NO_PROXY` list names `host`: `*`, the host itself, or a domain it is in
/// (`example.com` and `.example.com` both match `broker.example.com`).
pub fn no_proxy_matches(list: &str, host: &str) -> bool {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    list.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .any(|e| {
            let e = e.to_ascii_lowercase();
            let e = e.split(':').next().unwrap_or("").trim_start_matches('.');
            e == "*" || host == e || host.ends_with(&format!(".{e}"))
        })
}

/// A broker address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Path for WebSocket connections (default `/mqtt`).
    pub path: Option<String>,
    /// `embedded://host:port`: start an in-process broker listening there and connect to it.
    pub embedded: bool,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.embedded {
            write!(f, "embedded://")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Transport under MQTT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Plain MQTT over TCP (or TLS).
    Mqtt,
    /// MQTT over WebSocket (or secure WebSocket with TLS).
    WebSocket,
}

/// TLS settings of an enabled TLS connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    /// ConfigMap folder with the CA certificates to trust; `None` uses the OS trust store.
    pub trusted_ca_dir: Option<PathBuf>,
}

/// How the bridge authenticates to a broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// No `authentication` field: connect without credentials.
    Anonymous,
    /// `systemAssignedManagedIdentity.audience`.
    ManagedIdentity {
        /// Token audience, e.g. `https://eventgrid.azure.net`.
        audience: String,
    },
    /// `x509.secretName` / `x509.clientK8sSecret`: a client certificate.
    X509 {
        /// `client_cert.pem`.
        cert: PathBuf,
        /// `client_key.pem`.
        key: PathBuf,
        /// `client_intermediate_certs.pem`, if present.
        intermediates: Option<PathBuf>,
    },
    /// `kubernetes: {}`: a service-account token presented as MQTT 5 enhanced authentication.
    Kubernetes {
        /// The projected token file.
        token_path: PathBuf,
    },
    /// Extension: `usernamePassword.secretName`, files `username` and `password`.
    UsernamePassword {
        /// The secret folder.
        dir: PathBuf,
    },
}

/// Direction of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Subscribe on the local broker, publish to the remote one.
    LocalToRemote,
    /// Subscribe on the remote broker, publish to the local one.
    RemoteToLocal,
}

impl Direction {
    /// The spelling used in YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::LocalToRemote => "local-to-remote",
            Direction::RemoteToLocal => "remote-to-local",
        }
    }
}

/// One route of a topic map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// `name` (unique within a connector).
    pub name: String,
    /// Name of the topic map it came from.
    pub topic_map: String,
    /// `direction`.
    pub direction: Direction,
    /// `qos` (default 1): subscription QoS and the QoS of forwarded messages.
    pub qos: QoS,
    /// `source` filter.
    pub source: String,
    /// `target` topic; `None` keeps the source topic.
    pub target: Option<String>,
    /// `sharedSubscription`.
    pub shared: Option<SharedSubscription>,
    /// Extension: `plugins`, the chain of WebAssembly plugins each message goes through.
    pub plugins: Vec<PluginRef>,
    /// Extension: `onPluginError` (default `drop`).
    pub on_plugin_error: OnPluginError,
    /// Extension: `spool`, overriding the connector's.
    pub spool: Option<SpoolSpec>,
    /// Where the route is written.
    pub origin: Origin,
}

/// One plugin of a route's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginRef {
    /// Plugin name: the file `<plugins-dir>/<name>.wasm`.
    pub name: String,
    /// Its `config`, as JSON text (`{}` when omitted).
    pub config: String,
}

/// What happens to a message when a plugin traps, errs, or returns a refused decision.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum OnPluginError {
    /// Acknowledge and drop it (logged at ERROR, counted).
    #[default]
    Drop,
    /// Forward the original message as if the route had no plugins (fail open).
    Pass,
    /// Publish the original to this topic on the target broker, with the error in the user
    /// property `edgebridge-error` (MQTT 5).
    DeadLetter(String),
}

/// `sharedSubscription` of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedSubscription {
    /// `groupMinimumShareNumber` (>= 1): number of subscriber clients.
    pub clients: u32,
    /// `groupName`.
    pub group: String,
}

/// One configuration problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// File it is in.
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// `Kind "name"` of the document, when known.
    pub document: Option<String>,
    /// Dotted path of the field, e.g. `spec.routes[1].target`.
    pub field: Option<String>,
    /// What is wrong, and what would be right.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        write!(f, ":")?;
        if let Some(doc) = &self.document {
            write!(f, " {doc}")?;
        }
        if let Some(field) = &self.field {
            if self.document.is_some() {
                write!(f, ",")?;
            }
            write!(f, " {field}")?;
        }
        if self.document.is_some() || self.field.is_some() {
            write!(f, ":")?;
        }
        write!(f, " {}", self.message)
    }
}

/// Every problem found while loading, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq, thiserror::Error)]
pub struct ConfigReport {
    /// The problems.
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Loads every YAML document from the given files and folders (a folder contributes its
/// `*.yaml` and `*.yml` files, sorted by name) and validates them together.
pub fn load(paths: &[PathBuf], opts: &LoadOptions) -> Result<Config, ConfigReport> {
    let mut report = ConfigReport::default();
    let mut files = Vec::new();
    for path in paths {
        collect_files(path, &mut files, &mut report);
    }
    if files.is_empty() && report.errors.is_empty() {
        report.errors.push(ConfigError {
            file: paths.first().cloned().unwrap_or_default(),
            line: None,
            document: None,
            field: None,
            message: "no YAML files found (give files or folders holding *.yaml / *.yml)".into(),
        });
    }
    let mut sources = Vec::new();
    for file in files {
        match read_text(&file) {
            Ok(text) => sources.push((file, text)),
            Err(message) => report.errors.push(ConfigError {
                file,
                line: None,
                document: None,
                field: None,
                message,
            }),
        }
    }
    let refs: Vec<(&Path, &str)> = sources
        .iter()
        .map(|(p, t)| (p.as_path(), t.as_str()))
        .collect();
    match parse::parse_sources(&refs, opts) {
        Ok(config) if report.errors.is_empty() => Ok(config),
        Ok(_) => Err(report),
        Err(more) => {
            report.errors.extend(more.errors);
            Err(report)
        }
    }
}

/// Largest configuration or policy file read, bytes.
pub const MAX_FILE_SIZE: u64 = 16 << 20;

/// Reads all of `reader`, but never more than `limit` bytes: `Ok(None)` when there is more
/// (the input is refused whole, never cut).
pub fn read_at_most(reader: impl std::io::Read, limit: u64) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    reader.take(limit + 1).read_to_end(&mut bytes)?;
    Ok((bytes.len() as u64 <= limit).then_some(bytes))
}

/// Reads a configuration or policy file: at most [`MAX_FILE_SIZE`] bytes of UTF-8 text.
pub(crate) fn read_text(file: &Path) -> Result<String, String> {
    let f = std::fs::File::open(file).map_err(|e| format!("cannot read file: {e}"))?;
    let bytes = read_at_most(f, MAX_FILE_SIZE)
        .map_err(|e| format!("cannot read file: {e}"))?
        .ok_or_else(|| {
            format!(
                "the file is larger than {} MiB; refused",
                MAX_FILE_SIZE >> 20
            )
        })?;
    String::from_utf8(bytes).map_err(|e| {
        format!(
            "not UTF-8 text (invalid byte at offset {}); YAML files must be UTF-8",
            e.utf8_error().valid_up_to()
        )
    })
}

fn collect_files(path: &Path, files: &mut Vec<PathBuf>, report: &mut ConfigReport) {
    if path.is_dir() {
        match std::fs::read_dir(path) {
            Ok(entries) => {
                let mut found: Vec<PathBuf> = entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.is_file()
                            && matches!(
                                p.extension().and_then(|e| e.to_str()),
                                Some("yaml" | "yml")
                            )
                    })
                    .collect();
                found.sort();
                files.extend(found);
            }
            Err(e) => report.errors.push(ConfigError {
                file: path.to_path_buf(),
                line: None,
                document: None,
                field: None,
                message: format!("cannot list folder: {e}"),
            }),
        }
    } else if path.exists() {
        files.push(path.to_path_buf());
    } else {
        report.errors.push(ConfigError {
            file: path.to_path_buf(),
            line: None,
            document: None,
            field: None,
            message: "no such file or folder".into(),
        });
    }
}
