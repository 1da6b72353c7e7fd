//! Weight Normalization: `W = g * v / ||v||`.

use bytemuck::{Pod, Zeroable};

use super::cast::{cast_internal, record_cast_into, widened};
use super::channel_stats::{record_sums, vec4_buffer, ReducePlan};
use super::copy::record_copy;
use super::element::{record_elementwise, record_per_slice, Extra, PerSlice};
use super::layout::{
    check_grad_dtype, row_windows, ChannelLayout, RowGeometry, RowParams, RowWindow,
};
use crate::error::{Error, Result};
use crate::gpu::{Bind, Context, Kernel, Recording, Spec, Tensor};

const OP: &str = "weight_norm";

/// Which axes the norm of [`WeightNorm`] runs over. Both frameworks call their
/// argument `dim` but read it the other way round; this enum names the reading.
///
/// For a linear weight `[out, in]` the two conventions agree as
/// `Keep(0)` (PyTorch `dim=0`) == `Reduce(-1)` (Jittor `dim=-1`): one norm per output row.
/// For a convolution weight `[out, in, kh, kw]`, PyTorch's default `Keep(0)` takes one
/// norm per output channel over `in x kh x kw`, while Jittor's default `Reduce(-1)`
/// takes one norm per `(out, in, kh)` over `kw` only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormAxes {
    /// PyTorch's `dim`: the axis kept; the norm runs over every other axis. `g` has the
    /// shape of `v` with every other axis set to 1. Any axis runs as a GPU kernel.
    Keep(usize),
    /// PyTorch's `dim=None`: one norm over the whole tensor. `g` has shape `[1]`, as
    /// PyTorch stores it (`norm_except_dim(v, 2, -1)`); a scalar `g` of shape `[]` is
    /// accepted too.
    All,
    /// Jittor's `dim`: the axis reduced (negative counts from the end, `-1` is the
    /// last); `g` has the shape of `v` with that axis set to 1. Any axis runs as a GPU
    /// kernel.
    Reduce(isize),
}

/// Weight Normalization, after PyTorch's `torch.nn.utils.weight_norm` and Jittor's
/// `weightnorm`: `W = g * v / ||v||`, with `g` (magnitude) and `v` (direction) the
/// parameters.
///
/// Defaults: `axes = Keep(0)` (PyTorch's `dim=0`), `eps = 1e-30` on the squared norm.
///
/// Zero norms: PyTorch divides by a zero norm and returns NaN. Here the squared norm is
/// clamped at `eps` (Jittor's convention), so an all-zero slice of `v` gives `W = 0`,
/// `grad_g = 0` and `grad_v = g / sqrt(eps) * grad_W` (the exact gradient of the
/// clamped formula), never NaN. Any nonzero norm above `sqrt(eps)` is unaffected.
///
/// Types ([`DType`](crate::DType)): `v` and the gradient may be f32, f16 or bf16 and
/// `W` and `grad_v` come back in `v`'s type, rounded once; `g` is f32 or half as the
/// user gives it (PyTorch keeps it in the parameter's type), and `grad_g` comes back
/// in `g`'s type. Norms accumulate in f32. [`WeightNorm::decompose`] gives an f32 `g`.
///
/// ```no_run
/// # fn main() -> wgnorm::Result<()> {
/// use wgnorm::{Context, NormAxes, Tensor, WeightNorm};
/// let ctx = Context::headless()?;
/// let w = Tensor::from_array(&ctx, &ndarray::Array2::<f32>::ones((64, 128)))?;
/// // PyTorch `weight_norm(linear, dim=0)` and Jittor `weight_norm(linear, dim=-1)`:
/// let torch = WeightNorm::pytorch(Some(0));
/// let jittor = WeightNorm::jittor(-1);
/// let p = torch.decompose(&ctx, &w)?; // p.g: [64, 1], p.v: a copy of w
/// let again = torch.forward(&ctx, &p.g, &p.v)?; // == w
/// # let _ = jittor; Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WeightNorm {
    /// The axes of the norm. Default `Keep(0)`.
    pub axes: NormAxes,
    /// Floor of the squared norm. Default `1e-30` (Jittor's). Must be finite and >= 0;
    /// 0 reproduces PyTorch exactly, NaN included.
    pub eps: f32,
}

impl Default for WeightNorm {
    fn default() -> Self {
        Self::pytorch(Some(0))
    }
}

/// The gradients of a weight-norm backward pass.
#[derive(Clone, Debug)]
pub struct WeightNormGrads {
    /// With respect to `g`, shaped like it.
    pub g: Tensor,
    /// With respect to `v`, shaped like it.
    pub v: Tensor,
}

