//! An in-process MQTT broker (rumqttd) for `embedded://host:port` endpoints, so the bridge
//! runs with nothing installed: the quick start, single-box gateways, and tests.
//!
//! It accepts MQTT 3.1.1 and MQTT 5 clients on the same port, as any broker does. rumqttd
//! serves MQTT 5 on a loopback port of its own; a front listener on the configured address
//! reads the protocol level from each connection's CONNECT ([`protocol_level`]): an MQTT 5
//! connection is passed through as it is, an MQTT 3.1.1 one is translated packet by packet
//! ([`v3`]: 3.1.1 in, 5 out, and back; MQTT 5 properties are dropped on the way to a 3.1.1
//! client). rumqttd's own 3.1.1 listener is not used: it panics when a message with MQTT 5
//! properties (such as the bridge's loop mark) goes to one of its 3.1.1 clients.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::{Endpoint, Protocol};

/// Why an embedded broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    /// The address does not resolve.
    #[error("embedded broker address {0}: {1}")]
    Address(String, String),
    /// Something else listens there.
    #[error("embedded broker cannot listen on {addr}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// It did not come up in time.
    #[error("embedded broker on {0} did not start accepting connections within 10 s")]
    NotReady(SocketAddr),
}

/// Embedded brokers started by this process: the configured address, and the loopback port
/// where rumqttd itself serves MQTT 5.
static STARTED: std::sync::Mutex<Vec<Started>> = std::sync::Mutex::new(Vec::new());

struct Started {
    /// The configured address (the front listener's).
    front: SocketAddr,
    /// rumqttd's own MQTT 5 port.
    v5: SocketAddr,
    /// Connections the front listener passed on.
    passed_on: Arc<AtomicU64>,
    /// The size of its log per filter (`embeddedLogSize`), as started.
    log_bytes: u64,
}

/// The embedded broker's log per subscription filter when `embeddedLogSize` is not given:
/// 10 segments of 100 MiB as rumqttd counts them (topic and payload plus 4 bytes a message).
pub const DEFAULT_LOG_BYTES: u64 = 10 * 104_857_600;

/// The log is kept in this many segments; the oldest goes when a new one is needed.
const LOG_SEGMENTS: u64 = 10;

/// Times a subscriber of an embedded broker was further behind than the log holds and jumped
/// to its oldest message ([`log_skips_layer`] counts them).
static LOG_SKIPS: AtomicU64 = AtomicU64::new(0);

/// Times a subscriber of an embedded broker (a route client, or any client of it) fell behind
/// its log and skipped the messages it had not read: `edgebridge_embedded_log_skips_total`.
pub fn log_skips() -> u64 {
    LOG_SKIPS.load(Ordering::Relaxed)
}

/// The log layer that counts rumqttd's warnings of a reader jumping ahead in a filter's log
/// (`CommitLog::readv`: "given index … less than head …, jumping to head" and "offset
/// specified … jumping"), for [`log_skips`]. rumqttd says so only in its log, which the
/// bridge's own log leaves out; this is how a skip becomes a counted and logged outcome (see
/// [`watch_skips`]). It sees only `rumqttd::segments` at WARN and above, whatever the level of
/// the bridge's log.
pub fn log_skips_layer<S>() -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer;
    LogSkips.with_filter(
        tracing_subscriber::filter::Targets::new()
            .with_target("rumqttd::segments", tracing::Level::WARN),
    )
}

/// See [`log_skips_layer`], which gives it its filter.
struct LogSkips;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for LogSkips {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Jumping(bool);
        impl tracing::field::Visit for Jumping {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}").contains("jumping");
                }
            }
        }
        let mut m = Jumping(false);
        event.record(&mut m);
        if m.0 {
            LOG_SKIPS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Logs a warning, at most once a second, when [`log_skips`] has grown: a thread of its own,
/// started with the first embedded broker (the counting layer must not log from inside the
/// log's dispatch).
fn watch_skips() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let _ = std::thread::Builder::new()
            .name("embedded-log-skips".into())
            .spawn(|| {
                let mut seen = 0;
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                    let now = log_skips();
                    if now > seen {
                        tracing::warn!(
                            skips = now - seen,
                            total = now,
                            "Embedded broker: a subscriber was further behind than the broker's in-memory log holds (embeddedLogSize) and skipped to the oldest message kept; the messages it skipped are lost to it"
                        );
                        seen = now;
                    }
                }
            });
    });
}

