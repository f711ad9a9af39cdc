//! # edgebridge
//!
//! An MQTT bridge host: it reads the `MqttBridgeConnector` / `MqttBridgeTopicMap` YAML that
//! users of the Azure IoT MQ bridge already have, keeps sessions to a local and a remote
//! broker, and forwards messages along the configured routes with at-least-once delivery
//! end to end (a source message is acknowledged only after the target acknowledged it).
//!
//! # Layout
//!
//! - [`config`]: YAML → validated [`config::Config`], every problem reported with file and line.
//! - [`topic`]: topic and filter validation and matching (pure).
//! - [`model`]: [`model::Message`], [`model::QoS`], MQTT 5 properties.
//! - [`routing`]: which route clients an instance runs, topic mapping, loop prevention (pure).
//! - [`pipeline`]: what a route does to one message: filter, loop guard, plugin stages, QoS
//!   ceiling, topic map (no I/O).
//! - [`delivery`]: the sans-I/O ledger that acknowledges a source message once the target
//!   acknowledged every copy.
//! - [`mqtt`]: the client side of MQTT — codec, sans-I/O session [`mqtt::state`],
//!   transports, and [`mqtt::link`], one connection's I/O as explicit phases, polled by its
//!   owner. Knows nothing about routes.
//! - [`route_client`]: the one task of a route client: two links, the pipeline and the
//!   ledger in one loop.
//! - [`sources`]: where the configuration comes from (files, the Kubernetes API), each
//!   feeding the supervisor.
//! - [`plan`]: the control plane's decision, pure: which route clients start, restart, stop
//!   or keep running when the configuration changes.
//! - [`bridge`]: the only module that wires sessions to routes to plugins; the supervisor that
//!   applies a [`plan`], and stops route clients.
//! - [`counters`]: the live counters (relaxed atomics); [`metrics`] (Prometheus),
//!   [`status`] (health, readiness, `/status`) and [`http`] (the endpoint) read them;
//!   [`http_client`] is a small GET client (identity tokens, `edgebridge status`);
//!   [`reload`] says when to reload the configuration.
//! - [`plugin`]: the WebAssembly runtime; [`policy`]: what each plugin may do (pure).
//! - [`credentials`]: user/password, Kubernetes SAT and managed-identity tokens for CONNECT.
//! - [`embedded`]: an in-process broker for `embedded://` endpoints.
//! - [`kubernetes`]: the Kubernetes API as a configuration source, and the resources' status.
//! - [`spool`]: store and forward, a durable bounded log per route client.
//! - [`logging`]: log lines through a bounded queue; dropped, never blocking forwarding.
//! - [`secret`]: values that never print; [`error`]: printing an error with its causes.
//! - [`tools`]: the `pub` / `sub` / `plugin test` / `plugins list` commands.
//!
//! # Example
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let config = edgebridge::config::load(
//!     &["examples/quickstart.yaml".into()],
//!     &edgebridge::config::LoadOptions::default(),
//! )?;
//! edgebridge::bridge::run(&config, None, &Default::default(), async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod bridge;
pub mod config;
pub mod counters;
pub mod credentials;
pub mod delivery;
pub mod embedded;
pub mod error;
pub mod http;
pub mod http_client;
pub mod kubernetes;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod mqtt;
pub mod pipeline;
pub mod plan;
pub mod plugin;
pub mod policy;
pub mod reload;
pub mod route_client;
pub mod routing;
pub mod scheduling;
pub mod secret;
pub mod sources;
pub mod spool;
pub mod status;
pub mod tools;
pub mod topic;
