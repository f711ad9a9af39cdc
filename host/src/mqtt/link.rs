//! The I/O of one MQTT connection, polled: a [`Link`] connects, reconnects with backoff,
//! writes what its [`SessionState`] queued, reads and hands packets to it, and keeps the
//! connection alive. It owns no task: the task that owns it (one per route client, driving
//! two links; or the single-connection loop of the `pub` / `sub` tools) polls it.
//!
//! Its phases are explicit:
//! - **backing off** until a timer (jittered exponential, reset only after a connection that
//!   stayed up [`STABLE_AFTER`], so a CONNACK followed at once by a disconnect keeps growing
//!   the delay);
//! - **connecting**: opening TCP / TLS / WebSocket, fetching a token, CONNECT and CONNACK —
//!   steps that are not cancel-safe, so they run as one pinned future held in the phase, under
//!   one time limit; bytes that arrived with the CONNACK are decoded at once;
//! - **up**: every write is non-blocking (a full send buffer never stops the task from reading
//!   the other link or running timers); keep-alive sends PINGREQ when nothing was received or
//!   sent for the keep-alive interval and declares the peer dead when no byte answers it within
//!   half the interval, or when a write makes no progress for the interval — so a half-open
//!   connection is detected within 1.5x the keep-alive.

use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, Sleep};
use tracing::{debug, error, info, trace, warn};

/// `EDGEBRIDGE_TRACE_PAYLOADS=1`: packet-level trace lines show message payloads. Off by
/// default: payloads may hold personal or secret data, and `trace` is what people turn on to
/// debug a connection.
static TRACE_PAYLOADS: std::sync::LazyLock<bool> =
    std::sync::LazyLock::new(|| std::env::var("EDGEBRIDGE_TRACE_PAYLOADS").is_ok_and(|v| v == "1"));

/// A received packet for a trace line: a PUBLISH without its payload unless
/// [`TRACE_PAYLOADS`].
fn traced(p: &codec::Incoming) -> String {
    traced_with(p, *TRACE_PAYLOADS)
}

fn traced_with(p: &codec::Incoming, payloads: bool) -> String {
    match p {
        codec::Incoming::Publish { pkid, dup, msg } if !payloads => format!(
            "Publish {{ pkid: {pkid}, dup: {dup}, topic: {:?}, qos: {}, retain: {}, payload: {} bytes (EDGEBRIDGE_TRACE_PAYLOADS=1 shows it) }}",
            msg.topic,
            msg.qos.as_u8(),
            msg.retain,
            msg.payload.len()
        ),
        other => format!("{other:?}"),
    }
}

use super::backoff::Backoff;
use super::codec::{self, CodecError, ConnAckInfo, ConnectSpec, Incoming, Outgoing, Version};
use super::outbuf::{MAX_PIECES, OutBuf, SHARE_FROM};
use super::state::{ReauthError, SessionState, StateError, Token, Writer};
use super::transport::{self, Stream, TransportError};
use crate::config::BrokerConnection;
use crate::counters::{LinkState, SessionCounters};
use crate::credentials::{CredentialError, Provider};
use crate::error::Chain;

/// A connection that stayed up this long resets the reconnect backoff.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Encode no more into the write buffer beyond this many bytes (the rest waits in the state).
const HIGH_WATER: usize = 256 * 1024;
/// Read buffer growth step.
const READ_CHUNK: usize = 16 * 1024;
/// Read buffer growth step after a read of large packets (1 KiB or more on average) that
/// filled the room it had: the peer sends faster than one chunk per turn, and the system
/// calls, not the packets, are the cost. (With small packets larger reads made QoS 1 slower:
/// the route client yields after such turns instead.)
const READ_CHUNK_BUSY: usize = 64 * 1024;
/// Average packet size from which packets count as large: reads of them may grow to
/// [`READ_CHUNK_BUSY`], and the route client does not yield after a turn of them.
pub const LARGE_PACKET: usize = 1024;
/// How long [`Link::close`] tries to write the last acks and DISCONNECT.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Everything one connection needs.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    /// For logs: e.g. `route "alerts" source (local)`.
    pub label: String,
    /// Wire version.
    pub version: Version,
    /// Broker address, transport, TLS and credentials.
    pub conn: Arc<BrokerConnection>,
    /// Where the CONNECT credentials come from (shared by the sessions of one broker side).
    pub credentials: Arc<Provider>,
    /// Client identifier.
    pub client_id: String,
    /// Clean start / clean session.
    pub clean_start: bool,
    /// Session expiry in seconds (MQTT 5).
    pub session_expiry: Option<u32>,
    /// Receive maximum announced to the broker (MQTT 5): cap on its unacknowledged publishes.
    pub receive_maximum: u16,
    /// Keep alive (the broker's Server Keep Alive overrides it).
    pub keep_alive: Duration,
    /// Reconnect delays (first, cap).
    pub backoff: (Duration, Duration),
    /// Largest incoming packet accepted (announced as MQTT 5 Maximum Packet Size, and enforced
    /// on 3.1.1 too), bytes.
    pub max_packet: usize,
    /// Time limit of one connection attempt (transport, token, CONNECT, CONNACK).
    pub connect_timeout: Duration,
    /// A user property added to every PUBLISH (MQTT 5), written by the encoder so that no
    /// message is copied for it: the bridge's loop mark.
    pub stamp: Option<(String, String)>,
}

