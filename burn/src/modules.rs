//! burn modules on wgnorm's kernels: the three weight normalizations as burn
//! reparameterizations of a weight (PyTorch's parametrizations: `weight.val()` of
//! burn's own `Conv2d`, `Linear`, ... returns the normalized weight, the state lives in
//! the module's record) and a batch norm whose record is `burn::nn::BatchNorm`'s.

use std::cell::RefCell;
use std::rc::Rc;

use burn::config::Config;
use burn::module::{Flag, Module, Param, Reparameterization, Reparameterizer, RunningState};
use burn::tensor::{Device, Tensor};
use wgnorm::{BatchNormMode, BatchNormState, Recording, SpectralNormState};

use crate::autodiff::{primitive, wgpu_device};
use crate::{Error, Shared};

/// The [`Shared`] of a burn tensor's device.
fn shared_of<const D: usize>(t: &Tensor<D>) -> crate::Result<std::sync::Arc<Shared>> {
    let (prim, _) = primitive(t.clone())?;
    Shared::of(&wgpu_device(&prim)?)
}

/// A wgnorm view of any f32 burn tensor (an autodiff one's inner tensor).
fn view_of<const D: usize>(shared: &Shared, t: &Tensor<D>) -> crate::Result<wgnorm::Tensor> {
    let (prim, _) = primitive(t.clone())?;
    shared.view_primitive(&prim, &t.dims())
}

/// New burn tensors holding copies of `sources` (on their devices, by a GPU copy): the
/// state an op then updates in place, so that no burn tensor is ever written behind
/// burn's back (a record or an earlier output may still hold the old ones).
fn copies<const N: usize>(
    shared: &Shared,
    sources: [&Tensor<1>; N],
) -> crate::Result<[Tensor<1>; N]> {
    let out: [Tensor<1>; N] =
        std::array::from_fn(|i| Tensor::<1>::empty(sources[i].dims(), &sources[i].device()));
    let mut rec = Recording::new(&shared.ctx);
    for (src, dst) in sources.iter().zip(&out) {
        rec.copy_tensor(&view_of(shared, src)?, &view_of(shared, dst)?)?;
    }
    rec.submit()?;
    Ok(out)
}

/// burn's `Reparameterization::apply` has no error path: a failure there is a bug, a
/// lost device or a weight the reparameterization was not made for, and the panic
/// names the op (what burn's own modules do with a wrong shape).
fn or_panic<T>(op: &str, r: crate::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{op}: {e}"))
}

/// Whether a reparameterization or batch norm trains: burn's rule (`burn::nn::BatchNorm`,
/// `Dropout`): an autodiff device and the module's training flag, which `valid()`
/// turns off and `train()` restores.
fn training<const D: usize>(flag: &Param<Flag>, x: &Tensor<D>) -> bool {
    flag.is_enabled() && x.device().is_autodiff()
}

// ---------------------------------------------------------------------------------
// Spectral normalization.

/// Spectral normalization of a weight as a burn reparameterization: PyTorch's
/// `torch.nn.utils.parametrizations.spectral_norm` (`wgnorm::SpectralNorm::pytorch()`
/// by default: one power iteration per training forward, `eps = 1e-12`, `dim = 0`),
/// `weight.val() = W / sigma` on wgnorm's kernels, with the weight's gradient from
/// wgnorm's backward kernel. `u` and `v` (PyTorch's `_u`, `_v`) are running state in
/// the module's record; in training (an autodiff device and the training flag on) each
/// `val()` runs the power iteration and keeps the new `u`, `v`; in evaluation they are
/// used as stored. Attach it with [`with_spectral_norm`].
#[derive(Module, Debug)]
pub struct SpectralNormReparam {
    /// The left singular vector estimate, length `W.shape[axis]`.
    pub u: RunningState<Tensor<1>>,
    /// The right singular vector estimate, length `W.numel() / W.shape[axis]`.
    pub v: RunningState<Tensor<1>>,
    /// Whether the power iteration runs (burn's `valid()` turns it off).
    pub training: Param<Flag>,
    /// The normalization (PyTorch's flavour; Chainer's runs too, without `use_gamma`).
    #[module(skip)]
    pub config: wgnorm::SpectralNorm,
}

impl Reparameterization for SpectralNormReparam {
    const NAME: &'static str = "spectral_norm";

