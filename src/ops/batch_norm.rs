//! Batch Normalization: statistics over every axis but the feature axis.

use bytemuck::{Pod, Zeroable};

use super::cast::{cast_internal, widened};
use super::channel_stats::{read_vec4, record_sums, record_welford, vec4_buffer, ReducePlan};
use super::element::{record_elementwise, record_per_slice, Extra, PerSlice};
use super::layout::{check_channel_input, check_grad_dtype, ChannelLayout};
use crate::error::{Error, Result};
use crate::gpu::{Bind, Context, DType, Kernel, Recording, Tensor};

const OP: &str = "batch_norm";

/// How the running averages follow the batch statistics:
/// `running = (1 - w) * running + w * batch`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Momentum {
    /// PyTorch: `w = momentum` weights the new batch (PyTorch's default 0.1).
    Batch(f32),
    /// Keras, Chainer, GoMLX: the momentum (decay) weights the running value,
    /// `w = 1 - momentum` (Keras and GoMLX 0.99, Chainer 0.9).
    Running(f32),
    /// PyTorch's `momentum=None`: the cumulative average, `w = 1 / (num_updates + 1)`.
    Cumulative,
}

/// Which variance the running average stores (the batch is always normalized with the
/// biased one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunningVar {
    /// `var * n / (n - 1)`: PyTorch and Chainer.
    Unbiased,
    /// `var`: Keras and GoMLX.
    Biased,
}

/// Which statistics a forward pass normalizes with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchNormMode {
    /// Batch statistics, then update the running averages (unless the config does
    /// not track them).
    Train,
    /// The running averages, unchanged (inference; Keras' `trainable = false`). With
    /// `track_running_stats = false` the batch statistics are used, as in PyTorch.
    Eval,
    /// GoMLX's frozen averages: training mode that normalizes with the stored averages
    /// and never updates them.
    Frozen,
}

/// The old name of [`BatchNormMode`], kept so that existing code compiles.
pub type Mode = BatchNormMode;

/// Batch Normalization. Presets match the frameworks' documented defaults:
///
/// | preset | momentum | eps | running variance |
/// | --- | --- | --- | --- |
/// | [`BatchNorm::pytorch`] (also [`Default`]) | `Batch(0.1)` | 1e-5 | unbiased |
/// | [`BatchNorm::keras`] | `Running(0.99)` | 1e-3 | biased |
/// | [`BatchNorm::chainer`] | `Running(0.9)` | 2e-5 | unbiased |
/// | [`BatchNorm::gomlx`] | `Running(0.99)`, debiased | 1e-3 | biased |
///
/// All with the feature axis 1 (NCHW; use `feature_axis: 3` for NHWC, or any axis),
/// `center` and `scale` on and running statistics tracked.
///
/// Types ([`DType`]), as cuDNN and PyTorch's autocast: the input and
/// `grad_output` may be f32, f16 or bf16 (the same), the output and `grad_input` come
/// back in that type, rounded once; statistics accumulate in f32 and the running
/// statistics are f32 (half ones are refused); gamma and beta may be f32 or half, and
/// their gradients come back in their own types.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNorm {
    /// The axis of the features; statistics run over every other axis. Negative
    /// counts from the end (`-1`: the last axis, as GoMLX and Keras allow).
    pub feature_axis: isize,
    /// Added to the variance. Must be finite and positive.
    pub eps: f32,
    /// The running-average convention.
    pub momentum: Momentum,
    /// GoMLX's debiased momentum: `w = 1 - min(momentum, 1 - 1 / (num_updates + 1))`
    /// (with [`Momentum::Running`]).
    pub debias_momentum: bool,
    /// Which variance the running average stores.
    pub running_var: RunningVar,
    /// Add beta (the offset). Without it `beta` must be `None`.
    pub center: bool,
    /// Multiply by gamma (the scale). Without it `gamma` must be `None`.
    pub scale: bool,
    /// PyTorch's `track_running_stats`: when false, batch statistics are used in
    /// evaluation too and no running state is read or written.
    pub track_running_stats: bool,
}

impl Default for BatchNorm {
    fn default() -> Self {
        Self::pytorch()
    }
}

/// The running statistics of a [`BatchNorm`] layer, on the GPU.
#[derive(Clone, Debug)]
pub struct BatchNormState {
    /// Running mean, one per feature. Starts at 0.
    pub running_mean: Tensor,
    /// Running variance, one per feature. Starts at 1.
    pub running_var: Tensor,
    /// Training steps so far (PyTorch's `num_batches_tracked`, GoMLX's update count).
    pub num_updates: u64,
}

impl BatchNormState {
    /// GoMLX's `ResetWeights`: the averages' weight back to zero (`num_updates = 0`),
    /// the averages themselves kept. With a debiased momentum
    /// ([`BatchNorm::debias_momentum`]) the next update then replaces them.
    pub fn reset_weights(&mut self) {
        self.num_updates = 0;
    }

    /// Fresh state for `features` features: mean 0, variance 1, no updates.
    pub fn new(ctx: &Context, features: usize) -> Result<Self> {
        Ok(BatchNormState {
            running_mean: Tensor::zeros(ctx, &[features])?,
            running_var: Tensor::from_slice(ctx, &[features], &vec![1.0; features])?,
            num_updates: 0,
        })
    }
}

