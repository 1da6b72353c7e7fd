//! Spectral Normalization: `W / sigma(W)`, sigma from a power iteration with a
//! persistent vector `u`.

use bytemuck::{Pod, Zeroable};

use super::channel_stats::{record_dot, record_sums, vec4_buffer, ReducePlan};
use super::copy::record_copy;
use super::element::{record_elementwise, Extra};
use super::layout::{check_channel_input, row_windows, ChannelLayout, RowGeometry, RowWindow};
use crate::error::{Error, Result};
use crate::gpu::{Bind, Context, Kernel, PlanLimits, Recording, Tensor};

const OP: &str = "spectral_norm";

/// Columns per workgroup of the `M^T u` kernel (`TILE` in shaders/spectral_norm.wgsl).
const COLUMN_TILE: u64 = 64;

/// Columns per workgroup of `mtv_combine` (`COMBINE_COLS` in shaders/spectral_norm.wgsl).
const COMBINE_COLS: u64 = 16;

/// Partial sums per column of `M^T u`, at most (rows are split into this many blocks),
/// on software adapters; four times as many on GPUs.
const MAX_ROW_BLOCKS: u64 = 64;

/// Power iterations PyTorch runs when it registers spectral norm on a weight.
pub const PYTORCH_WARMUP_ITERATIONS: u32 = 15;

/// Which framework's power iteration [`SpectralNorm`] follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpectralFlavor {
    /// Chainer's `link_hooks.SpectralNormalization`: normalize as `x / (||x|| + eps)`;
    /// each iteration computes `v` from `u` first; iterations also run in evaluation,
    /// but the new `u` is kept only in training. `u` starts as a raw standard normal
    /// vector; `v` is not state.
    Chainer,
    /// PyTorch's `torch.nn.utils.parametrizations.spectral_norm`: normalize as
    /// `x / max(||x||, eps)`; each iteration computes `u` from `v` first; no iteration
    /// in evaluation. `u` and `v` start as normalized standard normal vectors followed
    /// by [`PYTORCH_WARMUP_ITERATIONS`] iterations.
    PyTorch,
}

/// Spectral Normalization, after Chainer's `link_hooks.SpectralNormalization` and
/// PyTorch's `spectral_norm`: `W_sn = gamma * W / sigma`, where `sigma = u^T M v` is
/// the power-iteration estimate of the largest singular value of `M`, the weight with
/// `axis` moved to the front and the other axes flattened (no copy is made).
///
/// Defaults (`SpectralNorm::default()` is Chainer's): `n_power_iterations = 1`,
/// `eps = 1e-6` (PyTorch: `1e-12`), `axis = 0` (1 for deconvolution weights),
/// `factor = None`, `use_gamma = false`.
///
/// Degenerate weights: when `|sigma|` is below the smallest normal f32 (an all-zero
/// weight, or `u` orthogonal to every column of `M`), the weight passes through
/// unscaled, `W_sn = gamma * W`, with gradient `gamma * grad`, and `sigma` reads as
/// computed (0). Both frameworks return NaN there; this never produces NaN or Inf.
/// A negative sigma (PyTorch's evaluation with arbitrary stored `u`, `v`) is used as
/// it is, as PyTorch does.
///
/// ```no_run
/// # fn main() -> wgnorm::Result<()> {
/// use wgnorm::{Context, SpectralNorm, Tensor};
/// let ctx = Context::headless()?;
/// let w = Tensor::from_array(&ctx, &ndarray::Array4::<f32>::ones((64, 32, 3, 3)))?;
/// let sn = SpectralNorm::default(); // Chainer
/// let mut state = sn.init_state(&ctx, &w, 0)?; // u from a seeded normal
/// let out = sn.forward(&ctx, &w, &mut state, true)?; // training: u is updated
/// let sigma = out.sigma.to_array(&ctx)?[0];
/// # let _ = sigma; Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SpectralNorm {
    /// The power iteration and normalization of one framework. Default Chainer.
    pub flavor: SpectralFlavor,
    /// Power iterations per training forward (and per Chainer evaluation forward).
    /// Default 1; must be at least 1.
    pub n_power_iterations: u32,
    /// Added to (Chainer) or floor of (PyTorch) each vector's norm. Default 1e-6
    /// (Chainer), 1e-12 (PyTorch); must be finite and positive.
    pub eps: f32,
    /// The axis of `W` that becomes the rows of `M`: 0, or 1 for deconvolution
    /// weights `[in, out, ...]` (any axis is accepted). Default 0.
    pub axis: usize,
    /// Chainer's `factor`: sigma is divided by it, so `W_sn = W * factor / sigma`.
    /// Default `None` (1).
    pub factor: Option<f32>,
    /// Chainer's `use_gamma`: multiply by a learned scalar `gamma`, initialised by
    /// [`Self::init_state`] to the largest singular value of the initial weight.
    /// Default false.
    pub use_gamma: bool,
}

impl Default for SpectralNorm {
    fn default() -> Self {
        Self::chainer()
    }
}

