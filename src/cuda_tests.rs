//! Tests that need a CUDA device (compiled only with `--features cuda`; their names start with
//! `cuda_tests::`). Each one skips, printing `CUDA-SKIPPED` and the reason, only when
//! `Device::new_cuda(0)` fails; `scripts/gpu-check.sh` runs them on a GPU machine and counts a
//! skip there as a failure.
//!
//! What they pin down: f16/bf16 matmuls (cuBLAS) give f16/bf16 results on the GPU; no op of the
//! training step leaves the device or silently runs in another dtype; the GPU path (candle's
//! CUDA ops and the reference compositions) computes what the CPU path (the fused CPU kernels)
//! computes; a full mixed-precision step trains on the GPU.

use crate::amp::Autocast;
use crate::bench::{synthetic_batch, Preset};
use crate::config::{Precision, TrainSpec};
use crate::data::PAD_ID;
use crate::kernels::test_util::{max_abs, max_abs_diff, randn};
use crate::model::{Config, Ctx, Transformer};
use crate::train::Stepper;
use crate::{kernels, ops};
use candle_core::{DType, Device, DeviceLocation, Result, Tensor, Var};
use rand::SeedableRng;

fn cuda() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("CUDA-SKIPPED: no usable CUDA device 0 ({e})");
            None
        }
    }
}

fn assert_on_cuda(what: &str, t: &Tensor) {
    assert!(
        matches!(t.device().location(), DeviceLocation::Cuda { gpu_id: 0 }),
        "{what} left the GPU: it is on {:?}",
        t.device().location()
    );
}

fn cfg() -> Config {
    Config {
        src_vocab: 300,
        tgt_vocab: 300,
        d_model: 64,
        layers: 2,
        heads: 4,
        d_ff: 128,
        dropout: 0.1,
        tutorial_layer_norm: true,
        norm_eps: 1e-6,
        max_positions: 40,
        tie_embeddings: false,
    }
}

/// The benchmark's synthetic batch layout (SOS/EOS, PAD tails), small.
const PRESET: Preset = Preset {
    name: "cuda-test",
    d_model: 64,
    layers: 2,
    heads: 4,
    d_ff: 128,
    seq_len: 32,
    batch: 4,
    vocab: 300,
};

fn batch(dev: &Device) -> Result<crate::data::DeviceBatch> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    Ok(synthetic_batch(&PRESET, &mut rng, dev)?.0)
}

fn rel_err(a: &Tensor, b: &Tensor) -> Result<f32> {
    let b = b.to_device(a.device())?;
    Ok(max_abs_diff(a, &b)? / max_abs(&b)?.max(1e-6))
}

#[test]
fn device_strings_open_the_gpu() {
    let Some(_) = cuda() else { return };
    let spec: crate::worker::DeviceSpec = "cuda:0".parse().unwrap();
    assert_eq!(spec, crate::worker::DeviceSpec::Cuda(0));
    let d = spec.open().unwrap();
    assert!(matches!(d.location(), DeviceLocation::Cuda { gpu_id: 0 }));
    let d = crate::cli::parse_device("cuda").unwrap();
    assert_eq!(crate::bench::device_label(&d), "cuda:0");
    let e = "cuda:4096"
        .parse::<crate::worker::DeviceSpec>()
        .unwrap()
        .open()
        .unwrap_err();
    assert!(
        e.to_string().contains("cannot open device `cuda:4096`"),
        "{e}"
    );
}

#[test]
fn autocast_matmuls_run_in_half_precision_on_the_gpu() -> Result<()> {
    let Some(dev) = cuda() else { return Ok(()) };
    // x (3, 5, 64) f32 activations, w (48, 64) an f32 master weight (used transposed).
    let x = randn(&[3, 5, 64], 1, 1.0)?;
    let w = randn(&[48, 64], 2, 0.2)?;
    let want = x.reshape((15, 64))?.matmul(&w.t()?)?.reshape((3, 5, 48))?;
    for (p, dt, tol) in [
        (Precision::F16, DType::F16, 2e-3),
        (Precision::Bf16, DType::BF16, 2e-2),
    ] {
        let ac = Autocast::new(p);
        let y = ac.linear(&x.to_device(&dev)?, &w.to_device(&dev)?, None)?;
        assert_on_cuda("linear output", &y);
        assert_eq!(y.dtype(), dt, "{p:?} linear must return {dt:?}");
        assert_eq!(y.dims(), &[3, 5, 48]);
        let e = rel_err(&y.to_device(&Device::Cpu)?, &want)?;
        assert!(e < tol, "{p:?} linear vs f32 CPU: relative error {e}");
        // attention-shaped batched matmul: (b, h, t, d) x (b, h, d, t) through a transposed view
        let q = randn(&[2, 4, 7, 16], 3, 1.0)?;
        let k = randn(&[2, 4, 9, 16], 4, 1.0)?;
        let want_s = q.matmul(&k.t()?)?;
        let s = ac.matmul(&q.to_device(&dev)?, &k.to_device(&dev)?.t()?)?;
        assert_on_cuda("scores", &s);
        assert_eq!(s.dtype(), dt);
        let e = rel_err(&s.to_device(&Device::Cpu)?, &want_s)?;
        assert!(e < tol, "{p:?} scores vs f32 CPU: relative error {e}");
        // ops::matmul itself (the CPU-only packed bf16 GEMM must not be chosen on the GPU)
        let a16 = q.to_dtype(dt)?.to_device(&dev)?;
        let b16 = k.t()?.to_dtype(dt)?.to_device(&dev)?;
        let m = ops::matmul(&a16, &b16)?;
        assert_on_cuda("ops::matmul", &m);
        assert_eq!(m.dtype(), dt);
    }
    Ok(())
}