/// A batch-norm layer that owns its parameters and state, as PyTorch's `BatchNorm2d`
/// and Keras' `BatchNormalization` do: the config, gamma (PyTorch's `<m>.weight`, ones
/// at first) when the config scales, beta (`<m>.bias`, zeros at first) when it centres,
/// and the running statistics. [`crate::state`] saves and loads it whole.
#[derive(Clone, Debug)]
pub struct BatchNormLayer {
    /// The configuration.
    pub config: BatchNorm,
    /// The scale, when `config.scale`.
    pub gamma: Option<Tensor>,
    /// The shift, when `config.center`.
    pub beta: Option<Tensor>,
    /// The running statistics.
    pub state: BatchNormState,
}

impl BatchNormLayer {
    /// A fresh layer of `features` features: gamma 1, beta 0 (where the config has
    /// them), running mean 0, running variance 1, as PyTorch initialises one.
    pub fn new(ctx: &Context, config: BatchNorm, features: usize) -> Result<Self> {
        Ok(BatchNormLayer {
            config,
            gamma: config
                .scale
                .then(|| Tensor::from_slice(ctx, &[features], &vec![1.0; features]))
                .transpose()?,
            beta: config
                .center
                .then(|| Tensor::zeros(ctx, &[features]))
                .transpose()?,
            state: BatchNormState::new(ctx, features)?,
        })
    }

    /// Features of the layer.
    pub fn features(&self) -> usize {
        self.state.running_mean.len()
    }

    /// [`BatchNorm::forward`] with the layer's own parameters and state.
    pub fn forward(
        &mut self,
        ctx: &Context,
        x: &Tensor,
        mode: BatchNormMode,
    ) -> Result<BatchNormForward> {
        let (gamma, beta) = (self.gamma.as_ref(), self.beta.as_ref());
        self.config
            .forward(ctx, x, gamma, beta, Some(&mut self.state), mode)
    }

    /// [`BatchNorm::backward`] of a forward of this layer.
    pub fn backward(
        &self,
        ctx: &Context,
        x: &Tensor,
        grad_output: &Tensor,
        forward: &BatchNormForward,
    ) -> Result<BatchNormGrads> {
        self.config.backward(ctx, x, grad_output, forward)
    }
}

/// Per-feature partial statistics that can be merged across devices or processes
/// (count, mean, M2), with Chan's combine: synchronised batch norm.
#[derive(Clone, Debug, PartialEq)]
pub struct ChannelStats {
    /// Values per feature.
    pub count: f64,
    /// Mean per feature.
    pub mean: Vec<f64>,
    /// Sum of squared deviations from the mean, per feature.
    pub m2: Vec<f64>,
}

impl ChannelStats {
    /// Chan's parallel combine of two sets of statistics of the same features.
    pub fn combine(&self, other: &ChannelStats) -> Result<ChannelStats> {
        self.check()?;
        other.check()?;
        if self.mean.len() != other.mean.len() {
            return Err(Error::input(
                OP,
                format!(
                    "cannot combine statistics of {} and {} features",
                    self.mean.len(),
                    other.mean.len()
                ),
            ));
        }
        let n = self.count + other.count;
        if other.count == 0.0 {
            return Ok(self.clone());
        }
        if self.count == 0.0 {
            return Ok(other.clone());
        }
        let wb = other.count / n;
        let mut mean = Vec::with_capacity(self.mean.len());
        let mut m2 = Vec::with_capacity(self.mean.len());
        for i in 0..self.mean.len() {
            let d = other.mean[i] - self.mean[i];
            mean.push(self.mean[i] + d * wb);
            m2.push(self.m2[i] + other.m2[i] + d * d * self.count * wb);
        }
        Ok(ChannelStats { count: n, mean, m2 })
    }

    /// Refuses statistics that cannot come from data: `mean` and `m2` of different
    /// lengths, a count that is not finite and non-negative, a mean that is not finite,
    /// or an `m2` that is negative or not finite.
    pub fn check(&self) -> Result<()> {
        if self.mean.len() != self.m2.len() {
            return Err(Error::input(
                OP,
                format!(
                    "statistics with {} means and {} m2 values",
                    self.mean.len(),
                    self.m2.len()
                ),
            ));
        }
        if !self.count.is_finite() || self.count < 0.0 {
            return Err(Error::input(
                OP,
                format!(
                    "the count of the statistics must be finite and >= 0, got {}",
                    self.count
                ),
            ));
        }
        if let Some(i) = self.mean.iter().position(|m| !m.is_finite()) {
            return Err(Error::input(
                OP,
                format!("mean[{i}] of the statistics is {}", self.mean[i]),
            ));
        }
        if let Some(i) = self.m2.iter().position(|m| !m.is_finite() || *m < 0.0) {
            return Err(Error::input(
                OP,
                format!(
                    "m2[{i}] of the statistics is {} (must be finite and >= 0)",
                    self.m2[i]
                ),
            ));
        }
        Ok(())
    }

    /// The biased variance per feature.
    pub fn variance(&self) -> Vec<f64> {
        self.m2.iter().map(|m| m / self.count).collect()
    }
}

