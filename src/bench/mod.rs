//! The benchmark suite, shared by the criterion benches (`cargo bench`), the report
//! example (`cargo run --release --example report`) and the burn peer crate
//! (`benches/peer`): the ops, the workloads of issue 7 at realistic sizes, the bytes
//! each op must move at minimum, inputs prepared on the GPU, kernel and end-to-end
//! timing, and the report (a Markdown table and SVG plots).
//!
//! # Bytes counted
//!
//! [`Op::bytes_per_element`] is the traffic of the best streaming algorithm, in bytes
//! per element of the tensor: each operand read once and each result written once,
//! plus one more read of an operand whenever an element cannot be produced before a
//! reduction over a slice that is spread over the whole tensor has finished. A channel
//! of a weight fits in one workgroup, so Weight Standardization and Weight
//! Normalization count one read and one write (`8`); a batch-norm channel is spread
//! over the batch, so a training forward reads `x` twice (`12`); a power iteration
//! reads `W` once per mat-vec. The copy kernel moves `8` bytes per element and is the
//! yardstick: an op's *fraction of copy bandwidth* is `(bytes / op time) / (8 n / copy
//! time)`.
//!
//! # Times
//!
//! *Kernel* time is read from GPU timestamps written before and after the op's compute
//! passes, where the device has `TIMESTAMP_QUERY_INSIDE_ENCODERS`; *end-to-end* time is
//! the wall clock from recording (output buffers and bind groups included) through
//! submission to the work having finished, ready for readback.

mod batch_norm;
mod copy;
mod report;
mod spectral_norm;
mod weight_norm;
mod weight_standardization;

use std::cell::Cell;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::rc::Rc;
use std::time::Instant;

use ndarray::{ArrayD, IxDyn};

use crate::error::Result;
use crate::gpu::{Context, DType, Recording, Tensor};

/// The registry: every family's ops, in report order, the copy first. A new
/// normalization adds its `src/bench/<family>.rs` (its [`OpDef`]s and the inputs they
/// run on) and one line here.
const FAMILIES: &[&[OpDef]] = &[
    copy::OPS,
    weight_standardization::OPS,
    spectral_norm::OPS,
    weight_norm::OPS,
    batch_norm::OPS,
];

/// How a family describes one of its ops to the suite.
pub(crate) struct OpDef {
    /// A short name, e.g. `ws_forward`, used in bench ids, files and `--only`.
    name: &'static str,
    /// The family, also the criterion group.
    family: &'static str,
    /// One line for listings.
    doc: &'static str,
    /// Minimum bytes moved per element of the tensor (see the module docs).
    bytes_per_element: u64,
    /// The workloads the op runs on.
    workloads: fn() -> Vec<Workload>,
    /// Uploads one tensor's inputs (and runs what a backward needs).
    prepare: fn(&Input<'_>) -> Result<Box<dyn Item>>,
}

/// One tensor of a workload, what a family's [`OpDef::prepare`] builds its item from.
pub(crate) struct Input<'a> {
    ctx: &'a Context,
    case: &'a Case,
    shape: &'a [usize],
    /// The tensor's values ([`Workload::input`]).
    host: ArrayD<f32>,
    /// Its seed: its gradient uses `seed + 1`, a second operand `seed + 2`.
    seed: u64,
}

impl Input<'_> {
    /// A data tensor (weight, activation, gradient) in the workload's type.
    fn upload(&self, a: &ArrayD<f32>) -> Result<Tensor> {
        Tensor::from_array_as(self.ctx, a, self.case.workload.dtype)
    }

    /// The gradient flowing into a backward, deterministic like the input.
    fn gradient(&self) -> ArrayD<f32> {
        pseudo_random(self.shape, self.seed + 1)
    }
}

