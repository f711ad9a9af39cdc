//! Loopback ports for the tests' brokers and bridges, shared by `host/tests/` and the
//! `edgebridge-tests` crate (which includes this file by path).
//!
//! Asking the kernel for port 0 hands out a port from the ephemeral range, the same range every
//! outgoing connection takes its source port from. A test that learns such a port and binds it
//! later (a bridge started after a two-minute plugin build) can find it taken by one of the
//! thousands of connections the tests and cargo open meanwhile: CI saw "embedded broker cannot
//! listen on 127.0.0.1:42789: Address already in use" that way. So the ports come from below the
//! ephemeral range, which the kernel never hands out on its own, each one handed out once per
//! process (a counter) from a start that differs between processes, and bound once to check it is
//! free now.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// How many ports below the ephemeral range are used.
const SPAN: u32 = 10_000;

/// The lowest port of the kernel's ephemeral range (Linux's default 32768 elsewhere).
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// A loopback port that is free now, outside the kernel's ephemeral range and not handed out
/// before by this process.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let low = ephemeral_low();
    if low < SPAN + 1_024 {
        // An unusual range leaves no room below it: fall back to the kernel's choice.
        return kernel_port();
    }
    let base = low - SPAN;
    // A start that differs between processes, so that two test binaries run side by side
    // (nextest, or a user's second `cargo test`) walk different stretches.
    let seed = std::process::id().wrapping_mul(2_654_435_761)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
    let _ = NEXT.compare_exchange(u32::MAX, seed % SPAN, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..SPAN {
        let port = base + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN;
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    kernel_port()
}

fn kernel_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a loopback port")
}