/// Runs `f` (which records and submits a forward pass) and puts `num_updates` back when
/// it fails, so that a refused or failed step leaves the whole state as it was (the
/// running statistics on the GPU are only written by a submission that succeeds).
fn with_updates_restored<T>(
    mut state: Option<&mut BatchNormState>,
    f: impl FnOnce(Option<&mut BatchNormState>) -> Result<T>,
) -> Result<T> {
    let before = state.as_ref().map(|s| s.num_updates);
    let result = f(state.as_deref_mut());
    if result.is_err() {
        if let (Some(st), Some(n)) = (state, before) {
            st.num_updates = n;
        }
    }
    result
}

/// The gradients of a batch-norm backward pass.
#[derive(Clone, Debug)]
pub struct BatchNormGrads {
    /// With respect to the input, shaped like it.
    pub input: Tensor,
    /// With respect to gamma: `sum(dy * x_hat)` per feature (computed whether or not
    /// the config scales).
    pub gamma: Tensor,
    /// With respect to beta: `sum(dy)` per feature.
    pub beta: Tensor,
}

/// What a forward pass leaves for its backward pass.
#[derive(Debug)]
pub struct BatchNormForward {
    /// The normalized output.
    pub output: Tensor,
    /// Per feature `(mean, invstd, gamma, beta)`, as used.
    pub(crate) norm: Tensor,
    from_batch: bool,
    shape: Vec<usize>,
    /// The types of gamma and beta: their gradients are rounded to them.
    param_dtypes: [DType; 2],
}

impl BatchNormForward {
    /// The gradients, those of gamma and beta rounded to their types when half.
    fn param_grads(
        &self,
        rec: &mut Recording<'_>,
        input: Tensor,
        gamma: Tensor,
        beta: Tensor,
    ) -> Result<BatchNormGrads> {
        let [gd, bd] = self.param_dtypes;
        Ok(BatchNormGrads {
            input,
            gamma: if gd.is_half() {
                cast_internal(rec, &gamma, gd)?
            } else {
                gamma
            },
            beta: if bd.is_half() {
                cast_internal(rec, &beta, bd)?
            } else {
                beta
            },
        })
    }
}

// Mirrors `FinalizeParams` in shaders/batch_norm.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct FinalizeParams {
    features: u32,
    from_batch: u32,
    update: u32,
    has_gamma: u32,
    has_beta: u32,
    eps: f32,
    weight: f32,
    var_correction: f32,
}

// Mirrors `GradParams` in shaders/batch_norm.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct GradParams {
    features: u32,
    training: u32,
    inv_n: f32,
    _pad: u32,
}

// Mirrors `MergeParams` in shaders/batch_norm.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct MergeParams {
    features: u32,
    _pad: [u32; 3],
}

impl BatchNorm {
    /// PyTorch's `nn.BatchNorm*d`: momentum 0.1 weighting the new batch, eps 1e-5,
    /// unbiased running variance.
    pub fn pytorch() -> Self {
        BatchNorm {
            feature_axis: 1,
            eps: 1e-5,
            momentum: Momentum::Batch(0.1),
            debias_momentum: false,
            running_var: RunningVar::Unbiased,
            center: true,
            scale: true,
            track_running_stats: true,
        }
    }

    /// Keras' `BatchNormalization`: momentum 0.99 weighting the running value, eps
    /// 1e-3, biased running variance. (Keras puts features last: set `feature_axis`.)
    pub fn keras() -> Self {
        BatchNorm {
            momentum: Momentum::Running(0.99),
            eps: 1e-3,
            running_var: RunningVar::Biased,
            ..Self::pytorch()
        }
    }

    /// Chainer's `BatchNormalization`: decay 0.9, eps 2e-5, unbiased running variance.
    pub fn chainer() -> Self {
        BatchNorm {
            momentum: Momentum::Running(0.9),
            eps: 2e-5,
            ..Self::pytorch()
        }
    }

    /// GoMLX's `batchnorm`: momentum 0.99, eps 1e-3, biased running variance,
    /// debiased momentum `min(m, 1 - 1/(n + 1))`.
    pub fn gomlx() -> Self {
        BatchNorm {
            debias_momentum: true,
            ..Self::keras()
        }
    }

    /// The feature axis of an input of rank `rank` (a negative one counted from the
    /// end).
    pub fn resolved_axis(&self, rank: usize) -> Result<usize> {
        let axis = if self.feature_axis < 0 {
            rank as isize + self.feature_axis
        } else {
            self.feature_axis
        };
        usize::try_from(axis)
            .ok()
            .filter(|&a| a < rank)
            .ok_or_else(|| {
                Error::input(
                    OP,
                    format!(
                        "feature axis {} is out of range for an input of rank {rank}",
                        self.feature_axis
                    ),
                )
            })
    }

    fn layout(&self, shape: &[usize]) -> Result<ChannelLayout> {
        let axis = match self.resolved_axis(shape.len()) {
            Ok(a) => a,
            // check_channel_input refuses a rank below 2 first.
            Err(_) if shape.len() < 2 => 0,
            Err(e) => return Err(e),
        };
        let layout = check_channel_input(OP, "input", "feature axis", shape, axis, self.eps)?;
        match self.momentum {
            Momentum::Batch(m) | Momentum::Running(m) if !(0.0..=1.0).contains(&m) => {
                return Err(Error::input(
                    OP,
                    format!("momentum must be in [0, 1], got {m}"),
                ))
            }
            _ => {}
        }
        Ok(layout)
    }

