//! Commons simulator: a deterministic discrete-event simulation of a swarm
//! under churn that drives the real coordinator. Reproducible by seed.
//!
//! The event queue, churn models and scenarios arrive with `commons sim run`.

pub use commons_coordinator as coordinator;
