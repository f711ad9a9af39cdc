//! One plugin in one route's chain: its live instance, the call under the policy's limits,
//! validation of what it returns, rebuild after a trap, and a circuit breaker.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use wasmtime::Store;

use std::sync::atomic::Ordering;

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
                    .map(|r| r.map(Some)),
                Instance::Filter(f) => f
                    .edgebridge_plugin_filter()
                    .call_keep(&mut live.store, ctx, &input)
                    .await
                    .map(|r| {
                        r.map(|keep| {
                            if keep {
                                Some(wit::Decision::Pass)
                            } else {
                                Some(wit::Decision::Drop("filtered out".into()))
                            }
                        })
                    }),
            }
        };
        let Ok(result) = tokio::time::timeout(backstop, call).await else {
            // The abandoned call leaves its instance unusable: the next call rebuilds it.
            self.live = None;
            return Err(StageError::Trap {
                plugin,
                message: format!(
                    "time budget exceeded: the call did not return within {backstop:?} (the wall-clock backstop: it was waiting, not computing)"
                ),
            });
        };
        match result {
            Err(trap) => {
                let message = describe_trap(&trap, &live.store);
                // A trapped instance cannot be entered again: the next call rebuilds it.
                self.live = None;
                Err(StageError::Trap { plugin, message })
            }
            Ok(Err(message)) => Err(StageError::Returned { plugin, message }),
            Ok(Ok(None)) => Ok(Outcome::Pass),
            Ok(Ok(Some(decision))) => {
                let policy = live.loaded.policy.clone();
                validate(decision, msg, &self.route, &policy)
                    .map_err(|message| StageError::Invalid { plugin, message })
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
        topic: m.topic.clone(),
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
                .unwrap_or_else(|| msg.properties.clone()),
        });
    }
    Ok(Outcome::Emit(out))
}

#[cfg(test)]
mod tests {
    use super::*;
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
            properties: Properties::default(),
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
