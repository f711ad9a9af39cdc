//! Routes as pure logic: which clients an instance runs, what they subscribe to, how a source
//! topic becomes a target topic, and loop prevention. No sockets, no tasks.

use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::{Duration, Instant};

use crate::config::{Connector, Direction, Route};
use crate::model::Message;
use crate::topic;

/// Which broker of a connector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The local (edge) broker.
    Local,
    /// The remote (cloud) broker.
    Remote,
}

impl Side {
    /// `local` or `remote`.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Local => "local",
            Side::Remote => "remote",
        }
    }
}

/// A route client: one subscriber/publisher pair of a route (a route has one, or one per
/// shared-subscription client), the unit this instance runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteClient {
    /// The route.
    pub route: Route,
    /// Index among the route's shared-subscription clients, if it has them.
    pub share_index: Option<u32>,
    /// Client ID used on both brokers (`{clientIdPrefix}-{routeName}`, plus `-{i}` for shared).
    pub client_id: String,
    /// Broker subscribed to.
    pub source: Side,
    /// Broker published to.
    pub target: Side,
    /// The filter subscribed to (`$share/{group}/{source}` for shared routes).
    pub subscription: String,
}

/// `{clientIdPrefix}-{routeName}` as the source documents describe; a prefix that already
/// ends in `-` is not doubled (their example `client-` gives `client-route1`).
pub fn client_id(prefix: &str, route: &str) -> String {
    if prefix.is_empty() || prefix.ends_with('-') {
        format!("{prefix}{route}")
    } else {
        format!("{prefix}-{route}")
    }
}

fn stable_hash(s: &str) -> u64 {
    // FNV-1a: stable across processes, versions and platforms (DefaultHasher is not).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The route clients instance `index` of `count` runs. Across all `count` instances every route's
/// clients appear exactly once: a plain route goes to one instance chosen by a stable hash of
/// its name; the N clients of a shared-subscription route are dealt round-robin from that
/// instance on, so every instance takes its share of them.
pub fn plan(connector: &Connector, index: u32, count: u32) -> Vec<RouteClient> {
    let count = count.max(1);
    let mut pipes = Vec::new();
    for route in &connector.routes {
        let (source, target) = match route.direction {
            Direction::LocalToRemote => (Side::Local, Side::Remote),
            Direction::RemoteToLocal => (Side::Remote, Side::Local),
        };
        let home = (stable_hash(&route.name) % count as u64) as u32;
        let base_id = client_id(&connector.client_id_prefix, &route.name);
        match &route.shared {
            None => {
                if home == index {
                    pipes.push(RouteClient {
                        route: route.clone(),
                        share_index: None,
                        client_id: base_id,
                        source,
                        target,
                        subscription: route.source.clone(),
                    });
                }
            }
            Some(shared) => {
                for i in 0..shared.clients {
                    if (home + i) % count == index {
                        pipes.push(RouteClient {
                            route: route.clone(),
                            share_index: Some(i),
                            client_id: format!("{base_id}-{i}"),
                            source,
                            target,
                            subscription: topic::shared_filter(&shared.group, &route.source),
                        });
                    }
                }
            }
        }
    }
    pipes
}

/// The topic a message from `source_topic` is published to on the target broker.
pub fn target_topic<'a>(route: &'a Route, source_topic: &'a str) -> &'a str {
    route.target.as_deref().unwrap_or(source_topic)
}

/// The instance ordinal at the end of a StatefulSet-style host name (`my-bridge-2` → 2).
pub fn ordinal_from_hostname(host: &str) -> Option<u32> {
    host.rsplit_once('-').and_then(|(_, n)| n.parse().ok())
}

/// User property the bridge adds to every message it forwards on MQTT 5, one entry per
/// bridge the message went through.
pub const VIA_PROPERTY: &str = "edgebridge-via";
/// A message that crossed this many bridges is dropped as a loop even if none is us.
pub const MAX_HOPS: usize = 8;

/// Why the loop guard stopped a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopVerdict {
    /// Forward it.
    Forward,
    /// It carries our own mark (MQTT 5) or matches what we just published there (3.1.1).
    OwnEcho,
    /// It crossed [`MAX_HOPS`] bridges.
    TooManyHops,
}

