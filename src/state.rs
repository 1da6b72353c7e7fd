//! State save and load with safetensors, under PyTorch's names: what
//! `model.state_dict()` holds for modules with `torch.nn.utils.spectral_norm`
//! (`<m>.weight_orig`, `<m>.weight_u`, `<m>.weight_v`), `torch.nn.utils.weight_norm`
//! (`<m>.weight_g`, `<m>.weight_v`) and batch norm (`<m>.running_mean`,
//! `<m>.running_var`, `<m>.num_batches_tracked` as a 0-dim int64), so that a file
//! written by `safetensors.torch.save_file(model.state_dict(), path)` loads here and
//! ours loads in PyTorch.
//!
//! Loading checks every name, dtype and shape before anything changes, then uploads
//! everything, then swaps it in: a refused file leaves every weight and statistic as
//! it was. Tensors in the file that nothing asked for are ignored (a file may hold a
//! whole model).

use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::gpu::{Context, Tensor};
use crate::hooks::Weight;
use crate::ops::batch_norm::BatchNormState;

/// A checked tensor on the host: name, shape, values.
type HostEntry = (String, Vec<usize>, Vec<f32>);

fn file_err(path: &Path, problem: impl Into<String>) -> Error {
    Error::File {
        path: path.display().to_string(),
        problem: problem.into(),
    }
}

/// Writes the state of `weights` and of the batch norms (each under its module
/// prefix) to a safetensors file.
pub fn save(
    ctx: &Context,
    path: &Path,
    weights: &[&Weight],
    batch_norms: &[(&str, &BatchNormState)],
) -> Result<()> {
    let mut names = Vec::new();
    let mut tensors = Vec::new();
    for w in weights {
        for (k, t) in w.state_dict()? {
            names.push(k);
            tensors.push(t);
        }
    }
    for (prefix, bn) in batch_norms {
        names.push(format!("{prefix}.running_mean"));
        tensors.push(bn.running_mean.clone());
        names.push(format!("{prefix}.running_var"));
        tensors.push(bn.running_var.clone());
    }
    let refs: Vec<&Tensor> = tensors.iter().collect();
    let data = ctx.read_all(&refs)?;
    let mut bytes: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = names
        .into_iter()
        .zip(&data)
        .map(|(k, a)| {
            let v: Vec<f32> = a.iter().copied().collect();
            (
                k,
                a.shape().to_vec(),
                Dtype::F32,
                bytemuck::cast_slice(&v).to_vec(),
            )
        })
        .collect();
    for (prefix, bn) in batch_norms {
        bytes.push((
            format!("{prefix}.num_batches_tracked"),
            vec![],
            Dtype::I64,
            (bn.num_updates as i64).to_le_bytes().to_vec(),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (k, ..) in &bytes {
        if !seen.insert(k.as_str()) {
            return Err(file_err(path, format!("two entries are both named `{k}`")));
        }
    }
    let views = bytes
        .iter()
        .map(|(k, shape, dtype, b)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), b)
                .map(|v| (k.clone(), v))
                .map_err(|e| file_err(path, e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path)
        .map_err(|e| file_err(path, e.to_string()))
}

/// Loads the state of `weights` and batch norms from a safetensors file; all or
/// nothing. A weight without data takes the raw tensor's shape from the file; one
/// with data must match it.
pub fn load(
    ctx: &Context,
    path: &Path,
    weights: &mut [&mut Weight],
    batch_norms: &mut [(&str, &mut BatchNormState)],
) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| file_err(path, e.to_string()))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| file_err(path, format!("not a safetensors file: {e}")))?;
    let f32_tensor = |name: &str, shape: Option<&[usize]>| -> Result<Vec<f32>> {
        let view = st
            .tensor(name)
            .map_err(|_| file_err(path, format!("`{name}` is missing")))?;
        if view.dtype() != Dtype::F32 {
            return Err(file_err(
                path,
                format!("`{name}` is {:?}, expected F32", view.dtype()),
            ));
        }
        if let Some(s) = shape {
            if view.shape() != s {
                return Err(file_err(
                    path,
                    format!("`{name}` has shape {:?}, expected {s:?}", view.shape()),
                ));
            }
        }
        Ok(view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    };
    // Phase 1: check everything and gather it on the host.
    let mut weight_data: Vec<Vec<HostEntry>> = Vec::new();
    for w in weights.iter() {
        let raw_key = w.raw_key();
        let raw_shape = match w.data() {
            Some(d) => d.shape().to_vec(),
            None => st
                .tensor(&raw_key)
                .map_err(|_| file_err(path, format!("`{raw_key}` is missing")))?
                .shape()
                .to_vec(),
        };
        let mut entries = Vec::new();
        for (k, shape) in w.state_shapes(&raw_shape)? {
            let v = f32_tensor(&k, Some(&shape))?;
            entries.push((k, shape, v));
        }
        weight_data.push(entries);
    }
    let mut bn_data = Vec::new();
    for (prefix, bn) in batch_norms.iter() {
        let shape = bn.running_mean.shape().to_vec();
        let mean = f32_tensor(&format!("{prefix}.running_mean"), Some(&shape))?;
        let var = f32_tensor(&format!("{prefix}.running_var"), Some(&shape))?;
        let key = format!("{prefix}.num_batches_tracked");
        let view = st
            .tensor(&key)
            .map_err(|_| file_err(path, format!("`{key}` is missing")))?;
        if view.dtype() != Dtype::I64 || view.shape().iter().product::<usize>() != 1 {
            return Err(file_err(
                path,
                format!(
                    "`{key}` is {:?} {:?}, expected a single I64",
                    view.dtype(),
                    view.shape()
                ),
            ));
        }
        let n = i64::from_le_bytes(view.data()[..8].try_into().expect("8 bytes"));
        if n < 0 {
            return Err(file_err(path, format!("`{key}` is negative ({n})")));
        }
        bn_data.push((shape, mean, var, n as u64));
    }
    // Phase 2: upload everything (may fail, nothing changed yet).
    let mut weight_tensors = Vec::new();
    for entries in &weight_data {
        let mut ts = Vec::new();
        for (k, shape, v) in entries {
            ts.push((k.clone(), Tensor::from_slice(ctx, shape, v)?));
        }
        weight_tensors.push(ts);
    }
    let mut bn_tensors = Vec::new();
    for (shape, mean, var, n) in &bn_data {
        bn_tensors.push((
            Tensor::from_slice(ctx, shape, mean)?,
            Tensor::from_slice(ctx, shape, var)?,
            *n,
        ));
    }
    // Phase 3: swap in.
    for (w, ts) in weights.iter_mut().zip(weight_tensors) {
        w.set_state(ts)?;
    }
    for ((_, bn), (mean, var, n)) in batch_norms.iter_mut().zip(bn_tensors) {
        bn.running_mean = mean;
        bn.running_var = var;
        bn.num_updates = n;
    }
    Ok(())
}
