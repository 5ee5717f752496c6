//! Cost of the protocol on the hot path: sealing and opening a work unit that
//! carries hidden states, and hashing tensors.
#![allow(clippy::unwrap_used)] // a benchmark with broken inputs should stop loudly

use commons_protocol::envelope::Envelope;
use commons_protocol::ids::{JobId, ModelId, Nonce, SessionId};
use commons_protocol::messages::{InferenceOptions, InferenceUnit, LayerRange, WorkBody, WorkUnit};
use commons_protocol::{Hash, Identity, Tensor, UnixMillis};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn unit(issuer: &Identity, tokens: u64, hidden: u64) -> WorkUnit {
    let values = vec![0.5f32; (tokens * hidden) as usize];
    WorkUnit {
        issuer: issuer.node_id(),
        nonce: Nonce([1; 16]),
        issued_at: UnixMillis(1_000),
        expires_at: UnixMillis(61_000),
        body: WorkBody::Inference(InferenceUnit {
            job: JobId([2; 16]),
            model: ModelId(Hash::of(b"m")),
            layers: LayerRange { start: 10, end: 20 },
            session: SessionId([3; 16]),
            step: 1,
            input: Tensor::from_f32(&[1, tokens, hidden], &values).unwrap(),
            options: InferenceOptions {
                start_pos: 0,
                max_session_tokens: 2048,
                sampling: None,
                close_session: false,
                input_from: None,
                forward_to: None,
                order: 0,
            },
            coalition: None,
        }),
    }
}

fn envelopes(c: &mut Criterion) {
    let id = Identity::from_secret([9; 32]);
    let mut group = c.benchmark_group("envelope");
    // One decode step (1 token) and one 256-token prefill of SmolLM2's 576-wide hidden states.
    for tokens in [1u64, 256] {
        let u = unit(&id, tokens, 576);
        let bytes = Envelope::seal(&id, &u).unwrap().to_bytes();
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_with_input(BenchmarkId::new("seal", tokens), &u, |b, u| {
            b.iter(|| Envelope::seal(&id, u).unwrap().to_bytes())
        });
        group.bench_with_input(BenchmarkId::new("open", tokens), &bytes, |b, bytes| {
            b.iter(|| Envelope::open_bytes::<WorkUnit>(bytes, UnixMillis(2_000)).unwrap())
        });
    }
    group.finish();
}

fn tensors(c: &mut Criterion) {
    let mut group = c.benchmark_group("tensor");
    let values = vec![1.0f32; 256 * 576];
    let t = Tensor::from_f32(&[256, 576], &values).unwrap();
    group.throughput(Throughput::Bytes(t.data().len() as u64));
    group.bench_function("verify_256x576_f32", |b| b.iter(|| t.verify().unwrap()));
    group.finish();
}

criterion_group!(benches, envelopes, tensors);
criterion_main!(benches);