/// A weight as weight norm's parameters ([`WeightNorm::decompose`]): `W = g * v / ||v||`.
#[derive(Clone, Debug)]
pub struct WeightNormParams {
    /// The norms (PyTorch's `weight_g`).
    pub g: Tensor,
    /// The direction (PyTorch's `weight_v`), a copy of the weight.
    pub v: Tensor,
}

// Mirrors `SliceParams` in shaders/weight_norm.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct SliceParams {
    slices: u32,
    eps: f32,
    _pad: [u32; 2],
}

impl WeightNorm {
    /// PyTorch's convention: `dim` is the axis kept (`None`: one norm over everything).
    pub fn pytorch(dim: Option<usize>) -> Self {
        WeightNorm {
            axes: dim.map_or(NormAxes::All, NormAxes::Keep),
            eps: 1e-30,
        }
    }

    /// Jittor's convention: `dim` is the axis reduced, negative from the end (Jittor's
    /// default is `-1`).
    pub fn jittor(dim: isize) -> Self {
        WeightNorm {
            axes: NormAxes::Reduce(dim),
            eps: 1e-30,
        }
    }

    /// The `[outer, slices, inner]` view of `shape` whose slices each get one norm.
    pub(crate) fn layout(&self, shape: &[usize]) -> Result<ChannelLayout> {
        if shape.is_empty() || shape.contains(&0) {
            return Err(Error::input(
                OP,
                format!("v must be a non-empty tensor of rank >= 1, got shape {shape:?}"),
            ));
        }
        if !self.eps.is_finite() || self.eps < 0.0 {
            return Err(Error::input(
                OP,
                format!("eps must be finite and >= 0, got {}", self.eps),
            ));
        }
        let rank = shape.len();
        let prod = |s: &[usize]| s.iter().map(|&d| d as u64).product::<u64>();
        match self.axes {
            NormAxes::All => Ok(ChannelLayout::new(shape, None)),
            NormAxes::Keep(k) if k < rank => Ok(ChannelLayout::new(shape, Some(k))),
            NormAxes::Keep(k) => Err(Error::input(
                OP,
                format!("dim {k} is out of range for v of shape {shape:?}"),
            )),
            NormAxes::Reduce(d) => {
                let k = if d < 0 { d + rank as isize } else { d };
                if k < 0 || k >= rank as isize {
                    return Err(Error::input(
                        OP,
                        format!("jittor dim {d} is out of range for v of shape {shape:?}"),
                    ));
                }
                let k = k as usize;
                if k == rank - 1 {
                    // Each slice is one contiguous row: the row-reduction layout.
                    Ok(ChannelLayout::dense(
                        1,
                        1,
                        prod(&shape[..k]),
                        shape[k] as u64,
                    ))
                } else {
                    Ok(ChannelLayout::reduce_one_axis(shape, k))
                }
            }
        }
    }

    /// The shape of `g` for `v` of shape `shape`.
    pub fn g_shape(&self, shape: &[usize]) -> Result<Vec<usize>> {
        self.layout(shape)?;
        let rank = shape.len();
        Ok(match self.axes {
            NormAxes::All => vec![1],
            NormAxes::Keep(k) => (0..rank)
                .map(|i| if i == k { shape[i] } else { 1 })
                .collect(),
            NormAxes::Reduce(d) => {
                let k = if d < 0 {
                    (d + rank as isize) as usize
                } else {
                    d as usize
                };
                let mut s = shape.to_vec();
                s[k] = 1;
                s
            }
        })
    }

    fn check_g(&self, g: &[usize], v: &[usize]) -> Result<ChannelLayout> {
        let layout = self.layout(v)?;
        let want = self.g_shape(v)?;
        let scalar_ok = self.axes == NormAxes::All && g.is_empty();
        if g != want.as_slice() && !scalar_ok {
            return Err(Error::input(
                OP,
                format!(
                    "g has shape {g:?}; for v of shape {v:?} and {:?} it must be {want:?}",
                    self.axes
                ),
            ));
        }
        Ok(layout)
    }

    fn check_same(&self, what: &str, got: &[usize], v: &[usize]) -> Result<()> {
        if got != v {
            return Err(Error::input(
                OP,
                format!("{what} has shape {got:?} but v has shape {v:?}"),
            ));
        }
        Ok(())
    }

    /// `W = g * v / ||v||`.
    pub fn forward(&self, ctx: &Context, g: &Tensor, v: &Tensor) -> Result<Tensor> {
        ctx.run(|rec| self.record_forward(rec, g, v))
    }