#[test]
fn fused_op_fallbacks_match_the_cpu_kernels() -> Result<()> {
    let Some(dev) = cuda() else { return Ok(()) };
    let g = |t: &Tensor| t.to_device(&dev);

    // layer norm, tutorial form, f32 and f16 outputs, with gradients
    let x = randn(&[4, 6, 64], 5, 2.0)?;
    let alpha = randn(&[64], 6, 1.0)?;
    let beta = randn(&[64], 7, 1.0)?;
    let wy = randn(&[4, 6, 64], 8, 1.0)?;
    for out in [DType::F32, DType::F16] {
        let run = |dev_x: &Tensor, a: &Tensor, b: &Tensor, w: &Tensor| -> Result<_> {
            let (xv, av, bv) = (
                Var::from_tensor(dev_x)?,
                Var::from_tensor(a)?,
                Var::from_tensor(b)?,
            );
            let y = ops::layer_norm(
                xv.as_tensor(),
                av.as_tensor(),
                bv.as_tensor(),
                1e-6,
                true,
                out,
            )?;
            let gr = y.to_dtype(DType::F32)?.mul(w)?.sum_all()?.backward()?;
            let pick = |v: &Var| gr.get(v).cloned().expect("layer norm grad");
            Ok((y, pick(&xv), pick(&av), pick(&bv)))
        };
        let (yc, gxc, gac, gbc) = run(&x, &alpha, &beta, &wy)?;
        let (yg, gxg, gag, gbg) = run(&g(&x)?, &g(&alpha)?, &g(&beta)?, &g(&wy)?)?;
        let tol = if out == DType::F32 { 1e-5 } else { 2e-3 };
        for (what, c, gp) in [
            ("y", &yc, &yg),
            ("dx", &gxc, &gxg),
            ("dalpha", &gac, &gag),
            ("dbeta", &gbc, &gbg),
        ] {
            assert_on_cuda(what, gp);
            let e = rel_err(gp, c)?;
            assert!(
                e < tol,
                "layer norm {what} ({out:?}): GPU vs CPU relative error {e}"
            );
        }
        assert_eq!(yg.dtype(), out);
    }

    // masked softmax on f16 scores with a padding mask, f16 output
    let scores = randn(&[2, 4, 8, 8], 9, 3.0)?.to_dtype(DType::F16)?;
    let mut m = vec![0f32; 16];
    m[8 + 5..16].fill(crate::model::MASK_FILL); // second sentence: last 3 keys are PAD
    let mask = Tensor::from_vec(m, (2, 1, 1, 8), &Device::Cpu)?;
    let pc = ops::masked_softmax(&scores, &mask, 0.25, DType::F16, None)?;
    let pg = ops::masked_softmax(&g(&scores)?, &g(&mask)?, 0.25, DType::F16, None)?;
    assert_on_cuda("softmax", &pg);
    assert_eq!(pg.dtype(), DType::F16);
    let e = max_abs_diff(&pg.to_device(&Device::Cpu)?, &pc)?;
    assert!(e < 2e-3, "masked softmax GPU vs CPU: max abs diff {e}");
    let masked = pg.narrow(0, 1, 1)?.narrow(3, 5, 3)?;
    assert_eq!(max_abs(&masked)?, 0.0, "masked keys must get probability 0");

    // label-smoothed cross-entropy on bf16 logits with PAD rows, value and gradient
    let logits = randn(&[16, 50], 10, 2.0)?.to_dtype(DType::BF16)?;
    let t: Vec<u32> = (0..16u32)
        .map(|i| if i % 5 == 4 { PAD_ID } else { (i * 7) % 50 })
        .collect();
    let targets = Tensor::new(t.as_slice(), &Device::Cpu)?;
    let ce = |l: &Tensor, t: &Tensor| -> Result<(Tensor, Tensor)> {
        let v = Var::from_tensor(l)?;
        let loss = ops::cross_entropy_ls(v.as_tensor(), t, PAD_ID, 0.1)?;
        let gr = loss.backward()?;
        Ok((loss, gr.get(&v).cloned().expect("ce grad")))
    };
    let (lc, gc) = ce(&logits, &targets)?;
    let (lg, gg) = ce(&g(&logits)?, &g(&targets)?)?;
    assert_on_cuda("loss", &lg);
    assert_on_cuda("dlogits", &gg);
    assert_eq!(lg.dtype(), DType::F32, "the loss is computed in f32");
    let (lc, lg) = (lc.to_scalar::<f32>()?, lg.to_scalar::<f32>()?);
    assert!(
        (lc - lg).abs() < 1e-4 * lc.abs(),
        "CE: CPU {lc} vs GPU {lg}"
    );
    let e = rel_err(&gg.to_dtype(DType::F32)?, &gc.to_dtype(DType::F32)?)?;
    assert!(e < 1e-2, "CE grad GPU vs CPU relative error {e}");

    // global sum of squares: one host sync, f64 squares (no f32 overflow at 1e30)
    let a = randn(&[1000], 11, 1.0)?;
    let h = randn(&[33, 7], 12, 1.0)?.to_dtype(DType::F16)?;
    let want = kernels::sum_squares(&[&a, &h])?;
    let got = kernels::sum_squares(&[&g(&a)?, &g(&h)?])?;
    assert!(
        (want - got).abs() < 1e-6 * want,
        "sum_squares CPU {want} vs GPU {got}"
    );
    let big = Tensor::new(&[1e30f32, 1.0], &dev)?;
    let s = kernels::sum_squares(&[&big])?;
    assert!(s.is_finite() && (s / 1e60 - 1.0).abs() < 1e-6, "{s}");
    let inf = Tensor::new(&[1f32, f32::INFINITY], &dev)?;
    assert!(!kernels::sum_squares(&[&g(&a)?, &inf])?.is_finite());

    // Adam on the GPU: the tensor-op update matches the fused CPU kernel, in place on the GPU
    let hp = kernels::AdamHp {
        lr: 1e-3,
        ..Default::default()
    };
    let p0 = randn(&[257], 13, 1.0)?;
    let gr = randn(&[257], 14, 100.0)?;
    let mk = |d: &Device| -> Result<(Var, Var, Var)> {
        Ok((
            Var::from_tensor(&p0.to_device(d)?)?,
            Var::zeros(257, DType::F32, d)?,
            Var::zeros(257, DType::F32, d)?,
        ))
    };
    let (pc, mc, vc) = mk(&Device::Cpu)?;
    let (pg, mg, vg) = mk(&dev)?;
    for t in 1..=3 {
        kernels::adam_update(&pc, &gr, &mc, &vc, &hp, t, 1.0 / 64.0)?;
        kernels::adam_update(&pg, &g(&gr)?, &mg, &vg, &hp, t, 1.0 / 64.0)?;
    }
    assert_on_cuda("adam param", pg.as_tensor());
    let e = max_abs_diff(&pg.as_tensor().to_device(&Device::Cpu)?, pc.as_tensor())?;
    assert!(e < 1e-6, "Adam GPU vs CPU max abs diff {e}");
    Ok(())
}