    fn apply<const D: usize>(&self, base: Tensor<D>) -> Tensor<D> {
        or_panic("spectral_norm", self.try_apply(base))
    }
}

impl SpectralNormReparam {
    /// [`Reparameterization::apply`] with its error: the state changes only on `Ok`.
    pub fn try_apply<const D: usize>(&self, base: Tensor<D>) -> crate::Result<Tensor<D>> {
        let shared = shared_of(&base)?;
        let (u, v) = (self.u.value_sync(), self.v.value_sync());
        let train = training(&self.training, &base);
        let (u, v) = if train {
            let [u, v] = copies(&shared, [&u, &v])?;
            (u, v)
        } else {
            (u, v)
        };
        let mut state = SpectralNormState {
            u: view_of(&shared, &u)?,
            v: view_of(&shared, &v)?,
            gamma: None,
            sigma: None,
        };
        let out = crate::spectral_norm(&self.config, base, &mut state, train)?;
        if train {
            self.u.update(u);
            self.v.update(v);
        }
        Ok(out)
    }
}

/// Which weights a reparameterizer takes: given a parameter's module path (for
/// example `"conv1.weight"`) and its shape.
pub type Select<'a> = Box<dyn FnMut(&str, &[usize]) -> bool + 'a>;

/// The reparameterizers keep the first error here: burn's `Reparameterizer` has no
/// error path, and [`with_spectral_norm`] and the others return it.
type FirstError = Rc<RefCell<Option<Error>>>;

/// The reparameterization, or none with its error kept in `slot` (the first one wins).
fn kept<R>(slot: &FirstError, r: crate::Result<R>) -> Option<R> {
    r.map_err(|e| {
        slot.borrow_mut().get_or_insert(e);
    })
    .ok()
}

struct SpectralNormWeights<'a> {
    config: wgnorm::SpectralNorm,
    seed: u64,
    select: Select<'a>,
    error: FirstError,
}

impl Reparameterizer for SpectralNormWeights<'_> {
    type Reparam = SpectralNormReparam;

    fn reparameterize<const D: usize>(
        &mut self,
        path: &str,
        param: Param<Tensor<D>>,
    ) -> (Param<Tensor<D>>, Option<SpectralNormReparam>) {
        if self.error.borrow().is_some() || !(self.select)(path, &param.shape().dims::<D>()) {
            return (param, None);
        }
        self.seed = self.seed.wrapping_add(1);
        let config = self.config;
        let reparam = self
            .state_for(&param.val())
            .map(|(u, v)| SpectralNormReparam {
                u: RunningState::new(u),
                v: RunningState::new(v),
                training: Param::from_bool(true),
                config,
            });
        (param, kept(&self.error, reparam))
    }
}

impl SpectralNormWeights<'_> {
    /// `u` and `v` for `weight` as burn tensors on its device: wgnorm's `init_state`
    /// (PyTorch's: normalized normal vectors and 15 power iterations), copied on the GPU.
    fn state_for<const D: usize>(
        &self,
        weight: &Tensor<D>,
    ) -> crate::Result<(Tensor<1>, Tensor<1>)> {
        let shared = shared_of(weight)?;
        let w = view_of(&shared, weight)?;
        let state = self.config.init_state(&shared.ctx, &w, self.seed)?;
        let device = weight.device();
        let u = Tensor::<1>::empty([state.u.shape()[0]], &device);
        let v = Tensor::<1>::empty([state.v.shape()[0]], &device);
        let mut rec = Recording::new(&shared.ctx);
        rec.copy_tensor(&state.u, &view_of(&shared, &u)?)?;
        rec.copy_tensor(&state.v, &view_of(&shared, &v)?)?;
        rec.submit()?;
        Ok((u, v))
    }
}