impl LinkOptions {
    /// An anonymous MQTT connection over TCP to `endpoint`, as the `pub` / `sub` tools, the
    /// benchmark's load generator and test clients make: clean start, Receive Maximum 100,
    /// keep-alive 30 s, backoff 200 ms to 2 s, packets up to 16 MiB, 10 s per attempt.
    /// Callers change what differs with `..LinkOptions::anonymous(..)`.
    pub fn anonymous(
        endpoint: crate::config::Endpoint,
        version: Version,
        client_id: String,
    ) -> LinkOptions {
        let auth = crate::config::Auth::Anonymous;
        LinkOptions {
            label: client_id.clone(),
            version,
            conn: Arc::new(BrokerConnection {
                endpoint,
                transport: crate::config::Transport::Mqtt,
                tls: None,
                auth: auth.clone(),
                reach: Default::default(),
                embedded_log: None,
            }),
            credentials: Arc::new(Provider::new(
                auth,
                crate::credentials::IdentityOptions::from_env(),
            )),
            client_id,
            clean_start: true,
            session_expiry: None,
            receive_maximum: 100,
            keep_alive: Duration::from_secs(30),
            backoff: (Duration::from_millis(200), Duration::from_secs(2)),
            max_packet: 16 << 20,
            connect_timeout: Duration::from_secs(10),
            stamp: None,
        }
    }
}

