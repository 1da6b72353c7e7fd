//! Weight Standardization: `(W - mean) / sqrt(var + eps)` per output channel.

use bytemuck::{Pod, Zeroable};

use super::cast::{record_cast_into, widened};
use super::channel_stats::{record_sums, record_welford, vec4_buffer, ReducePlan};
use super::element::{record_elementwise, record_per_slice, Extra, PerSlice};
use super::layout::{
    check_channel_input, check_weight_grad, row_windows, ChannelLayout, RowGeometry, RowParams,
    RowWindow,
};
use crate::error::{Error, Result};
use crate::gpu::{Bind, Context, Kernel, Recording, Spec, Tensor};

const OP: &str = "weight_standardization";

/// Which variance divides the centred weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Variance {
    /// Divide the sum of squares by `n` (Chainer's `WeightStandardization`, via
    /// `group_normalization`). The default.
    #[default]
    Biased,
    /// Divide by `n - 1` (the labml.ai PyTorch version, `torch.var_mean` default).
    /// Needs at least two elements per output channel.
    Unbiased,
}

/// Weight Standardization, after Chainer's `link_hooks.WeightStandardization` and the
/// labml.ai PyTorch version: each output channel of the weight is standardized over
/// every other axis, `output = (W - mean) / sqrt(var + eps)`.
///
/// Defaults ([`Default`], the same as [`WeightStandardization::chainer`]): `eps = 1e-5`,
/// biased variance, output channels on axis 0. Use `axis: 1` for deconvolution
/// weights, which keep their output channels there.
///
/// Types ([`DType`](crate::DType)): the weight and its gradient may be f32, f16 or
/// bf16; statistics accumulate in f32 and the output and gradient come back in the
/// weight's type, rounded once (a gradient of another type is refused: autograd keeps
/// a gradient in its tensor's type).
///
/// ```no_run
/// # fn main() -> wgnorm::Result<()> {
/// use wgnorm::{Context, Tensor, WeightStandardization};
/// let ctx = Context::headless()?;
/// let w = Tensor::from_array(&ctx, &ndarray::Array4::<f32>::ones((64, 3, 7, 7)))?;
/// let standardized = WeightStandardization::default().forward(&ctx, &w)?;
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WeightStandardization {
    /// Added to the variance. Default `1e-5` (Chainer and labml.ai). Must be finite and positive.
    pub eps: f32,
    /// Biased (default, Chainer) or unbiased (labml.ai) variance.
    pub variance: Variance,
    /// The axis of the output channels. Default 0; 1 for deconvolution weights.
    pub axis: usize,
}

impl Default for WeightStandardization {
    fn default() -> Self {
        Self::chainer()
    }
}

/// A training step's output and gradient ([`WeightStandardization::forward_backward`]).
#[derive(Clone, Debug)]
pub struct WeightStandardizationStep {
    /// The standardized weight.
    pub output: Tensor,
    /// The gradient with respect to the raw weight.
    pub grad: Tensor,
}

// Mirrors `FinalizeParams` in shaders/weight_standardization.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct FinalizeParams {
    channels: u32,
    eps: f32,
    divisor: f32,
    _pad: u32,
}

impl WeightStandardization {
    /// Chainer's `WeightStandardization`: `eps = 1e-5`, biased variance, axis 0.
    pub fn chainer() -> Self {
        WeightStandardization {
            eps: 1e-5,
            variance: Variance::Biased,
            axis: 0,
        }
    }

    /// The labml.ai PyTorch version: `eps = 1e-5`, unbiased variance (`torch.var_mean`), axis 0.
    pub fn labml() -> Self {
        WeightStandardization {
            eps: 1e-5,
            variance: Variance::Unbiased,
            axis: 0,
        }
    }

    /// Checks the configuration against a weight shape; returns the channel layout.
    pub(crate) fn check(&self, shape: &[usize]) -> Result<ChannelLayout> {
        let layout = check_channel_input(OP, "weight", "output axis", shape, self.axis, self.eps)?;
        if self.variance == Variance::Unbiased && layout.per_channel() < 2 {
            return Err(Error::input(
                OP,
                format!(
                    "the unbiased variance needs at least 2 elements per output channel, \
                     shape {shape:?} has {}",
                    layout.per_channel()
                ),
            ));
        }
        Ok(layout)
    }

    fn divisor(&self, layout: &ChannelLayout) -> f64 {
        let n = layout.per_channel() as f64;
        match self.variance {
            Variance::Biased => n,
            Variance::Unbiased => n - 1.0,
        }
    }

