//! Coalitions end to end: charters made and amended with `commons coalition`,
//! nodes that serve only their coalitions' members (units sent by a plain
//! rust-libp2p client), and a coalition's coordinator that runs its members'
//! jobs on its own nodes and refuses everyone else's.
#![allow(clippy::unwrap_used)] // helpers of tests may fail loudly

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use commons_node::executor::model_id;
use commons_node::executor::tiny::{TinySpec, write_tiny_gguf};
use commons_node::network::work::{WORK_PROTOCOL, WorkCodec};
use commons_protocol::envelope::{Envelope, MessageKind};
use commons_protocol::messages::{
    ErrorCode, ErrorReply, InferenceOptions, InferenceUnit, LayerRange, WorkBody, WorkResult,
    WorkUnit,
};
use commons_protocol::{
    CoalitionId, Identity, JobId, ModelId, Nonce, SessionId, Tensor, UnixMillis,
};
use commons_tests::node::{Node, Transports, wait_until};
use commons_tests::{commons, output, stderr, stdout};
use futures::StreamExt as _;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm, noise, tcp, yamux};

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", stderr(out));
    serde_json::from_str(stdout(out).trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(out)))
}

/// A new key in `home/name`; returns its PeerId.
fn member(home: &Path, name: &str) -> String {
    let out = output(
        commons(home)
            .arg("--data-dir")
            .arg(home.join(name))
            .args(["keys", "generate", "--json"]),
    );
    json(&out)["peer_id"].as_str().unwrap().to_owned()
}

/// `commons coalition ARGS…` as the admin whose data directory is `home/admin`.
fn coalition(home: &Path, admin: &str, args: &[&str]) -> std::process::Output {
    output(
        commons(home)
            .arg("--data-dir")
            .arg(home.join(admin))
            .arg("coalition")
            .args(args),
    )
}

/// Founds coalition `name` with the key of `home/admin` and these members; returns (file, id).
fn found(home: &Path, name: &str, members: &[&str]) -> (String, String) {
    let file = home.join(format!("{name}.charter"));
    let file = file.to_str().unwrap().to_owned();
    let mut args = vec!["create", name, "--out", &file, "--json"];
    for m in members {
        args.extend(["--member", m]);
    }
    let charter = json(&coalition(home, "admin", &args));
    assert_eq!(charter["valid"], true, "{charter}");
    (file, charter["id"].as_str().unwrap().to_owned())
}

