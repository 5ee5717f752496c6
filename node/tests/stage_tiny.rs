//! The stage on tiny generated models: no download, runs in milliseconds.
#![allow(clippy::unwrap_used)]

mod common;

use candle_core::Device;
use candle_core::quantized::GgmlDType;
use common::{bits, greedy_logits, pipeline, reference_greedy_logits};
use commons_node::executor::model::ModelError;
use commons_node::executor::tiny::{TinySpec, write_tiny_gguf};
use commons_node::executor::{
    ModelFile, Pipeline, Sampler, SamplingConfig, Stage, StageError, Tokenizer,
};

fn tiny(spec: &TinySpec) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&path, spec).unwrap();
    (dir, path)
}

#[test]
fn same_seed_same_file() {
    let (_d1, a) = tiny(&TinySpec::default());
    let (_d2, b) = tiny(&TinySpec::default());
    let (_d3, c) = tiny(&TinySpec {
        seed: 2,
        ..TinySpec::default()
    });
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert_ne!(std::fs::read(&a).unwrap(), std::fs::read(&c).unwrap());
}

#[test]
fn split_stages_match_one_stage_bit_for_bit() {
    for spec in [
        TinySpec::default(),
        TinySpec {
            untied_head: true,
            ..TinySpec::default()
        },
        TinySpec {
            architecture: "qwen2".into(),
            ..TinySpec::default()
        },
        TinySpec {
            dtype: GgmlDType::Q8_0,
            embedding_dtype: GgmlDType::F32,
            ..TinySpec::default()
        },
    ] {
        let (_dir, path) = tiny(&spec);
        let model = ModelFile::open(&path).unwrap();
        let prompt: Vec<u32> = (3..40).collect();
        let (t1, l1) = greedy_logits(&pipeline(&model, &[0..6]), &prompt, 12);
        let (t3, l3) = greedy_logits(&pipeline(&model, &[0..2, 2..4, 4..6]), &prompt, 12);
        let (t6, l6) = greedy_logits(
            &pipeline(&model, &[0..1, 1..2, 2..3, 3..4, 4..5, 5..6]),
            &prompt,
            12,
        );
        assert_eq!(t1, t3, "{spec:?}");
        assert_eq!(t1, t6, "{spec:?}");
        for ((a, b), c) in l1.iter().zip(&l3).zip(&l6) {
            assert_eq!(bits(a), bits(b), "{spec:?}");
            assert_eq!(bits(a), bits(c), "{spec:?}");
        }
    }
}

#[test]
fn matches_candle_quantized_llama_exactly() {
    let (_dir, path) = tiny(&TinySpec::default());
    let model = ModelFile::open(&path).unwrap();
    let prompt: Vec<u32> = vec![5, 80, 81, 200, 7, 9, 100];
    let (ours, our_logits) = greedy_logits(&pipeline(&model, &[0..3, 3..6]), &prompt, 16);
    let (theirs, their_logits) = reference_greedy_logits(&path, &prompt, 16);
    assert_eq!(ours, theirs);
    for (a, b) in our_logits.iter().zip(&their_logits) {
        assert_eq!(bits(a), bits(b));
    }
}

