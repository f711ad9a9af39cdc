//! Topic names and filters: validation never panics, and the byte-level matcher agrees with
//! the specification's level-by-level definition on every valid pair.
#![no_main]

use edgebridge::topic::{matches, matches_by_definition, validate_filter, validate_name};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|pair: (&str, &str)| {
    let (filter, topic) = pair;
    if validate_filter(filter).is_ok() && validate_name(topic).is_ok() {
        assert_eq!(
            matches(filter, topic),
            matches_by_definition(filter, topic),
            "{filter:?} {topic:?}"
        );
    }
});
