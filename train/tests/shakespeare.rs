//! The real corpus, when `scripts/fetch-shakespeare.sh` has fetched it:
//! tokenizer, split, shards, and a few training steps that lower the
//! validation loss. Skipped, with a note, when the texts are absent.

use std::path::PathBuf;

use candle_core::Device;
use commons_train::data::{eval_batches, read_text_dir};
use commons_train::{AdamW, AdamWConfig, CharTokenizer, Corpus, Model, ModelConfig, gradients};

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/shakespeare")
}

#[test]
fn a_tiny_model_learns_from_shakespeare() {
    let dir = data_dir();
    if !dir.is_dir() {
        println!(
            "skipped: {} is absent (run scripts/fetch-shakespeare.sh)",
            dir.display()
        );
        return;
    }
    let text = read_text_dir(&dir, "_gut.txt").unwrap();
    assert!(text.len() > 5_000_000, "{} bytes", text.len());
    let tokenizer = CharTokenizer::from_text(&text);
    assert!(tokenizer.chars().contains(&'\n') && tokenizer.chars().contains(&'z'));
    let corpus = Corpus::from_text(&text, &tokenizer).unwrap();
    let split = corpus.split(0.05).unwrap();
    let shards = corpus.shards(split.train.clone(), 1 << 20).unwrap();
    println!(
        "shakespeare: {} chars, vocabulary {}, corpus id {}, {} training shards, {} validation tokens",
        corpus.len(),
        tokenizer.vocab_size(),
        corpus.id(),
        shards.len(),
        split.validation.len()
    );
    assert_eq!(
        tokenizer.decode(&corpus.tokens()[..100]).unwrap(),
        text[..100]
    );

    let validation = eval_batches(&corpus.tokens()[split.validation], 8, 32, 4).unwrap();
    let model = Model::new(ModelConfig::tiny(tokenizer.vocab_size()), 0, &Device::Cpu).unwrap();
    let mut opt = AdamW::new(
        model.params(),
        AdamWConfig {
            lr: 1e-2,
            ..AdamWConfig::default()
        },
    )
    .unwrap();
    let before = model.eval_loss(&validation).unwrap();
    for step in 0..40 {
        let shard = &shards[step as usize % shards.len()];
        let batch = shard.sample_batch(&corpus, 0, step, 8, 32).unwrap();
        let (_, g) = gradients(&model, &batch).unwrap();
        opt.step(model.params(), &g).unwrap();
    }
    let after = model.eval_loss(&validation).unwrap();
    println!("validation loss {before} → {after} after 40 steps");
    assert!(after < before - 0.5, "{before} → {after}");
}
