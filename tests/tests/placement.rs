//! Nodes that place themselves (`--layers auto`): joining one by one they
//! build the pipeline, and when the only server of a span dies, a spare
//! replica moves into it; jobs give the tokens of `commons run` throughout.
#![allow(clippy::unwrap_used)] // helpers of tests may fail loudly

use std::process::Stdio;
use std::time::Duration;

use commons_tests::node::{Node, Transports, wait_until};
use commons_tests::{commons, output, stderr, stdout};

const PROMPT: &str = "What is the capital of France?";

fn model() -> String {
    commons_node::run_local::bundled_model()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

fn tokens(v: &serde_json::Value) -> Vec<u64> {
    v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect()
}

#[test]
fn self_placed_nodes_build_the_pipeline_and_fill_a_lost_span() {
    let home = tempfile::tempdir().unwrap();
    let m = model();
    let run = output(commons(home.path()).args([
        "run",
        "--json",
        "--chat",
        "--model",
        &m,
        "--prompt",
        PROMPT,
        "--max-tokens",
        "12",
    ]));
    assert!(run.status.success(), "{}", stderr(&run));
    let expected = tokens(&serde_json::from_str(stdout(&run).trim()).unwrap());
    // Short adverts, so a dead node leaves the tables within seconds.
    let coordinator = Node::start_with(
        home.path(),
        &home.path().join("coordinator"),
        &[],
        Transports::Tcp,
        6,
        &["--coordinator", "--model", &m],
    );
    let sees = |peer: &str, layers: &str| {
        coordinator.status(home.path()).is_some_and(|s| {
            s["peers"].as_array().is_some_and(|ps| {
                ps.iter().any(|p| {
                    p["peer_id"] == peer
                        && p["models"].as_array().is_some_and(|ms| {
                            ms.iter().any(|x| x.as_str().unwrap().ends_with(layers))
                        })
                })
            })
        })
    };
    let mut nodes = Vec::new();
    let mut spans = Vec::new();
    for i in 0..4 {
        let node = Node::start_with(
            home.path(),
            &home.path().join(format!("node{i}")),
            std::slice::from_ref(&coordinator.addrs[0]),
            Transports::Tcp,
            6,
            &[
                "--model",
                &m,
                "--layers",
                "auto",
                "--max-layers",
                "10",
                "--rebalance-secs",
                "1",
            ],
        );
        let serving = node
            .wait_event("serving", Duration::from_secs(60))
            .expect("the node chose no span");
        let layers = serving["layers"].as_str().unwrap().to_owned();
        assert!(
            wait_until(Duration::from_secs(30), || sees(&node.peer_id, &layers)).is_some(),
            "the coordinator did not learn node {i}'s span"
        );
        spans.push(layers);
        nodes.push(node);
    }
    let mut first_three = spans[..3].to_vec();
    first_three.sort();
    assert_eq!(first_three, ["0..10", "10..20", "20..30"], "{spans:?}");
    let submit = |job: &str| {
        let child = commons(home.path())
            .arg("--data-dir")
            .arg(home.path().join("member"))
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
                "12",
                "--job-id",
                job,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_str::<serde_json::Value>(stdout(&out).trim()).unwrap()
    };
    assert_eq!(
        tokens(&submit("0123456789abcdef0123456789abcdef")),
        expected
    );

    // The only server of a span dies; one of the two nodes serving the
    // replicated span moves there (the one with the lower id).
    let victim = (0..3).find(|&i| spans[i] != spans[3]).unwrap();
    let lost = spans[victim].clone();
    nodes[victim].kill();
    let candidates: Vec<usize> = (0..4).filter(|&i| spans[i] == spans[3]).collect();
    let mut moved = None;
    for _ in 0..60 {
        moved = candidates.iter().find_map(|&i| {
            nodes[i]
                .wait_event("moving", Duration::from_millis(500))
                .map(|e| (i, e))
        });
        if moved.is_some() {
            break;
        }
    }
    let (mover, event) = moved.expect("no node moved into the lost span");
    assert_eq!(event["to"], lost.as_str());
    assert_eq!(event["from"], spans[3].as_str());
    assert!(
        wait_until(Duration::from_secs(30), || sees(
            &nodes[mover].peer_id,
            &lost
        ))
        .is_some()
    );
    // The span it left still has its other server.
    let stayed = candidates.iter().find(|&&i| i != mover).unwrap();
    assert!(sees(&nodes[*stayed].peer_id, &spans[3]));
    assert_eq!(
        tokens(&submit("fedcba9876543210fedcba9876543210")),
        expected
    );
}
