//! Conformance handlers of weight normalization: the golden cases' ops run through the public API.

use super::{read_named, Case, Outputs, Produced};
use crate::error::Result;
use crate::gpu::Context;
use crate::ops::weight_norm::WeightNorm;

/// PyTorch's `dim` from the case params: a number, or null for one norm over everything.
fn weight_norm_config(case: &Case) -> WeightNorm {
    WeightNorm::pytorch(case.param_f64("dim").map(|d| d as usize))
}

fn run_weight_norm(ctx: &Context, case: &Case) -> Produced {
    let config = weight_norm_config(case);
    let run = || -> Result<Outputs> {
        let g = case.tensor(ctx, "g")?;
        let v = case.tensor(ctx, "v")?;
        let gw = case.tensor(ctx, "grad_output")?;
        let (
            w,
            crate::WeightNormGrads {
                g: grad_g,
                v: grad_v,
            },
        ) = ctx.run(|rec| {
            Ok((
                config.record_forward(rec, &g, &v)?,
                config.record_backward(rec, &g, &v, &gw)?,
            ))
        })?;
        read_named(
            ctx,
            &[("output", &w), ("grad_g", &grad_g), ("grad_v", &grad_v)],
        )
    };
    run().map_err(|e| e.to_string())
}

fn run_weight_norm_decompose(ctx: &Context, case: &Case) -> Produced {
    let config = weight_norm_config(case);
    let run = || -> Result<Outputs> {
        let w = case.tensor(ctx, "weight")?;
        let crate::WeightNormParams { g, v } = config.decompose(ctx, &w)?;
        read_named(ctx, &[("g", &g), ("v", &v)])
    };
    run().map_err(|e| e.to_string())
}

/// The ops of this family and their handlers (registered in `super::FAMILIES`).
pub(super) const HANDLERS: &[(&str, super::Handler)] = &[
    ("weight_norm", run_weight_norm),
    ("weight_norm_decompose", run_weight_norm_decompose),
];
