//! How fast and how big the simulator runs: events per second, simulated days
//! per wall minute and peak memory, for swarms of 10³ to 10⁵ nodes.
//!
//! `bash scripts/bench-sim.sh` (or `cargo run --release -p commons-sim --example scale`).
//!
//! Each row runs in a process of its own, so its peak memory is its own (a
//! process's peak never falls, and memory freed by one row stays with the
//! process). A row shorter than a second is run again, up to seven times in
//! all, and its median rate is reported: one run of a few tens of
//! milliseconds says more about the machine's other load than about the
//! simulator. Beside the wall-clock rate, events per second the thread was
//! on a CPU (Linux's schedstat): on a shared machine, the rate without the
//! time spent waiting for other work.

use std::process::{Command, ExitCode};
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

/// The rows: nodes, simulated hours, jobs per minute.
const ROWS: [(u32, f64, f64); 4] = [
    (1_000, 24.0, 10.0),
    (10_000, 24.0, 10.0),
    (10_000, 24.0, 0.0),
    (100_000, 2.0, 0.0),
];

/// Nanoseconds this thread has spent on a CPU (Linux), to tell the
/// simulator's speed from the time it waited for other work on a shared
/// machine.
fn cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The median of `xs` (not empty).
fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Runs row `k` (of [`ROWS`]) and prints its line.
fn row(k: usize) {
    let (nodes, hours, jobs) = ROWS[k];
    let (mut rates, mut cpu_rates, mut wall_total, mut events) = (Vec::new(), Vec::new(), 0.0, 0);
    while rates.is_empty() || (wall_total < 1.0 && rates.len() < 7) {
        let s = scenario(nodes, hours, jobs);
        let (started, cpu_started) = (Instant::now(), cpu_ns());
        let r = run(s, 1, false);
        let wall = started.elapsed().as_secs_f64();
        if let (Some(a), Some(b)) = (cpu_started, cpu_ns()) {
            cpu_rates.push(r.events as f64 / (b.saturating_sub(a).max(1) as f64 / 1e9));
        }
        wall_total += wall;
        events = r.events;
        rates.push(r.events as f64 / wall);
    }
    let runs = rates.len();
    let rate = median(rates);
    let cpu_rate = if cpu_rates.is_empty() {
        "-".to_owned()
    } else {
        format!("{:.0}", median(cpu_rates))
    };
    let days_per_min = hours / 24.0 / (events as f64 / rate / 60.0);
    println!(
        "{nodes:>8} {hours:>6} {jobs:>8} {events:>12} {rate:>12.0} {cpu_rate:>12} {days_per_min:>16.2} {:>10.0} {runs:>5}",
        peak_rss_mib(),
    );
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, k] = args.as_slice()
        && flag == "--row"
    {
        return match k.parse::<usize>() {
            Ok(k) if k < ROWS.len() => {
                row(k);
                ExitCode::SUCCESS
            }
            _ => {
                eprintln!("--row takes 0 to {}", ROWS.len() - 1);
                ExitCode::FAILURE
            }
        };
    }
    println!("machine: {}", machine());
    println!("command: cargo run --release -p commons-sim --example scale (one thread)");
    println!(
        "{:>8} {:>6} {:>8} {:>12} {:>12} {:>12} {:>16} {:>10} {:>5}",
        "nodes",
        "hours",
        "jobs/min",
        "events",
        "events/s",
        "events/cpu-s",
        "sim days/wall min",
        "peak MiB",
        "runs"
    );
    let me = match std::env::current_exe() {
        Ok(me) => me,
        Err(e) => {
            eprintln!("cannot find this bench's binary: {e}");
            return ExitCode::FAILURE;
        }
    };
    for k in 0..ROWS.len() {
        match Command::new(&me).args(["--row", &k.to_string()]).status() {
            Ok(s) if s.success() => {}
            Ok(s) => {
                eprintln!("row {k} failed: {s}");
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("cannot run row {k}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!(
        "goals: >= 2M events/s on one core; 10^4 nodes >= 1 simulated day per wall minute; 10^5 nodes <= 1 GiB"
    );
    println!(
        "events/s: wall clock, the median of the runs (rows under a second run again, up to 7 in all); \
         events/cpu-s: per second on a CPU (on a shared machine, without the waits)"
    );
    ExitCode::SUCCESS
}
