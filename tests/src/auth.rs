//! Test peers for token authentication: an identity endpoint issuing real HS256-signed JWTs
//! (IMDS and Azure Arc challenge modes), and an MQTT 5 proxy in front of Mosquitto that checks
//! the CONNECT authentication method and token (Mosquitto cannot), rejects bad or expired
//! tokens, disconnects a client when its token expires, and forwards everything else. With
//! [`AuthProxy::start_reauth`] it is also the broker side of MQTT 5 re-authentication
//! (§4.12.1, written from the specification: no broker in the registries re-authenticates
//! JWTs): its CONNACK grants the authentication method, and an AUTH 0x19 with a valid token
//! is answered AUTH 0x00 and moves the connection's expiry; a bad one is answered DISCONNECT
//! 0x87.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::BytesMut;
use hmac::{Hmac, Mac};
use rumqttc::v5::mqttbytes::v5::{ConnAck, ConnAckProperties, ConnectReturnCode, Packet};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const KEY: &[u8] = b"edgebridge-test-signing-key";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A signed JWT for `audience` expiring `lifetime` from now.
pub fn jwt(audience: &str, lifetime: Duration, serial: u64) -> String {
    jwt_padded(audience, lifetime, serial, 0)
}

/// [`jwt`] with `padding` more bytes of claims (real tokens carry many claims: a token
/// response of several KiB is what Go's net/http sends chunked).
pub fn jwt_padded(audience: &str, lifetime: Duration, serial: u64, padding: usize) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let exp = now() + lifetime.as_secs();
    let claims = URL_SAFE_NO_PAD.encode(
        serde_json::json!({"aud": audience, "exp": exp, "iat": now(), "jti": serial, "xms": "x".repeat(padding)}).to_string(),
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(KEY).unwrap();
    mac.update(format!("{header}.{claims}").as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{header}.{claims}.{sig}")
}

/// Checks signature, audience and expiry; returns the expiry (Unix seconds).
pub fn verify(token: &str, audience: &str) -> Result<u64, String> {
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return Err("not a JWT".into());
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(KEY).unwrap();
    mac.update(format!("{}.{}", parts[0], parts[1]).as_bytes());
    let sig = URL_SAFE_NO_PAD
        .decode(parts[2])
        .map_err(|_| "bad signature encoding")?;
    mac.verify_slice(&sig).map_err(|_| "bad signature")?;
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).map_err(|_| "bad claims")?)
            .map_err(|_| "claims are not JSON")?;
    if claims["aud"] != audience {
        return Err(format!("audience {} is not {audience}", claims["aud"]));
    }
    let exp = claims["exp"].as_u64().ok_or("no exp")?;
    if exp <= now() {
        return Err("token expired".into());
    }
    Ok(exp)
}

/// How the identity endpoint behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityMode {
    /// Azure IMDS: answer with a token.
    Imds,
    /// Azure Arc: challenge with this key file, then require `Authorization: Basic <its content>`.
    Arc(PathBuf),
    /// Answer 200 with a body that is not a token.
    Garbage,
}

/// How the identity endpoint sends a 200 answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// `Content-Length`, then `Connection: close`.
    ContentLength,
    /// `Transfer-Encoding: chunked` in 1,000-byte chunks with a 3 KiB-padded token, on a
    /// kept-alive connection, as Go's net/http sends bodies over its 2 KB buffer.
    Chunked,
    /// A chunked body of 1 MiB (more than any token response).
    Oversized,
    /// Headers at once, then the body after this delay.
    Slow(Duration),
    /// `307` to another URL.
    Redirect,
}

