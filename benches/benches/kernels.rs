//! The Q4_1 matmul: candle's kernel against ours, on SmolLM2's shapes.
#![allow(clippy::unwrap_used)] // a benchmark with broken inputs should stop loudly

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn q4_1(c: &mut Criterion) {
    let mut group = c.benchmark_group("q4_1_matmul");
    // (n, k): the MLP's up/gate and down projections.
    for (n, k) in [(1536usize, 576usize), (576, 1536)] {
        let w = Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu).unwrap();
        let candle =
            QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4_1).unwrap()).unwrap();
        let ours = QMatMul::from_qtensor(
            commons_kernels::q4_1::accelerate(QTensor::quantize(&w, GgmlDType::Q4_1).unwrap())
                .unwrap(),
        )
        .unwrap();
        for m in [1usize, 64] {
            let x = Tensor::randn(0f32, 1.0, (1, m, k), &Device::Cpu).unwrap();
            group.throughput(Throughput::Elements((m * n * k) as u64));
            let id = format!("{n}x{k}_m{m}");
            group.bench_with_input(BenchmarkId::new("candle", &id), &x, |b, x| {
                b.iter(|| candle.forward(x).unwrap())
            });
            group.bench_with_input(BenchmarkId::new("commons", &id), &x, |b, x| {
                b.iter(|| ours.forward(x).unwrap())
            });
        }
    }
    group.finish();
}

criterion_group!(benches, q4_1);
criterion_main!(benches);