/// The address an embedded endpoint listens on.
fn address(endpoint: &Endpoint) -> Result<SocketAddr, EmbeddedError> {
    let text = format!("{}:{}", endpoint.host, endpoint.port);
    text.to_socket_addrs()
        .map_err(|e| EmbeddedError::Address(text.clone(), e.to_string()))?
        .next()
        .ok_or_else(|| EmbeddedError::Address(text.clone(), "no address".into()))
}

fn started(endpoint: &Endpoint) -> Option<(SocketAddr, Arc<AtomicU64>)> {
    let addr = address(endpoint).ok()?;
    STARTED
        .lock()
        .expect("embedded brokers lock")
        .iter()
        .find(|s| s.front == addr)
        .map(|s| (s.v5, s.passed_on.clone()))
}

/// Where this process's own MQTT 5 sessions reach the embedded broker at `endpoint`: rumqttd's
/// MQTT 5 port, without the front listener, which would pass their bytes on unchanged through
/// one more pair of sockets. `None` when this process did not start a broker there (then the
/// configured address is the way in).
pub fn direct(endpoint: &Endpoint) -> Option<SocketAddr> {
    started(endpoint).map(|(v5, _)| v5)
}

/// How many connections the front listener of the embedded broker at `endpoint` passed on to
/// it (MQTT 3.1.1 clients, and MQTT 5 clients from outside this process).
pub fn front_connections(endpoint: &Endpoint) -> Option<u64> {
    started(endpoint).map(|(_, n)| n.load(Ordering::Relaxed))
}

/// How long a new connection may take to send the start of its CONNECT.
const CONNECT_WAIT: Duration = Duration::from_secs(10);

/// What the first bytes of a connection say about its protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// MQTT 3.1.1 (level 4) or 3.1 (level 3).
    V3,
    /// MQTT 5 (level 5).
    V5,
    /// More bytes are needed.
    Incomplete,
    /// Not an MQTT CONNECT.
    NotMqtt,
}

/// Reads the protocol level of the CONNECT at the start of `buf` (pure).
pub fn protocol_level(buf: &[u8]) -> Level {
    let Some(&first) = buf.first() else {
        return Level::Incomplete;
    };
    if first != 0x10 {
        return Level::NotMqtt;
    }
    // Remaining length: 1 to 4 bytes.
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else {
            return Level::Incomplete;
        };
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return Level::NotMqtt;
        }
    }
    let Some(name_len) = buf.get(i..i + 2) else {
        return Level::Incomplete;
    };
    let name_len = u16::from_be_bytes([name_len[0], name_len[1]]) as usize;
    if name_len != 4 && name_len != 6 {
        return Level::NotMqtt;
    }
    let Some(name) = buf.get(i + 2..i + 2 + name_len) else {
        return Level::Incomplete;
    };
    if name != b"MQTT" && name != b"MQIsdp" {
        return Level::NotMqtt;
    }
    match buf.get(i + 2 + name_len) {
        None => Level::Incomplete,
        Some(3 | 4) => Level::V3,
        Some(5) => Level::V5,
        Some(_) => Level::NotMqtt,
    }
}

