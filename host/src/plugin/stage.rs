//! One plugin in one route's chain: its live instance, the call under the policy's limits,
//! validation of what it returns, rebuild after a trap, and a circuit breaker.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use wasmtime::Store;

use std::sync::atomic::Ordering;

use super::bindings::aggregator::RouteAggregator;
use super::bindings::aggregator::exports::edgebridge::plugin0_2_0::aggregator as agg;
use super::bindings::types as wit;
use super::{
    HostState, Instance, Loaded, Registry, Runtime, arm_budget, describe_trap, wall_backstop,
};
use crate::config::Direction;
use crate::counters::{CallOutcome, PluginCounters};
use crate::model::{Message, Properties, QoS};
use crate::policy::ConfinedTopic;

/// What a stage decided about a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Forward unchanged.
    Pass,
    /// Do not forward (reason).
    Drop(String),
    /// Forward these instead.
    Emit(Vec<Emitted>),
    /// An aggregator keeps the message in this window (its acknowledgement waits for the
    /// window's release).
    Hold(String),
}

/// A window's result from an aggregator: messages to publish, and the window whose held
/// messages they complete.
#[derive(Debug, Clone, PartialEq)]
pub struct Release {
    /// The window.
    pub window: String,
    /// Its messages (checked against the policy).
    pub messages: Vec<Emitted>,
}

/// Why an aggregator is asked to flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushReason {
    /// The route stops.
    Stop,
    /// A new version replaces the plugin.
    Upgrade,
    /// The route holds its policy's `maxHeld` messages.
    Pressure,
}

impl FlushReason {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FlushReason::Stop => "stop",
            FlushReason::Upgrade => "upgrade",
            FlushReason::Pressure => "pressure",
        }
    }

    fn to_wit(self) -> agg::FlushReason {
        match self {
            FlushReason::Stop => agg::FlushReason::Stop,
            FlushReason::Upgrade => agg::FlushReason::Upgrade,
            FlushReason::Pressure => agg::FlushReason::Pressure,
        }
    }
}

/// A message a plugin emitted, checked against its policy. Its topic is a
/// [`ConfinedTopic`], which only the policy check makes: a message a plugin may not publish
/// cannot be built, let alone published.
#[derive(Debug, Clone, PartialEq)]
pub struct Emitted {
    /// The topic to publish to.
    pub topic: ConfinedTopic,
    /// Payload.
    pub payload: Bytes,
    /// QoS.
    pub qos: QoS,
    /// Retain flag.
    pub retain: bool,
    /// MQTT 5 properties.
    pub properties: Properties,
}

/// Why a stage could not decide; the route's `onPluginError` applies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StageError {
    /// The plugin file is not loaded (yet, or any more).
    #[error("plugin \"{0}\" is not loaded")]
    Missing(String),
    /// It trapped (panic, time budget, memory limit); the instance was discarded.
    #[error("plugin \"{plugin}\" trapped: {message}")]
    Trap {
        /// Plugin.
        plugin: String,
        /// Cause.
        message: String,
    },
    /// It returned an error.
    #[error("plugin \"{plugin}\" returned an error: {message}")]
    Returned {
        /// Plugin.
        plugin: String,
        /// Its message.
        message: String,
    },
    /// Its decision broke its policy or the route's limits.
    #[error("plugin \"{plugin}\" returned a refused decision: {message}")]
    Invalid {
        /// Plugin.
        plugin: String,
        /// What was wrong.
        message: String,
    },
    /// Its instance could not be started.
    #[error("{0}")]
    Start(String),
    /// Too many failures in a row: not called until the breaker closes again.
    #[error("plugin \"{0}\" is paused after repeated failures (circuit breaker open)")]
    CircuitOpen(String),
}

/// The route facts a stage needs.
#[derive(Debug, Clone)]
pub struct RouteInfo {
    /// Route name.
    pub name: String,
    /// Direction.
    pub direction: Direction,
    /// Source filter.
    pub source: String,
    /// The route's QoS (ceiling for emitted messages).
    pub qos: QoS,
    /// The namespace `$target` in policies stands for: the static target, or the source
    /// filter when the route keeps source topics.
    pub target_namespace: String,
}

struct Live {
    loaded: Arc<Loaded>,
    store: Store<HostState>,
    instance: Instance,
}