/// One tensor of a workload prepared for one op: its inputs on the GPU and on the host.
pub(crate) trait Item {
    /// Records the op on the tensor.
    fn record(&mut self, rec: &mut Recording<'_>) -> Result<()>;
    /// Runs the op's CPU reference (f64) on the tensor once.
    fn reference(&self) -> Result<()>;
}

/// What an item of a family with a training forward, an evaluation forward and a
/// backward (spectral norm, batch norm) runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    Train,
    Eval,
    Backward,
}

/// One benchmarked operation, as its family registers it. Configurations are the
/// frameworks' defaults: Chainer's Weight Standardization, Chainer's Spectral
/// Normalization (one power iteration; PyTorch's for the evaluation forward),
/// PyTorch's `weight_norm(dim=0)`, PyTorch's `BatchNorm` with the feature axis of the
/// workload. Two ops are equal when their names are.
#[derive(Clone, Copy)]
pub struct Op(&'static OpDef);

impl Op {
    /// The copy kernel, the bandwidth yardstick (in the suite on every workload).
    pub const COPY: Op = Op(&copy::COPY);
    /// The driver's `copy_buffer_to_buffer`, the second yardstick ([`run`] measures it
    /// beside the copy kernel; not in [`Op::all`]).
    pub const DRIVER_COPY: Op = Op(&copy::DRIVER_COPY);

    /// Every op of the suite, family by family, the copy first.
    pub fn all() -> Vec<Op> {
        FAMILIES.iter().flat_map(|f| f.iter().map(Op)).collect()
    }

    /// The op called `name` (the driver copy included).
    pub fn named(name: &str) -> Option<Op> {
        Op::all()
            .into_iter()
            .chain([Op::DRIVER_COPY])
            .find(|op| op.name() == name)
    }

    /// A short name, e.g. `ws_forward`, used in bench ids and files.
    pub fn name(self) -> &'static str {
        self.0.name
    }

    /// The family, which is also the criterion group: `copy`,
    /// `weight_standardization`, `spectral_norm`, `weight_norm`, `batch_norm`.
    pub fn family(self) -> &'static str {
        self.0.family
    }

    /// What the op is, in one line.
    pub fn description(self) -> &'static str {
        self.0.doc
    }

    /// Minimum bytes moved per element of the tensor (see the module docs).
    pub fn bytes_per_element(self) -> u64 {
        self.0.bytes_per_element
    }

    /// Whether the op normalizes activations (batch norm) rather than weights.
    pub fn on_activations(self) -> bool {
        self.workloads().iter().all(|w| w.feature_axis != 0)
    }

    /// The workloads of issue 7 this op runs on: ResNet-50's convolution weights, a
    /// 4096 x 4096 linear weight and a 50000 x 512 embedding for the weight ops; a
    /// 32 x 64 x 56 x 56 batch in NCHW and NHWC for batch norm; all of them for the copy.
    pub fn workloads(self) -> Vec<Workload> {
        (self.0.workloads)()
    }
}

impl PartialEq for Op {
    fn eq(&self, other: &Op) -> bool {
        self.name() == other.name()
    }
}

impl Eq for Op {}

impl Hash for Op {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.name().hash(state)
    }
}

impl fmt::Debug for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Tensors an op runs on, all recorded into one submission.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Short name, e.g. `linear_4096x4096`.
    pub name: String,
    /// One shape per tensor.
    pub shapes: Vec<Vec<usize>>,
    /// The batch-norm feature axis (1 for NCHW, 3 for NHWC); 0 for weights.
    pub feature_axis: usize,
    /// The type of the data tensors (weights, activations, gradients); per-channel
    /// parameters and statistics stay f32. Default f32.
    pub dtype: DType,
}

impl Workload {
    /// The 53 convolution weights of ResNet-50 (23.5M elements), one submission.
    pub fn resnet50() -> Self {
        Workload {
            name: "resnet50_53_convs".into(),
            shapes: crate::shapes::resnet50_conv_weights()
                .iter()
                .map(|s| s.to_vec())
                .collect(),
            feature_axis: 0,
            dtype: DType::F32,
        }
    }

