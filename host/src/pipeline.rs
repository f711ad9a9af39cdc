//! What a route does to one received message, without any I/O: the source filter check, loop
//! prevention, the chain of plugin stages with the route's `onPluginError` policy, the QoS
//! ceiling and the topic mapping. It returns the messages to publish (none: the message was
//! handled and is acknowledged) and counts what it drops.
//!
//! A stage is anything implementing [`Stage`]: the WebAssembly plugin stage in production
//! ([`crate::plugin::stage::Stage`]), fakes in tests.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tracing::{debug, error, warn};

use crate::config::{OnPluginError, Route};
use crate::counters::{DropReason, RouteCounters};
use crate::model::{ByteString, Message, Props};
use crate::plugin::stage::{FlushReason, Outcome, Release, StageError};
use crate::routing::{self, LoopGuard, LoopVerdict, Side};
use crate::topic;

/// User property carrying the plugin error on dead-lettered messages (MQTT 5).
pub const ERROR_PROPERTY: &str = "edgebridge-error";

/// One step of a route's chain: decides about a message going to `target`.
pub trait Stage: Send {
    /// Its name, for logs.
    fn name(&self) -> &str;

    /// Decides about `msg` (whose topic is the source topic), going to `target`.
    fn run(
        &mut self,
        msg: &Message,
        target: &str,
    ) -> impl Future<Output = Result<Outcome, StageError>> + Send;

    /// Window results of the last call (aggregators only).
    fn take_releases(&mut self) -> Vec<Release> {
        Vec::new()
    }

    /// Whether an aggregator instance and its windows were discarded since last asked.
    fn take_lost(&mut self) -> bool {
        false
    }

    /// When its soonest timer is due (timer time, µs).
    fn next_timer(&mut self) -> Option<u64> {
        None
    }

    /// The policy's `maxHeld`, for an aggregator.
    fn max_held(&self) -> Option<usize> {
        None
    }

    /// Runs the timers due at `now`; results in [`Stage::take_releases`].
    fn fire_timers(&mut self, _now: u64) -> impl Future<Output = Result<(), StageError>> + Send {
        async { Ok(()) }
    }

    /// Asks an aggregator to emit what it holds; results in [`Stage::take_releases`].
    fn flush(
        &mut self,
        _reason: FlushReason,
    ) -> impl Future<Output = Result<(), StageError>> + Send {
        async { Ok(()) }
    }
}

/// A window of one stage of the chain: (stage index, window name).
pub type WindowKey = (usize, String);

/// A window's result, through the rest of the chain: publish `messages`; the source messages
/// held in `key` are done when every one of them is acknowledged and every window of
/// `holds` (a later aggregator that held them again) is released in turn.
#[derive(Debug, Clone, PartialEq)]
pub struct Released {
    /// The window released.
    pub key: WindowKey,
    /// The messages to publish, with their target topics.
    pub messages: Vec<Message>,
    /// Windows of later stages that hold its messages.
    pub holds: Vec<WindowKey>,
}

/// What [`Pipeline::process`] did with a message.
#[derive(Debug)]
pub enum Processed {
    /// Decided: the messages to publish are in `out` (none: handled, acknowledge it).
    Done,
    /// A plugin of the chain is not loaded: the message waits, as it is, for it to be; the
    /// route reads nothing more meanwhile (nothing is lost, nothing overtakes it).
    Hold {
        /// The message, to process again later.
        msg: Box<Message>,
        /// The plugin waited for.
        plugin: String,
    },
}

/// The route's logic for one route client.
pub struct Pipeline<S> {
    route: Route,
    /// The route's static target, shared by every message sent to it (cloned without
    /// allocating).
    static_target: Option<ByteString>,
    source: Side,
    target: Side,
    v5: bool,
    /// This process's id in MQTT 5 loop marks.
    bridge_id: Arc<str>,
    /// MQTT 3.1.1 loop prevention, shared by the route clients of a connector.
    guard: Arc<Mutex<LoopGuard>>,
    stages: Vec<S>,
    /// Windows the last processed message was held in.
    holds: Vec<WindowKey>,
    /// Window results not yet taken by the route client.
    released: Vec<Released>,
}