/// One plugin of a route's chain.
pub struct Stage {
    runtime: Arc<Runtime>,
    registry: Arc<Registry>,
    /// Plugin name.
    pub plugin: String,
    config: String,
    route: RouteInfo,
    live: Option<Live>,
    /// [`Registry::changes`] when `live` was last checked against the registry.
    checked: u64,
    /// The call context, built once (only `target` changes, and rarely).
    ctx: wit::Context,
    failures: u32,
    open_until: Option<Instant>,
    /// Next breaker pause; `None` until the first opening (then the policy's `pause`).
    backoff: Option<Duration>,
    counters: Arc<PluginCounters>,
    /// Window results an aggregator returned with its last answer, not yet taken.
    releases: Vec<Release>,
    /// An aggregator's instance (and what its windows held) was discarded since last asked.
    lost: bool,
}

impl Stage {
    /// A stage for `plugin` with its JSON `config` on `route`; instantiated on first use.
    pub fn new(
        runtime: Arc<Runtime>,
        registry: Arc<Registry>,
        plugin: &str,
        config: &str,
        route: RouteInfo,
        counters: Arc<PluginCounters>,
    ) -> Stage {
        let ctx = wit::Context {
            route: route.name.clone(),
            direction: match route.direction {
                Direction::LocalToRemote => wit::Direction::LocalToRemote,
                Direction::RemoteToLocal => wit::Direction::RemoteToLocal,
            },
            source_filter: route.source.clone(),
            target: String::new(),
        };
        Stage {
            runtime,
            registry,
            plugin: plugin.to_string(),
            config: config.to_string(),
            route,
            live: None,
            checked: 0,
            ctx,
            failures: 0,
            open_until: None,
            backoff: None,
            counters,
            releases: Vec::new(),
            lost: false,
        }
    }

    /// Discards the live instance; an aggregator's windows go with it.
    fn discard(&mut self) {
        if let Some(live) = self.live.take()
            && matches!(live.instance, Instance::Aggregator(_))
        {
            self.lost = true;
            self.counters.timers_set.store(0, Ordering::Relaxed);
        }
    }

    /// The window results of the last call, taken.
    pub fn take_releases(&mut self) -> Vec<Release> {
        std::mem::take(&mut self.releases)
    }

    /// Whether an aggregator instance was discarded (after a trap) since the last call: what
    /// its windows held is gone, and the route must have its source send it again.
    pub fn take_lost(&mut self) -> bool {
        std::mem::take(&mut self.lost)
    }

    /// When the soonest timer of an aggregator is due (timer time, see
    /// [`super::timers::HostClock::timer_now`]).
    pub fn next_timer(&mut self) -> Option<u64> {
        self.live
            .as_mut()
            .and_then(|l| l.store.data_mut().timers.next_due())
    }

    /// The policy's `maxHeld` of the running aggregator.
    pub fn max_held(&self) -> Option<usize> {
        self.live
            .as_ref()
            .filter(|l| matches!(l.instance, Instance::Aggregator(_)))
            .map(|l| l.loaded.policy.max_held)
    }

    /// Calls `on-timer` for every timer due at `now` (at most 10,000 a turn); the window
    /// results are in [`Stage::take_releases`].
    pub async fn fire_timers(&mut self, now: u64) -> Result<(), StageError> {
        let Some(live) = self.live.as_mut() else {
            return Ok(());
        };
        let due = live.store.data_mut().timers.take_due(now, 10_000);
        for d in due {
            let late = now.saturating_sub(d.at);
            self.counters
                .timer_lateness
                .observe(Duration::from_micros(late));
            self.counters.timers_fired.fetch_add(1, Ordering::Relaxed);
            let ctx = self.timer_ctx();
            let name = d.name;
            self.aggregator_call(|inst, store| {
                Box::pin(async move {
                    inst.edgebridge_plugin0_2_0_aggregator()
                        .call_on_timer(store, &ctx, &name)
                        .await
                })
            })
            .await?;
        }
        Ok(())
    }