/// MQTT 5 loop check of a message received by the bridge `id` (stateless, no lock needed).
pub fn check_via(id: &str, msg: &Message) -> LoopVerdict {
    let mut hops = 0;
    for (k, v) in &msg.properties.user_properties {
        if k == VIA_PROPERTY {
            if v == id {
                return LoopVerdict::OwnEcho;
            }
            hops += 1;
        }
    }
    if hops >= MAX_HOPS {
        LoopVerdict::TooManyHops
    } else {
        LoopVerdict::Forward
    }
}

/// MQTT 3.1.1 loop prevention.
///
/// (MQTT 5 needs no state: every forwarded message gets a `edgebridge-via: <bridge id>` user
/// property, stamped by the target session's encoder, and [`check_via`] drops a message that
/// already carries our id. This also stops loops through other edgebridge instances with other
/// ids, each adding its own, bounded by [`MAX_HOPS`].)
///
/// MQTT 3.1.1 has no properties: the guard remembers (broker, topic, payload hash) of what the
/// bridge published in the last `window`, and drops one matching message arriving from that
/// broker within the window. A genuine identical message published within the window on a
/// topic that a route also forwards back is dropped too: that is the price of 3.1.1.
#[derive(Debug)]
pub struct LoopGuard {
    window: Duration,
    recent: HashMap<(Side, u64), u32>,
    order: VecDeque<(Instant, Side, u64)>,
    capacity: usize,
}