    /// One weight of `shape` called `name`.
    pub fn single(name: &str, shape: &[usize], feature_axis: usize) -> Self {
        Workload {
            name: name.into(),
            shapes: vec![shape.to_vec()],
            feature_axis,
            dtype: DType::F32,
        }
    }

    /// The same tensors in `dtype`.
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    /// The name, with the type when it is not f32 (`linear_4096x4096_bf16`): bench
    /// ids, table rows.
    pub fn label(&self) -> String {
        match self.dtype {
            DType::F32 => self.name.clone(),
            d => format!("{}_{d}", self.name),
        }
    }

    /// Bytes per element of the data tensors.
    pub fn element_bytes(&self) -> u64 {
        self.dtype.size()
    }

    /// ResNet-50, a 4096 x 4096 linear weight, a 50000 x 512 embedding.
    pub fn weights() -> Vec<Self> {
        vec![
            Self::resnet50(),
            Self::single("linear_4096x4096", &[4096, 4096], 0),
            Self::single("embedding_50000x512", &[50000, 512], 0),
        ]
    }

    /// Batch-norm activations 32 x 64 x 56 x 56 (ResNet-50's first stage) in NCHW and NHWC.
    pub fn activations() -> Vec<Self> {
        vec![
            Self::single("nchw_32x64x56x56", &[32, 64, 56, 56], 1),
            Self::single("nhwc_32x56x56x64", &[32, 56, 56, 64], 3),
        ]
    }

    /// The input of tensor `index`: what [`Prepared`] uploads (`pseudo_random` with
    /// seed `2 index + 1`; its gradient uses the next seed) and a [`Peer`] should use.
    pub fn input(&self, index: usize) -> ArrayD<f32> {
        pseudo_random(&self.shapes[index], Self::seed(index))
    }

    fn seed(index: usize) -> u64 {
        index as u64 * 2 + 1
    }

    /// Elements over all tensors.
    pub fn elements(&self) -> u64 {
        self.shapes
            .iter()
            .map(|s| s.iter().product::<usize>() as u64)
            .sum()
    }
}

/// An op on a workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Case {
    /// The op.
    pub op: Op,
    /// What it runs on.
    pub workload: Workload,
}

impl Case {
    /// The bytes the op must move at minimum on this workload (criterion's
    /// `Throughput::Bytes`): half the f32 figure for f16 and bf16 data.
    pub fn min_bytes(&self) -> u64 {
        self.op.bytes_per_element() * self.workload.elements() * self.workload.element_bytes() / 4
    }

    /// The copy of the same workload, the yardstick for this case.
    pub fn yardstick(&self) -> Case {
        Case {
            op: Op::COPY,
            workload: self.workload.clone(),
        }
    }
}

/// Every case of the full suite, in [`Op::all`] order: each op on each workload in
/// f32, then in f16 and bf16.
pub fn suite() -> Vec<Case> {
    Op::all()
        .into_iter()
        .flat_map(|op| {
            op.workloads().into_iter().flat_map(move |workload| {
                [DType::F32, DType::F16, DType::BF16].map(|d| Case {
                    op,
                    workload: workload.clone().with_dtype(d),
                })
            })
        })
        .collect()
}

/// Deterministic inputs in [-1, 1) (a 64-bit LCG), fast enough for 25M elements.
pub fn pseudo_random(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32) / (1u64 << 23) as f32 - 1.0
    })
}

/// A case with its inputs uploaded, ready to be recorded again and again.
pub struct Prepared<'c> {
    ctx: &'c Context,
    /// The case.
    pub case: Case,
    items: Vec<Box<dyn Item>>,
}

