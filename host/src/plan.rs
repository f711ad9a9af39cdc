//! The control plane's decision, pure: given the route clients that run and the ones the
//! configuration wants, which start, restart, stop or keep running. Sources (files, a
//! ConfigMap folder, Kubernetes) produce a [`Config`](crate::config::Config); [`plan`] compares;
//! the supervisor ([`crate::bridge::RunningBridge::reload`]) applies.
//!
//! Identity is derived, not listed: a route client keeps running when its whole plan and its
//! connector's whole connection are equal, field by field through `PartialEq`, except for what
//! only says where they were written (file, line, topic map, namespace) and the log level. A
//! field added to the configuration later is compared without anyone remembering to.

use crate::config::{Connector, LogLevel, Origin};
use crate::routing::RouteClient;

/// What a route client of the wanted configuration does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// New: start it.
    Start,
    /// It runs, but differently: stop the old one, then start this one under the same client
    /// ID; `unsubscribe` lists the filters its persistent source session should drop (the
    /// old subscription, when only the subscription changed on the same broker).
    Restart {
        /// Filters to UNSUBSCRIBE once.
        unsubscribe: Vec<String>,
    },
    /// It runs exactly like this: leave it alone.
    Keep,
}

/// The plan for one connector of the wanted configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectorPlan {
    /// Connector name.
    pub name: String,
    /// Its connection is the same as the running one's (credentials and loop state can be
    /// kept); false for a new connector or a changed connection.
    pub same_connection: bool,
    /// Its route clients in configuration order, each with what to do.
    pub clients: Vec<(RouteClient, Action)>,
    /// Client IDs that run and are no longer wanted.
    pub stop: Vec<String>,
}

/// The whole plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// One per wanted connector, in configuration order.
    pub connectors: Vec<ConnectorPlan>,
    /// Connectors that run and are no longer wanted, with their client IDs (all stop).
    pub removed: Vec<(String, Vec<String>)>,
}

impl Plan {
    /// Client IDs by what happens to them: (started, restarted, stopped, kept).
    pub fn summary(&self) -> (Vec<String>, Vec<String>, Vec<String>, usize) {
        let (mut start, mut restart, mut stop, mut keep) = (Vec::new(), Vec::new(), Vec::new(), 0);
        for c in &self.connectors {
            for (client, action) in &c.clients {
                match action {
                    Action::Start => start.push(client.client_id.clone()),
                    Action::Restart { .. } => restart.push(client.client_id.clone()),
                    Action::Keep => keep += 1,
                }
            }
            stop.extend(c.stop.iter().cloned());
        }
        for (_, ids) in &self.removed {
            stop.extend(ids.iter().cloned());
        }
        (start, restart, stop, keep)
    }
}

/// A connector as far as its connection goes: without its routes, and without what only says
/// where it was written or how much it logs.
pub fn connection_identity(c: &Connector) -> Connector {
    Connector {
        namespace: None,
        origin: Origin::default(),
        log_level: LogLevel::Info,
        routes: Vec::new(),
        ..c.clone()
    }
}

/// A route client as far as running it goes: without where its route was written.
pub fn client_identity(c: &RouteClient) -> RouteClient {
    let mut c = c.clone();
    c.route.origin = Origin::default();
    c.route.topic_map = String::new();
    c
}

