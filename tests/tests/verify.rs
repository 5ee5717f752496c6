//! Verification end to end: in a swarm of a coordinator and three nodes
//! serving the whole bundled model, one node corrupts half of its results
//! (`--fault`, compiled into test builds only) and advertises the most
//! compute, as a cheat would, to draw the work. Spot checks catch it, a
//! referee settles the dispute, the coordinator excludes it, and the text is
//! the one `commons run` gives on one machine.
#![allow(clippy::unwrap_used)] // helpers of tests may fail loudly

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use commons_tests::node::{Node, Transports, wait_until};
use commons_tests::{commons, output, stderr, stdout};

const PROMPT: &str = "Name three rivers of Europe.";
const TOKENS: u32 = 12;
/// Probability that the corrupting node alters a result.
const FAULT: f64 = 0.5;

fn model() -> String {
    commons_node::run_local::bundled_model()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", stderr(out));
    serde_json::from_str(stdout(out).trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(out)))
}

fn tokens(v: &serde_json::Value) -> Vec<u64> {
    v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect()
}

/// A data directory whose cached capacity claims `mflops`.
fn data_dir(home: &Path, name: &str, mflops: u64) -> std::path::PathBuf {
    let dir = home.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let capacity = serde_json::json!({
        "cpu_cores": 2,
        "cpu_model": "test",
        "ram_bytes": 8u64 << 30,
        "matmul_mflops": mflops,
    });
    std::fs::write(dir.join("capacity.json"), capacity.to_string()).unwrap();
    dir
}

