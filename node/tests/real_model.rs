//! The executor on the real bundled model, SmolLM2-135M-Instruct Q4_1
//! (fetched by scripts/fetch-model.sh; CI runs it first).
#![allow(clippy::unwrap_used)]

mod common;

use common::{bits, greedy_logits, pipeline, real_model, reference_greedy_logits};
use commons_node::executor::{ModelFile, Sampler, SamplingConfig, StageError, Tokenizer};

#[test]
fn the_capital_of_france_is_paris() {
    let path = real_model();
    let model = ModelFile::open(&path).unwrap();
    let tok = Tokenizer::for_model(&model).unwrap();
    let prompt = tok.encode("The capital of France is").unwrap();
    let p = pipeline(&model, &[0..30]);
    let mut sampler = Sampler::new(SamplingConfig::default()).unwrap();
    let (tokens, _, _) = p
        .generate(&prompt, 4, &mut sampler, tok.stop_tokens(), |_| {})
        .unwrap();
    let text = tok.decode(&tokens).unwrap();
    assert!(text.starts_with(" Paris"), "{text:?}");
}

#[test]
fn three_stages_give_bit_identical_logits() {
    let path = real_model();
    let model = ModelFile::open(&path).unwrap();
    let tok = Tokenizer::for_model(&model).unwrap();
    let prompt = tok
        .encode("Peer-to-peer networks let communities pool their computers")
        .unwrap();
    let (t1, l1) = greedy_logits(&pipeline(&model, &[0..30]), &prompt, 8);
    let (t3, l3) = greedy_logits(&pipeline(&model, &[0..10, 10..20, 20..30]), &prompt, 8);
    assert_eq!(t1, t3);
    for (a, b) in l1.iter().zip(&l3) {
        assert_eq!(bits(a), bits(b));
    }
}

#[test]
fn same_greedy_tokens_as_candle_quantized_llama() {
    let path = real_model();
    let model = ModelFile::open(&path).unwrap();
    let tok = Tokenizer::for_model(&model).unwrap();
    let p = pipeline(&model, &[0..30]);
    for prompt in [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a small village",
    ] {
        let ids = tok.encode(prompt).unwrap();
        let (ours, our_logits) = greedy_logits(&p, &ids, 16);
        let (theirs, their_logits) = reference_greedy_logits(&path, &ids, 16);
        assert_eq!(ours, theirs, "{prompt}");
        // Same kernel path, same op order: the logits are equal to the bit.
        for (a, b) in our_logits.iter().zip(&their_logits) {
            assert_eq!(bits(a), bits(b), "{prompt}");
        }
    }
}

/// Past 256 cached positions candle's matmul takes another path for the
/// attention scores of a single position (its gemv instead of its horizontal
/// kernel): a prompt just under that length, then greedy steps across it.
#[test]
fn bit_identical_to_candle_quantized_llama_across_256_positions() {
    let path = real_model();
    let model = ModelFile::open(&path).unwrap();
    let tok = Tokenizer::for_model(&model).unwrap();
    let text = "Peer-to-peer networks let communities pool their computers. ".repeat(24);
    let mut ids = tok.encode(&text).unwrap();
    ids.truncate(250);
    assert_eq!(ids.len(), 250);
    let (ours, our_logits) = greedy_logits(&pipeline(&model, &[0..30]), &ids, 12);
    let (theirs, their_logits) = reference_greedy_logits(&path, &ids, 12);
    assert_eq!(ours, theirs);
    for (a, b) in our_logits.iter().zip(&their_logits) {
        assert_eq!(bits(a), bits(b));
    }
}

#[test]
fn chat_prompt_uses_the_models_template() {
    let model = ModelFile::open(&real_model()).unwrap();
    let tok = Tokenizer::for_model(&model).unwrap();
    let msgs = [commons_node::executor::ChatMessage {
        role: "user".into(),
        content: "Hi".into(),
    }];
    let text = tok.apply_chat_template(&msgs).unwrap();
    assert!(text.starts_with("<|im_start|>system\n"), "{text:?}");
    assert!(
        text.ends_with("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
        "{text:?}"
    );
    let ids = tok.encode(&text).unwrap();
    assert_eq!(ids[0], 1, "<|im_start|> is one special token");
    assert_eq!(tok.stop_tokens(), &[2]);
}

#[test]
fn real_model_errors() {
    let path = real_model();
    let model = ModelFile::open(&path).unwrap();
    assert!(matches!(
        commons_node::executor::Stage::load(&model, 25..31, &candle_core::Device::Cpu),
        Err(StageError::LayerRange { .. })
    ));
    let p = pipeline(&model, &[0..30]);
    let mut sampler = Sampler::new(SamplingConfig::default()).unwrap();
    let too_long = vec![100u32; 8193];
    assert!(matches!(
        p.generate(&too_long, 1, &mut sampler, &[], |_| {}),
        Err(StageError::ContextOverflow {
            needed: 8193,
            max: 8192
        })
    ));
    // A truncated copy of the real file: inside the tokenizer metadata, then inside the weights.
    let bytes = std::fs::read(&path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..1 << 20]).unwrap();
    assert!(matches!(
        ModelFile::open(&cut),
        Err(commons_node::executor::ModelError::Corrupt { .. })
    ));
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let half = ModelFile::open(&cut).unwrap();
    let err =
        commons_node::executor::Stage::load(&half, 0..30, &candle_core::Device::Cpu).unwrap_err();
    assert!(
        err.to_string().contains("only 0 remaining in file"),
        "{err}"
    );
    // The first layer lies in the half that is there.
    commons_node::executor::Stage::load(&half, 0..1, &candle_core::Device::Cpu).unwrap();
}

