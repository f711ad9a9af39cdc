//! HTTP, with hyper (and axum's router): the server of `--http` (`/metrics`, `/healthz`,
//! `/readyz`, `/status`), bounded in connections, header time and connection lifetime; and
//! a small GET client (identity tokens, `edgebridge status`) bounded in time and body size.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response as AxumResponse};
use axum::routing::get as route_get;
use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::status::{self, Observed};

/// Most connections served at once; a new one past this closes the oldest (probes always get
/// in: idle and slow connections are the ones that have been there longest).
pub const MAX_CONNECTIONS: usize = 64;
/// Time a client has to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connection is kept.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// The endpoints.
pub fn router(observed: Arc<Observed>) -> Router {
    Router::new()
        .route("/metrics", route_get(metrics))
        .route("/healthz", route_get(healthz))
        .route("/readyz", route_get(readyz))
        .route("/status", route_get(status))
        .with_state(observed)
}

async fn metrics(State(o): State<Arc<Observed>>) -> AxumResponse {
    match crate::metrics::render(o) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n").into_response(),
    }
}

async fn healthz(State(o): State<Arc<Observed>>) -> AxumResponse {
    match status::health(&o) {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")).into_response(),
    }
}

async fn readyz(State(o): State<Arc<Observed>>) -> AxumResponse {
    match status::readiness(&o) {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(not) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready:\n{}\n", not.join("\n")),
        )
            .into_response(),
    }
}

async fn status(State(o): State<Arc<Observed>>) -> AxumResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        status::status_json(&o).to_string(),
    )
        .into_response()
}

/// The connections being served, oldest first; each can be closed from here.
#[derive(Default)]
struct Connections {
    next: u64,
    open: std::collections::VecDeque<(u64, tokio::sync::oneshot::Sender<()>)>,
}

/// Serves `router` on `listener` until `stop` turns true. At [`MAX_CONNECTIONS`], a new
/// connection closes the oldest one (an idle keep-alive or a slow client holds a slot at most
/// until newer ones need it), so a probe is always answered.
pub async fn serve(listener: TcpListener, router: Router, mut stop: watch::Receiver<bool>) {
    let connections = Arc::new(std::sync::Mutex::new(Connections::default()));
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    // Out of file descriptors, say: do not spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let (close, closed) = tokio::sync::oneshot::channel::<()>();
        let id = {
            let mut c = connections.lock().expect("connections lock");
            while c.open.len() >= MAX_CONNECTIONS {
                // Dropping its sender closes the oldest connection.
                c.open.pop_front();
            }
            c.next += 1;
            let id = c.next;
            c.open.push_back((id, close));
            id
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let connections = connections.clone();
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = tokio::time::timeout(CONNECTION_LIFETIME, connection) => {}
                _ = closed => {}
            }
            let mut c = connections.lock().expect("connections lock");
            if let Some(i) = c.open.iter().position(|(x, _)| *x == id) {
                c.open.remove(i);
            }
        });
    }
}

/// An HTTP response.
#[derive(Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: hyper::HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Response {
    /// A header's value, if it is text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Why a GET failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The URL is not `http://host[:port]/path`.
    #[error("{0}")]
    Url(String),
    /// TCP connect failed.
    #[error("cannot connect")]
    Connect(#[source] std::io::Error),
    /// No complete answer within the time limit.
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
    /// The HTTP exchange failed (malformed response, connection closed early).
    #[error("HTTP exchange failed")]
    Http(#[source] hyper::Error),
    /// Reading the body failed.
    #[error("reading the response body failed")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The body was larger than allowed.
    #[error("the answer's body is over {0} bytes")]
    TooLarge(usize),
}

/// One HTTP/1.1 GET (plain `http://`): chunked and `Content-Length` bodies, keep-alive or
/// not, at most `max_body` bytes, everything within `timeout`, redirects not followed.
pub async fn get(
    url: &str,
    headers: &[(&str, String)],
    timeout: Duration,
    max_body: usize,
) -> Result<Response, HttpError> {
    use http_body_util::{BodyExt, Empty, Limited};
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| HttpError::Url(format!("not a URL: {e}")))?;
    if uri.scheme_str() != Some("http") {
        return Err(HttpError::Url(
            "only http:// is supported (identity endpoints are link-local or localhost)".into(),
        ));
    }
    let (Some(host), Some(authority)) = (uri.host(), uri.authority()) else {
        return Err(HttpError::Url("the URL has no host".into()));
    };
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(80);
    let mut request = hyper::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(hyper::header::HOST, authority.as_str());
    for (k, v) in headers {
        request = request.header(*k, v);
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| HttpError::Url(e.to_string()))?;
    let exchange = async {
        let stream = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(HttpError::Connect)?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(HttpError::Http)?;
        // The connection is driven beside the request and ends with this exchange.
        let driver = tokio::spawn(conn);
        let _abort = AbortOnDrop(driver);
        let resp = sender
            .send_request(request)
            .await
            .map_err(HttpError::Http)?;
        let (parts, body) = resp.into_parts();
        let body = match Limited::new(body, max_body).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(HttpError::TooLarge(max_body));
            }
            Err(e) => return Err(HttpError::Body(e)),
        };
        Ok(Response {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| HttpError::Timeout(timeout))?
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The lock-out: 64 idle keep-alive clients and 200 slow ones (half a request
    /// line each) hold connections; every probe is still answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn probes_are_answered_past_idle_keep_alives_and_slow_clients() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let observed = Arc::new(Observed {
            stats: Default::default(),
            plugins: Default::default(),
            stall_timeout: Duration::from_secs(60),
            started: std::time::SystemTime::now(),
        });
        let (_stop_tx, stop) = watch::channel(false);
        tokio::spawn(serve(listener, router(observed), stop));
        let mut held = Vec::new();
        for _ in 0..64 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut buf = [0u8; 256];
            let n = s.read(&mut buf).await.unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
            held.push(s); // idle, kept alive
        }
        for _ in 0..200 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /heal").await.unwrap();
            held.push(s);
        }
        let mut answered = 0;
        for _ in 0..20 {
            let url = format!("http://{addr}/healthz");
            if let Ok(r) = get(&url, &[], Duration::from_secs(2), 1 << 16).await
                && r.status == 200
            {
                answered += 1;
            }
        }
        assert_eq!(answered, 20, "every probe is answered");
    }
}