impl<'c> Prepared<'c> {
    /// Uploads deterministic inputs for `case` (and runs what its backward needs).
    pub fn new(ctx: &'c Context, case: &Case) -> Result<Self> {
        let wl = &case.workload;
        let items = wl
            .shapes
            .iter()
            .enumerate()
            .map(|(i, shape)| {
                (case.op.0.prepare)(&Input {
                    ctx,
                    case,
                    shape,
                    host: wl.input(i),
                    seed: Workload::seed(i),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        ctx.wait()?;
        Ok(Prepared {
            ctx,
            case: case.clone(),
            items,
        })
    }

    /// Records the op on every tensor of the workload.
    pub fn record(&mut self, rec: &mut Recording<'_>) -> Result<()> {
        self.items.iter_mut().try_for_each(|item| item.record(rec))
    }

    /// Runs the op once, untimed: records, submits and waits for completion (what the
    /// end-to-end time measures).
    pub fn run(&mut self) -> Result<()> {
        let mut rec = Recording::new(self.ctx);
        self.record(&mut rec)?;
        rec.submit()?;
        self.ctx.wait()
    }

    /// Runs the op once and times it: `(kernel, end_to_end)` in seconds. The kernel
    /// time is `None` where the device has no timestamp queries inside encoders.
    pub fn run_timed(&mut self) -> Result<(Option<f64>, f64)> {
        let ctx = self.ctx;
        let start = Instant::now();
        let mut rec = Recording::new(ctx);
        let gpu = rec.gpu_timed();
        let kernel = Rc::new(Cell::new(None));
        if gpu {
            rec.boundary();
        }
        self.record(&mut rec)?;
        if gpu {
            rec.boundary();
            let slot = kernel.clone();
            rec.on_times(move |t| slot.set(t.last().copied()));
        }
        rec.submit()?;
        ctx.wait()?;
        let e2e = start.elapsed().as_secs_f64();
        Ok((kernel.get(), e2e))
    }

    /// Runs the CPU reference (f64) of the op on every tensor of the workload once
    /// (the copy has none).
    pub fn run_reference(&self) -> Result<()> {
        self.items.iter().try_for_each(|item| item.reference())
    }
}

/// The median of `xs` (`NaN` when empty).
pub fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// A peer library measured on the same adapter in the same run (the `benches/peer`
/// crate implements it with burn).
pub trait Peer {
    /// The peer's name, e.g. `burn 0.22 (wgpu)`.
    fn name(&self) -> String;
    /// The median end-to-end seconds of the peer's version of `case` (run to
    /// completion, as wgnorm's end-to-end time), or `None` where it has none.
    fn seconds(&mut self, case: &Case, samples: usize) -> Option<f64>;
}

/// What [`run`] measures and how often.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The cases, in order (copies are added as needed for the yardstick).
    pub cases: Vec<Case>,
    /// Timed runs per case (the median is reported). Default 5.
    pub samples: usize,
    /// Untimed runs first. Default 1.
    pub warmup: usize,
    /// Keep warming up until this many seconds have passed (at least `warmup` runs):
    /// a GPU raises its clocks only after some time under load. Default 0.
    pub warmup_s: f64,
    /// Time the CPU reference too (one run per case). Default true.
    pub reference: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            cases: suite(),
            samples: 5,
            warmup: 1,
            warmup_s: 0.0,
            reference: true,
        }
    }
}

impl RunOptions {
    /// On hardware GPUs: at least 30 samples after at least 5 warm-up runs and 0.3 s of
    /// warm-up, and no CPU reference between them (an idle GPU lowers its clocks while
    /// the CPU works, which made the same kernel vary up to 2.3x between runs on an
    /// H100).
    pub fn for_gpu(mut self) -> Self {
        self.samples = self.samples.max(30);
        self.warmup = self.warmup.max(5);
        self.warmup_s = self.warmup_s.max(0.3);
        self.reference = false;
        self
    }

