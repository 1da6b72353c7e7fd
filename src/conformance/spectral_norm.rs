//! Conformance handlers of spectral normalization: the golden cases' ops run through the public API.

use ndarray::{ArrayD, IxDyn};
use serde_json::Value;

use super::{read_named, Case, Outputs, Produced};
use crate::error::Result;
use crate::gpu::{Context, DType, Tensor};
use crate::ops::spectral_norm::{SpectralNorm, SpectralNormState};

fn spectral_norm_config(case: &Case) -> SpectralNorm {
    let mut config = if case.flavor == "pytorch" {
        SpectralNorm::pytorch()
    } else {
        SpectralNorm::chainer()
    };
    if let Some(n) = case.param_f64("n_power_iterations") {
        config.n_power_iterations = n as u32;
    }
    if let Some(eps) = case.param_f64("eps") {
        config.eps = eps as f32;
    }
    if let Some(axis) = case.param_f64("axis") {
        config.axis = axis as usize;
    }
    config.factor = case.param_f64("factor").map(|f| f as f32);
    config.use_gamma = case.params.get("use_gamma").and_then(Value::as_bool) == Some(true);
    config
}

fn run_spectral_norm(ctx: &Context, case: &Case) -> Produced {
    let config = spectral_norm_config(case);
    let training = case.params.get("training").and_then(Value::as_bool) == Some(true);
    let run = || -> Result<Outputs> {
        let w = case.tensor(ctx, "weight")?;
        let gw = case.tensor(ctx, "grad_output")?;
        let u = case.tensor(ctx, "u")?;
        let v = match case.inputs.get("v") {
            Some(_) => case.tensor(ctx, "v")?,
            None => Tensor::zeros(ctx, &[config.matrix_shape(w.shape())?.1])?,
        };
        let gamma = match case.inputs.get("gamma") {
            Some(_) => Some(case.tensor(ctx, "gamma")?),
            None => None,
        };
        let mut state = SpectralNormState {
            u,
            v,
            gamma,
            sigma: None,
        };
        let (
            fwd,
            crate::SpectralNormGrads {
                weight: grad,
                gamma: grad_gamma,
            },
        ) = ctx.run(|rec| {
            let fwd = config.record_forward(rec, &w, &mut state, training)?;
            let grads = config.record_backward(rec, &w, &gw, &fwd, &state)?;
            Ok((fwd, grads))
        })?;
        // Expected `u` is the state after the call (unchanged in evaluation); `v` is
        // the one the forward used.
        let mut named = vec![
            ("output", &fwd.weight),
            ("u", &state.u),
            ("v", &fwd.v),
            ("sigma", &fwd.sigma),
            ("grad_weight", &grad),
        ];
        if let Some(gg) = &grad_gamma {
            named.push(("grad_gamma", gg));
        }
        read_named(ctx, &named)
    };
    run().map_err(|e| e.to_string())
}

fn run_spectral_norm_sigma(ctx: &Context, case: &Case) -> Produced {
    let config = spectral_norm_config(case);
    let run = || -> Result<Outputs> {
        let w = case.tensor(ctx, "weight")?;
        let u = case.tensor(ctx, "u")?;
        // Iterate to convergence, at most `n_power_iterations` times.
        let est = config.estimate_sigma(ctx, &w, &u, 1e-7, config.n_power_iterations as usize)?;
        let sigma = ArrayD::from_shape_vec(IxDyn(&[1]), vec![est.sigma]).expect("one element");
        Ok(Outputs::from([("sigma".to_string(), (sigma, DType::F32))]))
    };
    run().map_err(|e| e.to_string())
}

/// The ops of this family and their handlers (registered in `super::FAMILIES`).
pub(super) const HANDLERS: &[(&str, super::Handler)] = &[
    ("spectral_norm", run_spectral_norm),
    ("spectral_norm_sigma", run_spectral_norm_sigma),
];