    /// Gradients of `sum(W * grad_w)` with respect to `g` and `v`: `(grad_g, grad_v)`.
    pub fn backward(
        &self,
        ctx: &Context,
        g: &Tensor,
        v: &Tensor,
        grad_w: &Tensor,
    ) -> Result<WeightNormGrads> {
        ctx.run(|rec| self.record_backward(rec, g, v, grad_w))
    }

    /// Registering weight norm on an existing weight: `g = ||W||`, `v = W` (a copy), so
    /// that `forward(g, v)` gives the weight back (PyTorch's `weight_norm` /
    /// `right_inverse`; the `weight_norm_decompose` conformance cases).
    pub fn decompose(&self, ctx: &Context, weight: &Tensor) -> Result<WeightNormParams> {
        ctx.run(|rec| self.record_decompose(rec, weight))
    }

    /// Removing weight norm: the plain weight `g * v / ||v||` (PyTorch's
    /// `remove_weight_norm`; Jittor has no equivalent). The same as [`Self::forward`].
    pub fn fold(&self, ctx: &Context, g: &Tensor, v: &Tensor) -> Result<Tensor> {
        self.forward(ctx, g, v)
    }

    /// Records [`Self::forward`].
    pub fn record_forward(
        &self,
        rec: &mut Recording<'_>,
        g: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        rec.context().check_tensors(OP, &[("g", g), ("v", v)])?;
        let layout = self.check_g(g.shape(), v.shape())?;
        if g.dtype().is_half() {
            // g is per slice: widened, the kernels read it in f32.
            let g = widened(rec, g)?;
            return self.record_forward(rec, &g, v);
        }
        let ctx = rec.context();
        if let Some(windows) = row_windows(layout, &ctx.limits) {
            let out = rec.output(OP, v.shape(), v.dtype())?;
            self.record_rows(rec, &layout, &windows, g, v, None, &out)?;
            return Ok(out);
        }
        let plan = ReducePlan::new(OP, layout, &ctx.limits)?;
        let sums = record_sums(rec, OP, &plan, v, v, None)?;
        let factors = vec4_buffer(ctx, OP, layout.slices())?;
        record_per_slice(
            rec,
            Kernel::WnFactors,
            layout.slices(),
            |n| self.slice_params(n),
            &[
                PerSlice::Values(g, 1),
                PerSlice::Values(&sums, 4),
                PerSlice::Values(&factors, 4),
            ],
        )?;
        let out = rec.output(OP, v.shape(), v.dtype())?;
        record_elementwise(
            rec,
            Kernel::WnApply,
            &layout,
            &[v],
            &[PerSlice::Values(&factors, 4)],
            &out,
            Extra::default(),
        )?;
        Ok(out)
    }

    /// Records [`Self::backward`].
    pub fn record_backward(
        &self,
        rec: &mut Recording<'_>,
        g: &Tensor,
        v: &Tensor,
        grad_w: &Tensor,
    ) -> Result<WeightNormGrads> {
        rec.context()
            .check_tensors(OP, &[("g", g), ("v", v), ("grad_w", grad_w)])?;
        let layout = self.check_g(g.shape(), v.shape())?;
        self.check_same("grad_w", grad_w.shape(), v.shape())?;
        check_grad_dtype(OP, "grad_w", grad_w.dtype(), "v", v.dtype())?;
        if g.dtype().is_half() {
            // grad_g in g's type, computed in f32 and rounded once.
            let wide = widened(rec, g)?;
            let grads = self.record_backward(rec, &wide, v, grad_w)?;
            return Ok(WeightNormGrads {
                g: cast_internal(rec, &grads.g, g.dtype())?,
                v: grads.v,
            });
        }
        let ctx = rec.context();
        if let Some(windows) = row_windows(layout, &ctx.limits) {
            // Every row's grad_g is written by the row kernel: pooled, not zeroed.
            let grad_g = Tensor::output(ctx, g.shape())?;
            let grad_v = rec.output(OP, v.shape(), v.dtype())?;
            self.record_rows(
                rec,
                &layout,
                &windows,
                g,
                v,
                Some((grad_w, &grad_g)),
                &grad_v,
            )?;
            return Ok(WeightNormGrads {
                g: grad_g,
                v: grad_v,
            });
        }
        let plan = ReducePlan::new(OP, layout, &ctx.limits)?;
        // One pass over v and grad_w: <grad_w, v> and |v|^2 per slice.
        let sums = record_sums(rec, OP, &plan, grad_w, v, None)?;
        let grad_g = Tensor::output(ctx, g.shape())?;
        let coef = vec4_buffer(ctx, OP, layout.slices())?;
        record_per_slice(
            rec,
            Kernel::WnGradFactors,
            layout.slices(),
            |n| self.slice_params(n),
            &[
                PerSlice::Values(g, 1),
                PerSlice::Values(&sums, 4),
                PerSlice::Values(&grad_g, 1),
                PerSlice::Values(&coef, 4),
            ],
        )?;
        let grad_v = rec.output(OP, v.shape(), v.dtype())?;
        record_elementwise(
            rec,
            Kernel::WnGradV,
            &layout,
            &[v, grad_w],
            &[PerSlice::Values(&coef, 4)],
            &grad_v,
            Extra::default(),
        )?;
        Ok(WeightNormGrads {
            g: grad_g,
            v: grad_v,
        })
    }