/// The persistent state of one spectrally normalized weight, on the GPU.
///
/// PyTorch's names: `weight_u` is `u`, `weight_v` is `v`. Write it by replacing the
/// tensors (lengths are checked at the next forward); read it with `to_array`.
#[derive(Clone, Debug)]
pub struct SpectralNormState {
    /// The left singular vector estimate, length `M.rows` (`W.shape[axis]`).
    pub u: Tensor,
    /// The right singular vector estimate, length `M.cols`. PyTorch's state; for
    /// Chainer the last training forward's `v` (Chainer does not persist it).
    pub v: Tensor,
    /// `gamma`, shape `[1]`, when `use_gamma`.
    pub gamma: Option<Tensor>,
    /// Sigma of the last forward (after `factor`), shape `[1]`; `None` before the first.
    pub sigma: Option<Tensor>,
}

/// What a forward produced: the normalized weight and the vectors and sigma it used,
/// which its backward needs (they differ from the state in evaluation).
#[derive(Clone, Debug)]
pub struct SpectralNormOutput {
    /// `gamma * W / sigma`, the shape of `W`.
    pub weight: Tensor,
    /// The `u` this forward used.
    pub u: Tensor,
    /// The `v` this forward used.
    pub v: Tensor,
    /// Sigma (divided by `factor`), shape `[1]`.
    pub sigma: Tensor,
}

/// The result of [`SpectralNorm::estimate_sigma`].
#[derive(Clone, Debug)]
pub struct SigmaEstimate {
    /// The last estimate of the largest singular value (no `factor`).
    pub sigma: f32,
    /// Power iterations run.
    pub iterations: usize,
    /// Whether sigma changed by at most `rtol` (relative) in one iteration.
    pub converged: bool,
    /// The final `u`, length `M.rows`.
    pub u: Tensor,
    /// The final `v`, length `M.cols`.
    pub v: Tensor,
}

// Mirrors `ColumnParams` in shaders/spectral_norm.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct ColumnParams {
    rows: u32,
    inner: u32,
    rj: u32,
    cols: u32,
    row_block: u32,
    r0: u32,
    nr: u32,
    c0: u32,
    nc: u32,
    bind_start: u32,
    tiles: u32,
    _pad: u32,
}

// Mirrors `CombineParams` in shaders/spectral_norm.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct CombineParams {
    cols: u32,
    blocks: u32,
    _pad: [u32; 2],
}

// Mirrors `VectorParams` in shaders/spectral_norm.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct VectorParams {
    n: u32,
    eps: f32,
    pytorch: u32,
    write_sigma: u32,
    factor: f32,
    sigma_index: u32,
    keep: u32,
    parts: u32,
    dot: u32,
    _pad: [u32; 3],
}

/// Vectors longer than this are normalized (and dotted) by many workgroups
/// (`vec_partials`, then one workgroup per chunk) instead of one.
const WIDE_VECTOR: u64 = 16 * 1024;

/// Elements per workgroup of `vec_partials` and of the wide `normalize`
/// (`VEC_CHUNK` in shaders/spectral_norm.wgsl).
const VEC_CHUNK: u64 = 4096;

/// For a vector of `n` elements (`raw`, a vec4 per element), the partials
/// `(sum x^2, sum x * vector)` per chunk when it is long (see [`WIDE_VECTOR`]); `None`
/// when one workgroup does the whole vector.
fn record_vector_partials(
    rec: &mut Recording<'_>,
    params: &VectorParams,
    raw: &wgpu::Buffer,
    vector: Option<&Tensor>,
) -> Result<Option<(wgpu::Buffer, u64)>> {
    let n = u64::from(params.n);
    if n <= WIDE_VECTOR {
        return Ok(None);
    }
    let ctx = rec.context();
    let parts = n.div_ceil(VEC_CHUNK);
    let partials = vec4_buffer(ctx, OP, parts)?;
    let params = VectorParams {
        dot: u32::from(vector.is_some()),
        ..*params
    };
    rec.dispatch(
        Kernel::SnVecPartials,
        &params,
        &[
            Bind::elems(raw, n * 4),
            vector.map_or(Bind::elems(&ctx.dummy, 1), |v| Bind::elems(v.buffer(), n)),
            Bind::elems(&partials, parts * 4),
        ],
        parts,
    )?;
    Ok(Some((partials, parts)))
}

// Mirrors `GradCoefParams` in shaders/spectral_norm.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct GradCoefParams {
    slices: u32,
    use_gamma: u32,
    factor: f32,
    _pad: u32,
}

/// A box of the `M^T u` reduction: rows `[r0, r0 + nr)`, columns `[c0, c0 + nc)`, and
/// the binding window that holds them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ColumnBox {
    pub r0: u64,
    pub nr: u64,
    pub c0: u64,
    pub nc: u64,
    pub bind_start: u64,
    pub bind_len: u64,
}

