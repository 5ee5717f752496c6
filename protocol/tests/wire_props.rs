//! Property tests for every wire type: roundtrip, size bound, and arbitrary
//! bytes never panic.
#![allow(clippy::unwrap_used)] // helpers of tests may fail loudly

use commons_protocol::blob::{BlobRequest, BlobResponse, Manifest};
use commons_protocol::codec::{self, Limit};
use commons_protocol::envelope::Envelope;
use commons_protocol::ids::{CoalitionId, JobId, ModelId, Nonce, SessionId, UnitId};
use commons_protocol::messages::{
    AdamWParams, AuditAnchor, BatchSpec, CapacityAdvert, ChatTurn, CoalitionCharter, CpuInfo,
    DataShardRef, DeterminismClass, Downstream, ErrorCode, ErrorReply, ExecMetrics, Forwarded,
    GpuBackend, GpuInfo, GradientEncoding, GradientMode, GradientUnit, HeldModel, InferenceOptions,
    InferenceUnit, JobInput, JobOp, JobReport, JobRequest, JobSpec, JobState, LayerRange, Leave,
    ParamsRef, Receipt, RouteHop, SamplingParams, StagePass, Upstream, WorkBody, WorkResult,
    WorkUnit,
};
use commons_protocol::{BoundedVec, DType, Hash, Identity, Message, NodeId, Tensor, UnixMillis};
use proptest::collection::vec;
use proptest::prelude::*;

fn hash() -> impl Strategy<Value = Hash> {
    any::<[u8; 32]>().prop_map(Hash)
}
fn node() -> impl Strategy<Value = NodeId> {
    any::<[u8; 32]>().prop_map(NodeId)
}
fn time() -> impl Strategy<Value = UnixMillis> {
    any::<u64>().prop_map(UnixMillis)
}
fn text(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!(".{{0,{max}}}")).unwrap()
}
fn finite() -> impl Strategy<Value = f32> {
    -1e6f32..1e6f32
}
fn bounded<T: std::fmt::Debug, const N: usize>(
    s: impl Strategy<Value = T>,
    max: usize,
) -> impl Strategy<Value = BoundedVec<T, N>> {
    vec(s, 0..=max.min(N)).prop_map(|v| BoundedVec::try_from_vec(v).unwrap())
}
fn layers() -> impl Strategy<Value = LayerRange> {
    (0u32..200, 0u32..200).prop_map(|(a, b)| LayerRange {
        start: a.min(b),
        end: a.max(b),
    })
}

fn tensor() -> impl Strategy<Value = Tensor> {
    let dtype = prop_oneof![
        Just(DType::F32),
        Just(DType::F16),
        Just(DType::BF16),
        Just(DType::U32),
        Just(DType::I64),
        Just(DType::U8)
    ];
    (dtype, vec(0u64..6, 0..4)).prop_flat_map(|(dtype, shape)| {
        let n = shape.iter().product::<u64>() as usize * dtype.size();
        vec(any::<u8>(), n..=n).prop_map(move |data| Tensor::new(dtype, &shape, data).unwrap())
    })
}

fn advert() -> impl Strategy<Value = CapacityAdvert> {
    let gpu = (
        prop_oneof![Just(GpuBackend::Cuda), Just(GpuBackend::Metal)],
        text(32),
        any::<u64>(),
    )
        .prop_map(|(backend, name, memory_bytes)| GpuInfo {
            backend,
            name,
            memory_bytes,
        });
    let held = (hash(), layers(), any::<u32>()).prop_map(|(m, layers, total_layers)| HeldModel {
        model: ModelId(m),
        layers,
        total_layers,
    });
    (
        (
            node(),
            any::<u64>(),
            any::<u32>(),
            text(48),
            any::<u64>(),
            bounded(gpu, 4),
        ),
        (
            any::<u64>(),
            any::<u64>(),
            bounded(held, 8),
            text(24),
            text(24),
        ),
        (
            bounded(hash().prop_map(CoalitionId), 8),
            any::<bool>(),
            text(24),
            time(),
            time(),
        ),
    )
        .prop_map(
            |(
                (node, sequence, cores, model, ram_bytes, gpus),
                (mflops, bw, models, kernel, build),
                (coalitions, trains, software, i, e),
            )| {
                CapacityAdvert {
                    node,
                    sequence,
                    cpu: CpuInfo { cores, model },
                    ram_bytes,
                    gpus,
                    matmul_mflops: mflops,
                    bandwidth_bytes_per_sec: bw,
                    models,
                    determinism: DeterminismClass { kernel, build },
                    coalitions,
                    trains,
                    software,
                    issued_at: i,
                    expires_at: e,
                }
            },
        )
}