    /// The short version the report example runs (a few minutes on lavapipe):
    /// every op, the ResNet-50 weights and the 4096 x 4096 linear weight for the
    /// weight ops, both batch-norm layouts, 3 samples; in f16 and bf16 the
    /// single-tensor workloads only.
    pub fn short() -> Self {
        let keep = |w: &Workload| {
            w.name != "embedding_50000x512" && (w.dtype == DType::F32 || w.shapes.len() == 1)
        };
        RunOptions {
            cases: suite().into_iter().filter(|c| keep(&c.workload)).collect(),
            samples: 3,
            warmup: 1,
            warmup_s: 0.0,
            reference: true,
        }
    }
}

/// One measured case.
#[derive(Clone, Debug)]
pub struct Row {
    /// The case.
    pub case: Case,
    /// Median kernel seconds (GPU timestamps), where available.
    pub kernel_s: Option<f64>,
    /// Fastest kernel seconds of the samples, where available.
    pub kernel_min_s: Option<f64>,
    /// Median end-to-end seconds.
    pub end_to_end_s: f64,
    /// The yardstick on the same workload, kernel and end-to-end seconds: the faster
    /// of the copy kernel and the driver's buffer copy (by kernel time).
    pub copy: (Option<f64>, f64),
    /// CPU reference seconds (one run).
    pub reference_s: Option<f64>,
    /// The peer's median end-to-end seconds.
    pub peer_s: Option<f64>,
}

impl Row {
    /// Seconds the bandwidth figures use: kernel time where both the op and the copy
    /// have it, else end-to-end.
    pub fn seconds(&self) -> (f64, f64) {
        match (self.kernel_s, self.copy.0) {
            (Some(k), Some(c)) => (k, c),
            _ => (self.end_to_end_s, self.copy.1),
        }
    }

    /// Minimum bytes over time, in GB/s.
    pub fn gb_per_s(&self) -> f64 {
        self.case.min_bytes() as f64 / self.seconds().0 / 1e9
    }

    /// The op's bandwidth over the copy kernel's on the same workload (a copy of the
    /// same type).
    pub fn copy_fraction(&self) -> f64 {
        let (op, copy) = self.seconds();
        let w = &self.case.workload;
        let copy_bytes = 2.0 * (w.elements() * w.element_bytes()) as f64;
        (self.case.min_bytes() as f64 / op) / (copy_bytes / copy)
    }

    /// How many times faster than the CPU reference (end to end).
    pub fn vs_reference(&self) -> Option<f64> {
        self.reference_s.map(|r| r / self.end_to_end_s)
    }