fn loopback_port() -> Result<SocketAddr, std::io::Error> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// Starts an embedded broker on `endpoint` (MQTT 3.1.1 and 5) and waits until it accepts
/// connections. It runs on its own threads for the rest of the process; starting it again (a
/// configuration reload) is a no-op, and a different `log_bytes` then only logs a warning:
/// rumqttd's log is sized when it starts. `_protocol` is the connector's; the broker speaks
/// both. `log_bytes` is `embeddedLogSize` ([`DEFAULT_LOG_BYTES`] when not given).
pub fn start(
    endpoint: &Endpoint,
    _protocol: Protocol,
    log_bytes: Option<u64>,
) -> Result<SocketAddr, EmbeddedError> {
    let addr = address(endpoint)?;
    let log_bytes = log_bytes.unwrap_or(DEFAULT_LOG_BYTES);
    let mut started = STARTED.lock().expect("embedded brokers lock");
    if let Some(s) = started.iter().find(|s| s.front == addr) {
        if s.log_bytes != log_bytes {
            tracing::warn!(
                "Embedded broker on {addr}: embeddedLogSize changed from {} to {log_bytes} bytes; it applies when the bridge starts again",
                s.log_bytes
            );
        }
        return Ok(addr);
    }
    // The front listener binds the configured address first, so that a busy port is a clear
    // error instead of a log line from a broker thread.
    let front = TcpListener::bind(addr).map_err(|source| EmbeddedError::Bind { addr, source })?;
    front
        .set_nonblocking(true)
        .map_err(|source| EmbeddedError::Bind { addr, source })?;
    let bind = |source| EmbeddedError::Bind { addr, source };
    let v5_addr = loopback_port().map_err(bind)?;
    let server = |listen: SocketAddr, name: &str| rumqttd::ServerSettings {
        name: format!("embedded-{addr}-{name}"),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 256 * 1024 * 1024,
            max_inflight_count: 500,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 10_010,
            max_outgoing_packet_count: 200,
            // rumqttd keeps what is published under each subscription filter in an in-memory
            // log of segments until a segment rotates out, read or not; a subscriber further
            // behind than the log resumes at its oldest message (rumqttd has no backpressure
            // to publishers). `embeddedLogSize` as rumqttd counts it (topic and payload plus
            // 4 bytes a message), 10 x 100 MiB by default: the process grows to more under
            // sustained traffic, 2.1 GiB per filter at 4 KiB payloads and about 4 GiB at 64 B
            // with the default (docs/benchmarks.md), the price of not dropping for a route
            // whose target is slow (a smaller log makes such a route skip messages sooner:
            // rumqttd's `CommitLog::readv` jumps a reader behind the head to it, which
            // [`log_skips_layer`] counts). docs/configuration.md says which broker to run for
            // heavy traffic.
            max_segment_size: usize::try_from((log_bytes / LOG_SEGMENTS).max(1))
                .unwrap_or(usize::MAX),
            max_segment_count: LOG_SEGMENTS as usize,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: None,
        v5: Some(HashMap::from([("v5".to_string(), server(v5_addr, "v5"))])),
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    };
    std::thread::Builder::new()
        .name(format!("embedded-broker-{}", addr.port()))
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!("Embedded broker on {addr} stopped: {e}");
            }
        })
        .map_err(bind)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let up = |a: &SocketAddr| TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok();
    while !up(&v5_addr) {
        if Instant::now() >= deadline {
            return Err(EmbeddedError::NotReady(addr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // rumqttd does not set TCP_NODELAY on its connections: a QoS 0 message it sends while the
    // one before is not yet acknowledged waits for the receiver's delayed ACK, up to 40 ms
    // (p99 of 62-74 ms at 5,000 msg/s measured through a QoS 0 route). Linux gives an accepted
    // socket the listening socket's TCP_NODELAY, so it is set on rumqttd's listener.
    if let Err(e) = nagle_off(v5_addr) {
        tracing::warn!(
            "Embedded broker on {addr}: cannot turn Nagle's algorithm off on its connections ({e}); QoS 0 messages may wait up to 40 ms"
        );
    }
    let passed_on = Arc::new(AtomicU64::new(0));
    let count = passed_on.clone();
    std::thread::Builder::new()
        .name(format!("embedded-front-{}", addr.port()))
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("Embedded broker on {addr}: no runtime for its listener: {e}");
                    return;
                }
            };
            rt.block_on(front_loop(front, v5_addr, count));
        })
        .map_err(bind)?;
    tracing::info!("Embedded broker listening on {addr} (MQTT 3.1.1 and 5)");
    started.push(Started {
        front: addr,
        v5: v5_addr,
        passed_on,
        log_bytes,
    });
    watch_skips();
    Ok(addr)
}

