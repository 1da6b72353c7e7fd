//! Spectral Normalization: `W / sigma(W)`, sigma from a power iteration with a
//! persistent vector `u`.

use bytemuck::{Pod, Zeroable};

mod matrix;
mod power;

use self::matrix::{record_mv, Matrix};
use self::power::{normalize_host, record_vector_partials, Normalized};
use super::channel_stats::{record_sums, vec4_buffer, ReducePlan};
use super::copy::copy_internal;
use super::element::{record_elementwise, Extra, PerSlice};
use super::layout::{check_channel_input, check_weight_grad, ChannelLayout};
use crate::error::{Error, Result};
use crate::gpu::{Bind, Context, Kernel, Recording, Tensor};

const OP: &str = "spectral_norm";

/// Power iterations PyTorch runs when it registers spectral norm on a weight.
pub const PYTORCH_WARMUP_ITERATIONS: u32 = 15;

/// The gradients of a spectral-norm backward pass.
#[derive(Clone, Debug)]
pub struct SpectralNormGrads {
    /// With respect to the raw weight (through sigma, `u` and `v` held constant).
    pub weight: Tensor,
    /// With respect to gamma, with `use_gamma`.
    pub gamma: Option<Tensor>,
}

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
/// Types ([`DType`](crate::DType)): the weight and its gradient may be f32, f16 or
/// bf16, and the output and gradient come back in the weight's type, rounded once;
/// `u`, `v`, sigma and gamma are f32 whatever the weight's type (PyTorch keeps its
/// buffers `_u` and `_v` in f32 under autocast); half ones are refused.
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
        check_f32(what, t)?;
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
            (Some(g), _) => check_f32("gamma", g),
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
        ctx.check_tensors(OP, &[("weight", weight)])?;
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
    ) -> Result<SpectralNormGrads> {
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
        let mut tensors = vec![("weight", weight), ("u", &state.u), ("v", &state.v)];
        tensors.extend(state.gamma.as_ref().map(|g| ("gamma", g)));
        ctx.check_tensors(OP, &tensors)?;
        let m = self.matrix(ctx, weight.shape())?;
        self.check_state(&m, state, weight.shape())?;
        let (u, v, sigma) = if training || self.flavor == SpectralFlavor::Chainer {
            self.record_iterations(rec, &m, weight, state, self.n_power_iterations, training)?
        } else {
            // PyTorch evaluation: sigma = u^T M v with u and v as stored.
            let sigma = Tensor::output(ctx, &[1])?;
            let mv = record_mv(rec, &m, weight, &state.v)?;
            let mut params = self.vector_params(m.rows(), Some(0), false);
            let partials = record_vector_partials(rec, &params, &mv, Some(&state.u))?;
            params.parts = partials.as_ref().map_or(0, |p| p.1 as u32);
            rec.dispatch(
                Kernel::SnDot,
                &params,
                &[
                    // Read only without partials (a short vector).
                    Bind::elems(&mv, if partials.is_some() { 4 } else { m.rows() * 4 }),
                    Bind::elems(&state.u, if partials.is_some() { 1 } else { m.rows() }),
                    Bind::elems(&sigma, 1),
                    // Unused without partials: any read-only buffer (the dummy is
                    // bound read-write elsewhere).
                    partials
                        .as_ref()
                        .map_or(Bind::elems(&mv, 4), |(b, n)| Bind::elems(b, n * 4)),
                ],
                1,
            )?;
            (
                copy_internal(rec, &state.u)?,
                copy_internal(rec, &state.v)?,
                sigma,
            )
        };
        let out = rec.output(OP, weight.shape(), weight.dtype())?;
        let gamma = state.gamma.as_ref().filter(|_| self.use_gamma);
        // One slice of every element: a length that is a multiple of 4 moves vec4s.
        record_elementwise(
            rec,
            Kernel::SnScale,
            &ChannelLayout::new(weight.shape(), None),
            &[weight],
            &[
                PerSlice::Fixed(Bind::elems(&sigma, 1)),
                PerSlice::Fixed(Bind::elems(gamma.unwrap_or(&sigma), 1)),
            ],
            &out,
            Extra {
                flag: u32::from(gamma.is_some()),
                ..Extra::default()
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
    ) -> Result<SpectralNormGrads> {
        let ctx = rec.context();
        let mut tensors = vec![
            ("weight", weight),
            ("grad_output", grad_output),
            ("forward u", &forward.u),
            ("forward v", &forward.v),
            ("sigma", &forward.sigma),
        ];
        tensors.extend(state.gamma.as_ref().map(|g| ("gamma", g)));
        ctx.check_tensors(OP, &tensors)?;
        let factor = self.check()?;
        let m = self.matrix(ctx, weight.shape())?;
        check_weight_grad(OP, grad_output, weight)?;
        self.check_vector("the forward's u", &forward.u, m.rows(), weight.shape())?;
        self.check_vector("the forward's v", &forward.v, m.cols(), weight.shape())?;
        if forward.sigma.shape() != [1] {
            return Err(Error::input(OP, "the forward's sigma must have shape [1]"));
        }
        self.check_gamma(state)?;
        // <G, W> in one pass over both (per leading-axis slice, then summed by one
        // workgroup that binds the slices' sums whole; one slice when they pass a
        // binding).
        let leading = weight.shape()[0] as u64;
        let axis0 = Some(0).filter(|_| leading * 4 <= ctx.limits.max_binding_elems);
        let sums_layout = ChannelLayout::new(weight.shape(), axis0);
        let plan = ReducePlan::new(OP, sums_layout, &ctx.limits)?;
        let sums = record_sums(rec, OP, &plan, grad_output, weight, None)?;
        let gamma = state.gamma.as_ref().filter(|_| self.use_gamma);
        let grad_gamma = match gamma {
            Some(_) => Some(Tensor::output(ctx, &[1])?),
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
                Bind::elems(&forward.sigma, 1),
                Bind::elems(gamma.unwrap_or(&forward.sigma), 1),
                Bind::elems(&coef, 4),
                grad_gamma
                    .as_ref()
                    .map_or(Bind::elems(&*ctx.dummy, 1), |t| Bind::elems(t, 1)),
            ],
            1,
        )?;
        let grad = rec.output(OP, weight.shape(), weight.dtype())?;
        record_grad(rec, &m, grad_output, forward, &coef, &grad)?;
        Ok(SpectralNormGrads {
            weight: grad,
            gamma: grad_gamma,
        })
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
        ctx.check_tensors(OP, &[("weight", weight), ("u", u)])?;
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
}

/// `u`, `v` and `gamma` stay f32 whatever the weight's type, as PyTorch keeps its
/// buffers `_u` and `_v` and sigma in f32 under autocast.
fn check_f32(what: &str, t: &Tensor) -> Result<()> {
    if t.dtype() != crate::DType::F32 {
        return Err(Error::input(
            OP,
            format!(
                "{what} is {}; spectral norm keeps u, v, sigma and gamma in f32 for weights of any type",
                t.dtype()
            ),
        ));
    }
    Ok(())
}

/// `grad = coef.x G - coef.y u v^T` (the `grad` kernel over M's layout; rows a
/// multiple of 4 long take vec4s, a vec4 having one row r). Where `u` and `v` fit one
/// binding each, one pass binding them whole; else passes over runs of M's layout
/// whose elements of `u` and `v` fit: whole `[R, J]` matrices of consecutive `a`, runs
/// of rows of one `a`, or pieces of one row, each binding its part of `u` and `v` from
/// aligned elements (`flag` and `aux2`: the run's first row and column past them).
fn record_grad(
    rec: &mut Recording<'_>,
    m: &Matrix,
    grad_output: &Tensor,
    forward: &SpectralNormOutput,
    coef: &Tensor,
    grad: &Tensor,
) -> Result<()> {
    let limits = rec.context().limits;
    let (u, v) = (&forward.u, &forward.v);
    let pass = |rec: &mut Recording<'_>,
                layout: ChannelLayout,
                (u_start, u_len, u_skip): (u64, u64, u64),
                (v_start, v_len, v_skip): (u64, u64, u64)| {
        record_elementwise(
            rec,
            Kernel::SnGrad,
            &layout,
            &[grad_output],
            &[
                PerSlice::Fixed(Bind::window(u, u_start, u_len)),
                PerSlice::Fixed(Bind::window(v, v_start, v_len)),
                PerSlice::Fixed(Bind::elems(coef, 4)),
            ],
            grad,
            Extra {
                flag: u_skip as u32,
                aux2: v_skip as u32,
                ..Extra::default()
            },
        )
    };
    let (rows, cols) = (m.rows(), m.cols());
    if rows <= limits.max_binding_elems && cols <= limits.max_binding_elems {
        return pass(rec, m.layout, (0, rows, 0), (0, cols, 0));
    }
    let align = limits.align_elems.max(1);
    let window = (limits.max_binding_elems.saturating_sub(align) / align * align).max(align);
    // Elements `[lo, lo + len)` of a vector, bound from an aligned element.
    let part = |lo: u64, len: u64| {
        let start = lo / align * align;
        (start, lo - start + len, lo - start)
    };
    let (a_n, r_n, j_n) = (m.layout.outer, m.layout.channels, m.layout.inner);
    let rj = r_n * j_n;
    let run = |a0: u64, na: u64, r0: u64, nr: u64, j0: u64, nj: u64| ChannelLayout {
        batch: 1,
        outer: na,
        channels: nr,
        inner: nj,
        base: a0 * rj + r0 * j_n + j0,
        row_stride: nr * nj,
    };
    if rj <= window && r_n <= window {
        let per = window / rj;
        let mut a0 = 0;
        while a0 < a_n {
            let na = per.min(a_n - a0);
            let layout = run(a0, na, 0, r_n, 0, j_n);
            pass(rec, layout, (0, r_n, 0), part(a0 * j_n, na * j_n))?;
            a0 += na;
        }
    } else if j_n <= window {
        let per = window / j_n;
        for a in 0..a_n {
            let mut r0 = 0;
            while r0 < r_n {
                let nr = per.min(r_n - r0);
                let layout = run(a, 1, r0, nr, 0, j_n);
                pass(rec, layout, part(r0, nr), part(a * j_n, j_n))?;
                r0 += nr;
            }
        }
    } else {
        for a in 0..a_n {
            for r in 0..r_n {
                let mut j0 = 0;
                while j0 < j_n {
                    let nj = window.min(j_n - j0);
                    let layout = run(a, 1, r, 1, j0, nj);
                    pass(rec, layout, part(r, 1), part(a * j_n + j0, nj))?;
                    j0 += nj;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_mirror_the_wgsl_struct() {
        use crate::gpu::kernels::mirror;
        mirror!("spectral_norm", GradCoefParams, [slices, use_gamma, factor]);
    }
}
