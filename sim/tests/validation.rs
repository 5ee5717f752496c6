//! The simulator checked against what theory says it must produce.
#![allow(clippy::unwrap_used)] // helpers of tests may fail loudly

use commons_sim::dist::Dist;
use commons_sim::{Scenario, run};

fn scenario(extra: &str) -> Scenario {
    Scenario::from_toml(extra).unwrap()
}

const CHURN_ONLY: &str = r#"
name = "mg-infinity"
duration_s = 86400
sample_every_s = 60
rebalance_every_s = 0
[population]
arrivals_per_hour = 6000
[churn]
session = { dist = "lognormal", mu = 6.8, sigma = 0.8 }
[workload]
jobs_per_minute = 0
prompt_tokens = 8
max_tokens = 8
submitters = 1
"#;

#[test]
fn the_online_population_is_arrival_rate_times_mean_session() {
    let s = scenario(CHURN_ONLY);
    let expected = 6000.0 / 3600.0 * s.churn.session.mean();
    let r = run(s, 1, false);
    // After a warm-up of several mean sessions (M/G/∞: Poisson with mean λ·E[S]).
    let late: Vec<f64> = r
        .rows
        .iter()
        .filter(|x| x.t_s >= 6.0 * 3600.0)
        .map(|x| f64::from(x.online))
        .collect();
    let mean = late.iter().sum::<f64>() / late.len() as f64;
    let err = (mean - expected).abs() / expected;
    assert!(
        err < 0.02,
        "online {mean:.1} vs λ·E[S] = {expected:.1} ({:.2}%)",
        err * 100.0
    );
}

#[test]
fn session_lengths_follow_the_configured_distribution() {
    for session in [
        r#"{ dist = "weibull", shape = 0.59, scale = 1800.0 }"#,
        r#"{ dist = "pareto", scale = 300.0, shape = 2.0 }"#,
        r#"{ dist = "exponential", mean = 900.0 }"#,
    ] {
        let text = CHURN_ONLY.replace(
            r#"session = { dist = "lognormal", mu = 6.8, sigma = 0.8 }"#,
            &format!("session = {session}"),
        );
        let s = scenario(&text);
        let dist: Dist = s.churn.session.clone();
        let r = run(s, 3, false);
        // Sessions still going at the end are missing, which biases the ended
        // ones short. A session that began in the first half and is shorter
        // than half the run always ends in time: those are an unbiased sample
        // of the distribution conditioned on X < half.
        let half = 43_200.0;
        let mut xs: Vec<f64> = r
            .sessions_s
            .iter()
            .filter(|(start, len)| *start <= half && *len < half)
            .map(|(_, len)| *len)
            .collect();
        assert!(xs.len() > 10_000, "{}", xs.len());
        xs.sort_by(f64::total_cmp);
        let n = xs.len() as f64;
        let f_half = dist.cdf(half);
        let d = xs
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let f = dist.cdf(x) / f_half;
                (f - i as f64 / n).abs().max(((i + 1) as f64 / n - f).abs())
            })
            .fold(0.0, f64::max);
        // Times are whole microseconds and sessions at least one: far below the threshold.
        let critical = 1.63 / n.sqrt();
        assert!(
            d < critical,
            "{session}: D = {d:.4}, 1% critical value {critical:.4}"
        );
    }
}

const JOBS: &str = r#"
name = "jobs-under-churn"
duration_s = 7200
sample_every_s = 60
rebalance_every_s = 30
[population]
initial = 60
arrivals_per_hour = 60
[churn]
session = { dist = "weibull", shape = 0.5, scale = 1800.0 }
downtime = { dist = "exponential", mean = 600.0 }
rejoin_probability = 0.7
graceful_fraction = 0.5
[nodes]
tokens_per_s = { dist = "lognormal", mu = 7.0, sigma = 0.4 }
memory_layers = { dist = "uniform", low = 6.0, high = 16.0 }
[model]
layers = 30
context = 2048
[workload]
jobs_per_minute = 6
prompt_tokens = 32
max_tokens = 32
submitters = 4
"#;

#[test]
fn the_same_seed_gives_the_same_run_and_another_seed_another() {
    let a = run(scenario(JOBS), 42, false);
    let b = run(scenario(JOBS), 42, false);
    let c = run(scenario(JOBS), 43, false);
    assert_eq!(a.event_log_hash, b.event_log_hash);
    assert_eq!(a.rows, b.rows);
    assert_ne!(a.event_log_hash, c.event_log_hash);
}

#[test]
fn jobs_run_through_the_real_scheduler_and_survive_churn() {
    let r = run(scenario(JOBS), 7, true);
    let last = r.rows.last().unwrap();
    assert!(last.jobs_done > 300, "{last:?}");
    // Churn kills hops mid-job: failovers happen and almost every job still ends well.
    assert!(last.failovers > 0, "{last:?}");
    assert!(
        (last.jobs_failed as f64) < 0.05 * last.jobs_done as f64,
        "{last:?}"
    );
    assert!(last.wasted_compute_s > 0.0);
    // Every finished job generated its 32 tokens; the total also counts those
    // of jobs still running or failed.
    let done_tokens = tokens_of_done(&r);
    assert_eq!(done_tokens, 32 * last.jobs_done, "{last:?}");
    assert!(last.tokens >= done_tokens);
    let log = r.event_log.unwrap();
    assert!(log.iter().any(|l| l.contains("\"event\":\"crash\"")));
    assert!(log.iter().any(|l| l.contains("\"event\":\"done\"")));
}

