//! The validation of a plugin's decision: whatever a plugin returns, what comes out is within
//! its policy (topic valid and allowed, fan-out, payload size, QoS never above the route's)
//! or an error; never a panic.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use edgebridge::config::Direction;
use edgebridge::model::{Message, QoS};
use edgebridge::plugin::bindings::types as wit;
use edgebridge::plugin::stage::{Outcome, RouteInfo, validate};
use edgebridge::policy::Policy;
use libfuzzer_sys::fuzz_target;

fn qos(u: &mut Unstructured) -> arbitrary::Result<wit::Qos> {
    Ok(match u.int_in_range(0..=2)? {
        0 => wit::Qos::AtMostOnce,
        1 => wit::Qos::AtLeastOnce,
        _ => wit::Qos::ExactlyOnce,
    })
}

fn emitted(u: &mut Unstructured) -> arbitrary::Result<wit::Emitted> {
    Ok(wit::Emitted {
        topic: String::arbitrary(u)?,
        payload: if bool::arbitrary(u)? {
            wit::Payload::Unchanged
        } else {
            wit::Payload::Replace(Vec::arbitrary(u)?)
        },
        qos: if bool::arbitrary(u)? {
            Some(qos(u)?)
        } else {
            None
        },
        retain: Option::arbitrary(u)?,
        properties: None,
    })
}

fn decision(u: &mut Unstructured) -> arbitrary::Result<wit::Decision> {
    Ok(match u.int_in_range(0..=2)? {
        0 => wit::Decision::Pass,
        1 => wit::Decision::Drop(String::arbitrary(u)?),
        _ => {
            let n = u.int_in_range(0..=12)?;
            wit::Decision::Emit((0..n).map(|_| emitted(u)).collect::<Result<_, _>>()?)
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(d) = decision(&mut u) else { return };
    let mut policy = Policy::default_for("p");
    policy.max_payload = 64;
    policy.may_change_qos = u.arbitrary().unwrap_or(false);
    let route = RouteInfo {
        name: "r".into(),
        direction: Direction::LocalToRemote,
        source: "a/#".into(),
        qos: QoS::AtLeastOnce,
        target_namespace: "site".into(),
    };
    let msg = Message {
        topic: "a/b".into(),
        payload: bytes::Bytes::from_static(b"in"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Default::default(),
    };
    if let Ok(Outcome::Emit(list)) = validate(d, &msg, &route, &policy) {
        assert!(list.len() <= policy.max_emit);
        for e in list {
            let t = e.topic.as_str();
            assert!(edgebridge::topic::validate_name(t).is_ok(), "{t:?}");
            assert!(t == "site" || t.starts_with("site/"), "{t:?}");
            assert!(e.qos <= route.qos);
            assert!(e.payload.len() <= policy.max_payload || e.payload == msg.payload);
        }
    }
});
