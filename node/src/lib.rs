//! The Commons node: the `commons` binary's command line, settings and
//! identity handling, and (as they land) the libp2p swarm, the candle executor
//! and the control API.

pub mod cli;
pub mod executor;
pub mod identity;
pub mod run_local;
pub mod settings;