/// `W` as the matrix `M`: `W` viewed as `[A, R, J]`, `M[r, a * J + j] = W[a, r, j]`,
/// and how the two matrix-vector products are split.
#[derive(Clone, Debug)]
pub(crate) struct Matrix {
    /// `[batch 1, outer A, channels R, inner J]`.
    pub layout: ChannelLayout,
    /// Rows per partial of `M^T u`.
    pub row_block: u64,
    /// Row blocks: partials per column.
    pub blocks: u64,
    /// The boxes of `M^T u`.
    pub boxes: Vec<ColumnBox>,
    /// The split of `M v`.
    pub rows_plan: ReducePlan,
    /// When `M`'s rows are contiguous and short (axis 0, see `row_windows`), `M v`
    /// by the row kernel instead: `tpr` threads per row, one read of each row.
    pub row_windows: Option<Vec<RowWindow>>,
}

impl Matrix {
    pub fn new(shape: &[usize], axis: usize, eps: f32, limits: &PlanLimits) -> Result<Self> {
        let layout = check_channel_input(OP, "weight", "axis", shape, axis, eps)?;
        let (a_n, r_n, j_n) = (layout.outer, layout.channels, layout.inner);
        let cols = a_n * j_n;
        if layout.len() > u64::from(u32::MAX) {
            return Err(Error::TooLarge {
                op: OP,
                problem: format!("a weight of {} elements (at most 2^32 - 1)", layout.len()),
            });
        }
        if r_n > limits.max_binding_elems || cols > limits.max_binding_elems {
            return Err(Error::TooLarge {
                op: OP,
                problem: format!(
                    "M is {r_n} x {cols}; u and v must each fit one binding of {} elements",
                    limits.max_binding_elems
                ),
            });
        }
        let align = limits.align_elems.max(1);
        let window = limits.max_binding_elems.saturating_sub(align);
        if window < COLUMN_TILE {
            return Err(Error::TooLarge {
                op: OP,
                problem: format!(
                    "storage bindings of {} elements are too small",
                    limits.max_binding_elems
                ),
            });
        }
        let rj = r_n * j_n;
        // Row blocks: at most MAX_ROW_BLOCKS partials per column, and the partials
        // ([blocks, cols]) within one binding. Boxes may split a block.
        // GPUs need more workgroups in flight for tall matrices (the 50000 x 512
        // embedding has 8 column tiles); a CPU adapter pays for each one.
        let max_row_blocks = if limits.tuning.coalesced {
            4 * MAX_ROW_BLOCKS
        } else {
            MAX_ROW_BLOCKS
        };
        let max_blocks = max_row_blocks.min(limits.max_binding_elems / cols).max(1);
        let row_block = r_n.div_ceil(max_blocks).max(32).min(r_n);
        let blocks = r_n.div_ceil(row_block);
        let mut boxes = Vec::new();
        let mut push = |r0: u64, nr: u64, c0: u64, nc: u64, start: u64, end: u64| {
            let bind_start = start / align * align;
            boxes.push(ColumnBox {
                r0,
                nr,
                c0,
                nc,
                bind_start,
                bind_len: end - bind_start,
            });
        };
        if a_n * rj <= window {
            push(0, r_n, 0, cols, 0, a_n * rj);
        } else if rj <= window {
            // Whole [R, J] matrices of several `a`.
            let per_box = window / rj;
            let mut a = 0;
            while a < a_n {
                let na = per_box.min(a_n - a);
                push(0, r_n, a * j_n, na * j_n, a * rj, (a + na) * rj);
                a += na;
            }
        } else {
            for a in 0..a_n {
                let base = a * rj;
                if j_n <= window {
                    // Runs of whole rows.
                    let per_box = window / j_n;
                    let mut r = 0;
                    while r < r_n {
                        let nr = per_box.min(r_n - r);
                        push(r, nr, a * j_n, j_n, base + r * j_n, base + (r + nr) * j_n);
                        r += nr;
                    }
                } else {
                    // A row longer than a window: column ranges of single rows.
                    let per_box = window / COLUMN_TILE * COLUMN_TILE;
                    for r in 0..r_n {
                        let mut j = 0;
                        while j < j_n {
                            let nj = per_box.min(j_n - j);
                            let start = base + r * j_n + j;
                            push(r, 1, a * j_n + j, nj, start, start + nj);
                            j += nj;
                        }
                    }
                }
            }
        }
        let rows_plan = ReducePlan::new(OP, layout, limits)?;
        Ok(Matrix {
            layout,
            row_block,
            blocks,
            boxes,
            rows_plan,
            row_windows: row_windows(layout, limits),
        })
    }

    /// Rows of `M`: the length of `u`.
    pub fn rows(&self) -> u64 {
        self.layout.channels
    }

    /// Columns of `M`: the length of `v`.
    pub fn cols(&self) -> u64 {
        self.layout.outer * self.layout.inner
    }
}

/// Where a normalized vector goes, besides the working buffer.
struct Normalized<'a> {
    out: &'a Tensor,
    keep: Option<&'a Tensor>,
    sigma: Option<(&'a wgpu::Buffer, u32)>,
}

impl SpectralNorm {
    /// Chainer's defaults: 1 iteration, `eps = 1e-6`, axis 0, no factor, no gamma.
    pub fn chainer() -> Self {
        SpectralNorm {
            flavor: SpectralFlavor::Chainer,
            n_power_iterations: 1,
            eps: 1e-6,
            axis: 0,
            factor: None,
            use_gamma: false,
        }
    }