/// `module` with spectral normalization on every float parameter `select` takes
/// (its path and shape), PyTorch's `spectral_norm(module, name)` for each: `u` and `v`
/// start as wgnorm's `init_state` makes them from `seed` (one seed per weight, in
/// traversal order). `config` must not use gamma (`use_gamma`: Chainer's learned
/// scale is not a burn parameter here). Errors: a weight wgnorm refuses, or a device
/// [`Shared::of`] cannot reach; the module is then returned to no one.
pub fn with_spectral_norm<M: Module>(
    module: M,
    config: wgnorm::SpectralNorm,
    seed: u64,
    select: impl FnMut(&str, &[usize]) -> bool,
) -> crate::Result<M> {
    if config.use_gamma {
        return Err(Error::Burn(
            "spectral_norm: use_gamma is not supported as a burn reparameterization".into(),
        ));
    }
    apply_collecting(module, |error| SpectralNormWeights {
        config,
        seed,
        select: Box::new(select),
        error,
    })
}

/// `module` with the reparameterizer `make(error slot)` applied: the first error it
/// kept (burn's `Reparameterizer` has no error path) instead of the module.
fn apply_collecting<M: Module, R: Reparameterizer>(
    module: M,
    make: impl FnOnce(FirstError) -> R,
) -> crate::Result<M> {
    let error = FirstError::default();
    let module = module.apply_reparameterization(make(error.clone()));
    let first = error.borrow_mut().take();
    match first {
        Some(e) => Err(e),
        None => Ok(module),
    }
}

// ---------------------------------------------------------------------------------
// Weight normalization.

/// Weight normalization of a weight as a burn reparameterization: PyTorch's
/// `torch.nn.utils.parametrizations.weight_norm(module, dim=axis)`, `weight.val() =
/// g * v / ||v||` on wgnorm's kernels, where the stored weight is `v` (PyTorch's
/// `original1`) and `g` (`original0`, one per slice of `axis`, kept as a vector) is a
/// trained parameter of this module. Both get gradients from wgnorm's backward
/// kernel. Attach it with [`with_weight_norm`].
#[derive(Module, Debug)]
pub struct WeightNormReparam {
    /// The magnitudes, one per slice of `axis`; start as the weight's norms.
    pub g: Param<Tensor<1>>,
    /// The axis kept (PyTorch's `dim`; default 0).
    pub axis: usize,
}

impl Reparameterization for WeightNormReparam {
    const NAME: &'static str = "weight_norm";

    fn apply<const D: usize>(&self, base: Tensor<D>) -> Tensor<D> {
        or_panic("weight_norm", self.try_apply(base))
    }
}

impl WeightNormReparam {
    /// [`Reparameterization::apply`] with its error.
    pub fn try_apply<const D: usize>(&self, base: Tensor<D>) -> crate::Result<Tensor<D>> {
        let g = self.g.val();
        let mut shape = [1usize; D];
        if self.axis >= D || base.dims()[self.axis] != g.dims()[0] {
            return Err(Error::Burn(format!(
                "weight_norm: g has {} elements, the weight {:?} on axis {}",
                g.dims()[0],
                base.dims(),
                self.axis
            )));
        }
        shape[self.axis] = g.dims()[0];
        let wn = wgnorm::WeightNorm::pytorch(Some(self.axis));
        crate::weight_norm(&wn, g.reshape(shape), base)
    }
}

struct WeightNormWeights<'a> {
    axis: usize,
    select: Select<'a>,
    error: FirstError,
}

impl Reparameterizer for WeightNormWeights<'_> {
    type Reparam = WeightNormReparam;

    fn reparameterize<const D: usize>(
        &mut self,
        path: &str,
        param: Param<Tensor<D>>,
    ) -> (Param<Tensor<D>>, Option<WeightNormReparam>) {
        let dims = param.shape().dims::<D>();
        if self.error.borrow().is_some() || !(self.select)(path, &dims) {
            return (param, None);
        }
        let axis = self.axis;
        let reparam = self.norms(&param.val()).map(|g| WeightNormReparam {
            g: Param::from_tensor(g),
            axis,
        });
        (param, kept(&self.error, reparam))
    }
}

impl WeightNormWeights<'_> {
    /// The weight's norms (PyTorch's initial `g`), by wgnorm's `decompose`.
    fn norms<const D: usize>(&self, weight: &Tensor<D>) -> crate::Result<Tensor<1>> {
        if self.axis >= D {
            return Err(Error::Burn(format!(
                "weight_norm: axis {} of a weight of rank {D}",
                self.axis
            )));
        }
        let shared = shared_of(weight)?;
        let w = view_of(&shared, weight)?;
        let wn = wgnorm::WeightNorm::pytorch(Some(self.axis));
        let slices = weight.dims()[self.axis];
        let g = Tensor::<1>::empty([slices], &weight.device());
        // wgnorm's g is [1, .., slices, .., 1]: the same elements as burn's vector.
        let mut shape = [1usize; D];
        shape[self.axis] = slices;
        let gv = shared.view_primitive(&primitive(g.clone())?.0, &shape)?;
        shared.ctx.run(|rec| {
            let p = wn.record_decompose(rec, &w)?;
            rec.copy_tensor(&p.g, &gv)
        })?;
        Ok(g)
    }
}