#[test]
fn matches_candle_quantized_qwen2_exactly() {
    let (_dir, path) = tiny(&TinySpec {
        architecture: "qwen2".into(),
        ..TinySpec::default()
    });
    let model = ModelFile::open(&path).unwrap();
    let prompt: Vec<u32> = vec![5, 80, 81, 200, 7, 9, 100];
    let (ours, our_logits) = greedy_logits(&pipeline(&model, &[0..6]), &prompt, 8);

    let mut file = std::fs::File::open(&path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let mut reference = candle_transformers::models::quantized_qwen2::ModelWeights::from_gguf(
        content,
        &mut file,
        &Device::Cpu,
    )
    .unwrap();
    let mut input = prompt.clone();
    let mut pos = 0;
    for (step, ours_t) in ours.iter().enumerate() {
        let x = candle_core::Tensor::new(input.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = reference.forward(&x, pos).unwrap().squeeze(0).unwrap();
        pos += input.len();
        assert_eq!(bits(&logits), bits(&our_logits[step]), "step {step}");
        input = vec![*ours_t];
    }
}

#[test]
fn stage_memory_is_proportional_to_its_range() {
    let spec = TinySpec {
        n_layer: 12,
        ..TinySpec::default()
    };
    let (_dir, path) = tiny(&spec);
    let model = ModelFile::open(&path).unwrap();
    let middle =
        |r: std::ops::Range<usize>| Stage::load(&model, r, &Device::Cpu).unwrap().weight_bytes();
    let four = middle(4..8);
    let two = middle(4..6);
    assert_eq!(four, 2 * two);
    let whole = Stage::load(&model, 0..12, &Device::Cpu)
        .unwrap()
        .weight_bytes();
    assert!(whole > 3 * four, "{whole} vs {four}");
}

#[test]
fn tokenizer_roundtrips_and_chat_template_renders() {
    let (_dir, path) = tiny(&TinySpec::default());
    let model = ModelFile::open(&path).unwrap();
    let tok = Tokenizer::for_model(&model).unwrap();
    for text in [
        "the theater",
        "héllo wörld 123",
        "<|im_start|>user\nhi<|im_end|>",
    ] {
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode_with_specials(&ids).unwrap(), text);
    }
    // Merges apply, and special tokens are single tokens.
    let the = tok.encode(" the").unwrap();
    assert_eq!(the.len(), 1, "{the:?}");
    assert_eq!(tok.encode("<|im_end|>").unwrap(), vec![2]);
    let chat = tok
        .apply_chat_template(&[commons_node::executor::ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        }])
        .unwrap();
    assert_eq!(
        chat,
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    // Streaming detokenisation gives the same text as decoding at once.
    let ids = tok.encode("héllo the wörld").unwrap();
    let mut stream = tok.stream();
    let streamed: String = ids
        .iter()
        .filter_map(|&i| stream.push(i).unwrap())
        .collect();
    assert_eq!(streamed, "héllo the wörld");
}

#[test]
fn bad_models_are_clear_errors() {
    let (_d, path) = tiny(&TinySpec {
        omit: vec!["blk.3.ffn_up.weight".into()],
        ..TinySpec::default()
    });
    assert!(
        matches!(ModelFile::open(&path), Err(ModelError::MissingTensor { name }) if name == "blk.3.ffn_up.weight")
    );

    let (_d, path) = tiny(&TinySpec {
        architecture: "gptj".into(),
        ..TinySpec::default()
    });
    assert!(
        matches!(ModelFile::open(&path), Err(ModelError::UnsupportedArchitecture { arch }) if arch == "gptj")
    );

    let (_d, path) = tiny(&TinySpec::default());
    let bytes = std::fs::read(&path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Truncated inside the header, and inside the tensor data.
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..200]).unwrap();
    assert!(matches!(
        ModelFile::open(&cut),
        Err(ModelError::Corrupt { .. })
    ));
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    let model = ModelFile::open(&cut).unwrap();
    assert!(matches!(
        Stage::load(&model, 0..6, &Device::Cpu),
        Err(StageError::Model(ModelError::TensorData { .. }))
    ));
    // Not a GGUF at all.
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"this is not a model").unwrap();
    assert!(matches!(
        ModelFile::open(&junk),
        Err(ModelError::Corrupt { .. })
    ));
    assert!(matches!(
        ModelFile::open(&dir.path().join("absent.gguf")),
        Err(ModelError::Io { .. })
    ));
}

#[test]
fn zero_alignment_is_an_error_not_a_panic() {
    use candle_core::quantized::gguf_file::Value;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("align0.gguf");
    let mut f = std::fs::File::create(&path).unwrap();
    candle_core::quantized::gguf_file::write(&mut f, &[("general.alignment", &Value::U32(0))], &[])
        .unwrap();
    drop(f);
    assert!(matches!(
        ModelFile::open(&path),
        Err(ModelError::Corrupt { .. })
    ));
}

