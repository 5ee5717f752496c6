//! The Commons node: the `commons` binary's command line, settings and
//! identity handling, and (as they land) the libp2p swarm, the candle executor
//! and the control API.

pub mod audit;
pub mod capacity;
pub mod cli;
pub mod coalition;
pub mod control;
pub mod coordinate;
pub mod demo;
pub mod executor;
pub mod fault;
pub mod identity;
pub mod job_cli;
pub mod jobstore;
pub mod join;
pub mod network;
pub mod openai;
pub mod run_local;
pub mod settings;
pub mod sim_cli;
pub mod train_cli;
pub mod train_config;
pub mod train_exec;
pub mod train_export;
pub mod train_pipe;

/// Fixes the size of candle's and rayon's compute pools before any thread
/// starts. Unless `RAYON_NUM_THREADS` is set, candle 0.11 works the size out
/// again for every operation by reading `/proc/cpuinfo` (about 5% of a decode
/// step), and counts physical cores only; setting it once to the threads this
/// process may use avoids both.
pub fn pin_compute_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        // SAFETY: called first thing in `main`, before any other thread exists,
        // so nothing can read the environment concurrently.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
    }
}