    /// Standardizes `weight` and waits for nothing: the result is ready to read or use.
    pub fn forward(&self, ctx: &Context, weight: &Tensor) -> Result<Tensor> {
        ctx.run(|rec| self.record_forward(rec, weight))
    }

    /// The gradient with respect to the raw weight of `sum(output * grad_output)`,
    /// through the mean and the variance.
    pub fn backward(&self, ctx: &Context, weight: &Tensor, grad_output: &Tensor) -> Result<Tensor> {
        ctx.run(|rec| self.record_backward(rec, weight, grad_output))
    }

    /// Forward and backward together: the output and the gradient for the raw weight
    /// (what a training step needs). With the row kernels (contiguous channels of up to
    /// 16 Ki elements) each pass computes its row's statistics from cache, 20 bytes per
    /// element in all; otherwise the two share one pass of statistics.
    pub fn forward_backward(
        &self,
        ctx: &Context,
        weight: &Tensor,
        grad_output: &Tensor,
    ) -> Result<WeightStandardizationStep> {
        ctx.run(|rec| self.record_forward_backward(rec, weight, grad_output))
    }

    /// Records the forward pass into `rec` (nothing runs until `rec` is submitted).
    pub fn record_forward(&self, rec: &mut Recording<'_>, weight: &Tensor) -> Result<Tensor> {
        rec.context().check_tensors(OP, &[("weight", weight)])?;
        let layout = self.check(weight.shape())?;
        if let Some(windows) = row_windows(layout, &rec.context().limits) {
            return self.record_rows(rec, &layout, &windows, weight, None);
        }
        let plan = ReducePlan::new(OP, layout, &rec.context().limits)?;
        let norm = self.record_norm(rec, &plan, weight)?;
        self.record_output(rec, &layout, weight, &norm)
    }

    /// Records the backward pass into `rec`; returns the gradient for the raw weight.
    pub fn record_backward(
        &self,
        rec: &mut Recording<'_>,
        weight: &Tensor,
        grad_output: &Tensor,
    ) -> Result<Tensor> {
        let layout = self.check_backward(rec, weight, grad_output)?;
        if let Some(windows) = row_windows(layout, &rec.context().limits) {
            return self.record_rows(rec, &layout, &windows, weight, Some(grad_output));
        }
        // The row path needs no reduction plan (and none of its per-channel scratch).
        let plan = ReducePlan::new(OP, layout, &rec.context().limits)?;
        let norm = self.record_norm(rec, &plan, weight)?;
        self.record_grad(rec, &plan, weight, grad_output, &norm)
    }

    /// Records [`Self::forward_backward`].
    pub fn record_forward_backward(
        &self,
        rec: &mut Recording<'_>,
        weight: &Tensor,
        grad_output: &Tensor,
    ) -> Result<WeightStandardizationStep> {
        let layout = self.check_backward(rec, weight, grad_output)?;
        if let Some(windows) = row_windows(layout, &rec.context().limits) {
            let out = self.record_rows(rec, &layout, &windows, weight, None)?;
            let grad = self.record_rows(rec, &layout, &windows, weight, Some(grad_output))?;
            return Ok(WeightStandardizationStep { output: out, grad });
        }
        let plan = ReducePlan::new(OP, layout, &rec.context().limits)?;
        let norm = self.record_norm(rec, &plan, weight)?;
        let out = self.record_output(rec, &plan.layout, weight, &norm)?;
        let grad = self.record_grad(rec, &plan, weight, grad_output, &norm)?;
        Ok(WeightStandardizationStep { output: out, grad })
    }

    fn check_backward(
        &self,
        rec: &Recording<'_>,
        weight: &Tensor,
        grad_output: &Tensor,
    ) -> Result<ChannelLayout> {
        rec.context()
            .check_tensors(OP, &[("weight", weight), ("grad_output", grad_output)])?;
        let layout = self.check(weight.shape())?;
        check_weight_grad(OP, grad_output, weight)?;
        Ok(layout)
    }

    /// Records the per-channel `(mean, 1 / sqrt(var + eps))` of `weight`.
    fn record_norm(
        &self,
        rec: &mut Recording<'_>,
        plan: &ReducePlan,
        weight: &Tensor,
    ) -> Result<Tensor> {
        let ctx = rec.context();
        let layout = &plan.layout;
        let stats = record_welford(rec, OP, plan, weight)?;
        let norm = vec4_buffer(ctx, OP, layout.channels)?;
        let divisor = self.divisor(layout) as f32;
        record_per_slice(
            rec,
            Kernel::WsFinalize,
            layout.channels,
            |n| FinalizeParams {
                channels: n as u32,
                eps: self.eps,
                divisor,
                _pad: 0,
            },
            &[PerSlice::Values(&stats, 4), PerSlice::Values(&norm, 4)],
        )?;
        Ok(norm)
    }

