//! Integration-test harness: real Mosquitto brokers on ephemeral loopback ports, a test PKI
//! made with rcgen, and MQTT 5 test clients (rumqttc, an implementation independent of the
//! bridge's own session code) that publish and count what arrives.

use std::collections::HashMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

#[path = "../../host/tests/common/ports.rs"]
mod ports;
pub use ports::free_port;

/// The bridge binary, built if it is not there or out of date (`cargo test --workspace` builds
/// it already). It is built as `cargo test --workspace` builds it — the workspace's binaries
/// and tests together, so with the same features — so that this is no second build of every
/// dependency (`-p edgebridge` alone resolves other features: 36 crates and 0.5 GB more).
pub fn bridge_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap().to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let ok = Command::new(cargo)
        .args(["build", "-q", "--workspace", "--tests", "--bins"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "cargo build --workspace --tests --bins failed");
    dir.join("edgebridge")
}

/// Loads `yaml` as the bridge would from `dir/bridge.yaml`, with the Secret and ConfigMap
/// folders `dir/secrets` and `dir/configmaps`; a problem fails the test, printing the YAML.
pub fn load_config(dir: &Path, yaml: &str) -> edgebridge::config::Config {
    let path = write_file(dir, "bridge.yaml", yaml);
    edgebridge::config::load(
        &[path],
        &edgebridge::config::LoadOptions {
            secrets_dir: dir.join("secrets"),
            configmaps_dir: dir.join("configmaps"),
        },
    )
    .unwrap_or_else(|r| panic!("invalid test configuration:\n{r}\n{yaml}"))
}

/// Logs of the bridge under test go to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "off".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Certificates for a TLS listener that requires client certificates.
pub struct Pki {
    /// Folder holding every file below.
    pub dir: PathBuf,
    /// `ca.pem`.
    pub ca: PathBuf,
    /// `server.pem` (SAN localhost, 127.0.0.1).
    pub server_cert: PathBuf,
    /// `server.key`.
    pub server_key: PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    /// The CA, server certificate and key files, as [`MosquittoOptions::tls`] takes them.
    pub fn server_files(&self) -> (PathBuf, PathBuf, PathBuf) {
        (
            self.ca.clone(),
            self.server_cert.clone(),
            self.server_key.clone(),
        )
    }

    /// Makes a CA and a server certificate (for localhost and 127.0.0.1) in `dir`.
    pub fn new(dir: &Path) -> Pki {
        Pki::with_server(dir, &["localhost", "127.0.0.1"], false)
    }

    /// Makes a CA and a server certificate for `names`, already expired if `expired`.
    pub fn with_server(dir: &Path, names: &[&str], expired: bool) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        std::fs::create_dir_all(dir).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "edgebridge test CA");
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let server_key = KeyPair::generate().unwrap();
        let mut server_params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        if expired {
            server_params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            server_params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let server = server_params.signed_by(&server_key, &issuer).unwrap();
        let pki = Pki {
            dir: dir.to_path_buf(),
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            issuer,
        };
        std::fs::write(&pki.ca, ca_cert.pem()).unwrap();
        std::fs::write(&pki.server_cert, server.pem()).unwrap();
        std::fs::write(&pki.server_key, server_key.serialize_pem()).unwrap();
        pki
    }

    /// Writes a client certificate signed by an intermediate CA (itself signed by the test
    /// CA) as a Kubernetes-style secret folder: `client_cert.pem`, `client_key.pem`,
    /// `client_intermediate_certs.pem`.
    pub fn client_secret(&self, secret_dir: &Path, common_name: &str) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let root = &self.issuer;
        let mut inter_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        inter_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        inter_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "edgebridge test intermediate");
        let inter_key = KeyPair::generate().unwrap();
        let inter_cert = inter_params.signed_by(&inter_key, root).unwrap();
        let inter = Issuer::new(inter_params, inter_key);
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &inter).unwrap();
        std::fs::create_dir_all(secret_dir).unwrap();
        std::fs::write(secret_dir.join("client_cert.pem"), cert.pem()).unwrap();
        std::fs::write(secret_dir.join("client_key.pem"), key.serialize_pem()).unwrap();
        std::fs::write(
            secret_dir.join("client_intermediate_certs.pem"),
            inter_cert.pem(),
        )
        .unwrap();
    }
}