fn sampling() -> impl Strategy<Value = SamplingParams> {
    (finite(), any::<u32>(), finite(), finite(), any::<u64>()).prop_map(
        |(temperature, top_k, top_p, repetition_penalty, seed)| SamplingParams {
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            seed,
        },
    )
}

fn gradient_mode() -> impl Strategy<Value = GradientMode> {
    let f = || -1e6f64..1e6f64;
    prop_oneof![
        Just(GradientMode::Gradient),
        (any::<u32>(), f(), f(), f(), f(), f()).prop_map(
            |(steps, lr, beta1, beta2, eps, weight_decay)| GradientMode::LocalSteps {
                steps,
                optimizer: AdamWParams {
                    lr,
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                },
            }
        ),
        (any::<u32>(), any::<u32>(), any::<bool>()).prop_map(|(start, end, backward)| {
            GradientMode::Stage {
                layers: LayerRange { start, end },
                pass: if backward {
                    StagePass::Backward
                } else {
                    StagePass::Forward
                },
            }
        }),
    ]
}

fn gradient_body() -> impl Strategy<Value = WorkBody> {
    (
        (
            any::<[u8; 16]>(),
            any::<u64>(),
            any::<u32>(),
            hash(),
            hash(),
        ),
        (
            hash(),
            hash(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
        ),
        (any::<u32>(), any::<u32>(), gradient_mode(), any::<bool>()),
        proptest::option::of(hash().prop_map(CoalitionId)),
        vec(tensor(), 0..3),
    )
        .prop_map(
            |(
                (job, round, share, root, checkpoint),
                (blob, shard, seed, step, batch_size, seq_len),
                (rows_start, rows_end, mode, bf16),
                coalition,
                inputs,
            )| {
                WorkBody::Gradient(GradientUnit {
                    job: JobId(job),
                    round,
                    share,
                    params: ParamsRef { root, checkpoint },
                    data: DataShardRef { blob, shard },
                    batch: BatchSpec {
                        seed,
                        step,
                        batch_size,
                        seq_len,
                        rows_start,
                        rows_end,
                    },
                    mode,
                    encoding: if bf16 {
                        GradientEncoding::Bf16
                    } else {
                        GradientEncoding::F32
                    },
                    coalition,
                    inputs,
                })
            },
        )
}

fn upstream() -> impl Strategy<Value = Upstream> {
    (node(), any::<u64>()).prop_map(|(executor, link)| Upstream { executor, link })
}

fn downstream() -> impl Strategy<Value = Downstream> {
    (
        node(),
        any::<u64>(),
        proptest::collection::vec(any::<u32>(), 0..=16),
    )
        .prop_map(|(node, link, unless)| Downstream {
            node,
            link,
            unless: BoundedVec::try_from_vec(unless).expect("at most 16"),
        })
}

fn work_unit() -> impl Strategy<Value = WorkUnit> {
    let inference = (
        any::<[u8; 16]>(),
        hash(),
        layers(),
        any::<[u8; 16]>(),
        any::<u64>(),
        tensor(),
        any::<u32>(),
        any::<u32>(),
        proptest::option::of(sampling()),
        any::<bool>(),
        proptest::option::of(hash().prop_map(CoalitionId)),
        (
            proptest::option::of(upstream()),
            proptest::option::of(downstream()),
            any::<u64>(),
        ),
    )
        .prop_map(
            |(
                job,
                model,
                layers,
                session,
                step,
                input,
                start_pos,
                max_session_tokens,
                sampling,
                close_session,
                coalition,
                (input_from, forward_to, order),
            )| {
                WorkBody::Inference(InferenceUnit {
                    job: JobId(job),
                    model: ModelId(model),
                    layers,
                    session: SessionId(session),
                    step,
                    input,
                    options: InferenceOptions {
                        start_pos,
                        max_session_tokens,
                        sampling,
                        close_session,
                        input_from,
                        forward_to,
                        order,
                    },
                    coalition,
                })
            },
        );
    let gradient = gradient_body();
    (
        node(),
        any::<[u8; 16]>(),
        time(),
        time(),
        prop_oneof![inference, gradient],
    )
        .prop_map(|(issuer, nonce, issued_at, expires_at, body)| WorkUnit {
            issuer,
            nonce: Nonce(nonce),
            issued_at,
            expires_at,
            body,
        })
}

fn work_result() -> impl Strategy<Value = WorkResult> {
    (
        any::<[u8; 32]>(),
        hash(),
        vec(tensor(), 0..4),
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        any::<u64>(),
        time(),
        time(),
        proptest::option::of(hash()),
    )
        .prop_map(
            |(
                secret,
                unit,
                outputs,
                queue_micros,
                compute_micros,
                tokens,
                peak_memory_bytes,
                i,
                e,
                input,
            )| {
                let metrics = ExecMetrics {
                    queue_micros,
                    compute_micros,
                    tokens,
                    peak_memory_bytes,
                };
                WorkResult::sign_with_input(
                    &Identity::from_secret(secret),
                    UnitId(unit),
                    input,
                    outputs,
                    metrics,
                    i,
                    e,
                )
                .unwrap()
            },
        )
}

fn charter() -> impl Strategy<Value = CoalitionCharter> {
    (
        text(40),
        any::<u64>(),
        vec(node(), 0..20),
        vec(any::<[u8; 32]>(), 1..4),
        time(),
    )
        .prop_map(|(name, version, members, admin_secrets, issued_at)| {
            let admins: Vec<Identity> = admin_secrets
                .into_iter()
                .map(Identity::from_secret)
                .collect();
            let ids: Vec<_> = admins.iter().map(Identity::node_id).collect();
            let mut c = CoalitionCharter {
                // The id a coalition of this name and these admins has.
                id: CoalitionCharter::genesis_id(&name, &ids),
                name,
                version,
                members: BoundedVec::try_from_vec(members).unwrap(),
                admins: BoundedVec::try_from_vec(admins.iter().map(Identity::node_id).collect())
                    .unwrap(),
                threshold: admins.len() as u16,
                issued_at,
                admin_signatures: BoundedVec::new(),
            };
            for a in &admins {
                c.sign_as(a).unwrap();
            }
            c
        })
}

fn error_reply() -> impl Strategy<Value = ErrorReply> {
    (
        any::<u16>(),
        text(200),
        proptest::option::of(hash()),
        node(),
        time(),
        time(),
    )
        .prop_map(
            |(code, message, regarding, responder, issued_at, expires_at)| ErrorReply {
                code: ErrorCode(code),
                message,
                regarding: regarding.map(UnitId),
                responder,
                issued_at,
                expires_at,
            },
        )
}

fn leave() -> impl Strategy<Value = Leave> {
    (node(), time(), time()).prop_map(|(node, issued_at, expires_at)| Leave {
        node,
        issued_at,
        expires_at,
    })
}

fn job_request() -> impl Strategy<Value = JobRequest> {
    let op = prop_oneof![
        (
            any::<[u8; 16]>(),
            hash(),
            prop_oneof![
                text(300).prop_map(JobInput::Text),
                bounded(
                    (text(10), text(100)).prop_map(|(role, content)| ChatTurn { role, content }),
                    4
                )
                .prop_map(JobInput::Chat),
            ],
            any::<u32>(),
            sampling(),
            proptest::option::of(hash().prop_map(CoalitionId)),
        )
            .prop_map(|(job, model, input, max_tokens, sampling, coalition)| {
                JobOp::Submit(JobSpec {
                    job: JobId(job),
                    model: ModelId(model),
                    input,
                    max_tokens,
                    sampling,
                    coalition,
                })
            }),
        (any::<[u8; 16]>(), any::<u32>(), any::<u32>()).prop_map(|(job, from_token, wait_ms)| {
            JobOp::Watch {
                job: JobId(job),
                from_token,
                wait_ms,
            }
        }),
        any::<[u8; 16]>().prop_map(|job| JobOp::Cancel { job: JobId(job) }),
    ];
    (node(), any::<[u8; 16]>(), time(), time(), op).prop_map(
        |(submitter, nonce, issued_at, expires_at, op)| JobRequest {
            submitter,
            nonce: Nonce(nonce),
            issued_at,
            expires_at,
            op,
        },
    )
}

fn job_report() -> impl Strategy<Value = JobReport> {
    let state = prop_oneof![
        Just(JobState::Queued),
        Just(JobState::Running),
        Just(JobState::Stopped),
        Just(JobState::Length),
        Just(JobState::Cancelled),
        (any::<u16>(), text(100)).prop_map(|(code, message)| JobState::Failed {
            code: ErrorCode(code),
            message
        }),
    ];
    let hop = (node(), layers(), any::<u32>()).prop_map(|(node, layers, results)| RouteHop {
        node,
        layers,
        results,
    });
    (
        (node(), any::<[u8; 16]>(), hash(), state, any::<u32>()),
        (
            any::<u32>(),
            bounded(any::<u32>(), 64),
            any::<u32>(),
            text(200),
        ),
        (bounded(hop, 6), any::<u32>(), any::<u32>(), hash()),
        (any::<u64>(), any::<u64>(), time(), time()),
        (any::<u32>(), any::<u32>(), any::<u32>()),
        proptest::option::of((any::<u64>(), hash())),
    )
        .prop_map(
            |(
                (coordinator, job, model, state, prompt_tokens),
                (from_token, tokens, total_tokens, text),
                (route, failovers, receipts, transcript),
                (prefill_ms, decode_ms, issued_at, expires_at),
                (verified, check_units, revisions),
                audit,
            )| JobReport {
                coordinator,
                job: JobId(job),
                model: ModelId(model),
                state,
                prompt_tokens,
                from_token,
                tokens,
                total_tokens,
                text,
                route,
                failovers,
                receipts,
                transcript,
                verified,
                check_units,
                revisions,
                prefill_ms,
                decode_ms,
                audit: audit.map(|(entries, head)| AuditAnchor { entries, head }),
                issued_at,
                expires_at,
            },
        )
}

fn roundtrip<M: Message + PartialEq + std::fmt::Debug>(m: &M) -> Result<(), TestCaseError> {
    let bytes = codec::encode(m).unwrap();
    prop_assert!(
        bytes.len() <= M::LIMIT.bytes(),
        "{} bytes over the limit",
        bytes.len()
    );
    let back: M = codec::decode(&bytes, M::LIMIT).unwrap();
    prop_assert_eq!(&back, m);
    // The encoding is canonical: encoding the decoded value gives the same bytes.
    prop_assert_eq!(codec::encode(&back).unwrap(), bytes);
    Ok(())
}

fn never_panics<M: Message>(bytes: &[u8]) {
    let _ = codec::decode::<M>(bytes, M::LIMIT);
    let _ = Envelope::open_bytes::<M>(bytes, UnixMillis(0));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn advert_roundtrips(m in advert()) { roundtrip(&m)?; }

    #[test]
    fn work_unit_roundtrips(m in work_unit()) {
        roundtrip(&m)?;
        // The unit id is a function of the contents.
        prop_assert_eq!(m.id().unwrap(), m.clone().id().unwrap());
    }

    #[test]
    fn gradient_units_are_small_and_roundtrip(body in gradient_body(), nonce in any::<[u8; 16]>()) {
        let unit = WorkUnit {
            issuer: NodeId([7; 32]),
            nonce: Nonce(nonce),
            issued_at: UnixMillis(1),
            expires_at: UnixMillis(2),
            body,
        };
        roundtrip(&unit)?;
        // Every other field is fixed-size: a gradient unit is a few hundred
        // bytes beside the activations a pipeline stage's unit carries,
        // whatever the model (parameters and data travel as content-addressed
        // files).
        let WorkBody::Gradient(g) = &unit.body else {
            unreachable!("gradient bodies only");
        };
        let activations: usize = g
            .inputs
            .iter()
            .map(|t| t.data().len() + 8 * t.shape().len() + 16)
            .sum();
        let bytes = codec::encode(&unit).unwrap();
        prop_assert!(bytes.len() <= 384 + activations, "{} bytes", bytes.len());
    }

    #[test]
    fn gradient_results_roundtrip_and_verify(
        loss in finite(),
        values in vec(finite(), 0..4096),
        bf16 in any::<bool>(),
        secret in any::<[u8; 32]>(),
        unit in hash(),
    ) {
        let n = values.len() as u64;
        let values = if bf16 {
            let data = values.iter().flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes()).collect();
            Tensor::new(DType::BF16, &[n], data).unwrap()
        } else {
            Tensor::from_f32(&[n], &values).unwrap()
        };
        let result = WorkResult::sign(
            &Identity::from_secret(secret),
            UnitId(unit),
            vec![Tensor::from_f32(&[1], &[loss]).unwrap(), values],
            ExecMetrics::default(),
            UnixMillis(1),
            UnixMillis(2),
        )
        .unwrap();
        roundtrip(&result)?;
        result.verify().unwrap();
        // The values dominate: a result is their bytes plus a bounded header.
        let bytes = codec::encode(&result).unwrap();
        let payload = result.outputs.iter().map(|t| t.data().len()).sum::<usize>();
        prop_assert!(bytes.len() <= payload + 512, "{} bytes for {payload}", bytes.len());
    }

    #[test]
    fn work_result_roundtrips_and_verifies(m in work_result()) {
        roundtrip(&m)?;
        m.verify().unwrap();
    }

    #[test]
    fn receipts_roundtrip_verify_and_bind_every_field(m in work_result(), field in 0..4usize, bit in 0..8u8) {
        let receipt = m.receipt();
        receipt.verify().unwrap();
        let bytes = codec::encode(&receipt).unwrap();
        let back: Receipt = codec::decode(&bytes, Limit::K4).unwrap();
        prop_assert_eq!(&back, &receipt);
        back.verify().unwrap();
        let mut altered = receipt.clone();
        match field {
            0 => altered.unit.0.0[usize::from(bit)] ^= 1 << bit,
            1 => altered.commitment.0[usize::from(bit)] ^= 1 << bit,
            2 => altered.metrics.tokens ^= 1 << bit,
            _ => altered.executor = Identity::from_secret([bit; 32]).node_id(),
        }
        // (Another executor's key equal to the signer's is the one alteration that is none.)
        if altered != receipt {
            prop_assert!(altered.verify().is_err());
        }
    }

    #[test]
    fn charter_roundtrips_and_verifies(m in charter()) {
        roundtrip(&m)?;
        m.verify().unwrap();
    }

    #[test]
    fn error_reply_roundtrips(m in error_reply()) { roundtrip(&m)?; }

    #[test]
    fn leave_roundtrips(m in leave()) { roundtrip(&m)?; }

    #[test]
    fn job_request_roundtrips(m in job_request()) { roundtrip(&m)?; }

    #[test]
    fn job_report_roundtrips(m in job_report()) { roundtrip(&m)?; }

    #[test]
    fn forwarded_roundtrips_and_commits_as_its_result(
        unit in hash(),
        link in any::<u64>(),
        input in proptest::option::of(hash()),
        output in tensor(),
        secret in any::<[u8; 32]>(),
    ) {
        let f = Forwarded { unit: UnitId(unit), link, input, output };
        let bytes = codec::encode(&f).unwrap();
        let back: Forwarded = codec::decode(&bytes, Forwarded::LIMIT).unwrap();
        prop_assert_eq!(&back, &f);
        // The sender's own result commits to the same output (and input) the same way.
        let result = WorkResult::sign_with_input(
            &Identity::from_secret(secret),
            f.unit,
            f.input,
            vec![f.output.clone()],
            ExecMetrics::default(),
            UnixMillis(1),
            UnixMillis(2),
        )
        .unwrap();
        prop_assert_eq!(result.commitment, f.commitment());
    }

    #[test]
    fn tensor_roundtrips(t in tensor()) {
        let bytes = codec::encode(&t).unwrap();
        let back: Tensor = codec::decode(&bytes, Limit::M64).unwrap();
        back.verify().unwrap();
        prop_assert_eq!(back, t);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..2048)) {
        never_panics::<CapacityAdvert>(&bytes);
        never_panics::<WorkUnit>(&bytes);
        never_panics::<WorkResult>(&bytes);
        never_panics::<CoalitionCharter>(&bytes);
        never_panics::<ErrorReply>(&bytes);
        never_panics::<Leave>(&bytes);
        never_panics::<JobRequest>(&bytes);
        never_panics::<JobReport>(&bytes);
        let _ = codec::decode::<Tensor>(&bytes, Limit::M64);
        let _ = codec::decode::<Forwarded>(&bytes, Forwarded::LIMIT);
        let _ = codec::decode::<BlobRequest>(&bytes, Limit::K4);
        let _ = codec::decode::<BlobResponse>(&bytes, Limit::M64);
    }

    #[test]
    fn blob_messages_roundtrip(
        index in any::<u32>(),
        data in vec(any::<u8>(), 0..512),
        blocks in vec(any::<[u8; 32]>(), 0..16),
        len in any::<u64>(),
        model in hash(),
    ) {
        let model = ModelId(model);
        for r in [BlobRequest::Manifest { model }, BlobRequest::Block { model, index }] {
            let bytes = codec::encode(&r).unwrap();
            prop_assert_eq!(codec::decode::<BlobRequest>(&bytes, Limit::K4).unwrap(), r);
        }
        let manifest = Manifest { len, blocks: BoundedVec::try_from_vec(blocks).unwrap() };
        for r in [BlobResponse::Block { index, data: data.clone() }, BlobResponse::Manifest(manifest.clone()), BlobResponse::NotHeld] {
            let bytes = codec::encode(&r).unwrap();
            prop_assert_eq!(codec::decode::<BlobResponse>(&bytes, Limit::M64).unwrap(), r);
        }
    }

    #[test]
    fn mutated_messages_never_panic(m in work_unit(), flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut bytes = codec::encode(&m).unwrap();
        for (i, b) in flips {
            let i = i.index(bytes.len());
            bytes[i] ^= b;
        }
        never_panics::<WorkUnit>(&bytes);
    }
}
