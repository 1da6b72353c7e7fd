//! The one recorder of elementwise passes (`shaders/shared/element.wgsl`): picks the
//! kernel variant (scalar, vec4, channels-last), the thread layout of the adapter
//! ([`Tuning`](crate::gpu::Tuning)), and records the pass window by window.

use bytemuck::{Pod, Zeroable};

use super::cast::{record_cast_into, widened};
use super::layout::{element_windows, ChannelLayout, ElementWindow};
use crate::error::Result;
use crate::gpu::{Bind, DType, Kernel, Recording, Spec, Tensor, WORKGROUP_SIZE};

// Mirrors `ElementParams` in shaders/shared/element.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct ElementParams {
    pub count: u32,
    pub channels: u32,
    pub inner: u32,
    pub outer: u32,
    pub c_start: u32,
    pub j_start: u32,
    pub o_start: u32,
    pub a_start: u32,
    pub stride: u32,
    pub step_j: u32,
    pub step_c: u32,
    pub step_o: u32,
    pub step_a: u32,
    pub step_fresh: u32,
    pub flag: u32,
    pub aux0: f32,
    pub aux1: f32,
    pub _pad0: u32,
    pub _pad1: u32,
}

/// The op-specific part of [`ElementParams`]: a flag and two scalars.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Extra {
    pub flag: u32,
    pub aux: [f32; 2],
}

/// The units of a pass: 1 (scalar kernel), or 4 elements per unit (vec4 and
/// channels-last variants).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Scalar,
    Vec4,
    ChannelsLast,
}

fn variant(kernel: Kernel, layout: &ChannelLayout) -> (Kernel, Variant) {
    let cl = kernel
        .channels_last_twin()
        .filter(|_| layout.inner == 1 && layout.batch == 1 && layout.channels.is_multiple_of(4));
    if let Some(k) = cl {
        return (k, Variant::ChannelsLast);
    }
    // Windows always start at multiples of 4 elements (`PlanLimits::align_elems`), so
    // rows a multiple of 4 long keep every vec4 inside one slice.
    match kernel
        .vec4_twin()
        .filter(|_| layout.inner.is_multiple_of(4))
    {
        Some(k) => (k, Variant::Vec4),
        None => (kernel, Variant::Scalar),
    }
}

/// The params of window `w` of a pass over `layout` in `variant`'s units, threads
/// `stride` units apart (coalesced: the workgroup size), and the workgroups it needs.
fn params(
    layout: &ChannelLayout,
    w: &ElementWindow,
    variant: Variant,
    coalesced: bool,
    per_thread: u64,
    extra: Extra,
) -> (ElementParams, u64) {
    let (mut count, mut channels, mut inner) = (w.len, layout.channels, layout.inner);
    let (mut c_start, mut j_start) = (w.c_start, w.j_start);
    match variant {
        Variant::Scalar => {}
        Variant::Vec4 => {
            count /= 4;
            inner /= 4;
            j_start /= 4;
        }
        Variant::ChannelsLast => {
            count /= 4;
            channels /= 4;
            c_start /= 4;
        }
    }
    let wg = u64::from(WORKGROUP_SIZE);
    let stride = match (variant, coalesced) {
        // Channels last, a multiple of the feature groups: each thread keeps one group
        // over PER_THREAD rows and loads its per-feature values once (the `cl` kernels
        // rely on it). Coalesced, the smallest such multiple of at least a workgroup.
        (Variant::ChannelsLast, true) => wg.div_ceil(channels) * channels,
        (Variant::ChannelsLast, false) => channels,
        (_, true) => wg,
        (_, false) => 1,
    };
    let threads = count.div_ceil(stride * per_thread) * stride;
    // The stride as a move in (a, o, c, j), so that the shader steps without dividing.
    let qj = stride / inner;
    let qc = qj / channels;
    let params = ElementParams {
        count: count as u32,
        channels: channels as u32,
        inner: inner as u32,
        outer: layout.outer as u32,
        c_start: c_start as u32,
        j_start: j_start as u32,
        o_start: w.o_start as u32,
        a_start: w.a_start as u32,
        stride: stride as u32,
        step_j: (stride % inner) as u32,
        step_c: (qj % channels) as u32,
        step_o: (qc % layout.outer) as u32,
        step_a: (qc / layout.outer) as u32,
        step_fresh: u32::from(qj % channels != 0 || (layout.batch > 1 && qc != 0)),
        flag: extra.flag,
        aux0: extra.aux[0],
        aux1: extra.aux[1],
        _pad0: 0,
        _pad1: 0,
    };
    (params, threads.div_ceil(u64::from(WORKGROUP_SIZE)))
}

