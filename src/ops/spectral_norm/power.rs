//! The power iteration on the GPU: products with `M` (matrix.rs), normalizations of
//! the results (one workgroup for short vectors, many for long ones), sigma.

use bytemuck::{Pod, Zeroable};

use super::matrix::{record_mtv, record_mv, Matrix};
use super::{SpectralFlavor, SpectralNorm, SpectralNormState, OP};
use crate::error::{Error, Result};
use crate::gpu::{Bind, Kernel, Recording, Tensor};
use crate::ops::channel_stats::vec4_buffer;

// Mirrors `VectorParams` in shaders/spectral_norm.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(super) struct VectorParams {
    pub(super) n: u32,
    pub(super) eps: f32,
    pub(super) pytorch: u32,
    pub(super) write_sigma: u32,
    pub(super) factor: f32,
    pub(super) sigma_index: u32,
    pub(super) keep: u32,
    pub(super) parts: u32,
    pub(super) dot: u32,
    pub(super) chunk0: u32,
    pub(super) _pad: [u32; 2],
}

/// Vectors longer than this are normalized (and dotted) by many workgroups
/// (`vec_partials`, then one workgroup per chunk) instead of one.
const WIDE_VECTOR: u64 = 16 * 1024;

/// Elements per workgroup of `vec_partials` and of the wide `normalize`
/// (`VEC_CHUNK` in shaders/spectral_norm.wgsl).
const VEC_CHUNK: u64 = 4096;

/// The runs of chunks a wide vector of `n` elements is dispatched in: `(first chunk,
/// chunks)`, each run's vec4s within one binding (from a chunk start: 64 KiB, aligned).
fn chunk_runs(rec: &Recording<'_>, n: u64) -> Result<Vec<(u64, u64)>> {
    let limits = &rec.context().limits;
    let parts = n.div_ceil(VEC_CHUNK);
    let per = limits.max_binding_elems / 4 / VEC_CHUNK;
    if per == 0 {
        return Err(Error::TooLarge {
            op: OP,
            problem: format!(
                "a vector of {n} elements needs runs of {VEC_CHUNK} vec4s, past a storage binding of {} bytes",
                limits.max_binding_elems * 4
            ),
        });
    }
    let mut runs = Vec::new();
    let mut c = 0;
    while c < parts {
        let k = per.min(parts - c);
        runs.push((c, k));
        c += k;
    }
    Ok(runs)
}

/// The binding of run `(chunk0, chunks)` of a vector of `n` elements, `per` values
/// each (`raw`: a vec4 per element, 4; `u`, `v`: 1).
fn run_of(t: &Tensor, n: u64, per: u64, (chunk0, chunks): (u64, u64)) -> Bind<'_> {
    let start = chunk0 * VEC_CHUNK;
    let len = (chunks * VEC_CHUNK).min(n - start);
    Bind::window(t, start * per, len * per)
}

/// For a vector of `n` elements (`raw`, a vec4 per element), the partials
/// `(sum x^2, sum x * vector)` per chunk when it is long (see [`WIDE_VECTOR`]) or its
/// vec4s pass a binding; `None` when one workgroup does the whole vector.
pub(super) fn record_vector_partials(
    rec: &mut Recording<'_>,
    params: &VectorParams,
    raw: &Tensor,
    vector: Option<&Tensor>,
) -> Result<Option<(Tensor, u64)>> {
    let n = u64::from(params.n);
    let ctx = rec.context();
    // Short vectors whose vec4s fit one binding: one workgroup.
    if n <= WIDE_VECTOR && n * 4 <= ctx.limits.max_binding_elems {
        return Ok(None);
    }
    let parts = n.div_ceil(VEC_CHUNK);
    let partials = vec4_buffer(ctx, OP, parts)?;
    for run in chunk_runs(rec, n)? {
        let params = VectorParams {
            dot: u32::from(vector.is_some()),
            chunk0: run.0 as u32,
            ..*params
        };
        rec.dispatch(
            Kernel::SnVecPartials,
            &params,
            &[
                run_of(raw, n, 4, run),
                vector.map_or(Bind::elems(&ctx.dummy, 1), |v| run_of(v, n, 1, run)),
                Bind::elems(&partials, parts * 4),
            ],
            run.1,
        )?;
    }
    Ok(Some((partials, parts)))
}