/// Sets TCP_NODELAY on the listening socket of this process bound to `listen`, so that every
/// connection it accepts from now on sends without Nagle's delay. The listener is rumqttd's:
/// it binds it itself and offers no way to set socket options, so it is found among this
/// process's file descriptors by its address ([`own_socket`]).
fn nagle_off(listen: SocketAddr) -> std::io::Result<()> {
    let listener = own_socket(|fd| {
        rustix::net::sockopt::socket_acceptconn(fd).unwrap_or(false)
            && local_addr(fd) == Some(listen)
    })?
    .ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no listening socket on {listen} in /proc/self/fd"),
        )
    })?;
    Ok(rustix::net::sockopt::set_tcp_nodelay(&listener, true)?)
}

fn local_addr(fd: &std::os::fd::OwnedFd) -> Option<SocketAddr> {
    rustix::net::getsockname(fd)
        .ok()
        .and_then(|a| SocketAddr::try_from(a).ok())
}

/// A duplicate of the first socket of this process (`/proc/self/fd`) for which `matches`
/// holds. The duplicate comes from `pidfd_getfd` (Linux 5.6) and is owned, so no `unsafe` is
/// needed; it shares the socket, so options set on it apply to the original. A descriptor
/// closed since the listing is skipped; one reused since is checked as any other.
fn own_socket(
    matches: impl Fn(&std::os::fd::OwnedFd) -> bool,
) -> std::io::Result<Option<std::os::fd::OwnedFd>> {
    use rustix::process::{PidfdFlags, PidfdGetfdFlags, getpid, pidfd_getfd, pidfd_open};
    let me = pidfd_open(getpid(), PidfdFlags::empty())?;
    for entry in std::fs::read_dir("/proc/self/fd")?.flatten() {
        let Some(raw) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if !std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
        {
            continue;
        }
        let Ok(fd) = pidfd_getfd(&me, raw, PidfdGetfdFlags::empty()) else {
            continue;
        };
        if matches(&fd) {
            return Ok(Some(fd));
        }
    }
    Ok(None)
}

