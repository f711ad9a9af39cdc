//! The configuration loader over arbitrary text: it returns a configuration or a report of
//! problems, never panics, and stays within its bounds (alias expansion, depth).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let opts = edgebridge::config::LoadOptions::default();
    let result =
        edgebridge::config::parse::parse_sources(&[(std::path::Path::new("f.yaml"), text)], &opts);
    if let Err(report) = result {
        // Every problem names its file.
        for e in &report.errors {
            assert!(e.to_string().starts_with("f.yaml"), "{e}");
        }
    }
});