    /// How many times faster than the peer (end to end against end to end).
    pub fn vs_peer(&self) -> Option<f64> {
        self.peer_s.map(|p| p / self.end_to_end_s)
    }
}

/// The two copies measured on one workload; the faster is every row's yardstick.
#[derive(Clone, Debug)]
pub struct Yardstick {
    /// The workload's name.
    pub workload: String,
    /// Median seconds of the copy kernel (GPU timestamps).
    pub copy_kernel_s: Option<f64>,
    /// Median seconds of the driver's `copy_buffer_to_buffer`.
    pub driver_copy_s: Option<f64>,
    /// Bytes a copy moves (read and written).
    pub bytes: u64,
}

/// The result of [`run`].
#[derive(Clone, Debug)]
pub struct Report {
    /// Both copies on every workload.
    pub yardsticks: Vec<Yardstick>,
    /// The adapter, as [`Context::info`] prints it.
    pub adapter: String,
    /// Its name and backend, for plot titles.
    pub adapter_name: String,
    /// Whether kernel times come from GPU timestamps.
    pub timestamps: bool,
    /// The peer's name, if one was measured.
    pub peer: Option<String>,
    /// One row per case.
    pub rows: Vec<Row>,
}

/// Measures `options.cases` on `ctx` (and on `peer`), calling `progress` after each row.
pub fn run(
    ctx: &Context,
    options: &RunOptions,
    mut peer: Option<&mut dyn Peer>,
    mut progress: impl FnMut(&Row),
) -> Result<Report> {
    let mut copies: Vec<(Workload, Measured)> = Vec::new();
    let mut yardsticks = Vec::new();
    let mut rows = Vec::new();
    for case in &options.cases {
        if !copies.iter().any(|(w, _)| *w == case.workload) {
            let kernel = measure(&mut Prepared::new(ctx, &case.yardstick())?, options)?;
            let driver_case = Case {
                op: Op::DRIVER_COPY,
                workload: case.workload.clone(),
            };
            let w = &case.workload;
            let driver = measure(&mut Prepared::new(ctx, &driver_case)?, options)?;
            let faster = match (kernel.kernel, driver.kernel) {
                (Some(k), Some(d)) if d < k => driver,
                _ => kernel,
            };
            yardsticks.push(Yardstick {
                workload: w.label(),
                copy_kernel_s: kernel.kernel,
                driver_copy_s: driver.kernel,
                bytes: 2 * w.elements() * w.element_bytes(),
            });
            copies.push((case.workload.clone(), faster));
        }
        let copy = copies
            .iter()
            .find(|(w, _)| *w == case.workload)
            .map(|(_, c)| *c)
            .expect("measured above");
        let (measured, reference_s) = if case.op == Op::COPY {
            (copy, None)
        } else {
            let mut prepared = Prepared::new(ctx, case)?;
            let measured = measure(&mut prepared, options)?;
            // The reference is f64 whatever the type: run once, for the f32 rows.
            let reference_s = if options.reference && case.workload.dtype == DType::F32 {
                let start = Instant::now();
                prepared.run_reference()?;
                Some(start.elapsed().as_secs_f64())
            } else {
                None
            };
            (measured, reference_s)
        };
        // The peer (burn) runs f32 only.
        let peer_s = peer
            .as_deref_mut()
            .filter(|_| case.workload.dtype == DType::F32)
            .and_then(|p| p.seconds(case, options.samples));
        let row = Row {
            case: case.clone(),
            kernel_s: measured.kernel,
            kernel_min_s: measured.kernel_min,
            end_to_end_s: measured.end_to_end,
            copy: (copy.kernel, copy.end_to_end),
            reference_s,
            peer_s,
        };
        progress(&row);
        rows.push(row);
    }
    Ok(Report {
        yardsticks,
        adapter: ctx.info().to_string(),
        adapter_name: format!("{}, {:?}", ctx.info().name, ctx.info().backend),
        timestamps: Recording::new(ctx).gpu_timed(),
        peer: peer.map(|p| p.name()),
        rows,
    })
}

/// A prepared case's kernel seconds (median, minimum) and median end-to-end seconds.
fn measure(prepared: &mut Prepared<'_>, options: &RunOptions) -> Result<Measured> {
    let start = Instant::now();
    let mut runs = 0;
    while runs < options.warmup || start.elapsed().as_secs_f64() < options.warmup_s {
        prepared.run_timed()?;
        runs += 1;
    }
    let (mut kernel, mut e2e) = (Vec::new(), Vec::new());
    for _ in 0..options.samples.max(1) {
        let (k, e) = prepared.run_timed()?;
        kernel.extend(k);
        e2e.push(e);
    }
    let kernel_min = kernel.iter().copied().reduce(f64::min);
    let kernel = (!kernel.is_empty()).then(|| median(&kernel));
    Ok(Measured {
        kernel,
        kernel_min,
        end_to_end: median(&e2e),
    })
}

/// What [`measure`] returns.
#[derive(Clone, Copy, Debug)]
struct Measured {
    kernel: Option<f64>,
    kernel_min: Option<f64>,
    end_to_end: f64,
}

/// The word after `flag` in a command line (`--only bn_` gives `bn_`), if any.
pub fn arg_value(args: &[String], flag: &str) -> Option<String> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// The report's command line, shared by `examples/report.rs` and the peer crate:
/// `--full` (the whole suite, 5 samples; default the short version), `--out DIR`
/// (default `target/report`), `--only TEXT` (the ops whose name contains it), `--dtype
/// NAME` (the cases of one type: `f32`, `f16` or `bf16`). Runs on
/// [`Context::headless`], prints progress and the table, writes `table.md`,
/// `copy_fraction.svg` and `speedups.svg` into the output directory.
pub fn report_main(
    peer: Option<&mut dyn Peer>,
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| arg_value(&args, flag);
    let full = args.iter().any(|a| a == "--full");
    let out = std::path::PathBuf::from(value("--out").unwrap_or_else(|| "target/report".into()));
    let mut options = if full {
        RunOptions::default()
    } else {
        RunOptions::short()
    };
    let ctx = Context::headless()?;
    if !ctx.info().is_software() {
        options = options.for_gpu();
    }
    if let Some(n) = value("--samples").and_then(|v| v.parse().ok()) {
        options.samples = n;
    }
    if args.iter().any(|a| a == "--reference") {
        options.reference = true;
    }
    if args.iter().any(|a| a == "--no-reference") {
        options.reference = false;
    }
    if let Some(only) = value("--only") {
        options
            .cases
            .retain(|c| c.op.name().contains(only.as_str()));
    }
    if let Some(dtype) = value("--dtype") {
        options
            .cases
            .retain(|c| c.workload.dtype.name() == dtype.as_str());
    }
    println!("adapter: {}", ctx.info());
    let start = Instant::now();
    let report = run(&ctx, &options, peer, |row| {
        eprintln!(
            "  {:<17} {:<20} {:>5.2} of copy bandwidth{}",
            row.case.op.name(),
            row.case.workload.name,
            row.copy_fraction(),
            row.vs_peer()
                .map_or(String::new(), |x| format!(", {x:.2}x the peer"))
        )
    })?;
    println!(
        "\n{} version, median and minimum of {} samples after {} warm-up runs, kernel time from {}:\n",
        if full { "full" } else { "short" },
        options.samples,
        options.warmup,
        if report.timestamps {
            "GPU timestamps"
        } else {
            "the wall clock (no timestamp queries)"
        }
    );
    print!("{}", report.table());
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("copy_fraction.svg"), report.svg_copy_fraction())?;
    std::fs::write(out.join("speedups.svg"), report.svg_speedups())?;
    std::fs::write(out.join("table.md"), report.table())?;
    println!(
        "\ntable and plots in {} ({:.0} s)",
        out.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suite_covers_every_op_on_its_workloads() {
        let cases = suite();
        for op in Op::all() {
            let n = cases.iter().filter(|c| c.op == op).count();
            assert_eq!(n, 3 * op.workloads().len(), "{op:?}: f32, f16, bf16");
        }
        // ResNet-50's 53 weights, 23.5M elements; the copy moves 8 bytes per element.
        let resnet = Case {
            op: Op::COPY,
            workload: Workload::resnet50(),
        };
        assert_eq!(resnet.min_bytes(), 8 * 23_454_912);
        let bn = Case {
            op: Op::named("bn_forward_train").unwrap(),
            workload: Workload::activations()[0].clone(),
        };
        assert_eq!(bn.min_bytes(), 12 * 32 * 64 * 56 * 56);
        let half = Case {
            workload: bn.workload.clone().with_dtype(DType::BF16),
            ..bn
        };
        assert_eq!(half.min_bytes(), 6 * 32 * 64 * 56 * 56);
        assert_eq!(half.workload.label(), "nchw_32x64x56x56_bf16");
    }

    #[test]
    fn registry_names_are_unique_and_found() {
        let all = Op::all();
        assert_eq!(all[0], Op::COPY);
        for (i, op) in all.iter().enumerate() {
            assert!(
                all[..i].iter().all(|o| o.name() != op.name()),
                "{op:?} twice"
            );
            assert_eq!(Op::named(op.name()), Some(*op));
            assert!(op.bytes_per_element() >= 8 && !op.description().is_empty());
        }
        assert_eq!(Op::named("driver_copy"), Some(Op::DRIVER_COPY));
        assert!(!all.contains(&Op::DRIVER_COPY) && Op::named("nope").is_none());
    }

    /// Every registered op prepares, runs and runs its reference on a small tensor of
    /// its kind (on the default adapter).
    #[test]
    fn every_op_runs_on_a_small_workload() {
        let ctx = Context::headless().expect("an adapter");
        for op in Op::all().into_iter().chain([Op::DRIVER_COPY]) {
            let workload = if op.on_activations() {
                Workload::single("small", &[2, 3, 4, 5], 1)
            } else {
                Workload::single("small", &[6, 5, 3, 3], 0)
            };
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let workload = workload.clone().with_dtype(dtype);
                let case = Case { op, workload };
                let mut prepared = Prepared::new(&ctx, &case).expect("prepare");
                prepared
                    .run()
                    .unwrap_or_else(|e| panic!("{op:?} {dtype}: {e}"));
                prepared
                    .run_timed()
                    .unwrap_or_else(|e| panic!("{op:?} {dtype}: {e}"));
                prepared
                    .run_reference()
                    .unwrap_or_else(|e| panic!("{op:?} {dtype}: {e}"));
            }
        }
    }

