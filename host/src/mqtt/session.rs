//! The I/O driver of one MQTT client session: one task, one `select!`, the socket and timers.
//! All protocol decisions are in [`SessionState`]; this file only moves bytes and events.
//!
//! The task reconnects with jittered exponential backoff until its [`SessionHandle`] is
//! dropped; then it writes what is queued (acks included), sends DISCONNECT and ends.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::backoff::Backoff;
use super::codec::{self, ConnectSpec, Incoming, Outgoing, SubFilter, Version};
use super::state::{AckToken, SessionState, StateEvent, Token};
use super::transport;
use crate::config::BrokerConnection;
use crate::credentials::Provider;
use crate::model::Message;

/// Everything one session needs.
#[derive(Debug, Clone)]
pub struct SessionOptions {
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
    /// Subscriptions made on every connect.
    pub subscriptions: Vec<SubFilter>,
    /// Cap on our unacknowledged outgoing QoS 1/2 publishes.
    pub max_inflight: u16,
    /// Receive maximum announced to the broker (MQTT 5): cap on its unacknowledged publishes to us.
    pub receive_maximum: u16,
    /// Keep alive.
    pub keep_alive: Duration,
    /// Reconnect delays.
    pub backoff: (Duration, Duration),
    /// Largest incoming packet accepted.
    pub max_packet: usize,
    /// A user property added to every PUBLISH this session sends (MQTT 5), written by the
    /// encoder so that no message is copied for it: the bridge's loop mark.
    pub stamp: Option<(String, String)>,
}

/// Commands from the application to the session task.
#[derive(Debug)]
enum Command {
    Publish(Message, Token),
    Ack(AckToken),
}

/// Sends publishes and acks to a session task; dropping it ends the session cleanly.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    tx: mpsc::UnboundedSender<Command>,
}

impl SessionHandle {
    /// Queues a publish; its outcome arrives as [`StateEvent::Delivered`] or
    /// [`StateEvent::Rejected`] with `token`. Callers bound how many they leave pending.
    pub fn publish(&self, msg: Message, token: Token) {
        let _ = self.tx.send(Command::Publish(msg, token));
    }

    /// Acknowledges an incoming message to the broker.
    pub fn ack(&self, ack: AckToken) {
        let _ = self.tx.send(Command::Ack(ack));
    }
}

/// Events of a session, for its owner.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEvent {
    /// A protocol event.
    State(StateEvent),
    /// The connection failed or was lost; the session retries.
    ConnectionLost(String),
    /// A QoS 0 message was dropped because the owner did not keep up.
    DroppedQos0,
}

