//! An in-process MQTT broker (rumqttd) for `embedded://host:port` endpoints, so the bridge
//! runs with nothing installed: the quick start, single-box gateways, and tests.
//!
//! It accepts MQTT 3.1.1 and MQTT 5 clients on the same port, as any broker does: rumqttd
//! serves each protocol on its own listener (on loopback ports of its own), and a front
//! listener on the configured address reads the protocol level from each connection's CONNECT
//! ([`protocol_level`]) and passes the connection to the listener of that protocol. Both
//! listeners share one router, so messages cross between 3.1.1 and 5 clients.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
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

/// Embedded brokers started by this process, by address.
static STARTED: std::sync::Mutex<Vec<SocketAddr>> = std::sync::Mutex::new(Vec::new());

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
/// configuration reload) is a no-op. `_protocol` is the connector's; the broker speaks both.
pub fn start(endpoint: &Endpoint, _protocol: Protocol) -> Result<SocketAddr, EmbeddedError> {
    let text = format!("{}:{}", endpoint.host, endpoint.port);
    let addr = text
        .to_socket_addrs()
        .map_err(|e| EmbeddedError::Address(text.clone(), e.to_string()))?
        .next()
        .ok_or_else(|| EmbeddedError::Address(text.clone(), "no address".into()))?;
    let mut started = STARTED.lock().expect("embedded brokers lock");
    if started.contains(&addr) {
        return Ok(addr);
    }
    // The front listener binds the configured address first, so that a busy port is a clear
    // error instead of a log line from a broker thread.
    let front = TcpListener::bind(addr).map_err(|source| EmbeddedError::Bind { addr, source })?;
    front
        .set_nonblocking(true)
        .map_err(|source| EmbeddedError::Bind { addr, source })?;
    let bind = |source| EmbeddedError::Bind { addr, source };
    let (v4_addr, v5_addr) = (
        loopback_port().map_err(bind)?,
        loopback_port().map_err(bind)?,
    );
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
            max_segment_size: 104_857_600,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("v4".to_string(), server(v4_addr, "v4"))])),
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
    while !(up(&v4_addr) && up(&v5_addr)) {
        if Instant::now() >= deadline {
            return Err(EmbeddedError::NotReady(addr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
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
            rt.block_on(front_loop(front, v4_addr, v5_addr));
        })
        .map_err(bind)?;
    tracing::info!("Embedded broker listening on {addr} (MQTT 3.1.1 and 5)");
    started.push(addr);
    Ok(addr)
}

/// Accepts connections on the configured address and passes each to the listener of its
/// protocol.
async fn front_loop(front: TcpListener, v4: SocketAddr, v5: SocketAddr) {
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
                tokio::spawn(pass_on(conn, v4, v5));
            }
            Err(e) => {
                // Out of file descriptors, say: wait instead of spinning.
                tracing::warn!("Embedded broker: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn pass_on(mut conn: tokio::net::TcpStream, v4: SocketAddr, v5: SocketAddr) {
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
    let to = match level {
        Level::V3 => v4,
        Level::V5 => v5,
        _ => return, // not MQTT, or silent: closed
    };
    let Ok(mut upstream) = tokio::net::TcpStream::connect(to).await else {
        return;
    };
    let _ = upstream.set_nodelay(true);
    if upstream.write_all(&head).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
