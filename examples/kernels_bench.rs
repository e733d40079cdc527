//! Milliseconds per call of the fused kernels in `ampserve::kernels` vs the straightforward candle
//! compositions they replace, at the shapes of the `tiny` and `small` presets, forward and
//! forward+backward. Run with `cargo run --release --example kernels_bench [-- tiny|small]`.

use ampserve::kernels::{self, reference, AdamHp};
use candle_core::{DType, Device, Result, Tensor, Var};
use std::time::Instant;

struct Preset {
    name: &'static str,
    batch: usize,
    seq: usize,
    d_model: usize,
    heads: usize,
    d_ff: usize,
    vocab: usize,
}

const PRESETS: [Preset; 2] = [
    Preset {
        name: "tiny",
        batch: 32,
        seq: 64,
        d_model: 128,
        heads: 4,
        d_ff: 512,
        vocab: 8000,
    },
    Preset {
        name: "small",
        batch: 16,
        seq: 128,
        d_model: 256,
        heads: 4,
        d_ff: 1024,
        vocab: 16000,
    },
];

/// Best-of-runs milliseconds of `f` (the machine is shared, so the minimum is the stable
/// statistic): at least 5 runs after 2 warm-ups, up to ~0.6 s.
fn time_ms(mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    f()?;
    let mut best = f64::INFINITY;
    let mut runs = 0;
    let start = Instant::now();
    while runs < 5 || (start.elapsed().as_secs_f64() < 0.6 && runs < 200) {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64() * 1e3);
        runs += 1;
    }
    Ok(best)
}

fn rand(shape: &[usize], dtype: DType) -> Result<Tensor> {
    Tensor::randn(0f32, 1f32, shape, &Device::Cpu)?.to_dtype(dtype)
}

fn row(preset: &str, op: &str, dtype: &str, pass: &str, ours: f64, base: f64) {
    println!(
        "{preset:<6} {op:<22} {dtype:<5} {pass:<8} ours {ours:9.3} ms   candle {base:9.3} ms   speedup {:5.2}x",
        base / ours
    );
}