/// A local identity endpoint.
pub struct IdentityServer {
    /// `http://127.0.0.1:port/metadata/identity/oauth2/token`.
    pub url: String,
    issued: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl IdentityServer {
    /// Starts one issuing tokens valid for `lifetime`.
    pub async fn start(mode: IdentityMode, lifetime: Duration) -> IdentityServer {
        IdentityServer::start_with(mode, lifetime, Answer::ContentLength).await
    }

    /// Starts one issuing tokens valid for `lifetime`, answering as `answer` says.
    pub async fn start_with(
        mode: IdentityMode,
        lifetime: Duration,
        answer: Answer,
    ) -> IdentityServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/metadata/identity/oauth2/token",
            listener.local_addr().unwrap()
        );
        let issued = Arc::new(Mutex::new(Vec::new()));
        let store = issued.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let (mode, store) = (mode.clone(), store.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    let mut n = 0;
                    while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut buf[n..]).await {
                            Ok(0) | Err(_) => break,
                            Ok(m) => n += m,
                        }
                    }
                    let req = String::from_utf8_lossy(&buf[..n]).to_string();
                    let resource = req
                        .split("resource=")
                        .nth(1)
                        .and_then(|r| r.split([' ', '&']).next())
                        .unwrap_or("")
                        .replace("%3A", ":")
                        .replace("%2F", "/");
                    let padding = if answer == Answer::Chunked { 3000 } else { 0 };
                    let issue = |resource: &str| {
                        let t = jwt_padded(
                            resource,
                            lifetime,
                            store.lock().unwrap().len() as u64,
                            padding,
                        );
                        store.lock().unwrap().push(t.clone());
                        token_body(&t, lifetime)
                    };
                    let (status, headers, body) =
                        if !req.to_ascii_lowercase().contains("metadata: true") {
                            (400, String::new(), "missing Metadata header".to_string())
                        } else {
                            match &mode {
                                IdentityMode::Garbage => {
                                    (200, String::new(), "<html>oops</html>".to_string())
                                }
                                IdentityMode::Arc(key) => {
                                    let expected = format!(
                                        "Authorization: Basic {}",
                                        std::fs::read_to_string(key).unwrap_or_default().trim()
                                    );
                                    if req
                                        .to_ascii_lowercase()
                                        .contains(&expected.to_ascii_lowercase())
                                    {
                                        (200, String::new(), issue(&resource))
                                    } else {
                                        (
                                            401,
                                            format!(
                                                "WWW-Authenticate: Basic realm={}\r\n",
                                                key.display()
                                            ),
                                            String::new(),
                                        )
                                    }
                                }
                                IdentityMode::Imds => (200, String::new(), issue(&resource)),
                            }
                        };
                    let head = |extra: &str| {
                        format!(
                            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n{headers}{extra}\r\n"
                        )
                    };
                    match answer {
                        _ if status != 200 => {
                            let h = head(&format!(
                                "Content-Length: {}\r\nConnection: close\r\n",
                                body.len()
                            ));
                            let _ = sock.write_all(format!("{h}{body}").as_bytes()).await;
                        }
                        Answer::ContentLength => {
                            let h = head(&format!(
                                "Content-Length: {}\r\nConnection: close\r\n",
                                body.len()
                            ));
                            let _ = sock.write_all(format!("{h}{body}").as_bytes()).await;
                        }
                        Answer::Chunked | Answer::Oversized => {
                            let body = if answer == Answer::Oversized {
                                "x".repeat(1 << 20)
                            } else {
                                body
                            };
                            let mut out = head("Transfer-Encoding: chunked\r\n");
                            for chunk in body.as_bytes().chunks(1000) {
                                out.push_str(&format!(
                                    "{:x}\r\n{}\r\n",
                                    chunk.len(),
                                    String::from_utf8_lossy(chunk)
                                ));
                            }
                            out.push_str("0\r\n\r\n");
                            let _ = sock.write_all(out.as_bytes()).await;
                            // Keep-alive: the connection stays open; the client must not wait for
                            // its end to have the whole body.
                            tokio::time::sleep(Duration::from_secs(30)).await;
                        }
                        Answer::Slow(delay) => {
                            let h = head(&format!(
                                "Content-Length: {}\r\nConnection: close\r\n",
                                body.len()
                            ));
                            let _ = sock.write_all(h.as_bytes()).await;
                            tokio::time::sleep(delay).await;
                            let _ = sock.write_all(body.as_bytes()).await;
                        }
                        Answer::Redirect => {
                            let _ = sock
                            .write_all(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://169.254.169.254/elsewhere\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                            .await;
                        }
                    }
                    let _ = sock.shutdown().await;
                });
            }
        });
        IdentityServer { url, issued, task }
    }

    /// Tokens issued so far.
    pub fn issued(&self) -> usize {
        self.issued.lock().unwrap().len()
    }

    /// The tokens issued so far.
    pub fn tokens(&self) -> Vec<String> {
        self.issued.lock().unwrap().clone()
    }
}