impl<S: Stage> Pipeline<S> {
    /// The pipeline of `route` reading from `source` and writing to `target`.
    pub fn new(
        route: Route,
        (source, target): (Side, Side),
        v5: bool,
        bridge_id: Arc<str>,
        guard: Arc<Mutex<LoopGuard>>,
        stages: Vec<S>,
    ) -> Pipeline<S> {
        Pipeline {
            static_target: route.target.clone().map(ByteString::from),
            route,
            source,
            target,
            v5,
            bridge_id,
            guard,
            stages,
            holds: Vec::new(),
            released: Vec::new(),
        }
    }

    /// The windows the last processed message is held in (none: it was decided).
    pub fn take_holds(&mut self) -> Vec<WindowKey> {
        std::mem::take(&mut self.holds)
    }

    /// The window results produced since last asked, in order.
    pub fn take_released(&mut self) -> Vec<Released> {
        std::mem::take(&mut self.released)
    }

    /// Whether an aggregator lost what its windows held (its instance was discarded).
    pub fn take_lost(&mut self) -> bool {
        // Every stage is asked (each forgets what it said), not only up to the first.
        let mut lost = false;
        for s in &mut self.stages {
            lost |= s.take_lost();
        }
        lost
    }

    /// When the soonest timer of the chain is due (timer time, µs).
    pub fn next_timer(&mut self) -> Option<u64> {
        self.stages.iter_mut().filter_map(|s| s.next_timer()).min()
    }

    /// The smallest `maxHeld` of the chain's aggregators (none: no aggregator runs).
    pub fn max_held(&self) -> Option<usize> {
        self.stages.iter().filter_map(|s| s.max_held()).min()
    }

    /// Fires the timers due at `now`; their results are in [`Pipeline::take_released`].
    pub async fn fire_timers(&mut self, now: u64, counters: &RouteCounters) {
        for i in 0..self.stages.len() {
            if self.stages[i].next_timer().is_none_or(|t| t > now) {
                continue;
            }
            if let Err(e) = self.stages[i].fire_timers(now).await {
                RouteCounters::add(&counters.plugin_errors);
                error!(route = %self.route.name, "{}; what the plugin holds stays held", crate::error::chain(&e));
            }
            self.settle_stage(i, counters).await;
        }
    }

    /// Asks every aggregator of the chain, in order, to emit what it holds; the results are in
    /// [`Pipeline::take_released`].
    pub async fn flush(&mut self, reason: FlushReason, counters: &RouteCounters) {
        for i in 0..self.stages.len() {
            if let Err(e) = self.stages[i].flush(reason).await {
                RouteCounters::add(&counters.plugin_errors);
                error!(route = %self.route.name, reason = reason.as_str(), "{}; what the plugin holds stays held", crate::error::chain(&e));
            }
            self.settle_stage(i, counters).await;
        }
    }

    /// Runs the window results stage `i` returned through the rest of the chain.
    async fn settle_stage(&mut self, i: usize, counters: &RouteCounters) {
        let pending = self.stages[i]
            .take_releases()
            .into_iter()
            .map(|r| (i, r))
            .collect();
        self.settle_releases(pending, counters).await;
    }

    /// Runs window results through the stages after the one that released them.
    async fn settle_releases(&mut self, pending: Vec<(usize, Release)>, counters: &RouteCounters) {
        let mut queue: std::collections::VecDeque<(usize, Release)> = pending.into();
        while let Some((i, r)) = queue.pop_front() {
            let items: Vec<(Message, String)> = r
                .messages
                .into_iter()
                .map(|e| {
                    let target = e.topic.into_string();
                    (
                        Message {
                            topic: target.as_str().into(),
                            payload: e.payload,
                            qos: e.qos,
                            retain: e.retain,
                            properties: e.properties.into(),
                        },
                        target,
                    )
                })
                .collect();
            let mut holds = Vec::new();
            let mut more = Vec::new();
            let mut out = match run_chain(
                &mut self.stages,
                i + 1,
                items.clone(),
                counters,
                &mut holds,
                &mut more,
            )
            .await
            {
                Ok(out) => out,
                Err(e) => {
                    holds.clear();
                    items
                        .into_iter()
                        .filter_map(|(m, target)| self.on_error(&e, m, target, counters))
                        .collect()
                }
            };
            queue.extend(more);
            self.mark(&mut out);
            self.released.push(Released {
                key: (i, r.window),
                messages: out,
                holds,
            });
        }
    }