    /// Calls `flush(reason)`; the window results are in [`Stage::take_releases`].
    pub async fn flush(&mut self, reason: FlushReason) -> Result<(), StageError> {
        let is_aggregator = self
            .live
            .as_ref()
            .is_some_and(|l| matches!(l.instance, Instance::Aggregator(_)));
        if !is_aggregator {
            return Ok(());
        }
        self.counters.flushes[reason as usize].fetch_add(1, Ordering::Relaxed);
        let ctx = self.timer_ctx();
        self.aggregator_call(|inst, store| {
            Box::pin(async move {
                inst.edgebridge_plugin0_2_0_aggregator()
                    .call_flush(store, &ctx, reason.to_wit())
                    .await
            })
        })
        .await
    }

    /// The context of a call that is not about a message: the route's target namespace.
    fn timer_ctx(&self) -> wit::Context {
        wit::Context {
            target: self.route.target_namespace.clone(),
            ..self.ctx.clone()
        }
    }

    /// Runs one `on-timer` or `flush` call on the live aggregator under the time budget, and
    /// keeps its checked window results.
    async fn aggregator_call<F>(&mut self, f: F) -> Result<(), StageError>
    where
        F: for<'a> FnOnce(
            &'a RouteAggregator,
            &'a mut Store<HostState>,
        ) -> std::pin::Pin<
            Box<
                dyn std::future::Future<
                        Output = wasmtime::Result<Result<Vec<agg::Release>, String>>,
                    > + Send
                    + 'a,
            >,
        >,
    {
        let plugin = self.plugin.clone();
        let Some(live) = self.live.as_mut() else {
            return Ok(());
        };
        let Instance::Aggregator(inst) = &live.instance else {
            return Ok(());
        };
        arm_budget(&mut live.store, live.loaded.policy.time_per_message);
        let backstop = wall_backstop(live.loaded.policy.time_per_message);
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(backstop, f(inst, &mut live.store)).await;
        self.counters.duration.observe(started.elapsed());
        let result = match trapped(result, backstop, &plugin, &live.store) {
            Err(e) => {
                self.discard();
                self.counters.call(CallOutcome::Trap);
                return Err(e);
            }
            Ok(Err(message)) => {
                self.counters.call(CallOutcome::Error);
                return Err(StageError::Returned { plugin, message });
            }
            Ok(Ok(list)) => list,
        };
        let timers = live.store.data().timers.len() as u64;
        self.counters.timers_set.store(timers, Ordering::Relaxed);
        let policy = live.loaded.policy.clone();
        match validate_releases(result, &self.route, &policy) {
            Ok(list) => {
                self.counters.call(CallOutcome::Emit);
                self.releases.extend(list);
                Ok(())
            }
            Err(message) => {
                self.counters.call(CallOutcome::Refused);
                Err(StageError::Invalid { plugin, message })
            }
        }
    }

    async fn ensure_live(&mut self) -> Result<(), StageError> {
        // Nothing installed or removed since the last look: the live instance is current.
        let changes = self.registry.changes();
        if self.live.is_some() && changes == self.checked {
            return Ok(());
        }
        let current = self
            .registry
            .current(&self.plugin)
            .ok_or_else(|| StageError::Missing(self.plugin.clone()))?;
        if let Some(live) = &self.live
            && Arc::ptr_eq(&live.loaded, &current)
        {
            self.checked = changes;
            return Ok(());
        }
        // An aggregator being replaced first emits what its windows hold: nothing it held is
        // lost with its instance.
        if let Err(e) = self.flush(FlushReason::Upgrade).await {
            tracing::error!(route = %self.route.name, plugin = %self.plugin, "Flushing the replaced plugin version failed: {e}");
        }
        match self
            .runtime
            .instantiate_counted(
                &current,
                &self.route.name,
                &self.config,
                Some(self.counters.clone()),
            )
            .await
        {
            Ok((store, instance)) => {
                if let Some(old) = &self.live {
                    tracing::info!(route = %self.route.name, plugin = %self.plugin, from = old.loaded.version, to = current.version, "Route switched to the new plugin version");
                }
                self.live = Some(Live {
                    loaded: current,
                    store,
                    instance,
                });
                self.checked = changes;
                Ok(())
            }
            // A new version that refuses this route's config: keep running the old one (and do
            // not try again for every message, only after the next change).
            Err(e) if self.live.is_some() => {
                tracing::error!(route = %self.route.name, plugin = %self.plugin, "New plugin version not used: {e}");
                self.checked = changes;
                Ok(())
            }
            Err(e) => Err(StageError::Start(e.to_string())),
        }
    }

    /// Instantiates the plugin and runs its `init` now rather than on the first message
    /// (`edgebridge plugin test` reports it on its own).
    pub async fn start(&mut self) -> Result<(), StageError> {
        self.ensure_live().await
    }

    /// Runs the plugin on `msg` (whose topic is the source topic) going to `target`.
    pub async fn decide(&mut self, msg: &Message, target: &str) -> Result<Outcome, StageError> {
        if let Some(until) = self.open_until {
            if Instant::now() < until {
                self.counters.call(CallOutcome::BreakerOpen);
                return Err(StageError::CircuitOpen(self.plugin.clone()));
            }
            self.open_until = None;
            self.counters.breaker_open.store(0, Ordering::Relaxed);
        }
        let started = std::time::Instant::now();
        let result = self.call(msg, target).await;
        let outcome = match &result {
            Ok(Outcome::Pass) => Some(CallOutcome::Pass),
            Ok(Outcome::Drop(_)) => Some(CallOutcome::Drop),
            Ok(Outcome::Emit(_)) => Some(CallOutcome::Emit),
            Ok(Outcome::Hold(_)) => Some(CallOutcome::Hold),
            Err(StageError::Returned { .. }) => Some(CallOutcome::Error),
            Err(StageError::Trap { .. }) => Some(CallOutcome::Trap),
            Err(StageError::Invalid { .. }) => Some(CallOutcome::Refused),
            Err(StageError::Start(_)) => Some(CallOutcome::StartFailed),
            Err(StageError::Missing(_) | StageError::CircuitOpen(_)) => None,
        };
        if let Some(o) = outcome {
            self.counters.call(o);
            if o != CallOutcome::StartFailed {
                self.counters.duration.observe(started.elapsed());
            }
        }
        match &result {
            Ok(_) => {
                self.failures = 0;
                self.backoff = None;
            }
            Err(StageError::Missing(_)) => {}
            Err(_) => {
                self.failures += 1;
                let breaker = self
                    .registry
                    .current(&self.plugin)
                    .map(|l| l.policy.breaker)
                    .unwrap_or_default();
                if self.failures >= breaker.failures {
                    let pause = self.backoff.unwrap_or(breaker.pause);
                    tracing::error!(route = %self.route.name, plugin = %self.plugin, failures = self.failures, ?pause, "Plugin keeps failing: circuit breaker open");
                    self.open_until = Some(Instant::now() + pause);
                    self.backoff = Some((pause * 2).min(breaker.max_pause));
                    self.failures = 0;
                    self.counters.breaker_open.store(1, Ordering::Relaxed);
                }
            }
        }
        result
    }

    async fn call(&mut self, msg: &Message, target: &str) -> Result<Outcome, StageError> {
        self.ensure_live().await?;
        let live = self.live.as_mut().expect("ensured");
        if self.ctx.target != target {
            self.ctx.target = target.to_string();
        }
        let ctx = &self.ctx;
        let input = to_wit(msg);
        arm_budget(&mut live.store, live.loaded.policy.time_per_message);
        let plugin = self.plugin.clone();
        // The epoch deadline stops a plugin that computes; this stops one that waits in a host
        // call (where no deadline fires), e.g. sleeping under a `wasi-clocks` grant.
        let backstop = wall_backstop(live.loaded.policy.time_per_message);
        let call = async {
            match &live.instance {
                Instance::Mapper(m) => m
                    .edgebridge_plugin_mapper()
                    .call_map_message(&mut live.store, ctx, &input)
                    .await
                    .map(|r| r.map(Answer::Decision)),
                Instance::Filter(f) => f
                    .edgebridge_plugin_filter()
                    .call_keep(&mut live.store, ctx, &input)
                    .await
                    .map(|r| {
                        r.map(|keep| {
                            if keep {
                                Answer::Decision(wit::Decision::Pass)
                            } else {
                                Answer::Decision(wit::Decision::Drop("filtered out".into()))
                            }
                        })
                    }),
                Instance::Aggregator(a) => a
                    .edgebridge_plugin0_2_0_aggregator()
                    .call_on_message(&mut live.store, ctx, &input)
                    .await
                    .map(|r| r.map(Answer::Reply)),
            }
        };
        let result = tokio::time::timeout(backstop, call).await;
        match trapped(result, backstop, &plugin, &live.store) {
            Err(e) => {
                // The instance cannot be entered again: the next call rebuilds it.
                self.discard();
                Err(e)
            }
            Ok(Err(message)) => Err(StageError::Returned { plugin, message }),
            Ok(Ok(Answer::Decision(decision))) => {
                let policy = live.loaded.policy.clone();
                validate(decision, msg, &self.route, &policy)
                    .map_err(|message| StageError::Invalid { plugin, message })
            }
            Ok(Ok(Answer::Reply(reply))) => {
                let timers = live.store.data().timers.len() as u64;
                self.counters.timers_set.store(timers, Ordering::Relaxed);
                // The common answer: forward it, nothing released; nothing to check.
                if reply.releases.is_empty() && matches!(reply.action, agg::Action::Pass) {
                    return Ok(Outcome::Pass);
                }
                let policy = live.loaded.policy.clone();
                let releases =
                    validate_releases(reply.releases, &self.route, &policy).map_err(|message| {
                        StageError::Invalid {
                            plugin: plugin.clone(),
                            message,
                        }
                    })?;
                let outcome = match reply.action {
                    agg::Action::Pass => Outcome::Pass,
                    agg::Action::Drop(r) => Outcome::Drop(r),
                    agg::Action::Hold(w) => {
                        check_window(&w)
                            .map_err(|message| StageError::Invalid { plugin, message })?;
                        Outcome::Hold(w)
                    }
                    agg::Action::Emit(list) => {
                        validate(wit::Decision::Emit(list), msg, &self.route, &policy)
                            .map_err(|message| StageError::Invalid { plugin, message })?
                    }
                };
                self.releases.extend(releases);
                Ok(outcome)
            }
        }
    }
}