#[test]
fn bad_ranges_inputs_and_overlong_prompts_are_errors() {
    let (_d, path) = tiny(&TinySpec {
        context_length: 32,
        ..TinySpec::default()
    });
    let model = ModelFile::open(&path).unwrap();
    for (a, b) in [(4, 7), (3, 3), (5, 2)] {
        assert!(
            matches!(
                Stage::load(&model, a..b, &Device::Cpu),
                Err(StageError::LayerRange { .. })
            ),
            "{a}..{b}"
        );
    }
    // Stages must chain without gaps.
    let s = |r: std::ops::Range<usize>| Stage::load(&model, r, &Device::Cpu).unwrap();
    assert!(Pipeline::new(vec![s(0..2), s(3..6)]).is_err());
    assert!(Pipeline::new(vec![s(0..2), s(2..5)]).is_err());

    let p = pipeline(&model, &[0..6]);
    let mut sampler = Sampler::new(SamplingConfig::default()).unwrap();
    let long: Vec<u32> = vec![10; 33];
    assert!(matches!(
        p.generate(&long, 4, &mut sampler, &[], |_| {}),
        Err(StageError::ContextOverflow {
            needed: 33,
            max: 32
        })
    ));
    // A session that runs into the context length mid-generation stops there.
    let (out, _, _) = p
        .generate(&[10; 30], 10, &mut sampler, &[], |_| {})
        .unwrap();
    assert_eq!(out.len(), 2);

    let first = s(0..3);
    let mut cache = first.new_cache();
    assert!(matches!(
        first.forward(
            commons_node::executor::StageInput::Tokens(vec![9999]),
            &mut cache
        ),
        Err(StageError::Input(_))
    ));
    let second = s(3..6);
    let mut cache = second.new_cache();
    assert!(matches!(
        second.forward(
            commons_node::executor::StageInput::Tokens(vec![1]),
            &mut cache
        ),
        Err(StageError::Input(_))
    ));
    let wrong_width =
        candle_core::Tensor::zeros((1, 2, 65), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        second.forward(
            commons_node::executor::StageInput::Hidden(wrong_width),
            &mut cache
        ),
        Err(StageError::Input(_))
    ));
}

#[test]
fn batched_decode_equals_decoding_alone() {
    for spec in [
        TinySpec::default(),
        TinySpec {
            architecture: "qwen2".into(),
            ..TinySpec::default()
        },
    ] {
        let (_dir, path) = tiny(&spec);
        let model = ModelFile::open(&path).unwrap();
        let prompts = vec![
            (3..20).collect::<Vec<u32>>(),
            vec![7, 8],
            (50..90).collect(),
        ];
        for ranges in [vec![0..6], vec![0..2, 2..6]] {
            let (batched, alone) =
                common::batched_vs_alone(&pipeline(&model, &ranges), &prompts, 6);
            for (b, a) in batched.iter().flatten().zip(alone.iter().flatten()) {
                assert_eq!(bits(b), bits(a), "{spec:?} {ranges:?}");
            }
        }
    }
}

fn tiny_pair(spec: &TinySpec) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    let hf = dir.path().join("tiny-hf");
    write_tiny_gguf(&gguf, spec).unwrap();
    commons_node::executor::tiny::write_tiny_hf(&hf, spec).unwrap();
    (dir, gguf, hf)
}