    /// [`Self::layout`], but a batch with no values (a zero on an axis other than the
    /// feature axis) is allowed.
    pub(crate) fn layout_allowing_empty(&self, shape: &[usize]) -> Result<ChannelLayout> {
        if shape.len() < 2 {
            return self.layout(shape);
        }
        let axis = self.resolved_axis(shape.len())?;
        let empty = shape.contains(&0) && shape[axis] > 0;
        if !empty {
            return self.layout(shape);
        }
        let probe: Vec<usize> = shape.iter().map(|&d| d.max(1)).collect();
        self.layout(&probe)?;
        Ok(ChannelLayout::new(shape, Some(axis)))
    }

    pub(crate) fn check_vector(
        &self,
        name: &str,
        t: Option<&Tensor>,
        features: u64,
        wanted: bool,
    ) -> Result<()> {
        match (t, wanted) {
            (Some(t), true) if t.shape() == [features as usize] => Ok(()),
            (Some(t), true) => Err(Error::input(
                OP,
                format!("{name} has shape {:?}, expected [{features}]", t.shape()),
            )),
            (None, false) => Ok(()),
            (None, true) => Err(Error::input(
                OP,
                format!("{name} is required (the config has it switched on)"),
            )),
            (Some(_), false) => Err(Error::input(
                OP,
                format!("{name} was given but the config has it switched off"),
            )),
        }
    }

    /// The running-average weight of the batch for a step after `num_updates` updates.
    pub fn batch_weight(&self, num_updates: u64) -> f32 {
        let n = num_updates as f64;
        let w = match self.momentum {
            Momentum::Batch(m) => f64::from(m),
            Momentum::Cumulative => 1.0 / (n + 1.0),
            Momentum::Running(m) if self.debias_momentum => {
                1.0 - f64::from(m).min(1.0 - 1.0 / (n + 1.0))
            }
            Momentum::Running(m) => 1.0 - f64::from(m),
        };
        w as f32
    }

    /// Normalizes `x` and, in [`BatchNormMode::Train`], updates `state` (in the same submission).
    /// Nothing is changed when an error is returned.
    pub fn forward(
        &self,
        ctx: &Context,
        x: &Tensor,
        gamma: Option<&Tensor>,
        beta: Option<&Tensor>,
        state: Option<&mut BatchNormState>,
        mode: BatchNormMode,
    ) -> Result<BatchNormForward> {
        with_updates_restored(state, |state| {
            ctx.run(|rec| self.record_forward(rec, x, gamma, beta, state, mode))
        })
    }

    /// Records [`Self::forward`]. `state.num_updates` is advanced when the step is
    /// recorded: submit the recording.
    pub fn record_forward(
        &self,
        rec: &mut Recording<'_>,
        x: &Tensor,
        gamma: Option<&Tensor>,
        beta: Option<&Tensor>,
        state: Option<&mut BatchNormState>,
        mode: BatchNormMode,
    ) -> Result<BatchNormForward> {
        self.record_forward_with(rec, x, gamma, beta, state, mode, None)
    }