impl crate::pipeline::Stage for Stage {
    fn name(&self) -> &str {
        &self.plugin
    }

    fn run(
        &mut self,
        msg: &Message,
        target: &str,
    ) -> impl std::future::Future<Output = Result<Outcome, StageError>> + Send {
        self.decide(msg, target)
    }

    fn take_releases(&mut self) -> Vec<Release> {
        Stage::take_releases(self)
    }

    fn take_lost(&mut self) -> bool {
        Stage::take_lost(self)
    }

    fn next_timer(&mut self) -> Option<u64> {
        Stage::next_timer(self)
    }

    fn max_held(&self) -> Option<usize> {
        Stage::max_held(self)
    }

    fn fire_timers(
        &mut self,
        now: u64,
    ) -> impl std::future::Future<Output = Result<(), StageError>> + Send {
        Stage::fire_timers(self, now)
    }

    fn flush(
        &mut self,
        reason: FlushReason,
    ) -> impl std::future::Future<Output = Result<(), StageError>> + Send {
        Stage::flush(self, reason)
    }
}

/// Longest window name, bytes.
const MAX_WINDOW_NAME: usize = 256;

fn check_window(name: &str) -> Result<(), String> {
    if name.len() > MAX_WINDOW_NAME {
        return Err(format!(
            "a window name is at most {MAX_WINDOW_NAME} bytes, this one has {}",
            name.len()
        ));
    }
    Ok(())
}