/// Times `fwd(x)` alone, and `fwd(x)` + backward of `sum(y * w)`; the backward column subtracts
/// the cost of that loss's own graph (measured on a leaf of y's shape), leaving the op's backward.
fn bench_pair(
    p: &Preset,
    op: &str,
    dt: DType,
    x: &Tensor,
    ours: impl Fn(&Tensor) -> Result<Tensor>,
    base: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<()> {
    let dname = format!("{dt:?}").to_lowercase();
    let of = time_ms(|| ours(x).map(|_| ()))?;
    let bf = time_ms(|| base(x).map(|_| ()))?;
    row(p.name, op, &dname, "fwd", of, bf);
    let v = Var::from_tensor(x)?;
    let y = ours(&v)?;
    let w = rand(y.dims(), y.dtype())?;
    let leaf = Var::from_tensor(&y)?;
    let loss_only = time_ms(|| leaf.mul(&w)?.sum_all()?.backward().map(|_| ()))?;
    let o = time_ms(|| {
        let y = ours(&v)?;
        y.mul(&w)?.sum_all()?.backward().map(|_| ())
    })?;
    let b = time_ms(|| {
        let y = base(&v)?;
        y.mul(&w)?.sum_all()?.backward().map(|_| ())
    })?;
    row(p.name, op, &dname, "fwd+bwd", o, b);
    let (ob, bb) = (
        (o - of - loss_only).max(1e-3),
        (b - bf - loss_only).max(1e-3),
    );
    row(p.name, op, &dname, "bwd est", ob, bb);
    Ok(())
}

fn run(p: &Preset) -> Result<()> {
    let dev = Device::Cpu;
    let (b, t, d, h) = (p.batch, p.seq, p.d_model, p.heads);
    let n = b * t;
    // layer norm on the residual stream (f32 in, f32 out) and bf16 in/out.
    let alpha = Tensor::ones(d, DType::F32, &dev)?;
    let beta = Tensor::zeros(d, DType::F32, &dev)?;
    for (dt, out) in [(DType::F32, DType::F32), (DType::F32, DType::BF16)] {
        let x = rand(&[b, t, d], dt)?;
        bench_pair(
            p,
            if out == DType::BF16 {
                "layer_norm->bf16"
            } else {
                "layer_norm"
            },
            dt,
            &x,
            |x| kernels::layer_norm(x, &alpha, &beta, 1e-6, true, out),
            |x| reference::layer_norm(x, &alpha, &beta, 1e-6, true, out),
        )?;
    }
    // masked softmax over attention scores with a causal+padding mask.
    let mut mv = Vec::with_capacity(b * t * t);
    for bi in 0..b {
        let len = t - (bi * 7) % (t / 2);
        for q in 0..t {
            for k in 0..t {
                mv.push(if k <= q && k < len { 0f32 } else { -1e9 });
            }
        }
    }
    let mask = Tensor::from_vec(mv, (b, 1, t, t), &dev)?;
    let scale = 1.0 / ((d / h) as f64).sqrt();
    for dt in [DType::F32, DType::BF16] {
        let s = rand(&[b, h, t, t], dt)?;
        bench_pair(
            p,
            "masked_softmax",
            dt,
            &s,
            |x| kernels::masked_softmax(x, &mask, scale, dt, None),
            |x| reference::masked_softmax(x, &mask, scale, dt, None),
        )?;
    }
    // label-smoothed cross-entropy over the vocabulary.
    let targets: Vec<u32> = (0..n)
        .map(|i| {
            if i % 5 == 0 {
                0
            } else {
                (i * 7919 % p.vocab) as u32
            }
        })
        .collect();
    let targets = Tensor::from_vec(targets, n, &dev)?;
    for dt in [DType::F32, DType::BF16] {
        let logits = rand(&[n, p.vocab], dt)?;
        bench_pair(
            p,
            "cross_entropy_ls",
            dt,
            &logits,
            |x| kernels::cross_entropy_ls(x, &targets, 0, 0.1),
            |x| reference::cross_entropy_ls(x, &targets, 0, 0.1),
        )?;
    }
    // bf16 matmul at the feed-forward shape: (B, T, D) x W1(d_ff, D).t()
    let w1 = rand(&[p.d_ff, d], DType::BF16)?;
    let xb = rand(&[b, t, d], DType::BF16)?;
    let candle_bf16 = |x: &Tensor| x.broadcast_matmul(&w1.t()?);
    if kernels::bf16_dot_available() {
        bench_pair(
            p,
            "matmul ffn (avx512bf16)",
            DType::BF16,
            &xb,
            |x| kernels::matmul(x, &w1.t()?),
            candle_bf16,
        )?;
    } else {
        println!("{:<6} matmul: no AVX512-BF16 on this CPU; kernels::matmul uses the AVX2+FMA micro-kernel", p.name);
    }
    bench_pair(
        p,
        "matmul ffn (avx2 kernel)",
        DType::BF16,
        &xb,
        |x| kernels::matmul_portable(x, &w1.t()?),
        candle_bf16,
    )?;
    let w1f = w1.to_dtype(DType::F32)?;
    let xf = xb.to_dtype(DType::F32)?;
    let f = time_ms(|| xf.broadcast_matmul(&w1f.t()?).map(|_| ()))?;
    let xv = Var::from_tensor(&xf)?;
    let wf = rand(&[b, t, p.d_ff], DType::F32)?;
    let fb = time_ms(|| {
        let y = xv.broadcast_matmul(&w1f.t()?)?;
        y.mul(&wf)?.sum_all()?.backward().map(|_| ())
    })?;
    println!(
        "{:<6} (fp32 baseline) matmul ffn, candle f32: fwd {f:.3} ms, fwd+bwd {fb:.3} ms",
        p.name
    );
    // Output projection to the vocabulary.
    let wo = rand(&[p.vocab, d], DType::BF16)?;
    bench_pair(
        p,
        "matmul vocab (avx2 kern)",
        DType::BF16,
        &xb,
        |x| kernels::matmul_portable(x, &wo.t()?),
        |x| x.broadcast_matmul(&wo.t()?),
    )?;
    // Adam over a parameter of the vocabulary projection's size, and the global sum of squares.
    let numel = p.vocab * d;
    let g = rand(&[numel], DType::F32)?;
    let mk = || -> Result<(Var, Var, Var)> {
        Ok((
            Var::from_tensor(&rand(&[numel], DType::F32)?)?,
            Var::zeros(numel, DType::F32, &dev)?,
            Var::zeros(numel, DType::F32, &dev)?,
        ))
    };
    let hp = AdamHp {
        weight_decay: 0.01,
        decoupled: true,
        ..Default::default()
    };
    let (p1, m1, v1) = mk()?;
    let (p2, m2, v2) = mk()?;
    let mut step = 0u64;
    let o = time_ms(|| {
        step += 1;
        kernels::adam_update(&p1, &g, &m1, &v1, &hp, step, 1.0)
    })?;
    let mut step = 0u64;
    let bs = time_ms(|| {
        step += 1;
        reference::adam_update(&p2, &g, &m2, &v2, &hp, step, 1.0)
    })?;
    row(
        p.name,
        &format!("adam_update ({numel})"),
        "f32",
        "step",
        o,
        bs,
    );
    let o = time_ms(|| kernels::sum_squares(&[&g]).map(|_| ()))?;
    let bs = time_ms(|| g.sqr()?.sum_all()?.to_scalar::<f32>().map(|_| ()))?;
    row(p.name, "sum_squares", "f32", "reduce", o, bs);
    Ok(())
}

fn main() -> Result<()> {
    let which: Vec<String> = std::env::args().skip(1).collect();
    println!(
        "threads: {} (rayon), avx512bf16: {}",
        rayon::current_num_threads(),
        kernels::bf16_dot_available()
    );
    for p in PRESETS.iter() {
        if which.is_empty() || which.iter().any(|w| w == p.name) {
            run(p)?;
        }
    }
    Ok(())
}
