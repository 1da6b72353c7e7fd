//! Golden conformance cases from Chainer 7.8.1, PyTorch 2.15, GoMLX's documented
//! formula and exact SVDs (`tests/conformance/README.md` gives their semantics).
//!
//! A case is one safetensors file: input tensors, expected tensors named
//! `expected.<name>`, and string metadata `op`, `flavor`, `source`, `params` (JSON),
//! `rtol`, `atol`. A value passes when `|got - expected| <= atol + rtol * |expected|`;
//! a case passes when every expected tensor passes. An op or output the library
//! cannot produce fails the case; nothing is skipped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::gpu::{Context, Tensor};
use crate::ops::batch_norm::{BatchNorm, BatchNormMode, BatchNormState, Momentum, RunningVar};
use crate::ops::spectral_norm::{SpectralNorm, SpectralNormState};
use crate::ops::weight_norm::WeightNorm;
use crate::ops::weight_standardization::{Variance, WeightStandardization};

/// One golden case.
#[derive(Clone, Debug)]
pub struct Case {
    /// The file stem, e.g. `weight_standardization__chainer_7x5_eps1e-05`.
    pub name: String,
    /// The op: `weight_standardization`, `spectral_norm`, `spectral_norm_sigma`,
    /// `weight_norm`, `weight_norm_decompose`, `batch_norm`.
    pub op: String,
    /// `chainer`, `pytorch`, `labml`, `gomlx` or `numpy`.
    pub flavor: String,
    /// What produced the expected values.
    pub source: String,
    /// The op's parameters.
    pub params: Value,
    /// Relative tolerance.
    pub rtol: f64,
    /// Absolute tolerance.
    pub atol: f64,
    /// Input tensors by name.
    pub inputs: BTreeMap<String, ArrayD<f32>>,
    /// Expected tensors by name (without the `expected.` prefix).
    pub expected: BTreeMap<String, ArrayD<f32>>,
}

impl Case {
    /// Reads one case file.
    pub fn load(path: &Path) -> Result<Case> {
        let file_err = |problem: String| Error::File {
            path: path.display().to_string(),
            problem,
        };
        let bytes = std::fs::read(path).map_err(|e| file_err(e.to_string()))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| file_err(format!("not a safetensors file: {e}")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let field = |k: &str| {
            meta.get(k)
                .cloned()
                .ok_or_else(|| file_err(format!("metadata has no `{k}`")))
        };
        let number = |k: &str| -> Result<f64> {
            field(k)?
                .parse()
                .map_err(|e| file_err(format!("metadata `{k}`: {e}")))
        };
        let params: Value = serde_json::from_str(&field("params")?)
            .map_err(|e| file_err(format!("metadata `params` is not JSON: {e}")))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| file_err(format!("not a safetensors file: {e}")))?;
        let mut inputs = BTreeMap::new();
        let mut expected = BTreeMap::new();
        for (name, view) in st.tensors() {
            if view.dtype() != safetensors::Dtype::F32 {
                return Err(file_err(format!(
                    "tensor `{name}` is {:?}, expected F32",
                    view.dtype()
                )));
            }
            let data: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let array = ArrayD::from_shape_vec(IxDyn(view.shape()), data)
                .map_err(|e| file_err(format!("tensor `{name}`: {e}")))?;
            match name.strip_prefix("expected.") {
                Some(n) => expected.insert(n.to_string(), array),
                None => inputs.insert(name, array),
            };
        }
        Ok(Case {
            name: path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            op: field("op")?,
            flavor: field("flavor")?,
            source: meta.get("source").cloned().unwrap_or_default(),
            params,
            rtol: number("rtol")?,
            atol: number("atol")?,
            inputs,
            expected,
        })
    }

    /// Reads every `*.safetensors` case in `dir`, sorted by name.
    pub fn load_dir(dir: &Path) -> Result<Vec<Case>> {
        let entries = std::fs::read_dir(dir).map_err(|e| Error::File {
            path: dir.display().to_string(),
            problem: e.to_string(),
        })?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        paths.sort();
        paths.iter().map(|p| Case::load(p)).collect()
    }

    fn input(&self, name: &str) -> Result<&ArrayD<f32>> {
        self.inputs.get(name).ok_or_else(|| Error::File {
            path: self.name.clone(),
            problem: format!("case has no input `{name}`"),
        })
    }

    fn param_f64(&self, name: &str) -> Option<f64> {
        self.params.get(name).and_then(Value::as_f64)
    }

    fn param_str(&self, name: &str) -> Option<&str> {
        self.params.get(name).and_then(Value::as_str)
    }
}

