//! How fast and how big the simulator runs: events per second, simulated days
//! per wall minute and peak memory, for swarms of 10³ to 10⁵ nodes.
//!
//! `bash scripts/bench-sim.sh` (or `cargo run --release -p commons-sim --example scale`).

use std::time::Instant;

use commons_sim::{Scenario, run};

fn scenario(nodes: u32, hours: f64, jobs_per_minute: f64) -> Scenario {
    // Arrivals that keep `nodes` online on average: λ = N / E[S] with E[S] = 4 h.
    let text = format!(
        r#"
name = "scale-{nodes}"
duration_s = {duration}
sample_every_s = 300
rebalance_every_s = 60
[population]
initial = {nodes}
arrivals_per_hour = {arrivals}
[churn]
session = {{ dist = "exponential", mean = 14400.0 }}
graceful_fraction = 0.5
[nodes]
tokens_per_s = {{ dist = "lognormal", mu = 7.0, sigma = 0.5 }}
memory_layers = {{ dist = "uniform", low = 6.0, high = 16.0 }}
[workload]
jobs_per_minute = {jobs_per_minute}
prompt_tokens = 40
max_tokens = 64
submitters = 64
"#,
        duration = hours * 3600.0,
        arrivals = f64::from(nodes) / 4.0,
    );
    match Scenario::from_toml(&text) {
        Ok(s) => s,
        Err(e) => panic!("the bench's scenario is invalid: {e}"),
    }
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let threads = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "{cpu}, {threads} threads, {} {}",
        std::env::consts::OS,
        std::env::consts::ARCH
    )
}

fn main() {
    println!("machine: {}", machine());
    println!("command: cargo run --release -p commons-sim --example scale (one thread)");
    println!(
        "{:>8} {:>6} {:>8} {:>12} {:>12} {:>16} {:>10}",
        "nodes", "hours", "jobs/min", "events", "events/s", "sim days/wall min", "peak MiB"
    );
    for (nodes, hours, jobs) in [
        (1_000, 24.0, 10.0),
        (10_000, 24.0, 10.0),
        (10_000, 24.0, 0.0),
        (100_000, 2.0, 0.0),
    ] {
        let s = scenario(nodes, hours, jobs);
        let started = Instant::now();
        let r = run(s, 1, false);
        let wall = started.elapsed().as_secs_f64();
        let days_per_min = hours / 24.0 / (wall / 60.0);
        println!(
            "{nodes:>8} {hours:>6} {jobs:>8} {:>12} {:>12.0} {:>16.2} {:>10.0}",
            r.events,
            r.events as f64 / wall,
            days_per_min,
            peak_rss_mib()
        );
    }
    println!(
        "goals: >= 2M events/s on one core; 10^4 nodes >= 1 simulated day per wall minute; 10^5 nodes <= 1 GiB"
    );
}
