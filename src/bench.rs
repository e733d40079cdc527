//! `ampserve bench train`: time full training steps (forward, loss, scaled backward, overflow
//! check, Adam) at the PyTorch reference's sizes, one JSON line per precision.

use crate::config::{Precision, TrainSpec};
use crate::data::{self, DeviceBatch};
use crate::model::{Config, Transformer};
use crate::train::Stepper;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::time::Instant;

/// Model and batch sizes of `../shared/bench/pytorch_ref` (`--size`).
#[derive(Debug, Clone, Copy)]
pub struct Preset {
    pub name: &'static str,
    pub d_model: usize,
    pub layers: usize,
    pub heads: usize,
    pub d_ff: usize,
    pub seq_len: usize,
    pub batch: usize,
    pub vocab: usize,
}

pub const PRESETS: [Preset; 3] = [
    Preset {
        name: "tiny",
        d_model: 128,
        layers: 2,
        heads: 4,
        d_ff: 512,
        seq_len: 64,
        batch: 32,
        vocab: 8000,
    },
    Preset {
        name: "small",
        d_model: 256,
        layers: 3,
        heads: 4,
        d_ff: 1024,
        seq_len: 128,
        batch: 16,
        vocab: 16000,
    },
    Preset {
        name: "tutorial",
        d_model: 512,
        layers: 6,
        heads: 8,
        d_ff: 2048,
        seq_len: 350,
        batch: 8,
        vocab: 20000,
    },
];

impl Preset {
    /// The tutorial model at this preset's sizes (dropout 0.1, the tutorial's layer norm).
    pub fn model_config(&self, max_positions: usize) -> Config {
        Config {
            src_vocab: self.vocab,
            tgt_vocab: self.vocab,
            d_model: self.d_model,
            layers: self.layers,
            heads: self.heads,
            d_ff: self.d_ff,
            dropout: 0.1,
            tutorial_layer_norm: true,
            norm_eps: 1e-6,
            max_positions,
            tie_embeddings: false,
        }
    }
}

pub fn preset(name: &str) -> anyhow::Result<Preset> {
    let n = if name == "full" { "tutorial" } else { name };
    PRESETS
        .iter()
        .find(|p| p.name == n)
        .copied()
        .ok_or_else(|| anyhow::anyhow!("unknown size `{name}`: expected tiny, small or tutorial"))
}

/// [`synthetic_host_batch`] on `dev`.
pub fn synthetic_batch(
    p: &Preset,
    rng: &mut rand::rngs::StdRng,
    dev: &candle_core::Device,
) -> candle_core::Result<(DeviceBatch, usize)> {
    let b = synthetic_host_batch(p, rng);
    Ok((b.to_device(dev)?, b.n_tgt_tokens))
}