/// Accepts connections on the configured address and passes each to the broker, as it is
/// (MQTT 5) or translated (MQTT 3.1.1).
async fn front_loop(front: TcpListener, v5: SocketAddr, passed_on: Arc<AtomicU64>) {
    let listener = match tokio::net::TcpListener::from_std(front) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("Embedded broker: cannot listen: {e}");
            return;
        }
    };
    loop {
        match listener.accept().await {
            Ok((conn, _)) => {
                passed_on.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(pass_on(conn, v5));
            }
            Err(e) => {
                // Out of file descriptors, say: wait instead of spinning.
                tracing::warn!("Embedded broker: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn pass_on(mut conn: tokio::net::TcpStream, v5: SocketAddr) {
    let _ = conn.set_nodelay(true);
    let mut head = Vec::with_capacity(16);
    let level = tokio::time::timeout(CONNECT_WAIT, async {
        let mut byte = [0u8; 16];
        loop {
            match protocol_level(&head) {
                Level::Incomplete if head.len() < 16 => {}
                Level::Incomplete => return Level::NotMqtt,
                other => return other,
            }
            match conn.read(&mut byte[..16 - head.len()]).await {
                Ok(0) | Err(_) => return Level::NotMqtt,
                Ok(n) => head.extend_from_slice(&byte[..n]),
            }
        }
    })
    .await
    .unwrap_or(Level::NotMqtt);
    if !matches!(level, Level::V3 | Level::V5) {
        return; // not MQTT, or silent: closed
    }
    let Ok(mut upstream) = tokio::net::TcpStream::connect(v5).await else {
        return;
    };
    let _ = upstream.set_nodelay(true);
    if level == Level::V3 {
        v3::translate(conn, upstream, head).await;
        return;
    }
    if upstream.write_all(&head).await.is_err() {
        return;
    }
    // 32 KiB towards the broker (publishers send in bulk: fewer, larger reads and writes than
    // the default 8 KiB), 8 KiB back.
    let _ =
        tokio::io::copy_bidirectional_with_sizes(&mut conn, &mut upstream, 32 << 10, 8 << 10).await;
}

/// An MQTT 3.1.1 client of the embedded broker, translated to and from MQTT 5.
pub mod v3 {
    use bytes::{Bytes, BytesMut};
    use rumqttc::mqttbytes::{self as b4, v4};
    use rumqttc::v5::mqttbytes::{self as b5, v5};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Largest packet either way (the broker's own limit).
    const MAX_PACKET: usize = 256 * 1024 * 1024;

    fn qos5(q: b4::QoS) -> b5::QoS {
        match q {
            b4::QoS::AtMostOnce => b5::QoS::AtMostOnce,
            b4::QoS::AtLeastOnce => b5::QoS::AtLeastOnce,
            b4::QoS::ExactlyOnce => b5::QoS::ExactlyOnce,
        }
    }

    fn qos4(q: b5::QoS) -> b4::QoS {
        match q {
            b5::QoS::AtMostOnce => b4::QoS::AtMostOnce,
            b5::QoS::AtLeastOnce => b4::QoS::AtLeastOnce,
            b5::QoS::ExactlyOnce => b4::QoS::ExactlyOnce,
        }
    }

    /// A packet from the 3.1.1 client, as MQTT 5 for the broker.
    pub fn to_broker(p: v4::Packet) -> Option<v5::Packet> {
        Some(match p {
            v4::Packet::Connect(c) => {
                // A 3.1.1 session without clean session lasts until it is cleaned: MQTT 5's
                // session expiry 0xFFFFFFFF.
                let properties = (!c.clean_session).then(|| v5::ConnectProperties {
                    session_expiry_interval: Some(u32::MAX),
                    ..v5::ConnectProperties::new()
                });
                let will = c.last_will.map(|w| {
                    v5::LastWill::new(w.topic, w.message.to_vec(), qos5(w.qos), w.retain, None)
                });
                let login = c.login.map(|l| v5::Login::new(l.username, l.password));
                v5::Packet::Connect(
                    v5::Connect {
                        keep_alive: c.keep_alive,
                        client_id: c.client_id,
                        clean_start: c.clean_session,
                        properties,
                    },
                    will,
                    login,
                )
            }
            v4::Packet::Publish(p) => v5::Packet::Publish(v5::Publish {
                dup: p.dup,
                qos: qos5(p.qos),
                retain: p.retain,
                topic: Bytes::from(p.topic.into_bytes()),
                pkid: p.pkid,
                payload: p.payload,
                properties: None,
            }),
            v4::Packet::PubAck(a) => v5::Packet::PubAck(v5::PubAck::new(a.pkid, None)),
            v4::Packet::PubRec(a) => v5::Packet::PubRec(v5::PubRec::new(a.pkid, None)),
            v4::Packet::PubRel(a) => v5::Packet::PubRel(v5::PubRel::new(a.pkid, None)),
            v4::Packet::PubComp(a) => v5::Packet::PubComp(v5::PubComp::new(a.pkid, None)),
            v4::Packet::Subscribe(s) => v5::Packet::Subscribe(v5::Subscribe {
                pkid: s.pkid,
                filters: s
                    .filters
                    .into_iter()
                    .map(|f| v5::Filter {
                        path: f.path,
                        qos: qos5(f.qos),
                        nolocal: false,
                        preserve_retain: false,
                        retain_forward_rule: v5::RetainForwardRule::OnEverySubscribe,
                    })
                    .collect(),
                properties: None,
            }),
            v4::Packet::Unsubscribe(u) => v5::Packet::Unsubscribe(v5::Unsubscribe {
                pkid: u.pkid,
                filters: u.topics,
                properties: None,
            }),
            v4::Packet::PingReq => v5::Packet::PingReq(v5::PingReq),
            v4::Packet::Disconnect => v5::Packet::Disconnect(v5::Disconnect::new(
                v5::DisconnectReasonCode::NormalDisconnection,
            )),
            // Server-to-client packets from a client: a protocol error; the connection ends.
            _ => return None,
        })
    }

    /// A packet from the broker, as MQTT 3.1.1 for the client (`None`: close the connection,
    /// as a 3.1.1 broker does where MQTT 5 sends DISCONNECT or AUTH).
    pub fn to_client(p: v5::Packet) -> Option<v4::Packet> {
        use v4::ConnectReturnCode as C4;
        use v5::ConnectReturnCode as C5;
        Some(match p {
            v5::Packet::ConnAck(c) => v4::Packet::ConnAck(v4::ConnAck {
                session_present: c.session_present,
                code: match c.code {
                    C5::Success => C4::Success,
                    C5::RefusedProtocolVersion | C5::UnsupportedProtocolVersion => {
                        C4::RefusedProtocolVersion
                    }
                    C5::BadClientId | C5::ClientIdentifierNotValid => C4::BadClientId,
                    C5::BadUserNamePassword => C4::BadUserNamePassword,
                    C5::NotAuthorized | C5::Banned => C4::NotAuthorized,
                    _ => C4::ServiceUnavailable,
                },
            }),
            v5::Packet::Publish(p) => v4::Packet::Publish(v4::Publish {
                dup: p.dup,
                qos: qos4(p.qos),
                retain: p.retain,
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                pkid: p.pkid,
                payload: p.payload,
            }),
            v5::Packet::PubAck(a) => v4::Packet::PubAck(v4::PubAck::new(a.pkid)),
            v5::Packet::PubRec(a) => v4::Packet::PubRec(v4::PubRec::new(a.pkid)),
            v5::Packet::PubRel(a) => v4::Packet::PubRel(v4::PubRel::new(a.pkid)),
            v5::Packet::PubComp(a) => v4::Packet::PubComp(v4::PubComp::new(a.pkid)),
            v5::Packet::SubAck(s) => v4::Packet::SubAck(v4::SubAck {
                pkid: s.pkid,
                return_codes: s
                    .return_codes
                    .into_iter()
                    .map(|c| match c {
                        v5::SubscribeReasonCode::Success(q) => {
                            v4::SubscribeReasonCode::Success(qos4(q))
                        }
                        _ => v4::SubscribeReasonCode::Failure,
                    })
                    .collect(),
            }),
            v5::Packet::UnsubAck(u) => v4::Packet::UnsubAck(v4::UnsubAck { pkid: u.pkid }),
            v5::Packet::PingResp(_) => v4::Packet::PingResp,
            _ => return None,
        })
    }

    /// Moves packets between the 3.1.1 client and the broker until either side ends or sends
    /// something that cannot be translated. `head`: what was read of the client already.
    pub async fn translate(
        client: tokio::net::TcpStream,
        broker: tokio::net::TcpStream,
        head: Vec<u8>,
    ) {
        let (mut cr, mut cw) = client.into_split();
        let (mut br, mut bw) = broker.into_split();
        let up = async {
            let mut buf = BytesMut::from(&head[..]);
            let mut out = BytesMut::new();
            loop {
                loop {
                    match v4::Packet::read(&mut buf, MAX_PACKET) {
                        Ok(p) => {
                            let p = to_broker(p)?;
                            p.write(&mut out, None).ok()?;
                        }
                        Err(b4::Error::InsufficientBytes(_)) => break,
                        Err(_) => return None::<()>,
                    }
                }
                if !out.is_empty() {
                    bw.write_all(&out).await.ok()?;
                    out.clear();
                }
                if cr.read_buf(&mut buf).await.ok()? == 0 {
                    return None;
                }
            }
        };
        let down = async {
            let mut buf = BytesMut::new();
            let mut out = BytesMut::new();
            loop {
                if br.read_buf(&mut buf).await.ok()? == 0 {
                    return None::<()>;
                }
                loop {
                    match v5::Packet::read(&mut buf, Some(MAX_PACKET as u32)) {
                        Ok(p) => {
                            let p = to_client(p)?;
                            p.write(&mut out, MAX_PACKET).ok()?;
                        }
                        Err(b5::Error::InsufficientBytes(_)) => break,
                        Err(_) => return None,
                    }
                }
                if !out.is_empty() {
                    cw.write_all(&out).await.ok()?;
                    out.clear();
                }
            }
        };
        // Whichever side ends first ends both.
        tokio::select! {
            _ = up => {}
            _ = down => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An embedded broker started on a free loopback port, and its endpoint.
    async fn started_broker() -> Endpoint {
        let endpoint = Endpoint {
            host: "127.0.0.1".into(),
            port: loopback_port().unwrap().port(),
            path: None,
            embedded: true,
        };
        let e = endpoint.clone();
        tokio::task::spawn_blocking(move || start(&e, Protocol::V5, None))
            .await
            .unwrap()
            .unwrap();
        endpoint
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn this_process_s_mqtt_5_sessions_go_straight_to_the_broker_3_1_1_ones_through_the_front()
    {
        let endpoint = started_broker().await;
        let port = endpoint.port;
        assert_eq!(front_connections(&endpoint), Some(0));
        assert!(direct(&endpoint).is_some_and(|a| a.port() != port));
        let other = Endpoint {
            port: loopback_port().unwrap().port(),
            ..endpoint.clone()
        };
        assert_eq!(direct(&other), None, "no broker was started there");
        let publish = |v5: bool| {
            let t = crate::tools::Target {
                endpoint: format!("embedded://127.0.0.1:{port}"),
                v5,
                client_id: format!("direct-test-{v5}"),
            };
            async move {
                crate::tools::publish(
                    &t,
                    "direct/test",
                    crate::model::QoS::AtLeastOnce,
                    false,
                    "x",
                    (3, None),
                    Duration::from_secs(10),
                )
                .await
            }
        };
        // Acknowledged by the broker, without a connection through the front listener.
        publish(true).await.unwrap();
        assert_eq!(front_connections(&endpoint), Some(0));
        // A 3.1.1 session needs the translation: through the front.
        publish(false).await.unwrap();
        assert_eq!(front_connections(&endpoint), Some(1));
    }

    /// The other side of `client`'s connection, found as [`nagle_off`] finds its listener.
    fn far_side(client: &std::net::TcpStream) -> Option<std::os::fd::OwnedFd> {
        let me = client.local_addr().unwrap();
        own_socket(|fd| {
            rustix::net::getpeername(fd)
                .ok()
                .flatten()
                .and_then(|a| SocketAddr::try_from(a).ok())
                == Some(me)
        })
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_broker_s_connections_send_without_nagle_s_delay() {
        // The mechanism: an accepted socket takes TCP_NODELAY from its listener.
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(plain.local_addr().unwrap()).unwrap();
        let _accepted = plain.accept().unwrap();
        let nodelay = |fd| rustix::net::sockopt::tcp_nodelay(fd).unwrap();
        assert!(
            !nodelay(far_side(&client).unwrap()),
            "a listener's accepted sockets keep Nagle's algorithm unless told"
        );
        let endpoint = started_broker().await;
        let client = std::net::TcpStream::connect(direct(&endpoint).unwrap()).unwrap();
        // rumqttd accepts on a thread of its own: wait for its side to appear.
        let deadline = Instant::now() + Duration::from_secs(10);
        let broker_side = loop {
            if let Some(fd) = far_side(&client) {
                break fd;
            }
            assert!(
                Instant::now() < deadline,
                "rumqttd did not accept within 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(
            nodelay(broker_side),
            "the embedded broker's side of a connection has TCP_NODELAY"
        );
    }

    /// `embeddedLogSize` is read when the broker starts: starting it again (a reload) with
    /// another size keeps the running broker's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_start_keeps_the_running_broker_s_log_size() {
        let endpoint = Endpoint {
            host: "127.0.0.1".into(),
            port: loopback_port().unwrap().port(),
            path: None,
            embedded: true,
        };
        for size in [2 << 20, 4 << 20] {
            let e = endpoint.clone();
            tokio::task::spawn_blocking(move || start(&e, Protocol::V5, Some(size)))
                .await
                .unwrap()
                .unwrap();
        }
        let addr = address(&endpoint).unwrap();
        let kept = STARTED
            .lock()
            .unwrap()
            .iter()
            .find(|s| s.front == addr)
            .map(|s| s.log_bytes);
        assert_eq!(kept, Some(2 << 20));
    }

    #[test]
    fn the_protocol_level_is_read_from_the_connect() {
        // CONNECT, remaining length 12, "MQTT", level 4 / 5; "MQIsdp" level 3.
        assert_eq!(
            protocol_level(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c"),
            Level::V3
        );
        assert_eq!(
            protocol_level(b"\x10\x0c\x00\x04MQTT\x05\x02\x00\x3c"),
            Level::V5
        );
        assert_eq!(protocol_level(b"\x10\x0e\x00\x06MQIsdp\x03"), Level::V3);
        // A two-byte remaining length.
        assert_eq!(protocol_level(b"\x10\x80\x01\x00\x04MQTT\x05"), Level::V5);
        for cut in 0..9 {
            assert_eq!(
                protocol_level(&b"\x10\x0c\x00\x04MQTT\x05"[..cut]),
                Level::Incomplete,
                "cut at {cut}"
            );
        }
        assert_eq!(protocol_level(b"GET / HTTP/1.1\r\n"), Level::NotMqtt);
        assert_eq!(protocol_level(b"\x10\x0c\x00\x04MQTX\x05"), Level::NotMqtt);
        assert_eq!(protocol_level(b"\x10\x0c\x00\x04MQTT\x07"), Level::NotMqtt);
        assert_eq!(protocol_level(b"\x10\xff\xff\xff\xff\x01"), Level::NotMqtt);
    }

    #[test]
    fn a_3_1_1_session_translates_to_mqtt_5_and_back() {
        use bytes::{Bytes, BytesMut};
        use rumqttc::mqttbytes::{QoS as Q4, v4};
        use rumqttc::v5::mqttbytes::{QoS as Q5, v5};
        let mut c = v4::Connect::new("c");
        c.keep_alive = 30;
        c.clean_session = false;
        c.login = Some(v4::Login {
            username: "u".into(),
            password: "p".into(),
        });
        let connect = v4::Packet::Connect(c);
        match v3::to_broker(connect) {
            Some(v5::Packet::Connect(c, None, Some(login))) => {
                assert_eq!(
                    (c.client_id.as_str(), c.keep_alive, c.clean_start),
                    ("c", 30, false)
                );
                assert_eq!(
                    c.properties.unwrap().session_expiry_interval,
                    Some(u32::MAX)
                );
                assert_eq!(login.username, "u");
            }
            other => panic!("{other:?}"),
        }
        // A broker publish with MQTT 5 properties reaches the 3.1.1 client without them.
        let publish = v5::Packet::Publish(v5::Publish {
            dup: false,
            qos: Q5::AtLeastOnce,
            retain: true,
            topic: Bytes::from_static(b"a/b"),
            pkid: 7,
            payload: Bytes::from_static(b"x"),
            properties: Some(v5::PublishProperties {
                user_properties: vec![("edgebridge-via".into(), "b".into())],
                ..Default::default()
            }),
        });
        let v4p = v3::to_client(publish).unwrap();
        let mut buf = BytesMut::new();
        v4p.write(&mut buf, 1 << 20).unwrap();
        match v4::Packet::read(&mut buf, 1 << 20).unwrap() {
            v4::Packet::Publish(p) => {
                assert_eq!(
                    (p.topic.as_str(), p.pkid, p.qos, p.retain),
                    ("a/b", 7, Q4::AtLeastOnce, true)
                );
            }
            other => panic!("{other:?}"),
        }
        // MQTT 5's DISCONNECT from the broker: a 3.1.1 broker closes the connection instead.
        assert!(
            v3::to_client(v5::Packet::Disconnect(v5::Disconnect::new(
                v5::DisconnectReasonCode::SessionTakenOver
            )))
            .is_none()
        );
    }
}