#[test]
fn dropout_masks_are_drawn_on_the_gpu_and_seeded() -> Result<()> {
    let Some(dev) = cuda() else { return Ok(()) };
    let x = Tensor::ones(200_000, DType::F16, &dev)?;
    let mask =
        |seed: u64| ops::DropMask::new(ops::site_seed(ops::step_seed(seed, 1), 0), 200_000, 0.1);
    let draw = |seed: u64| -> Result<Tensor> { ops::dropout_with(&x, &mask(seed)) };
    // the GPU mask is the CPU mask: both are the same hash of (seed, index)
    let on_cpu = ops::dropout_with(&x.to_device(&Device::Cpu)?, &mask(5))?;
    assert_eq!(
        max_abs_diff(&draw(5)?.to_device(&Device::Cpu)?, &on_cpu)?,
        0.0
    );
    let y = draw(5)?;
    assert_on_cuda("dropout", &y);
    assert_eq!(y.dtype(), DType::F16);
    let v: Vec<f32> = y.to_dtype(DType::F32)?.to_vec1()?;
    let zeros = v.iter().filter(|&&a| a == 0.0).count() as f64 / v.len() as f64;
    assert!((zeros - 0.1).abs() < 0.005, "dropped fraction {zeros}");
    let kept = 1.0 / 0.9;
    assert!(
        v.iter().all(|&a| a == 0.0 || (a - kept).abs() < 1e-3),
        "values are 0 or 1/(1-p)"
    );
    let again: Vec<f32> = draw(5)?.to_dtype(DType::F32)?.to_vec1()?;
    assert_eq!(v, again, "the same seed gives the same mask");
    let other: Vec<f32> = draw(6)?.to_dtype(DType::F32)?.to_vec1()?;
    assert_ne!(v, other, "another step gives another mask");
    Ok(())
}

