//! The four weight normalizations as hooks.

use super::{HookArgs, WeightHook};
use crate::error::{Error, Result};
use crate::gpu::{Context, Recording, Tensor};
use crate::ops::spectral_norm::{SpectralNorm, SpectralNormOutput, SpectralNormState};
use crate::ops::weight_norm::WeightNorm;
use crate::ops::weight_standardization::WeightStandardization;

/// Weight Standardization as a hook (Chainer's `link_hooks.WeightStandardization`).
/// Stateless, so it can also be registered globally.
#[derive(Clone, Copy, Debug, Default)]
pub struct WeightStandardizationHook(pub WeightStandardization);

impl WeightHook for WeightStandardizationHook {
    fn name(&self) -> &str {
        "weight_standardization"
    }

    fn is_transform(&self) -> bool {
        true
    }

    fn record_forward(
        &mut self,
        rec: &mut Recording<'_>,
        input: &Tensor,
        _args: &HookArgs<'_>,
    ) -> Result<Option<Tensor>> {
        self.0.record_forward(rec, input).map(Some)
    }

    fn record_backward(
        &mut self,
        rec: &mut Recording<'_>,
        input: &Tensor,
        grad: &Tensor,
    ) -> Result<Tensor> {
        self.0.record_backward(rec, input, grad)
    }
}

/// Spectral Normalization as a hook (Chainer's `link_hooks.SpectralNormalization`,
/// PyTorch's `spectral_norm`): keeps `u`, `v` (and `gamma`) for its weight, saved as
/// `weight_u`, `weight_v` (and `weight_gamma`), the raw weight as `weight_orig`.
///
/// The state is initialised from the raw weight when the hook is added to a weight
/// with data, otherwise before the first forward (Chainer's lazy initialisation), with
/// [`SpectralNorm::init_state`] and the hook's seed.
#[derive(Debug)]
pub struct SpectralNormHook {
    /// The configuration.
    pub config: SpectralNorm,
    /// The seed of the initial `u` (and `v`).
    pub seed: u64,
    state: Option<SpectralNormState>,
    last: Option<SpectralNormOutput>,
    grad_gamma: Option<Tensor>,
}

impl SpectralNormHook {
    /// A hook with `config`, its state seeded by `seed`.
    pub fn new(config: SpectralNorm, seed: u64) -> Self {
        SpectralNormHook {
            config,
            seed,
            state: None,
            last: None,
            grad_gamma: None,
        }
    }

    /// The state, once initialised.
    pub fn state(&self) -> Option<&SpectralNormState> {
        self.state.as_ref()
    }

    /// Sigma of the last forward, shape `[1]`.
    pub fn sigma(&self) -> Option<&Tensor> {
        self.last.as_ref().map(|o| &o.sigma)
    }
}

impl WeightHook for SpectralNormHook {
    fn name(&self) -> &str {
        "spectral_norm"
    }

    fn is_transform(&self) -> bool {
        true
    }

    fn per_weight(&self) -> bool {
        true
    }

    fn added(&mut self, ctx: &Context, weight: &str, data: Option<&Tensor>) -> Result<()> {
        match data {
            Some(d) => self.initialize(ctx, weight, d),
            None => Ok(()),
        }
    }

    fn deleted(&mut self, _ctx: &Context, _weight: &str) -> Result<()> {
        self.state = None;
        self.last = None;
        Ok(())
    }

    fn needs_init(&self) -> bool {
        self.state.is_none()
    }

    fn initialize(&mut self, ctx: &Context, _weight: &str, data: &Tensor) -> Result<()> {
        self.state = Some(self.config.init_state(ctx, data, self.seed)?);
        Ok(())
    }

    fn record_forward(
        &mut self,
        rec: &mut Recording<'_>,
        input: &Tensor,
        args: &HookArgs<'_>,
    ) -> Result<Option<Tensor>> {
        let state = self.state.as_mut().ok_or_else(|| {
            Error::input(
                "spectral_norm",
                format!("weight `{}`: state not initialised", args.weight),
            )
        })?;
        let out = self
            .config
            .record_forward(rec, input, state, args.training)?;
        let w = out.weight.clone();
        self.last = Some(out);
        Ok(Some(w))
    }

    fn record_backward(
        &mut self,
        rec: &mut Recording<'_>,
        input: &Tensor,
        grad: &Tensor,
    ) -> Result<Tensor> {
        let fwd = self
            .last
            .as_ref()
            .ok_or_else(|| Error::input("spectral_norm", "backward before any forward"))?;
        let state = self
            .state
            .as_ref()
            .expect("a forward ran, so the state exists");
        let grads = self.config.record_backward(rec, input, grad, fwd, state)?;
        self.grad_gamma = grads.gamma;
        Ok(grads.weight)
    }

    fn param_grads(&self) -> Vec<(String, Tensor)> {
        self.grad_gamma
            .iter()
            .map(|g| ("weight_gamma".to_string(), g.clone()))
            .collect()
    }