/// Why a connection failed or ended. Causes are kept as sources.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The transport could not be opened.
    #[error("cannot open the transport")]
    Transport(#[from] TransportError),
    /// Credentials could not be read or fetched.
    #[error("credentials")]
    Credentials(#[from] CredentialError),
    /// The connection attempt did not finish in time.
    #[error("no CONNACK within {0:?} of starting to connect")]
    ConnectTimeout(Duration),
    /// The peer answered with bytes that are not MQTT.
    #[error("the peer does not speak MQTT; it answered {0:?}")]
    NotMqtt(String),
    /// The first packet was not a CONNACK.
    #[error("expected CONNACK, got {0}")]
    NotConnAck(String),
    /// Reading or writing failed.
    #[error("I/O error")]
    Io(#[from] std::io::Error),
    /// The peer sent bytes that do not decode, or we could not encode a packet.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The broker refused, disconnected or broke the protocol.
    #[error(transparent)]
    State(#[from] StateError),
    /// The peer closed the connection.
    #[error("the broker closed the connection")]
    Closed,
    /// Nothing answered a PINGREQ in time.
    #[error("no answer to PINGREQ within {0:?}: the connection is dead (half-open)")]
    KeepAlive(Duration),
    /// A write made no progress for the keep-alive interval.
    #[error("could not write for {0:?}: the peer stopped reading")]
    WriteStall(Duration),
    /// A planned reconnect to present a fresh token.
    #[error("renewing the connection to present a fresh token")]
    Renew,
    /// In priority failover, the primary address is reachable again: a planned reconnect to
    /// it.
    #[error("going back to the primary address {0}, reachable again")]
    Failback(String),
    /// The broker did not answer an AUTH (re-authentication) in time.
    #[error("no answer to re-authentication (AUTH) within {0:?}")]
    ReauthTimeout(Duration),
}

impl LinkError {
    /// The peer ended the connection (as opposed to a timeout or a local failure).
    fn peer_closed(&self) -> bool {
        match self {
            LinkError::Closed | LinkError::State(StateError::Disconnected(_)) => true,
            LinkError::Io(e) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            ),
            _ => false,
        }
    }
}

/// A connection that completed CONNECT / CONNACK.
struct Connected {
    stream: Box<dyn Stream>,
    /// Bytes read after the CONNACK.
    rest: BytesMut,
    connack: ConnAckInfo,
    renew_at: Option<Instant>,
}

/// Fetching a fresh token for re-authentication in place (not cancel-safe: held pinned).
type Refreshing =
    Pin<Box<dyn Future<Output = Result<crate::credentials::ConnectCredentials, LinkError>> + Send>>;

type Connecting = Pin<Box<dyn Future<Output = Result<Connected, LinkError>> + Send>>;

enum Phase {
    BackingOff,
    Connecting(Connecting),
    Up(Box<Up>),
    Closed,
}

struct Up {
    stream: Box<dyn Stream>,
    since: Instant,
    keep_alive: Duration,
    last_rx: Instant,
    last_tx: Instant,
    /// When the write buffer last had bytes that could not be written (no progress since).
    stall_since: Option<Instant>,
    needs_flush: bool,
    /// Bytes written on this connection.
    written: u64,
    ping_queued: bool,
    /// Stream offset of the end of the PINGREQ in the write buffer.
    ping_end: Option<u64>,
    /// When the PINGREQ left the buffer; cleared by any byte received after it.
    ping_flushed: Option<Instant>,
    renew_at: Option<Instant>,
    /// A fresh token being fetched for re-authentication in place.
    refreshing: Option<Refreshing>,
    /// An AUTH 0x19 is out: the broker must answer by then (deadline, limit).
    reauth_deadline: Option<(Instant, Duration)>,
    /// Priority failover on a secondary address: when to check the primary next, and the
    /// check under way.
    primary_check_at: Option<Instant>,
    primary_check: Option<Pin<Box<dyn Future<Output = bool> + Send>>>,
}

/// One MQTT connection's I/O (see the module docs).
pub struct Link {
    opts: Arc<LinkOptions>,
    phase: Phase,
    backoff: Backoff,
    timer: Pin<Box<Sleep>>,
    timer_at: Instant,
    rbuf: BytesMut,
    wbuf: OutBuf,
    /// QoS 0 publishes in the write buffer, by the stream offset of their end.
    qos0: std::collections::VecDeque<(u64, Token)>,
    counters: Arc<SessionCounters>,
    /// The next connection presents a fresh token in place of re-authentication (counted
    /// when it is up).
    renewing: bool,
    /// "This broker cannot re-authenticate in place" was logged.
    said_no_reauth: bool,
    /// Which address is in use: 0 is `endpoint`, then the failover addresses in order.
    addr: usize,
    /// Bytes the last read took.
    last_read: usize,
    /// The last read filled the room the buffer had, with large packets.
    read_filled: bool,
}

/// A renewal time moved later by up to 1/20 of the time left (at most 30 s), so that the
/// sessions of one bridge do not all refresh at the same instant.
fn jittered(at: Instant) -> Instant {
    let left = at.saturating_duration_since(Instant::now());
    let spread = (left / 20).min(Duration::from_secs(30));
    at + spread.mul_f64(fastrand::f64())
}

/// No deadline: a year from `now` (from the caller's clock reading, not a new one).
fn far_future(now: Instant) -> Instant {
    now + Duration::from_secs(86_400 * 365)
}

impl Link {
    /// A link that starts connecting when first polled.
    pub fn new(opts: LinkOptions, counters: Arc<SessionCounters>) -> Link {
        let now = Instant::now();
        Link {
            backoff: Backoff::new(opts.backoff.0, opts.backoff.1),
            opts: Arc::new(opts),
            phase: Phase::BackingOff,
            timer: Box::pin(tokio::time::sleep_until(now)),
            timer_at: now,
            rbuf: BytesMut::new(),
            wbuf: OutBuf::default(),
            qos0: Default::default(),
            counters,
            renewing: false,
            said_no_reauth: false,
            addr: 0,
            last_read: 0,
            read_filled: false,
        }
    }

    /// The address of attempt `i`: `endpoint`, then the failover addresses.
    fn endpoint(&self, i: usize) -> crate::config::Endpoint {
        let c = &self.opts.conn;
        match i {
            0 => c.endpoint.clone(),
            i => c.reach.failover[i - 1].clone(),
        }
    }

    /// How many addresses the broker has.
    fn addresses(&self) -> usize {
        1 + self.opts.conn.reach.failover.len()
    }

    /// The options it was made with.
    pub fn options(&self) -> &LinkOptions {
        &self.opts
    }

    /// Bytes the last read took from the connection.
    pub fn last_read(&self) -> usize {
        self.last_read
    }

    /// Whether CONNACK was accepted and the connection is up.
    pub fn is_up(&self) -> bool {
        matches!(self.phase, Phase::Up(_))
    }

    fn arm(&mut self, at: Instant) {
        if at != self.timer_at {
            self.timer_at = at;
            self.timer.as_mut().reset(at);
        }
    }

    /// Drives the connection one step: connects (again) when due, writes what `state`
    /// queued, reads — only when `read` is true: not reading is how a busy owner applies
    /// backpressure — and hands the packets to `state`, runs keep-alive. Ready when `state`
    /// may have new events; then the owner takes them and polls again.
    pub fn poll(&mut self, cx: &mut Context<'_>, state: &mut SessionState, read: bool) -> Poll<()> {
        self.poll_at(cx, state, read, Instant::now())
    }

    /// [`Link::poll`] with the time read once by an owner that polls several links (a clock
    /// reading is not free on every machine: one per poll of each link showed in profiles).
    pub fn poll_at(
        &mut self,
        cx: &mut Context<'_>,
        state: &mut SessionState,
        read: bool,
        now: Instant,
    ) -> Poll<()> {
        let mut activity = false;
        loop {
            match &mut self.phase {
                Phase::Closed => break,
                Phase::BackingOff => {
                    if self.timer.as_mut().poll(cx).is_pending() {
                        break;
                    }
                    self.start_connecting();
                }
                Phase::Connecting(fut) => match fut.as_mut().poll(cx) {
                    Poll::Pending => break,
                    Poll::Ready(Ok(c)) => {
                        activity = true;
                        if let Err(e) = self.on_connected(c, state) {
                            self.fail(e, state);
                        }
                    }
                    Poll::Ready(Err(e)) => {
                        activity = true;
                        self.fail(e, state);
                    }
                },
                Phase::Up(_) => match self.poll_up(cx, state, read, now) {
                    Ok(a) => {
                        activity |= a;
                        break;
                    }
                    Err(LinkError::Renew) => {
                        activity = true;
                        self.renew(cx, state);
                    }
                    Err(LinkError::Failback(primary)) => {
                        activity = true;
                        info!(session = %self.opts.label, client_id = %self.opts.client_id, "The primary address {primary} is reachable again: reconnecting to it");
                        self.addr = 0;
                        self.replan(cx, state);
                    }
                    Err(e) => {
                        activity = true;
                        self.fail(e, state);
                    }
                },
            }
        }
        if activity || state.has_events() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    fn start_connecting(&mut self) {
        self.counters.set_state(LinkState::Connecting);
        let opts = self.opts.clone();
        let endpoint = self.endpoint(self.addr);
        let proxy = transport::proxy_for(&opts.conn, &endpoint)
            .ok()
            .flatten()
            .map(|p| p.address());
        self.counters
            .set_address(endpoint.to_string().replace("embedded://", ""), proxy);
        self.phase = Phase::Connecting(Box::pin(async move {
            let limit = opts.connect_timeout;
            tokio::time::timeout(limit, connect(&opts, &endpoint))
                .await
                .map_err(|_| LinkError::ConnectTimeout(limit))?
        }));
    }

    fn on_connected(&mut self, c: Connected, state: &mut SessionState) -> Result<(), LinkError> {
        let first = self.counters.connects.load(Ordering::Relaxed) == 0;
        state.on_connack(&c.connack)?;
        let o = &self.opts;
        let now = Instant::now();
        let keep_alive = c
            .connack
            .server_keep_alive
            .map(|s| Duration::from_secs(s.max(1) as u64))
            .unwrap_or(o.keep_alive);
        self.rbuf = c.rest;
        self.wbuf.clear();
        self.qos0.clear();
        self.phase = Phase::Up(Box::new(Up {
            stream: c.stream,
            since: now,
            keep_alive,
            last_rx: now,
            last_tx: now,
            stall_since: None,
            needs_flush: false,
            written: 0,
            ping_queued: false,
            ping_end: None,
            ping_flushed: None,
            renew_at: c.renew_at.map(jittered),
            refreshing: None,
            reauth_deadline: None,
            primary_check_at: (self.addr != 0 && !o.conn.reach.round_robin)
                .then(|| now + o.conn.reach.primary_check),
            primary_check: None,
        }));
        if std::mem::take(&mut self.renewing) {
            self.counters.token_refreshed("reconnect");
        }
        self.counters.set_state(LinkState::Up);
        self.counters.connects.fetch_add(1, Ordering::Relaxed);
        let endpoint = self.endpoint(self.addr);
        let o = &self.opts;
        info!(session = %o.label, endpoint = %endpoint, client_id = %o.client_id, session_present = c.connack.session_present, "Connected");
        if !o.clean_start && !first && !c.connack.session_present {
            self.counters.source_lost.fetch_add(1, Ordering::Relaxed);
            error!(session = %o.label, client_id = %o.client_id, "The broker did not resume the bridge's persistent session (session present = 0): messages it held for this client may be lost; subscribing again");
        }
        // Bytes that came with the CONNACK are packets like any other.
        while let Some(p) = codec::decode(o.version, &mut self.rbuf, o.max_packet)? {
            state.on_incoming(p)?;
        }
        Ok(())
    }

    fn fail(&mut self, e: LinkError, state: &mut SessionState) {
        let (stable, right_after_send) = match &self.phase {
            Phase::Up(up) => (
                up.since.elapsed() >= STABLE_AFTER,
                e.peer_closed() && up.last_tx.elapsed() < Duration::from_secs(2),
            ),
            _ => (false, false),
        };
        if let Phase::Up(up) = &self.phase
            && up.reauth_deadline.is_some()
        {
            // Re-authentication was refused or not answered: the reconnect presents the
            // fresh token.
            self.renewing = true;
        }
        let failed_at = self.endpoint(self.addr);
        // The next attempt goes to the next address (failover; round-robin stays there).
        if self.addresses() > 1 {
            self.addr = (self.addr + 1) % self.addresses();
        }
        state.on_disconnect(right_after_send);
        if stable {
            self.backoff.reset();
        }
        let delay = self.backoff.next_delay();
        let text = Chain(&e).to_string();
        self.counters.set_error(text.clone());
        self.counters.set_state(LinkState::BackingOff);
        let o = &self.opts;
        let next = self.endpoint(self.addr);
        warn!(session = %o.label, endpoint = %failed_at, client_id = %o.client_id, "Connection failed: {text}; retrying in {delay:?} at {next}");
        self.phase = Phase::BackingOff;
        self.rbuf.clear();
        self.wbuf.clear();
        self.qos0.clear();
        self.arm(Instant::now() + delay);
    }

    /// A token is due for renewal. When the broker granted the token's authentication method
    /// in CONNACK, a fresh token is fetched and presented with AUTH on the open connection
    /// (MQTT 5 re-authentication: nothing in flight is resent). Otherwise a planned
    /// reconnect: DISCONNECT (best effort, without waiting), then connect at once with a
    /// fresh token.
    fn renew(&mut self, cx: &mut Context<'_>, state: &mut SessionState) {
        let o = self.opts.clone();
        let method = o.credentials.method();
        if let (Phase::Up(up), Some(m)) = (&mut self.phase, method)
            && state.auth_granted(m)
        {
            up.renew_at = None;
            let limit = o.connect_timeout;
            let credentials = o.credentials.clone();
            up.refreshing = Some(Box::pin(async move {
                tokio::time::timeout(limit, credentials.connect())
                    .await
                    .map_err(|_| LinkError::ConnectTimeout(limit))?
                    .map_err(LinkError::from)
            }));
            debug!(session = %o.label, client_id = %o.client_id, "Fetching a fresh token to re-authenticate in place");
            cx.waker().wake_by_ref();
            return;
        }
        let why = ReauthError::NotGranted(method.map(str::to_string));
        if !std::mem::replace(&mut self.said_no_reauth, true) {
            warn!(session = %o.label, endpoint = %o.conn.endpoint, client_id = %o.client_id, "Cannot re-authenticate in place ({why}): reconnecting to present each fresh token (messages in flight are sent again)");
        }
        self.renewing = true;
        self.replan(cx, state);
    }

    /// A planned reconnect: DISCONNECT (best effort, without waiting), then connect at once.
    fn replan(&mut self, cx: &mut Context<'_>, state: &mut SessionState) {
        if let Phase::Up(up) = &mut self.phase {
            let _ = encode_disconnect(state, self.opts.version, &mut self.wbuf, up, &mut self.qos0);
            let _ = Pin::new(&mut up.stream).poll_write(cx, self.wbuf.chunk());
            let _ = Pin::new(&mut up.stream).poll_flush(cx);
        }
        state.on_disconnect(false);
        debug!(session = %self.opts.label, client_id = %self.opts.client_id, "Reconnecting (planned)");
        self.rbuf.clear();
        self.wbuf.clear();
        self.qos0.clear();
        self.start_connecting();
    }

    fn poll_up(
        &mut self,
        cx: &mut Context<'_>,
        state: &mut SessionState,
        read: bool,
        now: Instant,
    ) -> Result<bool, LinkError> {
        let Link {
            opts,
            phase,
            timer,
            timer_at,
            rbuf,
            wbuf,
            qos0,
            last_read,
            read_filled,
            ..
        } = self;
        let Phase::Up(up) = phase else {
            unreachable!("poll_up is called in the up phase")
        };
        let mut activity = false;
        // A fresh token for re-authentication in place.
        if let Some(fut) = up.refreshing.as_mut()
            && let Poll::Ready(result) = fut.as_mut().poll(cx)
        {
            up.refreshing = None;
            activity = true;
            match result {
                Ok(creds) => {
                    let method = opts.credentials.method().unwrap_or_default();
                    let data = creds
                        .auth_data
                        .unwrap_or_else(|| crate::secret::Secret::new(""));
                    match state.reauthenticate(method, data) {
                        Ok(()) => {
                            up.reauth_deadline =
                                Some((now + opts.connect_timeout, opts.connect_timeout))
                        }
                        Err(e) => {
                            return Err(LinkError::State(StateError::Protocol(e.to_string())));
                        }
                    }
                    up.renew_at = creds.renew_at.map(jittered);
                }
                Err(e) => {
                    // The token in use is still valid: try again shortly; the broker ends
                    // the connection if it expires first, and the reconnect fetches again.
                    let text = Chain(&e).to_string();
                    warn!(session = %opts.label, client_id = %opts.client_id, "Cannot fetch a fresh token to re-authenticate: {text}; trying again in 5 s");
                    self.counters.set_error(text);
                    up.renew_at = Some(now + Duration::from_secs(5));
                }
            }
        }
        // Priority failover: is the primary address back?
        if up.primary_check.is_none()
            && let Some(at) = up.primary_check_at
            && now >= at
        {
            let conn = opts.conn.clone();
            let limit = opts.connect_timeout;
            up.primary_check = Some(Box::pin(async move {
                let primary = conn.endpoint.clone();
                matches!(
                    tokio::time::timeout(limit, transport::open_tcp(&conn, &primary)).await,
                    Ok(Ok(_))
                )
            }));
        }
        if let Some(check) = up.primary_check.as_mut()
            && let Poll::Ready(reachable) = check.as_mut().poll(cx)
        {
            up.primary_check = None;
            if reachable {
                return Err(LinkError::Failback(opts.conn.endpoint.to_string()));
            }
            up.primary_check_at = Some(now + opts.conn.reach.primary_check);
        }
        // The broker answered the AUTH.
        if up.reauth_deadline.is_some() && !state.is_reauthenticating() {
            up.reauth_deadline = None;
            self.counters.token_refreshed("in-place");
            info!(session = %opts.label, client_id = %opts.client_id, "Re-authenticated in place with a fresh token");
        }
        // Keep-alive, stalls and token renewal.
        let mut next = check_timers(up, state, now, read)?;
        if up.primary_check.is_none()
            && let Some(at) = up.primary_check_at
        {
            next = next.min(at);
        }
        // The timer moves earlier at once, but later only once it is due: the keep-alive
        // deadlines move on with every write and read, and re-arming the timer on every poll
        // (a lock and a move in tokio's timer wheel) cost more than one early wake-up per
        // keep-alive interval, which recomputes the deadlines and re-arms it.
        if next < *timer_at || (next != *timer_at && *timer_at <= now) {
            *timer_at = next;
            timer.as_mut().reset(next);
        }
        if timer.as_mut().poll(cx).is_ready() {
            // Due already (time moved on since `now`): look again at once.
            cx.waker().wake_by_ref();
        }
        // Write: everything queued, in as few writes as the socket takes; large payloads
        // from the read buffer they arrived in, where the socket writes vectored.
        let stamp = opts.stamp.as_ref().map(|(k, v)| (k.as_str(), v.as_str()));
        let vectored = up.stream.is_write_vectored();
        loop {
            if wbuf.len() < HIGH_WATER && state.has_outgoing() {
                state.write_outgoing(&mut Writer {
                    version: opts.version,
                    buf: wbuf,
                    share_from: if vectored { SHARE_FROM } else { usize::MAX },
                    high_water: HIGH_WATER,
                    stamp,
                    base: up.written,
                    qos0,
                    ping_end: &mut up.ping_end,
                })?;
            }
            if wbuf.is_empty() {
                break;
            }
            let wrote = if vectored {
                let mut pieces = [IoSlice::new(&[]); MAX_PIECES];
                let n = wbuf.pieces(&mut pieces);
                Pin::new(&mut up.stream).poll_write_vectored(cx, &pieces[..n])
            } else {
                Pin::new(&mut up.stream).poll_write(cx, wbuf.chunk())
            };
            match wrote {
                Poll::Ready(Ok(0)) => return Err(LinkError::Closed),
                Poll::Ready(Ok(n)) => {
                    trace!(session = %opts.label, "Wrote {n} bytes");
                    wbuf.advance(n);
                    up.written += n as u64;
                    up.last_tx = now;
                    up.stall_since = None;
                    up.needs_flush = true;
                    while let Some(&(end, token)) = qos0.front() {
                        if end > up.written {
                            break;
                        }
                        qos0.pop_front();
                        state.confirm_written(token);
                        activity = true;
                    }
                    if up.ping_end.is_some_and(|end| end <= up.written) {
                        up.ping_end = None;
                        up.ping_queued = false;
                        up.ping_flushed = Some(now);
                    }
                }
                Poll::Ready(Err(e)) => return Err(e.into()),
                Poll::Pending => break,
            }
        }
        if wbuf.is_empty() && up.needs_flush {
            match Pin::new(&mut up.stream).poll_flush(cx) {
                Poll::Ready(Ok(())) => up.needs_flush = false,
                Poll::Ready(Err(e)) => return Err(e.into()),
                Poll::Pending => {}
            }
        }
        // The stall clock runs while bytes wait and none could be written.
        if wbuf.is_empty() && !up.needs_flush {
            up.stall_since = None;
        } else if up.stall_since.is_none() {
            up.stall_since = Some(now);
        }
        // Read: one read per poll; the owner handles the events and polls again.
        if read {
            let chunk = if *read_filled {
                READ_CHUNK_BUSY
            } else {
                READ_CHUNK
            };
            if rbuf.capacity() - rbuf.len() < chunk / 4 {
                rbuf.reserve(chunk);
            }
            // One read takes at most `chunk` bytes, whatever room the buffer has grown to: the
            // route client's bound on what a stalled route holds (twice its window and one
            // read) counts on it.
            let room = (rbuf.capacity() - rbuf.len()).min(chunk);
            let mut limited = BufMut::limit(&mut *rbuf, chunk);
            match tokio_util::io::poll_read_buf(Pin::new(&mut up.stream), cx, &mut limited) {
                Poll::Ready(Ok(0)) => return Err(LinkError::Closed),
                Poll::Ready(Ok(n)) => {
                    *last_read = n;
                    up.last_rx = now;
                    up.ping_flushed = None;
                    let mut packets = 0;
                    while let Some(p) = codec::decode(opts.version, rbuf, opts.max_packet)? {
                        trace!(session = %opts.label, "Received {}", traced(&p));
                        state.on_incoming(p)?;
                        packets += 1;
                    }
                    *read_filled = n >= room && n >= packets * LARGE_PACKET;
                    activity = true;
                }
                Poll::Ready(Err(e)) => return Err(e.into()),
                Poll::Pending => {}
            }
        }
        Ok(activity || state.has_events())
    }

    /// Writes the last acks and a DISCONNECT (within [`CLOSE_TIMEOUT`]) and closes for good.
    pub async fn close(&mut self, state: &mut SessionState) {
        if let Phase::Up(up) = &mut self.phase {
            let written =
                encode_disconnect(state, self.opts.version, &mut self.wbuf, up, &mut self.qos0);
            if written.is_ok() {
                let stream = &mut up.stream;
                let buf = &mut self.wbuf;
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                    while !buf.is_empty() {
                        let n = stream.write(buf.chunk()).await?;
                        if n == 0 {
                            return Err(std::io::ErrorKind::WriteZero.into());
                        }
                        buf.advance(n);
                    }
                    stream.shutdown().await
                })
                .await;
            }
            debug!(session = %self.opts.label, "Disconnected");
        }
        state.on_disconnect(false);
        self.counters.set_state(LinkState::Closed);
        self.phase = Phase::Closed;
    }
}

/// Ends the session's side (`disconnect`) and encodes what it still has to send — the last
/// acknowledgements and the DISCONNECT — into `wbuf`, without a size limit.
fn encode_disconnect(
    state: &mut SessionState,
    version: Version,
    wbuf: &mut OutBuf,
    up: &Up,
    qos0: &mut std::collections::VecDeque<(u64, Token)>,
) -> Result<(), CodecError> {
    state.disconnect();
    let mut ping = None;
    state.write_outgoing(&mut Writer {
        version,
        buf: wbuf,
        share_from: usize::MAX,
        high_water: usize::MAX,
        stamp: None,
        base: up.written,
        qos0,
        ping_end: &mut ping,
    })
}

/// Evaluates the connection's deadlines at `now`: queues a PINGREQ when one is due, fails
/// the connection when it is dead or a token must be renewed. Returns when to look again.
fn check_timers(
    up: &mut Up,
    state: &mut SessionState,
    now: Instant,
    read: bool,
) -> Result<Instant, LinkError> {
    let k = up.keep_alive;
    let mut next = far_future(now);
    if let Some((at, limit)) = up.reauth_deadline {
        if now >= at && state.is_reauthenticating() {
            return Err(LinkError::ReauthTimeout(limit));
        }
        next = next.min(at);
    }
    if let Some(at) = up.renew_at {
        if now >= at {
            return Err(LinkError::Renew);
        }
        next = next.min(at);
    }
    // A PINGREQ left: some byte must come back within half the interval (only measurable
    // while reading: a paused reader cannot see the answer).
    if let Some(flushed) = up.ping_flushed
        && read
    {
        let dead = flushed + k / 2;
        if now >= dead {
            return Err(LinkError::KeepAlive(k / 2));
        }
        next = next.min(dead);
    }
    // Bytes that cannot be written for the whole interval: the peer stopped reading.
    if let Some(since) = up.stall_since {
        let dead = since + k;
        if now >= dead {
            return Err(LinkError::WriteStall(k));
        }
        next = next.min(dead);
    }
    if !up.ping_queued && up.ping_flushed.is_none() {
        let mut due = up.last_tx + k;
        if read {
            due = due.min(up.last_rx + k);
        }
        if now >= due {
            state.ping();
            up.ping_queued = true;
        } else {
            next = next.min(due);
        }
    }
    Ok(next)
}

/// Opens the transport to `endpoint`, sends CONNECT and waits for CONNACK.
async fn connect(
    o: &LinkOptions,
    endpoint: &crate::config::Endpoint,
) -> Result<Connected, LinkError> {
    let creds = o.credentials.connect().await?;
    let spec = ConnectSpec {
        client_id: o.client_id.clone(),
        keep_alive: o.keep_alive.as_secs().clamp(1, u16::MAX as u64) as u16,
        clean_start: o.clean_start,
        session_expiry: o.session_expiry,
        receive_maximum: Some(o.receive_maximum),
        max_packet_size: Some(o.max_packet.min(u32::MAX as usize) as u32),
        username: creds.username,
        password: creds.password,
        auth_method: creds.auth_method,
        auth_data: creds.auth_data,
    };
    // Credentials print redacted.
    trace!(session = %o.label, "Sending {spec:?}");
    // An embedded broker this process runs: an MQTT 5 session goes straight to it (the front
    // listener would only pass its bytes on).
    let direct = (o.version == Version::V5 && endpoint.embedded)
        .then(|| crate::embedded::direct(endpoint))
        .flatten()
        .map(|a| crate::config::Endpoint {
            host: a.ip().to_string(),
            port: a.port(),
            ..endpoint.clone()
        });
    let mut stream = transport::open(&o.conn, direct.as_ref().unwrap_or(endpoint)).await?;
    let mut buf = BytesMut::with_capacity(256);
    codec::encode(
        o.version,
        &Outgoing::Connect(Box::new(spec)),
        &mut buf,
        None,
    )?;
    stream.write_all(&buf).await?;
    stream.flush().await?;
    let mut rbuf = BytesMut::with_capacity(4096);
    let connack = loop {
        match codec::decode(o.version, &mut rbuf, o.max_packet) {
            Ok(Some(Incoming::ConnAck(info))) => {
                trace!(session = %o.label, "Received {info:?}");
                break info;
            }
            Ok(Some(other)) => return Err(LinkError::NotConnAck(format!("{other:?}"))),
            Ok(None) if rbuf.first().is_some_and(|b| b >> 4 != 2) => {
                return Err(LinkError::NotMqtt(printable(&rbuf)));
            }
            Ok(None) => {}
            Err(_) => return Err(LinkError::NotMqtt(printable(&rbuf))),
        }
        if stream.read_buf(&mut rbuf).await? == 0 {
            return Err(LinkError::Closed);
        }
    };
    Ok(Connected {
        stream,
        rest: rbuf,
        connack,
        renew_at: creds.renew_at,
    })
}

/// The first bytes of an answer, for an error message (text as text, the rest escaped).
fn printable(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(40)];
    let text = String::from_utf8_lossy(head);
    let line = text.lines().next().unwrap_or("");
    line.chars()
        .map(|c| if c.is_control() { '.' } else { c })
        .collect()
}

