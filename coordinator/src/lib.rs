//! Commons coordinator: job planning, training rounds, placement, routing, recovery,
//! verification, aggregation, coalition authorisation and rate limits, as
//! pure state machines.
//!
//! Like [`commons_protocol`], this crate performs no I/O: time and randomness
//! are passed in, outputs are drained by the caller. The node drives it over
//! the network and the simulator drives the very same code under churn. The
//! workspace's purity test keeps tokio, libp2p and candle out of it.

pub mod job;
pub mod placement;
pub mod quota;
pub mod routing;
pub mod train;
pub mod trust;
pub mod verify;

pub use commons_protocol as protocol;