/// Records an elementwise `kernel` (its scalar form; the vec4 or channels-last variant
/// is picked from the layout) over `layout`, window by window. Bindings: `params`,
/// then `windowed` (tensors shaped like the layout, bound window by window), then
/// `whole` (bound as given: per-slice values, scalars), then `out` (windowed).
///
/// Half tensors run natively when they all share `out`'s type and the layout has vec4
/// or channels-last units; otherwise through f32 (see `cast.rs`).
pub(crate) fn record_elementwise(
    rec: &mut Recording<'_>,
    kernel: Kernel,
    layout: &ChannelLayout,
    windowed: &[&Tensor],
    whole: &[Bind<'_>],
    out: &Tensor,
    extra: Extra,
) -> Result<()> {
    let ctx = rec.context();
    let (kernel4, variant) = variant(kernel, layout);
    let dtype = out.dtype();
    let native = windowed.iter().all(|t| t.dtype() == dtype)
        && (dtype == DType::F32 || variant != Variant::Scalar);
    if !native {
        let wide = windowed
            .iter()
            .map(|t| widened(rec, t))
            .collect::<Result<Vec<_>>>()?;
        let wide: Vec<&Tensor> = wide.iter().collect();
        if dtype == DType::F32 {
            return record_elementwise(rec, kernel, layout, &wide, whole, out, extra);
        }
        let tmp = Tensor::output(ctx, out.shape())?;
        record_elementwise(rec, kernel, layout, &wide, whole, &tmp, extra)?;
        return record_cast_into(rec, &tmp, out);
    }
    let tuning = ctx.limits.tuning;
    for w in element_windows(*layout, &ctx.limits) {
        let per_thread = u64::from(tuning.per_thread);
        let (params, groups) = params(layout, &w, variant, tuning.coalesced, per_thread, extra);
        let spec = Spec {
            layout: Some(match params.stride {
                1 => 0,
                s if s == WORKGROUP_SIZE => 1,
                s if variant == Variant::ChannelsLast && s == params.channels => 3,
                _ => 2,
            }),
            batched: layout.batch > 1,
            per_thread: tuning.per_thread,
            rows: None,
            row_batch: false,
            dtype,
            aliased: false,
        };
        let mut binds: Vec<Bind<'_>> = windowed
            .iter()
            .map(|b| Bind::window(*b, w.start, w.len))
            .collect();
        binds.extend_from_slice(whole);
        binds.push(Bind::window(out, w.start, w.len));
        rec.dispatch_spec(kernel4, spec, &params, &binds, groups)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shader's walk (element.wgsl), run on the host: every unit of the window is
    /// visited once, at the position the division-free steps claim.
    fn check_walk(
        layout: ChannelLayout,
        w: ElementWindow,
        variant: Variant,
        coalesced: bool,
        per_thread: u32,
    ) {
        let (p, groups) = params(
            &layout,
            &w,
            variant,
            coalesced,
            u64::from(per_thread),
            Extra::default(),
        );
        let mut seen = vec![0u8; p.count as usize];
        let (inner, channels, outer) = (
            u64::from(p.inner),
            u64::from(p.channels),
            u64::from(p.outer),
        );
        for t in 0..groups * u64::from(WORKGROUP_SIZE) {
            let t = t as u32;
            let mut e = (t / p.stride) * p.stride * (per_thread - 1) + t;
            let u = p.j_start + e;
            let mut j = u % p.inner;
            let q = p.c_start + u / p.inner;
            let mut c = q % p.channels;
            let r = p.o_start + q / p.channels;
            let mut o = r % p.outer;
            let mut a = p.a_start + r / p.outer;
            for _ in 0..per_thread {
                if e >= p.count {
                    break;
                }
                seen[e as usize] += 1;
                // Where unit e really is: window start + e, counted from x[0, 0, 0, 0].
                let abs = (u64::from(p.a_start) * outer + u64::from(p.o_start)) * channels * inner
                    + u64::from(p.c_start) * inner
                    + u64::from(p.j_start)
                    + u64::from(e);
                assert_eq!(u64::from(j), abs % inner);
                assert_eq!(u64::from(c), abs / inner % channels);
                assert_eq!(u64::from(o), abs / inner / channels % outer);
                assert_eq!(u64::from(a), abs / inner / channels / outer);
                e += p.stride;
                j += p.step_j;
                c += p.step_c;
                o += p.step_o;
                a += p.step_a;
                if j >= p.inner {
                    j -= p.inner;
                    c += 1;
                }
                if c >= p.channels {
                    c -= p.channels;
                    o += 1;
                }
                if o >= p.outer {
                    o -= p.outer;
                    a += 1;
                }
            }
        }
        assert!(seen.iter().all(|&s| s == 1), "{layout:?} {variant:?}");
    }

    #[test]
    fn params_mirror_the_wgsl_struct() {
        use crate::gpu::kernels::mirror;
        for module in ["copy", "batch_norm.cl", "weight_norm.vec4", "spectral_norm"] {
            mirror!(
                module,
                ElementParams,
                [
                    count, channels, inner, outer, c_start, j_start, o_start, a_start, stride,
                    step_j, step_c, step_o, step_a, step_fresh, flag, aux0, aux1
                ]
            );
        }
    }

    #[test]
    fn walks_visit_every_unit_once_at_the_right_position() {
        let lim = |binding| crate::gpu::PlanLimits::for_tests(binding, 64, true);
        for (batch, outer, channels, inner) in [
            (1, 1, 7, 5),
            (1, 3, 3, 1),
            (1, 5, 8, 1),
            (1, 2, 300, 1),
            (1, 4, 3, 700),
            (3, 5, 7, 2),
            (2, 9, 4, 8),
            (1, 1, 1, 1000),
        ] {
            let layout = ChannelLayout {
                batch,
                outer,
                channels,
                inner,
            };
            for binding in [1 << 20, 512] {
                for w in element_windows(layout, &lim(binding)) {
                    for (coalesced, n) in [(true, 1), (true, 4), (false, 4), (false, 2)] {
                        check_walk(layout, w, Variant::Scalar, coalesced, n);
                        if inner % 4 == 0 {
                            check_walk(layout, w, Variant::Vec4, coalesced, n);
                        }
                        if inner == 1 && batch == 1 && channels % 4 == 0 {
                            check_walk(layout, w, Variant::ChannelsLast, coalesced, n);
                        }
                    }
                }
            }
        }
    }
}
