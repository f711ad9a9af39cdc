//! Fault injection: a TCP proxy that can freeze (half-open: sockets stay open, nothing moves),
//! throttle or cut its connections; a scripted hostile MQTT broker; and a publisher that knows
//! exactly which of its messages the broker acknowledged.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use edgebridge::config::parse::parse_endpoint;
use edgebridge::model::{Message, Props, QoS};
use edgebridge::mqtt::session::{self, SessionEvent, SessionHandle, SessionOptions};
use edgebridge::mqtt::{LinkOptions, StateEvent, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward both ways.
    Forward,
    /// Stop reading both ways; keep the sockets open (a half-open connection). New
    /// connections are accepted and forwarded normally.
    Freeze,
    /// Forward at most this many bytes per second each way.
    Throttle(usize),
    /// Close new connections at once (a broker that is not back yet); open ones go on.
    Refuse,
}

/// The proxy's controls: the mode, how many times it was set, how many cuts.
#[derive(Debug, Clone, Copy)]
struct Control {
    mode: Mode,
    sets: u64,
    cuts: u64,
}

/// A TCP proxy on an ephemeral loopback port in front of `upstream`.
pub struct Proxy {
    /// Port to connect to.
    pub port: u16,
    control: watch::Sender<Control>,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts forwarding to `127.0.0.1:upstream`.
    pub async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (control, control_rx) = watch::channel(Control {
            mode: Mode::Forward,
            sets: 0,
            cuts: 0,
        });
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    continue;
                };
                let born = *control_rx.borrow();
                if born.mode == Mode::Refuse {
                    continue;
                }
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, control_rx.clone(), born));
                tokio::spawn(pump(sr, cw, control_rx.clone(), born));
            }
        });
        Proxy {
            port,
            control,
            accepted,
            task,
        }
    }

    /// Changes what connections do (a freeze applies to the connections open now; later
    /// ones are forwarded).
    pub fn set(&self, mode: Mode) {
        self.control.send_modify(|c| {
            c.mode = mode;
            c.sets += 1;
        });
    }

    /// Drops every connection open now.
    pub fn cut(&self) {
        self.control.send_modify(|c| c.cuts += 1);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut control: watch::Receiver<Control>,
    born: Control,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let c = *control.borrow_and_update();
        if c.cuts > born.cuts {
            return;
        }
        let mode = match c.mode {
            Mode::Freeze if born.sets >= c.sets => Mode::Forward,
            Mode::Refuse => Mode::Forward,
            m => m,
        };
        match mode {
            Mode::Freeze => {
                if control.changed().await.is_err() {
                    return;
                }
            }
            Mode::Forward | Mode::Refuse => {
                tokio::select! {
                    n = from.read(&mut buf) => match n {
                        Ok(0) | Err(_) => return,
                        Ok(n) => if to.write_all(&buf[..n]).await.is_err() { return },
                    },
                    r = control.changed() => if r.is_err() { return },
                }
            }
            Mode::Throttle(rate) => {
                let chunk = (rate / 10).clamp(1, buf.len());
                tokio::select! {
                    n = from.read(&mut buf[..chunk]) => match n {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if to.write_all(&buf[..n]).await.is_err() { return }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    },
                    r = control.changed() => if r.is_err() { return },
                }
            }
        }
    }
}

/// How a [`HostileBroker`] answers a client.
#[derive(Debug, Clone)]
pub enum Hostility {
    /// Answers CONNECT with an HTTP error page.
    Http,
    /// Answers CONNECT with random-looking bytes.
    Garbage,
    /// Says nothing at all.
    Silent,
    /// Accepts, grants the subscription, then sends a PUBLISH (QoS 1) with a wildcard topic,
    /// then a valid one with payload `after`.
    WildcardTopic,
    /// Accepts, then announces a PUBLISH with a remaining length of 256 MB and trickles bytes.
    HugeLength,
    /// Accepts, then sends a PUBACK for a packet id never used.
    UnknownPuback,
    /// Sends the CONNACK, SUBACK and a PUBLISH (QoS 0, payload `coalesced`) in one write.
    CoalescedConnack,
    /// Accepts the connection (CONNACK), then closes it at once.
    ConnackThenClose,
    /// Accepts, grants the subscription, then sends this many PUBLISHes (QoS 1, topic
    /// `x/burst/{pkid}`, payload the packet id, packet ids from 1) in one write, and nothing
    /// else.
    Burst(u16),
    /// Refuses the first SUBSCRIBE of a connection (SUBACK 0x87, not authorized), grants the
    /// next one and then sends a PUBLISH (QoS 0, payload `granted`).
    RefuseFirstSubscribe,
}

/// A scripted MQTT 5 "broker" that misbehaves as told; counts connections.
pub struct HostileBroker {
    /// Port.
    pub port: u16,
    connections: Arc<AtomicUsize>,
    acks: Arc<Mutex<Vec<u16>>>,
    task: tokio::task::JoinHandle<()>,
}