    /// PyTorch's defaults: 1 iteration, `eps = 1e-12`, `dim` 0 (PyTorch picks 1 for
    /// `ConvTranspose` modules; set `axis` to match).
    pub fn pytorch() -> Self {
        SpectralNorm {
            flavor: SpectralFlavor::PyTorch,
            n_power_iterations: 1,
            eps: 1e-12,
            axis: 0,
            factor: None,
            use_gamma: false,
        }
    }

    /// `(rows, cols)` of `M` for a weight of shape `shape`: the lengths of `u` and `v`.
    pub fn matrix_shape(&self, shape: &[usize]) -> Result<(usize, usize)> {
        let layout = check_channel_input(OP, "weight", "axis", shape, self.axis, self.eps)?;
        Ok((
            layout.channels as usize,
            (layout.outer * layout.inner) as usize,
        ))
    }

    fn check(&self) -> Result<f32> {
        if self.n_power_iterations == 0 {
            return Err(Error::input(OP, "n_power_iterations must be at least 1"));
        }
        let factor = self.factor.unwrap_or(1.0);
        if !factor.is_finite() || factor <= 0.0 {
            return Err(Error::input(
                OP,
                format!("factor must be finite and positive, got {factor}"),
            ));
        }
        Ok(factor)
    }

    fn matrix(&self, ctx: &Context, shape: &[usize]) -> Result<Matrix> {
        self.check()?;
        Matrix::new(shape, self.axis, self.eps, &ctx.limits)
    }

    fn check_vector(&self, what: &str, t: &Tensor, len: u64, shape: &[usize]) -> Result<()> {
        if t.shape() != [len as usize] {
            return Err(Error::input(
                OP,
                format!(
                    "{what} has shape {:?}; for a weight of shape {shape:?} on axis {} it must be [{len}]",
                    t.shape(),
                    self.axis
                ),
            ));
        }
        Ok(())
    }

    fn check_state(&self, m: &Matrix, state: &SpectralNormState, shape: &[usize]) -> Result<()> {
        self.check_vector("u", &state.u, m.rows(), shape)?;
        self.check_vector("v", &state.v, m.cols(), shape)?;
        self.check_gamma(state)
    }

    fn check_gamma(&self, state: &SpectralNormState) -> Result<()> {
        match (&state.gamma, self.use_gamma) {
            (None, true) => Err(Error::input(
                OP,
                "use_gamma is set but the state has no gamma (make it with init_state)",
            )),
            (Some(g), true) if g.shape() != [1] => Err(Error::input(
                OP,
                format!("gamma must have shape [1], got {:?}", g.shape()),
            )),
            _ => Ok(()),
        }
    }

    /// A fresh state for `weight`, seeded: Chainer's `u` is a standard normal vector;
    /// PyTorch's `u` and `v` are normalized standard normal vectors followed by
    /// [`PYTORCH_WARMUP_ITERATIONS`] power iterations on the GPU. With `use_gamma`,
    /// gamma is the largest singular value of `weight`, from
    /// [`Self::estimate_sigma`] (relative tolerance 1e-6, at most 2000 iterations)
    /// instead of Chainer's SVD.
    pub fn init_state(
        &self,
        ctx: &Context,
        weight: &Tensor,
        seed: u64,
    ) -> Result<SpectralNormState> {
        let m = self.matrix(ctx, weight.shape())?;
        let mut rng = crate::rng::Rng::new(seed);
        let mut u = rng.normal_vec(m.rows() as usize);
        let mut v = rng.normal_vec(m.cols() as usize);
        if self.flavor == SpectralFlavor::PyTorch {
            normalize_host(&mut u, self.eps);
            normalize_host(&mut v, self.eps);
        } else {
            v.iter_mut().for_each(|x| *x = 0.0);
        }
        let u = Tensor::from_slice(ctx, &[u.len()], &u)?;
        let v = Tensor::from_slice(ctx, &[v.len()], &v)?;
        let mut state = SpectralNormState {
            u,
            v,
            gamma: None,
            sigma: None,
        };
        if self.flavor == SpectralFlavor::PyTorch {
            ctx.run(|rec| {
                self.record_iterations(rec, &m, weight, &state, PYTORCH_WARMUP_ITERATIONS, true)
                    .map(|_| ())
            })?;
        }
        if self.use_gamma {
            let est = self.estimate_sigma(ctx, weight, &state.u, 1e-6, 2000)?;
            state.gamma = Some(Tensor::from_slice(ctx, &[1], &[est.sigma])?);
        }
        Ok(state)
    }

    /// `gamma * W / sigma`. In training (`training = true`) the power iteration
    /// updates `state.u` and `state.v`; in evaluation the state is left as it is
    /// (Chainer still iterates, from the stored `u`; PyTorch uses `u` and `v` as
    /// stored). `state.sigma` is set to the output's sigma.
    pub fn forward(
        &self,
        ctx: &Context,
        weight: &Tensor,
        state: &mut SpectralNormState,
        training: bool,
    ) -> Result<SpectralNormOutput> {
        ctx.run(|rec| self.record_forward(rec, weight, state, training))
    }

