//! Commons simulator: a deterministic discrete-event simulation of a swarm
//! under churn that drives the real coordinator. Reproducible by seed.
//!
//! - [`scenario`]: the world to simulate, from TOML.
//! - [`dist`]: session, downtime and capacity distributions (exponential,
//!   Weibull, log-normal, Pareto, mixtures), with CDFs and means.
//! - [`world`]: the event loop. A virtual clock jumps from event to event (no
//!   fixed tick); nodes join, choose their span with the coordinator's own
//!   placement, serve units through the coordinator's own job scheduler (spot
//!   checks included), and leave or crash; adversaries corrupt results. Each
//!   subsystem draws from its own random stream derived from the seed, and
//!   every event feeds a blake3 hash of the run.
//! - [`executor`]: the stand-in model the simulated nodes run, whose outputs
//!   depend on each session's history, and how adversaries corrupt them.
//! - [`report`]: the time series as CSV and the summary as JSON.

pub mod dist;
pub mod executor;
pub mod report;
pub mod scenario;
pub mod world;

pub use commons_coordinator as coordinator;
pub use scenario::Scenario;
pub use world::{Adversary, Report, Row, Simulation};

/// Runs `scenario` from `seed`.
#[must_use]
pub fn run(scenario: Scenario, seed: u64, keep_log: bool) -> Report {
    Simulation::new(scenario, seed, keep_log).run()
}