#[test]
fn batched_decode_of_three_sessions_equals_decoding_alone() {
    let model = ModelFile::open(&real_model()).unwrap();
    let tok = Tokenizer::for_model(&model).unwrap();
    let prompts: Vec<Vec<u32>> = [
        "The capital of France is",
        "Rust is a language that",
        "1, 2, 3, 4,",
    ]
    .iter()
    .map(|p| tok.encode(p).unwrap())
    .collect();
    let (batched, alone) =
        common::batched_vs_alone(&pipeline(&model, &[0..10, 10..20, 20..30]), &prompts, 4);
    for (b, a) in batched.iter().flatten().zip(alone.iter().flatten()) {
        assert_eq!(bits(b), bits(a));
    }
}

/// The tolerance between determinism classes, from measurement: each span of
/// the real model gets the very same inputs on the quantized CPU path and on
/// the dequantized f32 path (how accelerators usually multiply), and their
/// outputs are compared relative to the largest magnitude.
#[test]
fn kernel_paths_differ_within_the_verification_tolerance() {
    use candle_core::Device;
    use commons_coordinator::verify::{DEFAULT_TOLERANCE, agree};
    use commons_node::executor::{Kernels, Stage, StageInput, StageOutput};

    fn wire(t: &candle_core::Tensor) -> commons_protocol::Tensor {
        let shape: Vec<u64> = t.dims().iter().map(|&d| d as u64).collect();
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        commons_protocol::Tensor::from_f32(&shape, &v).unwrap()
    }
    fn values(t: &StageOutput) -> &candle_core::Tensor {
        match t {
            StageOutput::Hidden(h) | StageOutput::Logits(h) => h,
        }
    }

    let path = real_model();
    let model = ModelFile::open(&path).unwrap();
    let tok = Tokenizer::for_model(&model).unwrap();
    let spans = [0..10, 10..20, 20..30];
    let load = |k| {
        spans
            .iter()
            .map(|r| Stage::load_with(&model, r.clone(), &Device::Cpu, k).unwrap())
            .collect::<Vec<_>>()
    };
    let (quantized, dense) = (load(Kernels::Fast), load(Kernels::Dequantized));
    let mut worst = [0f32; 3];
    let mut agreed = [true; 3];
    let mut tokens_differ = 0;
    for prompt in ["The capital of France is", "def fibonacci(n):"] {
        let mut qc: Vec<_> = quantized.iter().map(Stage::new_cache).collect();
        let mut dc: Vec<_> = dense.iter().map(Stage::new_cache).collect();
        let mut ids = tok.encode(prompt).unwrap();
        for _ in 0..8 {
            // The quantized chain leads; both paths get its inputs at every span.
            let mut input = StageInput::Tokens(ids.clone());
            for (i, (q, d)) in quantized.iter().zip(&dense).enumerate() {
                let same = match &input {
                    StageInput::Tokens(t) => StageInput::Tokens(t.clone()),
                    StageInput::Hidden(h) => StageInput::Hidden(h.clone()),
                };
                let a = q.forward(input, &mut qc[i]).unwrap();
                let b = d.forward(same, &mut dc[i]).unwrap();
                let (wa, wb) = (wire(values(&a)), wire(values(&b)));
                let x = wa.to_f32().unwrap();
                let y = wb.to_f32().unwrap();
                let scale = x.iter().chain(&y).fold(0f32, |m, v| m.max(v.abs()));
                let diff = x
                    .iter()
                    .zip(&y)
                    .fold(0f32, |m, (u, v)| m.max((u - v).abs()));
                worst[i] = worst[i].max(diff / scale);
                agreed[i] &= agree(&wa, &wb, false, DEFAULT_TOLERANCE);
                assert!(!agree(&wa, &wb, true, DEFAULT_TOLERANCE) || wa.digest() == wb.digest());
                // What a corrupting node does is far outside the tolerance.
                let mut bad = x.clone();
                bad[0] += scale * 0.5 + 1.0;
                let bad = commons_protocol::Tensor::from_f32(wa.shape(), &bad).unwrap();
                assert!(!agree(&wa, &bad, false, DEFAULT_TOLERANCE));
                input = match a {
                    StageOutput::Hidden(h) => StageInput::Hidden(h),
                    StageOutput::Logits(l) => {
                        let t = commons_node::executor::stage::argmax(&l).unwrap();
                        let u = commons_node::executor::stage::argmax(values(&b)).unwrap();
                        tokens_differ += usize::from(t != u);
                        ids = vec![t];
                        break;
                    }
                };
            }
        }
    }
    eprintln!(
        "largest difference between the quantized and dequantized paths, relative to the largest magnitude: \
         layers 0..10 {:.2e}, 10..20 {:.2e}, 20..30 (logits) {:.2e}; tolerance {DEFAULT_TOLERANCE:.0e}; \
         greedy tokens that differ: {tokens_differ} of 16",
        worst[0], worst[1], worst[2]
    );
    assert!(worst.iter().all(|w| *w > 0.0), "the paths really differ");
    assert_eq!(agreed, [true; 3], "within the tolerance on every span");
}
