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
    // With colluding adversaries too: the same log, line for line.
    let mut adversarial = scenario(&format!(
        "{JOBS}\n[adversaries]\nfraction = 0.3\ncorrupt_probability = 0.5\ncolluding = true\n"
    ));
    adversarial.duration_s = 1800.0;
    let a = run(adversarial.clone(), 42, true);
    let b = run(adversarial.clone(), 42, true);
    let c = run(adversarial, 43, false);
    assert_eq!(a.event_log, b.event_log);
    assert_eq!(a.event_log_hash, b.event_log_hash);
    assert_eq!((&a.rows, &a.adversaries), (&b.rows, &b.adversaries));
    assert_ne!(a.event_log_hash, c.event_log_hash);
    let last = a.rows.last().unwrap();
    assert!(last.corrupt_results > 0 && last.mismatches > 0, "{last:?}");
    let log = a.event_log.unwrap();
    assert!(log.iter().any(|l| l.contains("\"event\":\"adversary\"")));
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
        (
            "name='x'\nduration_s=10\n[population]\n[churn]\nsession={dist='exponential',mean=1.0}\n[verification]\np_min=1.5",
            "verification.p_min must be a probability",
        ),
        (
            "name='x'\nduration_s=10\n[population]\n[churn]\nsession={dist='exponential',mean=1.0}\n[verification]\nsampling='sometimes'",
            "unknown variant `sometimes`",
        ),
        (
            "name='x'\nduration_s=10\n[population]\n[churn]\nsession={dist='exponential',mean=1.0}\n[adversaries]\nfraction=-0.1",
            "adversaries.fraction must be a probability",
        ),
        (
            "name='x'\nduration_s=10\n[population]\n[churn]\nsession={dist='exponential',mean=1.0}\n[adversaries]\nfraction=0.1\ncorrupt_probability=nan",
            "adversaries.corrupt_probability must be a probability",
        ),
        (
            "name='x'\nduration_s=10\n[population]\n[churn]\nsession={dist='exponential',mean=1.0}\n[adversaries]\nfraction=0.1\ncolluding='yes'",
            "colluding",
        ),
        (
            "name='x'\nduration_s=10\n[population]\n[churn]\nsession={dist='exponential',mean=1.0}\n[adversaries]\nshare=0.1",
            "unknown field `share`",
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

// Verification against adversaries.

/// `nodes` identical nodes that each hold the whole (4-layer) model, never
/// leave, and sit at the same distance: every chain is one hop, and routing
/// ties go to the lowest id, so while it is idle the node with the lowest id
/// not excluded serves the chains, the next one checks it and the one after
/// referees.
fn small_world(nodes: u32, jobs_per_minute: f64, duration_s: f64) -> String {
    format!(
        r#"
name = "small-world"
duration_s = {duration_s}
sample_every_s = 60
rebalance_every_s = 0
[population]
initial = {nodes}
[churn]
session = {{ dist = "constant", value = 1e9 }}
[nodes]
tokens_per_s = {{ dist = "constant", value = 1000.0 }}
memory_layers = {{ dist = "constant", value = 4.0 }}
[network]
world_km = 1000.0
base_rtt_ms = 2.0
ms_per_1000km = 0.0
[model]
layers = 4
context = 256
[workload]
jobs_per_minute = {jobs_per_minute}
prompt_tokens = 8
max_tokens = 16
submitters = 4
"#
    )
}

/// Spot checks catch a node that corrupts every chain result it returns
/// within k results with probability 1 − (1 − p)^k.
///
/// The theory holds exactly when every corrupted result is sampled
/// independently with the same p. So: `probation = 10` and `p_min = 0.1`
/// (after ten agreeing results p = max(0.1, 1/streak) = 0.1 and stays there
/// until a mismatch), each node honest for its first 20 results (it leaves
/// probation first), `compare_replays = false` (a checker's replays of
/// earlier steps catch nothing), and every node an adversary that corrupts
/// all of its chain results but answers checks and referees honestly
/// (`evade_checks`), so a node is only ever caught through its own sampled
/// results. Jobs rarely overlap (six a minute, each done within a second),
/// so the nodes take turns on the chain as each is excluded, with plenty
/// left to check and referee. In every run the
/// first four to corrupt are trials, kept when the coordinator's p for them
/// was 0.1 when they began (which depends only on the past). k is the number
/// of corrupted results up to and including the first sampled.
#[test]
fn spot_checks_catch_a_corrupting_node_as_one_minus_one_minus_p_to_the_k() {
    let p = 0.1;
    let text = format!(
        "{}
[verification]
probation = 10
p_min = {p}
compare_replays = false
[adversaries]
fraction = 1.0
corrupt_probability = 1.0
honest_units = 20
evade_checks = true
",
        small_world(16, 6.0, 300.0)
    );
    let s = scenario(&text);
    let mut ks: Vec<u64> = Vec::new();
    let mut before_exclusion: Vec<u64> = Vec::new();
    let (mut trials, mut dropped) = (0, 0);
    for seed in 1..=300 {
        let r = run(s.clone(), seed, false);
        let mut started: Vec<_> = r
            .adversaries
            .iter()
            .filter(|a| a.onset_s.is_some())
            .collect();
        started.sort_by(|a, b| a.onset_s.partial_cmp(&b.onset_s).unwrap());
        for a in started.into_iter().take(4) {
            trials += 1;
            if a.p_at_onset != Some(p) {
                dropped += 1;
                continue;
            }
            let k = a
                .to_first_sample
                .unwrap_or_else(|| panic!("seed {seed}: censored {a:?}"));
            assert_eq!(a.p_range, Some((p, p)), "seed {seed}: {a:?}");
            // A sampled lie is checked, refereed, and its node excluded.
            let corrupted = a
                .corrupted_at_exclusion
                .unwrap_or_else(|| panic!("seed {seed}: not excluded {a:?}"));
            assert!(corrupted >= k, "{a:?}");
            ks.push(k);
            before_exclusion.push(corrupted);
        }
    }
    let n = ks.len() as f64;
    assert!(ks.len() >= 600, "{} of {trials} trials kept", ks.len());
    println!(
        "{trials} trials: {} kept, {dropped} dropped (p ≠ {p} when they began to corrupt)",
        ks.len()
    );
    println!("   k  caught within k   1-(1-p)^k   |diff|   3 s.e.");
    for k in [1u64, 2, 3, 5, 7, 10, 15, 20, 30, 40] {
        let theory = 1.0 - (1.0 - p).powi(k as i32);
        let empirical = ks.iter().filter(|&&x| x <= k).count() as f64 / n;
        let tolerance = 3.0 * (theory * (1.0 - theory) / n).sqrt();
        let diff = (empirical - theory).abs();
        println!("{k:>4}  {empirical:>15.3}  {theory:>10.3}  {diff:>7.3}  {tolerance:>7.3}");
        assert!(diff <= tolerance, "k = {k}: {empirical:.3} vs {theory:.3}");
    }
    let mean = ks.iter().sum::<u64>() as f64 / n;
    let se = (1.0 - p).sqrt() / p / n.sqrt();
    let after = before_exclusion.iter().sum::<u64>() as f64 / n;
    println!(
        "mean k {mean:.2} (theory 1/p = {:.2} ± {:.2}); corrupted results returned before exclusion {after:.2}",
        1.0 / p,
        3.0 * se
    );
    assert!((mean - 1.0 / p).abs() <= 3.0 * se, "mean k {mean:.2}");
}

fn collusion_totals(colluding: bool) -> [u64; 5] {
    let text = format!(
        "{}
[adversaries]
fraction = 0.4
corrupt_probability = 0.5
colluding = {colluding}
",
        small_world(12, 60.0, 60.0)
    );
    let s = scenario(&text);
    let mut totals = [0u64; 5];
    for seed in 1..=40 {
        let r = run(s.clone(), seed, false);
        let last = r.rows.last().unwrap();
        let missed = r
            .adversaries
            .iter()
            .filter(|a| a.corrupted > 0 && a.excluded_s.is_none())
            .count() as u64;
        for (t, x) in totals.iter_mut().zip([
            last.catches,
            last.false_alarms,
            missed,
            last.corrupt_tokens_released,
            r.jobs_wrong,
        ]) {
            *t += x;
        }
    }
    totals
}

/// Colluders agree with each other: a colluding checker confirms a
/// colluding hop's lie (a missed catch, and wrong text released), and a
/// colluding referee sides with a colluding hop against an honest checker
/// (a false alarm). Independent liars never agree, so without collusion no
/// honest node is ever excluded. Same seeds, same adversaries, both ways.
#[test]
fn colluders_turn_catches_into_false_alarms_and_misses() {
    let alone = collusion_totals(false);
    let together = collusion_totals(true);
    println!("              catches  false alarms  missed  corrupt tokens released  wrong jobs");
    for (name, t) in [("independent", alone), ("colluding", together)] {
        println!(
            "{name:>12}  {:>7}  {:>12}  {:>6}  {:>23}  {:>10}",
            t[0], t[1], t[2], t[3], t[4]
        );
    }
    let [catches, false_alarms, missed, released, wrong] = alone;
    assert!(catches > 0);
    assert_eq!(false_alarms, 0, "independent lies never agree");
    assert_eq!((released, wrong), (0, 0), "{alone:?}");
    let [c_catches, c_false_alarms, c_missed, c_released, c_wrong] = together;
    assert!(c_catches < catches, "{together:?} vs {alone:?}");
    assert!(c_false_alarms > 0, "{together:?}");
    assert!(
        c_missed > missed && c_released > 0 && c_wrong > 0,
        "{together:?}"
    );
}

/// Without adversaries, verification under churn finds nothing to catch,
/// and every finished job's text is exactly what honest nodes generate:
/// failovers replay a replaced hop's inputs exactly.
#[test]
fn with_no_adversaries_nothing_is_caught_and_every_text_is_honest() {
    let mut s = scenario(JOBS);
    s.duration_s = 3600.0;
    let r = run(s, 5, false);
    let last = r.rows.last().unwrap();
    assert!(last.jobs_done > 200 && last.failovers > 0, "{last:?}");
    assert!(
        last.check_units > 0 && last.check_compute_s > 0.0,
        "{last:?}"
    );
    assert_eq!(
        (
            last.catches,
            last.false_alarms,
            last.mismatches,
            last.rollbacks
        ),
        (0, 0, 0, 0),
        "{last:?}"
    );
    assert_eq!((last.corrupt_results, last.corrupt_tokens_released), (0, 0));
    assert_eq!(r.jobs_wrong, 0);
    assert!(r.adversaries.is_empty());
}

/// The outputs carry the verification columns and keys, row for row.
#[test]
fn outputs_carry_verification() {
    let text = format!(
        "{}\n[adversaries]\nfraction = 0.4\ncorrupt_probability = 0.5\ncolluding = true\n",
        small_world(12, 60.0, 120.0)
    );
    let s = scenario(&text);
    let r = run(s.clone(), 2, true);
    let dir = tempfile::tempdir().unwrap();
    commons_sim::report::write(dir.path(), &s, &r).unwrap();
    let csv = std::fs::read_to_string(dir.path().join("timeseries.csv")).unwrap();
    let mut lines = csv.lines().skip(1);
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    for column in [
        "check_units",
        "check_compute_s",
        "catches",
        "false_alarms",
        "corrupt_tokens_released",
        "rollbacks",
        "redone_compute_s",
    ] {
        assert!(header.contains(&column), "{header:?}");
    }
    let last: Vec<&str> = lines.last().unwrap().split(',').collect();
    assert_eq!(last.len(), header.len());
    let at = |name: &str| last[header.iter().position(|h| *h == name).unwrap()];
    let row = r.rows.last().unwrap();
    assert_eq!(at("catches"), row.catches.to_string());
    assert_eq!(at("false_alarms"), row.false_alarms.to_string());
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["adversaries"], r.adversaries.len());
    assert_eq!(summary["catches"], row.catches);
    assert_eq!(summary["jobs_wrong"], r.jobs_wrong);
    assert!(summary["check_overhead"].as_f64().unwrap() > 0.0);
    assert!(dir.path().join("verification.svg").exists());
    let events = std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap();
    assert!(events.contains("\"event\":\"catch\""), "{row:?}");
}
