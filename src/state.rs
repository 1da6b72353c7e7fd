//! State save and load with safetensors, under the names PyTorch's `state_dict()`
//! uses, so that a file written by `safetensors.torch.save_file(model.state_dict(),
//! path)` loads here and ours loads in PyTorch:
//!
//! - weights with hooks, in either of PyTorch's APIs ([`Naming`]): the old hook
//!   functions `torch.nn.utils.spectral_norm` (`<m>.weight_orig`, `<m>.weight_u`,
//!   `<m>.weight_v`) and `torch.nn.utils.weight_norm` (`<m>.weight_g`,
//!   `<m>.weight_v`), or the parametrizations PyTorch documents today,
//!   `torch.nn.utils.parametrizations.spectral_norm`
//!   (`<m>.parametrizations.weight.original`, `<m>.parametrizations.weight.0._u`,
//!   `<m>.parametrizations.weight.0._v`) and `.weight_norm`
//!   (`<m>.parametrizations.weight.original0` = g, `.original1` = v). Loading detects
//!   the API per weight;
//! - batch-norm running statistics (`<m>.running_mean`, `<m>.running_var`,
//!   `<m>.num_batches_tracked` as a 0-dim int64), and whole batch-norm layers
//!   ([`BatchNormLayer`]: also `<m>.weight` = gamma and `<m>.bias` = beta).
//!
//! Loading reads f32, f16, bf16 and f64 entries (an f64 value past f32's range is
//! refused) into the model's types, as PyTorch's `load_state_dict` copies into the
//! existing tensors: a weight's raw entry takes its data's type and a hook's state the
//! type of the state it replaces (f32, f16 or bf16, rounded to nearest even; f32 where
//! there is none yet), except what the ops keep in f32 for weights of any type
//! (spectral norm's `u`, `v`, `gamma`); batch norm's statistics, gamma and beta are
//! f32; `num_batches_tracked` is an int64 or int32. From a path or from bytes. It checks every name, dtype and shape before anything changes, then
//! uploads everything, then swaps it in: a refused file leaves every weight and
//! statistic as it was. Tensors in the file that nothing asked for are ignored (a file
//! may hold a whole model). Saving writes each tensor in its type (F32, F16 or BF16)
//! and an int64 count.

use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::gpu::{encode_f32, Context, DType, Tensor};
use crate::hooks::Weight;
use crate::ops::batch_norm::{BatchNormLayer, BatchNormState};

/// Which of PyTorch's APIs a weight's state is named after.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Naming {
    /// `torch.nn.utils.spectral_norm` / `weight_norm` (deprecated in PyTorch, still the
    /// most common in checkpoints): `<m>.weight_orig`, `<m>.weight_u`, `<m>.weight_v`;
    /// `<m>.weight_g`, `<m>.weight_v`. The default.
    #[default]
    PyTorchHooks,
    /// `torch.nn.utils.parametrizations.spectral_norm` / `weight_norm`:
    /// `<m>.parametrizations.weight.original`, `<m>.parametrizations.weight.0._u`,
    /// `<m>.parametrizations.weight.0._v`; `<m>.parametrizations.weight.original0` (g),
    /// `<m>.parametrizations.weight.original1` (v). A weight's state beyond what
    /// PyTorch has (Chainer's `weight_gamma`) keeps its own name.
    PyTorchParametrizations,
}

impl Naming {
    /// The name under this API of `key`, one of `w`'s entries under the hook API.
    fn key(self, w: &Weight, key: &str) -> String {
        let prefix = format!("{}.", w.name());
        let (Naming::PyTorchParametrizations, Some(local)) = (self, key.strip_prefix(&prefix))
        else {
            return key.to_string();
        };
        let raw = w.raw_key();
        let sn = raw.ends_with(".weight_orig");
        let wn = raw.ends_with(".weight_v") && !sn;
        let mapped = match local {
            "weight_orig" if sn => "parametrizations.weight.original",
            "weight_u" if sn => "parametrizations.weight.0._u",
            "weight_v" if sn => "parametrizations.weight.0._v",
            "weight_g" if wn => "parametrizations.weight.original0",
            "weight_v" if wn => "parametrizations.weight.original1",
            other => other,
        };
        format!("{prefix}{mapped}")
    }
}