    /// The route's `onPluginError` for a message the chain failed on: what to publish instead.
    fn on_error(
        &self,
        e: &StageError,
        msg: Message,
        target: String,
        counters: &RouteCounters,
    ) -> Option<Message> {
        let route = &self.route;
        RouteCounters::add(&counters.plugin_errors);
        let e = crate::error::chain(e);
        match &route.on_plugin_error {
            OnPluginError::Drop => {
                counters.count_drop(DropReason::PluginError);
                error!(route = %route.name, topic = %msg.topic, "{e}; message dropped (onPluginError: drop)");
                None
            }
            OnPluginError::Pass => {
                warn!(route = %route.name, topic = %msg.topic, "{e}; forwarding the original (onPluginError: pass)");
                Some(Message {
                    topic: target.into(),
                    ..msg
                })
            }
            OnPluginError::DeadLetter(dlq) => {
                counters.count_drop(DropReason::DeadLettered);
                warn!(route = %route.name, topic = %msg.topic, dead_letter = %dlq, "{e}; message dead-lettered");
                let mut m = Message {
                    topic: dlq.as_str().into(),
                    ..msg
                };
                if self.v5 {
                    m.properties
                        .user_properties
                        .push((ERROR_PROPERTY.to_string(), e));
                }
                Some(m)
            }
        }
    }

    /// MQTT 3.1.1 loop prevention: remembers what is published (MQTT 5: the target session
    /// stamps the loop mark as it encodes).
    fn mark(&self, out: &mut [Message]) {
        if self.v5 || out.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut guard = self.guard.lock().expect("loop guard lock");
        for m in out {
            m.properties = Props::default();
            guard.mark(self.target, m, now);
        }
    }

    /// Decides about one received message: appends the messages to publish to `out` (empty:
    /// handled, acknowledge it) and counts what is not forwarded in `counters`.
    pub async fn process(
        &mut self,
        msg: Message,
        out: &mut Vec<Message>,
        counters: &RouteCounters,
    ) -> Processed {
        let route = &self.route;
        if !topic::matches(&route.source, &msg.topic) {
            debug!(route = %route.name, topic = %msg.topic, "Message does not match the route's source; not forwarded");
            counters.count_drop(DropReason::Unmatched);
            return Processed::Done;
        }
        // MQTT 5 needs no shared state (the mark travels in the message): no lock, no clock.
        let verdict = if self.v5 {
            routing::check_via(&self.bridge_id, &msg)
        } else {
            self.guard
                .lock()
                .expect("loop guard lock")
                .check(self.source, &msg, Instant::now())
        };
        if verdict != LoopVerdict::Forward {
            debug!(route = %route.name, ?verdict, "Message not forwarded");
            counters.count_drop(DropReason::Loop);
            return Processed::Done;
        }
        // The route's QoS is a ceiling: a message goes on at the QoS it came with, at most.
        let msg = Message {
            qos: msg.qos.min(route.qos),
            properties: if self.v5 {
                msg.properties
            } else {
                Props::default()
            },
            ..msg
        };
        let first = out.len();
        if self.stages.is_empty() {
            // Same-as-source routes keep the received topic string: no copy.
            let topic = match &self.static_target {
                Some(t) => t.clone(),
                None => msg.topic,
            };
            out.push(Message { topic, ..msg });
        } else {
            let target = routing::target_topic(route, &msg.topic).to_string();
            let mut holds = Vec::new();
            let mut pending = Vec::new();
            let result = run_chain(
                &mut self.stages,
                0,
                vec![(msg.clone(), target)],
                counters,
                &mut holds,
                &mut pending,
            )
            .await;
            // Windows an aggregator released while deciding go out whatever the decision.
            self.settle_releases(pending, counters).await;
            match result {
                Ok(list) => {
                    out.extend(list);
                    self.holds = holds;
                }
                Err(StageError::Missing(plugin)) => {
                    return Processed::Hold {
                        msg: Box::new(msg),
                        plugin,
                    };
                }
                Err(e) => {
                    // Only a failure needs the target again.
                    let target = routing::target_topic(&self.route, &msg.topic).to_string();
                    out.extend(self.on_error(&e, msg, target, counters))
                }
            }
        }
        self.mark(&mut out[first..]);
        Processed::Done
    }
}

