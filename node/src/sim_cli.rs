//! `commons sim run | sweep`: the simulator's command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use commons_sim::report;
use commons_sim::{Scenario, run};

/// `commons sim …`.
#[derive(Debug, Subcommand)]
pub enum SimCommand {
    /// Simulate a scenario once; print the summary, write CSV and JSON to --out.
    Run(RunArgs),
    /// Simulate a scenario over many seeds; print means with 95% confidence intervals.
    Sweep(SweepArgs),
}

/// Arguments of `commons sim run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The scenario (TOML; see sim/scenarios/).
    pub scenario: PathBuf,
    /// Seed of every random stream.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Directory for timeseries.csv, summary.json (and events.jsonl with --events).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Keep the event log (events.jsonl).
    #[arg(long)]
    pub events: bool,
    /// Replay joins and leaves from a CSV trace (`node,join_s,leave_s`) instead
    /// of drawing them from the scenario's distributions.
    #[arg(long, value_name = "CSV")]
    pub trace: Option<PathBuf>,
}

/// Arguments of `commons sim sweep`.
#[derive(Debug, Args)]
pub struct SweepArgs {
    /// The scenario (TOML).
    pub scenario: PathBuf,
    /// Seeds, as `A..B` (both included).
    #[arg(long, default_value = "1..10", value_name = "A..B")]
    pub seeds: String,
    /// Directory for sweep.csv (one row per seed).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

fn load(path: &Path) -> anyhow::Result<Scenario> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the scenario {}", path.display()))?;
    Scenario::from_toml(&text).with_context(|| format!("in {}", path.display()))
}

/// Runs `commons sim …`.
pub fn run_command(command: SimCommand) -> anyhow::Result<ExitCode> {
    match command {
        SimCommand::Run(args) => {
            let scenario = load(&args.scenario)?;
            println!(
                "scenario {} ({}), seed {}",
                scenario.name,
                scenario.hash(),
                args.seed
            );
            let started = std::time::Instant::now();
            let r = match &args.trace {
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read the trace {}", path.display()))?;
                    let rows = commons_sim::scenario::parse_trace(&text)
                        .with_context(|| format!("in {}", path.display()))?;
                    eprintln!("replaying {} sessions from {}", rows.len(), path.display());
                    commons_sim::Simulation::with_trace(
                        scenario.clone(),
                        args.seed,
                        args.events,
                        &rows,
                    )
                    .run()
                }
                None => run(scenario.clone(), args.seed, args.events),
            };
            let wall = started.elapsed().as_secs_f64();
            let summary = report::summary(&scenario, &r);
            println!("{}", serde_json::to_string_pretty(&summary)?);
            eprintln!(
                "{} events in {wall:.2} s ({:.0} events/s); {:.0} simulated seconds per wall second",
                r.events,
                r.events as f64 / wall.max(1e-9),
                scenario.duration_s / wall.max(1e-9)
            );
            if let Some(dir) = &args.out {
                report::write(dir, &scenario, &r)
                    .with_context(|| format!("cannot write to {}", dir.display()))?;
                eprintln!("wrote {}", dir.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        SimCommand::Sweep(args) => {
            let scenario = load(&args.scenario)?;
            let (a, b) = args
                .seeds
                .split_once("..")
                .and_then(|(a, b)| {
                    Some((a.trim().parse::<u64>().ok()?, b.trim().parse::<u64>().ok()?))
                })
                .filter(|(a, b)| a <= b)
                .with_context(|| format!("--seeds {}: expected A..B with A ≤ B", args.seeds))?;
            if b - a >= 10_000 {
                bail!("--seeds: at most 10000 seeds");
            }
            println!(
                "scenario {} ({}), seeds {a}..{b}",
                scenario.name,
                scenario.hash()
            );
            let keys = [
                "mean_online",
                "mean_coverage",
                "jobs_done",
                "jobs_failed",
                "jobs_refused",
                "tokens",
                "failovers",
                "wasted_compute_s",
                "job_latency_p50_s",
                "job_latency_p95_s",
                "check_overhead",
                "redone_compute_s",
                "rollbacks",
                "catches",
                "false_alarms",
                "missed",
                "corrupt_tokens_released",
                "jobs_wrong",
            ];
            let mut rows = Vec::new();
            for seed in a..=b {
                let r = run(scenario.clone(), seed, false);
                let s = report::summary(&scenario, &r);
                rows.push((seed, s));
            }
            for k in keys {
                let xs: Vec<f64> = rows.iter().filter_map(|(_, s)| s[k].as_f64()).collect();
                let (mean, ci) = report::mean_ci95(&xs);
                println!("{k:>20}  {mean:>12.3} ± {ci:.3}");
            }
            if let Some(dir) = &args.out {
                std::fs::create_dir_all(dir)?;
                let mut csv = format!(
                    "# scenario={} hash={}\nseed,{}\n",
                    scenario.name,
                    scenario.hash(),
                    keys.join(",")
                );
                for (seed, s) in &rows {
                    let vals: Vec<String> = keys.iter().map(|k| s[*k].to_string()).collect();
                    csv.push_str(&format!("{seed},{}\n", vals.join(",")));
                }
                std::fs::write(dir.join("sweep.csv"), csv)?;
                eprintln!("wrote {}", dir.join("sweep.csv").display());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
