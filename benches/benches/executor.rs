//! Prefill and decode of the bundled model: our stages against
//! candle-transformers' quantized llama on the same file, and a candle matmul.
#![allow(clippy::unwrap_used)] // a benchmark with broken inputs should stop loudly

use candle_core::{Device, Tensor};
use commons_benches::{CandleQuantizedLlama, Commons, Engine, model_path, prompt};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn inference(c: &mut Criterion) {
    let path = model_path().unwrap();
    let p = prompt(256);
    let mut group = c.benchmark_group("smollm2_q4_1");
    group.sample_size(10);
    let mut engines: Vec<(&str, Box<dyn Engine>)> = vec![
        ("commons", Box::new(Commons::load(&path, &[0..30]).unwrap())),
        (
            "commons_3_stages",
            Box::new(Commons::load(&path, &[0..10, 10..20, 20..30]).unwrap()),
        ),
        (
            "candle_quantized_llama",
            Box::new(CandleQuantizedLlama::load(&path).unwrap()),
        ),
    ];
    group.throughput(Throughput::Elements(256));
    for (name, engine) in &mut engines {
        group.bench_function(format!("prefill_256/{name}"), |b| {
            b.iter(|| engine.prefill(&p).unwrap())
        });
    }
    group.throughput(Throughput::Elements(16));
    for (name, engine) in &mut engines {
        group.bench_function(format!("decode_16_after_64/{name}"), |b| {
            b.iter(|| {
                let mut t = engine.prefill(&p[..64]).unwrap();
                for _ in 0..16 {
                    t = engine.decode(t).unwrap();
                }
                t
            })
        });
    }
    group.finish();
}

fn matmul(c: &mut Criterion) {
    let a = Tensor::randn(0f32, 1.0, (1024, 1024), &Device::Cpu).unwrap();
    let b = Tensor::randn(0f32, 1.0, (1024, 1024), &Device::Cpu).unwrap();
    let mut group = c.benchmark_group("matmul_f32");
    group.throughput(Throughput::Elements(2 * 1024 * 1024 * 1024));
    group.bench_function("1024x1024x1024", |bench| {
        bench.iter(|| a.matmul(&b).unwrap())
    });
    group.finish();
}

criterion_group!(benches, inference, matmul);
criterion_main!(benches);