#[test]
fn forward_loss_matches_the_cpu() -> Result<()> {
    let Some(dev) = cuda() else { return Ok(()) };
    let cfg = cfg();
    let (mc, mg) = (
        Transformer::new(&cfg, 7, &Device::Cpu)?,
        Transformer::new(&cfg, 7, &dev)?,
    );
    let bc = batch(&Device::Cpu)?;
    let bg = batch(&dev)?;
    // (precision, logits relative tolerance, loss relative tolerance)
    for (p, tol_logits, tol_loss) in [
        (Precision::Fp32, 1e-4, 1e-5),
        (Precision::F16, 1e-2, 2e-3),
        (Precision::Bf16, 6e-2, 1e-2),
    ] {
        let ac = Autocast::new(p);
        let run = |m: &Transformer, b: &crate::data::DeviceBatch| -> Result<(Tensor, f32)> {
            ac.new_step();
            let ctx = Ctx::eval(&ac);
            let logits = m.forward_t(&ctx, &b.src, &b.tgt_in)?;
            let loss = m.loss(&ctx, &b.src, &b.tgt_in, &b.labels, 0.1)?;
            Ok((logits, loss.to_scalar::<f32>()?))
        };
        let (lc, loss_c) = run(&mc, &bc)?;
        let (lg, loss_g) = run(&mg, &bg)?;
        assert_on_cuda("logits", &lg);
        assert_eq!(lg.dtype(), crate::amp::dtype_of(p), "{p:?} logits dtype");
        let e = rel_err(&lg.to_device(&Device::Cpu)?, &lc)?;
        assert!(
            e < tol_logits,
            "{p:?} logits GPU vs CPU: relative error {e}"
        );
        assert!(loss_g.is_finite(), "{p:?} GPU loss {loss_g}");
        let rel = (loss_c - loss_g).abs() / loss_c.abs();
        assert!(
            rel < tol_loss,
            "{p:?} loss: CPU {loss_c} vs GPU {loss_g} (relative {rel})"
        );
    }
    Ok(())
}

#[test]
fn mixed_precision_training_steps_stay_on_the_gpu() -> Result<()> {
    let Some(dev) = cuda() else { return Ok(()) };
    let cfg = cfg();
    let b = batch(&dev)?;
    for p in [Precision::F16, Precision::Bf16] {
        let model = Transformer::new(&cfg, 11, &dev)?;
        let dt = crate::amp::dtype_of(p);
        // One forward/backward by hand: half-precision logits on the GPU, an f32 finite loss,
        // and an f32 gradient on the GPU for every master weight.
        let ac = Autocast::new(p);
        let ctx = Ctx::new(&ac, true, 0.1, ops::step_seed(1, 1));
        let logits = model.forward_t(&ctx, &b.src, &b.tgt_in)?;
        assert_on_cuda("logits", &logits);
        assert_eq!(logits.dtype(), dt, "{p:?} logits");
        let v = logits.dim(2)?;
        let loss = ops::cross_entropy_ls(
            &logits.reshape(((), v))?.index_select(&b.labels.rows, 0)?,
            &b.labels.ids,
            PAD_ID,
            0.1,
        )?;
        assert_on_cuda("loss", &loss);
        assert_eq!(loss.dtype(), DType::F32);
        let l = loss.to_scalar::<f32>()?;
        assert!(l.is_finite() && l > 0.0, "{p:?} loss {l}");
        let grads = (loss * 1024.0)?.backward()?;
        let glist: Vec<Tensor> = model
            .params
            .iter()
            .map(|(name, v)| {
                ac.grad_of(v, &grads)
                    .unwrap()
                    .unwrap_or_else(|| panic!("{p:?}: no gradient for {name}"))
            })
            .collect();
        for ((name, var), g) in model.params.iter().zip(&glist) {
            assert_on_cuda(name, g);
            assert!(
                g.dtype() == DType::F32 || g.dtype() == dt,
                "{p:?}: gradient of {name} is {:?}",
                g.dtype()
            );
            assert_on_cuda(name, var.as_tensor());
            assert_eq!(var.dtype(), DType::F32, "master weight {name}");
        }
        let glist: Vec<&Tensor> = glist.iter().collect();
        let ss = kernels::sum_squares(&glist)?;
        assert!(ss.is_finite() && ss > 0.0, "{p:?} grad sum of squares {ss}");

        // The trainer's step: loss finite, steps applied (not all skipped), weights moved and
        // still f32 on the GPU.
        let mut spec = TrainSpec::default();
        spec.train.precision = p;
        spec.train.lr = 1e-3;
        let mut stepper = Stepper::new(&spec, &model).map_err(candle_core::Error::wrap)?;
        let before = model.params[0].1.as_tensor().to_device(&Device::Cpu)?;
        let mut applied = 0;
        let mut losses = Vec::new();
        for step in 1..=6 {
            let o = stepper
                .step(&model, &b, step)
                .map_err(candle_core::Error::wrap)?;
            assert!(o.loss.is_finite(), "{p:?} step {step}: loss {}", o.loss);
            applied += usize::from(!o.skipped);
            losses.push(o.loss);
        }
        assert!(applied >= 3, "{p:?}: only {applied} of 6 steps applied");
        let (name, w) = &model.params[0];
        assert_on_cuda(name, w.as_tensor());
        assert_eq!(w.dtype(), DType::F32);
        let moved = max_abs_diff(&w.as_tensor().to_device(&Device::Cpu)?, &before)?;
        assert!(moved > 0.0, "{p:?}: {name} did not change");
        assert!(
            losses[5] < losses[0],
            "{p:?}: the same batch 6 times must lower the loss: {losses:?}"
        );
    }
    Ok(())
}

// ---- The fused CUDA kernels against their CPU twins (issue 11 item 3) ----
//
// Each compares the GPU run of a public kernel entry point (which, with the `cuda` feature,
// launches the kernels of src/kernels/cuda) with the CPU run of the same entry point (the CPU
// kernels, themselves tested against the reference compositions), forward and every gradient
// of sum(out * w), on odd shapes and rows longer than one block (d = 4097 > 1024 threads).

