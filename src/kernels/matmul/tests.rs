//! The packed bf16 GEMM against the f32 matmul of the same values, every micro-kernel this CPU
//! runs, forward and backward.

use super::*;
use crate::kernels::test_util::{max_abs, max_abs_diff, randn};
use candle_core::Var;

fn kernels() -> Vec<Kernel> {
    let mut k = vec![Kernel::Portable];
    if avx2_fma_available() {
        k.push(Kernel::Avx2Fma);
    }
    if bf16_dot_available() {
        k.push(Kernel::Avx512Bf16);
    }
    k
}

/// bf16 result vs the f32 matmul of the same bf16 values: only accumulation order and the
/// final bf16 rounding differ.
fn assert_close(got: &Tensor, want_f32: &Tensor, k: usize, what: &str) -> Result<()> {
    assert_eq!(got.dtype(), DType::BF16, "{what}");
    assert_eq!(got.dims(), want_f32.dims(), "{what}");
    let diff = max_abs_diff(got, want_f32)?;
    let scale = max_abs(want_f32)?.max(1e-3);
    // bf16 rounding is 2^-9 relative; allow accumulation differences on top.
    let tol = scale * 2f32.powi(-8) + 1e-4 * (k as f32).sqrt();
    assert!(
        diff <= tol,
        "{what}: diff {diff} > tol {tol} (scale {scale})"
    );
    Ok(())
}

fn bf(shape: &[usize], seed: u64) -> Result<Tensor> {
    randn(shape, seed, 1.0)?.to_dtype(DType::BF16)
}

fn f32_ref(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
    if a.rank() == b.rank() {
        a.matmul(&b)
    } else {
        a.broadcast_matmul(&b)
    }
}

#[test]
fn forward_many_shapes_odd_sizes_batched_and_transposed() -> Result<()> {
    for kernel in kernels() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 5, 7),
            (8, 32, 32),
            (9, 33, 31),
            (17, 2, 65),
            (64, 128, 96),
            (130, 257, 40),
        ] {
            let a = bf(&[m, k], (m * 31 + k) as u64)?;
            let b = bf(&[k, n], (k * 17 + n) as u64)?;
            let w = bf(&[n, k], (n * 7 + k) as u64)?; // Linear weight; rhs = w.t()
            let what = format!("{kernel:?} {m}x{k}x{n}");
            assert_close(&matmul_with(&a, &b, kernel)?, &f32_ref(&a, &b)?, k, &what)?;
            assert_close(
                &matmul_with(&a, &w.t()?, kernel)?,
                &f32_ref(&a, &w.t()?)?,
                k,
                &format!("{what} rhs=w.t()"),
            )?;
            // Transposed lhs view too.
            let at = bf(&[k, m], 5)?.t()?;
            assert_close(
                &matmul_with(&at, &b, kernel)?,
                &f32_ref(&at, &b)?,
                k,
                &format!("{what} lhs=t"),
            )?;
        }
        // Batched (attention-like) with a transposed rhs per batch: (B,H,T,dk) x (B,H,dk,T).
        let q = bf(&[2, 3, 13, 8], 1)?;
        let kk = bf(&[2, 3, 13, 8], 2)?;
        let kt = kk.transpose(2, 3)?;
        assert_close(
            &matmul_with(&q, &kt, kernel)?,
            &f32_ref(&q, &kt)?,
            8,
            "batched qk",
        )?;
        // Rank-3 lhs with a shared rank-2 rhs (the Linear case), contiguous and not.
        let x = bf(&[4, 11, 24], 3)?;
        let w = bf(&[40, 24], 4)?;
        assert_close(
            &matmul_with(&x, &w.t()?, kernel)?,
            &f32_ref(&x, &w.t()?)?,
            24,
            "linear",
        )?;
        let xt = bf(&[11, 4, 24], 5)?.transpose(0, 1)?;
        assert_close(
            &matmul_with(&xt, &w.t()?, kernel)?,
            &f32_ref(&xt, &w.t()?)?,
            24,
            "linear nc",
        )?;
    }
    Ok(())
}