#[test]
fn safetensors_folder_matches_the_same_weights_in_gguf() {
    for arch in ["llama", "qwen2"] {
        let spec = TinySpec {
            architecture: arch.into(),
            dtype: GgmlDType::F32,
            embedding_dtype: GgmlDType::F32,
            ..TinySpec::default()
        };
        let (_dir, gguf, hf) = tiny_pair(&spec);
        let (g, h) = (
            ModelFile::open(&gguf).unwrap(),
            ModelFile::open(&hf).unwrap(),
        );
        assert_eq!(h.config().n_layer, 6);
        assert!(h.metadata().is_none());
        let prompt: Vec<u32> = (3..30).collect();
        let (tg, lg) = greedy_logits(&pipeline(&g, &[0..6]), &prompt, 10);
        let (th, lh) = greedy_logits(&pipeline(&h, &[0..6]), &prompt, 10);
        // Same values; GGUF rotates interleaved pairs of permuted weights, safetensors
        // rotates halves, so sums run in another order: equal up to rounding.
        for (a, b) in lg.iter().zip(&lh) {
            let diff = common::max_abs_diff(a, b);
            assert!(diff < 1e-3, "{arch}: logits differ by {diff}");
        }
        assert_eq!(tg, th, "{arch}");
        // Split stages of the folder model are bit-identical to one stage.
        let (t3, l3) = greedy_logits(&pipeline(&h, &[0..2, 2..6]), &prompt, 10);
        assert_eq!(th, t3);
        for (a, b) in lh.iter().zip(&l3) {
            assert_eq!(bits(a), bits(b));
        }
        // The tokenizers agree, and the chat template comes from tokenizer_config.json.
        let (tok_g, tok_h) = (
            Tokenizer::for_model(&g).unwrap(),
            Tokenizer::for_model(&h).unwrap(),
        );
        for text in ["the theater", "héllo 42", "<|im_start|>user\nhi<|im_end|>"] {
            assert_eq!(
                tok_g.encode(text).unwrap(),
                tok_h.encode(text).unwrap(),
                "{text}"
            );
        }
        let msgs = [commons_node::executor::ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        }];
        assert_eq!(
            tok_g.apply_chat_template(&msgs).unwrap(),
            tok_h.apply_chat_template(&msgs).unwrap()
        );
        assert_eq!(tok_h.stop_tokens(), &[2]);
    }
}

#[test]
fn safetensors_folder_stage_reads_only_its_layers() {
    let spec = TinySpec {
        n_layer: 12,
        dtype: GgmlDType::F32,
        ..TinySpec::default()
    };
    let (_dir, _gguf, hf) = tiny_pair(&spec);
    let model = ModelFile::open(&hf).unwrap();
    let bytes =
        |r: std::ops::Range<usize>| Stage::load(&model, r, &Device::Cpu).unwrap().weight_bytes();
    assert_eq!(bytes(4..8), 2 * bytes(4..6));
    // Model ids: a folder's id covers its files and is stable.
    let a = commons_node::executor::model_id(&hf).unwrap();
    assert_eq!(a, commons_node::executor::model_id(&hf).unwrap());
    std::fs::write(hf.join("tokenizer_config.json"), "{}").unwrap();
    assert_ne!(a, commons_node::executor::model_id(&hf).unwrap());
}

#[test]
fn bad_safetensors_folders_are_clear_errors() {
    let spec = TinySpec {
        dtype: GgmlDType::F32,
        ..TinySpec::default()
    };
    let (_dir, _gguf, hf) = tiny_pair(&spec);
    let weights = hf.join("model.safetensors");
    let good = std::fs::read(&weights).unwrap();

    // A header that promises more than the file holds.
    std::fs::write(&weights, &good[..good.len() - 100]).unwrap();
    assert!(matches!(
        ModelFile::open(&hf),
        Err(ModelError::Corrupt { .. })
    ));
    // Garbage.
    std::fs::write(&weights, b"12345678garbage").unwrap();
    assert!(matches!(
        ModelFile::open(&hf),
        Err(ModelError::Corrupt { .. })
    ));
    std::fs::write(&weights, &good).unwrap();
    ModelFile::open(&hf).unwrap();

    // An architecture the stage does not implement.
    let config_path = hf.join("config.json");
    let config = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(
        &config_path,
        config.replace("LlamaForCausalLM", "GPTNeoXForCausalLM"),
    )
    .unwrap();
    assert!(
        matches!(ModelFile::open(&hf), Err(ModelError::UnsupportedArchitecture { arch }) if arch == "GPTNeoXForCausalLM")
    );
    // More layers than the weights hold.
    std::fs::write(
        &config_path,
        config.replace("\"num_hidden_layers\": 6", "\"num_hidden_layers\": 7"),
    )
    .unwrap();
    assert!(
        matches!(ModelFile::open(&hf), Err(ModelError::MissingTensor { name }) if name == "blk.6.attn_norm.weight")
    );
    std::fs::remove_file(&config_path).unwrap();
    assert!(matches!(ModelFile::open(&hf), Err(ModelError::Io { .. })));
}