fn token_body(token: &str, lifetime: Duration) -> String {
    serde_json::json!({
        "access_token": token,
        "expires_on": (now() + lifetime.as_secs()).to_string(),
        "resource": "https://eventgrid.azure.net",
        "token_type": "Bearer",
    })
    .to_string()
}

impl Drop for IdentityServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the checking proxy accepts.
#[derive(Clone)]
pub enum Check {
    /// `OAUTH2-JWT` with a valid JWT for this audience.
    Jwt(String),
    /// `K8S-SAT` equal to the current content of this file.
    SatFile(PathBuf),
}

/// One CONNECT the proxy saw.
#[derive(Debug, Clone)]
pub struct SeenConnect {
    /// Client ID.
    pub client_id: String,
    /// The token presented.
    pub token: String,
    /// Accepted or the reason it was not.
    pub verdict: Result<(), String>,
}

/// One AUTH (re-authentication) the proxy saw.
#[derive(Debug, Clone)]
pub struct SeenAuth {
    /// Client ID of the connection.
    pub client_id: String,
    /// The token presented.
    pub token: String,
    /// Accepted or the reason it was not.
    pub verdict: Result<(), String>,
}

/// An MQTT 5 proxy that checks CONNECT authentication, then forwards to `upstream`.
pub struct AuthProxy {
    /// Port to connect to.
    pub port: u16,
    seen: Arc<Mutex<Vec<SeenConnect>>>,
    auths: Arc<Mutex<Vec<SeenAuth>>>,
    kick: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl AuthProxy {
    /// Starts a proxy to the Mosquitto on `upstream` that knows no re-authentication (its
    /// CONNACK grants no method, as most brokers).
    pub async fn start(upstream: u16, check: Check) -> AuthProxy {
        AuthProxy::start_with(upstream, check, false).await
    }

    /// Starts a proxy that grants the method in CONNACK and answers AUTH re-authentication.
    pub async fn start_reauth(upstream: u16, check: Check) -> AuthProxy {
        AuthProxy::start_with(upstream, check, true).await
    }

    async fn start_with(upstream: u16, check: Check, reauth: bool) -> AuthProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let auths = Arc::new(Mutex::new(Vec::new()));
        let (kick, kick_rx) = tokio::sync::watch::channel(0u64);
        let (store, auth_store) = (seen.clone(), auths.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let (check, store, mut kick_rx) = (check.clone(), store.clone(), kick_rx.clone());
                let auths = reauth.then(|| auth_store.clone());
                tokio::spawn(async move {
                    let _ = serve_one(client, upstream, check, store, auths, &mut kick_rx).await;
                });
            }
        });
        AuthProxy {
            port,
            seen,
            auths,
            kick,
            task,
        }
    }

    /// Every AUTH re-authentication so far.
    pub fn auths(&self) -> Vec<SeenAuth> {
        self.auths.lock().unwrap().clone()
    }

    /// Every CONNECT so far.
    pub fn seen(&self) -> Vec<SeenConnect> {
        self.seen.lock().unwrap().clone()
    }

    /// Drops every open connection (as a broker does when a credential is revoked).
    pub fn kick_all(&self) {
        self.kick.send_modify(|n| *n += 1);
    }
}