    /// Gradients of `sum(W_sn * grad_output)` with respect to `W` (through sigma, with
    /// `u` and `v` constant, as both frameworks do) and, with `use_gamma`, `gamma`:
    /// `(grad_weight, grad_gamma)`. `forward` is what the forward returned.
    pub fn backward(
        &self,
        ctx: &Context,
        weight: &Tensor,
        grad_output: &Tensor,
        forward: &SpectralNormOutput,
        state: &SpectralNormState,
    ) -> Result<(Tensor, Option<Tensor>)> {
        ctx.run(|rec| self.record_backward(rec, weight, grad_output, forward, state))
    }

    /// Records [`Self::forward`]. Every check runs before anything is recorded; a
    /// refused call leaves the state untouched. The state changes when the recording
    /// is submitted.
    pub fn record_forward(
        &self,
        rec: &mut Recording<'_>,
        weight: &Tensor,
        state: &mut SpectralNormState,
        training: bool,
    ) -> Result<SpectralNormOutput> {
        let ctx = rec.context();
        let m = self.matrix(ctx, weight.shape())?;
        self.check_state(&m, state, weight.shape())?;
        let (u, v, sigma) = if training || self.flavor == SpectralFlavor::Chainer {
            self.record_iterations(rec, &m, weight, state, self.n_power_iterations, training)?
        } else {
            // PyTorch evaluation: sigma = u^T M v with u and v as stored.
            let sigma = Tensor::zeros(ctx, &[1])?;
            let mv = record_mv(rec, &m, weight, &state.v)?;
            let mut params = self.vector_params(m.rows(), Some(0), false);
            let partials = record_vector_partials(rec, &params, &mv, Some(&state.u))?;
            params.parts = partials.as_ref().map_or(0, |p| p.1 as u32);
            rec.dispatch(
                Kernel::SnDot,
                &params,
                &[
                    Bind::elems(&mv, m.rows() * 4),
                    Bind::elems(state.u.buffer(), m.rows()),
                    Bind::elems(sigma.buffer(), 1),
                    // Unused without partials: any read-only buffer (the dummy is
                    // bound read-write elsewhere).
                    partials
                        .as_ref()
                        .map_or(Bind::elems(&mv, 4), |(b, n)| Bind::elems(b, n * 4)),
                ],
                1,
            )?;
            (
                record_copy(rec, &state.u)?,
                record_copy(rec, &state.v)?,
                sigma,
            )
        };
        let out = Tensor::output(ctx, weight.shape())?;
        let gamma = state.gamma.as_ref().filter(|_| self.use_gamma);
        // One slice of every element: a length that is a multiple of 4 moves vec4s.
        record_elementwise(
            rec,
            Kernel::SnScale,
            &ChannelLayout::new(weight.shape(), None),
            &[weight.buffer()],
            &[
                Bind::elems(sigma.buffer(), 1),
                Bind::elems(gamma.unwrap_or(&sigma).buffer(), 1),
            ],
            out.buffer(),
            Extra {
                flag: u32::from(gamma.is_some()),
                aux: [0.0; 2],
            },
        )?;
        state.sigma = Some(sigma.clone());
        Ok(SpectralNormOutput {
            weight: out,
            u,
            v,
            sigma,
        })
    }

    /// Records [`Self::backward`].
    pub fn record_backward(
        &self,
        rec: &mut Recording<'_>,
        weight: &Tensor,
        grad_output: &Tensor,
        forward: &SpectralNormOutput,
        state: &SpectralNormState,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let ctx = rec.context();
        let factor = self.check()?;
        let m = self.matrix(ctx, weight.shape())?;
        if grad_output.shape() != weight.shape() {
            return Err(Error::input(
                OP,
                format!(
                    "grad_output has shape {:?} but the weight has shape {:?}",
                    grad_output.shape(),
                    weight.shape()
                ),
            ));
        }
        self.check_vector("the forward's u", &forward.u, m.rows(), weight.shape())?;
        self.check_vector("the forward's v", &forward.v, m.cols(), weight.shape())?;
        if forward.sigma.shape() != [1] {
            return Err(Error::input(OP, "the forward's sigma must have shape [1]"));
        }
        self.check_gamma(state)?;
        // <G, W> in one pass over both (per leading-axis slice, then summed).
        let sums_layout = ChannelLayout::new(weight.shape(), Some(0));
        let plan = ReducePlan::new(OP, sums_layout, &ctx.limits)?;
        let sums = record_sums(rec, OP, &plan, grad_output.buffer(), weight.buffer(), None)?;
        let gamma = state.gamma.as_ref().filter(|_| self.use_gamma);
        let grad_gamma = match gamma {
            Some(_) => Some(Tensor::zeros(ctx, &[1])?),
            None => None,
        };
        let coef = vec4_buffer(ctx, OP, 1)?;
        rec.dispatch(
            Kernel::SnGradCoef,
            &GradCoefParams {
                slices: sums_layout.slices() as u32,
                use_gamma: u32::from(gamma.is_some()),
                factor,
                _pad: 0,
            },
            &[
                Bind::elems(&sums, sums_layout.slices() * 4),
                Bind::elems(forward.sigma.buffer(), 1),
                Bind::elems(gamma.unwrap_or(&forward.sigma).buffer(), 1),
                Bind::elems(&coef, 4),
                Bind::elems(grad_gamma.as_ref().map_or(&*ctx.dummy, |t| t.buffer()), 1),
            ],
            1,
        )?;
        let grad = Tensor::output(ctx, weight.shape())?;
        // Rows of M's layout a multiple of 4 long: vec4s (a vec4 has one row r).
        record_elementwise(
            rec,
            Kernel::SnGrad,
            &m.layout,
            &[grad_output.buffer()],
            &[
                Bind::elems(forward.u.buffer(), m.rows()),
                Bind::elems(forward.v.buffer(), m.cols()),
                Bind::elems(&coef, 4),
            ],
            grad.buffer(),
            Extra::default(),
        )?;
        Ok((grad, grad_gamma))
    }

