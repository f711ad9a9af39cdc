//! Byte streams under MQTT: TCP, TLS over TCP with rustls, and WebSocket (`ws://` over TCP,
//! `wss://` over TLS; subprotocol `mqtt`, path `/mqtt` unless the endpoint gives one, e.g.
//! `broker:8080/ws`). Certificates and keys are
//! read at every connect, so files rotated on disk (as Kubernetes does with mounted secrets)
//! are picked up by the next connection without a restart.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::config::{Auth, BrokerConnection, Transport};

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
    /// The WebSocket upgrade failed (wrong path, not a WebSocket listener, refused).
    #[error("WebSocket handshake with {url} failed: {message}")]
    WebSocket {
        /// The URL requested.
        url: String,
        /// Cause.
        message: String,
    },
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

/// Opens the transport described by `conn`.
pub async fn open(conn: &BrokerConnection) -> Result<Box<dyn Stream>, TransportError> {
    let stream = open_tls(conn).await?;
    if conn.transport != Transport::WebSocket {
        return Ok(stream);
    }
    let scheme = if conn.tls.is_some() { "wss" } else { "ws" };
    let host = &conn.endpoint.host;
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.clone()
    };
    let path = conn.endpoint.path.as_deref().unwrap_or("/mqtt");
    let url = format!("{scheme}://{host}:{}{path}", conn.endpoint.port);
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

/// TCP, then TLS when enabled.
async fn open_tls(conn: &BrokerConnection) -> Result<Box<dyn Stream>, TransportError> {
    let host = conn.endpoint.host.as_str();
    let addr = conn.endpoint.to_string().replace("embedded://", "");
    let tcp = TcpStream::connect((host, conn.endpoint.port))
        .await
        .map_err(|source| TransportError::Connect {
            addr: addr.clone(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
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