    /// Records `output = (W - mean) * rstd`.
    fn record_output(
        &self,
        rec: &mut Recording<'_>,
        layout: &ChannelLayout,
        weight: &Tensor,
        norm: &Tensor,
    ) -> Result<Tensor> {
        let out = rec.output(OP, weight.shape(), weight.dtype())?;
        record_elementwise(
            rec,
            Kernel::WsNormalize,
            layout,
            &[weight],
            &[PerSlice::Values(norm, 4)],
            &out,
            Extra::default(),
        )?;
        Ok(out)
    }

    /// Records the gradient for the raw weight, given the channel statistics.
    fn record_grad(
        &self,
        rec: &mut Recording<'_>,
        plan: &ReducePlan,
        weight: &Tensor,
        grad_output: &Tensor,
        norm: &Tensor,
    ) -> Result<Tensor> {
        let layout = &plan.layout;
        let sums = record_sums(rec, OP, plan, grad_output, weight, Some(norm))?;
        let out = rec.output(OP, weight.shape(), weight.dtype())?;
        let extra = Extra {
            flag: 0,
            aux: [
                (1.0 / layout.per_channel() as f64) as f32,
                (1.0 / self.divisor(layout)) as f32,
            ],
            ..Extra::default()
        };
        record_elementwise(
            rec,
            Kernel::WsGrad,
            layout,
            &[weight, grad_output],
            &[PerSlice::Values(norm, 4), PerSlice::Values(&sums, 4)],
            &out,
            extra,
        )?;
        Ok(out)
    }

    /// One workgroup per row (see `row_windows`): the forward output, or with
    /// `grad_output` the gradient for the raw weight.
    fn record_rows(
        &self,
        rec: &mut Recording<'_>,
        layout: &ChannelLayout,
        windows: &[RowWindow],
        weight: &Tensor,
        grad_output: Option<&Tensor>,
    ) -> Result<Tensor> {
        let out = rec.output(OP, weight.shape(), weight.dtype())?;
        self.record_rows_into(rec, layout, windows, weight, grad_output, &out)?;
        Ok(out)
    }

    /// [`Self::record_rows`] into `out`.
    fn record_rows_into(
        &self,
        rec: &mut Recording<'_>,
        layout: &ChannelLayout,
        windows: &[RowWindow],
        weight: &Tensor,
        grad_output: Option<&Tensor>,
        out: &Tensor,
    ) -> Result<()> {
        let geo = RowGeometry::new(layout, &rec.context().limits.tuning);
        let dtype = weight.dtype();
        if dtype.is_half() && !geo.vec4 {
            // Rows not a multiple of 4 long: through f32 (see `cast.rs`).
            let w = widened(rec, weight)?;
            let g = grad_output.map(|g| widened(rec, g)).transpose()?;
            let wide = Tensor::output(rec.context(), weight.shape())?;
            self.record_rows_into(rec, layout, windows, &w, g.as_ref(), &wide)?;
            return record_cast_into(rec, &wide, out);
        }
        let spec = Spec {
            dtype,
            ..geo.spec()
        };
        let (forward, grad) = (
            geo.pick(Kernel::WsRowsForward),
            geo.pick(Kernel::WsRowsGrad),
        );
        for w in windows {
            let groups = geo.groups(w);
            let params = RowParams {
                eps: self.eps,
                inv_n: (1.0 / layout.per_channel() as f64) as f32,
                inv_divisor: (1.0 / self.divisor(layout)) as f32,
                ..geo.params(w, 0)
            };
            let x = Bind::window(weight, w.start, w.len);
            let y = Bind::window(out, w.start, w.len);
            match grad_output {
                None => rec.dispatch_spec(forward, spec, &params, &[x, y], groups)?,
                Some(g) => rec.dispatch_spec(
                    grad,
                    spec,
                    &params,
                    &[x, Bind::window(g, w.start, w.len), y],
                    groups,
                )?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_mirror_the_wgsl_struct() {
        use crate::gpu::kernels::mirror;
        mirror!(
            "weight_standardization",
            FinalizeParams,
            [channels, eps, divisor]
        );
    }
}