fn members(charter: &serde_json::Value) -> Vec<&str> {
    charter["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect()
}

#[test]
fn charters_are_founded_amended_signed_and_checked() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let admin = member(h, "admin");
    let second = member(h, "second");
    let (m1, m2) = (member(h, "m1"), member(h, "m2"));
    let file = h.join("riverside.charter");
    let f = file.to_str().unwrap();

    let v1 = json(&coalition(
        h,
        "admin",
        &["create", "riverside", "--out", f, "--member", &m1, "--json"],
    ));
    assert_eq!(v1["version"], 1);
    assert_eq!(v1["valid"], true, "{v1}");
    assert_eq!(v1["threshold"], 1);
    assert_eq!(v1["admins"][0]["peer_id"], admin.as_str());
    assert_eq!(v1["admins"][0]["signed"], true);
    assert_eq!(members(&v1), [m1.as_str()]);
    let again = coalition(h, "admin", &["create", "riverside", "--out", f]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );

    // Every change is a new version, signed again.
    let v2 = json(&coalition(h, "admin", &["add-member", f, &m2, "--json"]));
    assert_eq!(
        (v2["version"].as_u64(), v2["valid"].as_bool()),
        (Some(2), Some(true))
    );
    assert_eq!(v2["id"], v1["id"]);
    assert_eq!(members(&v2), [m1.as_str(), m2.as_str()]);
    let twice = coalition(h, "admin", &["add-member", f, &m2]);
    assert!(!twice.status.success());
    assert!(
        stderr(&twice).contains("already a member"),
        "{}",
        stderr(&twice)
    );
    let v3 = json(&coalition(h, "admin", &["remove-member", f, &m1, "--json"]));
    assert_eq!(v3["version"], 3);
    assert_eq!(members(&v3), [m2.as_str()]);
    // Only an admin may change it.
    let key = h.join("second").join("node.key");
    let outsider = coalition(
        h,
        "admin",
        &["add-member", f, &m1, "--key", key.to_str().unwrap()],
    );
    assert!(!outsider.status.success());
    assert!(
        stderr(&outsider).contains("is not an admin of coalition riverside"),
        "{}",
        stderr(&outsider)
    );
    let shown = json(&coalition(h, "m1", &["show", f, "--json"]));
    assert_eq!(shown, v3);
    let text = stdout(&coalition(h, "m1", &["show", f]));
    assert!(
        text.contains("coalition riverside") && text.contains("valid: yes"),
        "{text}"
    );

    // Two admins of two must sign; a node refuses the charter until they have.
    let hill = h.join("hillside.charter");
    let hf = hill.to_str().unwrap();
    let created = json(&coalition(
        h,
        "admin",
        &[
            "create",
            "hillside",
            "--out",
            hf,
            "--admin-peer",
            &second,
            "--threshold",
            "2",
            "--member",
            &m1,
            "--json",
        ],
    ));
    assert_eq!(created["valid"], false);
    assert!(
        created["problem"]
            .as_str()
            .unwrap()
            .contains("1 valid admin signatures, 2 needed"),
        "{created}"
    );
    let mut join = commons(h)
        .arg("--data-dir")
        .arg(h.join("node"))
        .args([
            "node",
            "join",
            "--no-mdns",
            "--control",
            "127.0.0.1:0",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--coalition",
            hf,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let exited = wait_until(Duration::from_secs(20), || {
        join.try_wait().unwrap().is_some()
    });
    if exited.is_none() {
        let _ = join.kill();
        panic!("a node started with a charter short of signatures");
    }
    let out = join.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not signed by enough admins"),
        "{}",
        stderr(&out)
    );
    let signed = json(&coalition(h, "second", &["sign", hf, "--json"]));
    assert_eq!(signed["valid"], true, "{signed}");
    assert_eq!(signed["version"], 1);
    let twice = coalition(h, "second", &["sign", hf]);
    assert!(!twice.status.success());
    assert!(
        stderr(&twice).contains("already signed"),
        "{}",
        stderr(&twice)
    );

    // A damaged file is refused, not half-read.
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    let bad = coalition(h, "m1", &["show", f]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("is not a coalition charter"),
        "{}",
        stderr(&bad)
    );
}

fn now() -> UnixMillis {
    UnixMillis(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64,
    )
}

/// A bare rust-libp2p client that sends hand-made work units.
struct Client {
    swarm: Swarm<request_response::Behaviour<WorkCodec>>,
    nonce: u8,
}

impl Client {
    fn new() -> Self {
        let swarm = libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(
                tcp::Config::default(),
                noise::Config::new,
                yamux::Config::default,
            )
            .unwrap()
            .with_behaviour(|_| {
                request_response::Behaviour::new(
                    [(WORK_PROTOCOL, ProtocolSupport::Outbound)],
                    request_response::Config::default(),
                )
            })
            .unwrap()
            .build();
        Self { swarm, nonce: 0 }
    }

    /// A prefill unit over all six layers of the tiny model, for `coalition`, signed by `issuer`.
    fn unit(
        &mut self,
        issuer: &Identity,
        model: ModelId,
        coalition: Option<CoalitionId>,
    ) -> Vec<u8> {
        self.nonce += 1;
        let t = now();
        let unit = WorkUnit {
            issuer: issuer.node_id(),
            nonce: Nonce([self.nonce; 16]),
            issued_at: t,
            expires_at: t.plus_millis(60_000),
            body: WorkBody::Inference(InferenceUnit {
                job: JobId([1; 16]),
                model,
                layers: LayerRange { start: 0, end: 6 },
                session: SessionId([self.nonce; 16]),
                step: 0,
                input: Tensor::from_u32(&[1, 3], &[5, 6, 7]).unwrap(),
                options: InferenceOptions {
                    start_pos: 0,
                    max_session_tokens: 64,
                    sampling: None,
                    close_session: true,
                    input_from: None,
                    forward_to: None,
                    order: 0,
                },
                coalition,
            }),
        };
        Envelope::seal(issuer, &unit).unwrap().to_bytes()
    }

    /// Sends `bytes` to `peer`: Ok(result) or Err((code, message)).
    async fn send(
        &mut self,
        peer: PeerId,
        bytes: Vec<u8>,
    ) -> Result<WorkResult, (ErrorCode, String)> {
        self.swarm.behaviour_mut().send_request(&peer, bytes);
        let reply = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                if let SwarmEvent::Behaviour(request_response::Event::Message {
                    message: request_response::Message::Response { response, .. },
                    ..
                }) = self.swarm.select_next_some().await
                {
                    return response;
                }
            }
        })
        .await
        .expect("no answer within 30 s");
        let e = Envelope::from_bytes(&reply).unwrap();
        match e.kind() {
            MessageKind::WorkResult => Ok(e.open(now()).unwrap()),
            MessageKind::ErrorReply => {
                let r: ErrorReply = e.open(now()).unwrap();
                Err((r.code, r.message))
            }
            other => panic!("a {other:?} in answer to a unit"),
        }
    }
}