fn check_grads(a: &Tensor, b: &Tensor, kernel: Kernel, what: &str) -> Result<()> {
    // The weight is a Var stored (n, k) and used as w.t() when `b` is transposed.
    let av = Var::from_tensor(a)?;
    let bv = Var::from_tensor(b)?;
    let (av2, bv2) = (
        Var::from_tensor(&a.to_dtype(DType::F32)?)?,
        Var::from_tensor(&b.to_dtype(DType::F32)?)?,
    );
    let out_shape = f32_ref(a, b)?.dims().to_vec();
    let w = randn(&out_shape, 77, 1.0)?.to_dtype(DType::BF16)?;
    let y = matmul_with(&av, &bv, kernel)?;
    let ga = y.mul(&w)?.sum_all()?.backward()?;
    let y2 = f32_ref(&av2, &bv2)?;
    let gb = y2.mul(&w.to_dtype(DType::F32)?)?.sum_all()?.backward()?;
    let k_a = out_shape[out_shape.len() - 1];
    let k_b: usize = out_shape[..out_shape.len() - 1].iter().product();
    assert_close(
        ga.get(&av).unwrap(),
        gb.get(&av2).unwrap(),
        k_a,
        &format!("{what} dA"),
    )?;
    assert_close(
        ga.get(&bv).unwrap(),
        gb.get(&bv2).unwrap(),
        k_b,
        &format!("{what} dB"),
    )?;
    Ok(())
}

#[test]
fn backward_matches_f32_for_linear_and_batched_layouts() -> Result<()> {
    for kernel in kernels() {
        // Plain 2-D.
        check_grads(&bf(&[19, 33], 1)?, &bf(&[33, 21], 2)?, kernel, "2d")?;
        // Linear: rank-3 input times a shared (k, n) weight, as a row-major (k, n) Var.
        check_grads(
            &bf(&[3, 7, 16], 3)?,
            &bf(&[16, 35], 4)?,
            kernel,
            "linear kn",
        )?;
        // Batched attention-style matmuls.
        check_grads(
            &bf(&[2, 2, 9, 8], 5)?,
            &bf(&[2, 2, 8, 9], 6)?,
            kernel,
            "batched",
        )?;
    }
    Ok(())
}

#[test]
fn backward_through_transposed_weight() -> Result<()> {
    for kernel in kernels() {
        let x = Var::from_tensor(&bf(&[2, 10, 24], 8)?)?;
        let w = Var::from_tensor(&bf(&[40, 24], 9)?)?; // (out, in)
        let y = matmul_with(&x, &w.t()?, kernel)?;
        let g = y.to_dtype(DType::F32)?.sqr()?.sum_all()?.backward()?;
        let gw = g.get(&w).unwrap();
        assert_eq!(gw.dims(), &[40, 24]);
        assert_eq!(gw.dtype(), DType::BF16);
        // Oracle in f32.
        let (x2, w2) = (
            Var::from_tensor(&x.to_dtype(DType::F32)?)?,
            Var::from_tensor(&w.to_dtype(DType::F32)?)?,
        );
        // d/dy sum(y²) = 2y with y rounded to bf16 as in the bf16 graph.
        let y2 = x2.broadcast_matmul(&w2.t()?)?;
        let yb = y.to_dtype(DType::F32)?;
        let g2 = y2.mul(&(yb * 2.0)?)?.sum_all()?.backward()?;
        assert_close(gw, g2.get(&w2).unwrap(), 20, "dW")?;
        assert_close(g.get(&x).unwrap(), g2.get(&x2).unwrap(), 40, "dX")?;
    }
    Ok(())
}

#[test]
fn public_matmul_falls_back_for_f32_and_rejects_bad_shapes() -> Result<()> {
    let a = randn(&[3, 4], 1, 1.0)?;
    let b = randn(&[4, 5], 2, 1.0)?;
    let y = matmul(&a, &b)?;
    assert_eq!(y.dtype(), DType::F32);
    // bf16 goes through the packed GEMM wherever a micro-kernel exists, and agrees with f32.
    let (ab, bb) = (bf(&[5, 40], 3)?, bf(&[40, 7], 4)?);
    assert_close(&matmul(&ab, &bb)?, &f32_ref(&ab, &bb)?, 40, "public bf16")?;
    assert!(max_abs_diff(&y, &a.matmul(&b)?)? == 0.0);
    let err = matmul_with(&bf(&[3, 4], 1)?, &bf(&[5, 6], 2)?, Kernel::Portable).unwrap_err();
    assert!(err.to_string().contains("cannot multiply"), "{err}");
    Ok(())
}
