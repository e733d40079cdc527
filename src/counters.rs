//! What a training step asks of its device, counted where our code asks it: kernel launches
//! (`device_ops`), bytes copied from the host to the device (`h2d_bytes`) and reads that make
//! the host wait for the device (`host_syncs`).
//!
//! The counters are per thread (a training step runs on one thread; parallel tests do not mix)
//! and are bumped at the call sites that launch: every fused kernel's forward and backward (in
//! `kernels::fused`'s adapter and the kernels' backward passes), the optimizer and scaler, the
//! uploads of a batch or a mask, the scalar reads. `ampserve bench train` reads them around one
//! step (`measure`) and prints them per step; docs/counting.md says what each call site counts
//! and how the CPU run of a step relates to its CUDA run.

use candle_core::{backprop::GradStore, Result, Tensor};
use serde::Serialize;
use std::cell::Cell;

/// Launches, uploaded bytes and host syncs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub device_ops: u64,
    pub h2d_bytes: u64,
    pub host_syncs: u64,
}

impl Counts {
    /// What was counted between `earlier` and `self`.
    pub fn since(&self, earlier: &Counts) -> Counts {
        Counts {
            device_ops: self.device_ops - earlier.device_ops,
            h2d_bytes: self.h2d_bytes - earlier.h2d_bytes,
            host_syncs: self.host_syncs - earlier.host_syncs,
        }
    }
}

thread_local! {
    static COUNTS: Cell<Counts> = const {
        Cell::new(Counts { device_ops: 0, h2d_bytes: 0, host_syncs: 0 })
    };
}

fn bump(f: impl FnOnce(&mut Counts)) {
    COUNTS.with(|c| {
        let mut v = c.get();
        f(&mut v);
        c.set(v);
    });
}

/// `n` kernel launches (a cuBLAS call counts 1; on the CPU, one fused op or one candle op).
pub fn device_ops(n: u64) {
    bump(|c| c.device_ops += n);
}

/// `n` bytes copied from host memory to the device (on the CPU: host data a tensor was made
/// from, which a GPU run would upload).
pub fn h2d_bytes(n: u64) {
    bump(|c| c.h2d_bytes += n);
}

/// One read that waits for the device (a scalar or a vector copied back to the host).
pub fn host_sync() {
    bump(|c| c.host_syncs += 1);
}

/// This thread's totals so far.
pub fn snapshot() -> Counts {
    COUNTS.with(|c| c.get())
}

/// Runs `f` and returns what it counted on this thread.
pub fn measure<T>(f: impl FnOnce() -> T) -> (T, Counts) {
    let before = snapshot();
    let out = f();
    (out, snapshot().since(&before))
}

/// `t` in `dtype`, counting the cast launch when there is one (inside backward passes, where the
/// result is not a graph node).
pub fn cast(t: &Tensor, dtype: candle_core::DType) -> Result<Tensor> {
    if t.dtype() == dtype {
        return Ok(t.clone());
    }
    device_ops(1);
    t.to_dtype(dtype)
}

/// What candle 0.11 launches for a graph node that one of its built-in ops makes (read off its
/// CPU and CUDA backends and `backprop.rs`): `fwd` launches to make it, `bwd` launches of its own
/// gradient computation, and `edges` gradients it hands back to its inputs. candle adds each
/// handed-back gradient into the input's gradient (one `add` launch per edge) after zero-filling
/// that gradient the first time the input receives one (one launch per receiving tensor, counted
/// from the graph in [`backward`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeCost {
    pub fwd: u64,
    pub bwd: u64,
    pub edges: u64,
}

impl NodeCost {
    /// `reshape` of a contiguous tensor, `transpose`, `t()`, `narrow`: a view; its gradient is a
    /// view of the incoming one.
    pub const VIEW: NodeCost = NodeCost {
        fwd: 0,
        bwd: 0,
        edges: 1,
    };
    /// `contiguous()` of a strided tensor, `reshape` of a strided one: one copy; the gradient
    /// passes through.
    pub const COPY: NodeCost = NodeCost {
        fwd: 1,
        bwd: 0,
        edges: 1,
    };
    /// `to_dtype`: one cast each way.
    pub const CAST: NodeCost = NodeCost {
        fwd: 1,
        bwd: 1,
        edges: 1,
    };
    /// `x * c` / `affine`: one launch each way.
    pub const AFFINE: NodeCost = NodeCost {
        fwd: 1,
        bwd: 1,
        edges: 1,
    };
    /// `relu`: one launch; backward `ge` against a zero tensor, a cast and a `mul`.
    pub const RELU: NodeCost = NodeCost {
        fwd: 1,
        bwd: 4,
        edges: 1,
    };
    /// `matmul` through candle (f32/f16 operands): one GEMM; backward one GEMM per operand.
    /// `index_select` of rows: a gather; its backward is an `index_add` (a copy of the
    /// input's gradient and the scatter) straight into the input's gradient, no separate add.
    pub const GATHER: NodeCost = NodeCost {
        fwd: 1,
        bwd: 2,
        edges: 0,
    };
    pub const MATMUL: NodeCost = NodeCost {
        fwd: 1,
        bwd: 2,
        edges: 2,
    };
    /// `broadcast_as` of a tracked tensor: a view; backward sums the gradient over the
    /// broadcast dims.
    pub const BROADCAST: NodeCost = NodeCost {
        fwd: 0,
        bwd: 1,
        edges: 1,
    };
}