#[test]
fn part_of_a_stage_computes_as_a_stage_of_exactly_that_part() {
    use commons_node::executor::{StageInput, StageOutput};
    let (_dir, path) = tiny(&TinySpec::default());
    let model = ModelFile::open(&path).unwrap();
    let device = Device::Cpu;
    let whole = Stage::load(&model, 0..6, &device).unwrap();
    let hidden = |out: StageOutput| match out {
        StageOutput::Hidden(h) => h,
        StageOutput::Logits(_) => panic!("logits where hidden states were due"),
    };
    let logits = |out: StageOutput| match out {
        StageOutput::Logits(l) => l,
        StageOutput::Hidden(_) => panic!("hidden states where logits were due"),
    };
    // Exact stages 0..2, 2..5, 5..6 against parts of the whole one, over a
    // prompt and three decode steps, every output bit for bit.
    let exact: Vec<Stage> = [0..2, 2..5, 5..6]
        .into_iter()
        .map(|r| Stage::load(&model, r, &device).unwrap())
        .collect();
    let mut exact_caches: Vec<_> = exact.iter().map(Stage::new_cache).collect();
    let mut part_caches: Vec<_> = (0..3).map(|_| whole.new_cache()).collect();
    let mut input: Vec<u32> = (3..20).collect();
    for _ in 0..4 {
        let a = hidden(
            exact[0]
                .forward(StageInput::Tokens(input.clone()), &mut exact_caches[0])
                .unwrap(),
        );
        let b = hidden(
            whole
                .forward_range(StageInput::Tokens(input.clone()), &mut part_caches[0], 0..2)
                .unwrap(),
        );
        assert_eq!(bits(&a), bits(&b));
        let a = hidden(
            exact[1]
                .forward(StageInput::Hidden(a), &mut exact_caches[1])
                .unwrap(),
        );
        let b = hidden(
            whole
                .forward_range(StageInput::Hidden(b), &mut part_caches[1], 2..5)
                .unwrap(),
        );
        assert_eq!(bits(&a), bits(&b));
        let a = logits(
            exact[2]
                .forward(StageInput::Hidden(a), &mut exact_caches[2])
                .unwrap(),
        );
        let b = logits(
            whole
                .forward_range(StageInput::Hidden(b), &mut part_caches[2], 5..6)
                .unwrap(),
        );
        assert_eq!(bits(&a), bits(&b));
        let next = a
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .enumerate()
            .max_by(|x, y| x.1.total_cmp(y.1))
            .unwrap()
            .0 as u32;
        input = vec![next];
    }
    // Outside the stage, another part for the same session, or token ids
    // for a part that does not start at layer 0: clear errors.
    let first_half = Stage::load(&model, 0..3, &device).unwrap();
    let mut cache = first_half.new_cache();
    let e = first_half
        .forward_range(StageInput::Tokens(vec![3]), &mut cache, 2..5)
        .unwrap_err();
    assert!(e.to_string().contains("not within"), "{e}");
    let e = first_half
        .forward_range(StageInput::Tokens(vec![3]), &mut cache, 1..3)
        .unwrap_err();
    assert!(e.to_string().contains("do not start at the first"), "{e}");
    first_half
        .forward_range(StageInput::Tokens(vec![3]), &mut cache, 0..2)
        .unwrap();
    let e = first_half
        .forward_range(StageInput::Tokens(vec![4]), &mut cache, 0..3)
        .unwrap_err();
    assert!(
        e.to_string().contains("the session runs layers 0..2"),
        "{e}"
    );
}
