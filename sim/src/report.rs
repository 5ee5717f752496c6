//! Writing a run's outputs: `timeseries.csv`, `summary.json` and, when kept,
//! `events.jsonl`, each stamped with the seed and the scenario's hash.

use std::io::Write as _;
use std::path::Path;

use crate::scenario::Scenario;
use crate::world::Report;

/// Mean and 95% confidence half-width (normal approximation) of `xs`.
#[must_use]
pub fn mean_ci95(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, 1.96 * (var / n).sqrt())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The run's summary.
#[must_use]
pub fn summary(scenario: &Scenario, r: &Report) -> serde_json::Value {
    let last = r.rows.last();
    let warm = r.rows.len() / 10;
    let online: Vec<f64> = r.rows[warm..].iter().map(|x| f64::from(x.online)).collect();
    let coverage: Vec<f64> = r.rows[warm..].iter().map(|x| x.coverage).collect();
    let mut lat = r.job_latencies_s.clone();
    lat.sort_by(f64::total_cmp);
    serde_json::json!({
        "scenario": scenario.name,
        "scenario_hash": r.scenario_hash,
        "seed": r.seed,
        "event_log_hash": r.event_log_hash,
        "events": r.events,
        "simulated_s": scenario.duration_s,
        "mean_online": mean_ci95(&online).0,
        "mean_coverage": mean_ci95(&coverage).0,
        "jobs_done": last.map_or(0, |x| x.jobs_done),
        "jobs_failed": last.map_or(0, |x| x.jobs_failed),
        "jobs_refused": last.map_or(0, |x| x.jobs_refused),
        "tokens": last.map_or(0, |x| x.tokens),
        "failovers": last.map_or(0, |x| x.failovers),
        "wasted_compute_s": last.map_or(0.0, |x| x.wasted_compute_s),
        "job_latency_p50_s": percentile(&lat, 0.5),
        "job_latency_p95_s": percentile(&lat, 0.95),
        "sessions_ended": r.sessions_s.len(),
    })
}

/// Writes the outputs into `dir` (created if needed).
pub fn write(dir: &Path, scenario: &Scenario, r: &Report) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut csv = std::io::BufWriter::new(std::fs::File::create(dir.join("timeseries.csv"))?);
    writeln!(
        csv,
        "# scenario={} hash={} seed={}",
        scenario.name, r.scenario_hash, r.seed
    )?;
    writeln!(
        csv,
        "t_s,online,serving,coverage,jobs_active,jobs_done,jobs_failed,jobs_refused,tokens,tokens_per_s,failovers,wasted_compute_s"
    )?;
    for x in &r.rows {
        writeln!(
            csv,
            "{},{},{},{:.4},{},{},{},{},{},{:.3},{},{:.3}",
            x.t_s,
            x.online,
            x.serving,
            x.coverage,
            x.jobs_active,
            x.jobs_done,
            x.jobs_failed,
            x.jobs_refused,
            x.tokens,
            x.tokens_per_s,
            x.failovers,
            x.wasted_compute_s
        )?;
    }
    csv.flush()?;
    let s = serde_json::to_string_pretty(&summary(scenario, r)).unwrap_or_default();
    std::fs::write(dir.join("summary.json"), s + "\n")?;
    if let Some(lines) = &r.event_log {
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("events.jsonl"))?);
        for l in lines {
            writeln!(f, "{l}")?;
        }
        f.flush()?;
    }
    Ok(())
}