    /// Synchronised batch norm: like [`Self::forward`] in [`BatchNormMode::Train`], but
    /// normalizing with `stats` (for example combined across devices with
    /// [`ChannelStats::combine`]) instead of this batch's own statistics.
    pub fn forward_with_stats(
        &self,
        ctx: &Context,
        x: &Tensor,
        gamma: Option<&Tensor>,
        beta: Option<&Tensor>,
        state: Option<&mut BatchNormState>,
        stats: &ChannelStats,
    ) -> Result<BatchNormForward> {
        with_updates_restored(state, |state| {
            ctx.run(|rec| {
                self.record_forward_with(
                    rec,
                    x,
                    gamma,
                    beta,
                    state,
                    BatchNormMode::Train,
                    Some(stats),
                )
            })
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn record_forward_with(
        &self,
        rec: &mut Recording<'_>,
        x: &Tensor,
        gamma: Option<&Tensor>,
        beta: Option<&Tensor>,
        state: Option<&mut BatchNormState>,
        mode: BatchNormMode,
        external: Option<&ChannelStats>,
    ) -> Result<BatchNormForward> {
        // Every check before anything is recorded or any state is touched.
        let mut tensors = vec![("x", x)];
        tensors.extend(gamma.map(|t| ("gamma", t)));
        tensors.extend(beta.map(|t| ("beta", t)));
        if let Some(st) = state.as_ref() {
            tensors.push(("running_mean", &st.running_mean));
            tensors.push(("running_var", &st.running_var));
        }
        rec.context().check_tensors(OP, &tensors)?;
        let half = |t: Option<&Tensor>| t.is_some_and(|t| t.dtype().is_half());
        if half(gamma) || half(beta) {
            // Per-feature parameters are read in f32; their gradients come back in
            // their own types (see `BatchNormForward::param_dtypes`). Their shapes are
            // checked before anything is recorded.
            let features = match external {
                Some(_) => self.layout_allowing_empty(x.shape())?,
                None => self.layout(x.shape())?,
            }
            .channels;
            self.check_vector("gamma", gamma, features, self.scale)?;
            self.check_vector("beta", beta, features, self.center)?;
            let dtypes = [gamma, beta].map(|t| t.map_or(DType::F32, Tensor::dtype));
            let g = gamma.map(|t| widened(rec, t)).transpose()?;
            let b = beta.map(|t| widened(rec, t)).transpose()?;
            let mut f =
                self.record_forward_with(rec, x, g.as_ref(), b.as_ref(), state, mode, external)?;
            f.param_dtypes = dtypes;
            return Ok(f);
        }
        // With external statistics, a rank of synchronized batch norm may hold an empty
        // batch: it still normalizes nothing and updates its running averages.
        let layout = match external {
            Some(_) => self.layout_allowing_empty(x.shape())?,
            None => self.layout(x.shape())?,
        };
        let features = layout.channels;
        self.check_vector("gamma", gamma, features, self.scale)?;
        self.check_vector("beta", beta, features, self.center)?;
        let from_batch = !self.track_running_stats || mode == BatchNormMode::Train;
        let update = self.track_running_stats && mode == BatchNormMode::Train;
        let n = layout.per_channel();
        if let Some(s) = external {
            s.check()?;
            if s.mean.len() as u64 != features || s.m2.len() as u64 != features {
                return Err(Error::input(
                    OP,
                    format!(
                        "statistics of {} features for {features} features",
                        s.mean.len()
                    ),
                ));
            }
        }
        let stats_count = external.map_or(n as f64, |s| s.count);
        if from_batch && stats_count < 2.0 {
            return Err(Error::input(
                OP,
                format!(
                    "training needs more than one value per feature to compute a variance \
                     (input shape {:?} has {stats_count})",
                    x.shape()
                ),
            ));
        }
        if self.track_running_stats {
            let Some(st) = state.as_ref() else {
                return Err(Error::input(
                    OP,
                    "running statistics are tracked but no state was given".to_string(),
                ));
            };
            for (name, t) in [
                ("running_mean", &st.running_mean),
                ("running_var", &st.running_var),
            ] {
                if t.shape() != [features as usize] {
                    return Err(Error::input(
                        OP,
                        format!("{name} has shape {:?}, expected [{features}]", t.shape()),
                    ));
                }
                if t.dtype() != DType::F32 {
                    return Err(Error::input(
                        OP,
                        format!(
                            "{name} is {}; running statistics stay f32 for inputs of any type \
                             (as in PyTorch and cuDNN)",
                            t.dtype()
                        ),
                    ));
                }
            }
        }

        let ctx = rec.context();
        let stats = if !from_batch {
            None
        } else if let Some(s) = external {
            let packed: Vec<f32> = (0..features as usize)
                .flat_map(|i| [s.mean[i] as f32, s.m2[i] as f32, s.count as f32, 0.0])
                .collect();
            Some(Tensor::from_slice(ctx, &[features as usize, 4], &packed)?)
        } else {
            let plan = ReducePlan::new(OP, layout, &ctx.limits)?;
            Some(record_welford(rec, OP, &plan, x)?)
        };
        let weight = state
            .as_ref()
            .map_or(0.0, |s| self.batch_weight(s.num_updates));
        let var_correction = match self.running_var {
            RunningVar::Unbiased => (stats_count / (stats_count - 1.0).max(1.0)) as f32,
            RunningVar::Biased => 1.0,
        };
        let scratch_mean;
        let scratch_var;
        let (rm, rv) = match state.as_ref() {
            Some(st) if self.track_running_stats => (&st.running_mean, &st.running_var),
            _ => {
                scratch_mean = ctx.scratch(OP, features)?;
                scratch_var = ctx.scratch(OP, features)?;
                (&scratch_mean, &scratch_var)
            }
        };
        let norm = vec4_buffer(ctx, OP, features)?;
        let dummy = &*ctx.dummy;
        let fixed = PerSlice::Fixed(Bind::elems(dummy, 4));
        let gamma_bind = gamma.map_or(fixed, |g| PerSlice::Values(g, 1));
        let beta_bind = beta.map_or(fixed, |b| PerSlice::Values(b, 1));
        // Evaluation with running statistics in one pass over x where the adapter gains
        // from it (`Tuning::one_pass_eval`): the normalizing threads compute each
        // feature's factors and write `norm` for the backward.
        let one_pass = !from_batch && layout.len() > 0 && ctx.limits.tuning.one_pass_eval;
        if !one_pass {
            record_per_slice(
                rec,
                Kernel::BnFinalize,
                features,
                |n| FinalizeParams {
                    features: n as u32,
                    from_batch: from_batch as u32,
                    update: update as u32,
                    has_gamma: gamma.is_some() as u32,
                    has_beta: beta.is_some() as u32,
                    eps: self.eps,
                    weight,
                    var_correction,
                },
                &[
                    stats.as_ref().map_or(fixed, |s| PerSlice::Values(s, 4)),
                    gamma_bind,
                    beta_bind,
                    PerSlice::Values(rm, 1),
                    PerSlice::Values(rv, 1),
                    PerSlice::Values(&norm, 4),
                ],
            )?;
        }
        let output = rec.output(OP, x.shape(), x.dtype())?;
        if one_pass {
            record_elementwise(
                rec,
                Kernel::BnNormalizeRunning,
                &layout,
                &[x],
                &[
                    PerSlice::Values(rm, 1),
                    PerSlice::Values(rv, 1),
                    gamma_bind,
                    beta_bind,
                    PerSlice::Values(&norm, 4),
                ],
                &output,
                Extra {
                    flag: u32::from(gamma.is_some()) | u32::from(beta.is_some()) << 1,
                    aux: [self.eps, 0.0],
                    ..Extra::default()
                },
            )?;
        } else if layout.len() > 0 {
            record_elementwise(
                rec,
                Kernel::BnNormalize,
                &layout,
                &[x],
                &[PerSlice::Values(&norm, 4)],
                &output,
                Extra::default(),
            )?;
        }
        if update {
            if let Some(st) = state {
                st.num_updates += 1;
            }
        }
        Ok(BatchNormForward {
            output,
            norm,
            from_batch,
            shape: x.shape().to_vec(),
            param_dtypes: [DType::F32; 2],
        })
    }

    /// Gradients with respect to the input (through the batch statistics when the
    /// forward used them), gamma and beta: `(grad_input, grad_gamma, grad_beta)`.
    pub fn backward(
        &self,
        ctx: &Context,
        x: &Tensor,
        grad_output: &Tensor,
        forward: &BatchNormForward,
    ) -> Result<BatchNormGrads> {
        ctx.run(|rec| self.record_backward(rec, x, grad_output, forward))
    }

    /// Records [`Self::backward`].
    pub fn record_backward(
        &self,
        rec: &mut Recording<'_>,
        x: &Tensor,
        grad_output: &Tensor,
        forward: &BatchNormForward,
    ) -> Result<BatchNormGrads> {
        // An empty batch only comes from synchronized batch norm's external statistics.
        self.layout(x.shape())?;
        let layout = self.check_backward(rec.context(), x, grad_output, forward)?;
        let ctx = rec.context();
        let features = layout.channels;
        let plan = ReducePlan::new(OP, layout, &ctx.limits)?;
        let sums = record_sums(rec, OP, &plan, grad_output, x, Some(&forward.norm))?;
        // Every feature's gradients are written by grad_factors: pooled, not zeroed.
        let grad_gamma = Tensor::output(ctx, &[features as usize])?;
        let grad_beta = Tensor::output(ctx, &[features as usize])?;
        let coef = vec4_buffer(ctx, OP, features)?;
        let inv_n = 1.0 / layout.per_channel() as f64;
        let out = [&grad_gamma, &grad_beta, &coef];
        record_grad_factors(rec, forward, &sums, inv_n, out)?;
        let grad_input = rec.output(OP, x.shape(), x.dtype())?;
        record_grad_input(rec, &layout, x, grad_output, &coef, &grad_input)?;
        forward.param_grads(rec, grad_input, grad_gamma, grad_beta)
    }

    /// Checks a backward's tensors against the forward's; the layout of `x` (empty
    /// batches allowed: a rank of synchronized batch norm may hold none).
    fn check_backward(
        &self,
        ctx: &Context,
        x: &Tensor,
        grad_output: &Tensor,
        forward: &BatchNormForward,
    ) -> Result<ChannelLayout> {
        ctx.check_tensors(
            OP,
            &[
                ("x", x),
                ("grad_output", grad_output),
                ("output", &forward.output),
            ],
        )?;
        let layout = self.layout_allowing_empty(x.shape())?;
        check_grad_dtype(OP, "grad_output", grad_output.dtype(), "x", x.dtype())?;
        if x.shape() != forward.shape.as_slice() || grad_output.shape() != x.shape() {
            return Err(Error::input(
                OP,
                format!(
                    "backward needs the forward's input shape {:?} for x and grad_output, got {:?} and {:?}",
                    forward.shape,
                    x.shape(),
                    grad_output.shape()
                ),
            ));
        }
        Ok(layout)
    }

    /// This batch's per-feature `(sum dy, sum dy (x - mean))` with the forward's mean,
    /// downloaded in f64: what synchronized batch norm sums over ranks.
    pub(crate) fn local_grad_sums(
        &self,
        ctx: &Context,
        x: &Tensor,
        grad_output: &Tensor,
        forward: &BatchNormForward,
    ) -> Result<Vec<[f64; 2]>> {
        let layout = self.check_backward(ctx, x, grad_output, forward)?;
        if layout.len() == 0 {
            return Ok(vec![[0.0; 2]; layout.channels as usize]);
        }
        let sums = ctx.run(|rec| {
            let plan = ReducePlan::new(OP, layout, &ctx.limits)?;
            record_sums(rec, OP, &plan, grad_output, x, Some(&forward.norm))
        })?;
        let host = read_vec4(ctx, &sums, layout.channels)?;
        Ok(host
            .outer_iter()
            .map(|r| [f64::from(r[0]), f64::from(r[1])])
            .collect())
    }

    /// The backward of a batch whose sums over the whole (distributed) batch are
    /// `sums.global`, of `sums.count` values per feature: `grad_input` from them;
    /// `grad_gamma` and `grad_beta` from this batch's `sums.local` (summed over ranks by the
    /// caller's data parallelism, as PyTorch's `SyncBatchNorm` leaves them).
    pub(crate) fn backward_with_sums(
        &self,
        ctx: &Context,
        x: &Tensor,
        grad_output: &Tensor,
        forward: &BatchNormForward,
        sums: &DistributedSums<'_>,
    ) -> Result<BatchNormGrads> {
        let DistributedSums {
            local,
            global,
            count,
        } = *sums;
        let layout = self.check_backward(ctx, x, grad_output, forward)?;
        let features = layout.channels as usize;
        if local.len() != features || global.len() != features || count.is_nan() || count < 1.0 {
            return Err(Error::input(
                OP,
                format!(
                    "sums of {} and {} features and a count of {count} for {features} features",
                    local.len(),
                    global.len()
                ),
            ));
        }
        let upload = |sums: &[[f64; 2]]| {
            let flat: Vec<f32> = sums
                .iter()
                .flat_map(|s| [s[0] as f32, s[1] as f32, 0.0, 0.0])
                .collect();
            Tensor::from_slice(ctx, &[features, 4], &flat)
        };
        let (local, global) = (upload(local)?, upload(global)?);
        ctx.run(|rec| {
            let f = layout.channels;
            let grad_gamma = Tensor::output(ctx, &[features])?;
            let grad_beta = Tensor::output(ctx, &[features])?;
            let (unused_gamma, unused_beta) = (ctx.scratch(OP, f)?, ctx.scratch(OP, f)?);
            let (coef, unused_coef) = (vec4_buffer(ctx, OP, f)?, vec4_buffer(ctx, OP, f)?);
            let inv_n = 1.0 / count;
            let local_out = [&grad_gamma, &grad_beta, &unused_coef];
            record_grad_factors(rec, forward, &local, inv_n, local_out)?;
            let global_out = [&unused_gamma, &unused_beta, &coef];
            record_grad_factors(rec, forward, &global, inv_n, global_out)?;
            let grad_input = rec.output(OP, x.shape(), x.dtype())?;
            if layout.len() > 0 {
                record_grad_input(rec, &layout, x, grad_output, &coef, &grad_input)?;
            }
            forward.param_grads(rec, grad_input, grad_gamma, grad_beta)
        })
    }

    /// This batch's per-feature statistics, downloaded (for [`ChannelStats::combine`]
    /// across devices and [`Self::forward_with_stats`]).
    pub fn batch_statistics(&self, ctx: &Context, x: &Tensor) -> Result<ChannelStats> {
        ctx.check_tensors(OP, &[("x", x)])?;
        let layout = self.layout(x.shape())?;
        let stats = ctx.run(|rec| {
            let plan = ReducePlan::new(OP, layout, &ctx.limits)?;
            record_welford(rec, OP, &plan, x)
        })?;
        let host = read_vec4(ctx, &stats, layout.channels)?;
        Ok(ChannelStats {
            count: layout.per_channel() as f64,
            mean: host.outer_iter().map(|r| f64::from(r[0])).collect(),
            m2: host.outer_iter().map(|r| m2_of(r[1], r[3])).collect(),
        })
    }

    /// GoMLX's `UpdateAverages`: [`BatchNormState::reset_weights`], then a training
    /// step's running update for every batch of `one_epoch` (outputs discarded, gamma
    /// and beta not needed). With [`BatchNorm::gomlx`]'s debiased momentum the
    /// averages become GoMLX's exactly: the first update replaces them, the next ones
    /// average the batch means and the batch (biased) variances with equal weight per
    /// batch until `1 / n` falls below `1 - momentum`, then the moving average goes on.
    /// All or nothing: `state` changes only when every batch succeeded. For the exact
    /// statistics of every value instead, see [`Self::population`].
    pub fn update_averages<'a>(
        &self,
        ctx: &Context,
        state: &mut BatchNormState,
        one_epoch: impl IntoIterator<Item = &'a Tensor>,
    ) -> Result<()> {
        // Copies on the GPU (no round trip through the host).
        let copy = |t: &Tensor| -> Result<Tensor> {
            let c = Tensor::output(ctx, t.shape())?;
            ctx.run(|rec| rec.copy_tensor(t, &c))?;
            Ok(c)
        };
        let mut work = BatchNormState {
            running_mean: copy(&state.running_mean)?,
            running_var: copy(&state.running_var)?,
            num_updates: state.num_updates,
        };
        work.reset_weights();
        let stats_only = BatchNorm {
            scale: false,
            center: false,
            track_running_stats: true,
            ..*self
        };
        for x in one_epoch {
            stats_only.forward(ctx, x, None, None, Some(&mut work), BatchNormMode::Train)?;
        }
        *state = work;
        Ok(())
    }

    /// Recomputing the averages exactly: a population accumulator that merges each
    /// batch's statistics with Chan's combine, on the GPU; [`PopulationStats::finish`]
    /// writes the mean and variance of every value seen (pooled, not an average of
    /// batch statistics) into the running state. Not GoMLX's `UpdateAverages` (see
    /// [`Self::update_averages`]): the exact population statistics, whatever the
    /// batch sizes.
    pub fn population(&self, ctx: &Context, features: usize) -> Result<PopulationStats> {
        Ok(PopulationStats {
            config: *self,
            features,
            // Zeroed: the merge reads it (an empty accumulator has count 0).
            acc: Tensor::zeros(ctx, &[features, 4])?,
        })
    }
}

/// The sums a distributed backward uses: this batch's `(sum dy, sum dy (x - mean))`
/// per feature, the same summed over every rank, and the values per feature in all.
#[derive(Clone, Copy)]
pub(crate) struct DistributedSums<'a> {
    pub local: &'a [[f64; 2]],
    pub global: &'a [[f64; 2]],
    pub count: f64,
}

/// `grad_factors`: `out` = (grad_gamma, grad_beta, coef) from per-feature `sums`
/// `(sum dy, sum dy (x - mean))` over `1 / inv_n` values.
fn record_grad_factors(
    rec: &mut Recording<'_>,
    forward: &BatchNormForward,
    sums: &Tensor,
    inv_n: f64,
    out: [&Tensor; 3],
) -> Result<()> {
    let features = forward.norm.len() as u64 / 4;
    record_per_slice(
        rec,
        Kernel::BnGradFactors,
        features,
        |n| GradParams {
            features: n as u32,
            training: forward.from_batch as u32,
            inv_n: inv_n as f32,
            _pad: 0,
        },
        &[
            PerSlice::Values(&forward.norm, 4),
            PerSlice::Values(sums, 4),
            PerSlice::Values(out[0], 1),
            PerSlice::Values(out[1], 1),
            PerSlice::Values(out[2], 4),
        ],
    )
}

/// `grad_input`: dx = k1 (dy - k2 - (x - mean) k3) with `coef` per feature.
fn record_grad_input(
    rec: &mut Recording<'_>,
    layout: &ChannelLayout,
    x: &Tensor,
    grad_output: &Tensor,
    coef: &Tensor,
    grad_input: &Tensor,
) -> Result<()> {
    record_elementwise(
        rec,
        Kernel::BnGradInput,
        layout,
        &[x, grad_output],
        &[PerSlice::Values(coef, 4)],
        grad_input,
        Extra::default(),
    )
}

/// Exact population statistics accumulated over any number of batches.
pub struct PopulationStats {
    config: BatchNorm,
    features: usize,
    acc: Tensor,
}

impl PopulationStats {
    /// Merges the statistics of batch `x` (same feature axis and count).
    pub fn add(&mut self, ctx: &Context, x: &Tensor) -> Result<()> {
        ctx.check_tensors(OP, &[("x", x)])?;
        let layout = self.config.layout(x.shape())?;
        if layout.channels != self.features as u64 {
            return Err(Error::input(
                OP,
                format!(
                    "a batch of {} features for an accumulator of {}",
                    layout.channels, self.features
                ),
            ));
        }
        ctx.run(|rec| {
            let plan = ReducePlan::new(OP, layout, &ctx.limits)?;
            let stats = record_welford(rec, OP, &plan, x)?;
            record_per_slice(
                rec,
                Kernel::BnMerge,
                layout.channels,
                |n| MergeParams {
                    features: n as u32,
                    _pad: [0; 3],
                },
                &[PerSlice::Values(&stats, 4), PerSlice::Values(&self.acc, 4)],
            )
        })
    }

