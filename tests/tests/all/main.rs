//! The integration suite, compiled into one test binary (one link, shared harness).

mod aggregate;
mod auth;
mod config;
mod connectivity;
mod e2e;
mod faults;
mod kubernetes;
mod operate;
mod plugins;
mod spool;