/// Row lengths every row kernel is tried on: one element, less than a warp, several elements
/// per thread, and longer than one block of 1024 threads.
const ROW_LENGTHS: [usize; 4] = [1, 7, 1000, 4097];

/// The dtypes with their relative tolerance for GPU-vs-CPU agreement.
const DTYPES: [(DType, f32); 3] = [(DType::F32, 1e-4), (DType::F16, 4e-3), (DType::BF16, 3e-2)];

/// Forward and input gradients of `f` on the CPU and on `dev`, compared within `tol`
/// (relative to the largest magnitude of the CPU value).
fn gpu_matches_cpu(
    what: &str,
    dev: &Device,
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    tol: f32,
) -> Result<()> {
    use crate::kernels::test_util::grads;
    let out_dims = f(inputs)?.dims().to_vec();
    let w = randn(&out_dims, 1234, 1.0)?;
    let (yc, gc) = grads(&f, inputs, &w)?;
    let on_gpu: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.to_device(dev))
        .collect::<Result<_>>()?;
    let (yg, gg) = grads(&f, &on_gpu, &w.to_device(dev)?)?;
    assert_on_cuda(what, &yg);
    assert_eq!(yg.dtype(), yc.dtype(), "{what}: output dtype");
    let e = rel_err(&yg.to_device(&Device::Cpu)?, &yc)?;
    assert!(e <= tol, "{what}: forward GPU vs CPU relative error {e}");
    for (i, (a, b)) in gg.iter().zip(&gc).enumerate() {
        assert_on_cuda(what, a);
        assert_eq!(a.dims(), b.dims(), "{what}: gradient {i} shape");
        let e = rel_err(&a.to_device(&Device::Cpu)?, b)?;
        assert!(
            e <= tol,
            "{what}: gradient {i} GPU vs CPU relative error {e}"
        );
    }
    Ok(())
}

#[test]
fn layer_norm_kernels_match_the_cpu_in_every_dtype_and_row_length() -> Result<()> {
    let Some(dev) = cuda() else { return Ok(()) };
    for d in ROW_LENGTHS {
        let x = (randn(&[3, 5, d], 40, 2.0)? + 0.5)?;
        let alpha = (randn(&[d], 41, 0.3)? + 1.0)?;
        let beta = randn(&[d], 42, 0.3)?;
        for tutorial in [true, false] {
            if tutorial && d == 1 {
                continue; // the unbiased std of one element is NaN on both devices
            }
            for (dt, tol) in DTYPES {
                let xs = x.to_dtype(dt)?;
                gpu_matches_cpu(
                    &format!("layer_norm d={d} tutorial={tutorial} {dt:?}"),
                    &dev,
                    |t| kernels::layer_norm(&t[0], &t[1], &t[2], 1e-6, tutorial, dt),
                    &[xs.clone(), alpha.clone(), beta.clone()],
                    tol,
                )?;
            }
        }
    }
    // f32 input into a half output (the autocast pattern) and a strided input.
    let x = randn(&[16, 3, 40], 43, 1.0)?.transpose(0, 2)?;
    let (a, b) = (randn(&[16], 44, 1.0)?, randn(&[16], 45, 1.0)?);
    gpu_matches_cpu(
        "layer_norm f32 -> f16, strided",
        &dev,
        |t| kernels::layer_norm(&t[0], &t[1], &t[2], 1e-5, false, DType::F16),
        &[x, a, b],
        4e-3,
    )
}

fn pad_mask(lens: &[usize], tk: usize) -> Result<Tensor> {
    let mut v = Vec::new();
    for &l in lens {
        for j in 0..tk {
            v.push(if j < l { 0f32 } else { crate::model::MASK_FILL });
        }
    }
    Tensor::from_vec(v, (lens.len(), 1, 1, tk), &Device::Cpu)
}

#[test]
fn masked_softmax_kernels_with_and_without_dropout_match_the_cpu() -> Result<()> {
    let Some(dev) = cuda() else { return Ok(()) };
    for d in ROW_LENGTHS {
        let scores = randn(&[2, 3, 4, d], 50, 3.0)?;
        // Batch 1 has a fully masked row set when d = 1 (length 0): uniform rows.
        let mask = pad_mask(&[d, d / 2], d)?;
        let drop = kernels::DropMask::new(77 + d as u64, scores.elem_count(), 0.2);
        for (dt, tol) in DTYPES {
            for m in [None, Some(&drop)] {
                let mc = mask.clone();
                gpu_matches_cpu(
                    &format!("masked_softmax d={d} {dt:?} dropout={}", m.is_some()),
                    &dev,
                    move |t| {
                        let mask = mc.to_device(t[0].device())?;
                        kernels::masked_softmax(&t[0], &mask, 0.125, dt, m)
                    },
                    &[scores.to_dtype(dt)?],
                    tol,
                )?;
            }
        }
    }
    // A causal (Tq, Tk) mask broadcast over batch and heads, f32 scores into f16 probabilities.
    let t = 37;
    let causal: Vec<f32> = (0..t * t)
        .map(|i| {
            if i % t <= i / t {
                0.0
            } else {
                crate::model::MASK_FILL
            }
        })
        .collect();
    let causal = Tensor::from_vec(causal, (t, t), &Device::Cpu)?;
    let scores = randn(&[2, 4, t, t], 51, 2.0)?;
    let drop = kernels::DropMask::new(5, scores.elem_count(), 0.1);
    gpu_matches_cpu(
        "masked_softmax causal f32 -> f16 with dropout",
        &dev,
        |x| {
            let mask = causal.to_device(x[0].device())?;
            kernels::masked_softmax(&x[0], &mask, 0.2, DType::F16, Some(&drop))
        },
        &[scores],
        4e-3,
    )
}