    fn raw_name(&self) -> Option<&'static str> {
        Some("weight_orig")
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        let Some(s) = &self.state else {
            return Vec::new();
        };
        let mut out = vec![
            ("weight_u".to_string(), s.u.clone()),
            ("weight_v".to_string(), s.v.clone()),
        ];
        if let Some(g) = &s.gamma {
            out.push(("weight_gamma".to_string(), g.clone()));
        }
        out
    }

    fn state_shapes(&self, weight_shape: &[usize]) -> Result<Vec<(String, Vec<usize>)>> {
        let (rows, cols) = self.config.matrix_shape(weight_shape)?;
        let mut out = vec![
            ("weight_u".to_string(), vec![rows]),
            ("weight_v".to_string(), vec![cols]),
        ];
        if self.config.use_gamma {
            out.push(("weight_gamma".to_string(), vec![1]));
        }
        Ok(out)
    }

    fn f32_state(&self) -> &'static [&'static str] {
        &["weight_u", "weight_v", "weight_gamma"]
    }

    fn set_state(&mut self, state: Vec<(String, Tensor)>) -> Result<()> {
        let get = |k: &str| state.iter().find(|(n, _)| n == k).map(|(_, t)| t.clone());
        let missing = |k: &str| Error::input("spectral_norm", format!("state `{k}` missing"));
        self.state = Some(SpectralNormState {
            u: get("weight_u").ok_or_else(|| missing("weight_u"))?,
            v: get("weight_v").ok_or_else(|| missing("weight_v"))?,
            gamma: get("weight_gamma"),
            sigma: None,
        });
        self.last = None;
        Ok(())
    }
}

/// Weight Normalization as a hook (PyTorch's `weight_norm`, Jittor's `weightnorm`):
/// the raw weight is the direction `v` (saved as `weight_v`), the hook keeps the
/// magnitude `g` (saved as `weight_g`), initialised to `||W||` so that the weight is
/// unchanged at first (PyTorch's registration).
#[derive(Debug)]
pub struct WeightNormHook {
    /// The configuration.
    pub config: WeightNorm,
    g: Option<Tensor>,
    grad_g: Option<Tensor>,
}

impl WeightNormHook {
    /// A hook with `config`.
    pub fn new(config: WeightNorm) -> Self {
        WeightNormHook {
            config,
            g: None,
            grad_g: None,
        }
    }

    /// The magnitude `g`, once initialised.
    pub fn g(&self) -> Option<&Tensor> {
        self.g.as_ref()
    }

    /// The gradient of `g` from the last backward.
    pub fn grad_g(&self) -> Option<&Tensor> {
        self.grad_g.as_ref()
    }
}

impl WeightHook for WeightNormHook {
    fn name(&self) -> &str {
        "weight_norm"
    }

    fn is_transform(&self) -> bool {
        true
    }

    fn per_weight(&self) -> bool {
        true
    }

    fn added(&mut self, ctx: &Context, weight: &str, data: Option<&Tensor>) -> Result<()> {
        match data {
            Some(d) => self.initialize(ctx, weight, d),
            None => Ok(()),
        }
    }

    fn deleted(&mut self, _ctx: &Context, _weight: &str) -> Result<()> {
        self.g = None;
        Ok(())
    }

    fn needs_init(&self) -> bool {
        self.g.is_none()
    }

    fn initialize(&mut self, ctx: &Context, _weight: &str, data: &Tensor) -> Result<()> {
        self.g = Some(self.config.decompose(ctx, data)?.g);
        Ok(())
    }

    fn record_forward(
        &mut self,
        rec: &mut Recording<'_>,
        input: &Tensor,
        args: &HookArgs<'_>,
    ) -> Result<Option<Tensor>> {
        let g = self.g.as_ref().ok_or_else(|| {
            Error::input(
                "weight_norm",
                format!("weight `{}`: g not initialised", args.weight),
            )
        })?;
        self.config.record_forward(rec, g, input).map(Some)
    }

    fn record_backward(
        &mut self,
        rec: &mut Recording<'_>,
        input: &Tensor,
        grad: &Tensor,
    ) -> Result<Tensor> {
        let g = self
            .g
            .as_ref()
            .ok_or_else(|| Error::input("weight_norm", "backward before any forward"))?;
        let grads = self.config.record_backward(rec, g, input, grad)?;
        self.grad_g = Some(grads.g);
        Ok(grads.v)
    }

    fn param_grads(&self) -> Vec<(String, Tensor)> {
        self.grad_g
            .iter()
            .map(|g| ("weight_g".to_string(), g.clone()))
            .collect()
    }

    fn raw_name(&self) -> Option<&'static str> {
        Some("weight_v")
    }

    /// `g * v / ||v||`, once `g` exists (before, `g` would be `||v||`: `v` itself).
    fn fold(&self, ctx: &Context, data: &Tensor) -> Result<Option<Tensor>> {
        self.g
            .as_ref()
            .map(|g| self.config.forward(ctx, g, data))
            .transpose()
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        self.g
            .iter()
            .map(|g| ("weight_g".to_string(), g.clone()))
            .collect()
    }

    fn state_shapes(&self, weight_shape: &[usize]) -> Result<Vec<(String, Vec<usize>)>> {
        Ok(vec![(
            "weight_g".to_string(),
            self.config.g_shape(weight_shape)?,
        )])
    }

    fn set_state(&mut self, state: Vec<(String, Tensor)>) -> Result<()> {
        self.g = Some(
            state
                .into_iter()
                .find(|(k, _)| k == "weight_g")
                .map(|(_, t)| t)
                .ok_or_else(|| Error::input("weight_norm", "state `weight_g` missing"))?,
        );
        Ok(())
    }
}