    /// Writes the population mean and variance (unbiased or biased as the config says)
    /// into `state`, replacing the exponential averages.
    pub fn finish(&self, ctx: &Context, state: &mut BatchNormState) -> Result<()> {
        ctx.check_tensors(
            OP,
            &[
                ("running_mean", &state.running_mean),
                ("running_var", &state.running_var),
            ],
        )?;
        let f = self.features;
        if state.running_mean.shape() != [f] || state.running_var.shape() != [f] {
            return Err(Error::input(OP, format!("state is not of {f} features")));
        }
        let host = read_vec4(ctx, &self.acc, f as u64)?;
        let mut mean = Vec::with_capacity(f);
        let mut var = Vec::with_capacity(f);
        for r in host.outer_iter() {
            let n = f64::from(r[2]);
            if n < 2.0 {
                return Err(Error::input(
                    OP,
                    "no batches were added to the population".to_string(),
                ));
            }
            mean.push(r[0]);
            let d = match self.config.running_var {
                RunningVar::Unbiased => n - 1.0,
                RunningVar::Biased => n,
            };
            var.push((m2_of(r[1], r[3]) / d) as f32);
        }
        state.running_mean = Tensor::from_slice(ctx, &[f], &mean)?;
        state.running_var = Tensor::from_slice(ctx, &[f], &var)?;
        Ok(())
    }
}

/// A Welford state's `m2` from the GPU: in units of 2^140 when its flag is set (sums
/// of squares that reached 2^64, `shaders/shared/welford.wgsl`).
fn m2_of(m2: f32, scaled: f32) -> f64 {
    if scaled != 0.0 {
        f64::from(m2) * 2f64.powi(140)
    } else {
        f64::from(m2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_mirror_the_wgsl_structs() {
        use crate::gpu::kernels::mirror;
        mirror!(
            "batch_norm",
            FinalizeParams,
            [
                features,
                from_batch,
                update,
                has_gamma,
                has_beta,
                eps,
                weight,
                var_correction
            ]
        );
        mirror!("batch_norm", GradParams, [features, training, inv_n]);
        mirror!("batch_norm", MergeParams, [features]);
    }
}