#[test]
fn cross_entropy_kernels_match_the_cpu_in_every_dtype() -> Result<()> {
    let Some(dev) = cuda() else { return Ok(()) };
    for v in [7usize, 1000, 4097] {
        let n = 19;
        let t: Vec<u32> = (0..n as u32)
            .map(|i| {
                if i % 4 == 3 {
                    PAD_ID
                } else {
                    (i * 7919 + 13) % v as u32
                }
            })
            .collect();
        let targets = Tensor::new(t.as_slice(), &Device::Cpu)?;
        for (dt, tol) in DTYPES {
            let logits = randn(&[n, v], 60, 3.0)?.to_dtype(dt)?;
            let tc = targets.clone();
            gpu_matches_cpu(
                &format!("cross_entropy_ls V={v} {dt:?}"),
                &dev,
                // scaled, as the loss scaler does: a non-unit upstream gradient on the device
                move |x| {
                    let t = tc.to_device(x[0].device())?;
                    kernels::cross_entropy_ls(&x[0], &t, PAD_ID, 0.1)? * 1024.0
                },
                &[logits],
                tol,
            )?;
        }
    }
    // All rows pad: loss 0 and a zero gradient on the device too.
    let logits = Var::from_tensor(&randn(&[4, 9], 61, 1.0)?.to_device(&dev)?)?;
    let t = Tensor::new(&[PAD_ID; 4], &dev)?;
    let loss = kernels::cross_entropy_ls(logits.as_tensor(), &t, PAD_ID, 0.1)?;
    assert_eq!(loss.to_scalar::<f32>()?, 0.0);
    let g = loss.backward()?;
    assert_eq!(max_abs(g.get(&logits).expect("grad"))?, 0.0);
    Ok(())
}

#[test]
fn epilogue_kernels_bias_relu_dropout_and_residual_match_the_cpu() -> Result<()> {
    let Some(dev) = cuda() else { return Ok(()) };
    for n in ROW_LENGTHS {
        let rows = 13;
        let drop = kernels::DropMask::new(90 + n as u64, rows * n, 0.3);
        for (dt, tol) in DTYPES {
            let y = randn(&[rows, n], 70, 1.0)?.to_dtype(dt)?;
            let b = randn(&[n], 71, 0.5)?.to_dtype(dt)?;
            // keep y + b away from ReLU's kink, where a rounding difference flips the slope
            let at_kink = y.broadcast_add(&b)?.to_dtype(DType::F32)?.abs()?.lt(1e-2)?;
            let y = (y.to_dtype(DType::F32)? + (at_kink.to_dtype(DType::F32)? * 0.25)?)?
                .to_dtype(dt)?;
            for relu in [false, true] {
                for m in [None, Some(&drop)] {
                    gpu_matches_cpu(
                        &format!("bias_act n={n} {dt:?} relu={relu} dropout={}", m.is_some()),
                        &dev,
                        |t| kernels::bias_act(&t[0], &t[1], relu, m, &[rows, 1, n]),
                        &[y.clone(), b.clone()],
                        tol,
                    )?;
                }
            }
            let x = randn(&[rows, n], 72, 1.0)?;
            let sub = randn(&[rows, n], 73, 1.0)?.to_dtype(dt)?;
            for m in [None, Some(&drop)] {
                gpu_matches_cpu(
                    &format!("residual_dropout n={n} {dt:?} dropout={}", m.is_some()),
                    &dev,
                    |t| kernels::residual_dropout(&t[0], &t[1], m),
                    &[x.clone(), sub.clone()],
                    tol,
                )?;
            }
            gpu_matches_cpu(
                &format!("dropout n={n} {dt:?}"),
                &dev,
                |t| kernels::dropout(&t[0], &drop),
                std::slice::from_ref(&sub),
                tol,
            )?;
        }
    }
    Ok(())
}

#[test]
fn dropout_masks_are_the_same_bits_on_the_gpu_and_the_cpu() -> Result<()> {
    let Some(dev) = cuda() else { return Ok(()) };
    let n = 300_001;
    let m = kernels::DropMask::new(0xDEAD_BEEF, n, 0.25);
    let ones = Tensor::ones(n, DType::F32, &dev)?;
    let y: Vec<f32> = kernels::dropout(&ones, &m)?.to_vec1()?;
    for (i, &v) in y.iter().enumerate() {
        assert_eq!(v, m.factor(i), "element {i}");
    }
    Ok(())
}

/// Parameter tensors of odd sizes, one larger than a block's chunk (65,536 elements).
const ADAM_SIZES: [usize; 6] = [1, 7, 1000, 4097, 65_537, 200_003];

/// Named parameters and their gradients.
type ParamsAndGrads = (Vec<(String, Var)>, Vec<Tensor>);