impl Drop for AuthProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_one(
    mut client: tokio::net::TcpStream,
    upstream: u16,
    check: Check,
    seen: Arc<Mutex<Vec<SeenConnect>>>,
    auths: Option<Arc<Mutex<Vec<SeenAuth>>>>,
    kick: &mut tokio::sync::watch::Receiver<u64>,
) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    let packet = loop {
        match Packet::read(&mut buf, None) {
            Ok(p) => break p,
            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {
                if client.read_buf(&mut buf).await? == 0 {
                    return Ok(());
                }
            }
            Err(_) => return Ok(()),
        }
    };
    let Packet::Connect(mut connect, will, login) = packet else {
        return Ok(());
    };
    let props = connect.properties.clone().unwrap_or_default();
    let token = props
        .authentication_data
        .as_ref()
        .map(|d| String::from_utf8_lossy(d).to_string())
        .unwrap_or_default();
    let method = props.authentication_method.clone().unwrap_or_default();
    let (verdict, expires) = match &check {
        Check::Jwt(aud) if method == "OAUTH2-JWT" => match verify(&token, aud) {
            Ok(exp) => (Ok(()), Some(exp)),
            Err(e) => (Err(e), None),
        },
        Check::SatFile(path) if method == "K8S-SAT" => {
            let current = std::fs::read_to_string(path).unwrap_or_default();
            if current.trim() == token {
                (Ok(()), None)
            } else {
                (Err("not the current service-account token".into()), None)
            }
        }
        _ => (
            Err(format!(
                "authentication method \"{method}\" is not accepted"
            )),
            None,
        ),
    };
    seen.lock().unwrap().push(SeenConnect {
        client_id: connect.client_id.clone(),
        token: token.clone(),
        verdict: verdict.clone(),
    });
    if verdict.is_err() {
        let mut out = BytesMut::new();
        let code = if method.is_empty() {
            ConnectReturnCode::BadAuthenticationMethod
        } else {
            ConnectReturnCode::NotAuthorized
        };
        Packet::ConnAck(ConnAck {
            session_present: false,
            code,
            properties: None,
        })
        .write(&mut out, None)
        .ok();
        client.write_all(&out).await?;
        return Ok(());
    }
    // Mosquitto knows no enhanced authentication: forward the CONNECT without it.
    let mut p = props;
    p.authentication_method = None;
    p.authentication_data = None;
    connect.properties = Some(p);
    let client_id = connect.client_id.clone();
    let mut out = BytesMut::new();
    Packet::Connect(connect, will, login)
        .write(&mut out, None)
        .ok();
    out.extend_from_slice(&buf);
    let mut server = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await?;
    server.write_all(&out).await?;
    kick.borrow_and_update();
    if let Some(auths) = auths {
        let session = Reauth {
            client_id,
            method,
            check,
            expires: expires.unwrap_or(now() + 86_400),
            auths,
        };
        return relay_reauth(client, server, session, kick).await;
    }
    let until_expiry = expires
        .map(|e| Duration::from_secs(e.saturating_sub(now())))
        .unwrap_or(Duration::from_secs(86_400));
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        // Like Event Grid: the connection ends when its token expires.
        _ = tokio::time::sleep(until_expiry) => {}
        _ = kick.changed() => {}
    }
    Ok(())
}

/// The re-authenticating side of one connection.
struct Reauth {
    client_id: String,
    method: String,
    check: Check,
    /// Unix seconds at which the connection's token expires.
    expires: u64,
    auths: Arc<Mutex<Vec<SeenAuth>>>,
}

/// The length of the whole packet at the front of `buf`, once it is all there.
fn frame_len(buf: &[u8]) -> Option<usize> {
    let mut len = 0usize;
    for i in 0..4 {
        let b = *buf.get(1 + i)?;
        len |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            let total = 2 + i + len;
            return (buf.len() >= total).then_some(total);
        }
    }
    None
}

/// The reason code and the Authentication Method and Data of an AUTH packet (§3.15).
fn parse_auth(frame: &[u8]) -> Option<(u8, String, String)> {
    let mut i = 1;
    while frame.get(i)? & 0x80 != 0 {
        i += 1;
    }
    i += 1;
    let reason = *frame.get(i)?;
    i += 1;
    let mut plen = 0usize;
    let mut shift = 0;
    loop {
        let b = *frame.get(i)?;
        i += 1;
        plen |= ((b & 0x7f) as usize) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            break;
        }
    }
    let end = i + plen;
    let (mut method, mut data) = (String::new(), String::new());
    while i < end {
        let id = frame[i];
        let n = u16::from_be_bytes([*frame.get(i + 1)?, *frame.get(i + 2)?]) as usize;
        let v = String::from_utf8_lossy(frame.get(i + 3..i + 3 + n)?).to_string();
        match id {
            0x15 => method = v,
            0x16 => data = v,
            _ => return None,
        }
        i += 3 + n;
    }
    Some((reason, method, data))
}

/// AUTH with reason 0x00 (success) and the method, as the server sends it.
fn auth_success(method: &str) -> Vec<u8> {
    let props = 3 + method.len();
    let mut out = vec![0xF0, (2 + props) as u8, 0x00, props as u8, 0x15];
    out.extend_from_slice(&(method.len() as u16).to_be_bytes());
    out.extend_from_slice(method.as_bytes());
    out
}