/// `module` with weight normalization on every float parameter `select` takes, PyTorch's
/// `weight_norm(module, name, dim=axis)` for each: the stored weight becomes `v` and a
/// new parameter `g` starts as its norms, so the weight is unchanged until training.
pub fn with_weight_norm<M: Module>(
    module: M,
    axis: usize,
    select: impl FnMut(&str, &[usize]) -> bool,
) -> crate::Result<M> {
    apply_collecting(module, |error| WeightNormWeights {
        axis,
        select: Box::new(select),
        error,
    })
}

// ---------------------------------------------------------------------------------
// Weight standardization.

/// Weight standardization of a weight as a burn reparameterization (Chainer's
/// `link_hooks.WeightStandardization`, `wgnorm::WeightStandardization::chainer()` by
/// default; labml.ai's with `labml()`): `weight.val()` is the standardized weight, with
/// its gradient from wgnorm's backward kernel. No state. Attach it with
/// [`with_weight_standardization`].
#[derive(Module, Debug)]
pub struct WeightStandardizationReparam {
    /// The standardization.
    #[module(skip)]
    pub config: wgnorm::WeightStandardization,
}

impl Reparameterization for WeightStandardizationReparam {
    const NAME: &'static str = "weight_standardization";

    fn apply<const D: usize>(&self, base: Tensor<D>) -> Tensor<D> {
        or_panic(
            "weight_standardization",
            crate::weight_standardization(&self.config, base),
        )
    }
}

struct WeightStandardizationWeights<'a> {
    config: wgnorm::WeightStandardization,
    select: Select<'a>,
}

impl Reparameterizer for WeightStandardizationWeights<'_> {
    type Reparam = WeightStandardizationReparam;

    fn reparameterize<const D: usize>(
        &mut self,
        path: &str,
        param: Param<Tensor<D>>,
    ) -> (Param<Tensor<D>>, Option<WeightStandardizationReparam>) {
        if !(self.select)(path, &param.shape().dims::<D>()) {
            return (param, None);
        }
        let config = self.config;
        (param, Some(WeightStandardizationReparam { config }))
    }
}

/// `module` with weight standardization on every float parameter `select` takes (as
/// Chainer's hook on a link's `W`).
pub fn with_weight_standardization<M: Module>(
    module: M,
    config: wgnorm::WeightStandardization,
    select: impl FnMut(&str, &[usize]) -> bool,
) -> M {
    module.apply_reparameterization(WeightStandardizationWeights {
        config,
        select: Box::new(select),
    })
}

// ---------------------------------------------------------------------------------
// Batch normalization.

/// [`BatchNorm`]'s configuration: `burn::nn::BatchNormConfig`'s fields and defaults.
#[derive(Config, Debug)]
pub struct BatchNormConfig {
    /// The number of features (axis 1 of the input). Must be greater than zero.
    pub num_features: usize,
    /// Added to the variance. Default 1e-5 (burn's and PyTorch's).
    #[config(default = 1e-5)]
    pub epsilon: f64,
    /// The weight of the new batch in the running averages. Default 0.1.
    #[config(default = 0.1)]
    pub momentum: f64,
}