/// A stream that is never readable or writable (tests of the phases).
#[cfg(test)]
struct Never;

#[cfg(test)]
impl tokio::io::AsyncRead for Never {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Poll::Pending
    }
}

#[cfg(test)]
impl AsyncWrite for Never {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Pending
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Pending
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(k: Duration) -> Up {
        let now = Instant::now();
        Up {
            stream: Box::new(Never),
            since: now,
            keep_alive: k,
            last_rx: now,
            last_tx: now,
            stall_since: None,
            needs_flush: false,
            written: 0,
            ping_queued: false,
            ping_end: None,
            ping_flushed: None,
            renew_at: None,
            refreshing: None,
            reauth_deadline: None,
            primary_check_at: None,
            primary_check: None,
        }
    }

    #[test]
    fn a_silent_peer_is_pinged_after_the_interval_and_dead_half_an_interval_later() {
        let k = Duration::from_secs(10);
        let mut u = up(k);
        let mut s = SessionState::new(vec![], 10);
        let t0 = u.last_rx;
        let next = check_timers(&mut u, &mut s, t0, true).unwrap();
        assert_eq!(next, t0 + k, "first look at the keep-alive interval");
        assert!(!s.has_outgoing());
        check_timers(&mut u, &mut s, t0 + k, true).unwrap();
        assert!(s.has_outgoing() && u.ping_queued, "PINGREQ queued");
        // The PINGREQ is written at t0 + k; nothing comes back.
        u.ping_queued = false;
        u.ping_flushed = Some(t0 + k);
        let next = check_timers(&mut u, &mut s, t0 + k, true).unwrap();
        assert_eq!(next, t0 + k + k / 2);
        let e = check_timers(&mut u, &mut s, t0 + k + k / 2, true).unwrap_err();
        assert!(matches!(e, LinkError::KeepAlive(_)), "{e}");
    }

