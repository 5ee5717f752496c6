//! Writing a run's outputs: `timeseries.csv`, `summary.json`, SVG plots
//! (`nodes.svg`, `coverage.svg`, `throughput.svg`, `jobs.svg`,
//! `verification.svg`) and, when kept, `events.jsonl`, each stamped with the
//! seed and the scenario's hash.

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
    let v = &r.verify;
    let check_s = last.map_or(0.0, |x| x.check_compute_s);
    // Adversaries that returned wrong results and were never excluded.
    let missed = r
        .adversaries
        .iter()
        .filter(|a| a.corrupted > 0 && a.excluded_s.is_none())
        .count();
    let to_catch: Vec<f64> = r
        .adversaries
        .iter()
        .filter_map(|a| a.corrupted_at_exclusion.map(|k| k as f64))
        .collect();
    let mut out = serde_json::json!({
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
        "redone_compute_s": last.map_or(0.0, |x| x.redone_compute_s),
        "job_latency_p50_s": percentile(&lat, 0.5),
        "job_latency_p95_s": percentile(&lat, 0.95),
        "sessions_ended": r.sessions_s.len(),
        "chain_compute_s": r.chain_compute_s,
        "check_units": v.check_units,
        "check_compute_s": check_s,
        "check_overhead": check_s / r.chain_compute_s.max(1e-9),
        "sampled": v.sampled,
        "compared": v.compared,
        "mismatches": v.mismatches,
        "disputes_decided": v.decided,
        "disputes_undecided": v.undecided,
        "unverifiable": v.unverifiable,
        "exclusions": v.exclusions,
        "rollbacks": v.rollbacks,
        "adversaries": r.adversaries.len(),
        "catches": last.map_or(0, |x| x.catches),
        "false_alarms": last.map_or(0, |x| x.false_alarms),
        "missed": missed,
        "corrupt_results_to_exclusion_mean": mean_ci95(&to_catch).0,
        "corrupt_results": last.map_or(0, |x| x.corrupt_results),
        "corrupt_tokens_released": last.map_or(0, |x| x.corrupt_tokens_released),
        "jobs_wrong": r.jobs_wrong,
    });
    if let (Some(t), Some(obj)) = (&r.training, out.as_object_mut()) {
        let mut times = t.round_times_s.clone();
        times.sort_by(f64::total_cmp);
        let extra = serde_json::json!({
            "train_rounds": t.rounds,
            "train_finished_s": t.finished_s,
            "train_round_p50_s": percentile(&times, 0.5),
            "train_round_p95_s": percentile(&times, 0.95),
            "train_shares_sent": t.shares_sent,
            "train_reassigned": t.reassigned,
            "train_late": t.late,
            "train_useful_compute_s": t.useful_compute_s,
            "train_wasted_compute_s": t.wasted_compute_s,
            "train_bytes_down": t.bytes_down,
            "train_bytes_up": t.bytes_up,
        });
        if let Some(extra) = extra.as_object() {
            obj.extend(extra.clone());
        }
    }
    out
}

/// Draws `series` (name, points) over simulated hours into an SVG file.
fn plot(
    path: &Path,
    title: &str,
    y_label: &str,
    series: &[(&str, Vec<(f64, f64)>)],
) -> Result<(), String> {
    use plotters::prelude::*;
    let x_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.0))
        .fold(0.0, f64::max)
        .max(1e-9);
    let y_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.1))
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.05;
    let root = SVGBackend::new(path, (800, 400)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("simulated hours")
        .y_desc(y_label)
        .draw()
        .map_err(|e| e.to_string())?;
    let colors = [BLUE, RED, GREEN, BLACK, MAGENTA];
    for (i, (name, points)) in series.iter().enumerate() {
        let color = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(points.iter().copied(), &color))
            .map_err(|e| e.to_string())?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    if series.len() > 1 {
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()
            .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())
}

/// Writes the SVG plots of a run into `dir`.
pub fn plots(dir: &Path, scenario: &Scenario, r: &Report) -> Result<(), String> {
    let h = |x: &crate::world::Row| x.t_s / 3600.0;
    let stamp = format!("{} (seed {}, {})", scenario.name, r.seed, r.scenario_hash);
    let series = |f: fn(&crate::world::Row) -> f64| -> Vec<(f64, f64)> {
        r.rows.iter().map(|x| (h(x), f(x))).collect()
    };
    plot(
        &dir.join("nodes.svg"),
        &format!("nodes online: {stamp}"),
        "nodes",
        &[
            ("online", series(|x| f64::from(x.online))),
            ("serving", series(|x| f64::from(x.serving))),
        ],
    )?;
    plot(
        &dir.join("coverage.svg"),
        &format!("layers with a server: {stamp}"),
        "fraction",
        &[("coverage", series(|x| x.coverage))],
    )?;
    plot(
        &dir.join("throughput.svg"),
        &format!("tokens per second: {stamp}"),
        "tokens/s",
        &[("tokens/s", series(|x| x.tokens_per_s))],
    )?;
    plot(
        &dir.join("jobs.svg"),
        &format!("jobs (cumulative): {stamp}"),
        "jobs",
        &[
            ("done", series(|x| x.jobs_done as f64)),
            ("failed", series(|x| x.jobs_failed as f64)),
            ("refused", series(|x| x.jobs_refused as f64)),
        ],
    )?;
    plot(
        &dir.join("verification.svg"),
        &format!("verification (cumulative): {stamp}"),
        "count",
        &[
            ("catches", series(|x| x.catches as f64)),
            ("false alarms", series(|x| x.false_alarms as f64)),
            ("rollbacks", series(|x| x.rollbacks as f64)),
            (
                "corrupt tokens released",
                series(|x| x.corrupt_tokens_released as f64),
            ),
        ],
    )
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
        "t_s,online,serving,coverage,jobs_active,jobs_done,jobs_failed,jobs_refused,tokens,tokens_per_s,failovers,wasted_compute_s,redone_compute_s,check_units,check_compute_s,mismatches,catches,false_alarms,corrupt_results,corrupt_tokens_released,rollbacks"
    )?;
    for x in &r.rows {
        writeln!(
            csv,
            "{},{},{},{:.4},{},{},{},{},{},{:.3},{},{:.3},{:.3},{},{:.3},{},{},{},{},{},{}",
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
            x.wasted_compute_s,
            x.redone_compute_s,
            x.check_units,
            x.check_compute_s,
            x.mismatches,
            x.catches,
            x.false_alarms,
            x.corrupt_results,
            x.corrupt_tokens_released,
            x.rollbacks
        )?;
    }
    csv.flush()?;
    let s = serde_json::to_string_pretty(&summary(scenario, r)).unwrap_or_default();
    std::fs::write(dir.join("summary.json"), s + "\n")?;
    plots(dir, scenario, r).map_err(std::io::Error::other)?;
    if let Some(lines) = &r.event_log {
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("events.jsonl"))?);
        for l in lines {
            writeln!(f, "{l}")?;
        }
        f.flush()?;
    }
    Ok(())
}