    /// Iterates from `u` (Chainer's order: `v = normalize(M^T u)`, then
    /// `u = normalize(M v)`, this flavor's normalization) until sigma changes by at
    /// most `rtol` times itself in one iteration, or `max_iterations` have run. The
    /// vectors and sigma stay on the GPU; convergence is read back after every chunk
    /// of 16 iterations (then 32, 64), so up to a chunk's worth of extra iterations
    /// may run, each only refining the estimate. `u` is not modified.
    pub fn estimate_sigma(
        &self,
        ctx: &Context,
        weight: &Tensor,
        u: &Tensor,
        rtol: f32,
        max_iterations: usize,
    ) -> Result<SigmaEstimate> {
        let m = self.matrix(ctx, weight.shape())?;
        self.check_vector("u", u, m.rows(), weight.shape())?;
        if max_iterations == 0 {
            return Err(Error::input(OP, "max_iterations must be at least 1"));
        }
        if !rtol.is_finite() || rtol < 0.0 {
            return Err(Error::input(
                OP,
                format!("rtol must be finite and >= 0, got {rtol}"),
            ));
        }
        let history = Tensor::zeros(ctx, &[max_iterations])?;
        let u_out = Tensor::zeros(ctx, &[m.rows() as usize])?;
        let v_out = Tensor::zeros(ctx, &[m.cols() as usize])?;
        let mut done = 0usize;
        let mut chunk = 16usize;
        loop {
            let n = chunk.min(max_iterations - done);
            ctx.run(|rec| {
                for k in 0..n {
                    let src = if done + k == 0 { u } else { &u_out };
                    self.record_v_from_u(
                        rec,
                        &m,
                        weight,
                        src,
                        Normalized {
                            out: &v_out,
                            keep: None,
                            sigma: None,
                        },
                        1.0,
                    )?;
                    self.record_u_from_v(
                        rec,
                        &m,
                        weight,
                        &v_out,
                        Normalized {
                            out: &u_out,
                            keep: None,
                            sigma: Some((history.buffer(), (done + k) as u32)),
                        },
                        1.0,
                    )?;
                }
                Ok(())
            })?;
            done += n;
            let sigmas: Vec<f32> = history.to_array(ctx)?.iter().take(done).copied().collect();
            let converged = sigmas
                .windows(2)
                .any(|p| (p[1] - p[0]).abs() <= rtol * p[1].abs());
            if converged || done == max_iterations {
                return Ok(SigmaEstimate {
                    sigma: sigmas[done - 1],
                    iterations: done,
                    converged,
                    u: u_out,
                    v: v_out,
                });
            }
            chunk = (chunk * 2).min(64);
        }
    }

    /// Records `n` power iterations from the state, into fresh `u`, `v` and sigma
    /// tensors; with `keep`, the final vectors are also written into the state.
    fn record_iterations(
        &self,
        rec: &mut Recording<'_>,
        m: &Matrix,
        weight: &Tensor,
        state: &SpectralNormState,
        n: u32,
        keep: bool,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let ctx = rec.context();
        let factor = self.check()?;
        let u = Tensor::zeros(ctx, &[m.rows() as usize])?;
        let v = Tensor::zeros(ctx, &[m.cols() as usize])?;
        let sigma = Tensor::zeros(ctx, &[1])?;
        for k in 0..n {
            let first = k == 0;
            let last = k + 1 == n;
            let keep_u = Some(&state.u).filter(|_| last && keep);
            let keep_v = Some(&state.v).filter(|_| last && keep);
            let sigma_at = Some((sigma.buffer(), 0)).filter(|_| last);
            match self.flavor {
                SpectralFlavor::Chainer => {
                    let src = if first { &state.u } else { &u };
                    self.record_v_from_u(
                        rec,
                        m,
                        weight,
                        src,
                        Normalized {
                            out: &v,
                            keep: keep_v,
                            sigma: None,
                        },
                        factor,
                    )?;
                    self.record_u_from_v(
                        rec,
                        m,
                        weight,
                        &v,
                        Normalized {
                            out: &u,
                            keep: keep_u,
                            sigma: sigma_at,
                        },
                        factor,
                    )?;
                }
                SpectralFlavor::PyTorch => {
                    let src = if first { &state.v } else { &v };
                    self.record_u_from_v(
                        rec,
                        m,
                        weight,
                        src,
                        Normalized {
                            out: &u,
                            keep: keep_u,
                            sigma: None,
                        },
                        factor,
                    )?;
                    self.record_v_from_u(
                        rec,
                        m,
                        weight,
                        &u,
                        Normalized {
                            out: &v,
                            keep: keep_v,
                            sigma: sigma_at,
                        },
                        factor,
                    )?;
                }
            }
        }
        Ok((u, v, sigma))
    }