/// The graph accounting of one step, kept per thread between the forward pass and [`backward`].
#[derive(Clone, Copy, Debug, Default)]
struct Graph {
    /// Built-in nodes declared with [`candle_node`] and fused nodes declared with [`fused_node`].
    candle_nodes: u64,
    fused_nodes: u64,
    /// Their pending backward work: own launches and edges of the built-in nodes, edges of the
    /// fused ones (their own backward launches are counted when they run).
    bwd: u64,
    edges: u64,
}

thread_local! {
    static GRAPH: Cell<Graph> = const {
        Cell::new(Graph { candle_nodes: 0, fused_nodes: 0, bwd: 0, edges: 0 })
    };
}

fn graph(f: impl FnOnce(&mut Graph)) {
    GRAPH.with(|g| {
        let mut v = g.get();
        f(&mut v);
        g.set(v);
    });
}

/// Records `t`, just made from `from` by a candle op our code called: nothing when the op
/// returned its input (`to_dtype` to the same dtype, `contiguous` of a contiguous tensor), else
/// its forward launches, and when `t` is a graph node (it tracks a gradient) its backward cost
/// for [`backward`]. Untracked results (inference, masks) count their forward launches only.
pub fn candle_node(from: &Tensor, t: &Tensor, cost: NodeCost) {
    if t.id() == from.id() {
        return;
    }
    device_ops(cost.fwd);
    if t.track_op() && !t.is_variable() {
        graph(|g| {
            g.candle_nodes += 1;
            g.bwd += cost.bwd;
            g.edges += cost.edges;
        });
    }
}

/// Records `t`, just made by one of our fused ops (which counted its own launch), when it is a
/// graph node: `edges` is how many of its inputs its backward hands gradients to.
pub fn fused_node(t: &Tensor, edges: u64) {
    if t.track_op() && !t.is_variable() {
        graph(|g| {
            g.fused_nodes += 1;
            g.edges += edges;
        });
    }
}

/// What [`backward`] found in the graph of the loss it was given.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GraphCounts {
    /// Nodes of the graph (not counting the parameters), as candle walks it.
    pub nodes: u64,
    /// Of those, declared by our code: built-in candle ops, and fused ops.
    pub candle_nodes: u64,
    pub fused_nodes: u64,
    /// Launches candle's backward made around the nodes' own gradient ops: the seed gradient,
    /// one zero-fill per tensor that received a gradient, one add per edge.
    pub accumulate_ops: u64,
}

impl GraphCounts {
    /// Whether every node of the graph was declared (so the launch count covers the whole step).
    pub fn complete(&self) -> bool {
        self.nodes == self.candle_nodes + self.fused_nodes
    }
}

/// `loss.backward()`, counting candle's launches: the declared nodes' own backward work and
/// edges, one zero-fill per tensor that received a gradient and the seed gradient (`ones_like`
/// and a copy). The fused ops' backward kernels count themselves as they run. Resets the graph
/// accounting for the next step.
pub fn backward(loss: &Tensor) -> Result<(GradStore, GraphCounts)> {
    let g = GRAPH.with(|g| g.replace(Graph::default()));
    let sorted = loss.sorted_nodes();
    let nodes = sorted.iter().filter(|t| !t.is_variable()).count() as u64;
    drop(sorted);
    let grads = loss.backward()?;
    // every processed node but the seed got its gradient through a zero-fill, and so did every
    // tensor left in the store (the parameters, and untracked inputs candle hands gradients to)
    let filled = nodes.saturating_sub(1) + grads.get_ids().count() as u64;
    let accumulate_ops = 2 + filled + g.edges;
    device_ops(g.bwd + accumulate_ops);
    Ok((
        grads,
        GraphCounts {
            nodes,
            candle_nodes: g.candle_nodes,
            fused_nodes: g.fused_nodes,
            accumulate_ops,
        },
    ))
}

/// Forgets the graph accounting of a forward pass that will not be backpropagated (evaluation).
pub fn discard_graph() {
    GRAPH.with(|g| g.set(Graph::default()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measure_returns_only_what_its_closure_counted_on_this_thread() {
        device_ops(5);
        let ((), c) = measure(|| {
            device_ops(2);
            h2d_bytes(100);
            host_sync();
            // another thread's counts are its own
            std::thread::spawn(|| device_ops(1000)).join().unwrap();
        });
        assert_eq!(
            c,
            Counts {
                device_ops: 2,
                h2d_bytes: 100,
                host_syncs: 1
            }
        );
    }
}