/// A checked tensor on the host: name (the hook API's), shape, values.
/// A weight's checked entry: its key, shape, values and the type it is uploaded in.
type HostEntry = (String, Vec<usize>, Vec<f32>, DType);

fn file_err(source: &str, problem: impl Into<String>) -> Error {
    Error::File {
        path: source.to_string(),
        problem: problem.into(),
    }
}

/// Writes the state of `weights` and of the batch norms' running statistics (each
/// under its module prefix) to a safetensors file, under PyTorch's hook API names.
pub fn save(
    ctx: &Context,
    path: &Path,
    weights: &[&Weight],
    batch_norms: &[(&str, &BatchNormState)],
) -> Result<()> {
    save_with(ctx, path, weights, batch_norms, &[], Naming::PyTorchHooks)
}

/// [`save`] with whole batch-norm layers (gamma as `<m>.weight`, beta as `<m>.bias`,
/// and their statistics) and the weights named after `naming`.
pub fn save_with(
    ctx: &Context,
    path: &Path,
    weights: &[&Weight],
    batch_norms: &[(&str, &BatchNormState)],
    layers: &[(&str, &BatchNormLayer)],
    naming: Naming,
) -> Result<()> {
    let source = path.display().to_string();
    let bytes =
        to_bytes(ctx, weights, batch_norms, layers, naming).map_err(|e| relabel(e, &source))?;
    std::fs::write(path, bytes).map_err(|e| file_err(&source, e.to_string()))
}

/// The file [`save_with`] writes, as bytes.
pub fn to_bytes(
    ctx: &Context,
    weights: &[&Weight],
    batch_norms: &[(&str, &BatchNormState)],
    layers: &[(&str, &BatchNormLayer)],
    naming: Naming,
) -> Result<Vec<u8>> {
    const SOURCE: &str = "(state being saved)";
    let mut names = Vec::new();
    let mut tensors = Vec::new();
    for w in weights {
        for (k, t) in w.state_dict()? {
            names.push(naming.key(w, &k));
            tensors.push(t);
        }
    }
    let mut counts = Vec::new();
    let mut stats = |prefix: &str, bn: &BatchNormState| {
        names.push(format!("{prefix}.running_mean"));
        tensors.push(bn.running_mean.clone());
        names.push(format!("{prefix}.running_var"));
        tensors.push(bn.running_var.clone());
        counts.push((format!("{prefix}.num_batches_tracked"), bn.num_updates));
    };
    for (prefix, bn) in batch_norms {
        stats(prefix, bn);
    }
    for (prefix, layer) in layers {
        if layer.config.track_running_stats {
            stats(prefix, &layer.state);
        }
    }
    for (prefix, layer) in layers {
        for (suffix, t) in [("weight", &layer.gamma), ("bias", &layer.beta)] {
            if let Some(t) = t {
                names.push(format!("{prefix}.{suffix}"));
                tensors.push(t.clone());
            }
        }
    }
    let refs: Vec<&Tensor> = tensors.iter().collect();
    let data = ctx.read_all(&refs)?;
    let mut entries: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = names
        .into_iter()
        .zip(&data)
        .zip(&tensors)
        .map(|((k, a), t)| {
            let dtype = match t.dtype() {
                DType::F32 => Dtype::F32,
                DType::F16 => Dtype::F16,
                DType::BF16 => Dtype::BF16,
            };
            // The readback widened exactly: rounding back gives the stored bits.
            let values: Vec<f32> = a.iter().copied().collect();
            (k, a.shape().to_vec(), dtype, encode_f32(t.dtype(), &values))
        })
        .collect();
    for (k, n) in counts {
        entries.push((k, vec![], Dtype::I64, (n as i64).to_le_bytes().to_vec()));
    }
    let mut seen = std::collections::HashSet::new();
    for (k, ..) in &entries {
        if !seen.insert(k.as_str()) {
            return Err(file_err(
                SOURCE,
                format!("two entries are both named `{k}`"),
            ));
        }
    }
    let views = entries
        .iter()
        .map(|(k, shape, dtype, b)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), b)
                .map(|v| (k.clone(), v))
                .map_err(|e| file_err(SOURCE, e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(meta)).map_err(|e| file_err(SOURCE, e.to_string()))
}

