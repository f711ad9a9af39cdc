//! The MQTT decoder and the session state over arbitrary bytes from a broker, on both
//! protocol versions: packets decode or fail with an error (never a panic, never more memory
//! than the maximum packet size), and whatever decodes is handled by the session state, whose
//! answers encode.
#![no_main]

use bytes::BytesMut;
use edgebridge::mqtt::codec::{self, ConnAckInfo, SubFilter, Version};
use edgebridge::mqtt::state::{SessionState, Writer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for version in [Version::V4, Version::V5] {
        let mut state = SessionState::new(
            vec![SubFilter {
                filter: "a/#".into(),
                qos: edgebridge::model::QoS::AtLeastOnce,
            }],
            8,
        );
        let _ = state.on_connack(&ConnAckInfo::default());
        let mut buf = BytesMut::from(data);
        while let Ok(Some(packet)) = codec::decode(version, &mut buf, 4096) {
            if state.on_incoming(packet).is_err() {
                break;
            }
        }
        let mut events = Vec::new();
        state.swap_events(&mut events);
        for ev in events {
            if let edgebridge::mqtt::StateEvent::Message { ack: Some(ack), .. } = ev {
                state.ack(ack);
            }
        }
        let mut out = edgebridge::mqtt::outbuf::OutBuf::default();
        let _ = state.write_outgoing(&mut Writer {
            version,
            buf: &mut out,
            share_from: edgebridge::mqtt::outbuf::SHARE_FROM,
            high_water: 1 << 20,
            stamp: None,
            base: 0,
            qos0: &mut Default::default(),
            ping_end: &mut None,
        });
    }
});