/// Relays packet by packet: CONNACK gets the authentication method, AUTH from the client is
/// checked and answered here (Mosquitto never sees it), and the connection ends when its
/// token expires (as Event Grid ends it), unless a re-authentication moved the expiry.
async fn relay_reauth(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    mut r: Reauth,
    kick: &mut tokio::sync::watch::Receiver<u64>,
) -> std::io::Result<()> {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let (inject, mut injected) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let (expiry_tx, mut expiry) = tokio::sync::watch::channel(r.expires);
    let method = r.method.clone();
    // Server to client: whole packets, with injected AUTH / DISCONNECT between them.
    let down = async move {
        let mut buf = BytesMut::new();
        let mut first = true;
        loop {
            tokio::select! {
                Some(bytes) = injected.recv() => {
                    let last = bytes[0] == 0xE0;
                    cw.write_all(&bytes).await?;
                    if last {
                        return Ok::<_, std::io::Error>(());
                    }
                }
                n = sr.read_buf(&mut buf) => {
                    if n? == 0 {
                        return Ok(());
                    }
                    while let Some(len) = frame_len(&buf) {
                        let mut frame = buf.split_to(len);
                        if std::mem::take(&mut first)
                            && let Ok(Packet::ConnAck(mut ack)) = Packet::read(&mut frame.clone(), None)
                        {
                            let mut props = ack.properties.unwrap_or(ConnAckProperties {
                                session_expiry_interval: None,
                                receive_max: None,
                                max_qos: None,
                                retain_available: None,
                                max_packet_size: None,
                                assigned_client_identifier: None,
                                topic_alias_max: None,
                                reason_string: None,
                                user_properties: Vec::new(),
                                wildcard_subscription_available: None,
                                subscription_identifiers_available: None,
                                shared_subscription_available: None,
                                server_keep_alive: None,
                                response_information: None,
                                server_reference: None,
                                authentication_method: None,
                                authentication_data: None,
                            });
                            props.authentication_method = Some(method.clone());
                            ack.properties = Some(props);
                            frame.clear();
                            Packet::ConnAck(ack).write(&mut frame, None).ok();
                        }
                        cw.write_all(&frame).await?;
                    }
                }
            }
        }
    };
    // Client to server: AUTH is ours.
    let up = async move {
        let mut buf = BytesMut::new();
        loop {
            if cr.read_buf(&mut buf).await? == 0 {
                return Ok::<_, std::io::Error>(());
            }
            while let Some(len) = frame_len(&buf) {
                let frame = buf.split_to(len);
                if frame[0] != 0xF0 {
                    sw.write_all(&frame).await?;
                    continue;
                }
                let verdict = match parse_auth(&frame) {
                    None => Err("malformed AUTH".to_string()),
                    Some((0x19, m, token)) if m == r.method => match &r.check {
                        Check::Jwt(aud) => verify(&token, aud).map(|exp| {
                            r.expires = exp;
                            let _ = expiry_tx.send(exp);
                        }),
                        Check::SatFile(path) => {
                            let current = std::fs::read_to_string(path).unwrap_or_default();
                            (current.trim() == token)
                                .then_some(())
                                .ok_or_else(|| "not the current service-account token".into())
                        }
                    }
                    .map(|_| token.clone()),
                    Some((reason, m, _)) => Err(format!("AUTH reason {reason:#04x} method {m}")),
                };
                r.auths.lock().unwrap().push(SeenAuth {
                    client_id: r.client_id.clone(),
                    token: verdict.clone().unwrap_or_default(),
                    verdict: verdict.clone().map(|_| ()),
                });
                match verdict {
                    Ok(_) => {
                        let _ = inject.send(auth_success(&r.method));
                    }
                    Err(_) => {
                        // §4.12.1: a failed re-authentication ends the connection.
                        let _ = inject.send(vec![0xE0, 2, 0x87, 0]);
                        return Ok(());
                    }
                }
            }
        }
    };
    let expire = async move {
        loop {
            let at = *expiry.borrow_and_update();
            let wait = Duration::from_secs(at.saturating_sub(now()));
            tokio::select! {
                _ = tokio::time::sleep(wait) => return,
                changed = expiry.changed() => if changed.is_err() { std::future::pending::<()>().await },
            }
        }
    };
    tokio::select! {
        _ = down => {}
        _ = up => {
            // Let an injected DISCONNECT reach the client.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        _ = expire => {}
        _ = kick.changed() => {}
    }
    Ok(())
}