/// An error about the state being saved, named after the file it was going to.
fn relabel(e: Error, source: &str) -> Error {
    match e {
        Error::File { problem, .. } => file_err(source, problem),
        other => other,
    }
}

/// Loads the state of `weights` and batch norms' running statistics from a
/// safetensors file; all or nothing. A weight without data takes the raw tensor's
/// shape from the file; one with data must match it. Each weight's naming is detected
/// (see [`Naming`]).
pub fn load(
    ctx: &Context,
    path: &Path,
    weights: &mut [&mut Weight],
    batch_norms: &mut [(&str, &mut BatchNormState)],
) -> Result<()> {
    load_with(ctx, path, weights, batch_norms, &mut [])
}

/// [`load`] with whole batch-norm layers as well.
pub fn load_with(
    ctx: &Context,
    path: &Path,
    weights: &mut [&mut Weight],
    batch_norms: &mut [(&str, &mut BatchNormState)],
    layers: &mut [(&str, &mut BatchNormLayer)],
) -> Result<()> {
    let source = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| file_err(&source, e.to_string()))?;
    load_from(ctx, &source, &bytes, weights, batch_norms, layers)
}

/// [`load_with`] from the bytes of a safetensors file (a checkpoint in memory, from
/// a network or an archive).
pub fn load_bytes(
    ctx: &Context,
    bytes: &[u8],
    weights: &mut [&mut Weight],
    batch_norms: &mut [(&str, &mut BatchNormState)],
    layers: &mut [(&str, &mut BatchNormLayer)],
) -> Result<()> {
    load_from(ctx, "(bytes)", bytes, weights, batch_norms, layers)
}

/// Reads entry `name` as f32 values: f16 and bf16 widened exactly, f64 rounded.
fn read_f32(
    st: &SafeTensors<'_>,
    source: &str,
    name: &str,
    shape: Option<&[usize]>,
) -> Result<Vec<f32>> {
    let view = st
        .tensor(name)
        .map_err(|_| file_err(source, format!("`{name}` is missing")))?;
    if let Some(s) = shape {
        if view.shape() != s {
            return Err(file_err(
                source,
                format!("`{name}` has shape {:?}, expected {s:?}", view.shape()),
            ));
        }
    }
    let data = view.data();
    match view.dtype() {
        Dtype::F32 => Ok(data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()),
        Dtype::F16 => Ok(data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()),
        Dtype::BF16 => Ok(data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()),
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|c| {
                let v = f64::from_le_bytes(c.try_into().expect("8 bytes"));
                if v.is_finite() && v.abs() > f64::from(f32::MAX) {
                    Err(file_err(
                        source,
                        format!("`{name}` holds {v}, past f32's range"),
                    ))
                } else {
                    Ok(v as f32)
                }
            })
            .collect(),
        other => Err(file_err(
            source,
            format!("`{name}` is {other:?}; F32, F16, BF16 or F64 expected"),
        )),
    }
}

/// Reads a `num_batches_tracked`: one int64 or int32, not negative.
fn read_count(st: &SafeTensors<'_>, source: &str, key: &str) -> Result<u64> {
    let view = st
        .tensor(key)
        .map_err(|_| file_err(source, format!("`{key}` is missing")))?;
    let data = view.data();
    let n = match (view.dtype(), view.shape().iter().product::<usize>()) {
        (Dtype::I64, 1) => i64::from_le_bytes(data[..8].try_into().expect("8 bytes")),
        (Dtype::I32, 1) => i64::from(i32::from_le_bytes(data[..4].try_into().expect("4 bytes"))),
        (dtype, _) => {
            return Err(file_err(
                source,
                format!(
                    "`{key}` is {dtype:?} {:?}, expected a single I64 (or I32)",
                    view.shape()
                ),
            ))
        }
    };
    u64::try_from(n).map_err(|_| file_err(source, format!("`{key}` is negative ({n})")))
}

