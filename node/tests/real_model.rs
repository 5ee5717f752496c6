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