/// Compares what runs (`running`: each connector with the route clients it runs) with what is
/// wanted (`wanted`: each connector of the new configuration with the route clients this
/// instance should run for it).
pub fn plan(
    running: &[(&Connector, Vec<&RouteClient>)],
    wanted: &[(&Connector, Vec<RouteClient>)],
) -> Plan {
    let mut out = Plan::default();
    for (connector, clients) in wanted {
        let now = running.iter().find(|(c, _)| c.name == connector.name);
        let same_connection =
            now.is_some_and(|(c, _)| connection_identity(c) == connection_identity(connector));
        let mut plan = ConnectorPlan {
            name: connector.name.clone(),
            same_connection,
            clients: Vec::new(),
            stop: Vec::new(),
        };
        let runs =
            |id: &str| now.and_then(|(_, list)| list.iter().find(|r| r.client_id == id).copied());
        for client in clients {
            let action = match runs(&client.client_id) {
                None => Action::Start,
                Some(old) if same_connection && client_identity(old) == client_identity(client) => {
                    Action::Keep
                }
                Some(old) => Action::Restart {
                    // A persistent source session keeps the old subscription unless told.
                    unsubscribe: (old.subscription != client.subscription
                        && old.source == client.source)
                        .then(|| old.subscription.clone())
                        .into_iter()
                        .collect(),
                },
            };
            plan.clients.push((client.clone(), action));
        }
        if let Some((_, list)) = now {
            for old in list {
                if !clients.iter().any(|c| c.client_id == old.client_id) {
                    plan.stop.push(old.client_id.clone());
                }
            }
        }
        out.connectors.push(plan);
    }
    for (connector, list) in running {
        if !wanted.iter().any(|(c, _)| c.name == connector.name) {
            out.removed.push((
                connector.name.clone(),
                list.iter().map(|c| c.client_id.clone()).collect(),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, LoadOptions, parse};
    use crate::routing;

    fn config(yaml: &str) -> Config {
        parse::parse_sources(
            &[(std::path::Path::new("t.yaml"), yaml)],
            &LoadOptions::default(),
        )
        .unwrap_or_else(|r| panic!("{r}"))
    }

    const CONNECTOR: &str = "apiVersion: mq.iotoperations.azure.com/v1beta1
kind: MqttBridgeConnector
metadata: {name: c}
spec:
  protocol: v5
  clientIdPrefix: edge-
  remoteBrokerConnection: {endpoint: \"remote:1883\", tls: {tlsEnabled: false}}
  localBrokerConnection: {endpoint: \"local:1883\", tls: {tlsEnabled: false}}
---
apiVersion: mq.iotoperations.azure.com/v1beta1
kind: MqttBridgeTopicMap
metadata: {name: m}
spec:
  mqttBridgeConnectorRef: c
  routes:
";

    fn with_routes(routes: &str) -> Config {
        config(&format!("{CONNECTOR}{routes}"))
    }

    fn clients(c: &Config) -> Vec<(&Connector, Vec<RouteClient>)> {
        c.connectors
            .iter()
            .map(|k| (k, routing::plan(k, 0, 1)))
            .collect()
    }

    /// Plans going from `before` to `after`.
    fn between(before: &Config, after: &Config) -> Plan {
        let running: Vec<(Connector, Vec<RouteClient>)> = clients(before)
            .into_iter()
            .map(|(c, l)| (c.clone(), l))
            .collect();
        let view: Vec<(&Connector, Vec<&RouteClient>)> = running
            .iter()
            .map(|(c, l)| (c, l.iter().collect()))
            .collect();
        plan(&view, &clients(after))
    }

    const TWO: &str = "    - {name: a, direction: local-to-remote, source: \"a/#\"}\n    - {name: b, direction: remote-to-local, source: \"b/#\"}\n";

    #[test]
    fn an_unchanged_configuration_keeps_everything() {
        let c = with_routes(TWO);
        let p = between(&c, &c);
        assert_eq!(p.summary(), (vec![], vec![], vec![], 2));
    }

    #[test]
    fn everything_starts_from_nothing() {
        let p = between(&Config::default(), &with_routes(TWO));
        assert_eq!(p.summary().0, vec!["edge-a", "edge-b"]);
        assert!(!p.connectors[0].same_connection);
    }

    #[test]
    fn a_changed_route_restarts_alone_and_a_removed_one_stops() {
        let before = with_routes(TWO);
        let after =
            with_routes("    - {name: a, direction: local-to-remote, source: \"a/#\", qos: 0}\n");
        let (start, restart, stop, keep) = between(&before, &after).summary();
        assert_eq!(
            (start, restart, stop, keep),
            (vec![], vec!["edge-a".into()], vec!["edge-b".into()], 0)
        );
    }

    #[test]
    fn moving_a_route_in_the_file_or_changing_the_log_level_restarts_nothing() {
        let before = with_routes(TWO);
        let after = config(
            &format!("{CONNECTOR}{TWO}")
                .replace("  protocol: v5\n", "  protocol: v5\n  logLevel: debug\n")
                .replace(
                    "metadata: {name: m}",
                    "metadata: {name: renamed-map}\n# a comment\n",
                ),
        );
        assert_eq!(
            between(&before, &after).summary(),
            (vec![], vec![], vec![], 2)
        );
    }

    #[test]
    fn a_changed_connection_restarts_every_route_of_the_connector() {
        let before = with_routes(TWO);
        let after = config(&format!("{CONNECTOR}{TWO}").replace("remote:1883", "remote:1884"));
        let p = between(&before, &after);
        assert!(!p.connectors[0].same_connection);
        assert_eq!(p.summary().1, vec!["edge-a", "edge-b"]);
    }

    #[test]
    fn every_field_of_a_route_counts_without_being_listed() {
        // Fields the old hand-written comparison listed, and ones it would have missed.
        let base = "    - {name: a, direction: local-to-remote, source: \"a/#\"}\n";
        for changed in [
            "    - {name: a, direction: local-to-remote, source: \"a/#\", target: x}\n",
            "    - {name: a, direction: local-to-remote, source: \"a/#\", onPluginError: pass}\n",
            "    - {name: a, direction: local-to-remote, source: \"a/#\", spool: {maxBytes: 1Mi}}\n",
            "    - {name: a, direction: local-to-remote, source: \"a/#\", sharedSubscription: {groupMinimumShareNumber: 1, groupName: g}}\n",
        ] {
            let p = between(&with_routes(base), &with_routes(changed));
            let (start, restart, stop, _) = p.summary();
            assert!(
                !restart.is_empty() || (!start.is_empty() && !stop.is_empty()),
                "{changed}: {:?}",
                p.summary()
            );
        }
    }

    #[test]
    fn a_new_subscription_on_the_same_broker_unsubscribes_the_old_one() {
        let before = with_routes("    - {name: a, direction: local-to-remote, source: \"a/#\"}\n");
        let after = with_routes("    - {name: a, direction: local-to-remote, source: \"z/#\"}\n");
        let p = between(&before, &after);
        assert_eq!(
            p.connectors[0].clients[0].1,
            Action::Restart {
                unsubscribe: vec!["a/#".into()]
            }
        );
        // The other direction subscribes on the other broker: nothing to unsubscribe there.
        let other = with_routes("    - {name: a, direction: remote-to-local, source: \"a/#\"}\n");
        assert_eq!(
            between(&before, &other).connectors[0].clients[0].1,
            Action::Restart {
                unsubscribe: vec![]
            }
        );
    }

    #[test]
    fn a_removed_connector_stops_all_its_route_clients() {
        let p = between(&with_routes(TWO), &Config::default());
        assert_eq!(
            p.removed,
            vec![("c".into(), vec!["edge-a".into(), "edge-b".into()])]
        );
    }
}