fn load_from(
    ctx: &Context,
    source: &str,
    bytes: &[u8],
    weights: &mut [&mut Weight],
    batch_norms: &mut [(&str, &mut BatchNormState)],
    layers: &mut [(&str, &mut BatchNormLayer)],
) -> Result<()> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| file_err(source, format!("not a safetensors file: {e}")))?;
    let has = |k: &str| st.tensor(k).is_ok();
    // Phase 1: check everything and gather it on the host.
    let mut weight_data: Vec<Vec<HostEntry>> = Vec::new();
    for w in weights.iter() {
        let raw_key = w.raw_key();
        let naming = [Naming::PyTorchHooks, Naming::PyTorchParametrizations]
            .into_iter()
            .find(|n| has(&n.key(w, &raw_key)))
            .ok_or_else(|| {
                let other = Naming::PyTorchParametrizations.key(w, &raw_key);
                let also = if other == raw_key {
                    String::new()
                } else {
                    format!(" (nor `{other}`)")
                };
                file_err(source, format!("`{raw_key}` is missing{also}"))
            })?;
        let raw_shape = match w.data() {
            Some(d) => d.shape().to_vec(),
            None => st
                .tensor(&naming.key(w, &raw_key))
                .expect("found above")
                .shape()
                .to_vec(),
        };
        let mut entries = Vec::new();
        for (k, shape) in w.state_shapes(&raw_shape)? {
            let v = read_f32(&st, source, &naming.key(w, &k), Some(&shape))?;
            let dtype = w.load_dtype(&k);
            entries.push((k, shape, v, dtype));
        }
        weight_data.push(entries);
    }
    let stats = |prefix: &str, features: usize| -> Result<(Vec<f32>, Vec<f32>, u64)> {
        let shape = [features];
        Ok((
            read_f32(&st, source, &format!("{prefix}.running_mean"), Some(&shape))?,
            read_f32(&st, source, &format!("{prefix}.running_var"), Some(&shape))?,
            read_count(&st, source, &format!("{prefix}.num_batches_tracked"))?,
        ))
    };
    let mut bn_data = Vec::new();
    for (prefix, bn) in batch_norms.iter() {
        bn_data.push(stats(prefix, bn.running_mean.len())?);
    }
    let mut layer_data = Vec::new();
    for (prefix, layer) in layers.iter() {
        let features = layer.features();
        let shape = [features];
        let stats = if layer.config.track_running_stats {
            Some(stats(prefix, features)?)
        } else {
            None
        };
        let param = |on: bool, suffix: &str| -> Result<Option<Vec<f32>>> {
            on.then(|| read_f32(&st, source, &format!("{prefix}.{suffix}"), Some(&shape)))
                .transpose()
        };
        let gamma = param(layer.config.scale, "weight")?;
        let beta = param(layer.config.center, "bias")?;
        layer_data.push((stats, gamma, beta));
    }
    commit(
        ctx,
        weights,
        weight_data,
        batch_norms,
        &bn_data,
        layers,
        &layer_data,
    )
}

/// A batch-norm layer's checked values: statistics (when tracked), gamma, beta.
type LayerData = (
    Option<(Vec<f32>, Vec<f32>, u64)>,
    Option<Vec<f32>>,
    Option<Vec<f32>>,
);