    /// `v = normalize(M^T u)`: column partials, their sums, the normalization.
    fn record_v_from_u(
        &self,
        rec: &mut Recording<'_>,
        m: &Matrix,
        weight: &Tensor,
        u: &Tensor,
        to: Normalized<'_>,
        factor: f32,
    ) -> Result<()> {
        let ctx = rec.context();
        let l = m.layout;
        let cols = m.cols();
        let partials = ctx.storage_buffer(OP, m.blocks * cols, false)?;
        // Rows a multiple of 4 long and boxes starting at multiples of 4 columns and
        // elements: the vec4 kernel (quads of columns never straddle an `a`).
        let by4 = l.inner.is_multiple_of(4)
            && m.boxes.iter().all(|b| {
                b.c0.is_multiple_of(4) && b.nc.is_multiple_of(4) && b.bind_start.is_multiple_of(4)
            });
        let kernel = if by4 {
            Kernel::SnMtvPartialsVec4
        } else {
            Kernel::SnMtvPartials
        };
        for bx in &m.boxes {
            let tiles = bx.nc.div_ceil(COLUMN_TILE);
            rec.dispatch(
                kernel,
                &ColumnParams {
                    rows: l.channels as u32,
                    inner: l.inner as u32,
                    rj: (l.channels * l.inner) as u32,
                    cols: cols as u32,
                    row_block: m.row_block as u32,
                    r0: bx.r0 as u32,
                    nr: bx.nr as u32,
                    c0: bx.c0 as u32,
                    nc: bx.nc as u32,
                    bind_start: bx.bind_start as u32,
                    tiles: tiles as u32,
                    _pad: 0,
                },
                &[
                    Bind::window(weight.buffer(), bx.bind_start, bx.bind_len),
                    Bind::elems(u.buffer(), m.rows()),
                    Bind::elems(&partials, m.blocks * cols),
                ],
                tiles * ((bx.r0 + bx.nr).div_ceil(m.row_block) - bx.r0 / m.row_block),
            )?;
        }
        let raw = vec4_buffer(ctx, OP, cols)?;
        rec.dispatch(
            Kernel::SnMtvCombine,
            &CombineParams {
                cols: cols as u32,
                blocks: m.blocks as u32,
                _pad: [0; 2],
            },
            &[
                Bind::elems(&partials, m.blocks * cols),
                Bind::elems(&raw, cols * 4),
            ],
            cols.div_ceil(COMBINE_COLS),
        )?;
        self.record_normalize(rec, &raw, cols, to, factor)
    }

    /// `u = normalize(M v)`: row dots (row kernel or shared reduction), the normalization.
    fn record_u_from_v(
        &self,
        rec: &mut Recording<'_>,
        m: &Matrix,
        weight: &Tensor,
        v: &Tensor,
        to: Normalized<'_>,
        factor: f32,
    ) -> Result<()> {
        let raw = record_mv(rec, m, weight, v)?;
        self.record_normalize(rec, &raw, m.rows(), to, factor)
    }

    fn record_normalize(
        &self,
        rec: &mut Recording<'_>,
        raw: &wgpu::Buffer,
        n: u64,
        to: Normalized<'_>,
        factor: f32,
    ) -> Result<()> {
        let ctx = rec.context();
        let mut params = self.vector_params(n, to.sigma.map(|s| s.1), to.keep.is_some());
        params.factor = factor;
        let partials = record_vector_partials(rec, &params, raw, None)?;
        params.parts = partials.as_ref().map_or(0, |p| p.1 as u32);
        let (sigma_buf, sigma_len) = match to.sigma {
            Some((b, i)) => (b, u64::from(i) + 1),
            None => (&*ctx.dummy, 1),
        };
        rec.dispatch(
            Kernel::SnNormalize,
            &params,
            &[
                Bind::elems(raw, n * 4),
                Bind::elems(to.out.buffer(), n),
                match to.keep {
                    Some(t) => Bind::elems(t.buffer(), n),
                    None => Bind::elems(&ctx.dummy, 1),
                },
                Bind::elems(sigma_buf, sigma_len),
                // Unused without partials: any read-only buffer (the dummy may be
                // bound read-write above).
                partials
                    .as_ref()
                    .map_or(Bind::elems(raw, 4), |(b, n)| Bind::elems(b, n * 4)),
            ],
            partials.as_ref().map_or(1, |p| p.1),
        )
    }

