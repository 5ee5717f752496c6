//! Jobs over a swarm of real processes on loopback: a coordinator and nodes
//! serving layer ranges of the bundled model. The text must equal `commons
//! run` on one machine, with or without a node killed mid-job.
#![allow(clippy::unwrap_used)] // helpers of tests may fail loudly

use std::hash::{BuildHasher as _, Hasher as _};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use commons_tests::node::{Node, Transports, wait_until};
use commons_tests::{commons, output, stderr, stdout};

const PROMPT: &str = "What is the capital of France?";

fn model() -> String {
    commons_node::run_local::bundled_model()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// `commons run --json` on one machine: the reference tokens.
fn reference(home: &Path, prompt: &str, max_tokens: u32) -> Vec<u64> {
    let out = output(commons(home).args([
        "run",
        "--json",
        "--chat",
        "--model",
        &model(),
        "--prompt",
        prompt,
        "--max-tokens",
        &max_tokens.to_string(),
    ]));
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect()
}

struct Swarm {
    home: tempfile::TempDir,
    coordinator: Node,
    nodes: Vec<Node>,
    started: usize,
}

impl Swarm {
    fn new() -> Self {
        let home = tempfile::tempdir().unwrap();
        let m = model();
        let coordinator = Node::start_with(
            home.path(),
            &home.path().join("coordinator"),
            &[],
            Transports::Tcp,
            30,
            &["--coordinator", "--model", &m],
        );
        Self {
            home,
            coordinator,
            nodes: Vec::new(),
            started: 0,
        }
    }

    fn address(&self) -> String {
        self.coordinator.addrs[0].clone()
    }

    /// Starts a node serving `layers`, joined through the coordinator.
    fn serve(&mut self, layers: &str) -> usize {
        self.started += 1;
        let node = Node::start_with(
            self.home.path(),
            &self.home.path().join(format!("node{}", self.started)),
            &[self.address()],
            Transports::Tcp,
            30,
            &["--model", &model(), "--layers", layers],
        );
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Waits until the coordinator has the advert of every live node, `n` of them.
    fn wait_for_servers(&self, n: usize) {
        assert_eq!(self.nodes.len(), n);
        let ok = wait_until(Duration::from_secs(30), || {
            let Some(s) = self.coordinator.status(self.home.path()) else {
                return false;
            };
            let serving: Vec<&str> = s["peers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["models"].as_array().is_some_and(|m| !m.is_empty()))
                .filter_map(|p| p["peer_id"].as_str())
                .collect();
            self.nodes
                .iter()
                .all(|n| serving.contains(&n.peer_id.as_str()))
        });
        assert!(
            ok.is_some(),
            "the coordinator did not see {n} serving nodes"
        );
    }

    fn submit(&self, prompt: &str, max_tokens: u32, model: &str) -> std::process::Command {
        self.submit_as("member", prompt, max_tokens, model)
    }

    fn submit_as(
        &self,
        member: &str,
        prompt: &str,
        max_tokens: u32,
        model: &str,
    ) -> std::process::Command {
        self.submit_via(&self.address(), member, prompt, max_tokens, model)
    }

    /// `job submit` of `member` to the coordinator at `coordinator`.
    fn submit_via(
        &self,
        coordinator: &str,
        member: &str,
        prompt: &str,
        max_tokens: u32,
        model: &str,
    ) -> std::process::Command {
        let mut cmd = commons(self.home.path());
        cmd.arg("--data-dir")
            .arg(self.home.path().join(member))
            .args([
                "job",
                "submit",
                "--json",
                "--chat",
                "--coordinator",
                coordinator,
                "--model",
                model,
                "--prompt",
                prompt,
                "--max-tokens",
                &max_tokens.to_string(),
            ]);
        cmd
    }

    fn status(&self, job: &str) -> Option<serde_json::Value> {
        let out = commons(self.home.path())
            .arg("--data-dir")
            .arg(self.home.path().join("watcher"))
            .args([
                "job",
                "status",
                "--json",
                "--coordinator",
                &self.address(),
                job,
            ])
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }
}

fn tokens(report: &serde_json::Value) -> Vec<u64> {
    report["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect()
}

fn finish(child: Child) -> serde_json::Value {
    let out = child.wait_with_output().unwrap();
    let text = stdout(&out);
    assert!(out.status.success(), "job failed: {text}\n{}", stderr(&out));
    serde_json::from_str(text.trim()).unwrap()
}

#[test]
fn three_nodes_and_a_coordinator_give_the_tokens_of_commons_run() {
    let mut swarm = Swarm::new();
    let expected = reference(swarm.home.path(), PROMPT, 32);
    assert!(expected.len() >= 8, "{expected:?}");
    swarm.serve("0..10");
    swarm.serve("20..30");
    swarm.wait_for_servers(2);

    // A gap at layer 10: refused at once, with the reason.
    let started = Instant::now();
    let out = output(&mut swarm.submit(PROMPT, 32, &model()));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no chain of nodes") && stderr(&out).contains("layer 10"),
        "{}",
        stderr(&out)
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    // A model the coordinator does not know.
    let out = output(&mut swarm.submit(PROMPT, 8, &"ab".repeat(32)));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("plans no jobs for model"),
        "{}",
        stderr(&out)
    );

    swarm.serve("10..20");
    swarm.wait_for_servers(3);
    let report = finish(
        swarm
            .submit(PROMPT, 32, &model())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    assert_eq!(tokens(&report), expected);
    let route: Vec<&str> = report["route"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["layers"].as_str().unwrap())
        .collect();
    assert_eq!(route, ["0..10", "10..20", "20..30"]);
    // Every step of every hop came back signed and committed.
    assert_eq!(
        report["receipts"].as_u64().unwrap() as usize,
        3 * expected.len()
    );
    assert_eq!(report["failovers"], 0);
    for (hop, node) in report["route"].as_array().unwrap().iter().zip(&swarm.nodes) {
        let _ = node;
        assert_eq!(hop["results"].as_u64().unwrap() as usize, expected.len());
    }
    // The chain streamed: every step went to every hop at once, each node
    // handing its output to the next (the last its token to the first).
    let streaming = &swarm.coordinator.status(swarm.home.path()).unwrap()["streaming"];
    assert!(
        streaming["steps"].as_u64().unwrap() as usize >= expected.len(),
        "{streaming}"
    );
    assert_eq!(streaming["mismatches"], 0, "{streaming}");
    let forwarded = |swarm: &Swarm| -> Vec<u64> {
        swarm
            .nodes
            .iter()
            .map(|n| {
                n.status(swarm.home.path()).unwrap()["counters"]["outputs_forwarded"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    };
    let before = forwarded(&swarm);
    assert!(before.iter().all(|&n| n > 0), "{before:?}");

    // A coordinator that sends each hop its input itself gets the same text,
    // and no node forwards anything for it.
    // (Joined through every node: a coordinator plans with connected peers.)
    let peers: Vec<String> = swarm.nodes.iter().map(|n| n.addrs[0].clone()).collect();
    let relaying = Node::start_with(
        swarm.home.path(),
        &swarm.home.path().join("relaying"),
        &peers,
        Transports::Tcp,
        30,
        &["--coordinator", "--model", &model(), "--stream-depth", "0"],
    );
    let ok = wait_until(Duration::from_secs(30), || {
        relaying.status(swarm.home.path()).is_some_and(|s| {
            let known: Vec<&str> = s["peers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["models"].as_array().is_some_and(|m| !m.is_empty()))
                .filter_map(|p| p["peer_id"].as_str())
                .collect();
            swarm
                .nodes
                .iter()
                .all(|n| known.contains(&n.peer_id.as_str()))
                && s["connected_peers"].as_u64() >= Some(3)
        })
    });
    assert!(ok.is_some(), "the second coordinator did not see the nodes");
    let report = finish(
        swarm
            .submit_via(&relaying.addrs[0], "member", PROMPT, 32, &model())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    assert_eq!(tokens(&report), expected);
    assert_eq!(forwarded(&swarm), before);
    let streaming = &relaying.status(swarm.home.path()).unwrap()["streaming"];
    assert_eq!(streaming["steps"], 0, "{streaming}");
}

#[test]
fn a_node_that_forwards_other_outputs_than_it_reports_changes_nothing_in_the_text() {
    let mut swarm = Swarm::new();
    let expected = reference(swarm.home.path(), PROMPT, 24);
    // The first hop sends the second a corrupted output every time, and the
    // coordinator its true one, signed.
    let liar = Node::start_with(
        swarm.home.path(),
        &swarm.home.path().join("liar"),
        &[swarm.address()],
        Transports::Tcp,
        30,
        &[
            "--model",
            &model(),
            "--layers",
            "0..10",
            "--fault",
            "equivocate:1",
        ],
    );
    swarm.nodes.push(liar);
    swarm.serve("10..20");
    swarm.serve("20..30");
    swarm.wait_for_servers(3);
    let report = finish(
        swarm
            .submit(PROMPT, 24, &model())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    assert_eq!(tokens(&report), expected);
    // Neither side of the mismatch is blamed: no node replaced.
    assert_eq!(report["failovers"], 0, "{report}");
    assert_eq!(
        report["receipts"].as_u64().unwrap() as usize,
        3 * expected.len()
    );
    let streaming = &swarm.coordinator.status(swarm.home.path()).unwrap()["streaming"];
    assert_eq!(streaming["mismatches"], 1, "{streaming}");
}

#[test]
fn killing_the_middle_node_mid_job_leaves_the_text_unchanged() {
    const TRIALS: usize = 5;
    const TOKENS: u32 = 40;
    let mut swarm = Swarm::new();
    let expected = reference(swarm.home.path(), PROMPT, TOKENS);
    assert!(expected.len() >= 20, "{expected:?}");
    swarm.serve("0..10");
    swarm.serve("20..30");
    swarm.serve("10..20");
    swarm.serve("10..20");
    swarm.wait_for_servers(4);
    let seed = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    for trial in 0..TRIALS {
        // Kill after a random number of tokens (the first ones are the prompt's prefill).
        let kill_at = 1 + (seed.rotate_left(trial as u32 * 13) % (expected.len() as u64 - 8));
        let job = format!("{:016x}{:016x}", seed, trial as u64 + 1);
        let child = swarm
            .submit(PROMPT, TOKENS, &model())
            .args(["--job-id", &job])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let victim = {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                assert!(
                    Instant::now() < deadline,
                    "trial {trial}: the job did not get going"
                );
                if let Some(r) = swarm.status(&job)
                    && r["generated_tokens"].as_u64().unwrap_or(0) >= kill_at
                {
                    break r["route"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|h| h["layers"] == "10..20" && h["results"].as_u64() > Some(0))
                        .map(|h| h["node"].as_str().unwrap().to_owned())
                        .unwrap();
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        let index = swarm
            .nodes
            .iter()
            .position(|n| n.peer_id == victim)
            .unwrap();
        swarm.nodes[index].kill();
        let report = finish(child);
        assert_eq!(
            tokens(&report),
            expected,
            "trial {trial}, killed at token {kill_at}"
        );
        assert!(report["failovers"].as_u64().unwrap() >= 1, "{report}");
        // Replace the dead node for the next trial.
        swarm.nodes.remove(index);
        swarm.serve("10..20");
        swarm.wait_for_servers(4);
    }
}

#[test]
fn four_concurrent_jobs_all_complete() {
    let mut swarm = Swarm::new();
    let prompts = [
        PROMPT,
        "Name a colour.",
        "What is two plus two?",
        "Write a word that rhymes with cat.",
    ];
    let expected: Vec<Vec<u64>> = prompts
        .iter()
        .map(|p| reference(swarm.home.path(), p, 24))
        .collect();
    swarm.serve("0..15");
    swarm.serve("15..30");
    swarm.wait_for_servers(2);
    let children: Vec<Child> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            // Two members, two jobs each.
            swarm
                .submit_as(&format!("member{}", i % 2), p, 24, &model())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, child) in children.into_iter().enumerate() {
        let report = finish(child);
        assert_eq!(tokens(&report), expected[i], "job {i}: {}", prompts[i]);
    }
}

#[test]
fn a_coordinator_killed_mid_job_resumes_it_after_restart() {
    const TOKENS: u32 = 48;
    let home = tempfile::tempdir().unwrap();
    let expected = reference(home.path(), PROMPT, TOKENS);
    assert!(expected.len() >= 24, "{expected:?}");
    // The coordinator comes back on the same port, as a service would.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("/ip4/127.0.0.1/tcp/{port}");
    let m = model();
    let start_coordinator = || {
        Node::start_with(
            home.path(),
            &home.path().join("coordinator"),
            &[],
            Transports::Quic,
            30,
            &["--listen", &listen, "--coordinator", "--model", &m],
        )
    };
    let mut coordinator = start_coordinator();
    let address = format!("{listen}/p2p/{}", coordinator.peer_id);
    let nodes: Vec<Node> = ["0..15", "15..30"]
        .iter()
        .enumerate()
        .map(|(i, layers)| {
            Node::start_with(
                home.path(),
                &home.path().join(format!("node{i}")),
                std::slice::from_ref(&address),
                Transports::Tcp,
                30,
                &["--model", &m, "--layers", layers],
            )
        })
        .collect();
    let serving = |c: &Node| {
        c.status(home.path()).is_some_and(|s| {
            s["peers"].as_array().is_some_and(|ps| {
                nodes.iter().all(|n| {
                    ps.iter().any(|p| {
                        p["peer_id"] == n.peer_id.as_str()
                            && p["models"].as_array().is_some_and(|m| !m.is_empty())
                    })
                })
            })
        })
    };
    assert!(wait_until(Duration::from_secs(30), || serving(&coordinator)).is_some());

    let job = "c0ffee00c0ffee00c0ffee00c0ffee00";
    let child = commons(home.path())
        .arg("--data-dir")
        .arg(home.path().join("member"))
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
            PROMPT,
            "--max-tokens",
            &TOKENS.to_string(),
            "--job-id",
            job,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = |what: &str| -> Option<serde_json::Value> {
        let out = commons(home.path())
            .arg("--data-dir")
            .arg(home.path().join("watcher"))
            .args(["job", "status", "--json", "--coordinator", &address, what])
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let at_kill = loop {
        assert!(Instant::now() < deadline, "the job did not get going");
        if let Some(r) = status(job)
            && r["generated_tokens"].as_u64().unwrap_or(0) >= 8
        {
            break r;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    coordinator.kill();
    assert_eq!(at_kill["state"], "running", "killed mid-job: {at_kill}");
    coordinator = start_coordinator();
    // The member's command follows the job through the restart.
    let report = finish(child);
    assert_eq!(tokens(&report), expected);
    // The restarted coordinator knows the job's outcome.
    let after = status(job).unwrap();
    assert_eq!(after["state"], report["state"]);
    drop(coordinator);
}

#[test]
fn the_demo_answers_through_a_local_swarm_and_shuts_it_down() {
    let home = tempfile::tempdir().unwrap();
    let out = output(commons(home.path()).args([
        "demo",
        "--model",
        &model(),
        "--max-tokens",
        "12",
        "--nodes",
        "3",
    ]));
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    // The node processes leave cleanly too: none of them panics on its way out.
    assert!(!err.contains("panicked"), "{err}");
    for layers in ["0..10", "10..20", "20..30"] {
        assert!(
            err.contains(&format!("layers {layers:>7}  node 12D3KooW")),
            "{err}"
        );
    }
    assert!(err.contains("36 signed results"), "{err}");
    assert!(err.contains("transcript "), "{err}");
    // The answer is the one `commons run` gives.
    let run = output(commons(home.path()).args([
        "run",
        "--chat",
        "--model",
        &model(),
        "--prompt",
        PROMPT,
        "--max-tokens",
        "12",
    ]));
    assert!(
        stdout(&out).contains(stdout(&run).trim()),
        "{}",
        stdout(&out)
    );
}
