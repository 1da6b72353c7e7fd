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
use crate::gpu::{widen_bytes, Context, DType, Tensor};

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
    /// The stored type of every tensor, inputs and expected (`expected.` prefixed):
    /// F32, or F16 / BF16 in the half-precision cases (held widened, exactly, above).
    pub dtypes: BTreeMap<String, DType>,
    /// Per-tensor tolerances (`rtol.<name>`, `atol.<name>` in the metadata), where a
    /// case gives them; the case's `rtol` and `atol` otherwise.
    pub tolerances: BTreeMap<String, (f64, f64)>,
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
        let mut dtypes = BTreeMap::new();
        for (name, view) in st.tensors() {
            let dtype = match view.dtype() {
                safetensors::Dtype::F32 => DType::F32,
                safetensors::Dtype::F16 => DType::F16,
                safetensors::Dtype::BF16 => DType::BF16,
                other => {
                    return Err(file_err(format!(
                        "tensor `{name}` is {other:?}, expected F32, F16 or BF16"
                    )))
                }
            };
            let len = view.shape().iter().product();
            let data = widen_bytes(dtype, view.data(), len);
            dtypes.insert(name.clone(), dtype);
            let array = ArrayD::from_shape_vec(IxDyn(view.shape()), data)
                .map_err(|e| file_err(format!("tensor `{name}`: {e}")))?;
            match name.strip_prefix("expected.") {
                Some(n) => expected.insert(n.to_string(), array),
                None => inputs.insert(name, array),
            };
        }
        let mut tolerances = BTreeMap::new();
        for name in expected.keys() {
            let rtol = meta.get(&format!("rtol.{name}")).map(|v| v.parse::<f64>());
            let atol = meta.get(&format!("atol.{name}")).map(|v| v.parse::<f64>());
            if let (Some(r), Some(a)) = (rtol, atol) {
                let bad =
                    |e: std::num::ParseFloatError| file_err(format!("tolerance of `{name}`: {e}"));
                tolerances.insert(name.clone(), (r.map_err(bad)?, a.map_err(bad)?));
            }
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
            dtypes,
            tolerances,
        })
    }

    /// The tolerance `(rtol, atol)` of expected tensor `name`.
    pub fn tolerance(&self, name: &str) -> (f64, f64) {
        self.tolerances
            .get(name)
            .copied()
            .unwrap_or((self.rtol, self.atol))
    }

    /// Uploads input `name` in its stored type (a half input stays half).
    pub fn tensor(&self, ctx: &Context, name: &str) -> Result<Tensor> {
        let dtype = self.dtypes.get(name).copied().unwrap_or_default();
        Tensor::from_array_as(ctx, self.input(name)?, dtype)
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

mod batch_norm;
mod checkpoint;
mod spectral_norm;
mod weight_norm;
mod weight_standardization;

/// Runs one case's op, returning the tensors it produced by name.
type Handler = fn(&Context, &Case) -> Produced;

/// Every family's handlers: a new normalization adds its file and one line here.
const FAMILIES: &[&[(&str, Handler)]] = &[
    weight_standardization::HANDLERS,
    weight_norm::HANDLERS,
    batch_norm::HANDLERS,
    spectral_norm::HANDLERS,
    checkpoint::HANDLERS,
];

/// The ops this version can run (every registered handler).
pub fn supported_ops() -> Vec<&'static str> {
    FAMILIES
        .iter()
        .flat_map(|f| f.iter().map(|(op, _)| *op))
        .collect()
}

/// Runs `case` through the public API on `ctx` and checks every expected tensor.
pub fn run_case(ctx: &Context, case: &Case) -> CaseOutcome {
    let handler = FAMILIES
        .iter()
        .flat_map(|f| f.iter())
        .find(|(op, _)| *op == case.op);
    let produced = match handler {
        Some((_, run)) => run(ctx, case),
        None => Err(format!("op `{}` is not implemented yet", case.op)),
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
        let (rtol, atol) = case.tolerance(name);
        let want = case
            .dtypes
            .get(&format!("expected.{name}"))
            .copied()
            .unwrap_or_default();
        outcome.checks.push(match produced.get(name) {
            Some((_, dtype)) if *dtype != want => TensorCheck {
                name: name.clone(),
                passed: false,
                max_abs_err: f64::INFINITY,
                worst_ratio: f64::INFINITY,
                worst: None,
                problem: Some(format!("produced as {dtype}, expected {want}")),
            },
            Some((got, _)) => compare(name, got, expected, rtol, atol),
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

/// What a handler produced: tensors by expected name (values widened to f32, and the
/// type they were produced in), or why it could not run.
type Produced = std::result::Result<Outputs, String>;

type Outputs = BTreeMap<String, (ArrayD<f32>, DType)>;

/// Reads `tensors` back in one submission, named, with their types.
fn read_named(ctx: &Context, named: &[(&str, &Tensor)]) -> Result<Outputs> {
    let tensors: Vec<&Tensor> = named.iter().map(|(_, t)| *t).collect();
    let arrays = ctx.read_all(&tensors)?;
    Ok(named
        .iter()
        .zip(arrays)
        .map(|((n, t), a)| (n.to_string(), (a, t.dtype())))
        .collect())
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