    /// One workgroup per row (see `row_windows`): `out = W`, or with
    /// `grad = Some((grad_w, grad_g))` `out = grad_v` and `grad_g` filled.
    #[allow(clippy::too_many_arguments)]
    fn record_rows(
        &self,
        rec: &mut Recording<'_>,
        layout: &ChannelLayout,
        windows: &[RowWindow],
        g: &Tensor,
        v: &Tensor,
        grad: Option<(&Tensor, &Tensor)>,
        out: &Tensor,
    ) -> Result<()> {
        let geo = RowGeometry::new(layout, &rec.context().limits.tuning);
        let dtype = v.dtype();
        if dtype.is_half() && !geo.vec4 {
            // Rows not a multiple of 4 long: through f32 (see `cast.rs`).
            let wide_v = widened(rec, v)?;
            let wide_grad = grad.map(|(gw, _)| widened(rec, gw)).transpose()?;
            let wide_out = Tensor::output(rec.context(), out.shape())?;
            let grad = wide_grad.as_ref().zip(grad.map(|(_, gg)| gg));
            self.record_rows(rec, layout, windows, g, &wide_v, grad, &wide_out)?;
            return record_cast_into(rec, &wide_out, out);
        }
        let spec = Spec {
            dtype,
            ..geo.spec()
        };
        let align = rec.context().limits.align_elems;
        let mut first_row = 0;
        for w in windows {
            let groups = geo.groups(w);
            // The window's rows of g and grad_g (one f32 a row), bound from an aligned
            // row: more rows than one binding holds are normal.
            let g_start = first_row / align * align;
            let g_len = first_row + w.rows - g_start;
            let params = RowParams {
                eps: self.eps,
                ..geo.params(w, first_row - g_start)
            };
            let gb = Bind::window(g, g_start, g_len);
            let vb = Bind::window(v, w.start, w.len);
            let ob = Bind::window(out, w.start, w.len);
            match grad {
                None => {
                    let kernel = geo.pick(Kernel::WnRowsForward);
                    rec.dispatch_spec(kernel, spec, &params, &[gb, vb, ob], groups)?;
                }
                Some((grad_w, grad_g)) => {
                    let kernel = geo.pick(Kernel::WnRowsGrad);
                    let binds = [
                        gb,
                        vb,
                        Bind::window(grad_w, w.start, w.len),
                        Bind::window(grad_g, g_start, g_len),
                        ob,
                    ];
                    rec.dispatch_spec(kernel, spec, &params, &binds, groups)?;
                }
            }
            first_row += w.rows;
        }
        Ok(())
    }

    /// Records [`Self::decompose`].
    pub fn record_decompose(
        &self,
        rec: &mut Recording<'_>,
        weight: &Tensor,
    ) -> Result<WeightNormParams> {
        rec.context().check_tensors(OP, &[("weight", weight)])?;
        let layout = self.layout(weight.shape())?;
        let ctx = rec.context();
        let plan = ReducePlan::new(OP, layout, &ctx.limits)?;
        let sums = record_sums(rec, OP, &plan, weight, weight, None)?;
        let g = Tensor::zeros(ctx, &self.g_shape(weight.shape())?)?;
        record_per_slice(
            rec,
            Kernel::WnNorms,
            layout.slices(),
            |n| self.slice_params(n),
            &[PerSlice::Values(&sums, 4), PerSlice::Values(&g, 1)],
        )?;
        let v = record_copy(rec, weight)?;
        Ok(WeightNormParams { g, v })
    }

    fn slice_params(&self, slices: u64) -> SliceParams {
        SliceParams {
            slices: slices as u32,
            eps: self.eps,
            _pad: [0; 2],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_mirror_the_wgsl_struct() {
        use crate::gpu::kernels::mirror;
        mirror!("weight_norm", SliceParams, [slices, eps]);
    }
}