/// The reference's synthetic batch: random tokens laid out like the tutorial's dataset, non-pad
/// lengths uniform in [seq/4, seq], padded to seq_len, in host memory (the trainer uploads each
/// batch in its step; so does the benchmark).
pub fn synthetic_host_batch(p: &Preset, rng: &mut rand::rngs::StdRng) -> data::Batch {
    let (b, s) = (p.batch, p.seq_len);
    let lo = (s / 4).max(3);
    let pad = data::PAD_ID;
    let (mut enc, mut dec, mut lab) = (vec![pad; b * s], vec![pad; b * s], vec![pad; b * s]);
    let (mut toks, mut src_toks) = (0, 0);
    for i in 0..b {
        let ns = rng.gen_range(lo..=s);
        let nt = rng.gen_range(lo..=s);
        let row = i * s;
        enc[row] = data::SOS_ID;
        for j in 1..ns - 1 {
            enc[row + j] = rng.gen_range(4..p.vocab as u32);
        }
        enc[row + ns - 1] = data::EOS_ID;
        dec[row] = data::SOS_ID;
        for j in 1..nt {
            let t = rng.gen_range(4..p.vocab as u32);
            dec[row + j] = t;
            lab[row + j - 1] = t;
        }
        lab[row + nt - 1] = data::EOS_ID;
        toks += nt;
        src_toks += ns;
    }
    data::Batch {
        size: b,
        src_len: s,
        tgt_len: s,
        src: enc,
        tgt_in: dec,
        tgt_out: lab,
        n_tgt_tokens: toks,
        n_src_tokens: src_toks,
    }
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

#[derive(Debug, Serialize)]
pub struct TrainBenchRecord {
    pub kind: &'static str,
    pub size: String,
    pub precision: String,
    pub device: String,
    /// Sentences per step (the size's own, or `--batch`).
    pub batch: usize,
    pub steps: usize,
    pub warmup: usize,
    pub step_ms_median: f64,
    pub step_ms_min: f64,
    pub step_ms_max: f64,
    pub it_per_s: f64,
    pub tokens_per_s: f64,
    pub padded_tokens_per_s: f64,
    pub peak_rss_mb: f64,
    pub speedup_vs_fp32: Option<f64>,
    pub loss_first: f64,
    pub loss_last: f64,
    pub skipped_steps: u64,
    pub synthetic: bool,
    /// Kernel launches of one step (docs/counting.md): forward, backward, optimizer.
    pub device_ops_per_step: u64,
    /// Bytes one step copies from the host to the device, and of those the token batch's.
    pub h2d_bytes_per_step: u64,
    pub batch_bytes: u64,
    /// Reads of one step that wait for the device.
    pub host_syncs_per_step: u64,
    /// Nodes of the step's backward graph, and whether our code declared every one of them (so
    /// `device_ops_per_step` covers the whole graph).
    pub graph_nodes: u64,
    pub graph_declared: u64,
    pub graph_counted: bool,
}

/// `cpu` or `cuda:N`, as `--device` spells it.
pub fn device_label(dev: &candle_core::Device) -> String {
    match dev.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        other => format!("{other:?}"),
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Time `steps` training steps (after `warmup`) at preset `p` in `precision` on synthetic
/// batches (four, cycled, like the reference).
pub fn bench_train(
    p: &Preset,
    precision: Precision,
    warmup: usize,
    steps: usize,
    dev: &candle_core::Device,
) -> anyhow::Result<TrainBenchRecord> {
    let model = Transformer::new(&p.model_config(p.seq_len + 8), 0, dev)?;
    let mut spec = TrainSpec::default();
    spec.train.precision = precision;
    spec.train.lr = 1e-4;
    let mut stepper = Stepper::new(&spec, &model)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let pool: Vec<data::Batch> = (0..4).map(|_| synthetic_host_batch(p, &mut rng)).collect();
    let (mut times, mut tps) = (Vec::new(), Vec::new());
    let (mut first, mut last) = (f64::NAN, f64::NAN);
    let mut counted = None;
    for i in 0..warmup + steps {
        let hb = &pool[i % pool.len()];
        let toks = hb.n_tgt_tokens;
        let t0 = Instant::now();
        // the step as the trainer runs it: upload the batch, step
        let (o, counts) = crate::counters::measure(|| -> anyhow::Result<_> {
            let b = hb.to_device(dev)?;
            Ok(stepper.step(&model, &b, i as u64 + 1)?)
        });
        let o = o?;
        // A GPU runs the step's last kernels (the Adam updates) after `step` returns: wait for
        // them so each timed step is complete, as the reference's torch.cuda.synchronize().
        dev.synchronize()?;
        let dt = t0.elapsed().as_secs_f64();
        // every step launches the same ops; the last one is reported
        counted = Some((counts, o.graph, hb.device_bytes()));
        if i == 0 {
            first = o.loss;
        }
        last = o.loss;
        if i >= warmup {
            times.push(dt * 1e3);
            tps.push(toks as f64 / dt);
        }
    }
    let med = median(&mut times.clone());
    let (counts, graph, batch_bytes) = counted.unwrap_or_default();
    Ok(TrainBenchRecord {
        kind: "train",
        size: p.name.into(),
        precision: precision.as_str().into(),
        device: device_label(dev),
        batch: p.batch,
        steps,
        warmup,
        step_ms_median: med,
        step_ms_min: times.iter().cloned().fold(f64::INFINITY, f64::min),
        step_ms_max: times.iter().cloned().fold(0.0, f64::max),
        it_per_s: 1e3 / med,
        tokens_per_s: median(&mut tps),
        padded_tokens_per_s: (p.batch * p.seq_len) as f64 * 1e3 / med,
        peak_rss_mb: peak_rss_mb(),
        speedup_vs_fp32: None,
        loss_first: first,
        loss_last: last,
        skipped_steps: stepper.scaler.skipped_total(),
        synthetic: true,
        device_ops_per_step: counts.device_ops,
        h2d_bytes_per_step: counts.h2d_bytes,
        batch_bytes,
        host_syncs_per_step: counts.host_syncs,
        graph_nodes: graph.nodes,
        graph_declared: graph.candle_nodes + graph.fused_nodes,
        graph_counted: graph.complete(),
    })
}

#[derive(clap::Args, Debug)]
pub struct BenchTrainArgs {
    /// tiny | small | tutorial (the reference's presets)
    #[arg(long, default_value = "tiny")]
    pub size: String,
    /// Comma-separated precisions
    #[arg(long, default_value = "fp32,bf16,f16")]
    pub precision: String,
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Synthetic batches mirroring the reference (the default and, for now, the only mode)
    #[arg(long, default_value_t = true)]
    pub synthetic: bool,
    /// cpu or cuda:N (needs a build with `--features cuda`)
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Sentences per step instead of the size's own (tiny 32, small 16, tutorial 8)
    #[arg(long)]
    pub batch: Option<usize>,
}

/// The size's preset, with `--batch` in place of its own batch when given.
pub fn train_bench_preset(a: &BenchTrainArgs) -> anyhow::Result<Preset> {
    let mut p = preset(&a.size)?;
    if let Some(batch) = a.batch {
        anyhow::ensure!(batch >= 1, "--batch must be at least 1, got {batch}");
        p.batch = batch;
    }
    Ok(p)
}

pub fn run_train_bench(a: &BenchTrainArgs) -> anyhow::Result<()> {
    let p = train_bench_preset(a)?;
    let dev = crate::cli::parse_device(&a.device)?;
    let mut fp32_tps = None;
    for name in a
        .precision
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let prec: Precision = name.parse()?;
        let mut rec = bench_train(&p, prec, a.warmup, a.steps, &dev)?;
        if prec == Precision::Fp32 {
            fp32_tps = Some(rec.tokens_per_s);
        }
        rec.speedup_vs_fp32 = fp32_tps.map(|f| rec.tokens_per_s / f);
        println!("{}", serde_json::to_string(&rec)?);
    }
    Ok(())
}

#[derive(Debug, Serialize)]
pub struct DecodeBenchRecord {
    pub kind: &'static str,
    pub size: String,
    pub compute: String,
    pub device: String,
    pub beam: usize,
    pub batch: usize,
    pub src_tokens: usize,
    pub gen_tokens: usize,
    pub iters: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub sent_per_s: f64,
    /// Sentences whose output equals the fp32 compute's (same weights, same inputs).
    pub agree_vs_fp32: Option<f64>,
}

#[derive(clap::Args, Debug)]
pub struct BenchTranslateArgs {
    /// tiny | small | tutorial (the reference's presets)
    #[arg(long, default_value = "small")]
    pub size: String,
    /// Comma-separated compute dtypes (weights are stored f16 in every case)
    #[arg(long, default_value = "fp32,f16,bf16")]
    pub compute: String,
    /// Comma-separated beam sizes (1 = greedy)
    #[arg(long, default_value = "1,4")]
    pub beam: String,
    /// Comma-separated batch sizes
    #[arg(long, default_value = "1,32")]
    pub batch: String,
    /// Words per source sentence (the reference: 20, plus SOS/EOS)
    #[arg(long, default_value_t = 20)]
    pub src_words: usize,
    /// Tokens generated per sentence (EOS is never emitted, so the work is fixed, as in the reference)
    #[arg(long, default_value_t = 20)]
    pub gen_tokens: usize,
    /// Timed decodes per case (after one warm-up)
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

fn percentile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let i = ((s.len() as f64 - 1.0) * q).round() as usize;
    s[i.min(s.len() - 1)]
}

/// Time KV-cached decoding of a random model at preset size: sources of `src_words` random
/// words, exactly `gen_tokens` generated tokens (EOS banned), per compute dtype, beam and batch.
pub fn run_translate_bench(a: &BenchTranslateArgs) -> anyhow::Result<()> {
    use crate::amp::Autocast;
    use crate::generation::{self as decode, DecodeOptions};
    let p = preset(&a.size)?;
    let dev = crate::cli::parse_device(&a.device)?;
    let list = |s: &str| -> anyhow::Result<Vec<usize>> {
        s.split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(|x| {
                x.parse::<usize>()
                    .map_err(|e| anyhow::anyhow!("`{x}`: {e}"))
            })
            .collect()
    };
    let (beams, batches) = (list(&a.beam)?, list(&a.batch)?);
    let cfg = p.model_config((a.src_words + 2).max(a.gen_tokens + 1) + 8);
    let model = Transformer::new(&cfg, 0, &dev)?;
    // weights as an export stores them: rounded to f16
    let stored: std::collections::HashMap<String, candle_core::Tensor> = model
        .named_tensors()
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_dtype(candle_core::DType::F16)?)))
        .collect::<candle_core::Result<_>>()?;
    model.load_named(&|n| stored.get(n).cloned())?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let max_batch = batches.iter().copied().max().unwrap_or(1);
    let sources: Vec<Vec<u32>> = (0..max_batch)
        .map(|_| {
            let mut v = vec![data::SOS_ID];
            v.extend((0..a.src_words).map(|_| rng.gen_range(4..p.vocab as u32)));
            v.push(data::EOS_ID);
            v
        })
        .collect();
    let mut fp32_out: std::collections::HashMap<(usize, usize), Vec<Vec<u32>>> = Default::default();
    for name in a
        .compute
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let prec: Precision = name.parse()?;
        let ac = Autocast::new(prec);
        for &beam in &beams {
            for &batch in &batches {
                let opts = DecodeOptions {
                    beam_size: beam,
                    alpha: 0.6,
                    ban_unk: true,
                    ignore_eos: true,
                };
                let src = &sources[..batch];
                let limits = vec![a.gen_tokens; batch];
                let mut out = decode::decode(&model, &ac, src, &limits, &opts)?;
                let mut times = Vec::with_capacity(a.iters);
                for _ in 0..a.iters.max(1) {
                    let t0 = Instant::now();
                    out = decode::decode(&model, &ac, src, &limits, &opts)?;
                    times.push(t0.elapsed().as_secs_f64() * 1e3);
                }
                let toks: Vec<Vec<u32>> = out.into_iter().map(|h| h.tokens).collect();
                let agree = if prec == Precision::Fp32 {
                    fp32_out.insert((beam, batch), toks);
                    Some(1.0)
                } else {
                    fp32_out.get(&(beam, batch)).map(|r| {
                        r.iter().zip(&toks).filter(|(x, y)| x == y).count() as f64 / batch as f64
                    })
                };
                let p50 = percentile(&times, 0.5);
                let rec = DecodeBenchRecord {
                    kind: "decode",
                    size: p.name.into(),
                    compute: prec.as_str().into(),
                    device: format!("{dev:?}"),
                    beam,
                    batch,
                    src_tokens: a.src_words + 2,
                    gen_tokens: a.gen_tokens,
                    iters: times.len(),
                    p50_ms: p50,
                    p95_ms: percentile(&times, 0.95),
                    sent_per_s: batch as f64 * 1e3 / p50,
                    agree_vs_fp32: agree,
                };
                println!("{}", serde_json::to_string(&rec)?);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(layers: usize) -> Preset {
        Preset {
            name: "count-test",
            d_model: 32,
            layers,
            heads: 2,
            d_ff: 64,
            seq_len: 12,
            batch: 4,
            vocab: 60,
        }
    }

    #[test]
    fn a_counted_step_declares_every_graph_node_and_uploads_only_its_batch() {
        let dev = candle_core::Device::Cpu;
        for prec in [Precision::Fp32, Precision::Bf16, Precision::F16] {
            let r = bench_train(&tiny(2), prec, 1, 2, &dev).unwrap();
            assert!(
                r.graph_counted,
                "{prec:?}: {} graph nodes, {} declared",
                r.graph_nodes, r.graph_declared
            );
            assert!(r.graph_nodes > 50, "{prec:?}: {} nodes", r.graph_nodes);
            // the causal mask was uploaded in the first step and cached: a step after it
            // uploads its token batch and nothing else
            assert_eq!(r.h2d_bytes_per_step, r.batch_bytes, "{prec:?}");
            // the padded source and decoder input, and only the non-PAD labels with their
            // positions (the step's batch is the third of the cycled four)
            let mut rng = rand::rngs::StdRng::seed_from_u64(1);
            let pool: Vec<_> = (0..4)
                .map(|_| synthetic_host_batch(&tiny(2), &mut rng))
                .collect();
            let labels = pool[2].n_tgt_tokens as u64;
            assert!(labels < 4 * 12);
            assert_eq!(r.batch_bytes, (2 * 4 * 12 + 2 * labels) * 4);
            // the loss read, and nothing else: the CPU sum of squares leaves its total in host
            // memory and the cross-entropy backward takes the loss scale as a tensor (on CUDA the
            // fused optimizer step's state read carries the loss and the statistics together)
            assert_eq!(r.host_syncs_per_step, 1, "{prec:?}");
        }
    }

    #[test]
    fn bench_train_batch_flag_replaces_the_sizes_batch_and_rejects_zero() {
        let args = |batch| BenchTrainArgs {
            size: "tutorial".into(),
            precision: "f16".into(),
            steps: 1,
            warmup: 0,
            synthetic: true,
            device: "cpu".into(),
            batch,
        };
        assert_eq!(train_bench_preset(&args(None)).unwrap().batch, 8);
        let p = train_bench_preset(&args(Some(64))).unwrap();
        assert_eq!((p.batch, p.d_model, p.layers), (64, 512, 6));
        let err = train_bench_preset(&args(Some(0))).unwrap_err().to_string();
        assert!(err.contains("--batch"), "{err}");
        // the record reports the batch it ran, and its upload grows with it
        let dev = candle_core::Device::Cpu;
        let (mut small, mut big) = (tiny(1), tiny(1));
        big.batch = 9;
        small.batch = 3;
        let (rs, rb) = (
            bench_train(&small, Precision::Fp32, 0, 1, &dev).unwrap(),
            bench_train(&big, Precision::Fp32, 0, 1, &dev).unwrap(),
        );
        assert_eq!((rs.batch, rb.batch), (3, 9));
        assert!(
            rb.batch_bytes > 2 * rs.batch_bytes,
            "{} vs {}",
            rb.batch_bytes,
            rs.batch_bytes
        );
    }

    #[test]
    fn launches_grow_by_the_same_count_with_every_layer() {
        let dev = candle_core::Device::Cpu;
        let ops = |layers| {
            bench_train(&tiny(layers), Precision::F16, 0, 1, &dev)
                .unwrap()
                .device_ops_per_step
        };
        let (one, two, three) = (ops(1), ops(2), ops(3));
        assert!(two > one && one > 0);
        assert_eq!(
            three - two,
            two - one,
            "per-layer launches: {one}, {two}, {three}"
        );
    }
}
