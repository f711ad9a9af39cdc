//! A small HTTP/1.1 GET client with hyper (identity tokens, `edgebridge status`), bounded in
//! time and body size. Apart from the server ([`crate::http`]): MQTT sessions fetch tokens
//! through it and know nothing of the server.

use std::time::Duration;

use bytes::Bytes;

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