impl HostileBroker {
    /// Starts one.
    pub async fn start(how: Hostility) -> HostileBroker {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let acks = Arc::new(Mutex::new(Vec::new()));
        let (count, seen) = (connections.clone(), acks.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(sock, how.clone(), seen.clone()));
            }
        });
        HostileBroker {
            port,
            connections,
            acks,
            task,
        }
    }

    /// Connections so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Packet ids of the PUBACKs the client sent.
    pub fn pubacks(&self) -> Vec<u16> {
        self.acks.lock().unwrap().clone()
    }
}

impl Drop for HostileBroker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Records the packet ids of the PUBACKs the client sends until it goes (packets may span
/// reads; only short remaining lengths occur here: PUBACK, PINGREQ, DISCONNECT).
async fn record_pubacks(sock: &mut TcpStream, acks: &Mutex<Vec<u16>>) {
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        match sock.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
        }
        let mut i = 0;
        while i + 2 <= pending.len() && i + 2 + pending[i + 1] as usize <= pending.len() {
            if pending[i] == 0x40 && pending[i + 1] >= 2 {
                acks.lock()
                    .unwrap()
                    .push(u16::from_be_bytes([pending[i + 2], pending[i + 3]]));
            }
            i += 2 + pending[i + 1] as usize;
        }
        pending.drain(..i);
    }
}

/// An MQTT 5 PUBLISH, QoS `qos`, built by hand (the wildcard topic is the point).
fn publish_bytes(topic: &str, payload: &[u8], qos: u8, pkid: u16) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    body.push(0); // no properties
    body.extend_from_slice(payload);
    let mut p = vec![0x30 | (qos << 1)];
    let mut n = body.len();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        p.push(b);
        if n == 0 {
            break;
        }
    }
    p.extend_from_slice(&body);
    p
}

const CONNACK_OK: [u8; 5] = [0x20, 3, 0, 0, 0];

