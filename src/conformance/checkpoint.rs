//! Conformance handlers of checkpoints: a state dict written by a framework (the
//! case's inputs, in f32, `num_batches_tracked` as a number) loads through
//! [`crate::state::load_bytes`] into the model of `tests/checkpoints/pytorch_checkpoints.py`
//! (spectral norm on `conv` and on `deconv` (axis 1), weight norm on `fc` (dim 0),
//! batch norm `bn` of 6 features), whose evaluation weights and batch-norm output on
//! the input `bn.input` must be the framework's. Each entry's naming (PyTorch's hook
//! API or its parametrizations) is detected, as for any file.

use super::{Case, Outputs, Produced};
use crate::error::Result;
use crate::gpu::Context;
use crate::hooks::{SpectralNormHook, Weight, WeightNormHook};
use crate::ops::batch_norm::{BatchNorm, BatchNormLayer, BatchNormMode};
use crate::ops::spectral_norm::SpectralNorm;
use crate::ops::weight_norm::WeightNorm;

fn run_checkpoint(ctx: &Context, case: &Case) -> Produced {
    let run = || -> Result<Outputs> {
        // The case's inputs, back into the file the framework wrote.
        let mut entries: Vec<(String, Vec<usize>, safetensors::Dtype, Vec<u8>)> = Vec::new();
        for (name, a) in case.inputs.iter().filter(|(n, _)| *n != "bn.input") {
            let (dtype, bytes) = if name.ends_with("num_batches_tracked") {
                let n = a.iter().next().copied().unwrap_or(0.0) as i64;
                (safetensors::Dtype::I64, n.to_le_bytes().to_vec())
            } else {
                (
                    safetensors::Dtype::F32,
                    a.iter().flat_map(|v| v.to_le_bytes()).collect(),
                )
            };
            entries.push((name.clone(), a.shape().to_vec(), dtype, bytes));
        }
        let views = entries
            .iter()
            .map(|(k, shape, dtype, b)| {
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), b)
                    .map(|v| (k.clone(), v))
                    .map_err(|e| crate::Error::input("checkpoint", e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let bytes = safetensors::serialize(views, None)
            .map_err(|e| crate::Error::input("checkpoint", e.to_string()))?;

        let sn = |name: &str, axis: usize| -> Result<Weight> {
            let mut w = Weight::new(name, None);
            let config = SpectralNorm {
                axis,
                ..SpectralNorm::pytorch()
            };
            w.add_hook(ctx, Box::new(SpectralNormHook::new(config, 0)))?;
            Ok(w)
        };
        let mut fc = Weight::new("fc", None);
        fc.add_hook(
            ctx,
            Box::new(WeightNormHook::new(WeightNorm::pytorch(Some(0)))),
        )?;
        let mut weights = vec![sn("conv", 0)?, sn("deconv", 1)?, fc];
        let mut bn = BatchNormLayer::new(ctx, BatchNorm::pytorch(), 6)?;
        let mut refs: Vec<&mut Weight> = weights.iter_mut().collect();
        crate::state::load_bytes(ctx, &bytes, &mut refs, &mut [], &mut [("bn", &mut bn)])?;
        let mut out = Outputs::new();
        for w in &mut weights {
            let key = format!("{}.weight", w.name());
            let t = w.forward(ctx, false)?;
            out.insert(key, (t.to_array(ctx)?, t.dtype()));
        }
        let x = case.tensor(ctx, "bn.input")?;
        let y = bn.forward(ctx, &x, BatchNormMode::Eval)?;
        out.insert(
            "bn.output".to_string(),
            (y.output.to_array(ctx)?, y.output.dtype()),
        );
        Ok(out)
    };
    run().map_err(|e| e.to_string())
}

/// The ops of this family and their handlers (registered in `super::FAMILIES`).
pub(super) const HANDLERS: &[(&str, super::Handler)] = &[("checkpoint", run_checkpoint)];