    #[test]
    fn a_write_that_makes_no_progress_for_the_interval_is_a_dead_peer() {
        let k = Duration::from_secs(10);
        let mut u = up(k);
        let mut s = SessionState::new(vec![], 10);
        let t0 = u.last_rx;
        u.stall_since = Some(t0);
        // Reading is paused (backpressure): no pong is expected, but the stall still counts.
        assert!(check_timers(&mut u, &mut s, t0 + k / 2, false).is_ok());
        let e = check_timers(&mut u, &mut s, t0 + k, false).unwrap_err();
        assert!(matches!(e, LinkError::WriteStall(_)), "{e}");
    }

    #[test]
    fn an_http_answer_is_named_as_not_mqtt() {
        assert_eq!(
            printable(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"),
            "HTTP/1.1 400 Bad Request"
        );
        assert_eq!(printable(b"\x01\x02ab"), "..ab");
    }

    #[test]
    fn trace_lines_leave_payloads_out_unless_asked() {
        let p = crate::mqtt::codec::Incoming::Publish {
            pkid: 3,
            dup: false,
            msg: crate::model::Message {
                topic: "a/b".into(),
                payload: bytes::Bytes::from_static(b"secret-reading"),
                qos: crate::model::QoS::AtLeastOnce,
                retain: false,
                properties: Default::default(),
            },
        };
        let line = super::traced_with(&p, false);
        assert!(
            !line.contains("secret-reading") && line.contains("14 bytes"),
            "{line}"
        );
        assert!(super::traced_with(&p, true).contains("secret"));
    }
}
