//! Conformance handlers of batch normalization: the golden cases' ops run through the public API.

use serde_json::Value;

use super::{read_named, Case, Outputs, Produced};
use crate::error::Result;
use crate::gpu::{Context, Tensor};
use crate::ops::batch_norm::{BatchNorm, BatchNormMode, BatchNormState, Momentum, RunningVar};

fn run_batch_norm(ctx: &Context, case: &Case) -> Produced {
    let momentum = case.param_f64("momentum").map(|m| m as f32);
    let config = BatchNorm {
        feature_axis: case.param_f64("feature_axis").unwrap_or(1.0) as isize,
        eps: case.param_f64("eps").unwrap_or(1e-5) as f32,
        momentum: match (case.param_str("momentum_weights"), momentum) {
            (Some("batch"), Some(m)) => Momentum::Batch(m),
            (Some("batch"), None) => Momentum::Cumulative,
            (Some("running"), Some(m)) => Momentum::Running(m),
            other => return Err(format!("unknown momentum convention {other:?}")),
        },
        debias_momentum: case.params.get("debias_momentum").and_then(Value::as_bool) == Some(true),
        running_var: match case.param_str("running_var") {
            Some("biased") => RunningVar::Biased,
            _ => RunningVar::Unbiased,
        },
        center: true,
        scale: true,
        track_running_stats: true,
    };
    let training = case.params.get("training").and_then(Value::as_bool) != Some(false);
    let run = || -> Result<Outputs> {
        let x = case.tensor(ctx, "input")?;
        let gamma = case.tensor(ctx, "gamma")?;
        let beta = case.tensor(ctx, "beta")?;
        let mut state = BatchNormState {
            running_mean: case.tensor(ctx, "running_mean")?,
            running_var: case.tensor(ctx, "running_var")?,
            num_updates: case.param_f64("num_updates").unwrap_or(0.0) as u64,
        };
        let mode = if training {
            BatchNormMode::Train
        } else {
            BatchNormMode::Eval
        };
        let fwd = config.forward(ctx, &x, Some(&gamma), Some(&beta), Some(&mut state), mode)?;
        let mut names = vec!["output", "running_mean", "running_var"];
        let mut tensors = vec![
            fwd.output.clone(),
            state.running_mean.clone(),
            state.running_var.clone(),
        ];
        if case.inputs.contains_key("grad_output") {
            let dy = case.tensor(ctx, "grad_output")?;
            let grads = config.backward(ctx, &x, &dy, &fwd)?;
            names.extend(["grad_input", "grad_gamma", "grad_beta"]);
            tensors.extend([grads.input, grads.gamma, grads.beta]);
        }
        let named: Vec<(&str, &Tensor)> = names.into_iter().zip(&tensors).collect();
        read_named(ctx, &named)
    };
    run().map_err(|e| e.to_string())
}

/// The ops of this family and their handlers (registered in `super::FAMILIES`).
pub(super) const HANDLERS: &[(&str, super::Handler)] = &[("batch_norm", run_batch_norm)];