fn refused(outcome: Result<WorkResult, (ErrorCode, String)>, code: ErrorCode, says: &str) {
    match outcome {
        Ok(_) => panic!("served, but should be refused with {code}"),
        Err((c, message)) => {
            assert_eq!(c, code, "{message}");
            assert!(message.contains(says), "{message:?} should say {says:?}");
        }
    }
}

fn counters(node: &Node, home: &Path) -> serde_json::Value {
    node.status(home).unwrap()["counters"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_run_units_only_for_their_coalitions_and_members() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let model_path = h.join("tiny.gguf");
    write_tiny_gguf(&model_path, &TinySpec::default()).unwrap();
    let model = model_id(&model_path).unwrap();
    let m = model_path.to_str().unwrap();
    let (issuer, outsider) = (
        Identity::from_secret([77; 32]),
        Identity::from_secret([78; 32]),
    );
    let issuer_id = issuer.node_id().to_string();
    let _ = member(h, "admin");
    let (a_file, a_id) = found(h, "riverside", &[&issuer_id]);
    let (_, b_id) = found(h, "hillside", &[&issuer_id]);
    let (a, b): (CoalitionId, CoalitionId) = (a_id.parse().unwrap(), b_id.parse().unwrap());

    let in_a = Node::start_with(
        h,
        &h.join("a"),
        &[],
        Transports::Tcp,
        10,
        &["--model", m, "--coalition", &a_file],
    );
    let open = Node::start_with(
        h,
        &h.join("open"),
        std::slice::from_ref(&in_a.addrs[0]),
        Transports::Tcp,
        10,
        &[
            "--model",
            m,
            "--issuer-units-burst",
            "2",
            "--issuer-units-per-min",
            "1",
        ],
    );
    // The advert says which coalitions a node serves.
    let seen = wait_until(Duration::from_secs(20), || {
        open.status(h).is_some_and(|s| {
            s["peers"].as_array().into_iter().flatten().any(|p| {
                p["peer_id"] == in_a.peer_id.as_str()
                    && p["coalitions"] == serde_json::json!([a_id])
            })
        })
    });
    assert!(
        seen.is_some(),
        "no advert of riverside from the coalition's node"
    );
    assert_eq!(
        in_a.status(h).unwrap()["coalitions"][0]["name"],
        "riverside"
    );

    let mut client = Client::new();
    let (a_peer, open_peer): (PeerId, PeerId) =
        (in_a.peer_id.parse().unwrap(), open.peer_id.parse().unwrap());
    client
        .swarm
        .add_peer_address(a_peer, in_a.addrs[0].parse::<Multiaddr>().unwrap());
    client
        .swarm
        .add_peer_address(open_peer, open.addrs[0].parse::<Multiaddr>().unwrap());

    // The coalition's node: its members' units for it, nothing else.
    let unit = client.unit(&issuer, model, Some(a));
    let result = client.send(a_peer, unit).await.unwrap();
    result.verify().unwrap();
    let unit = client.unit(&issuer, model, Some(b));
    refused(
        client.send(a_peer, unit).await,
        ErrorCode::UNAUTHORIZED,
        &format!("coalition {b_id} is not served here"),
    );
    let unit = client.unit(&issuer, model, None);
    refused(
        client.send(a_peer, unit).await,
        ErrorCode::UNAUTHORIZED,
        "open work",
    );
    let unit = client.unit(&outsider, model, Some(a));
    refused(
        client.send(a_peer, unit).await,
        ErrorCode::UNAUTHORIZED,
        &format!(
            "{} is not a member of coalition riverside",
            outsider.node_id()
        ),
    );

    // A node serving no coalition: open work only, two units at once per issuer.
    let unit = client.unit(&issuer, model, None);
    client.send(open_peer, unit).await.unwrap();
    let unit = client.unit(&issuer, model, Some(a));
    refused(
        client.send(open_peer, unit).await,
        ErrorCode::UNAUTHORIZED,
        "only open work",
    );
    let unit = client.unit(&issuer, model, None);
    client.send(open_peer, unit).await.unwrap();
    let unit = client.unit(&issuer, model, None);
    refused(
        client.send(open_peer, unit).await,
        ErrorCode::OVERLOADED,
        "rate limit",
    );

    // Every refusal is counted, by code, in the status and the metrics.
    let c = counters(&in_a, h);
    assert_eq!(c["units_served"], 1, "{c}");
    assert_eq!(
        c["units_refused"],
        serde_json::json!({ "unauthorized": 3 }),
        "{c}"
    );
    let c = counters(&open, h);
    assert_eq!(c["units_served"], 2, "{c}");
    assert_eq!(
        c["units_refused"],
        serde_json::json!({ "unauthorized": 1, "overloaded": 1 }),
        "{c}"
    );
    let metrics = ureq::get(&format!("http://{}/metrics", open.control))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(
        metrics.contains("commons_units_refused_total{code=\"overloaded\"} 1"),
        "{metrics}"
    );
}

const PROMPT: &str = "What is the capital of France?";

fn bundled() -> String {
    commons_node::run_local::bundled_model()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[test]
fn a_coalitions_coordinator_runs_its_members_jobs_on_its_nodes_only() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let model = bundled();
    let reference = json(&output(commons(h).args([
        "run",
        "--json",
        "--chat",
        "--model",
        &model,
        "--prompt",
        PROMPT,
        "--max-tokens",
        "8",
    ])))["tokens"]
        .clone();
    let _ = member(h, "admin");
    let coordinator_id = member(h, "coordinator");
    let member_id = member(h, "member");
    let _ = member(h, "outsider");
    let (charter, id) = found(h, "riverside", &[&coordinator_id, &member_id]);

    let coordinator = Node::start_with(
        h,
        &h.join("coordinator"),
        &[],
        Transports::Tcp,
        30,
        &[
            "--coordinator",
            "--model",
            &model,
            "--coalition",
            &charter,
            "--member-jobs-burst",
            "1",
            "--member-jobs-per-min",
            "1",
        ],
    );
    let address = coordinator.addrs[0].clone();
    // Two nodes serve the whole model: one for the coalition, one for open work.
    let ours = Node::start_with(
        h,
        &h.join("ours"),
        std::slice::from_ref(&address),
        Transports::Tcp,
        30,
        &["--model", &model, "--coalition", &charter],
    );
    let open = Node::start_with(
        h,
        &h.join("open"),
        std::slice::from_ref(&address),
        Transports::Tcp,
        30,
        &["--model", &model],
    );
    let ready = wait_until(Duration::from_secs(60), || {
        let Some(s) = coordinator.status(h) else {
            return false;
        };
        let peers: Vec<&serde_json::Value> = s["peers"].as_array().into_iter().flatten().collect();
        [&ours, &open].iter().all(|n| {
            peers.iter().any(|p| {
                p["peer_id"] == n.peer_id.as_str()
                    && p["models"].as_array().is_some_and(|m| !m.is_empty())
            })
        })
    });
    assert!(ready.is_some(), "the coordinator did not see both nodes");

    let submit = |who: &str, coalition: Option<&str>| {
        let mut cmd = commons(h);
        cmd.arg("--data-dir").arg(h.join(who)).args([
            "job",
            "submit",
            "--json",
            "--chat",
            "--coordinator",
            &address,
            "--model",
            &model,
            "--prompt",
            PROMPT,
            "--max-tokens",
            "8",
        ]);
        if let Some(c) = coalition {
            cmd.args(["--coalition", c]);
        }
        output(&mut cmd)
    };

    // A member's job runs on the coalition's node, never on the open one.
    let started = Instant::now();
    let report = json(&submit("member", Some(&charter)));
    assert_eq!(report["tokens"], reference, "{report}");
    let route: Vec<&str> = report["route"]
        .as_array()
        .unwrap()
        .iter()
        .map(|hop| hop["node"].as_str().unwrap())
        .collect();
    assert_eq!(route, [ours.peer_id.as_str()], "{report}");
    assert_eq!(report["failovers"], 0);
    eprintln!(
        "member's job done in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Someone else's job for the coalition: refused, naming it.
    let out = submit("outsider", Some(&id));
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("unauthorized") && e.contains("not a member of coalition riverside"),
        "{e}"
    );
    // Open work is not this coordinator's.
    let out = submit("member", None);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("open work"), "{}", stderr(&out));
    // One job a minute per member: the next one is over the limit.
    let out = submit("member", Some(&id));
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains("overloaded") && e.contains("rate limit"), "{e}");

    let c = counters(&coordinator, h);
    assert_eq!(
        c["jobs_refused"],
        serde_json::json!({ "unauthorized": 2, "overloaded": 1 }),
        "{c}"
    );
    assert_eq!(counters(&open, h)["units_served"], 0);
}

