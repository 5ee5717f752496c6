//! Commons coordinator: job planning, placement, routing, recovery,
//! verification and aggregation, as pure state machines.
//!
//! Like [`commons_protocol`], this crate performs no I/O: time and randomness
//! are passed in, outputs are drained by the caller. The node drives it over
//! the network and the simulator drives the very same code under churn.
//!
//! The planner and job state machine arrive with pipelined jobs; today the
//! crate pins down the boundary (no tokio, libp2p or candle, checked by the
//! workspace's purity test).

pub use commons_protocol as protocol;