/// How to start a Mosquitto broker.
#[derive(Default, Clone)]
pub struct MosquittoOptions {
    /// Keep sessions and queued messages across a graceful restart.
    pub persistence: bool,
    /// Add a TLS listener requiring client certificates from this PKI.
    pub tls: Option<(PathBuf, PathBuf, PathBuf)>,
    /// Refuse anonymous clients; accept this user name and password.
    pub password: Option<(String, String)>,
    /// Add a WebSocket listener (and, with `tls`, a secure WebSocket listener that does not
    /// ask for client certificates).
    pub websockets: bool,
    /// More configuration lines, e.g. `max_packet_size 2000\n`.
    pub extra: String,
}

/// An `MqttBridgeConnector` named `test-bridge` (client IDs `edge-<route>`) between `local` and
/// `remote` without TLS, each side followed by `*_extra` lines at its indentation (e.g. an
/// `authentication:` block), and its `MqttBridgeTopicMap` with `routes`, as the source
/// documents write them.
pub fn connector_yaml(
    protocol: &str,
    instances: u32,
    (local, local_extra): (&str, &str),
    (remote, remote_extra): (&str, &str),
    routes: &str,
) -> String {
    format!(
        "apiVersion: mq.iotoperations.azure.com/v1beta1
kind: MqttBridgeConnector
metadata:
  name: test-bridge
spec:
  protocol: {protocol}
  bridgeInstances: {instances}
  clientIdPrefix: edge-
  remoteBrokerConnection:
    endpoint: \"{remote}\"
    tls:
      tlsEnabled: false
{remote_extra}  localBrokerConnection:
    endpoint: \"{local}\"
    tls:
      tlsEnabled: false
{local_extra}---
apiVersion: mq.iotoperations.azure.com/v1beta1
kind: MqttBridgeTopicMap
metadata:
  name: test-map
spec:
  mqttBridgeConnectorRef: test-bridge
  routes:
{routes}"
    )
}

/// [`connector_yaml`] with nothing more on either side.
pub fn bridge_yaml(
    protocol: &str,
    local: &str,
    remote: &str,
    instances: u32,
    routes: &str,
) -> String {
    connector_yaml(protocol, instances, (local, ""), (remote, ""), routes)
}

/// A Mosquitto process with its own folder and ports.
pub struct Mosquitto {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Plain MQTT port.
    pub port: u16,
    /// TLS port, if configured.
    pub tls_port: Option<u16>,
    /// WebSocket port, if configured.
    pub ws_port: Option<u16>,
    /// Secure WebSocket port, if configured.
    pub wss_port: Option<u16>,
}

