//! wgnorm ops as burn autodiff ops: the forward runs wgnorm's kernel on burn's buffers,
//! and a custom backward (burn-autodiff's `Backward`) runs wgnorm's backward kernel on
//! them when burn computes gradients.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, NodeGuard, Ops, OpsKind};
use burn::backend::wgpu::{CubeTensor, WgpuDevice};
use burn::backend::{Autodiff, Wgpu};
use burn::tensor::Tensor;
use wgnorm::{
    BatchNorm, BatchNormForward, BatchNormMode, BatchNormState, Recording, SpectralNorm,
    SpectralNormOutput, SpectralNormState, WeightNorm, WeightStandardization,
};

use crate::{Error, Result, Shared};

type Ad = Autodiff<Wgpu>;

/// A new burn tensor of `dims` on `shared`'s device, as a backend primitive.
fn empty<const D: usize>(shared: &Shared, dims: [usize; D]) -> Result<CubeTensor> {
    Tensor::<D>::empty(dims, &shared.burn_device())
        .try_into_primitive::<Wgpu>()
        .map_err(|e| Error::Burn(format!("{e:?}")))
}

/// Runs `record` (which records one op whose next output is the returned tensor) on
/// burn's buffers: a new burn tensor of `dims` receives the output.
fn run<const D: usize>(
    shared: &Shared,
    dims: [usize; D],
    record: impl FnOnce(&mut Recording<'_>) -> Result<()>,
) -> Result<CubeTensor> {
    let out = empty(shared, dims)?;
    let view = shared.view_primitive(&out, &dims)?;
    let mut rec = Recording::new(&shared.ctx);
    rec.write_next_output_to(&view)?;
    record(&mut rec)?;
    rec.submit()?;
    Ok(out)
}

/// A burn float tensor's backend primitive, and its autodiff node when it lives on an
/// autodiff device.
pub(crate) fn primitive<const D: usize>(t: Tensor<D>) -> Result<(CubeTensor, Option<NodeGuard>)> {
    if let Ok(ad) = t.clone().try_into_primitive::<Ad>() {
        return Ok((ad.primitive().clone(), Some(ad.node())));
    }
    let prim = t
        .try_into_primitive::<Wgpu>()
        .map_err(|e| Error::Burn(format!("not a tensor of a wgpu device: {e:?}")))?;
    Ok((prim, None))
}

/// `prim` with its elements in row-major order: itself when they are (no copy), else
/// a contiguous copy by burn's kernel (a transposed or sliced weight, a gradient burn
/// made strided).
pub(crate) fn contiguous(prim: CubeTensor) -> CubeTensor {
    burn_cubecl::kernel::into_contiguous(prim)
}

/// Where a data-shaped tensor of rank `D` keeps its feature axis 1 in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Memory {
    /// Row-major (NCHW).
    RowMajor,
    /// Axis 1 innermost, the others in order (NHWC): what burn's convolutions give.
    ChannelsLast,
}

/// Axis `i` of the physical (channels-last) order is logical axis `physical(d)[i]`.
fn channels_last_order(d: usize) -> Vec<usize> {
    let mut order = vec![0];
    order.extend(2..d);
    order.push(1);
    order
}

/// The memory order of `prim` (rank >= 3), or `None` for any other strides.
fn memory_of(prim: &CubeTensor) -> Option<Memory> {
    if prim.is_contiguous() {
        return Some(Memory::RowMajor);
    }
    let (shape, strides) = (prim.meta.shape(), prim.meta.strides());
    let d = shape.num_dims();
    if d < 3 {
        return None;
    }
    let mut expected = 1;
    for &axis in channels_last_order(d).iter().rev() {
        if shape[axis] != 1 && strides[axis] != expected {
            return None;
        }
        expected *= shape[axis];
    }
    Some(Memory::ChannelsLast)
}