/// Runs messages through the stages from `from` on. The message handed to each stage keeps
/// its source topic; what it is going to is the `target` beside it. Windows that hold a
/// message are added to `holds`; window results the stages return, with the index of the
/// stage, to `releases`.
async fn run_chain<S: Stage>(
    stages: &mut [S],
    from: usize,
    items: Vec<(Message, String)>,
    counters: &RouteCounters,
    holds: &mut Vec<WindowKey>,
    releases: &mut Vec<(usize, Release)>,
) -> Result<Vec<Message>, StageError> {
    let mut current = items;
    for (i, stage) in stages.iter_mut().enumerate().skip(from) {
        let mut next = Vec::with_capacity(current.len());
        for (m, target) in current {
            let outcome = stage.run(&m, &target).await;
            releases.extend(stage.take_releases().into_iter().map(|r| (i, r)));
            match outcome? {
                Outcome::Pass => next.push((m, target)),
                Outcome::Drop(reason) => {
                    counters.count_drop(DropReason::Filtered);
                    debug!(plugin = %stage.name(), topic = %m.topic, %reason, "Dropped by plugin");
                }
                Outcome::Hold(window) => holds.push((i, window)),
                Outcome::Emit(list) => {
                    for e in list {
                        next.push((
                            Message {
                                topic: m.topic.clone(),
                                payload: e.payload,
                                qos: e.qos,
                                retain: e.retain,
                                properties: e.properties.into(),
                            },
                            e.topic.into_string(),
                        ));
                    }
                }
            }
        }
        current = next;
    }
    Ok(current
        .into_iter()
        .map(|(m, target)| Message {
            topic: target.into(),
            ..m
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Direction;
    use crate::model::QoS;
    use bytes::Bytes;
    use std::time::Duration;

    /// A stage that answers from a script.
    struct Fake(Vec<Result<Outcome, StageError>>);

    impl Stage for Fake {
        fn name(&self) -> &str {
            "fake"
        }
        async fn run(&mut self, _: &Message, _: &str) -> Result<Outcome, StageError> {
            self.0.remove(0)
        }
    }

    fn route(qos: QoS, target: Option<&str>, on_error: OnPluginError) -> Route {
        Route {
            name: "r".into(),
            topic_map: "m".into(),
            direction: Direction::LocalToRemote,
            qos,
            source: "a/#".into(),
            target: target.map(str::to_string),
            shared: None,
            plugins: vec![],
            on_plugin_error: on_error,
            spool: None,
            origin: crate::config::Origin {
                file: "x".into(),
                line: 1,
            },
        }
    }

    fn msg(topic: &str, qos: QoS) -> Message {
        Message {
            topic: topic.into(),
            payload: Bytes::from_static(b"p"),
            qos,
            retain: false,
            properties: Default::default(),
        }
    }

    fn pipeline(r: Route, stages: Vec<Fake>) -> (Pipeline<Fake>, RouteCounters) {
        let guard = Arc::new(Mutex::new(LoopGuard::new(Duration::from_secs(10), 100)));
        (
            Pipeline::new(
                r,
                (Side::Local, Side::Remote),
                true,
                "me".into(),
                guard,
                stages,
            ),
            RouteCounters::new("r", Direction::LocalToRemote, "c", "local", "remote"),
        )
    }

    #[tokio::test]
    async fn the_route_qos_is_a_ceiling_not_a_setting() {
        let (mut p, c) = pipeline(route(QoS::AtLeastOnce, None, OnPluginError::Drop), vec![]);
        let mut out = vec![];
        p.process(msg("a/x", QoS::AtMostOnce), &mut out, &c).await;
        assert_eq!(
            out[0].qos,
            QoS::AtMostOnce,
            "QoS 0 through a QoS 1 route stays 0"
        );
        let (mut p, c) = pipeline(route(QoS::AtMostOnce, None, OnPluginError::Drop), vec![]);
        out.clear();
        p.process(msg("a/x", QoS::AtLeastOnce), &mut out, &c).await;
        assert_eq!(
            out[0].qos,
            QoS::AtMostOnce,
            "QoS 1 through a QoS 0 route goes as 0"
        );
    }

    #[tokio::test]
    async fn unmatched_and_looped_messages_are_counted_not_forwarded() {
        let (mut p, c) = pipeline(
            route(QoS::AtLeastOnce, Some("t"), OnPluginError::Drop),
            vec![],
        );
        let mut out = vec![];
        p.process(msg("b/x", QoS::AtLeastOnce), &mut out, &c).await;
        let mut looped = msg("a/x", QoS::AtLeastOnce);
        looped
            .properties
            .user_properties
            .push((routing::VIA_PROPERTY.into(), "me".into()));
        p.process(looped, &mut out, &c).await;
        assert!(out.is_empty());
        assert_eq!(c.dropped(DropReason::Unmatched), 1);
        assert_eq!(c.dropped(DropReason::Loop), 1);
        p.process(msg("a/x", QoS::AtLeastOnce), &mut out, &c).await;
        assert_eq!(out[0].topic, "t", "static target");
    }

    #[tokio::test]
    async fn a_missing_plugin_holds_the_message_as_it_is() {
        let (mut p, c) = pipeline(
            route(QoS::AtLeastOnce, None, OnPluginError::Drop),
            vec![Fake(vec![Err(StageError::Missing("gone".into()))])],
        );
        let mut out = vec![];
        let r = p.process(msg("a/x", QoS::AtLeastOnce), &mut out, &c).await;
        assert!(
            matches!(&r, Processed::Hold { msg, plugin } if msg.topic == "a/x" && plugin == "gone"),
            "{r:?}"
        );
        assert!(out.is_empty());
        assert_eq!(
            c.dropped(DropReason::PluginError),
            0,
            "not an error: a wait"
        );
    }

    #[tokio::test]
    async fn plugin_failures_follow_the_routes_policy() {
        let fail = || {
            Err(StageError::Returned {
                plugin: "fake".into(),
                message: "no".into(),
            })
        };
        let mut out = vec![];
        let (mut p, c) = pipeline(
            route(QoS::AtLeastOnce, None, OnPluginError::Drop),
            vec![Fake(vec![fail()])],
        );
        p.process(msg("a/x", QoS::AtLeastOnce), &mut out, &c).await;
        assert!(out.is_empty());
        assert_eq!(c.dropped(DropReason::PluginError), 1);
        let (mut p, c) = pipeline(
            route(
                QoS::AtLeastOnce,
                None,
                OnPluginError::DeadLetter("dlq".into()),
            ),
            vec![Fake(vec![fail()])],
        );
        p.process(msg("a/x", QoS::AtLeastOnce), &mut out, &c).await;
        assert_eq!(out[0].topic, "dlq");
        assert!(
            out[0].properties.user_properties[0]
                .1
                .contains("returned an error: no")
        );
        assert_eq!(c.dropped(DropReason::DeadLettered), 1);
        out.clear();
        let (mut p, c) = pipeline(
            route(QoS::AtLeastOnce, None, OnPluginError::Pass),
            vec![Fake(vec![fail(), Ok(Outcome::Drop("x".into()))])],
        );
        p.process(msg("a/x", QoS::AtLeastOnce), &mut out, &c).await;
        assert_eq!(out[0].topic, "a/x", "the original, to its target");
        out.clear();
        p.process(msg("a/y", QoS::AtLeastOnce), &mut out, &c).await;
        assert!(out.is_empty());
        assert_eq!(c.dropped(DropReason::Filtered), 1);
    }
}