/// The coalition entry of `node`'s status for `id`, once it satisfies `ok`.
fn coalition_status(
    node: &Node,
    home: &Path,
    id: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> Option<serde_json::Value> {
    let mut found = None;
    wait_until(Duration::from_secs(30), || {
        found = node.status(home).and_then(|s| {
            s["coalitions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["id"] == id)
                .filter(|c| ok(c))
                .cloned()
        });
        found.is_some()
    });
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charters_travel_through_the_swarm_and_coalitions_change_without_restart() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let model_path = h.join("tiny.gguf");
    write_tiny_gguf(&model_path, &TinySpec::default()).unwrap();
    let model = model_id(&model_path).unwrap();
    let m = model_path.to_str().unwrap();
    let (first, second, outsider) = (
        Identity::from_secret([81; 32]),
        Identity::from_secret([82; 32]),
        Identity::from_secret([83; 32]),
    );
    let _ = member(h, "admin");
    let (file, id_text) = found(h, "riverside", &[&first.node_id().to_string()]);
    let id: CoalitionId = id_text.parse().unwrap();

    // One node has the charter file; the other names the coalition by id only.
    let a = Node::start_with(
        h,
        &h.join("a"),
        &[],
        Transports::Tcp,
        10,
        &["--model", m, "--coalition", &file],
    );
    let b = Node::start_with(
        h,
        &h.join("b"),
        std::slice::from_ref(&a.addrs[0]),
        Transports::Tcp,
        10,
        &["--model", m, "--coalition", &id_text],
    );
    let got = coalition_status(&b, h, &id_text, |c| c["version"] == 1);
    assert!(
        got.is_some(),
        "the charter never reached the node that named the coalition by id: {:?}",
        b.status(h).map(|s| s["coalitions"].clone())
    );
    assert_eq!(got.unwrap()["name"], "riverside");

    let mut client = Client::new();
    let b_peer: PeerId = b.peer_id.parse().unwrap();
    client
        .swarm
        .add_peer_address(b_peer, b.addrs[0].parse::<Multiaddr>().unwrap());
    let unit = client.unit(&first, model, Some(id));
    client.send(b_peer, unit).await.unwrap().verify().unwrap();
    let unit = client.unit(&second, model, Some(id));
    refused(
        client.send(b_peer, unit).await,
        ErrorCode::UNAUTHORIZED,
        "is not a member of coalition riverside",
    );

    // The admin adds a member and hands the new version to node a; node b
    // serves it without a restart.
    let out = coalition(
        h,
        "admin",
        &["add-member", &file, &second.node_id().to_string(), "--json"],
    );
    assert_eq!(json(&out)["version"], 2);
    let published = output(
        commons(h)
            .args(["coalition", "publish", &file, "--control", &a.control])
            .arg("--json"),
    );
    let published = json(&published);
    assert_eq!(published["changed"], true, "{published}");
    assert_eq!(published["version"], 2, "{published}");
    assert!(
        coalition_status(&b, h, &id_text, |c| c["version"] == 2).is_some(),
        "version 2 never reached node b"
    );
    let unit = client.unit(&second, model, Some(id));
    client.send(b_peer, unit).await.unwrap().verify().unwrap();
    // The old file again: nothing changes.
    let v1_again = output(
        commons(h)
            .args(["coalition", "publish", &file, "--control", &a.control])
            .arg("--json"),
    );
    assert_eq!(json(&v1_again)["changed"], false);

    // A charter claiming riverside's id, signed by someone who is not its
    // admin, at a higher version: refused and counted, nothing changes.
    let mut forged = commons_protocol::messages::CoalitionCharter::found(
        "riverside",
        &[outsider.node_id()],
        1,
        &[outsider.node_id()],
        now(),
    )
    .unwrap();
    forged.id = id;
    forged.version = 9;
    forged.sign_as(&outsider).unwrap();
    let forged_file = h.join("forged.charter");
    std::fs::write(
        &forged_file,
        Envelope::seal(&outsider, &forged).unwrap().to_bytes(),
    )
    .unwrap();
    let out = commons(h)
        .args(["coalition", "publish"])
        .arg(&forged_file)
        .args(["--control", &a.control])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not the one founded by this name and these admins"),
        "{}",
        stderr(&out)
    );
    let sealed = std::fs::read(&forged_file).unwrap();
    let answer = ureq::post(&format!("http://{}/v1/charters", a.control))
        .config()
        .http_status_as_error(false)
        .build()
        .send(&sealed[..])
        .unwrap();
    assert_eq!(answer.status(), 422);
    assert_eq!(counters(&a, h)["charters_rejected"], 1);
    assert_eq!(
        coalition_status(&a, h, &id_text, |_| true).unwrap()["version"],
        2
    );

    // Node b drops the coalition while running: its work is refused from
    // then on, and node a sees b's advert without it.
    let out = output(
        commons(h)
            .args(["node", "drop", &id_text, "--control", &b.control])
            .arg("--json"),
    );
    assert_eq!(json(&out)["served"], false);
    let unit = client.unit(&first, model, Some(id));
    refused(
        client.send(b_peer, unit).await,
        ErrorCode::UNAUTHORIZED,
        &format!("coalition {id_text} is not served here"),
    );
    let seen = wait_until(Duration::from_secs(20), || {
        a.status(h).is_some_and(|s| {
            s["peers"].as_array().into_iter().flatten().any(|p| {
                p["peer_id"] == b.peer_id.as_str() && p["coalitions"] == serde_json::json!([])
            })
        })
    });
    assert!(seen.is_some(), "node a still sees b serving riverside");
    // And takes it up again, from the charter it kept: version 2.
    let out = output(
        commons(h)
            .args(["node", "serve", &id_text, "--control", &b.control])
            .arg("--json"),
    );
    let out = json(&out);
    assert_eq!(
        (out["served"].clone(), out["version"].clone()),
        (true.into(), 2.into())
    );
    let unit = client.unit(&second, model, Some(id));
    client.send(b_peer, unit).await.unwrap().verify().unwrap();
}
