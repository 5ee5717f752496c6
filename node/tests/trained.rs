//! A model trained with `commons-train` runs on the executor: its checkpoint
//! exports to a Hugging Face llama folder whose logits, computed by the
//! executor's stages with a KV cache, match the training model's own forward
//! pass, whole or split into stages, and `commons run --model CHECKPOINT`
//! continues text the way the trained model does.
#![allow(clippy::unwrap_used)]

mod common;

use candle_core::{Device, Tensor};
use common::{greedy_logits, pipeline};
use commons_node::executor::ModelFile;
use commons_train::{AdamW, AdamWConfig, CharTokenizer, Corpus, Model, ModelConfig, gradients};

const LINE: &str = "to be, or not to be: that is the question.\n";

/// A tiny model trained until it has learned the repeated line; its
/// checkpoint written to a file.
fn trained(tied: bool, dir: &std::path::Path) -> (Model, CharTokenizer, std::path::PathBuf) {
    let text = LINE.repeat(40);
    let tokenizer = CharTokenizer::from_text(&text);
    let corpus = Corpus::from_text(&text, &tokenizer).unwrap();
    let shard = &corpus.shards(0..corpus.len(), corpus.len()).unwrap()[0];
    let config = ModelConfig {
        tie_embeddings: tied,
        ..ModelConfig::tiny(tokenizer.vocab_size())
    };
    let model = Model::new(config, 7, &Device::Cpu).unwrap();
    let mut adamw = AdamW::new(
        model.params(),
        AdamWConfig {
            lr: 1e-2,
            ..AdamWConfig::default()
        },
    )
    .unwrap();
    for step in 0..150 {
        let batch = shard.sample_batch(&corpus, 1, step, 8, 48).unwrap();
        let (_, grads) = gradients(&model, &batch).unwrap();
        adamw.step(model.params(), &grads).unwrap();
    }
    let checkpoint = model.checkpoint(Some(&tokenizer)).unwrap();
    let path = dir.join(format!("final-{tied}.safetensors"));
    std::fs::write(&path, checkpoint.bytes()).unwrap();
    (model, tokenizer, path)
}

#[test]
fn an_exported_checkpoint_computes_as_the_training_model() {
    let dir = tempfile::tempdir().unwrap();
    for tied in [false, true] {
        let (model, tokenizer, path) = trained(tied, dir.path());
        assert!(commons_node::train_export::is_training_checkpoint(&path));
        let folder = commons_node::train_export::resolve(&path).unwrap();
        assert_eq!(folder, dir.path().join(format!("final-{tied}.model")));
        let file = ModelFile::open(&folder).unwrap();
        assert_eq!(file.config().n_layer, 2);
        assert_eq!(file.config().tied_embeddings, tied);

        let prompt = tokenizer.encode("to be, or not").unwrap();
        // The training model's logits at every position of the prompt, then
        // its greedy continuation.
        let input = Tensor::new(prompt.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let reference = model.forward(&input).unwrap().squeeze(0).unwrap();
        let last = reference.get(prompt.len() - 1).unwrap();
        let expected = model.generate(&prompt, 24, 0.0, 0).unwrap();

        for ranges in [vec![0..2], vec![0..1, 1..2]] {
            let (tokens, logits) = greedy_logits(&pipeline(&file, &ranges), &prompt, 24);
            let diff = common::max_abs_diff(&logits[0], &last);
            let scale = common::max_abs_diff(&last, &last.zeros_like().unwrap());
            assert!(
                diff <= 1e-4 * scale.max(1.0),
                "tied {tied}, stages {ranges:?}: logits differ by {diff} (largest {scale})"
            );
            assert_eq!(tokens, expected, "tied {tied}, stages {ranges:?}");
        }
        // It learned the line: the continuation is the line's.
        let text = tokenizer.decode(&expected).unwrap();
        assert!(
            LINE.repeat(2).contains(&format!("to be, or not{text}")),
            "{text:?}"
        );

        // A second resolve reuses the folder; a changed checkpoint is exported again.
        let stamp = std::fs::metadata(folder.join("model.safetensors"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(commons_node::train_export::resolve(&path).unwrap(), folder);
        assert_eq!(
            std::fs::metadata(folder.join("model.safetensors"))
                .unwrap()
                .modified()
                .unwrap(),
            stamp
        );
    }
}

#[test]
fn commons_run_samples_from_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (model, tokenizer, path) = trained(true, dir.path());
    let prompt = "that is the";
    let expected = tokenizer
        .decode(
            &model
                .generate(&tokenizer.encode(prompt).unwrap(), 20, 0.0, 0)
                .unwrap(),
        )
        .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_commons"))
        .args(["run", "--model"])
        .arg(&path)
        .args(["--prompt", prompt, "--max-tokens", "20", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["text"], expected.as_str());
    assert!(dir.path().join("final-true.model/config.json").is_file());

    // `commons train export` writes the folder where it is asked to, and
    // refuses a file that is not a training checkpoint.
    let out_dir = dir.path().join("exported");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_commons"))
        .args(["train", "export"])
        .arg(&path)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(status.status.success());
    assert!(ModelFile::open(&out_dir).is_ok());
    let not_one = dir.path().join("plain.safetensors");
    std::fs::write(&not_one, b"not a checkpoint").unwrap();
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_commons"))
        .args(["train", "export"])
        .arg(&not_one)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("not a checkpoint written by commons train"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}