#[test]
fn a_corrupting_node_is_caught_excluded_and_the_text_is_the_honest_one() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let m = model();
    let reference = json(&output(commons(home).args([
        "run",
        "--json",
        "--chat",
        "--model",
        &m,
        "--prompt",
        PROMPT,
        "--max-tokens",
        &TOKENS.to_string(),
    ])));
    let expected = tokens(&reference);

    let coordinator = Node::start_with(
        home,
        &home.join("coordinator"),
        &[],
        Transports::Tcp,
        30,
        &["--coordinator", "--model", &m],
    );
    let boot = [coordinator.addrs[0].clone()];
    let fault = format!("corrupt:{FAULT}:7");
    let serve = |name: &str, mflops: u64, extra: &[&str]| {
        let mut args = vec!["--model", m.as_str(), "--layers", "0..30"];
        args.extend_from_slice(extra);
        Node::start_with(
            home,
            &data_dir(home, name, mflops),
            &boot,
            Transports::Tcp,
            30,
            &args,
        )
    };
    let cheat = serve("cheat", 90_000, &["--fault", &fault]);
    let honest = [serve("honest1", 20_000, &[]), serve("honest2", 10_000, &[])];
    let all: Vec<&str> = std::iter::once(cheat.peer_id.as_str())
        .chain(honest.iter().map(|n| n.peer_id.as_str()))
        .collect();
    let seen = wait_until(Duration::from_secs(30), || {
        coordinator.status(home).is_some_and(|s| {
            let serving: Vec<&str> = s["peers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["models"].as_array().is_some_and(|m| !m.is_empty()))
                .filter_map(|p| p["peer_id"].as_str())
                .collect();
            all.iter().all(|n| serving.contains(n))
        })
    });
    assert!(
        seen.is_some(),
        "the coordinator did not see the three nodes"
    );

    let out = commons(home)
        .arg("--data-dir")
        .arg(home.join("member"))
        .args([
            "job",
            "submit",
            "--json",
            "--chat",
            "--coordinator",
            &coordinator.addrs[0],
            "--model",
            &m,
            "--prompt",
            PROMPT,
            "--max-tokens",
            &TOKENS.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let report = json(&out);
    assert_eq!(tokens(&report), expected, "{report}");
    assert!(report["verified"].as_u64().unwrap() > 0, "{report}");

    let status = coordinator.status(home).unwrap();
    let v = &status["verification"];
    let excluded: Vec<&str> = v["excluded"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["peer_id"].as_str().unwrap())
        .collect();
    assert_eq!(excluded, [cheat.peer_id.as_str()], "{v}");
    assert!(v["mismatches"].as_u64().unwrap() >= 1, "{v}");
    assert!(v["decided"].as_u64().unwrap() >= 1, "{v}");

    // How many of its units the cheat got away with before it was caught,
    // next to the prediction: every result of a new node is checked (p = 1),
    // so P(caught within k units) = 1 - (1 - p f)^k.
    let k = cheat.status(home).unwrap()["counters"]["units_served"]
        .as_u64()
        .unwrap();
    let record = v["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["peer_id"] == cheat.peer_id.as_str())
        .unwrap();
    let agreed = record["valid"].as_u64().unwrap();
    let p = 1.0;
    let predicted = 1.0 - (1.0 - p * FAULT).powi(agreed as i32 + 1);
    println!(
        "the corrupting node served {k} units; {agreed} of its checked results agreed before the one that \
         caught it; P(caught within {} checked units) = 1-(1-p·f)^k = {predicted:.3} (p = {p}, f = {FAULT})",
        agreed + 1
    );
    assert_eq!(record["invalid"], 1, "{record}");
    assert!(k >= 1);
    for n in &honest {
        assert!(!excluded.contains(&n.peer_id.as_str()));
    }
}

/// Serving nodes' ids as the coordinator sees them.
fn serving(coordinator: &Node, home: &Path) -> Vec<String> {
    coordinator
        .status(home)
        .map(|s| {
            s["peers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["models"].as_array().is_some_and(|m| !m.is_empty()))
                .filter_map(|p| p["peer_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn nodes_holding_more_layers_check_a_hop_and_catch_its_lies() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let m = model();
    let reference = json(&output(commons(home).args([
        "run",
        "--json",
        "--chat",
        "--model",
        &m,
        "--prompt",
        PROMPT,
        "--max-tokens",
        &TOKENS.to_string(),
    ])));
    let expected = tokens(&reference);
    let coordinator = Node::start_with(
        home,
        &home.join("coordinator"),
        &[],
        Transports::Tcp,
        30,
        &["--coordinator", "--model", &m],
    );
    let boot = [coordinator.addrs[0].clone()];
    let serve = |name: &str, mflops: u64, layers: &str, extra: &[&str]| {
        let mut args = vec!["--model", m.as_str(), "--layers", layers];
        args.extend_from_slice(extra);
        Node::start_with(
            home,
            &data_dir(home, name, mflops),
            &boot,
            Transports::Tcp,
            30,
            &args,
        )
    };
    // The fast chain is 0..15 then 15..30, which lies on every result. No
    // other node holds 15..30 exactly: two slow ones hold the whole model.
    let fault = "corrupt:1.0:3".to_owned();
    let first = serve("first", 90_000, "0..15", &[]);
    let cheat = serve("cheat", 90_000, "15..30", &["--fault", &fault]);
    let wide = [
        serve("wide1", 9_000, "0..30", &[]),
        serve("wide2", 8_000, "0..30", &[]),
    ];
    let all: Vec<String> = [&first, &cheat, &wide[0], &wide[1]]
        .iter()
        .map(|n| n.peer_id.clone())
        .collect();
    assert!(
        wait_until(Duration::from_secs(30), || {
            let s = serving(&coordinator, home);
            all.iter().all(|n| s.contains(n))
        })
        .is_some(),
        "the coordinator did not see the four nodes"
    );
    let out = commons(home)
        .arg("--data-dir")
        .arg(home.join("member"))
        .args([
            "job",
            "submit",
            "--json",
            "--chat",
            "--coordinator",
            &coordinator.addrs[0],
            "--model",
            &m,
            "--prompt",
            PROMPT,
            "--max-tokens",
            &TOKENS.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let report = json(&out);
    assert_eq!(tokens(&report), expected, "{report}");
    let v = coordinator.status(home).unwrap()["verification"].clone();
    let excluded: Vec<&str> = v["excluded"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["peer_id"].as_str().unwrap())
        .collect();
    assert_eq!(excluded, [cheat.peer_id.as_str()], "{v}");
    assert!(v["decided"].as_u64().unwrap() >= 1, "{v}");
    // The checks ran on the wide nodes, over 15..30 of their 0..30.
    let checked: u64 = wide
        .iter()
        .map(|n| {
            n.status(home).unwrap()["counters"]["units_served"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert!(checked > 0, "no wide node served a unit: {v}");
}
