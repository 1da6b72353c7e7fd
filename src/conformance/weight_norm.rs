//! Conformance handlers of weight normalization: the golden cases' ops run through the public API.

use std::collections::BTreeMap;

use ndarray::ArrayD;

use super::{Case, Produced};
use crate::error::Result;
use crate::gpu::{Context, Tensor};
use crate::ops::weight_norm::WeightNorm;

/// PyTorch's `dim` from the case params: a number, or null for one norm over everything.
fn weight_norm_config(case: &Case) -> WeightNorm {
    WeightNorm::pytorch(case.param_f64("dim").map(|d| d as usize))
}

fn run_weight_norm(ctx: &Context, case: &Case) -> Produced {
    let config = weight_norm_config(case);
    let run = || -> Result<BTreeMap<String, ArrayD<f32>>> {
        let g = Tensor::from_array(ctx, case.input("g")?)?;
        let v = Tensor::from_array(ctx, case.input("v")?)?;
        let gw = Tensor::from_array(ctx, case.input("grad_output")?)?;
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
        let mut r = ctx.read_all(&[&w, &grad_g, &grad_v])?.into_iter();
        let mut m = BTreeMap::new();
        for name in ["output", "grad_g", "grad_v"] {
            m.insert(name.to_string(), r.next().expect("three tensors read"));
        }
        Ok(m)
    };
    run().map_err(|e| e.to_string())
}

fn run_weight_norm_decompose(ctx: &Context, case: &Case) -> Produced {
    let config = weight_norm_config(case);
    let run = || -> Result<BTreeMap<String, ArrayD<f32>>> {
        let w = Tensor::from_array(ctx, case.input("weight")?)?;
        let crate::WeightNormParams { g, v } = config.decompose(ctx, &w)?;
        let mut r = ctx.read_all(&[&g, &v])?.into_iter();
        let mut m = BTreeMap::new();
        m.insert("g".to_string(), r.next().expect("two tensors read"));
        m.insert("v".to_string(), r.next().expect("two tensors read"));
        Ok(m)
    };
    run().map_err(|e| e.to_string())
}

/// The ops of this family and their handlers (registered in `super::FAMILIES`).
pub(super) const HANDLERS: &[(&str, super::Handler)] = &[
    ("weight_norm", run_weight_norm),
    ("weight_norm_decompose", run_weight_norm_decompose),
];
