//! The host's bindings of `wit/plugin.wit`: one `bindgen!` per world, the second reusing the
//! first's types and imports so each host interface is implemented once.

#![allow(missing_docs)]

/// The `route-mapper` world (and the shared `types`, `log`, `clock`, `kv` interfaces).
pub mod mapper {
    wasmtime::component::bindgen!({
        world: "route-mapper",
        path: "../wit",
        exports: { default: async },
    });
}

/// The `message-filter` world.
pub mod filter {
    wasmtime::component::bindgen!({
        world: "message-filter",
        path: "../wit",
        exports: { default: async },
        with: {
            "edgebridge:plugin/types": super::mapper::edgebridge::plugin::types,
            "edgebridge:plugin/log": super::mapper::edgebridge::plugin::log,
            "edgebridge:plugin/clock": super::mapper::edgebridge::plugin::clock,
            "edgebridge:plugin/kv": super::mapper::edgebridge::plugin::kv,
        },
    });
}

pub use mapper::edgebridge::plugin::types;

/// The `aggregator` world of `edgebridge:plugin@0.2.0`: the 0.1.0 types and its `log` and
/// `clock` reused (one host implementation serves both versions), and the new `timers`,
/// `metrics` and `state` interfaces.
pub mod aggregator {
    wasmtime::component::bindgen!({
        world: "route-aggregator",
        path: "../wit/v0.2",
        exports: { default: async },
        with: {
            "edgebridge:plugin/types@0.1.0": super::mapper::edgebridge::plugin::types,
            "edgebridge:plugin/log@0.1.0": super::mapper::edgebridge::plugin::log,
            "edgebridge:plugin/clock@0.1.0": super::mapper::edgebridge::plugin::clock,
        },
    });
}
