//! Byte streams under MQTT: TCP, TLS over TCP with rustls, and WebSocket (`ws://` over TCP,
//! `wss://` over TLS; subprotocol `mqtt`, path `/mqtt` unless the endpoint gives one, e.g.
//! `broker:8080/ws`). Certificates and keys are
//! read at every connect, so files rotated on disk (as Kubernetes does with mounted secrets)
//! are picked up by the next connection without a restart.
//!
//! Any of them may run through an HTTP CONNECT proxy (RFC 9110 §9.3.6): TCP to the proxy,
//! `CONNECT broker:port`, and once the proxy answers 2xx, TLS (verified against the broker's
//! name, never the proxy's) and MQTT or WebSocket inside the tunnel. The exchange is a few
//! lines of HTTP/1.1, written here: the bridge's HTTP client (hyper) has no CONNECT tunnel
//! for a client, and a crate for it would bring a second HTTP stack for one request.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::config::{Auth, BrokerConnection, Endpoint, HttpProxy, ProxyCredentials, Transport};

/// A connected byte stream.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Failures to open a transport, each naming what to fix.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// TCP connect failed.
    #[error("cannot connect to {addr}")]
    Connect {
        /// host:port.
        addr: String,
        /// Cause.
        source: io::Error,
    },
    /// A certificate or key file could not be used.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the configuration (e.g. key does not match certificate).
    #[error("TLS configuration: {0}")]
    Config(String),
    /// The TLS handshake failed (untrusted server, hostname mismatch, expired certificate).
    #[error("TLS handshake with {addr} failed{}", handshake_hint(source))]
    Handshake {
        /// host:port.
        addr: String,
        /// Cause.
        source: io::Error,
    },
    /// A host name that cannot be a TLS server name.
    #[error("\"{0}\" is not a valid TLS server name")]
    ServerName(String),
    /// The proxy setting (from the environment) is unusable.
    #[error("proxy: {0}")]
    ProxySetting(String),
    /// The proxy refused or failed the tunnel.
    #[error(
        "HTTP proxy {proxy} answered {status} to CONNECT {target}{}",
        proxy_hint(status)
    )]
    Proxy {
        /// The proxy's host:port.
        proxy: String,
        /// The broker's host:port.
        target: String,
        /// The status line.
        status: String,
    },
    /// The proxy's answer was not HTTP, too long, or it closed the connection.
    #[error("HTTP proxy {proxy}: {message}")]
    ProxyProtocol {
        /// The proxy's host:port.
        proxy: String,
        /// What was wrong.
        message: String,
    },
    /// The proxy's credentials could not be read.
    #[error("proxy credentials {path}")]
    ProxyCredentials {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// The WebSocket upgrade failed (wrong path, not a WebSocket listener, refused).
    #[error("WebSocket handshake with {url} failed: {message}")]
    WebSocket {
        /// The URL requested.
        url: String,
        /// Cause.
        message: String,
    },
}

/// What a proxy's refusal means, as ` (hint)`.
fn proxy_hint(status: &str) -> &'static str {
    match status.split(' ').next().unwrap_or("") {
        "401" | "407" => {
            " (the proxy wants credentials: set proxy.secretName to a Secret with `username` and `password`, or check them)"
        }
        "403" => " (the proxy does not allow this destination or port: ask for it to be allowed)",
        "500" | "502" | "503" | "504" => {
            " (the proxy cannot reach the broker: check `endpoint` and that the proxy can resolve and reach it)"
        }
        _ => "",
    }
}

/// What to check for the common handshake failures, as ` (hint)` (the cause follows as the
/// error's source).
fn handshake_hint(e: &io::Error) -> &'static str {
    let text = e.to_string();
    if text.contains("NotValidForName") || text.contains("not valid for name") {
        " (the broker's certificate is not issued for this host name: use the name it was issued for in `endpoint`)"
    } else if text.contains("Expired") || text.contains("expired") {
        " (a certificate has expired: renew it)"
    } else if text.contains("UnsupportedCertVersion") {
        " (a certificate of the broker's chain is an X.509 version 1 certificate, which TLS verification does not accept: issue a version 3 certificate)"
    } else if text.contains("invalid peer certificate") {
        " (the broker's certificate is not trusted: `trustedCaCertificateConfigMap` must hold the CA that issued it; without one, the OS trust store is used)"
    } else if text.contains("alert") {
        " (the broker refused the handshake: check the client certificate (x509 secret) and that the broker trusts its issuer)"
    } else {
        ""
    }
}

