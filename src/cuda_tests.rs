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
    let pc = ops::masked_softmax(&scores, &mask, 0.25, DType::F16)?;
    let pg = ops::masked_softmax(&g(&scores)?, &g(&mask)?, 0.25, DType::F16)?;
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
            let loss = m.loss(&ctx, &b.src, &b.tgt_in, &b.tgt_out, 0.1)?;
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
            &logits.reshape(((), v))?,
            &b.tgt_out.flatten_all()?,
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