impl LoopGuard {
    /// A guard remembering at most `capacity` messages for `window`.
    pub fn new(window: Duration, capacity: usize) -> LoopGuard {
        LoopGuard {
            window,
            recent: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    fn key(topic: &str, payload: &[u8]) -> u64 {
        let mut h = DefaultHasher::new();
        topic.hash(&mut h);
        payload.hash(&mut h);
        h.finish()
    }

    fn expire(&mut self, now: Instant) {
        while let Some((t, side, key)) = self.order.front().copied() {
            if now.duration_since(t) < self.window && self.order.len() <= self.capacity {
                break;
            }
            self.order.pop_front();
            if let Some(n) = self.recent.get_mut(&(side, key)) {
                *n -= 1;
                if *n == 0 {
                    self.recent.remove(&(side, key));
                }
            }
        }
    }

    /// Checks a message received from `from`.
    pub fn check(&mut self, from: Side, msg: &Message, now: Instant) -> LoopVerdict {
        self.expire(now);
        let key = (from, Self::key(&msg.topic, &msg.payload));
        match self.recent.get_mut(&key) {
            Some(n) => {
                *n -= 1;
                if *n == 0 {
                    self.recent.remove(&key);
                }
                LoopVerdict::OwnEcho
            }
            None => LoopVerdict::Forward,
        }
    }

    /// Marks a message about to be published to `to`.
    pub fn mark(&mut self, to: Side, msg: &Message, now: Instant) {
        self.expire(now);
        let key = Self::key(&msg.topic, &msg.payload);
        *self.recent.entry((to, key)).or_insert(0) += 1;
        self.order.push_back((now, to, key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{SharedSubscription, parse};
    use crate::model::QoS;
    use bytes::Bytes;

    fn connector(routes: Vec<Route>) -> Connector {
        let conn = crate::config::BrokerConnection {
            endpoint: parse::parse_endpoint("127.0.0.1:1883").unwrap(),
            transport: crate::config::Transport::Mqtt,
            tls: None,
            auth: crate::config::Auth::Anonymous,
            reach: Default::default(),
            embedded_log: None,
        };
        Connector {
            name: "b".into(),
            namespace: None,
            origin: crate::config::Origin {
                file: "x".into(),
                line: 1,
            },
            protocol: crate::config::Protocol::V5,
            bridge_instances: 1,
            client_id_prefix: "client-".into(),
            log_level: crate::config::LogLevel::Info,
            remote: conn.clone(),
            local: conn,
            routes,
            spool: None,
        }
    }

    fn route(name: &str, shared: Option<u32>) -> Route {
        Route {
            name: name.into(),
            topic_map: "m".into(),
            direction: Direction::LocalToRemote,
            qos: QoS::AtLeastOnce,
            source: "a/#".into(),
            target: None,
            shared: shared.map(|n| SharedSubscription {
                clients: n,
                group: "g".into(),
            }),
            plugins: vec![],
            on_plugin_error: Default::default(),
            spool: None,
            origin: crate::config::Origin {
                file: "x".into(),
                line: 1,
            },
        }
    }

    #[test]
    fn client_ids_follow_the_documented_format() {
        assert_eq!(client_id("client-", "route1"), "client-route1");
        assert_eq!(client_id("e4k", "route1"), "e4k-route1");
        assert_eq!(client_id("", "route1"), "route1");
    }

    #[test]
    fn a_shared_route_gets_n_clients_on_the_share_filter() {
        let c = connector(vec![route("r", Some(3))]);
        let pipes = plan(&c, 0, 1);
        assert_eq!(pipes.len(), 3);
        let ids: Vec<&str> = pipes.iter().map(|p| p.client_id.as_str()).collect();
        assert_eq!(ids, ["client-r-0", "client-r-1", "client-r-2"]);
        assert!(pipes.iter().all(|p| p.subscription == "$share/g/a/#"));
    }

    #[test]
    fn instances_split_every_client_exactly_once() {
        let routes: Vec<Route> = (0..20)
            .map(|i| route(&format!("route{i}"), (i % 4 == 0).then_some(3)))
            .collect();
        let c = connector(routes);
        let total_single = plan(&c, 0, 1).len();
        for count in 1..5 {
            let mut all: Vec<String> = (0..count)
                .flat_map(|i| plan(&c, i, count))
                .map(|p| p.client_id)
                .collect();
            let n = all.len();
            all.sort();
            all.dedup();
            assert_eq!(all.len(), n, "no client twice");
            assert_eq!(n, total_single, "every client once with {count} instances");
            if count > 1 {
                assert!((0..count).all(|i| !plan(&c, i, count).is_empty()));
            }
        }
    }

    #[test]
    fn hostname_ordinals_are_read() {
        assert_eq!(ordinal_from_hostname("azedge-my-mqtt-bridge-2"), Some(2));
        assert_eq!(ordinal_from_hostname("laptop"), None);
    }

    fn msg() -> Message {
        Message {
            topic: "a/b".into(),
            payload: Bytes::from_static(b"p"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Default::default(),
        }
    }

    #[test]
    fn a_v5_message_marked_by_us_is_an_echo() {
        let mut m = msg();
        assert_eq!(check_via("me", &m), LoopVerdict::Forward);
        m.properties
            .user_properties
            .push((VIA_PROPERTY.into(), "me".into()));
        assert_eq!(check_via("me", &m), LoopVerdict::OwnEcho);
        assert_eq!(check_via("other", &m), LoopVerdict::Forward);
    }

    #[test]
    fn a_v5_message_through_too_many_bridges_is_dropped() {
        let mut m = msg();
        for i in 0..MAX_HOPS {
            m.properties
                .user_properties
                .push((VIA_PROPERTY.into(), format!("b{i}")));
        }
        assert_eq!(check_via("me", &m), LoopVerdict::TooManyHops);
    }

    #[test]
    fn a_v3_echo_is_dropped_once_within_the_window() {
        let mut g = LoopGuard::new(Duration::from_secs(5), 100);
        let now = Instant::now();
        let m = msg();
        g.mark(Side::Remote, &m, now);
        assert_eq!(g.check(Side::Local, &m, now), LoopVerdict::Forward);
        assert_eq!(g.check(Side::Remote, &m, now), LoopVerdict::OwnEcho);
        assert_eq!(g.check(Side::Remote, &m, now), LoopVerdict::Forward);
        g.mark(Side::Remote, &m, now);
        let later = now + Duration::from_secs(6);
        assert_eq!(g.check(Side::Remote, &m, later), LoopVerdict::Forward);
    }
}