/// A burn tensor primitive permuted (a view, no copy).
fn permuted<const D: usize>(prim: CubeTensor, axes: &[usize]) -> Result<CubeTensor> {
    let axes: [usize; D] = axes.try_into().expect("one axis per dimension");
    Tensor::<D>::from_primitive::<Wgpu>(prim)
        .permute(axes.map(|a| a as isize))
        .try_into_primitive::<Wgpu>()
        .map_err(|e| Error::Burn(format!("{e:?}")))
}

/// Inputs all on an autodiff device or none: checked before anything runs, so a refused
/// call leaves the state as it was.
fn all_or_none(op: &str, nodes: &[&Option<NodeGuard>]) -> Result<()> {
    let tracked = nodes.iter().filter(|n| n.is_some()).count();
    if tracked != 0 && tracked != nodes.len() {
        return Err(Error::Burn(format!(
            "{op}: {tracked} of {} inputs are on an autodiff device: all or none must be",
            nodes.len()
        )));
    }
    Ok(())
}

/// The op's output as a burn tensor: on an autodiff device (every input has a node)
/// with `back` as its backward, given `state`; plain when no input has one. Inputs of
/// both kinds are an error (their gradients would be lost without a word).
fn finish<BO, const N: usize, const D: usize>(
    op: &str,
    back: BO,
    nodes: [Option<NodeGuard>; N],
    state: BO::State,
    out: CubeTensor,
) -> Result<Tensor<D>>
where
    BO: Backward<Wgpu, N>,
{
    let tracked = nodes.iter().filter(|n| n.is_some()).count();
    if tracked == 0 {
        return Ok(Tensor::from_primitive::<Wgpu>(out));
    }
    let nodes: Option<Vec<NodeGuard>> = nodes.into_iter().collect();
    let Some(nodes) = nodes.and_then(|n| <[NodeGuard; N]>::try_from(n).ok()) else {
        return Err(Error::Burn(format!(
            "{op}: {tracked} of {N} inputs are on an autodiff device: all or none must be"
        )));
    };
    let result = match back
        .prepare::<NoCheckpointing>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(state, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Ok(Tensor::from_primitive::<Ad>(result))
}

/// A weight's gradient in a backward pass: `record` records wgnorm's backward of the
/// weight and the incoming gradient (views of burn's buffers), its output a new burn
/// tensor. burn's backward has no error path: a failure here is a bug or a lost
/// device, and the panic says which op.
fn weight_grad<const D: usize>(
    op: &str,
    device: &WgpuDevice,
    dims: [usize; D],
    weight: &CubeTensor,
    grad: &CubeTensor,
    record: impl FnOnce(&mut Recording<'_>, &wgnorm::Tensor, &wgnorm::Tensor) -> wgnorm::Result<()>,
) -> CubeTensor {
    let result = (|| {
        let shared = Shared::of(device)?;
        let grad = contiguous(grad.clone());
        let (w, g) = (
            shared.view_primitive(weight, &dims)?,
            shared.view_primitive(&grad, &dims)?,
        );
        run(&shared, dims, |rec| Ok(record(rec, &w, &g)?))
    })();
    result.unwrap_or_else(|e| panic!("{op} backward: {e}"))
}

#[derive(Debug)]
struct WsBackward<const D: usize> {
    ws: WeightStandardization,
    device: WgpuDevice,
    dims: [usize; D],
}

impl<const D: usize> Backward<Wgpu, 1> for WsBackward<D> {
    /// The weight.
    type State = CubeTensor;

    fn backward(self, ops: Ops<CubeTensor, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let weight = ops.state;
        unary::<Wgpu, _>(ops.parents, ops.node, grads, |grad| {
            let ws = self.ws;
            weight_grad(
                "weight_standardization",
                &self.device,
                self.dims,
                &weight,
                &grad,
                |rec, w, g| ws.record_backward(rec, w, g).map(drop),
            )
        });
    }
}

/// Weight Standardization of a burn weight, `ws`'s flavour (Chainer's by default), on
/// wgnorm's kernels: forward now, and on burn's autodiff devices a gradient through
/// wgnorm's backward kernel. `weight` lives on a wgpu device (autodiff or not) that
/// [`Shared::of`] can reach.
pub fn weight_standardization<const D: usize>(
    ws: &WeightStandardization,
    weight: Tensor<D>,
) -> Result<Tensor<D>> {
    let w = weight_input(weight)?;
    let out = run(&w.shared, w.dims, |rec| {
        ws.record_forward(rec, &w.view).map(drop)?;
        Ok(())
    })?;
    let back = WsBackward {
        ws: *ws,
        device: w.device,
        dims: w.dims,
    };
    finish("weight_standardization", back, [w.node], w.prim, out)
}

/// A weight op's input: its dims, its contiguous primitive and autodiff node, its
/// device, that device's `Shared`, and the wgnorm view of it.
struct WeightInput<const D: usize> {
    dims: [usize; D],
    prim: CubeTensor,
    node: Option<NodeGuard>,
    device: WgpuDevice,
    shared: std::sync::Arc<Shared>,
    view: wgnorm::Tensor,
}

fn weight_input<const D: usize>(weight: Tensor<D>) -> Result<WeightInput<D>> {
    let dims = weight.dims();
    let (prim, node) = primitive(weight)?;
    let prim = contiguous(prim);
    let device = wgpu_device(&prim)?;
    let shared = Shared::of(&device)?;
    let view = shared.view_primitive(&prim, &dims)?;
    Ok(WeightInput {
        dims,
        prim,
        node,
        device,
        shared,
        view,
    })
}

/// The wgpu device of a burn primitive.
pub(crate) fn wgpu_device(prim: &CubeTensor) -> Result<WgpuDevice> {
    match &prim.device {
        cubecl::Device::Wgpu(d) => Ok(d.clone()),
        other => Err(Error::Burn(format!("{other:?} is not a wgpu device"))),
    }
}

#[derive(Debug)]
struct WnBackward<const D: usize> {
    wn: WeightNorm,
    device: WgpuDevice,
    g_dims: [usize; D],
    v_dims: [usize; D],
}

impl<const D: usize> Backward<Wgpu, 2> for WnBackward<D> {
    /// g and v.
    type State = (CubeTensor, CubeTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = contiguous(grads.consume::<Wgpu>(&ops.node));
        let (g, v) = ops.state;
        let [parent_g, parent_v] = ops.parents;
        let result = (|| {
            let shared = Shared::of(&self.device)?;
            let (gt, vt, gw) = (
                shared.view_primitive(&g, &self.g_dims)?,
                shared.view_primitive(&v, &self.v_dims)?,
                shared.view_primitive(&grad, &self.v_dims)?,
            );
            let grad_g = empty(&shared, self.g_dims)?;
            let grad_g_view = shared.view_primitive(&grad_g, &self.g_dims)?;
            let grad_v = run(&shared, self.v_dims, |rec| {
                let grads = self.wn.record_backward(rec, &gt, &vt, &gw)?;
                // grad_g is per slice, not shaped like the data: wgnorm makes it, and
                // a GPU copy puts it in burn's tensor.
                rec.copy_tensor(&grads.g, &grad_g_view)?;
                Ok(())
            })?;
            Ok::<_, Error>((grad_g, grad_v))
        })();
        let (grad_g, grad_v) = result.unwrap_or_else(|e| panic!("weight_norm backward: {e}"));
        if let Some(node) = parent_g {
            grads.register::<Wgpu>(node.id, grad_g);
        }
        if let Some(node) = parent_v {
            grads.register::<Wgpu>(node.id, grad_v);
        }
    }
}

/// Weight Normalization `W = g * v / ||v||` of burn tensors, `wn`'s flavour (PyTorch's
/// `dim = 0` by default: `g` shaped `[rows, 1, ..]`), on wgnorm's kernels, with
/// gradients for `g` and `v` through wgnorm's backward kernel on autodiff devices.
pub fn weight_norm<const D: usize>(
    wn: &WeightNorm,
    g: Tensor<D>,
    v: Tensor<D>,
) -> Result<Tensor<D>> {
    let (g_dims, v_dims) = (g.dims(), v.dims());
    let ((pg, ng), (pv, nv)) = (primitive(g)?, primitive(v)?);
    all_or_none("weight_norm", &[&ng, &nv])?;
    let (pg, pv) = (contiguous(pg), contiguous(pv));
    let device = wgpu_device(&pv)?;
    let shared = Shared::of(&device)?;
    let (gt, vt) = (
        shared.view_primitive(&pg, &g_dims)?,
        shared.view_primitive(&pv, &v_dims)?,
    );
    let out = run(&shared, v_dims, |rec| {
        wn.record_forward(rec, &gt, &vt).map(drop)?;
        Ok(())
    })?;
    let back = WnBackward {
        wn: *wn,
        device,
        g_dims,
        v_dims,
    };
    finish("weight_norm", back, [ng, nv], (pg, pv), out)
}

#[derive(Debug)]
struct SnBackward<const D: usize> {
    sn: SpectralNorm,
    device: WgpuDevice,
    dims: [usize; D],
}

impl<const D: usize> Backward<Wgpu, 1> for SnBackward<D> {
    /// The raw weight, the forward's vectors and sigma, the state (for gamma).
    type State = (CubeTensor, SpectralNormOutput, SpectralNormState);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (weight, forward, state) = ops.state;
        unary::<Wgpu, _>(ops.parents, ops.node, grads, |grad| {
            let sn = self.sn;
            weight_grad(
                "spectral_norm",
                &self.device,
                self.dims,
                &weight,
                &grad,
                |rec, w, g| sn.record_backward(rec, w, g, &forward, &state).map(drop),
            )
        });
    }
}

/// Spectral Normalization `W / sigma` of a burn weight, `sn`'s flavour, with `state`
/// (from [`SpectralNorm::init_state`] on `Shared::of(device).ctx`): in training one
/// power iteration per call updates `u` and `v`, as PyTorch's parametrization does. On
/// autodiff devices the weight's gradient (through sigma, `u` and `v` held constant)
/// comes from wgnorm's backward kernel. The state changes only if this returns `Ok`.
pub fn spectral_norm<const D: usize>(
    sn: &SpectralNorm,
    weight: Tensor<D>,
    state: &mut SpectralNormState,
    training: bool,
) -> Result<Tensor<D>> {
    let w = weight_input(weight)?;
    let mut forward = None;
    let out = run(&w.shared, w.dims, |rec| {
        forward = Some(sn.record_forward(rec, &w.view, state, training)?);
        Ok(())
    })?;
    let forward = forward.expect("recorded above");
    let back = SnBackward {
        sn: *sn,
        device: w.device,
        dims: w.dims,
    };
    finish(
        "spectral_norm",
        back,
        [w.node],
        (w.prim, forward, state.clone()),
        out,
    )
}

#[derive(Debug)]
struct BnBackward<const D: usize> {
    bn: BatchNorm,
    device: WgpuDevice,
    /// The shape wgnorm sees: the input's axes in memory order.
    dims: [usize; D],
    /// Axis `i` of `dims` is the burn tensor's axis `order[i]`.
    order: [usize; D],
    features: usize,
}

/// The permutation that undoes `order`.
fn inverse<const D: usize>(order: &[usize; D]) -> [usize; D] {
    let mut inv = [0; D];
    for (i, &a) in order.iter().enumerate() {
        inv[a] = i;
    }
    inv
}

impl<const D: usize> Backward<Wgpu, 3> for BnBackward<D> {
    /// x (in memory order) and what the forward left for the backward.
    type State = (CubeTensor, std::sync::Arc<BatchNormForward>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Wgpu>(&ops.node);
        let (x, forward) = ops.state;
        let [parent_x, parent_gamma, parent_beta] = ops.parents;
        let result = (|| {
            let shared = Shared::of(&self.device)?;
            // The gradient in x's memory order: a view when burn made it so (the
            // usual case after a convolution), else one copy.
            let grad = contiguous(permuted::<D>(grad, &self.order)?);
            let (xv, gv) = (
                shared.view_primitive(&x, &self.dims)?,
                shared.view_primitive(&grad, &self.dims)?,
            );
            let (grad_gamma, grad_beta) = (
                empty(&shared, [self.features])?,
                empty(&shared, [self.features])?,
            );
            let (gg, gb) = (
                shared.view_primitive(&grad_gamma, &[self.features])?,
                shared.view_primitive(&grad_beta, &[self.features])?,
            );
            let grad_x = run(&shared, self.dims, |rec| {
                let grads = self.bn.record_backward(rec, &xv, &gv, &forward)?;
                // Per-feature gradients are not shaped like the data: copied on the
                // GPU into burn's tensors.
                rec.copy_tensor(&grads.gamma, &gg)?;
                rec.copy_tensor(&grads.beta, &gb)?;
                Ok(())
            })?;
            let grad_x = permuted::<D>(grad_x, &inverse(&self.order))?;
            Ok::<_, Error>((grad_x, grad_gamma, grad_beta))
        })();
        let (grad_x, grad_gamma, grad_beta) =
            result.unwrap_or_else(|e| panic!("batch_norm backward: {e}"));
        for (parent, g) in [
            (parent_x, grad_x),
            (parent_gamma, grad_gamma),
            (parent_beta, grad_beta),
        ] {
            if let Some(node) = parent {
                grads.register::<Wgpu>(node.id, g);
            }
        }
    }
}

/// Batch Normalization of a burn activation `x` with burn's `gamma` and `beta`
/// (features on `bn.feature_axis`; PyTorch's defaults with [`BatchNorm::pytorch`]),
/// in `mode`, updating `state` (running statistics as wgnorm tensors, or views of
/// burn tensors from [`Shared::view`], updated in place) when it trains. On autodiff
/// devices the gradients of `x`, `gamma` and `beta` come from wgnorm's backward
/// kernels. The state changes only if this returns `Ok`.
///
/// Memory order: an `x` whose feature axis 1 is innermost in memory (channels-last,
/// what burn's convolutions return) runs on wgnorm's channels-last kernels in place,
/// and the output and `x`'s gradient come back in that order; any other strided `x`
/// is copied to row-major first.
pub fn batch_norm<const D: usize>(
    bn: &BatchNorm,
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    state: &mut BatchNormState,
    mode: BatchNormMode,
) -> Result<Tensor<D>> {
    let logical = x.dims();
    let features = gamma.dims()[0];
    let ((px, nx), (pg, ng), (pb, nb)) = (primitive(x)?, primitive(gamma)?, primitive(beta)?);
    all_or_none("batch_norm", &[&nx, &ng, &nb])?;
    let (pg, pb) = (contiguous(pg), contiguous(pb));
    let channels_last = bn.resolved_axis(D)? == 1 && memory_of(&px) == Some(Memory::ChannelsLast);
    let (order, px, bn) = if channels_last {
        let order: [usize; D] = channels_last_order(D).try_into().expect("rank D");
        let bn = BatchNorm {
            feature_axis: D as isize - 1,
            ..*bn
        };
        (order, permuted::<D>(px, &order)?, bn)
    } else {
        (std::array::from_fn(|i| i), contiguous(px), *bn)
    };
    let dims = order.map(|a| logical[a]);
    let device = wgpu_device(&px)?;
    let shared = Shared::of(&device)?;
    let (xv, gv, bv) = (
        shared.view_primitive(&px, &dims)?,
        shared.view_primitive(&pg, &[features])?,
        shared.view_primitive(&pb, &[features])?,
    );
    let mut forward = None;
    let out = run(&shared, dims, |rec| {
        forward = Some(bn.record_forward(rec, &xv, Some(&gv), Some(&bv), Some(state), mode)?);
        Ok(())
    })?;
    let out = permuted::<D>(out, &inverse(&order))?;
    let forward = std::sync::Arc::new(forward.expect("recorded above"));
    let back = BnBackward {
        bn,
        device,
        dims,
        order,
        features,
    };
    finish("batch_norm", back, [nx, ng, nb], (px, forward), out)
}