fn adam_setup(dev: &Device) -> Result<ParamsAndGrads> {
    let mut params = Vec::new();
    let mut grads = Vec::new();
    for (i, &n) in ADAM_SIZES.iter().enumerate() {
        let p = randn(&[n], 80 + i as u64, 1.0)?.to_device(dev)?;
        params.push((format!("p{i}"), Var::from_tensor(&p)?));
        grads.push(randn(&[n], 90 + i as u64, 300.0)?.to_device(dev)?);
    }
    Ok((params, grads))
}

fn snapshot(params: &[(String, Var)], opt: &crate::optim::Adam) -> Result<Vec<Tensor>> {
    let mut out: Vec<Tensor> = params
        .iter()
        .map(|(_, p)| p.as_tensor().to_device(&Device::Cpu))
        .collect::<Result<_>>()?;
    for (_, t) in opt.state_tensors() {
        out.push(t.to_device(&Device::Cpu)?);
    }
    Ok(out)
}

#[test]
fn multi_tensor_adam_matches_the_cpu_adam_and_skips_on_overflow() -> Result<()> {
    let Some(dev) = cuda() else { return Ok(()) };
    for decoupled in [false, true] {
        let cfg = crate::optim::AdamConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            decoupled,
        };
        let (pc, gc) = adam_setup(&Device::Cpu)?;
        let (pg, gg) = adam_setup(&dev)?;
        let mut cpu = crate::optim::Adam::new(pc.clone(), cfg.clone())?;
        let mut gpu = crate::optim::Adam::new(pg.clone(), cfg.clone())?;
        let loss_c = Tensor::new(2.5f32, &Device::Cpu)?;
        let loss_g = loss_c.to_device(&dev)?;
        let inv_scale = 1.0 / 1024.0;
        for (step, max_norm) in [(1, 0.0), (2, 1.0), (3, 1e9)] {
            // The CPU twin: the host path of the stepper.
            let ss = crate::optim::sum_squares(&gc)?;
            let norm = ss.sqrt() * inv_scale;
            let coef = crate::optim::clip_coef(norm, max_norm);
            cpu.step(&gc, 1e-3, inv_scale * coef)?;
            let o = gpu
                .fused_step(&gg, &loss_g, 1e-3, inv_scale, max_norm)?
                .expect("a CUDA device takes the fused step");
            assert!(!o.found_inf);
            assert_eq!(o.loss, 2.5);
            assert!(
                (o.sum_squares - ss).abs() <= 1e-9 * ss,
                "step {step}: sum of squares GPU {} vs CPU {ss}",
                o.sum_squares
            );
            assert_eq!(gpu.t, cpu.t, "step {step}");
            for (i, (a, b)) in snapshot(&pg, &gpu)?
                .iter()
                .zip(&snapshot(&pc, &cpu)?)
                .enumerate()
            {
                let e = max_abs_diff(a, b)?;
                assert!(
                    e <= 1e-6 * max_abs(b)?.max(1.0),
                    "step {step} (decoupled {decoupled}): tensor {i} GPU vs CPU max diff {e}"
                );
            }
        }
        // An inf in one gradient: found on the device, nothing changes, t does not advance.
        let before = snapshot(&pg, &gpu)?;
        let mut bad = gg.clone();
        let mut v = vec![0f32; ADAM_SIZES[4]];
        v[ADAM_SIZES[4] - 1] = f32::INFINITY;
        bad[4] = (&bad[4] + Tensor::from_vec(v, ADAM_SIZES[4], &dev)?)?;
        let t0 = gpu.t;
        let o = gpu
            .fused_step(&bad, &loss_g, 1e-3, inv_scale, 1.0)?
            .expect("fused");
        assert!(o.found_inf && !o.sum_squares.is_finite());
        assert_eq!(gpu.t, t0, "a skipped step does not count");
        for (i, (a, b)) in snapshot(&pg, &gpu)?.iter().zip(&before).enumerate() {
            assert_eq!(
                max_abs_diff(a, b)?,
                0.0,
                "tensor {i} changed on a skipped step"
            );
        }
        // A NaN loss with finite gradients: skipped too.
        let nan = Tensor::new(f32::NAN, &dev)?;
        let o = gpu
            .fused_step(&gg, &nan, 1e-3, inv_scale, 1.0)?
            .expect("fused");
        assert!(o.found_inf && o.loss.is_nan());
        assert_eq!(gpu.t, t0);
        // And the next clean step applies again (the device counter was reset).
        let o = gpu
            .fused_step(&gg, &loss_g, 1e-3, inv_scale, 1.0)?
            .expect("fused");
        assert!(!o.found_inf);
        assert_eq!(gpu.t, t0 + 1);
    }
    Ok(())
}

