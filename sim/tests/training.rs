//! Training rounds and limited links in the simulator, checked against what
//! the model of a share's time says: fetch the parameters, compute, upload,
//! one round trip, then the coordinator's aggregation.
#![allow(clippy::unwrap_used)] // helpers of tests may fail loudly

use commons_sim::{Scenario, run};

/// Nodes all alike (100 tokens/s per layer, 800 km from the coordinator at
/// most), sessions far longer than the run, `extra` appended.
fn scenario(mode: &str, links: &str, extra: &str) -> Scenario {
    Scenario::from_toml(&format!(
        r#"
name = "training"
duration_s = 20000
sample_every_s = 600
rebalance_every_s = 0
[population]
initial = 4
[churn]
session = {{ dist = "constant", value = 1e9 }}
[nodes]
tokens_per_s = {{ dist = "constant", value = 100.0 }}
memory_layers = {{ dist = "constant", value = 30.0 }}
{links}
[network]
world_km = 1000
base_rtt_ms = 10
ms_per_1000km = 0
{extra}
[workload]
jobs_per_minute = 0
prompt_tokens = 8
max_tokens = 8
submitters = 1
[training]
mode = "{mode}"
rounds = 10
shares = 4
inner_steps = 5
parameters = 1000000
tokens_per_step = 100
layers_per_token = 1.0
aggregate_s = 2.0
"#
    ))
    .unwrap()
}

#[test]
fn a_round_takes_fetch_compute_upload_and_aggregation() {
    // 4 nodes, 4 shares: one each per round, all in parallel.
    let links = "up_mbps = { dist = \"constant\", value = 8.0 }\n\
                 down_mbps = { dist = \"constant\", value = 32.0 }";
    for (mode, steps) in [("sync", 1.0), ("diloco", 5.0)] {
        let r = run(scenario(mode, links, ""), 1, false);
        let t = r.training.clone().unwrap();
        assert_eq!(t.rounds, 10, "{mode}");
        // 4 MB of f32 parameters at 32 Mbit/s; 2 MB of bf16 values at 8.
        let fetch = 4e6 * 8.0 / 32e6;
        let upload = 2e6 * 8.0 / 8e6;
        let compute = steps * 100.0 / 100.0;
        let expected = fetch + compute + upload + 0.010 + 2.0;
        for (k, &s) in t.round_times_s.iter().enumerate() {
            assert!(
                (s - expected).abs() < 1e-3,
                "{mode} round {k}: {s} s, the model says {expected} s"
            );
        }
        assert_eq!(t.shares_sent, 40);
        assert_eq!(t.reassigned, 0);
        assert_eq!(t.bytes_down, 40 * 4_000_000);
        assert_eq!(t.bytes_up, 40 * 2_000_000);
        assert!((t.useful_compute_s - 40.0 * compute).abs() < 1e-3);
        let summary = commons_sim::report::summary(&scenario(mode, links, ""), &r);
        assert_eq!(summary["train_rounds"], 10);
        assert_eq!(r.rows.last().unwrap().train_rounds, 10);
    }
}

#[test]
fn relayed_nodes_pay_the_relays_round_trip_and_bandwidth() {
    let links = "up_mbps = { dist = \"constant\", value = 100.0 }\n\
                 down_mbps = { dist = \"constant\", value = 100.0 }";
    // Every node behind NAT, no hole punching: all through relays of 10 Mbit/s.
    let nat = "[network.nat]\nfraction = 1.0\nhole_punch_success = 0.0\n\
               relay_rtt_ms = 40\nrelay_mbps = 10";
    let r = run(scenario("sync", links, nat), 1, false);
    let t = r.training.unwrap();
    let expected = 4e6 * 8.0 / 10e6 + 1.0 + 2e6 * 8.0 / 10e6 + 0.050 + 2.0;
    assert!(
        t.round_times_s.iter().all(|s| (s - expected).abs() < 1e-3),
        "{:?} vs {expected}",
        t.round_times_s
    );
    // Hole punching that always works: direct at 100 Mbit/s.
    let punched = nat.replace("hole_punch_success = 0.0", "hole_punch_success = 1.0");
    let t = run(scenario("sync", links, &punched), 1, false)
        .training
        .unwrap();
    let direct = 4e6 * 8.0 / 100e6 + 1.0 + 2e6 * 8.0 / 100e6 + 0.010 + 2.0;
    assert!(t.round_times_s.iter().all(|s| (s - direct).abs() < 1e-3));
}

#[test]
fn under_churn_shares_move_and_the_run_still_ends_the_same_way_for_a_seed() {
    let churny = |s: Scenario| {
        let mut s = s;
        s.population.initial = 12;
        s.population.arrivals_per_hour = 40.0;
        s.churn.session = commons_sim::dist::Dist::Exponential { mean: 300.0 };
        s.training.as_mut().unwrap().rounds = 40;
        s.training.as_mut().unwrap().share_timeout_s = 60.0;
        s
    };
    let links = "up_mbps = { dist = \"lognormal\", mu = 3.0, sigma = 1.0 }\n\
                 down_mbps = { dist = \"lognormal\", mu = 4.0, sigma = 1.0 }";
    let base = churny(scenario("diloco", links, ""));
    let a = run(base.clone(), 7, false);
    let b = run(base.clone(), 7, false);
    let c = run(base, 8, false);
    assert_eq!(a.event_log_hash, b.event_log_hash);
    assert_ne!(a.event_log_hash, c.event_log_hash);
    let t = a.training.unwrap();
    println!(
        "12 nodes, exponential sessions of 300 s, DiLoCo: {} rounds by {:?} s, {} shares sent, \
         {} reassigned, {:.0} s of share compute wasted against {:.0} s used",
        t.rounds, t.finished_s, t.shares_sent, t.reassigned, t.wasted_compute_s, t.useful_compute_s
    );
    assert_eq!(t.rounds, 40, "the run ends");
    assert!(t.reassigned > 0, "nodes that leave lose their shares");
    assert!(t.wasted_compute_s > 0.0);
}

#[test]
fn scenarios_without_limits_or_training_run_as_before() {
    // Links and NAT are drawn from their own stream, only when asked for:
    // a scenario without them has the same event log whatever is added.
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scenarios/steady.toml"
    ))
    .unwrap();
    let mut s = Scenario::from_toml(&text).unwrap();
    s.duration_s = 1800.0;
    let plain = run(s.clone(), 3, false);
    assert!(plain.training.is_none());
    // Unlimited links, written out, change nothing.
    let mut written = s.clone();
    written.network.nat = Some(commons_sim::scenario::Nat {
        fraction: 0.0,
        hole_punch_success: 0.7,
        relay_rtt_ms: 40.0,
        relay_mbps: 10.0,
    });
    assert_eq!(
        run(written, 3, false).rows.last().unwrap().tokens,
        plain.rows.last().unwrap().tokens
    );
    // Slow links slow the jobs down.
    let mut slow = s;
    slow.nodes.up_mbps = Some(commons_sim::dist::Dist::Constant { value: 0.5 });
    slow.nodes.down_mbps = Some(commons_sim::dist::Dist::Constant { value: 0.5 });
    let slowed = run(slow, 3, false);
    let p50 = |r: &commons_sim::Report| {
        let mut l = r.job_latencies_s.clone();
        l.sort_by(f64::total_cmp);
        l[l.len() / 2]
    };
    assert!(
        p50(&slowed) > p50(&plain),
        "{} vs {}",
        p50(&slowed),
        p50(&plain)
    );
}
