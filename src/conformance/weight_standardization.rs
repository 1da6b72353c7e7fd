//! Conformance handlers of weight standardization: the golden cases' ops run through the public API.

use std::collections::BTreeMap;

use ndarray::ArrayD;

use super::{Case, Produced};
use crate::error::Result;
use crate::gpu::{Context, Tensor};
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
    let run = || -> Result<BTreeMap<String, ArrayD<f32>>> {
        let w = Tensor::from_array(ctx, case.input("weight")?)?;
        let g = Tensor::from_array(ctx, case.input("grad_output")?)?;
        let crate::WeightStandardizationStep { output: out, grad } =
            config.forward_backward(ctx, &w, &g)?;
        let mut r = ctx.read_all(&[&out, &grad])?.into_iter();
        let mut m = BTreeMap::new();
        m.insert("output".to_string(), r.next().expect("two tensors read"));
        m.insert(
            "grad_weight".to_string(),
            r.next().expect("two tensors read"),
        );
        Ok(m)
    };
    run().map_err(|e| e.to_string())
}

/// The ops of this family and their handlers (registered in `super::FAMILIES`).
pub(super) const HANDLERS: &[(&str, super::Handler)] =
    &[("weight_standardization", run_weight_standardization)];