impl BatchNormConfig {
    /// A batch norm as `burn::nn::BatchNormConfig::init` makes it: gamma 1, beta 0,
    /// running mean 0, running variance 1, training on. Errors (never a panic) for no
    /// features or an epsilon or momentum burn refuses.
    pub fn init(&self, device: &Device) -> crate::Result<BatchNorm> {
        let n = self.num_features;
        if n == 0 || !(self.epsilon.is_finite() && self.epsilon > 0.0) {
            return Err(Error::Burn(format!(
                "batch_norm: num_features must be positive and epsilon finite and positive, \
                 got {n} and {}",
                self.epsilon
            )));
        }
        if !(self.momentum.is_finite() && (0.0..=1.0).contains(&self.momentum)) {
            return Err(Error::Burn(format!(
                "batch_norm: momentum must be within [0, 1], got {}",
                self.momentum
            )));
        }
        Ok(BatchNorm {
            gamma: Param::from_tensor(Tensor::ones([n], device)),
            beta: Param::from_tensor(Tensor::zeros([n], device)),
            training: Param::from_bool(true),
            running_mean: RunningState::new(Tensor::zeros([n], device)),
            running_var: RunningState::new(Tensor::ones([n], device)),
            momentum: self.momentum,
            epsilon: self.epsilon,
        })
    }
}

/// A replacement for `burn::nn::BatchNorm` on wgnorm's kernels: the same fields, so the
/// same record (`gamma`, `beta`, `running_mean`, `running_var`; a burn checkpoint loads
/// with `load_record`), and burn's semantics: features on axis 1; training (an
/// autodiff device and the training flag on) normalizes with the batch statistics and
/// updates the running averages with `momentum` weighting the batch and the **biased**
/// batch variance (burn's rule; PyTorch's is unbiased); otherwise the running
/// statistics are used. Gradients of the input, gamma and beta come from wgnorm's
/// backward kernels. Convert a burn module with `From`.
#[derive(Module, Debug)]
pub struct BatchNorm {
    /// The learnable scale gamma.
    pub gamma: Param<Tensor<1>>,
    /// The learnable offset beta.
    pub beta: Param<Tensor<1>>,
    /// Whether training behaviour is enabled for this layer.
    pub training: Param<Flag>,
    /// The running mean.
    pub running_mean: RunningState<Tensor<1>>,
    /// The running variance (biased, as burn keeps it).
    pub running_var: RunningState<Tensor<1>>,
    /// The weight of the new batch in the running averages (burn's default 0.1).
    pub momentum: f64,
    /// Added to the variance (burn's default 1e-5).
    pub epsilon: f64,
}

impl From<burn::nn::BatchNorm> for BatchNorm {
    fn from(bn: burn::nn::BatchNorm) -> Self {
        BatchNorm {
            gamma: bn.gamma,
            beta: bn.beta,
            training: bn.training,
            running_mean: bn.running_mean,
            running_var: bn.running_var,
            momentum: bn.momentum,
            epsilon: bn.epsilon,
        }
    }
}

impl BatchNorm {
    /// wgnorm's batch norm with this layer's hyperparameters and burn's conventions.
    pub fn config(&self) -> wgnorm::BatchNorm {
        wgnorm::BatchNorm {
            eps: self.epsilon as f32,
            momentum: wgnorm::Momentum::Batch(self.momentum as f32),
            running_var: wgnorm::RunningVar::Biased,
            ..wgnorm::BatchNorm::pytorch()
        }
    }

    /// The forward pass, `burn::nn::BatchNorm::forward`'s signature: panics where
    /// [`Self::try_forward`] returns an error (as burn's does on a wrong shape).
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        or_panic("batch_norm", self.try_forward(input))
    }

    /// The forward pass. Input `[batch, num_features, ...]`; the running statistics
    /// change only if it returns `Ok`.
    pub fn try_forward<const D: usize>(&self, input: Tensor<D>) -> crate::Result<Tensor<D>> {
        let shared = shared_of(&input)?;
        let bn = self.config();
        let (mean, var) = (
            self.running_mean.value_sync(),
            self.running_var.value_sync(),
        );
        let train = training(&self.training, &input);
        let (mean, var) = if train {
            let [m, v] = copies(&shared, [&mean, &var])?;
            (m, v)
        } else {
            (mean, var)
        };
        let mut state = BatchNormState {
            running_mean: view_of(&shared, &mean)?,
            running_var: view_of(&shared, &var)?,
            num_updates: 0,
        };
        let mode = if train {
            BatchNormMode::Train
        } else {
            BatchNormMode::Eval
        };
        let out = crate::batch_norm(
            &bn,
            input,
            self.gamma.val(),
            self.beta.val(),
            &mut state,
            mode,
        )?;
        if train {
            self.running_mean.update(mean);
            self.running_var.update(var);
        }
        Ok(out)
    }
}
