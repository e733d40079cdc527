//! candle's `CustomOp1/2/3` written once for the fused kernels. An op implements [`Fused1`],
//! [`Fused2`] or [`Fused3`]: its name, its CPU forward over `(storage, layout)` operands and (if
//! it has one) its backward over the argument tensors; the adapter [`Op`] makes it a candle
//! custom op. Each op file then states only what differs. Every CPU forward (also the ones a
//! backward pass runs through `apply_op*_no_bwd`) counts as one launch (`crate::counters`); with
//! the `cuda` feature an op may also have a CUDA forward (`cuda_fwd`, the launchers in
//! `kernels::cuda`, which count each kernel they launch).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// One operand of a CPU forward pass: its storage and its layout.
pub(crate) type Arg<'a> = (&'a CpuStorage, &'a Layout);
/// What a CPU forward pass returns: the output storage and its shape.
pub(crate) type Out = Result<(CpuStorage, Shape)>;
/// The gradients of a backward pass, one per argument (`None`: no gradient to that argument).
pub(crate) type Grads<const N: usize> = Result<[Option<Tensor>; N]>;

/// One operand of a CUDA forward pass.
#[cfg(feature = "cuda")]
pub(crate) type CudaArg<'a> = (&'a candle_core::CudaStorage, &'a Layout);
/// What a CUDA forward pass returns.
#[cfg(feature = "cuda")]
pub(crate) type CudaOut = Result<(candle_core::CudaStorage, Shape)>;

fn no_backward<const N: usize>(op: &'static str) -> Grads<N> {
    Err(candle_core::Error::BackwardNotSupported { op })
}

#[cfg(feature = "cuda")]
fn no_cuda(op: &'static str) -> CudaOut {
    Err(candle_core::Error::Msg(format!(
        "{op}: no CUDA kernel (the caller should have used the reference composition)"
    )))
}

/// A fused op of one tensor.
pub(crate) trait Fused1: Send + Sync {
    const NAME: &'static str;
    fn fwd(&self, x: Arg) -> Out;
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _x: CudaArg) -> CudaOut {
        no_cuda(Self::NAME)
    }
    fn bwd(&self, _args: [&Tensor; 1], _res: &Tensor, _grad: &Tensor) -> Grads<1> {
        no_backward(Self::NAME)
    }
}

/// A fused op of two tensors.
pub(crate) trait Fused2: Send + Sync {
    const NAME: &'static str;
    fn fwd(&self, a: Arg, b: Arg) -> Out;
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _a: CudaArg, _b: CudaArg) -> CudaOut {
        no_cuda(Self::NAME)
    }
    fn bwd(&self, _args: [&Tensor; 2], _res: &Tensor, _grad: &Tensor) -> Grads<2> {
        no_backward(Self::NAME)
    }
}

/// A fused op of three tensors.
pub(crate) trait Fused3: Send + Sync {
    const NAME: &'static str;
    fn fwd(&self, a: Arg, b: Arg, c: Arg) -> Out;
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _a: CudaArg, _b: CudaArg, _c: CudaArg) -> CudaOut {
        no_cuda(Self::NAME)
    }
    fn bwd(&self, _args: [&Tensor; 3], _res: &Tensor, _grad: &Tensor) -> Grads<3> {
        no_backward(Self::NAME)
    }
}

/// The adapter from a fused op to candle's custom-op traits (`x.apply_op2(y, Op(MyOp { .. }))`).
pub(crate) struct Op<T>(pub T);

impl<T: Fused1> CustomOp1 for Op<T> {
    fn name(&self) -> &'static str {
        T::NAME
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Out {
        crate::counters::device_ops(1);
        self.0.fwd((s, l))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> CudaOut {
        self.0.cuda_fwd((s, l))
    }
    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let [dx] = self.0.bwd([x], res, grad)?;
        Ok(dx)
    }
}

impl<T: Fused2> CustomOp2 for Op<T> {
    fn name(&self) -> &'static str {
        T::NAME
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Out {
        crate::counters::device_ops(1);
        self.0.fwd((s1, l1), (s2, l2))
    }
    #[cfg(feature = "cuda")]
    #[rustfmt::skip]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> CudaOut {
        self.0.cuda_fwd((s1, l1), (s2, l2))
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [da, db] = self.0.bwd([a, b], res, grad)?;
        Ok((da, db))
    }
}

impl<T: Fused3> CustomOp3 for Op<T> {
    fn name(&self) -> &'static str {
        T::NAME
    }
    #[rustfmt::skip]
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Out {
        crate::counters::device_ops(1);
        self.0.fwd((s1, l1), (s2, l2), (s3, l3))
    }
    #[cfg(feature = "cuda")]
    #[rustfmt::skip]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout, s3: &candle_core::CudaStorage, l3: &Layout) -> CudaOut {
        self.0.cuda_fwd((s1, l1), (s2, l2), (s3, l3))
    }
    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [da, db, dc] = self.0.bwd([a, b, c], res, grad)?;
        Ok((da, db, dc))
    }
}
