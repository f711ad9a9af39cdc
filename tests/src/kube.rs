//! A stand-in for the Kubernetes API server, for the resources the bridge watches: it speaks
//! the API's wire protocol for custom resources (no Kubernetes API server can run on these
//! machines), as `kubectl` and kube-rs meet it:
//! - `GET /apis/{group}/{version}/namespaces/{ns}/{plural}`: a list with
//!   `metadata.resourceVersion`;
//! - the same with `watch=true&resourceVersion=N`: newline-delimited JSON watch events
//!   (`ADDED`, `MODIFIED`, `DELETED`) after N, `BOOKMARK`s every second, ending after
//!   `timeoutSeconds`; a resource version older than the compaction point is answered with an
//!   `ERROR` event of status 410 Gone (the client must list again);
//! - `PATCH .../{plural}/{name}/status` with `application/merge-patch+json`: a JSON merge
//!   patch of the status subresource (another content type is 415);
//! - objects get `resourceVersion`, `uid`, `creationTimestamp`, and a `generation` that moves
//!   when the spec changes.
//!
//! It can be stopped and started again on the same port with the same objects (an API server
//! restart: every watch connection drops), and can expire every watch (410, as after etcd
//! compaction). It is not Kubernetes: no discovery, no admission, no validation.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::{Request, Response};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::broadcast;

/// One change, as a watch event line, for one collection.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    collection: String,
    line: String,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// Objects by collection path, then name.
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    /// Every change, for watches that start from an older resource version.
    log: Vec<Change>,
    /// Watches from a resource version below this get 410 Gone.
    compacted: u64,
    /// Requests seen: (method, path and query, content type).
    requests: Vec<(String, String, String)>,
}

/// The stand-in server (see the module docs). Stopped on drop.
pub struct StandIn {
    /// Its port on 127.0.0.1.
    pub port: u16,
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<Change>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// The collection path of `kind` in `namespace` for `api_version` (`group/version`).
pub fn collection(api_version: &str, plural: &str, namespace: &str) -> String {
    format!("/apis/{api_version}/namespaces/{namespace}/{plural}")
}

fn plural(kind: &str) -> String {
    format!("{}s", kind.to_ascii_lowercase())
}

impl StandIn {
    /// Starts one on an ephemeral port.
    pub async fn start() -> StandIn {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (events, _) = broadcast::channel(1024);
        let mut s = StandIn {
            port,
            state: Arc::new(Mutex::new(State {
                rv: 100,
                ..State::default()
            })),
            events,
            task: None,
        };
        s.serve(listener);
        s
    }

    fn serve(&mut self, listener: TcpListener) {
        let (state, events) = (self.state.clone(), self.events.clone());
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let (state, events) = (state.clone(), events.clone());
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        handle(req, state.clone(), events.clone())
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                        .await;
                });
            }
        }));
    }

    /// Stops serving: every connection (and watch) drops, as when the API server restarts.
    pub fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// Serves again on the same port, with the same objects.
    pub async fn restart(&mut self) {
        self.stop();
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        self.serve(listener);
    }

    /// Every watch ends with 410 Gone and older resource versions are refused from now on
    /// (as after etcd compaction): clients must list again.
    pub fn expire_watches(&self) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        st.compacted = st.rv;
        let _ = self.events.send(Change {
            rv: st.rv,
            collection: "*".into(),
            line: gone(),
        });
    }

    /// `kubectl apply` of one object (JSON with apiVersion, kind, metadata.name and
    /// .namespace, spec): created or replaced (its status kept).
    pub fn apply(&self, object: Value) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let api_version = object["apiVersion"].as_str().unwrap().to_string();
        let kind = object["kind"].as_str().unwrap().to_string();
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let name = object["metadata"]["name"].as_str().unwrap().to_string();
        let path = collection(&api_version, &plural(&kind), &ns);
        let old = st.objects.get(&path).and_then(|m| m.get(&name)).cloned();
        let mut obj = object.clone();
        let generation = match &old {
            Some(o) if o["spec"] == object["spec"] => {
                o["metadata"]["generation"].as_i64().unwrap_or(1)
            }
            Some(o) => o["metadata"]["generation"].as_i64().unwrap_or(1) + 1,
            None => 1,
        };
        obj["metadata"]["namespace"] = json!(ns);
        obj["metadata"]["generation"] = json!(generation);
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        obj["metadata"]["uid"] = json!(format!("uid-{name}"));
        obj["metadata"]["creationTimestamp"] = json!("2026-12-05T00:00:00Z");
        if let Some(status) = old.as_ref().and_then(|o| o.get("status")) {
            obj["status"] = status.clone();
        }
        let kind_of_event = if old.is_some() { "MODIFIED" } else { "ADDED" };
        st.objects
            .entry(path.clone())
            .or_default()
            .insert(name, obj.clone());
        let change = Change {
            rv,
            collection: path,
            line: json!({"type": kind_of_event, "object": obj}).to_string(),
        };
        st.log.push(change.clone());
        let _ = self.events.send(change);
    }

    /// `kubectl delete`.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let path = collection(api_version, &plural(kind), namespace);
        if let Some(mut obj) = st.objects.get_mut(&path).and_then(|m| m.remove(name)) {
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            let change = Change {
                rv,
                collection: path,
                line: json!({"type": "DELETED", "object": obj}).to_string(),
            };
            st.log.push(change.clone());
            let _ = self.events.send(change);
        }
    }

    /// The object as stored (with its status).
    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let st = self.state.lock().unwrap();
        st.objects
            .get(&collection(api_version, &plural(kind), namespace))
            .and_then(|m| m.get(name))
            .cloned()
    }

    /// Requests seen so far: (method, path with query, content type).
    pub fn requests(&self) -> Vec<(String, String, String)> {
        self.state.lock().unwrap().requests.clone()
    }

    /// A kubeconfig for it (namespace `namespace`, a bearer token).
    pub fn kubeconfig(&self, namespace: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: http://127.0.0.1:{}\nusers:\n- name: bridge\n  user:\n    token: stand-in-token\ncontexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: bridge\n    namespace: {namespace}\ncurrent-context: stand-in\n",
            self.port
        )
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop();
    }
}