    fn vector_params(&self, n: u64, sigma_index: Option<u32>, keep: bool) -> VectorParams {
        VectorParams {
            n: n as u32,
            eps: self.eps,
            pytorch: u32::from(self.flavor == SpectralFlavor::PyTorch),
            write_sigma: u32::from(sigma_index.is_some()),
            factor: self.factor.unwrap_or(1.0),
            sigma_index: sigma_index.unwrap_or(0),
            keep: u32::from(keep),
            parts: 0,
            dot: 0,
            _pad: [0; 3],
        }
    }
}

/// `x / max(||x||, eps)` on the host (PyTorch's `F.normalize`), for initial vectors.
fn normalize_host(x: &mut [f32], eps: f32) {
    let norm = x
        .iter()
        .map(|&a| f64::from(a) * f64::from(a))
        .sum::<f64>()
        .sqrt();
    let d = norm.max(f64::from(eps));
    x.iter_mut().for_each(|a| *a = (f64::from(*a) / d) as f32);
}

/// `M v` as a vec4 per row of `M` (the product in the first component): the row kernel
/// when `M`'s rows are contiguous and short, else the shared per-channel reduction.
fn record_mv(
    rec: &mut Recording<'_>,
    m: &Matrix,
    weight: &Tensor,
    v: &Tensor,
) -> Result<wgpu::Buffer> {
    let Some(windows) = &m.row_windows else {
        return record_dot(rec, OP, &m.rows_plan, weight.buffer(), v.buffer());
    };
    let out = vec4_buffer(rec.context(), OP, m.rows())?;
    let geo = RowGeometry::new(&m.layout, &rec.context().limits.tuning);
    let mut first_row = 0;
    for w in windows {
        rec.dispatch(
            geo.pick(Kernel::SnRowsDot),
            &geo.params(w, first_row),
            &[
                Bind::window(weight.buffer(), w.start, w.len),
                Bind::elems(v.buffer(), m.cols()),
                Bind::elems(&out, m.rows() * 4),
            ],
            geo.groups(w),
        )?;
        first_row += w.rows;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_mirror_the_wgsl_structs() {
        use crate::gpu::kernels::mirror;
        mirror!(
            "spectral_norm",
            ColumnParams,
            [rows, inner, rj, cols, row_block, r0, nr, c0, nc, bind_start, tiles]
        );
        mirror!("spectral_norm", CombineParams, [cols, blocks]);
        mirror!(
            "spectral_norm",
            VectorParams,
            [
                n,
                eps,
                pytorch,
                write_sigma,
                factor,
                sigma_index,
                keep,
                parts,
                dot
            ]
        );
        mirror!("spectral_norm", GradCoefParams, [slices, use_gamma, factor]);
    }

    fn limits(binding: u64) -> PlanLimits {
        PlanLimits {
            max_binding_elems: binding,
            align_elems: 64,
            max_groups_per_dim: 65535,
            max_buffer_bytes: u64::MAX,
            tuning: crate::gpu::Tuning {
                coalesced: false,
                reduce_item_elems: 16384,
            },
        }
    }

    /// Every element of M is in exactly one box, inside the box's window; partials fit
    /// one binding.
    fn check_cover(shape: &[usize], axis: usize, binding: u64) {
        let m = match Matrix::new(shape, axis, 1e-6, &limits(binding)) {
            Ok(m) => m,
            // u or v longer than a binding: refused, nothing to plan.
            Err(Error::TooLarge { .. }) => {
                let rows = shape[axis] as u64;
                let cols = shape.iter().product::<usize>() as u64 / rows;
                assert!(rows > binding || cols > binding, "{shape:?}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let (a_n, r_n, j_n) = (m.layout.outer, m.layout.channels, m.layout.inner);
        assert!(m.blocks * a_n * j_n <= binding, "{shape:?}");
        let mut seen = vec![0u8; (a_n * r_n * j_n) as usize];
        for bx in &m.boxes {
            assert!(bx.bind_len <= binding, "{shape:?} {bx:?}");
            for r in bx.r0..bx.r0 + bx.nr {
                for c in bx.c0..bx.c0 + bx.nc {
                    let (a, j) = (c / j_n, c % j_n);
                    let g = a * r_n * j_n + r * j_n + j;
                    assert!(g >= bx.bind_start && g < bx.bind_start + bx.bind_len);
                    seen[g as usize] += 1;
                }
            }
        }
        assert!(seen.iter().all(|&s| s == 1), "{shape:?} axis {axis}");
    }

    #[test]
    fn column_boxes_cover_the_matrix_once() {
        for binding in [1 << 30, 4096, 1024, 512, 330] {
            check_cover(&[37, 5, 3, 3], 0, binding);
            check_cover(&[7, 37, 3, 3], 1, binding);
            check_cover(&[3, 300], 0, binding); // rows longer than a 330 binding's window
            check_cover(&[700, 3], 0, binding);
            check_cover(&[2, 3, 4, 5, 6], 2, binding);
            check_cover(&[5, 9, 40], 1, binding);
        }
    }
}
