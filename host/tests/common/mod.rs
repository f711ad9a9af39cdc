//! Helpers shared by the binary's test files (each file is a crate of its own; not every one
//! uses every helper).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

mod ports;
#[allow(unused_imports)] // not every test file asks for ports
pub use ports::free_port;