/// Phases 2 and 3 of every load: upload everything (which may fail, nothing changed
/// yet), then swap it in.
fn commit(
    ctx: &Context,
    weights: &mut [&mut Weight],
    weight_data: Vec<Vec<HostEntry>>,
    batch_norms: &mut [(&str, &mut BatchNormState)],
    bn_data: &[(Vec<f32>, Vec<f32>, u64)],
    layers: &mut [(&str, &mut BatchNormLayer)],
    layer_data: &[LayerData],
) -> Result<()> {
    // Phase 2: upload everything (may fail, nothing changed yet).
    let up = |v: &[f32]| Tensor::from_slice(ctx, &[v.len()], v);
    let mut weight_tensors = Vec::new();
    for entries in &weight_data {
        let mut ts = Vec::new();
        for (k, shape, v, dtype) in entries {
            let values = ndarray::ArrayView::from_shape(shape.as_slice(), v)
                .map_err(|e| file_err("(state being loaded)", e.to_string()))?;
            ts.push((k.clone(), Tensor::from_array_as(ctx, &values, *dtype)?));
        }
        weight_tensors.push(ts);
    }
    let mut bn_tensors = Vec::new();
    for (mean, var, n) in bn_data {
        bn_tensors.push((up(mean)?, up(var)?, *n));
    }
    let mut layer_tensors = Vec::new();
    for (stats, gamma, beta) in layer_data {
        let stats = match stats {
            Some((mean, var, n)) => Some((up(mean)?, up(var)?, *n)),
            None => None,
        };
        let gamma = gamma.as_deref().map(up).transpose()?;
        let beta = beta.as_deref().map(up).transpose()?;
        layer_tensors.push((stats, gamma, beta));
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
    for ((_, layer), (stats, gamma, beta)) in layers.iter_mut().zip(layer_tensors) {
        if let Some((mean, var, n)) = stats {
            layer.state = BatchNormState {
                running_mean: mean,
                running_var: var,
                num_updates: n,
            };
        }
        layer.gamma = gamma.or(layer.gamma.take());
        layer.beta = beta.or(layer.beta.take());
    }
    Ok(())
}

// ---- Chainer: `serializers.save_npz` / `load_npz` ------------------------------------

/// Where a weight's entry lives in a Chainer file: its npz key, or nothing (Chainer
/// does not persist spectral norm's `v`; its power iteration derives `v` from `u`).
fn chainer_key(w: &Weight, key: &str) -> Result<Option<String>> {
    let link = w.name().replace('.', "/");
    let local = key
        .strip_prefix(w.name())
        .and_then(|k| k.strip_prefix('.'))
        .unwrap_or(key);
    let sn = w.raw_key().ends_with(".weight_orig");
    Ok(match local {
        "weight" | "weight_orig" => Some(format!("{link}/W")),
        "weight_u" => Some(format!("{link}/W_u")),
        "weight_gamma" => Some(format!("{link}/gamma")),
        "weight_v" if sn => None,
        other => {
            return Err(file_err(
                "(Chainer names)",
                format!(
                    "weight `{}`: `{other}` has no Chainer name (Chainer has no weight \
                     normalization link hook; save it under PyTorch's names)",
                    w.name()
                ),
            ))
        }
    })
}

/// Loads weights (with spectral norm and weight standardization hooks) and batch-norm
/// layers from a file written by Chainer's `serializers.save_npz`, under Chainer's
/// names: `<link>/W`, `<link>/W_u`, `<link>/gamma` (spectral norm's `use_gamma`, a
/// 0-dim array), and `<link>/gamma`, `<link>/beta`, `<link>/avg_mean`,
/// `<link>/avg_var`, `<link>/N` for batch norm; a weight named `a.b` is the link path
/// `a/b`. `N` is Chainer's finetune counter (`decay = 1 - 1/N`, wgnorm's
/// [`Momentum::Cumulative`](crate::Momentum::Cumulative) count), which ordinary
/// training leaves at 0: it loads as `num_updates`. Spectral norm's `v`, which Chainer
/// does not persist, starts at zero: Chainer's flavor derives it from `u` at every
/// forward. All or nothing, as [`load`].
pub fn load_chainer_npz(
    ctx: &Context,
    path: &Path,
    weights: &mut [&mut Weight],
    layers: &mut [(&str, &mut BatchNormLayer)],
) -> Result<()> {
    let source = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|e| file_err(&source, e.to_string()))?;
    let npz = ndarray_npy::NpzReader::new(file)
        .map_err(|e| file_err(&source, format!("not an npz file: {e}")))?;
    let mut file = ChainerFile { npz, source };
    let mut weight_data: Vec<Vec<HostEntry>> = Vec::new();
    for w in weights.iter() {
        let raw_shape = match w.data() {
            Some(d) => d.shape().to_vec(),
            None => {
                let key = chainer_key(w, &w.raw_key())?.expect("the raw weight is persisted");
                file.array::<f32>(&key)?.shape().to_vec()
            }
        };
        let mut entries = Vec::new();
        for (k, shape) in w.state_shapes(&raw_shape)? {
            let values = match chainer_key(w, &k)? {
                Some(name) => file.f32(&name, &shape)?,
                None => vec![0.0; shape.iter().product()],
            };
            entries.push((k, shape, values, DType::F32));
        }
        weight_data.push(entries);
    }
    let mut layer_data: Vec<LayerData> = Vec::new();
    for (prefix, layer) in layers.iter() {
        let link = prefix.replace('.', "/");
        let shape = [layer.features()];
        let stats = if layer.config.track_running_stats {
            let mean = file.f32(&format!("{link}/avg_mean"), &shape)?;
            let var = file.f32(&format!("{link}/avg_var"), &shape)?;
            let key = format!("{link}/N");
            let n = file
                .array::<i64>(&key)?
                .iter()
                .next()
                .copied()
                .unwrap_or(-1);
            let n = u64::try_from(n)
                .map_err(|_| file_err(&file.source, format!("`{key}` is negative ({n})")))?;
            Some((mean, var, n))
        } else {
            None
        };
        let gamma = if layer.config.scale {
            Some(file.f32(&format!("{link}/gamma"), &shape)?)
        } else {
            None
        };
        let beta = if layer.config.center {
            Some(file.f32(&format!("{link}/beta"), &shape)?)
        } else {
            None
        };
        layer_data.push((stats, gamma, beta));
    }
    commit(ctx, weights, weight_data, &mut [], &[], layers, &layer_data)
}