/// The comparison of one expected tensor.
#[derive(Clone, Debug)]
pub struct TensorCheck {
    /// The expected tensor's name (`output`, `grad_weight`, ...).
    pub name: String,
    /// Whether every element is within tolerance.
    pub passed: bool,
    /// Largest `|got - expected|`.
    pub max_abs_err: f64,
    /// Largest `|got - expected| / (atol + rtol |expected|)`: at most 1 passes.
    pub worst_ratio: f64,
    /// The flat index, value and expected value of the worst element (by ratio).
    pub worst: Option<(usize, f32, f32)>,
    /// Why the tensor could not be checked (not produced, wrong shape).
    pub problem: Option<String>,
}

/// The result of one case.
#[derive(Clone, Debug)]
pub struct CaseOutcome {
    /// The case's name.
    pub case: String,
    /// The case's op.
    pub op: String,
    /// One check per expected tensor.
    pub checks: Vec<TensorCheck>,
    /// Why the case could not run at all (op not implemented, error from the op).
    pub error: Option<String>,
}

impl CaseOutcome {
    /// Whether the case ran and every expected tensor passed.
    pub fn passed(&self) -> bool {
        self.error.is_none() && !self.checks.is_empty() && self.checks.iter().all(|c| c.passed)
    }

    /// The worst check, for a one-line report.
    pub fn summary(&self) -> String {
        if let Some(e) = &self.error {
            return e.clone();
        }
        self.checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| match (&c.problem, c.worst) {
                (Some(p), _) => format!("{}: {p}", c.name),
                (None, Some((i, got, exp))) => format!(
                    "{}: worst at {i}: got {got}, expected {exp} (|err| {:.3e}, {:.2}x the tolerance)",
                    c.name, c.max_abs_err, c.worst_ratio
                ),
                (None, None) => format!("{}: failed", c.name),
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Compares `got` with `expected` element-wise: `|got - expected| <= atol + rtol |expected|`.
pub fn compare(
    name: &str,
    got: &ArrayD<f32>,
    expected: &ArrayD<f32>,
    rtol: f64,
    atol: f64,
) -> TensorCheck {
    if got.shape() != expected.shape() {
        return TensorCheck {
            name: name.to_string(),
            passed: false,
            max_abs_err: f64::INFINITY,
            worst_ratio: f64::INFINITY,
            worst: None,
            problem: Some(format!(
                "shape {:?}, expected {:?}",
                got.shape(),
                expected.shape()
            )),
        };
    }
    let mut max_abs_err = 0f64;
    let mut worst_ratio = 0f64;
    let mut worst = None;
    let mut passed = true;
    for (i, (&g, &e)) in got.iter().zip(expected.iter()).enumerate() {
        let err = (f64::from(g) - f64::from(e)).abs();
        let allowed = atol + rtol * f64::from(e).abs();
        // NaN fails: `err <= allowed` is false for it.
        let ok = err <= allowed;
        let ratio = if ok {
            if allowed > 0.0 {
                err / allowed
            } else {
                0.0
            }
        } else if err.is_nan() || allowed == 0.0 {
            f64::INFINITY
        } else {
            err / allowed
        };
        passed &= ok;
        if err.is_nan() || err > max_abs_err {
            max_abs_err = if err.is_nan() { f64::NAN } else { err };
        }
        if worst.is_none() || ratio > worst_ratio {
            worst_ratio = ratio;
            worst = Some((i, g, e));
        }
    }
    TensorCheck {
        name: name.to_string(),
        passed,
        max_abs_err,
        worst_ratio,
        worst,
        problem: None,
    }
}

/// The ops this version can run.
pub const SUPPORTED_OPS: &[&str] = &[
    "weight_standardization",
    "weight_norm",
    "weight_norm_decompose",
    "batch_norm",
    "spectral_norm",
    "spectral_norm_sigma",
];

/// Runs `case` through the public API on `ctx` and checks every expected tensor.
pub fn run_case(ctx: &Context, case: &Case) -> CaseOutcome {
    let produced = match case.op.as_str() {
        "weight_standardization" => run_weight_standardization(ctx, case),
        "weight_norm" => run_weight_norm(ctx, case),
        "weight_norm_decompose" => run_weight_norm_decompose(ctx, case),
        "batch_norm" => run_batch_norm(ctx, case),
        "spectral_norm" => run_spectral_norm(ctx, case),
        "spectral_norm_sigma" => run_spectral_norm_sigma(ctx, case),
        other => Err(format!("op `{other}` is not implemented yet")),
    };
    let mut outcome = CaseOutcome {
        case: case.name.clone(),
        op: case.op.clone(),
        checks: Vec::new(),
        error: None,
    };
    let produced = match produced {
        Ok(p) => p,
        Err(e) => {
            outcome.error = Some(e);
            return outcome;
        }
    };
    for (name, expected) in &case.expected {
        outcome.checks.push(match produced.get(name) {
            Some(got) => compare(name, got, expected, case.rtol, case.atol),
            None => TensorCheck {
                name: name.clone(),
                passed: false,
                max_abs_err: f64::INFINITY,
                worst_ratio: f64::INFINITY,
                worst: None,
                problem: Some("not produced by the library".into()),
            },
        });
    }
    outcome
}

type Produced = std::result::Result<BTreeMap<String, ArrayD<f32>>, String>;

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
    let run = || -> Result<BTreeMap<String, ArrayD<f32>>> {
        let w = Tensor::from_array(ctx, case.input("weight")?)?;
        let gw = Tensor::from_array(ctx, case.input("grad_output")?)?;
        let u = Tensor::from_array(ctx, case.input("u")?)?;
        let v = match case.inputs.get("v") {
            Some(v) => Tensor::from_array(ctx, v)?,
            None => Tensor::zeros(ctx, &[config.matrix_shape(w.shape())?.1])?,
        };
        let gamma = match case.inputs.get("gamma") {
            Some(g) => Some(Tensor::from_array(ctx, g)?),
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
        let mut tensors = vec![&fwd.weight, &state.u, &fwd.v, &fwd.sigma, &grad];
        let mut names = vec!["output", "u", "v", "sigma", "grad_weight"];
        if let Some(gg) = &grad_gamma {
            tensors.push(gg);
            names.push("grad_gamma");
        }
        let got = ctx.read_all(&tensors)?;
        Ok(names.into_iter().map(String::from).zip(got).collect())
    };
    run().map_err(|e| e.to_string())
}

fn run_spectral_norm_sigma(ctx: &Context, case: &Case) -> Produced {
    let config = spectral_norm_config(case);
    let run = || -> Result<BTreeMap<String, ArrayD<f32>>> {
        let w = Tensor::from_array(ctx, case.input("weight")?)?;
        let u = Tensor::from_array(ctx, case.input("u")?)?;
        // Iterate to convergence, at most `n_power_iterations` times.
        let est = config.estimate_sigma(ctx, &w, &u, 1e-7, config.n_power_iterations as usize)?;
        let mut m = BTreeMap::new();
        m.insert(
            "sigma".to_string(),
            ArrayD::from_shape_vec(IxDyn(&[1]), vec![est.sigma]).expect("one element"),
        );
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

fn run_batch_norm(ctx: &Context, case: &Case) -> Produced {
    let momentum = case.param_f64("momentum").map(|m| m as f32);
    let config = BatchNorm {
        feature_axis: case.param_f64("feature_axis").unwrap_or(1.0) as usize,
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
    let run = || -> Result<BTreeMap<String, ArrayD<f32>>> {
        let x = Tensor::from_array(ctx, case.input("input")?)?;
        let gamma = Tensor::from_array(ctx, case.input("gamma")?)?;
        let beta = Tensor::from_array(ctx, case.input("beta")?)?;
        let mut state = BatchNormState {
            running_mean: Tensor::from_array(ctx, case.input("running_mean")?)?,
            running_var: Tensor::from_array(ctx, case.input("running_var")?)?,
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
        if let Some(dy) = case.inputs.get("grad_output") {
            let dy = Tensor::from_array(ctx, dy)?;
            let grads = config.backward(ctx, &x, &dy, &fwd)?;
            names.extend(["grad_input", "grad_gamma", "grad_beta"]);
            tensors.extend([grads.input, grads.gamma, grads.beta]);
        }
        let arrays = ctx.read_all(&tensors.iter().collect::<Vec<_>>())?;
        Ok(names.into_iter().map(String::from).zip(arrays).collect())
    };
    run().map_err(|e| e.to_string())
}

/// Per-op counts of a conformance run.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// `(passed, failed)` per op.
    pub per_op: BTreeMap<String, (usize, usize)>,
}

impl Summary {
    /// Tallies `outcomes`.
    pub fn of(outcomes: &[CaseOutcome]) -> Summary {
        let mut s = Summary::default();
        for o in outcomes {
            let e = s.per_op.entry(o.op.clone()).or_default();
            if o.passed() {
                e.0 += 1;
            } else {
                e.1 += 1;
            }
        }
        s
    }

    /// Total `(passed, failed)`.
    pub fn totals(&self) -> (usize, usize) {
        self.per_op
            .values()
            .fold((0, 0), |(p, f), (a, b)| (p + a, f + b))
    }
}
