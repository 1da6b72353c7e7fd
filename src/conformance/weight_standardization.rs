//! Conformance handlers of weight standardization: the golden cases' ops run through the public API.

use super::{read_named, Case, Outputs, Produced};
use crate::error::Result;
use crate::gpu::Context;
use crate::ops::weight_standardization::{Variance, WeightStandardization};

fn run_weight_standardization(ctx: &Context, case: &Case) -> Produced {
    let config = WeightStandardization {
        eps: case.param_f64("eps").unwrap_or(1e-5) as f32,
        variance: match case.param_str("variance") {
            None | Some("biased") => Variance::Biased,
            Some("unbiased") => Variance::Unbiased,
            Some(v) => return Err(format!("unknown variance `{v}`")),
        },
        axis: case.param_f64("axis").unwrap_or(0.0) as usize,
    };
    let run = || -> Result<Outputs> {
        let w = case.tensor(ctx, "weight")?;
        let g = case.tensor(ctx, "grad_output")?;
        let crate::WeightStandardizationStep { output: out, grad } =
            config.forward_backward(ctx, &w, &g)?;
        read_named(ctx, &[("output", &out), ("grad_weight", &grad)])
    };
    run().map_err(|e| e.to_string())
}

/// The ops of this family and their handlers (registered in `super::FAMILIES`).
pub(super) const HANDLERS: &[(&str, super::Handler)] =
    &[("weight_standardization", run_weight_standardization)];