/// The proxy a connection to `endpoint` goes through, if any.
pub fn proxy_for(
    conn: &BrokerConnection,
    endpoint: &Endpoint,
) -> Result<Option<HttpProxy>, TransportError> {
    conn.reach
        .proxy
        .resolve(&endpoint.host, conn.tls.is_some())
        .map_err(TransportError::ProxySetting)
}

/// Opens the transport described by `conn` to `endpoint` (its `endpoint` or one of its
/// failover addresses).
pub async fn open(
    conn: &BrokerConnection,
    endpoint: &Endpoint,
) -> Result<Box<dyn Stream>, TransportError> {
    let stream = open_tls(conn, endpoint).await?;
    if conn.transport != Transport::WebSocket {
        return Ok(stream);
    }
    let scheme = if conn.tls.is_some() { "wss" } else { "ws" };
    let host = &endpoint.host;
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.clone()
    };
    let path = endpoint.path.as_deref().unwrap_or("/mqtt");
    let url = format!("{scheme}://{host}:{}{path}", endpoint.port);
    let ws_err = |message: String| TransportError::WebSocket {
        url: url.clone(),
        message,
    };
    use async_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| ws_err(e.to_string()))?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        async_tungstenite::tungstenite::http::HeaderValue::from_static("mqtt"),
    );
    let (ws, _response) = async_tungstenite::tokio::client_async(request, stream)
        .await
        .map_err(|e| ws_err(e.to_string()))?;
    Ok(Box::new(ws_stream_tungstenite::WsStream::new(ws)))
}

/// TCP (directly or through the proxy), then TLS when enabled.
async fn open_tls(
    conn: &BrokerConnection,
    endpoint: &Endpoint,
) -> Result<Box<dyn Stream>, TransportError> {
    let host = endpoint.host.as_str();
    let addr = endpoint.to_string().replace("embedded://", "");
    let tcp = open_tcp(conn, endpoint).await?;
    let Some(tls) = &conn.tls else {
        return Ok(Box::new(tcp));
    };
    let config = client_config(tls.trusted_ca_dir.as_deref(), &conn.auth)?;
    let name = ServerName::try_from(host.to_string())
        .map_err(|_| TransportError::ServerName(host.to_string()))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|source| TransportError::Handshake { addr, source })?;
    Ok(Box::new(stream))
}

/// A TCP connection to `endpoint`: direct, or a tunnel through the proxy.
pub async fn open_tcp(
    conn: &BrokerConnection,
    endpoint: &Endpoint,
) -> Result<TcpStream, TransportError> {
    let proxy = proxy_for(conn, endpoint)?;
    let (host, port) = match &proxy {
        Some(p) => (p.host.as_str(), p.port),
        None => (endpoint.host.as_str(), endpoint.port),
    };
    let mut tcp =
        TcpStream::connect((host, port))
            .await
            .map_err(|source| TransportError::Connect {
                addr: match &proxy {
                    Some(p) => format!("{} (the HTTP proxy)", p.address()),
                    None => endpoint.to_string(),
                },
                source,
            })?;
    let _ = tcp.set_nodelay(true);
    if let Some(p) = &proxy {
        tunnel(&mut tcp, p, endpoint).await?;
    }
    Ok(tcp)
}

/// Largest proxy answer head read, bytes.
const MAX_PROXY_HEAD: usize = 16 * 1024;