/// What a call bounded by `backstop` ended with: its value, or its trap or timeout as a
/// [`StageError::Trap`] (the caller discards the instance: it cannot be entered again).
fn trapped<R>(
    result: Result<wasmtime::Result<R>, tokio::time::error::Elapsed>,
    backstop: Duration,
    plugin: &str,
    store: &Store<HostState>,
) -> Result<R, StageError> {
    let message = match result {
        Ok(Ok(r)) => return Ok(r),
        Ok(Err(trap)) => describe_trap(&trap, store),
        Err(_) => format!(
            "time budget exceeded: the call did not return within {backstop:?} (the wall-clock backstop: it was waiting, not computing)"
        ),
    };
    Err(StageError::Trap {
        plugin: plugin.to_string(),
        message,
    })
}

/// What a plugin answered about a message, before it is checked.
enum Answer {
    Decision(wit::Decision),
    Reply(agg::Reply),
}

/// Checks an aggregator's window results against the policy and the route.
pub fn validate_releases(
    list: Vec<agg::Release>,
    route: &RouteInfo,
    policy: &crate::policy::Policy,
) -> Result<Vec<Release>, String> {
    if list.len() > 100_000 {
        return Err(format!(
            "{} window results in one answer; at most 100,000",
            list.len()
        ));
    }
    let mut out = Vec::with_capacity(list.len());
    for r in list {
        check_window(&r.window)?;
        if r.messages.len() > policy.max_emit {
            return Err(format!(
                "window {:?} released {} messages, its policy allows {} (maxEmit)",
                r.window,
                r.messages.len(),
                policy.max_emit
            ));
        }
        let mut messages = Vec::with_capacity(r.messages.len());
        for e in r.messages {
            let payload = match e.payload {
                wit::Payload::Unchanged => {
                    return Err(format!(
                        "window {:?} released a message with payload `unchanged`, which has no incoming message to keep",
                        r.window
                    ));
                }
                wit::Payload::Replace(bytes) if bytes.len() > policy.max_payload => {
                    return Err(format!(
                        "payload of {} bytes is larger than its policy's maxPayload {}",
                        bytes.len(),
                        policy.max_payload
                    ));
                }
                wit::Payload::Replace(bytes) => Bytes::from(bytes),
            };
            let retain = match e.retain {
                Some(true) if !policy.may_change_retain => {
                    return Err(
                        "set the retain flag but its policy does not allow mayChangeRetain".into(),
                    );
                }
                r => r.unwrap_or(false),
            };
            messages.push(Emitted {
                topic: policy.confine(e.topic, &route.target_namespace)?,
                payload,
                qos: e.qos.map(from_wit_qos).unwrap_or(route.qos).min(route.qos),
                retain,
                properties: e.properties.map(from_wit_props).unwrap_or_default(),
            });
        }
        out.push(Release {
            window: r.window,
            messages,
        });
    }
    Ok(out)
}

