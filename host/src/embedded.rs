//! An in-process MQTT broker (rumqttd) for `embedded://host:port` endpoints, so the bridge
//! runs with nothing installed: the quick start, single-box gateways, and tests.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

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

/// Embedded brokers started by this process, by address.
static STARTED: std::sync::Mutex<Vec<(SocketAddr, Protocol)>> = std::sync::Mutex::new(Vec::new());

/// Starts an embedded broker speaking `protocol` on `endpoint` and waits until it accepts
/// connections. It runs on its own threads for the rest of the process; starting it again
/// (a configuration reload) is a no-op.
pub fn start(endpoint: &Endpoint, protocol: Protocol) -> Result<SocketAddr, EmbeddedError> {
    let text = format!("{}:{}", endpoint.host, endpoint.port);
    let addr = text
        .to_socket_addrs()
        .map_err(|e| EmbeddedError::Address(text.clone(), e.to_string()))?
        .next()
        .ok_or_else(|| EmbeddedError::Address(text.clone(), "no address".into()))?;
    let mut started = STARTED.lock().expect("embedded brokers lock");
    match started.iter().find(|(a, _)| *a == addr) {
        Some((_, p)) if *p == protocol => return Ok(addr),
        Some((_, p)) => {
            return Err(EmbeddedError::Address(
                text,
                format!(
                    "an embedded broker speaking {p:?} already runs there; restart the bridge to change its protocol"
                ),
            ));
        }
        None => {}
    }
    // Bind once ourselves so that a busy port is a clear error instead of a log line from a
    // broker thread.
    drop(TcpListener::bind(addr).map_err(|source| EmbeddedError::Bind { addr, source })?);

    let server = rumqttd::ServerSettings {
        name: format!("embedded-{}", addr),
        listen: addr,
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
    let servers = HashMap::from([("embedded".to_string(), server)]);
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 10_010,
            max_outgoing_packet_count: 200,
            max_segment_size: 104_857_600,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: (protocol == Protocol::V3).then(|| servers.clone()),
        v5: (protocol == Protocol::V5).then_some(servers),
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
        .map_err(|source| EmbeddedError::Bind { addr, source })?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            tracing::info!("Embedded broker listening on {addr} ({protocol:?})");
            started.push((addr, protocol));
            return Ok(addr);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(EmbeddedError::NotReady(addr))
}
