//! The HTTP server of `--http` (`/metrics`, `/healthz`, `/readyz`, `/status`), with hyper and
//! axum's router, bounded in connections, header time and connection lifetime. (The GET
//! client is [`crate::http_client`].)

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response as AxumResponse};
use axum::routing::get as route_get;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http_client::get;
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