/// Asks the proxy for a tunnel to `endpoint` and reads its answer head (the caller's time
/// limit bounds it). Succeeds on 2xx with nothing after the head (a broker never speaks
/// first).
async fn tunnel(
    tcp: &mut TcpStream,
    p: &HttpProxy,
    endpoint: &Endpoint,
) -> Result<(), TransportError> {
    use base64::Engine;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let proxy = p.address();
    let target = endpoint.to_string();
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    match &p.credentials {
        None => {}
        Some(c) => {
            let (user, password) = match c {
                ProxyCredentials::Inline { user, password } => {
                    (user.clone(), password.expose().to_string())
                }
                ProxyCredentials::Secret(dir) => {
                    let read = |name: &str| {
                        let path = dir.join(name);
                        crate::secret::read_file(&path)
                            .map_err(|source| TransportError::ProxyCredentials { path, source })
                    };
                    (read("username")?, read("password").unwrap_or_default())
                }
            };
            let basic =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            request.push_str(&format!("Proxy-Authorization: Basic {basic}\r\n"));
        }
    }
    request.push_str("\r\n");
    let io_err = |e: io::Error| TransportError::ProxyProtocol {
        proxy: proxy.clone(),
        message: format!("{e}"),
    };
    tcp.write_all(request.as_bytes()).await.map_err(io_err)?;
    let mut head = Vec::with_capacity(512);
    let mut byte = [0u8; 512];
    let end = loop {
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if head.len() > MAX_PROXY_HEAD {
            return Err(TransportError::ProxyProtocol {
                proxy,
                message: format!("its answer head is longer than {MAX_PROXY_HEAD} bytes"),
            });
        }
        let n = tcp.read(&mut byte).await.map_err(io_err)?;
        if n == 0 {
            return Err(TransportError::ProxyProtocol {
                proxy,
                message: "it closed the connection without answering CONNECT".into(),
            });
        }
        head.extend_from_slice(&byte[..n]);
    };
    let text = String::from_utf8_lossy(&head[..end]);
    let status_line = text.lines().next().unwrap_or("").trim().to_string();
    let mut parts = status_line.splitn(3, ' ');
    let (version, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err(TransportError::ProxyProtocol {
            proxy,
            message: format!("its answer is not HTTP: {status_line:?}"),
        });
    }
    if !code.starts_with('2') {
        return Err(TransportError::Proxy {
            proxy,
            target,
            status: status_line
                .split_once(' ')
                .map(|(_, s)| s.to_string())
                .unwrap_or_default(),
        });
    }
    if head.len() > end {
        return Err(TransportError::ProxyProtocol {
            proxy,
            message: "it sent data in the tunnel before the broker could have".into(),
        });
    }
    Ok(())
}

fn file_err(path: &Path, message: impl Into<String>) -> TransportError {
    TransportError::File {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, format!("cannot read certificates: {e}")))?
        .collect();
    let certs = certs.map_err(|e| file_err(path, format!("invalid PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(file_err(path, "holds no PEM certificate"));
    }
    Ok(certs)
}

/// Builds the rustls client configuration: trusted roots from the ConfigMap folder (or the
/// OS store when none is given) and, for X.509 authentication, the client certificate chain.
pub fn client_config(ca_dir: Option<&Path>, auth: &Auth) -> Result<ClientConfig, TransportError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_dir {
        Some(dir) => {
            let files = crate::config::parse::ca_files(dir)
                .map_err(|e| file_err(dir, format!("cannot read CA folder: {e}")))?;
            if files.is_empty() {
                return Err(file_err(dir, "holds no *.crt or *.pem file"));
            }
            for f in files {
                for cert in read_certs(&f)? {
                    roots
                        .add(cert)
                        .map_err(|e| file_err(&f, format!("unusable CA certificate: {e}")))?;
                }
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(TransportError::Config(
                    "no trusted CA: the OS certificate store is empty and no trustedCaCertificateConfigMap is set".into(),
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TransportError::Config(e.to_string()))?
        .with_root_certificates(roots);
    match auth {
        Auth::X509 {
            cert,
            key,
            intermediates,
        } => {
            let mut chain = read_certs(cert)?;
            if let Some(i) = intermediates {
                chain.extend(read_certs(i)?);
            }
            let key_der = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| file_err(key, format!("cannot read private key: {e}")))?;
            builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                TransportError::Config(format!(
                    "client certificate {} and key {}: {e}",
                    cert.display(),
                    key.display()
                ))
            })
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}