fn to_wit_qos(q: QoS) -> wit::Qos {
    match q {
        QoS::AtMostOnce => wit::Qos::AtMostOnce,
        QoS::AtLeastOnce => wit::Qos::AtLeastOnce,
        QoS::ExactlyOnce => wit::Qos::ExactlyOnce,
    }
}

fn from_wit_qos(q: wit::Qos) -> QoS {
    match q {
        wit::Qos::AtMostOnce => QoS::AtMostOnce,
        wit::Qos::AtLeastOnce => QoS::AtLeastOnce,
        wit::Qos::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn to_wit_props(p: &Properties) -> wit::Properties {
    wit::Properties {
        payload_format: p.payload_format,
        message_expiry: p.message_expiry,
        content_type: p.content_type.clone(),
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.as_ref().map(|b| b.to_vec()),
        user_properties: p.user_properties.clone(),
    }
}

fn from_wit_props(p: wit::Properties) -> Properties {
    Properties {
        payload_format: p.payload_format,
        message_expiry: p.message_expiry,
        content_type: p.content_type,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data.map(Bytes::from),
        user_properties: p.user_properties,
    }
}

fn to_wit(m: &Message) -> wit::Message {
    wit::Message {
        topic: m.topic.to_string(),
        payload: m.payload.to_vec(),
        qos: to_wit_qos(m.qos),
        retain: m.retain,
        properties: to_wit_props(&m.properties),
    }
}

/// Checks a decision against the policy and the route, and resolves it into messages.
/// `msg` is the stage's input (its payload is reused for `unchanged`); emitted topics are
/// checked against the route's target namespace.
pub fn validate(
    decision: wit::Decision,
    msg: &Message,
    route: &RouteInfo,
    policy: &crate::policy::Policy,
) -> Result<Outcome, String> {
    let emitted = match decision {
        wit::Decision::Pass => return Ok(Outcome::Pass),
        wit::Decision::Drop(reason) => return Ok(Outcome::Drop(reason)),
        wit::Decision::Emit(list) => list,
    };
    if emitted.len() > policy.max_emit {
        return Err(format!(
            "emitted {} messages, its policy allows {} per input (maxEmit)",
            emitted.len(),
            policy.max_emit
        ));
    }
    let mut out = Vec::with_capacity(emitted.len());
    for e in emitted {
        let topic = policy.confine(e.topic, &route.target_namespace)?;
        let payload = match e.payload {
            wit::Payload::Unchanged => msg.payload.clone(),
            wit::Payload::Replace(bytes) => {
                if bytes.len() > policy.max_payload {
                    return Err(format!(
                        "payload of {} bytes is larger than its policy's maxPayload {}",
                        bytes.len(),
                        policy.max_payload
                    ));
                }
                Bytes::from(bytes)
            }
        };
        // `none` keeps the QoS the message came with (at most the route's, by then).
        let qos = match e.qos.map(from_wit_qos) {
            None => msg.qos,
            Some(q) if q == msg.qos => q,
            Some(q) if !policy.may_change_qos => {
                return Err(format!(
                    "set QoS {} but its policy does not allow mayChangeQos",
                    q.as_u8()
                ));
            }
            Some(q) => q.min(route.qos),
        };
        let retain = match e.retain {
            None => msg.retain,
            Some(r) if r == msg.retain => r,
            Some(_) if !policy.may_change_retain => {
                return Err(
                    "changed the retain flag but its policy does not allow mayChangeRetain".into(),
                );
            }
            Some(r) => r,
        };
        out.push(Emitted {
            topic,
            payload,
            qos,
            retain,
            properties: e
                .properties
                .map(from_wit_props)
                .unwrap_or_else(|| (*msg.properties).clone()),
        });
    }
    Ok(Outcome::Emit(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Props;
    use crate::policy::Policy;

    fn route() -> RouteInfo {
        RouteInfo {
            name: "r".into(),
            direction: Direction::LocalToRemote,
            source: "factory/#".into(),
            qos: QoS::AtLeastOnce,
            target_namespace: "site".into(),
        }
    }

    fn msg() -> Message {
        Message {
            topic: "factory/a".into(),
            payload: Bytes::from_static(b"payload"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Props::default(),
        }
    }

    fn emit(topic: &str) -> wit::Emitted {
        wit::Emitted {
            topic: topic.into(),
            payload: wit::Payload::Unchanged,
            qos: None,
            retain: None,
            properties: None,
        }
    }

    #[test]
    fn an_unchanged_payload_is_the_input_buffer_not_a_copy() {
        let m = msg();
        let out = validate(
            wit::Decision::Emit(vec![emit("site/x")]),
            &m,
            &route(),
            &Policy::default_for("p"),
        )
        .unwrap();
        let Outcome::Emit(v) = out else { panic!() };
        assert_eq!(v[0].payload.as_ptr(), m.payload.as_ptr());
        assert_eq!(v[0].topic.as_str(), "site/x");
    }

    #[test]
    fn topics_outside_the_policy_wildcards_and_fan_out_are_refused() {
        let p = Policy::default_for("p");
        let r = route();
        let e = validate(wit::Decision::Emit(vec![emit("elsewhere")]), &msg(), &r, &p).unwrap_err();
        assert!(e.contains("outside what its policy allows"), "{e}");
        let e = validate(wit::Decision::Emit(vec![emit("site/+")]), &msg(), &r, &p).unwrap_err();
        assert!(e.contains("wildcard"), "{e}");
        let many = (0..9).map(|_| emit("site")).collect();
        let e = validate(wit::Decision::Emit(many), &msg(), &r, &p).unwrap_err();
        assert!(e.contains("maxEmit"), "{e}");
    }

    #[test]
    fn qos_and_retain_changes_need_the_policy_and_qos_is_clamped() {
        let r = route();
        let mut e = emit("site");
        e.qos = Some(wit::Qos::ExactlyOnce);
        assert!(
            validate(
                wit::Decision::Emit(vec![e.clone()]),
                &msg(),
                &r,
                &Policy::default_for("p")
            )
            .is_err()
        );
        let mut p = Policy::default_for("p");
        p.may_change_qos = true;
        let Outcome::Emit(v) = validate(wit::Decision::Emit(vec![e]), &msg(), &r, &p).unwrap()
        else {
            panic!()
        };
        assert_eq!(v[0].qos, QoS::AtLeastOnce, "never above the route's QoS");
        let mut e = emit("site");
        e.retain = Some(true);
        assert!(validate(wit::Decision::Emit(vec![e]), &msg(), &r, &p).is_err());
    }
}
