//! Topic names and filters: validation never panics, and the byte-level matcher agrees with
//! the specification's level-by-level definition on every valid pair.
#![no_main]

use edgebridge::topic::{matches, validate_filter, validate_name};
use libfuzzer_sys::fuzz_target;

/// MQTT 5 §4.7, level by level.
fn reference(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let (mut f, mut t) = (filter.split('/'), topic.split('/'));
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

fuzz_target!(|pair: (&str, &str)| {
    let (filter, topic) = pair;
    if validate_filter(filter).is_ok() && validate_name(topic).is_ok() {
        assert_eq!(matches(filter, topic), reference(filter, topic), "{filter:?} {topic:?}");
    }
});