#[test]
fn the_gpu_step_skips_and_backs_off_on_an_injected_overflow_exactly_as_the_cpu() -> Result<()> {
    let Some(dev) = cuda() else { return Ok(()) };
    let cfg = cfg();
    let run = |d: &Device| -> Result<Vec<(bool, f64, u64)>> {
        let model = Transformer::new(&cfg, 5, d)?;
        let b = batch(d)?;
        let mut spec = TrainSpec::default();
        spec.train.precision = Precision::F16;
        spec.train.lr = 1e-3;
        spec.train.clip_grad_norm = 1.0;
        spec.model.dropout = 0.0;
        spec.amp.init_scale = 1024.0; // no natural f16 overflow: only the injected ones
        spec.amp.test_inject_inf = Some(crate::config::InjectInf {
            tensor: model.params[3].0.clone(),
            from_step: 2,
            count: 2,
        });
        let mut st = Stepper::new(&spec, &model).map_err(candle_core::Error::wrap)?;
        let mut out = Vec::new();
        for step in 1..=5 {
            let o = st
                .step(&model, &b, step)
                .map_err(candle_core::Error::wrap)?;
            out.push((o.skipped, o.scale_used, st.opt.t));
        }
        Ok(out)
    };
    let cpu = run(&Device::Cpu)?;
    let gpu = run(&dev)?;
    assert_eq!(
        cpu.iter().map(|o| o.0).collect::<Vec<_>>(),
        vec![false, true, true, false, false],
        "the CPU run skips the injected steps: {cpu:?}"
    );
    assert_eq!(gpu, cpu, "(skipped, scale used, optimizer steps) per step");
    Ok(())
}

/// Losses of `steps` trainer steps on the same batch from the same initial weights.
fn step_losses(dev: &Device, p: Precision, steps: u64) -> Result<Vec<f64>> {
    let model = Transformer::new(&cfg(), 21, dev)?;
    let b = batch(dev)?;
    let mut spec = TrainSpec::default();
    spec.train.precision = p;
    spec.train.lr = 1e-3;
    spec.train.clip_grad_norm = 1.0;
    spec.model.dropout = 0.0;
    let mut st = Stepper::new(&spec, &model).map_err(candle_core::Error::wrap)?;
    (1..=steps)
        .map(|step| {
            st.step(&model, &b, step)
                .map(|o| o.loss)
                .map_err(candle_core::Error::wrap)
        })
        .collect()
}

#[test]
fn the_fused_device_step_trains_like_the_reference_ops_on_the_gpu() -> Result<()> {
    let Some(dev) = cuda() else { return Ok(()) };
    let fused = step_losses(&dev, Precision::Fp32, 4)?;
    let reference = ops::with_reference_ops(|| step_losses(&dev, Precision::Fp32, 4))?;
    for (i, (a, b)) in fused.iter().zip(&reference).enumerate() {
        assert!(
            (a - b).abs() <= 1e-3 * b.abs(),
            "step {}: fused {a} vs reference ops {b} ({fused:?} vs {reference:?})",
            i + 1
        );
    }
    assert!(fused[3] < fused[0], "the loss falls: {fused:?}");
    Ok(())
}

#[test]
fn training_device_settings_turn_event_tracking_off_and_steps_still_train() -> Result<()> {
    let Some(dev) = cuda() else { return Ok(()) };
    let msg = kernels::cuda::device::tune_for_training(&dev)?.expect("a CUDA device");
    let Device::Cuda(c) = &dev else {
        unreachable!("cuda() opens a CUDA device")
    };
    assert!(!c.is_event_tracking(), "{msg}");
    // Every tensor of these steps is created after the switch.
    let losses = step_losses(&dev, Precision::F16, 4)?;
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    assert!(losses[3] < losses[0], "the loss falls: {losses:?}");
    Ok(())
}

#[test]
fn multi_tensor_adam_reads_f16_and_bf16_gradients_as_they_are() -> Result<()> {
    let Some(dev) = cuda() else { return Ok(()) };
    let cfg = crate::optim::AdamConfig {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        decoupled: true,
    };
    let (pc, gc) = adam_setup(&Device::Cpu)?;
    let (pg, _) = adam_setup(&dev)?;
    // Mixed gradient dtypes, as the working copies give them (scaled, in f16/bf16).
    let dts = [DType::F16, DType::BF16, DType::F32];
    let gc: Vec<Tensor> = gc
        .iter()
        .enumerate()
        .map(|(i, g)| g.to_dtype(dts[i % 3]))
        .collect::<Result<_>>()?;
    let gg: Vec<Tensor> = gc
        .iter()
        .map(|g| g.to_device(&dev))
        .collect::<Result<_>>()?;
    let mut cpu = crate::optim::Adam::new(pc.clone(), cfg.clone())?;
    let mut gpu = crate::optim::Adam::new(pg.clone(), cfg)?;
    let inv_scale = 1.0 / 256.0;
    let ss = crate::optim::sum_squares(&gc)?;
    cpu.step(&gc, 1e-3, inv_scale)?;
    let loss = Tensor::new(1.0f32, &dev)?;
    let o = gpu
        .fused_step(&gg, &loss, 1e-3, inv_scale, 0.0)?
        .expect("fused");
    assert!(
        (o.sum_squares - ss).abs() <= 1e-9 * ss,
        "{} vs {ss}",
        o.sum_squares
    );
    for (i, (a, b)) in snapshot(&pg, &gpu)?
        .iter()
        .zip(&snapshot(&pc, &cpu)?)
        .enumerate()
    {
        let e = max_abs_diff(a, b)?;
        assert!(e <= 1e-6 * max_abs(b)?.max(1.0), "tensor {i}: max diff {e}");
    }
    Ok(())
}
