//! The audit log end to end: a coordinator and two nodes run a job; once the
//! coordinator is stopped, `commons job audit` on its data directory
//! re-verifies every receipt offline and exports one JSON line per receipt.
#![allow(clippy::unwrap_used)] // helpers of tests may fail loudly

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use commons_tests::node::{Node, Transports, wait_until};
use commons_tests::{commons, output, stderr, stdout};

const JOB: &str = "a0d17a0d17a0d17a0d17a0d17a0d17a0";

fn model() -> String {
    commons_node::run_local::bundled_model()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

fn serving(coordinator: &Node, home: &Path, nodes: &[&Node]) -> bool {
    let Some(s) = coordinator.status(home) else {
        return false;
    };
    let serving: Vec<&str> = s["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["models"].as_array().is_some_and(|m| !m.is_empty()))
        .filter_map(|p| p["peer_id"].as_str())
        .collect();
    nodes.iter().all(|n| serving.contains(&n.peer_id.as_str()))
}

fn audit(home: &Path, data_dir: &Path, out: &Path) -> std::process::Output {
    output(
        commons(home)
            .arg("--data-dir")
            .arg(data_dir)
            .args(["job", "audit", JOB, "--out"])
            .arg(out),
    )
}

#[test]
fn a_stopped_coordinators_receipts_audit_offline() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let m = model();
    let coordinator_dir = home.join("coordinator");
    let mut coordinator = Node::start_with(
        home,
        &coordinator_dir,
        &[],
        Transports::Tcp,
        30,
        &["--coordinator", "--model", &m],
    );
    let address = coordinator.addrs[0].clone();
    let nodes: Vec<Node> = [("node1", "0..15"), ("node2", "15..30")]
        .into_iter()
        .map(|(dir, layers)| {
            Node::start_with(
                home,
                &home.join(dir),
                std::slice::from_ref(&address),
                Transports::Tcp,
                30,
                &["--model", &m, "--layers", layers],
            )
        })
        .collect();
    let refs: Vec<&Node> = nodes.iter().collect();
    assert!(
        wait_until(Duration::from_secs(30), || serving(
            &coordinator,
            home,
            &refs
        ))
        .is_some(),
        "the coordinator did not see both serving nodes"
    );

    let out = output(
        commons(home)
            .arg("--data-dir")
            .arg(home.join("member"))
            .args([
                "job",
                "submit",
                "--json",
                "--chat",
                "--coordinator",
                &address,
                "--model",
                &m,
                "--prompt",
                "What is the capital of France?",
                "--max-tokens",
                "6",
                "--job-id",
                JOB,
                "--save-report",
            ])
            .arg(home.join("report.bin")),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let receipts = report["receipts"].as_u64().unwrap();
    // Two hops, a prompt step and a step per token after the first.
    assert!(receipts >= 2 * report["generated_tokens"].as_u64().unwrap());
    // The final report anchors the whole log: every receipt was committed
    // before the job's end was reported.
    assert_eq!(report["audit"]["entries"], receipts, "{report}");

    // While the coordinator runs, its database is locked: said plainly.
    let lines = home.join("audit.jsonl");
    let busy = audit(home, &coordinator_dir, &lines);
    assert!(!busy.status.success());
    assert!(
        stderr(&busy).contains("coordinator is running"),
        "{}",
        stderr(&busy)
    );

    assert!(
        coordinator.terminate(),
        "the coordinator did not stop cleanly"
    );
    let done = audit(home, &coordinator_dir, &lines);
    let summary = stderr(&done);
    assert!(done.status.success(), "{summary}");
    assert!(summary.contains("audit passed"), "{summary}");
    let transcript = report["transcript"].as_str().unwrap();
    assert!(summary.contains(transcript), "{summary}");
    // Held to the signed report the submitter kept.
    let anchored = output(
        commons(home)
            .arg("--data-dir")
            .arg(&coordinator_dir)
            .args(["job", "audit", JOB, "--report"])
            .arg(home.join("report.bin"))
            .arg("--out")
            .arg(home.join("anchored.jsonl")),
    );
    let summary = stderr(&anchored);
    assert!(anchored.status.success(), "{summary}");
    assert!(
        summary.contains(&format!("anchors {receipts} entries")),
        "{summary}"
    );

    let entries: Vec<serde_json::Value> = std::fs::read_to_string(&lines)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(entries.len() as u64, receipts);
    let mut by_executor = BTreeMap::<String, u64>::new();
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e["verified"], true, "{e}");
        assert_eq!(e["seq"], i as u64);
        assert_eq!(e["job"], JOB);
        assert_eq!(e["lane"], "main");
        *by_executor
            .entry(e["executor"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    // Each hop's signed results, as the job's route counted them.
    let route: BTreeMap<String, u64> = report["route"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["node"].as_str().unwrap().to_owned(),
                h["results"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(by_executor, route);
    assert!(nodes.iter().all(|n| by_executor.contains_key(&n.peer_id)));
}
