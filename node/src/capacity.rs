//! What this machine offers: processor, memory, accelerators, a short matmul
//! benchmark (cached in the data directory), and the determinism class of
//! its kernels.

use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor};
use commons_protocol::messages::{CpuInfo, DeterminismClass, GpuInfo};
use serde::{Deserialize, Serialize};

/// Measured capacity of this machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// Processor.
    pub cpu_cores: u32,
    /// Processor model.
    pub cpu_model: String,
    /// Physical memory.
    pub ram_bytes: u64,
    /// f32 matmul throughput, MFLOP/s.
    pub matmul_mflops: u64,
}

impl Capacity {
    /// The processor as the protocol describes it.
    #[must_use]
    pub fn cpu(&self) -> CpuInfo {
        CpuInfo {
            cores: self.cpu_cores,
            model: self.cpu_model.clone(),
        }
    }
}

/// Accelerators: none in a CPU-only build.
#[must_use]
pub fn gpus() -> Vec<GpuInfo> {
    Vec::new()
}

/// The kernel path and build that decide whether two nodes agree bit for bit.
/// Our Q4_1 kernel equals candle's on every CPU, so the class names candle's
/// generic CPU path and the versions of the crates that compute.
#[must_use]
pub fn determinism_class() -> DeterminismClass {
    DeterminismClass {
        kernel: format!("cpu-{}-candle-generic", std::env::consts::ARCH),
        build: "candle-0.11.1+commons-kernels-0.1".into(),
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_owned())
}

fn ram_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Times a few 256×256 f32 matmuls: a short, honest figure, not a peak.
fn matmul_mflops() -> candle_core::Result<u64> {
    let n = 256usize;
    let a = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    a.matmul(&b)?;
    let reps = 20;
    let t = Instant::now();
    for _ in 0..reps {
        a.matmul(&b)?;
    }
    let flops = 2.0 * (n * n * n * reps) as f64;
    Ok((flops / t.elapsed().as_secs_f64() / 1e6) as u64)
}

/// This machine's capacity: read from `capacity.json` in `data_dir` when it
/// is there (and `rebench` is false), measured and written there otherwise.
pub fn measure(data_dir: &Path, rebench: bool) -> anyhow::Result<Capacity> {
    let cache = data_dir.join("capacity.json");
    if !rebench
        && let Ok(text) = std::fs::read_to_string(&cache)
        && let Ok(c) = serde_json::from_str::<Capacity>(&text)
    {
        return Ok(c);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    let c = Capacity {
        cpu_cores: cores,
        cpu_model: cpu_model(),
        ram_bytes: ram_bytes(),
        matmul_mflops: matmul_mflops()?,
    };
    std::fs::write(&cache, serde_json::to_string_pretty(&c)?)?;
    Ok(c)
}
