//! Hostile input while honest work runs: a peer floods a serving node with
//! 1,000 malformed work units (garbage bytes, truncated and tampered
//! envelopes, forged signers, replays, layers not held) during a member's
//! job. Each gets a typed refusal or dies with the flooding connection, and
//! the honest job finishes with the text of `commons run`.
#![allow(clippy::unwrap_used)] // helpers of tests may fail loudly

use std::process::Stdio;
use std::time::{Duration, Instant};

use commons_node::network::work::{WORK_PROTOCOL, WorkCodec};
use commons_protocol::envelope::{Envelope, MessageKind};
use commons_protocol::messages::{
    ErrorReply, InferenceOptions, InferenceUnit, LayerRange, WorkBody, WorkUnit,
};
use commons_protocol::{Identity, JobId, ModelId, Nonce, SessionId, Tensor, UnixMillis};
use commons_tests::node::{Node, Transports, wait_until};
use commons_tests::{commons, output, stderr, stdout};
use futures::StreamExt as _;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, noise, tcp, yamux};

const PROMPT: &str = "What is the capital of France?";

fn model() -> String {
    commons_node::run_local::bundled_model()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

fn now() -> UnixMillis {
    UnixMillis(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64,
    )
}

/// The i-th hostile request: a mix of everything a broken or malicious peer sends.
fn hostile(i: u32, model: ModelId, liar: &Identity, victim_signer: &Identity) -> Vec<u8> {
    let t = now();
    let unit = |nonce: u32, layers: (u32, u32)| WorkUnit {
        issuer: liar.node_id(),
        nonce: Nonce([nonce as u8; 16]),
        issued_at: t,
        expires_at: t.plus_millis(60_000),
        body: WorkBody::Inference(InferenceUnit {
            job: JobId([9; 16]),
            model,
            layers: LayerRange {
                start: layers.0,
                end: layers.1,
            },
            session: SessionId([i as u8; 16]),
            step: 0,
            input: Tensor::from_u32(&[1, 1], &[1]).unwrap(),
            options: InferenceOptions {
                start_pos: 0,
                max_session_tokens: 16,
                sampling: None,
                close_session: false,
                input_from: None,
                forward_to: None,
                order: 0,
            },
            coalition: None,
        }),
    };
    match i % 6 {
        // Random bytes.
        0 => (0..(i % 997 + 1)).map(|k| (k * 31 + i) as u8).collect(),
        // A valid envelope cut short.
        1 => {
            let b = Envelope::seal(liar, &unit(i, (0, 15))).unwrap().to_bytes();
            b[..b.len() / 2].to_vec()
        }
        // One flipped byte in the payload: the signature no longer holds.
        2 => {
            let mut b = Envelope::seal(liar, &unit(i, (0, 15))).unwrap().to_bytes();
            let last = b.len() - 1;
            b[last] ^= 0x55;
            b
        }
        // Signed by someone other than the issuer it names.
        3 => {
            let mut u = unit(i, (0, 15));
            u.issuer = victim_signer.node_id();
            Envelope::seal(liar, &u)
                .map(|e| e.to_bytes())
                .unwrap_or_default()
        }
        // The same nonce again and again: replays.
        4 => Envelope::seal(liar, &unit(4, (0, 15))).unwrap().to_bytes(),
        // Well formed, for layers this node does not hold.
        _ => Envelope::seal(liar, &unit(i, (0, 30))).unwrap().to_bytes(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_malformed_units_does_not_disturb_an_honest_job() {
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
        "24",
    ]));
    assert!(run.status.success(), "{}", stderr(&run));
    let reference: serde_json::Value = serde_json::from_str(stdout(&run).trim()).unwrap();

    let coordinator = Node::start_with(
        home.path(),
        &home.path().join("coordinator"),
        &[],
        Transports::Tcp,
        30,
        &["--coordinator", "--model", &m],
    );
    let nodes: Vec<Node> = ["0..15", "15..30"]
        .iter()
        .enumerate()
        .map(|(i, layers)| {
            Node::start_with(
                home.path(),
                &home.path().join(format!("node{i}")),
                std::slice::from_ref(&coordinator.addrs[0]),
                Transports::Tcp,
                30,
                &["--model", &m, "--layers", layers],
            )
        })
        .collect();
    let ready = wait_until(Duration::from_secs(30), || {
        coordinator.status(home.path()).is_some_and(|s| {
            nodes.iter().all(|n| {
                s["peers"].as_array().is_some_and(|ps| {
                    ps.iter().any(|p| {
                        p["peer_id"] == n.peer_id.as_str()
                            && p["models"].as_array().is_some_and(|x| !x.is_empty())
                    })
                })
            })
        })
    });
    assert!(ready.is_some(), "the coordinator did not see its nodes");

    // The honest job, in its own process.
    let job = commons(home.path())
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
            "24",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // The flood, at the node serving the first half.
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| {
            request_response::Behaviour::<WorkCodec>::new(
                [(WORK_PROTOCOL, ProtocolSupport::Outbound)],
                request_response::Config::default()
                    .with_request_timeout(Duration::from_secs(30))
                    .with_max_concurrent_streams(64),
            )
        })
        .unwrap()
        .build();
    let target: PeerId = nodes[0].peer_id.parse().unwrap();
    swarm.add_peer_address(target, nodes[0].addrs[0].parse::<Multiaddr>().unwrap());
    let model = commons_node::executor::model_id(std::path::Path::new(&m)).unwrap();
    let (liar, other) = (
        Identity::from_secret([66; 32]),
        Identity::from_secret([67; 32]),
    );
    const FLOOD: u32 = 1000;
    for i in 0..FLOOD {
        swarm
            .behaviour_mut()
            .send_request(&target, hostile(i, model, &liar, &other));
    }
    let (mut refused, mut failed, mut ran) = (0u32, 0u32, 0u32);
    let mut failures = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while refused + failed + ran < FLOOD && Instant::now() < deadline {
        let event = tokio::time::timeout(Duration::from_secs(5), swarm.select_next_some()).await;
        match event {
            Ok(SwarmEvent::Behaviour(request_response::Event::Message {
                message: request_response::Message::Response { response, .. },
                ..
            })) => {
                let e = Envelope::from_bytes(&response).unwrap();
                if e.kind() == MessageKind::WorkResult {
                    // The first of the units that share a nonce is well formed
                    // work on an open node, and is run; its copies are replays.
                    ran += 1;
                    continue;
                }
                assert_eq!(e.kind(), MessageKind::ErrorReply);
                let reply: ErrorReply = e.open(now()).unwrap();
                assert!(!reply.message.is_empty());
                refused += 1;
            }
            Ok(SwarmEvent::Behaviour(request_response::Event::OutboundFailure {
                error, ..
            })) => {
                failures.insert(error.to_string());
                failed += 1;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    // Every hostile request was answered with a typed refusal, or died with
    // the flooding connection (the node's stream limits close a peer that
    // opens streams far faster than they are served); none went unanswered.
    let some: Vec<&String> = failures.iter().take(3).collect();
    assert_eq!(
        refused + failed + ran,
        FLOOD,
        "{refused} refused, {failed} failed: {some:?}"
    );
    assert!(ran <= 1, "{ran} hostile units were run");
    assert!(refused > 0, "no typed refusal: {some:?}");
    eprintln!(
        "flood: {refused} refused with a typed error, {failed} cut with the connection, {ran} run"
    );

    // The honest job was not disturbed.
    let out = tokio::task::spawn_blocking(move || job.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(report["tokens"], reference["tokens"]);
    // The node counted what it refused, by code, and still answers.
    let status = nodes[0].status(home.path()).unwrap();
    let counted: u64 = status["counters"]["units_refused"]
        .as_object()
        .map(|m| m.values().filter_map(serde_json::Value::as_u64).sum())
        .unwrap_or(0);
    assert!(counted >= u64::from(refused), "{status}");
}