    #[test]
    fn fractions_and_ratios() {
        let row = Row {
            case: Case {
                op: Op::named("ws_backward").unwrap(),
                workload: Workload::single("x", &[1000], 0),
            },
            kernel_s: Some(3e-3),
            kernel_min_s: Some(2.9e-3),
            end_to_end_s: 4e-3,
            copy: (Some(1e-3), 2e-3),
            reference_s: Some(8e-3),
            peer_s: None,
        };
        // 12 bytes in 3 ms against 8 bytes in 1 ms.
        assert!((row.copy_fraction() - 0.5).abs() < 1e-12);
        assert!((row.gb_per_s() - 12e3 / 3e-3 / 1e9).abs() < 1e-12);
        assert_eq!(row.vs_reference(), Some(2.0));
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn report_table_and_plots_have_a_row_per_case() {
        let row = |op, kernel: f64| Row {
            case: Case {
                op,
                workload: Workload::single("w<1>", &[1000], 0),
            },
            kernel_s: Some(kernel),
            kernel_min_s: Some(kernel * 0.5),
            end_to_end_s: kernel * 2.0,
            copy: (Some(1e-3), 2e-3),
            reference_s: Some(1e-2),
            peer_s: (op.name() == "wn_forward").then_some(4e-3),
        };
        let report = Report {
            yardsticks: vec![Yardstick {
                workload: "w<1>".into(),
                copy_kernel_s: Some(1e-3),
                driver_copy_s: Some(2e-3),
                bytes: 8_000_000,
            }],
            adapter: "test adapter".into(),
            adapter_name: "test".into(),
            timestamps: true,
            peer: Some("peer".into()),
            rows: vec![
                row(Op::COPY, 1e-3),
                row(Op::named("ws_forward").unwrap(), 2e-3),
                row(Op::named("wn_forward").unwrap(), 1e-3),
            ],
        };
        let table = report.table();
        // Header and 3 rows, a blank line, the yardsticks' sentence, blank, header, 1 row.
        assert_eq!(table.lines().count(), 2 + 3 + 3 + 3, "{table}");
        // WN forward: 8 bytes in 1 ms against the copy's 8 in 1 ms; 2x the peer.
        assert!(
            table.contains(
                "| wn_forward | w<1> | 0.0 MB | 1.00 ms | 500.0 us | 2.00 ms | 0.01 | 1.00 | 5.00x | 2.00x |"
            ),
            "{table}"
        );
        assert!(
            table.contains("| w<1> | 1.00 ms (8 GB/s) | 2.00 ms (4 GB/s) |"),
            "{table}"
        );
        let bars = report.svg_copy_fraction();
        // The background, then one bar per op (not the copy); names escaped.
        assert_eq!(bars.matches("<rect").count(), 1 + 2);
        assert!(bars.contains("w&lt;1&gt;") && bars.contains("target 0.7"));
        let speedups = report.svg_speedups();
        // Two against the reference, one against the peer.
        assert_eq!(speedups.matches("<rect").count(), 1 + 3);
    }
}