fn gone() -> String {
    json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "too old resource version", "reason": "Expired", "code": 410}})
    .to_string()
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: u16, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap()
}

fn status_error(code: u16, reason: &str, message: &str) -> Response<Body> {
    full(
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code}),
    )
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn query(q: &str, key: &str) -> Option<String> {
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_string())
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<Change>,
) -> Result<Response<Body>, Infallible> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let q = req.uri().query().unwrap_or("").to_string();
    let ctype = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    state
        .lock()
        .unwrap()
        .requests
        .push((method.clone(), format!("{path}?{q}"), ctype.clone()));
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // apis/{g}/{v}/namespaces/{ns}/{plural}[/{name}[/status]]
    if parts.len() < 6 || parts[0] != "apis" || parts[3] != "namespaces" {
        return Ok(status_error(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ));
    }
    let coll = format!("/{}", parts[..6].join("/"));
    match (method.as_str(), parts.len()) {
        ("GET", 6)
            if query(&q, "watch").as_deref() == Some("true")
                || query(&q, "watch").as_deref() == Some("1") =>
        {
            let from: u64 = query(&q, "resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let timeout: u64 = query(&q, "timeoutSeconds")
                .and_then(|v| v.parse().ok())
                .unwrap_or(290);
            let (backlog, expired, mut rx, rv) = {
                let st = state.lock().unwrap();
                let rx = events.subscribe();
                let expired = from != 0 && from < st.compacted;
                let backlog: Vec<String> = st
                    .log
                    .iter()
                    .filter(|c| c.rv > from && c.collection == coll)
                    .map(|c| c.line.clone())
                    .collect();
                (backlog, expired, rx, st.rv)
            };
            let api_version = format!("{}/{}", parts[1], parts[2]);
            let (tx, body_rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
            tokio::spawn(async move {
                let send = |line: String| {
                    let tx = tx.clone();
                    async move {
                        tx.send(Ok(Frame::data(Bytes::from(line + "\n"))))
                            .await
                            .is_ok()
                    }
                };
                if expired {
                    let _ = send(gone()).await;
                    return;
                }
                for line in backlog {
                    if !send(line).await {
                        return;
                    }
                }
                let bookmark = |rv: u64| {
                    json!({"type": "BOOKMARK", "object": {"apiVersion": api_version, "kind": "MqttBridgeConnector", "metadata": {"resourceVersion": rv.to_string()}}}).to_string()
                };
                let mut last = rv;
                let end = tokio::time::Instant::now() + Duration::from_secs(timeout);
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(end) => return,
                        _ = tick.tick() => {
                            if !send(bookmark(last)).await {
                                return;
                            }
                        }
                        change = rx.recv() => match change {
                            Ok(c) if c.collection == "*" => {
                                let _ = send(c.line).await;
                                return;
                            }
                            Ok(c) if c.collection == coll && c.rv > from => {
                                last = c.rv;
                                if !send(c.line).await {
                                    return;
                                }
                            }
                            Ok(_) => {}
                            Err(_) => return,
                        }
                    }
                }
            });
            let stream = tokio_stream_from(body_rx);
            Ok(Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .unwrap())
        }
        ("GET", 6) => {
            let st = state.lock().unwrap();
            let items: Vec<Value> = st
                .objects
                .get(&coll)
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default();
            Ok(full(
                200,
                json!({"apiVersion": format!("{}/{}", parts[1], parts[2]), "kind": "List", "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
            ))
        }
        ("PATCH", 8) if parts[7] == "status" => {
            if ctype != "application/merge-patch+json" {
                return Ok(status_error(
                    415,
                    "UnsupportedMediaType",
                    &format!(
                        "the body of the request was in an unknown format - accepted media types include: application/merge-patch+json; got {ctype}"
                    ),
                ));
            }
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
                return Ok(status_error(400, "BadRequest", "not JSON"));
            };
            let mut st = state.lock().unwrap();
            st.rv += 1;
            let rv = st.rv;
            let Some(obj) = st.objects.get_mut(&coll).and_then(|m| m.get_mut(parts[6])) else {
                return Ok(status_error(
                    404,
                    "NotFound",
                    &format!("\"{}\" not found", parts[6]),
                ));
            };
            // The status subresource takes only `status`.
            if let Some(status) = patch.get("status") {
                merge(&mut obj["status"], status);
            }
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            let obj = obj.clone();
            let change = Change {
                rv,
                collection: coll,
                line: json!({"type": "MODIFIED", "object": obj}).to_string(),
            };
            st.log.push(change.clone());
            let _ = events.send(change);
            Ok(full(200, obj))
        }
        _ => Ok(status_error(
            405,
            "MethodNotAllowed",
            &format!("{method} {path}"),
        )),
    }
}

/// The receiver as a stream of body frames.
fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, Infallible>>,
) -> impl futures::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + Sync + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