/// Where a normalized vector goes, besides the working buffer.
pub(super) struct Normalized<'a> {
    pub out: &'a Tensor,
    pub keep: Option<&'a Tensor>,
    pub sigma: Option<(&'a wgpu::Buffer, u32)>,
}

impl SpectralNorm {
    /// Records `n` power iterations from the state, into fresh `u`, `v` and sigma
    /// tensors; with `keep`, the final vectors are also written into the state.
    pub(super) fn record_iterations(
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
        if n == 0 {
            return Err(Error::input(OP, "at least one power iteration is needed"));
        }
        // Every iteration writes u and v whole, the last one sigma (n >= 1, `check`):
        // pooled, not zeroed.
        let u = Tensor::output(ctx, &[m.rows() as usize])?;
        let v = Tensor::output(ctx, &[m.cols() as usize])?;
        let sigma = Tensor::output(ctx, &[1])?;
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
    pub(super) fn record_v_from_u(
        &self,
        rec: &mut Recording<'_>,
        m: &Matrix,
        weight: &Tensor,
        u: &Tensor,
        to: Normalized<'_>,
        factor: f32,
    ) -> Result<()> {
        let raw = record_mtv(rec, m, weight, u)?;
        self.record_normalize(rec, &raw, m.cols(), to, factor)
    }

    /// `u = normalize(M v)`: row dots (row kernel or shared reduction), the normalization.
    pub(super) fn record_u_from_v(
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

    pub(super) fn record_normalize(
        &self,
        rec: &mut Recording<'_>,
        raw: &Tensor,
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
        // One workgroup, or one per chunk in runs that fit a binding (as the partials).
        let runs = match &partials {
            None => vec![(0, 1)],
            Some(_) => chunk_runs(rec, n)?,
        };
        for run in runs {
            // The run's elements of raw, out and keep (all of them for one workgroup).
            let bind = |t, per| match &partials {
                None => Bind::elems(t, n * per),
                Some(_) => run_of(t, n, per, run),
            };
            rec.dispatch(
                Kernel::SnNormalize,
                &VectorParams {
                    chunk0: run.0 as u32,
                    ..params
                },
                &[
                    bind(raw, 4),
                    bind(to.out, 1),
                    match to.keep {
                        Some(t) => bind(t, 1),
                        None => Bind::elems(&ctx.dummy, 1),
                    },
                    Bind::elems(sigma_buf, sigma_len),
                    // Unused without partials: any read-only buffer (the dummy may be
                    // bound read-write above).
                    partials
                        .as_ref()
                        .map_or(Bind::elems(raw, 4), |(b, n)| Bind::elems(b, n * 4)),
                ],
                run.1,
            )?;
        }
        Ok(())
    }

    pub(super) fn vector_params(
        &self,
        n: u64,
        sigma_index: Option<u32>,
        keep: bool,
    ) -> VectorParams {
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
            chunk0: 0,
            _pad: [0; 2],
        }
    }
}

/// `x / max(||x||, eps)` on the host (PyTorch's `F.normalize`), for initial vectors.
pub(super) fn normalize_host(x: &mut [f32], eps: f32) {
    let norm = x
        .iter()
        .map(|&a| f64::from(a) * f64::from(a))
        .sum::<f64>()
        .sqrt();
    let d = norm.max(f64::from(eps));
    x.iter_mut().for_each(|a| *a = (f64::from(*a) / d) as f32);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_mirror_the_wgsl_struct() {
        use crate::gpu::kernels::mirror;
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
                dot,
                chunk0
            ]
        );
    }
}