impl Mosquitto {
    /// Starts a broker and waits until it accepts connections.
    pub fn start(opts: MosquittoOptions) -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let tls_port = opts.tls.as_ref().map(|_| free_port());
        let ws_port = opts.websockets.then(free_port);
        let wss_port = (opts.websockets && opts.tls.is_some()).then(free_port);
        let mut conf = format!(
            // `user root`: when the tests run as root (CI), Mosquitto would otherwise drop to
            // user `mosquitto` and could not write its log and persistence file here.
            "user root\nper_listener_settings false\nallow_anonymous true\nlistener {port} 127.0.0.1\n\
             max_queued_messages 0\nmax_inflight_messages 0\n\
             log_dest file {log}\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\n",
            log = dir.path().join("mosquitto.log").display()
        );
        if let Some((user, pass)) = &opts.password {
            let file = dir.path().join("passwd");
            let ok = Command::new("mosquitto_passwd")
                .arg("-b")
                .arg("-c")
                .arg(&file)
                .arg(user)
                .arg(pass)
                .status()
                .expect("mosquitto_passwd is on PATH (scripts/test installs it)")
                .success();
            assert!(ok, "mosquitto_passwd failed");
            conf = conf.replace("allow_anonymous true", "allow_anonymous false");
            conf.push_str(&format!("password_file {}\n", file.display()));
        }
        if opts.persistence {
            conf.push_str(&format!(
                "persistence true\npersistence_location {}/\nautosave_interval 1\n",
                dir.path().display()
            ));
        }
        if let (Some((ca, cert, key)), Some(tp)) = (&opts.tls, tls_port) {
            conf.push_str(&format!(
                "listener {tp} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nuse_identity_as_username true\n",
                ca.display(),
                cert.display(),
                key.display()
            ));
        }
        if let Some(wp) = ws_port {
            conf.push_str(&format!("listener {wp} 127.0.0.1\nprotocol websockets\n"));
        }
        if let (Some((_, cert, key)), Some(wp)) = (&opts.tls, wss_port) {
            conf.push_str(&format!(
                "listener {wp} 127.0.0.1\nprotocol websockets\ncertfile {}\nkeyfile {}\n",
                cert.display(),
                key.display()
            ));
        }
        conf.push_str(&opts.extra);
        std::fs::write(dir.path().join("mosquitto.conf"), conf).unwrap();
        let mut m = Mosquitto {
            child: None,
            dir,
            port,
            tls_port,
            ws_port,
            wss_port,
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto is on PATH (scripts/test installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("mosquitto did not start; log:\n{}", self.log());
    }

    /// The broker's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the broker gracefully (SIGTERM: a persistent broker saves its sessions).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let _ = child.wait();
        }
    }

    /// Starts the stopped broker again on the same ports.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// The broker's configuration file (edit, then [`Mosquitto::restart`]).
    pub fn conf_path(&self) -> PathBuf {
        self.dir.path().join("mosquitto.conf")
    }

    /// The broker's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// `127.0.0.1:port`.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One message a [`Collector`] received.
#[derive(Debug, Clone)]
pub struct Received {
    /// Topic.
    pub topic: String,
    /// Payload as text.
    pub payload: String,
    /// Retain flag.
    pub retain: bool,
    /// QoS it was delivered with (the collector subscribes at QoS 1).
    pub qos: u8,
    /// MQTT 5 properties.
    pub properties: Option<PublishProperties>,
}

/// A test subscriber that records everything it receives.
pub struct Collector {
    received: Arc<Mutex<Vec<Received>>>,
    errors: Arc<Mutex<Vec<String>>>,
    subscribed: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    /// Subscribes to `filter` at QoS 1 on the broker at `port`. With `persistent`, the
    /// session survives disconnects and broker restarts (with persistence).
    pub async fn start(port: u16, client_id: &str, filter: &str, persistent: bool) -> Collector {
        let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_max_packet_size(Some(16 << 20));
        opts.set_clean_start(!persistent);
        if persistent {
            opts.set_session_expiry_interval(Some(3600));
        }
        let (client, mut eventloop) = AsyncClient::new(opts, 1000);
        let received = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready = Some(ready_tx);
        let store = received.clone();
        let errs = errors.clone();
        let subscribed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let subs = subscribed.clone();
        let filter = filter.to_string();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.subscribe(filter.clone(), QoS::AtLeastOnce).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        subs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        store.lock().unwrap().push(Received {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: String::from_utf8_lossy(&p.payload).into_owned(),
                            retain: p.retain,
                            qos: p.qos as u8,
                            properties: p.properties,
                        });
                    }
                    Ok(_) => {}
                    Err(e) => {
                        errs.lock().unwrap().push(e.to_string());
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("collector subscribed in time")
            .expect("collector task alive");
        Collector {
            received,
            errors,
            subscribed,
            task,
        }
    }

    /// Everything received so far.
    pub fn messages(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Subscriptions granted so far (one per connection).
    pub fn subscriptions(&self) -> usize {
        self.subscribed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Connection errors the collector saw (each one a reconnect).
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().unwrap().clone()
    }

    /// Number of messages received so far.
    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// Waits until at least `n` messages arrived or `timeout` passed; returns the count.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.count() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.count()
    }