fn tokens_of_done(r: &commons_sim::Report) -> u64 {
    let Some(log) = &r.event_log else { return 0 };
    log.iter()
        .filter(|l| l.contains("\"event\":\"done\""))
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["tokens"].as_u64().unwrap()
        })
        .sum()
}

#[test]
fn the_example_scenarios_parse_and_run_briefly() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let mut s = Scenario::from_toml(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        s.duration_s = 600.0;
        let r = run(s, 1, false);
        assert!(r.rows.last().unwrap().online > 0, "{}", path.display());
        n += 1;
    }
    assert!(n >= 3);
}

#[test]
fn bad_scenarios_are_clear_errors() {
    for (text, needle) in [
        ("name = \"x\"", "missing field"),
        (
            "name='x'\nduration_s=-1\n[population]\n[churn]\nsession={dist='exponential',mean=1.0}",
            "duration_s",
        ),
        (
            "name='x'\nduration_s=10\n[population]\n[churn]\nsession={dist='weibull',shape=0.0,scale=1.0}",
            "weibull",
        ),
        (
            "name='x'\nduration_s=10\nbogus=1\n[population]\n[churn]\nsession={dist='exponential',mean=1.0}",
            "bogus",
        ),
    ] {
        let e = Scenario::from_toml(text).unwrap_err().to_string();
        assert!(e.contains(needle), "{text}: {e}");
    }
}

#[test]
fn diurnal_arrivals_peak_at_the_peak_hour() {
    let text = CHURN_ONLY
        .replace(
            "arrivals_per_hour = 6000",
            "arrivals_per_hour = 3000\ndiurnal_amplitude = 0.8\ndiurnal_peak_hour = 18",
        )
        .replace(
            r#"session = { dist = "lognormal", mu = 6.8, sigma = 0.8 }"#,
            r#"session = { dist = "exponential", mean = 600.0 }"#,
        )
        .replace("duration_s = 86400", "duration_s = 172800");
    let r = run(scenario(&text), 2, false);
    // With short sessions the online count follows the arrival rate: highest
    // near 18:00, lowest near 06:00 (second day, past the warm-up).
    let at = |hour: f64| {
        let t = (24.0 + hour) * 3600.0;
        let near: Vec<f64> = r
            .rows
            .iter()
            .filter(|x| (x.t_s - t).abs() <= 1800.0)
            .map(|x| f64::from(x.online))
            .collect();
        near.iter().sum::<f64>() / near.len() as f64
    };
    let (peak, trough) = (at(18.0), at(6.0));
    // Expected λ·E[S]·(1 ± 0.8): 900 and 100.
    assert!((peak - 900.0).abs() < 90.0, "peak {peak}");
    assert!((trough - 100.0).abs() < 30.0, "trough {trough}");
}

#[test]
fn a_regional_outage_takes_its_share_of_nodes_down_and_they_come_back() {
    let text = format!(
        "{}\n[[outages]]\nat_s = 43200\nduration_s = 1800\nfraction = 0.25\n",
        CHURN_ONLY.replace(
            r#"session = { dist = "lognormal", mu = 6.8, sigma = 0.8 }"#,
            r#"session = { dist = "exponential", mean = 36000.0 }"#
        )
    );
    let r = run(scenario(&text), 4, true);
    let online_at = |t: f64| {
        r.rows
            .iter()
            .find(|x| x.t_s >= t)
            .map(|x| f64::from(x.online))
            .unwrap()
    };
    let (before, during, after) = (
        online_at(43_140.0),
        online_at(43_260.0),
        online_at(45_120.0),
    );
    let lost = (before - during) / before;
    // Nodes sit uniformly on the world: a quarter of its area holds about a quarter of them.
    assert!(
        (lost - 0.25).abs() < 0.06,
        "lost {lost:.3}: {before} -> {during}"
    );
    assert!(
        after > during + 0.15 * before,
        "they came back: {during} -> {after}"
    );
    assert!(
        r.event_log
            .unwrap()
            .iter()
            .any(|l| l.contains("\"event\":\"outage\""))
    );
}

#[test]
fn a_trace_is_replayed_exactly() {
    let trace = commons_sim::scenario::parse_trace(
        "node,join_s,leave_s\n1,0,100\n2,10,50\n1,200,300\n3,20,400\n",
    )
    .unwrap();
    let mut s = scenario(CHURN_ONLY);
    s.duration_s = 500.0;
    s.sample_every_s = 1.0;
    let r = commons_sim::Simulation::with_trace(s, 1, false, &trace).run();
    let online_at = |t: f64| {
        r.rows
            .iter()
            .find(|x| x.t_s >= t)
            .map(|x| x.online)
            .unwrap()
    };
    assert_eq!(
        [5.0, 15.0, 30.0, 60.0, 150.0, 250.0, 350.0, 450.0].map(online_at),
        [1, 2, 3, 2, 1, 2, 1, 0]
    );
    assert_eq!(r.sessions_s.len(), 4);
    assert!(commons_sim::scenario::parse_trace("1,5,2\n").is_err());
    assert!(commons_sim::scenario::parse_trace("1,2\n").is_err());
}