async fn serve(mut sock: TcpStream, how: Hostility, acks: Arc<Mutex<Vec<u16>>>) {
    let mut buf = vec![0u8; 4096];
    // The CONNECT.
    if sock.read(&mut buf).await.unwrap_or(0) == 0 {
        return;
    }
    let suback = |pkid: u16| vec![0x90, 4, (pkid >> 8) as u8, pkid as u8, 0, 1];
    // The SUBSCRIBE's packet id, from whatever the client sent after CONNACK.
    async fn read_subscribe(sock: &mut TcpStream, buf: &mut [u8]) -> Option<u16> {
        let n = tokio::time::timeout(Duration::from_secs(5), sock.read(buf))
            .await
            .ok()?
            .ok()?;
        (n >= 4 && buf[0] == 0x82).then(|| u16::from_be_bytes([buf[2], buf[3]]))
    }
    match how {
        Hostility::Http => {
            let _ = sock
                .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                .await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        Hostility::Garbage => {
            let _ = sock.write_all(&[0xff, 0x13, 0x37, 0x00, 0x42, 0x99]).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        Hostility::Silent => tokio::time::sleep(Duration::from_secs(60)).await,
        Hostility::ConnackThenClose => {
            let _ = sock.write_all(&CONNACK_OK).await;
        }
        Hostility::WildcardTopic | Hostility::HugeLength | Hostility::UnknownPuback => {
            let _ = sock.write_all(&CONNACK_OK).await;
            if let Some(pkid) = read_subscribe(&mut sock, &mut buf).await {
                let _ = sock.write_all(&suback(pkid)).await;
            }
            match how {
                Hostility::WildcardTopic => {
                    let mut out = publish_bytes("x/#", b"poison", 1, 7);
                    out.extend(publish_bytes("x/ok", b"after", 1, 8));
                    let _ = sock.write_all(&out).await;
                }
                Hostility::HugeLength => {
                    // PUBLISH, remaining length 268,435,455 (0xFF 0xFF 0xFF 0x7F), then a trickle.
                    let _ = sock.write_all(&[0x30, 0xff, 0xff, 0xff, 0x7f]).await;
                    for _ in 0..100 {
                        if sock.write_all(&[b'x'; 1024]).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                _ => {
                    let _ = sock.write_all(&[0x40, 2, 0x03, 0xe7]).await;
                }
            }
            record_pubacks(&mut sock, &acks).await;
        }
        Hostility::Burst(n) => {
            let _ = sock.write_all(&CONNACK_OK).await;
            if let Some(pkid) = read_subscribe(&mut sock, &mut buf).await {
                let _ = sock.write_all(&suback(pkid)).await;
            }
            let mut out = Vec::new();
            for pkid in 1..=n {
                let payload = pkid.to_string();
                out.extend(publish_bytes(
                    &format!("x/burst/{pkid}"),
                    payload.as_bytes(),
                    1,
                    pkid,
                ));
            }
            let _ = sock.write_all(&out).await;
            record_pubacks(&mut sock, &acks).await;
        }
        Hostility::RefuseFirstSubscribe => {
            let _ = sock.write_all(&CONNACK_OK).await;
            if let Some(pkid) = read_subscribe(&mut sock, &mut buf).await {
                let _ = sock
                    .write_all(&[0x90, 4, (pkid >> 8) as u8, pkid as u8, 0, 0x87])
                    .await;
            }
            let again = tokio::time::timeout(Duration::from_secs(30), async {
                loop {
                    // Anything but a SUBSCRIBE (a PINGREQ) is read past.
                    let n = sock.read(&mut buf).await.ok()?;
                    if n == 0 {
                        return None;
                    }
                    if n >= 4 && buf[0] == 0x82 {
                        return Some(u16::from_be_bytes([buf[2], buf[3]]));
                    }
                    if buf[0] == 0xc0 {
                        let _ = sock.write_all(&[0xd0, 0]).await;
                    }
                }
            })
            .await
            .ok()
            .flatten();
            if let Some(pkid) = again {
                let mut out = suback(pkid);
                out.extend(publish_bytes("acl/x", b"granted", 0, 0));
                let _ = sock.write_all(&out).await;
            }
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        Hostility::CoalescedConnack => {
            let mut out = CONNACK_OK.to_vec();
            out.extend(publish_bytes("x/early", b"coalesced", 0, 0));
            let _ = sock.write_all(&out).await;
            if let Some(pkid) = read_subscribe(&mut sock, &mut buf).await {
                let _ = sock.write_all(&suback(pkid)).await;
            }
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
    }
}

/// A QoS 1 publisher that records exactly which messages its broker acknowledged (it keeps a
/// persistent session and resends across broker restarts, like a well-behaved device).
pub struct AckedPublisher {
    handle: SessionHandle,
    acked: Arc<Mutex<BTreeSet<u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl AckedPublisher {
    /// Connects to the broker on `port` with client ID `client_id`.
    pub fn start(port: u16, client_id: &str) -> AckedPublisher {
        let endpoint = parse_endpoint(&format!("127.0.0.1:{port}")).unwrap();
        let opts = SessionOptions {
            link: LinkOptions {
                clean_start: false,
                session_expiry: Some(3600),
                keep_alive: Duration::from_secs(5),
                backoff: (Duration::from_millis(50), Duration::from_millis(300)),
                ..LinkOptions::anonymous(endpoint, Version::V5, client_id.into())
            },
            subscriptions: vec![],
            max_inflight: 100,
        };
        let (handle, mut events, _session) = session::spawn(opts, 4096);
        let acked = Arc::new(Mutex::new(BTreeSet::new()));
        let store = acked.clone();
        let task = tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                if let SessionEvent::State(StateEvent::Delivered(seq)) = ev {
                    store.lock().unwrap().insert(seq);
                }
            }
        });
        AckedPublisher {
            handle,
            acked,
            task,
        }
    }

    /// Queues message `seq` (payload: the number) on `topic`.
    pub fn publish(&self, topic: &str, seq: u64, payload: Option<Bytes>) {
        self.publish_qos(topic, seq, payload, QoS::AtLeastOnce);
    }

    /// [`AckedPublisher::publish`] at `qos` (a QoS 0 message counts as acknowledged once
    /// written to the broker).
    pub fn publish_qos(&self, topic: &str, seq: u64, payload: Option<Bytes>, qos: QoS) {
        self.handle.publish(
            Message {
                topic: topic.into(),
                payload: payload.unwrap_or_else(|| Bytes::from(seq.to_string())),
                qos,
                retain: false,
                properties: Props::default(),
            },
            seq,
        );
    }

    /// The sequence numbers the broker acknowledged.
    pub fn acked(&self) -> BTreeSet<u64> {
        self.acked.lock().unwrap().clone()
    }

    /// Waits until `n` are acknowledged or `timeout` passes; returns how many are.
    pub async fn wait_acked(&self, n: usize, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline && self.acked.lock().unwrap().len() < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.acked.lock().unwrap().len()
    }
}

impl Drop for AckedPublisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts measuring peak memory afresh (Linux: `5` to `/proc/self/clear_refs` resets VmHWM).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Prints the peak resident memory since [`reset_peak_rss`]: the bridge runs in the test
/// process, so this is an upper bound of its own (test clients included). Run one test at a
/// time (`--test-threads=1`) for a figure of that test alone.
pub fn print_peak(what: &str) {
    println!(
        "{what}: peak RSS of the test process (bridge and test clients) {:.1} MiB",
        peak_rss_kib() as f64 / 1024.0
    );
}

/// Peak resident memory (VmHWM) of this process, KiB.
pub fn peak_rss_kib() -> u64 {
    proc_status_kib("VmHWM:")
}

/// Resident memory (VmRSS) of this process now, KiB.
pub fn rss_kib() -> u64 {
    proc_status_kib("VmRSS:")
}

fn proc_status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
