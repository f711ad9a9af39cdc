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
//! - [`routing`]: which clients an instance runs, topic mapping, loop prevention (pure).
//! - [`mqtt`]: client sessions — codec adapter, sans-I/O [`mqtt::state`], transports, the I/O
//!   driver [`mqtt::session`]. Knows nothing about routes.
//! - [`bridge`]: the only module that wires sessions to routes; owns the tasks and shutdown.
//! - [`credentials`]: user/password, Kubernetes SAT and managed-identity tokens for CONNECT.
//! - [`embedded`]: an in-process broker for `embedded://` endpoints.
//! - [`policy`]: what each plugin may do (pure).
//! - [`secret`]: values that never print.
//! - [`error`]: printing an error with its causes.
//! - [`tools`]: the `pub` / `sub` test clients of the command line.
//!
//! # Example
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let config = edgebridge::config::load(
//!     &["examples/quickstart.yaml".into()],
//!     &edgebridge::config::LoadOptions::default(),
//! )?;
//! edgebridge::bridge::run(&config, &Default::default(), async {
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
pub mod model;
pub mod mqtt;
pub mod pipeline;
pub mod plugin;
pub mod policy;
pub mod route_client;
pub mod routing;
pub mod secret;
pub mod tools;
pub mod topic;
