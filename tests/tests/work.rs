//! Work units over the network: a model split over two `commons node join`
//! processes answers signed inference units with signed, committed results
//! that equal running the model in one process, bit for bit.
#![allow(clippy::unwrap_used)] // helpers of tests may fail loudly

use std::time::Duration;

use candle_core::Device;
use commons_node::executor::tiny::{TinySpec, write_tiny_gguf};
use commons_node::executor::{ModelFile, Pipeline, Stage, model_id};
use commons_node::network::work::{WORK_PROTOCOL, WorkCodec};
use commons_protocol::envelope::{Envelope, MessageKind};
use commons_protocol::messages::{
    ErrorCode, ErrorReply, InferenceOptions, InferenceUnit, LayerRange, SamplingParams, WorkBody,
    WorkResult, WorkUnit,
};
use commons_protocol::{Identity, JobId, ModelId, Nonce, SessionId, Tensor, UnixMillis};
use commons_tests::node::{Node, Transports};
use futures::StreamExt as _;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm, noise, tcp, yamux};

fn now() -> UnixMillis {
    UnixMillis(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64,
    )
}

struct Client {
    swarm: Swarm<request_response::Behaviour<WorkCodec>>,
    issuer: Identity,
    nonce: u8,
    /// Units are issued this long before now.
    backdate_ms: u64,
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
        Self {
            swarm,
            issuer: Identity::from_secret([77; 32]),
            nonce: 0,
            backdate_ms: 0,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn unit(
        &mut self,
        model: ModelId,
        layers: (u32, u32),
        session: u8,
        start_pos: u32,
        input: Tensor,
        greedy: bool,
    ) -> Vec<u8> {
        self.nonce += 1;
        let t = UnixMillis(now().0 - self.backdate_ms);
        let unit = WorkUnit {
            issuer: self.issuer.node_id(),
            nonce: Nonce([self.nonce; 16]),
            issued_at: t,
            expires_at: t.plus_millis(60_000),
            body: WorkBody::Inference(InferenceUnit {
                job: JobId([1; 16]),
                model,
                layers: LayerRange {
                    start: layers.0,
                    end: layers.1,
                },
                session: SessionId([session; 16]),
                step: u64::from(start_pos),
                input,
                options: InferenceOptions {
                    start_pos,
                    max_session_tokens: 128,
                    sampling: greedy.then_some(SamplingParams {
                        temperature: 0.0,
                        top_k: 0,
                        top_p: 1.0,
                        repetition_penalty: 1.0,
                        seed: 0,
                    }),
                    close_session: false,
                    input_from: None,
                    forward_to: None,
                    order: 0,
                },
                coalition: None,
            }),
        };
        Envelope::seal(&self.issuer, &unit).unwrap().to_bytes()
    }

    async fn exchange(&mut self, peer: PeerId, bytes: Vec<u8>) -> Envelope {
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
        Envelope::from_bytes(&reply).unwrap()
    }
}

fn result(e: &Envelope, executor: &str) -> WorkResult {
    assert_eq!(e.kind(), MessageKind::WorkResult, "expected a result");
    let r: WorkResult = e.open(now()).unwrap();
    r.verify().unwrap();
    assert_eq!(r.executor.to_string(), executor);
    r
}

fn error_code(e: &Envelope) -> ErrorCode {
    assert_eq!(e.kind(), MessageKind::ErrorReply, "expected an error reply");
    e.open::<ErrorReply>(now()).unwrap().code
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_split_over_two_nodes_equals_one_process() {
    let home = tempfile::tempdir().unwrap();
    let model_path = home.path().join("tiny.gguf");
    write_tiny_gguf(&model_path, &TinySpec::default()).unwrap();
    let model = model_id(&model_path).unwrap();
    let m = model_path.to_str().unwrap();
    let a = Node::start_with(
        home.path(),
        &home.path().join("a"),
        &[],
        Transports::Tcp,
        10,
        &["--model", m, "--layers", "0..3"],
    );
    let b = Node::start_with(
        home.path(),
        &home.path().join("b"),
        &[],
        Transports::Tcp,
        10,
        &["--model", m, "--layers", "3..6"],
    );

    let mut client = Client::new();
    let (a_id, b_id): (PeerId, PeerId) = (a.peer_id.parse().unwrap(), b.peer_id.parse().unwrap());
    client
        .swarm
        .add_peer_address(a_id, a.addrs[0].parse::<Multiaddr>().unwrap());
    client
        .swarm
        .add_peer_address(b_id, b.addrs[0].parse::<Multiaddr>().unwrap());

    // The same model in one process.
    let file = ModelFile::open(&model_path).unwrap();
    let local = Pipeline::new(vec![Stage::load(&file, 0..6, &Device::Cpu).unwrap()]).unwrap();
    let mut caches = local.new_caches();
    let prompt: Vec<u32> = (3..20).collect();
    let expected = local
        .forward(&prompt, &mut caches)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();

    // Prefill: tokens to a, hidden states to b, logits back.
    let n = prompt.len() as u64;
    let first = client.unit(
        model,
        (0, 3),
        1,
        0,
        Tensor::from_u32(&[1, n], &prompt).unwrap(),
        false,
    );
    let hidden = result(&client.exchange(a_id, first.clone()).await, &a.peer_id);
    let to_b = client.unit(model, (3, 6), 1, 0, hidden.outputs[0].clone(), false);
    let logits = result(&client.exchange(b_id, to_b).await, &b.peer_id);
    assert_eq!(bits(&logits.outputs[0].to_f32().unwrap()), bits(&expected));

    // A decode step through both sessions, sampled greedily on b.
    let token = commons_node::executor::stage::argmax(
        &candle_core::Tensor::new(expected.as_slice(), &Device::Cpu).unwrap(),
    )
    .unwrap();
    let expected_next =
        commons_node::executor::stage::argmax(&local.forward(&[token], &mut caches).unwrap())
            .unwrap();
    let step_a = client.unit(
        model,
        (0, 3),
        1,
        n as u32,
        Tensor::from_u32(&[1, 1], &[token]).unwrap(),
        false,
    );
    let hidden = result(&client.exchange(a_id, step_a).await, &a.peer_id);
    let step_b = client.unit(model, (3, 6), 1, n as u32, hidden.outputs[0].clone(), true);
    let next = result(&client.exchange(b_id, step_b).await, &b.peer_id);
    assert_eq!(next.outputs[0].to_u32().unwrap(), vec![expected_next]);

    // Refusals, each with its stable code: a replayed unit, an expired one,
    // layers not held, a session that does not exist at that position.
    assert_eq!(
        error_code(&client.exchange(a_id, first).await),
        ErrorCode::REPLAYED
    );
    // Issued two minutes ago, valid for one: expired well past the clock skew allowed.
    client.backdate_ms = 120_000;
    let stale = client.unit(
        model,
        (0, 3),
        3,
        0,
        Tensor::from_u32(&[1, 1], &[5]).unwrap(),
        false,
    );
    client.backdate_ms = 0;
    assert_eq!(
        error_code(&client.exchange(a_id, stale).await),
        ErrorCode::EXPIRED
    );
    let wrong = client.unit(
        model,
        (0, 6),
        2,
        0,
        Tensor::from_u32(&[1, 2], &[5, 6]).unwrap(),
        false,
    );
    assert_eq!(
        error_code(&client.exchange(a_id, wrong).await),
        ErrorCode::MODEL_NOT_HELD
    );
    let lost = client.unit(
        model,
        (0, 3),
        9,
        7,
        Tensor::from_u32(&[1, 1], &[5]).unwrap(),
        false,
    );
    assert_eq!(
        error_code(&client.exchange(a_id, lost).await),
        ErrorCode::UNKNOWN_SESSION
    );

    // Both nodes advertise what they hold.
    let status = a.status(home.path()).unwrap();
    assert!(status["counters"].is_object());
}
