//! Shared helpers of the executor's tests.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama;
use commons_node::executor::{KvCache, ModelFile, Pipeline, Stage};

/// The bundled model; fetched by `scripts/fetch-model.sh` (which `.ci/run` calls).
pub fn real_model() -> PathBuf {
    commons_node::run_local::bundled_model().unwrap()
}

/// f32 values as bits, for exact comparison.
pub fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// Largest absolute difference.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A pipeline over `ranges` of `model`.
pub fn pipeline(model: &ModelFile, ranges: &[std::ops::Range<usize>]) -> Pipeline {
    let stages = ranges
        .iter()
        .map(|r| Stage::load(model, r.clone(), &Device::Cpu).unwrap())
        .collect();
    Pipeline::new(stages).unwrap()
}

/// Greedy steps through `p`: the prompt, then `steps` single tokens; the logits of every step.
pub fn greedy_logits(p: &Pipeline, prompt: &[u32], steps: usize) -> (Vec<u32>, Vec<Tensor>) {
    let mut caches: Vec<KvCache> = p.new_caches();
    let mut input = prompt.to_vec();
    let (mut tokens, mut all) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        let logits = p.forward(&input, &mut caches).unwrap();
        let t = commons_node::executor::stage::argmax(&logits).unwrap();
        tokens.push(t);
        all.push(logits);
        input = vec![t];
    }
    (tokens, all)
}

/// The same greedy steps through candle-transformers' own quantized llama.
pub fn reference_greedy_logits(
    path: &std::path::Path,
    prompt: &[u32],
    steps: usize,
) -> (Vec<u32>, Vec<Tensor>) {
    let mut file = std::fs::File::open(path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let mut model =
        quantized_llama::ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();
    let mut pos = 0;
    let mut input = prompt.to_vec();
    let (mut tokens, mut all) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        let x = Tensor::new(input.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model.forward(&x, pos).unwrap().squeeze(0).unwrap();
        pos += input.len();
        let t = commons_node::executor::stage::argmax(&logits).unwrap();
        tokens.push(t);
        all.push(logits);
        input = vec![t];
    }
    (tokens, all)
}

/// Prefills three sessions of different lengths, then decodes `steps` tokens
/// for all of them, once batched and once one by one; returns the logits of
/// both ways, step by step and session by session.
pub fn batched_vs_alone(
    p: &Pipeline,
    prompts: &[Vec<u32>],
    steps: usize,
) -> (Vec<Vec<Tensor>>, Vec<Vec<Tensor>>) {
    use commons_node::executor::{StageInput, StageOutput};
    let mut batched_caches: Vec<Vec<KvCache>> = Vec::new();
    let mut next: Vec<u32> = Vec::new();
    for prompt in prompts {
        let mut caches = p.new_caches();
        let logits = p.forward(prompt, &mut caches).unwrap();
        next.push(commons_node::executor::stage::argmax(&logits).unwrap());
        batched_caches.push(caches);
    }
    let mut alone_caches = batched_caches.clone();
    let mut alone_next = next.clone();
    let (mut batched, mut alone) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        // Batched through every stage.
        let mut inputs: Vec<StageInput> =
            next.iter().map(|&t| StageInput::Tokens(vec![t])).collect();
        for (si, stage) in p.stages().iter().enumerate() {
            let steps: Vec<_> = inputs
                .into_iter()
                .zip(batched_caches.iter_mut().map(|c| &mut c[si]))
                .collect();
            let outs = stage.forward_batch(steps).unwrap();
            inputs = outs
                .into_iter()
                .map(|o| match o {
                    StageOutput::Hidden(h) => StageInput::Hidden(h),
                    StageOutput::Logits(l) => StageInput::Hidden(l),
                })
                .collect();
        }
        let logits: Vec<Tensor> = inputs
            .into_iter()
            .map(|i| match i {
                StageInput::Hidden(l) => l,
                StageInput::Tokens(_) => unreachable!(),
            })
            .collect();
        next = logits
            .iter()
            .map(|l| commons_node::executor::stage::argmax(l).unwrap())
            .collect();
        batched.push(logits);
        // Alone.
        let logits: Vec<Tensor> = alone_next
            .iter()
            .zip(alone_caches.iter_mut())
            .map(|(&t, c)| p.forward(&[t], c).unwrap())
            .collect();
        alone_next = logits
            .iter()
            .map(|l| commons_node::executor::stage::argmax(l).unwrap())
            .collect();
        alone.push(logits);
    }
    (batched, alone)
}