    /// Payloads counted: (distinct payloads, duplicates).
    pub fn distinct_and_duplicates(&self) -> (HashMap<String, usize>, usize) {
        let mut seen: HashMap<String, usize> = HashMap::new();
        for m in self.messages() {
            *seen.entry(m.payload).or_default() += 1;
        }
        let dups = seen.values().map(|c| c - 1).sum();
        (seen, dups)
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A test publisher.
pub struct Publisher {
    client: AsyncClient,
    acked: Arc<Mutex<usize>>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    /// Connects to the broker at `port`.
    pub async fn connect(port: u16, client_id: &str) -> Publisher {
        let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        Publisher::connect_with(opts).await
    }

    /// Connects with a user name and password.
    pub async fn connect_with_login(
        port: u16,
        client_id: &str,
        user: &str,
        password: &str,
    ) -> Publisher {
        let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_credentials(user, password);
        Publisher::connect_with(opts).await
    }

    async fn connect_with(opts: MqttOptions) -> Publisher {
        let (client, mut eventloop) = AsyncClient::new(opts, 10_000);
        let acked = Arc::new(Mutex::new(0));
        let a = acked.clone();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready = Some(ready_tx);
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => *a.lock().unwrap() += 1,
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("publisher connected in time")
            .expect("publisher task alive");
        Publisher {
            client,
            acked,
            task,
        }
    }

    /// Publishes one message.
    pub async fn publish(&self, topic: &str, qos: u8, retain: bool, payload: &str) {
        let qos = match qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        };
        self.client
            .publish(topic, qos, retain, payload.as_bytes().to_vec())
            .await
            .unwrap();
    }

    /// Publishes one message with MQTT 5 properties.
    pub async fn publish_with(
        &self,
        topic: &str,
        retain: bool,
        payload: &str,
        props: PublishProperties,
    ) {
        self.client
            .publish_with_properties(
                topic,
                QoS::AtLeastOnce,
                retain,
                payload.as_bytes().to_vec(),
                props,
            )
            .await
            .unwrap();
    }

    /// QoS 1 PUBACKs received so far.
    pub fn acked(&self) -> usize {
        *self.acked.lock().unwrap()
    }

    /// Waits until `n` PUBACKs arrived.
    pub async fn wait_acked(&self, n: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline && self.acked() < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.acked()
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Polls `cond` until it holds or `timeout` passes; returns whether it held. (Counters are
/// bumped when the target's PUBACK is processed, which can be after a test client already saw
/// the forwarded message: wait for them, do not sleep.)
pub async fn eventually(timeout: Duration, cond: impl Fn() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

pub mod auth;
pub mod faults;
pub mod kube;
pub mod proxy;
pub mod spool;

/// What `/metrics` and `/status` of a running bridge read (`edgebridge::metrics::render`,
/// `edgebridge::status::status_json`), without serving HTTP.
pub fn observed(b: &edgebridge::bridge::RunningBridge) -> Arc<edgebridge::status::Observed> {
    Arc::new(edgebridge::status::Observed {
        stats: b.stats.clone(),
        plugins: b.plugins.clone(),
        stall_timeout: Duration::from_secs(60),
        started: std::time::SystemTime::now(),
    })
}

/// Source-document fixtures shipped in `tests/fixtures/`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// The component built from `plugins/<name>` (e.g. `topic-template`, `fixtures/misbehave` as
/// `misbehave`) by the tests' build script.
pub fn plugin_wasm(name: &str) -> PathBuf {
    let p = Path::new(env!("EDGEBRIDGE_PLUGIN_ARTIFACTS"))
        .join(format!("{}.wasm", name.replace('-', "_")));
    let p = if p.exists() {
        p
    } else {
        Path::new(env!("EDGEBRIDGE_PLUGIN_ARTIFACTS")).join(format!("{name}.wasm"))
    };
    assert!(p.exists(), "plugin component {} was not built", p.display());
    p
}

/// Copies the component of `plugin` into `dir` as `<as_name>.wasm`, atomically (write to a
/// dotfile, then rename), as an operator should.
pub fn install_plugin(dir: &Path, plugin: &str, as_name: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let tmp = dir.join(format!(".{as_name}.wasm.tmp"));
    std::fs::copy(plugin_wasm(plugin), &tmp).unwrap();
    let dest = dir.join(format!("{as_name}.wasm"));
    std::fs::rename(&tmp, &dest).unwrap();
    dest
}