/// Starts a session task. Events arrive on the returned receiver (capacity `event_capacity`).
pub fn spawn(
    opts: SessionOptions,
    event_capacity: usize,
) -> (
    SessionHandle,
    mpsc::Receiver<SessionEvent>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (ev_tx, ev_rx) = mpsc::channel(event_capacity.max(16));
    let task = tokio::spawn(run(opts, rx, ev_tx));
    (SessionHandle { tx }, ev_rx, task)
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Transport(#[from] transport::TransportError),
    #[error("connection timed out after {0:?}")]
    Timeout(Duration),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Codec(#[from] codec::CodecError),
    #[error(transparent)]
    State(#[from] super::state::StateError),
    #[error("broker closed the connection")]
    Closed,
    #[error("no PINGRESP within the keep alive interval")]
    KeepAlive,
    #[error("expected CONNACK, got {0}")]
    NotConnAck(String),
    #[error("credentials")]
    Credentials(#[from] crate::credentials::CredentialError),
    #[error("renewing the connection to present a fresh token")]
    Renew,
}

enum End {
    /// The handle was dropped: the session is over.
    Closed,
}

async fn run(
    opts: SessionOptions,
    mut cmd_rx: mpsc::UnboundedReceiver<Command>,
    ev_tx: mpsc::Sender<SessionEvent>,
) {
    let mut state = SessionState::new(opts.subscriptions.clone(), opts.max_inflight);
    let mut backoff = Backoff::new(opts.backoff.0, opts.backoff.1);
    loop {
        let result = serve(&opts, &mut state, &mut cmd_rx, &ev_tx, &mut backoff).await;
        match result {
            Ok(End::Closed) => return,
            Err(SessionError::Renew) => {
                // A planned reconnect: the session resumes, unacknowledged publishes are sent
                // again; no backoff.
                state.on_disconnect();
                info!(session = %opts.label, client_id = %opts.client_id, "Reconnecting to present a fresh token");
                if emit(&ev_tx, SessionEvent::ConnectionLost("token renewal".into()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => {
                state.on_disconnect();
                if emit(
                    &ev_tx,
                    SessionEvent::ConnectionLost(crate::error::chain(&e)),
                )
                .await
                .is_err()
                {
                    return;
                }
                let delay = backoff.next_delay();
                warn!(session = %opts.label, endpoint = %opts.conn.endpoint, client_id = %opts.client_id, "Connection failed: {}; retrying in {delay:?}", crate::error::Chain(&e));
                let sleep = tokio::time::sleep(delay);
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        _ = &mut sleep => break,
                        cmd = cmd_rx.recv() => match cmd {
                            Some(Command::Publish(msg, token)) => state.publish(msg, token),
                            // Void: the broker redelivers that message on the next connection.
                            Some(Command::Ack(ack)) => state.ack(ack),
                            None => return,
                        },
                    }
                }
            }
        }
    }
}

async fn emit(ev_tx: &mpsc::Sender<SessionEvent>, ev: SessionEvent) -> Result<(), ()> {
    ev_tx.send(ev).await.map_err(|_| ())
}

/// MQTT 5 reason code "Packet too large".
const PACKET_TOO_LARGE: u8 = 0x95;

/// How long a QoS 0 message waits for room before it is dropped. While it waits the session
/// does not read, so a burst slows the broker down (TCP backpressure) instead of losing
/// messages; only an owner stalled for longer (e.g. its target broker is down) drops them.
const QOS0_WAIT: Duration = Duration::from_millis(500);

/// Forwards state events. QoS 1/2 messages wait for room (the broker's inflight window bounds
/// them); QoS 0 messages wait up to [`QOS0_WAIT`], then are dropped and counted.
async fn forward_events(
    state: &mut SessionState,
    events: &mut Vec<StateEvent>,
    ev_tx: &mpsc::Sender<SessionEvent>,
) -> Result<(), ()> {
    state.swap_events(events);
    for ev in events.drain(..) {
        match ev {
            StateEvent::Message { ack: None, .. } => {
                match ev_tx.try_send(SessionEvent::State(ev)) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(ev)) => {
                        match ev_tx.send_timeout(ev, QOS0_WAIT).await {
                            Ok(()) => {}
                            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                                let _ = ev_tx.try_send(SessionEvent::DroppedQos0);
                            }
                            Err(mpsc::error::SendTimeoutError::Closed(_)) => return Err(()),
                        }
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return Err(()),
                }
            }
            ev => emit(ev_tx, SessionEvent::State(ev)).await?,
        }
    }
    Ok(())
}

async fn connect_spec(
    opts: &SessionOptions,
) -> Result<(ConnectSpec, Option<tokio::time::Instant>), SessionError> {
    let creds = opts.credentials.connect().await?;
    let spec = ConnectSpec {
        client_id: opts.client_id.clone(),
        keep_alive: opts.keep_alive.as_secs().clamp(1, u16::MAX as u64) as u16,
        clean_start: opts.clean_start,
        session_expiry: opts.session_expiry,
        receive_maximum: Some(opts.receive_maximum),
        username: creds.username,
        password: creds.password,
        auth_method: creds.auth_method,
        auth_data: creds.auth_data,
    };
    Ok((spec, creds.renew_at))
}

async fn serve(
    opts: &SessionOptions,
    state: &mut SessionState,
    cmd_rx: &mut mpsc::UnboundedReceiver<Command>,
    ev_tx: &mpsc::Sender<SessionEvent>,
    backoff: &mut Backoff,
) -> Result<End, SessionError> {
    let connect_timeout = Duration::from_secs(10);
    let (spec, renew_at) = connect_spec(opts).await?;
    let stream = tokio::time::timeout(connect_timeout, transport::open(&opts.conn))
        .await
        .map_err(|_| SessionError::Timeout(connect_timeout))??;
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut wbuf = BytesMut::with_capacity(64 * 1024);
    let mut rbuf = BytesMut::with_capacity(64 * 1024);

    codec::encode(
        opts.version,
        &Outgoing::Connect(Box::new(spec)),
        &mut wbuf,
        None,
    )?;
    wr.write_all(&wbuf).await?;
    wr.flush().await?;
    wbuf.clear();

    let connack = tokio::time::timeout(connect_timeout, async {
        loop {
            if let Some(p) = codec::decode(opts.version, &mut rbuf, opts.max_packet)? {
                return Ok::<_, SessionError>(p);
            }
            if rd.read_buf(&mut rbuf).await? == 0 {
                return Err(SessionError::Closed);
            }
        }
    })
    .await
    .map_err(|_| SessionError::Timeout(connect_timeout))??;
    let info = match connack {
        Incoming::ConnAck(info) => info,
        other => return Err(SessionError::NotConnAck(format!("{other:?}"))),
    };
    state.on_connack(&info)?;
    let max_packet = info.max_packet_size;
    let keep_alive = info
        .server_keep_alive
        .map(|s| Duration::from_secs(s.max(1) as u64))
        .unwrap_or(opts.keep_alive);
    backoff.reset();
    info!(session = %opts.label, endpoint = %opts.conn.endpoint, client_id = %opts.client_id, session_present = info.session_present, "Connected");

    let mut ping = tokio::time::interval(keep_alive);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    let mut ping_outstanding = false;
    let mut closing = false;
    let mut renewing = false;
    let renew_deadline =
        renew_at.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(86_400 * 365));
    // One timer for the whole connection (not a new one per turn of the loop).
    let renew = tokio::time::sleep_until(renew_deadline);
    tokio::pin!(renew);
    let stamp = opts.stamp.as_ref().map(|(k, v)| (k.as_str(), v.as_str()));
    // Reused every turn.
    let (mut outgoing, mut written, mut events) = (Vec::new(), Vec::new(), Vec::new());
    loop {
        // Everything queued goes out in one write: acks, publishes and pings of this turn.
        if state.has_outgoing() {
            state.swap_outgoing(&mut outgoing);
            for (packet, token) in outgoing.drain(..) {
                match codec::encode_stamped(opts.version, &packet, &mut wbuf, max_packet, stamp) {
                    Ok(()) => written.extend(token),
                    // One message the broker would refuse: give it up, keep the connection.
                    Err(e @ codec::CodecError::TooLarge { .. }) => {
                        if let Outgoing::Publish { pkid, msg, .. } = &packet {
                            warn!(session = %opts.label, topic = %msg.topic, "Not sent: {e}");
                            state.refuse_publish(*pkid, token, PACKET_TOO_LARGE);
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            wr.write_all(&wbuf).await?;
            wr.flush().await?;
            wbuf.clear();
            for token in written.drain(..) {
                state.confirm_written(token);
            }
        }
        if forward_events(state, &mut events, ev_tx).await.is_err() {
            closing = true;
        }
        if closing || renewing {
            codec::encode(opts.version, &Outgoing::Disconnect, &mut wbuf, max_packet)?;
            let _ = wr.write_all(&wbuf).await;
            let _ = wr.shutdown().await;
            if renewing {
                return Err(SessionError::Renew);
            }
            debug!(session = %opts.label, "Disconnected");
            return Ok(End::Closed);
        }
        tokio::select! {
            n = rd.read_buf(&mut rbuf) => {
                if n? == 0 {
                    return Err(SessionError::Closed);
                }
                ping_outstanding = false;
                while let Some(packet) = codec::decode(opts.version, &mut rbuf, opts.max_packet)? {
                    state.on_incoming(packet)?;
                }
            }
            cmd = cmd_rx.recv() => match cmd {
                Some(cmd) => {
                    apply(state, cmd);
                    // Take whatever else is already queued so it shares one write.
                    for _ in 0..1024 {
                        match cmd_rx.try_recv() {
                            Ok(cmd) => apply(state, cmd),
                            Err(_) => break,
                        }
                    }
                }
                None => closing = true,
            },
            _ = &mut renew, if renew_at.is_some() && !renewing => renewing = true,
            _ = ping.tick() => {
                if ping_outstanding {
                    return Err(SessionError::KeepAlive);
                }
                state.ping();
                ping_outstanding = true;
            }
        }
    }
}

fn apply(state: &mut SessionState, cmd: Command) {
    match cmd {
        Command::Publish(msg, token) => state.publish(msg, token),
        Command::Ack(ack) => state.ack(ack),
    }
}
