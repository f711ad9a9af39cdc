//! A single-connection MQTT client on its own task: one [`Link`] and its [`SessionState`],
//! driven by commands from a [`SessionHandle`], with events on a channel. The `pub` / `sub`
//! tools and the benchmark's load generator use it; the bridge itself drives two links per
//! route client in one task instead (`route_client`).
//!
//! The task reconnects with backoff until its [`SessionHandle`] is dropped; then it writes
//! what is queued (acks included), sends DISCONNECT and ends.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;

use super::codec::SubFilter;
use super::link::{Link, LinkOptions};
use super::state::{AckToken, SessionState, StateEvent, Token};
use crate::counters::SessionCounters;
use crate::model::Message;

/// Everything one session needs.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// The connection: broker, credentials, client ID, keep-alive, backoff, limits.
    pub link: LinkOptions,
    /// Subscriptions made on every connect.
    pub subscriptions: Vec<SubFilter>,
    /// Cap on our unacknowledged outgoing QoS 1/2 publishes.
    pub max_inflight: u16,
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
    /// The connection failed or was lost (the error with its causes); the session retries.
    ConnectionLost(String),
}

/// Starts a session task. Events arrive on the returned receiver (capacity `event_capacity`);
/// while it is full the session stops reading from the broker.
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

async fn run(
    opts: SessionOptions,
    mut cmd_rx: mpsc::UnboundedReceiver<Command>,
    ev_tx: mpsc::Sender<SessionEvent>,
) {
    let mut state = SessionState::new(opts.subscriptions, opts.max_inflight);
    let counters = Arc::new(SessionCounters::new("broker"));
    let mut link = Link::new(opts.link, counters.clone());
    let mut events = Vec::new();
    let mut failures = 0;
    let mut open = true;
    while open {
        // Backpressure: read only while the owner has room for what is read.
        let room = ev_tx.capacity() >= ev_tx.max_capacity() / 4;
        tokio::select! {
            () = std::future::poll_fn(|cx| link.poll(cx, &mut state, room)) => {}
            cmd = cmd_rx.recv() => match cmd {
                Some(cmd) => {
                    apply(&mut state, cmd);
                    // Take whatever else is already queued so it shares one write.
                    for _ in 0..1024 {
                        match cmd_rx.try_recv() {
                            Ok(cmd) => apply(&mut state, cmd),
                            Err(_) => break,
                        }
                    }
                }
                None => open = false,
            },
            // The owner made room: read again.
            permit = ev_tx.reserve(), if !room => match permit {
                Ok(permit) => drop(permit),
                Err(_) => open = false,
            },
        }
        let now_failed = counters.failures.load(Ordering::Relaxed);
        if now_failed != failures {
            failures = now_failed;
            let text = counters.last_error().map(|(e, _)| e).unwrap_or_default();
            open &= ev_tx.send(SessionEvent::ConnectionLost(text)).await.is_ok();
        }
        state.swap_events(&mut events);
        for ev in events.drain(..) {
            open &= open && ev_tx.send(SessionEvent::State(ev)).await.is_ok();
        }
    }
    link.close(&mut state).await;
}

fn apply(state: &mut SessionState, cmd: Command) {
    match cmd {
        Command::Publish(msg, token) => state.publish(msg, token),
        Command::Ack(ack) => state.ack(ack),
    }
}