/// An npz file being read, named in errors.
struct ChainerFile {
    npz: ndarray_npy::NpzReader<std::fs::File>,
    source: String,
}

impl ChainerFile {
    fn array<T: ndarray_npy::ReadableElement>(&mut self, name: &str) -> Result<ndarray::ArrayD<T>> {
        self.npz
            .by_name(name)
            .map_err(|e| file_err(&self.source, format!("`{name}`: {e}")))
    }

    /// Entry `name` of `shape` (Chainer keeps a scalar, spectral norm's gamma, as a
    /// 0-dim array: it stands for shape `[1]`).
    fn f32(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let a = self.array::<f32>(name)?;
        if a.shape() != shape && !(a.ndim() == 0 && shape == [1]) {
            return Err(file_err(
                &self.source,
                format!("`{name}` has shape {:?}, expected {shape:?}", a.shape()),
            ));
        }
        Ok(a.iter().copied().collect())
    }
}

/// Writes weights and batch-norm layers under Chainer's names (see
/// [`load_chainer_npz`]) as `serializers.save_npz` does (compressed), so that
/// Chainer's `load_npz` reads them; `N` as a 0-dim int64, spectral norm's gamma 0-dim.
pub fn save_chainer_npz(
    ctx: &Context,
    path: &Path,
    weights: &[&Weight],
    layers: &[(&str, &BatchNormLayer)],
) -> Result<()> {
    let source = path.display().to_string();
    let mut names = Vec::new();
    let mut tensors = Vec::new();
    // Entries Chainer keeps as 0-dim arrays (spectral norm's gamma).
    let mut scalars = std::collections::HashSet::new();
    for w in weights {
        for (k, t) in w.state_dict()? {
            if let Some(name) = chainer_key(w, &k)? {
                if k.ends_with(".weight_gamma") {
                    scalars.insert(name.clone());
                }
                names.push(name);
                tensors.push(t);
            }
        }
    }
    let mut counts = Vec::new();
    for (prefix, layer) in layers {
        let link = prefix.replace('.', "/");
        let mut add = |suffix: &str, t: &Tensor| {
            names.push(format!("{link}/{suffix}"));
            tensors.push(t.clone());
        };
        if let Some(g) = &layer.gamma {
            add("gamma", g);
        }
        if let Some(b) = &layer.beta {
            add("beta", b);
        }
        add("avg_mean", &layer.state.running_mean);
        add("avg_var", &layer.state.running_var);
        counts.push((format!("{link}/N"), layer.state.num_updates as i64));
    }
    let refs: Vec<&Tensor> = tensors.iter().collect();
    let data = ctx.read_all(&refs)?;
    let err = |e: ndarray_npy::WriteNpzError| file_err(&source, e.to_string());
    let file = std::fs::File::create(path).map_err(|e| file_err(&source, e.to_string()))?;
    let mut npz = ndarray_npy::NpzWriter::new_compressed(file);
    for (name, a) in names.iter().zip(&data) {
        if scalars.contains(name) {
            let v = a.iter().next().copied().unwrap_or(0.0);
            npz.add_array(name.as_str(), &ndarray::arr0(v))
                .map_err(err)?;
        } else {
            npz.add_array(name.as_str(), a).map_err(err)?;
        }
    }
    for (name, n) in counts {
        npz.add_array(name.as_str(), &ndarray::arr0(n))
            .map_err(err)?;
    }
    npz.finish().map_err(err)?;
    Ok(())
}
