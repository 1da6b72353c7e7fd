//! The one recorder of elementwise passes (`shaders/shared/element.wgsl`): picks the
//! kernel variant (scalar, vec4, channels-last), the thread layout of the adapter
//! ([`Tuning`](crate::gpu::Tuning)), and records the pass window by window.

use bytemuck::{Pod, Zeroable};

use super::cast::{record_cast_into, widened};
use super::layout::{element_windows, slice_groups, ChannelLayout, ElementWindow};
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
    pub skip: u32,
    pub aux2: u32,
}

/// The op-specific part of [`ElementParams`]: a flag, two scalars and an index.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Extra {
    pub flag: u32,
    pub aux: [f32; 2],
    pub aux2: u32,
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
    // Windows start at multiples of 4 elements (`PlanLimits::align_elems`) and so do a
    // slice group's rows when these hold, so every vec4 stays inside one slice (vec4)
    // or one row (channels last).
    let by4 = layout.base.is_multiple_of(4) && layout.row_stride.is_multiple_of(4);
    let cl = kernel.channels_last_twin().filter(|_| {
        by4 && layout.inner == 1 && layout.batch == 1 && layout.channels.is_multiple_of(4)
    });
    if let Some(k) = cl {
        return (k, Variant::ChannelsLast);
    }
    match kernel
        .vec4_twin()
        .filter(|_| by4 && layout.inner.is_multiple_of(4))
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
    let (mut c_start, mut j_start, mut skip) = (w.c_start, w.j_start, w.skip);
    match variant {
        Variant::Scalar => {}
        Variant::Vec4 => {
            count /= 4;
            inner /= 4;
            j_start /= 4;
            skip /= 4;
        }
        Variant::ChannelsLast => {
            count /= 4;
            channels /= 4;
            c_start /= 4;
            skip /= 4;
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
        skip: skip as u32,
        aux2: extra.aux2,
    };
    (params, threads.div_ceil(u64::from(WORKGROUP_SIZE)))
}

/// A binding that is not shaped like the layout: per-slice values, bound from a slice
/// group's first slice when the layout's slices do not fit one binding (see
/// [`slice_groups`]), or bound as given.
#[derive(Clone, Copy)]
pub(crate) enum PerSlice<'a> {
    /// `k` f32 per slice (1: a parameter, 4: a vec4 of statistics or coefficients).
    Values(&'a Tensor, u64),
    /// Bound as given, whatever the group (scalars, a placeholder).
    Fixed(Bind<'a>),
}

impl<'a> PerSlice<'a> {
    /// The binding for the `n` slices from slice `first`.
    pub fn bind(&self, first: u64, n: u64) -> Bind<'a> {
        match *self {
            PerSlice::Values(t, k) => Bind::window(t, first * k, n * k),
            PerSlice::Fixed(b) => b,
        }
    }

    /// The most slices whose values one binding of `max_elems` f32 holds.
    fn max_slices(&self, max_elems: u64) -> u64 {
        match *self {
            PerSlice::Values(_, k) => max_elems / k.max(1),
            PerSlice::Fixed(_) => u64::MAX,
        }
    }
}

/// The slice groups of `layout` for per-slice bindings `per_slice`: the whole layout
/// when every one fits a binding.
pub(crate) fn groups_for(
    rec: &Recording<'_>,
    op: &'static str,
    layout: &ChannelLayout,
    per_slice: &[PerSlice<'_>],
) -> Result<Vec<super::layout::SliceGroup>> {
    let limits = &rec.context().limits;
    let max = per_slice
        .iter()
        .map(|b| b.max_slices(limits.max_binding_elems))
        .min()
        .unwrap_or(u64::MAX);
    slice_groups(op, *layout, max, limits.align_elems)
}

/// Records a per-slice `kernel` (one invocation per slice, `params(n)` for `n` slices)
/// over `slices` slices, in groups whose per-slice bindings fit one binding each.
pub(crate) fn record_per_slice<P: bytemuck::Pod>(
    rec: &mut Recording<'_>,
    kernel: Kernel,
    slices: u64,
    params: impl Fn(u64) -> P,
    binds: &[PerSlice<'_>],
) -> Result<()> {
    let layout = ChannelLayout::dense(1, 1, slices, 1);
    for g in groups_for(rec, kernel.def().label, &layout, binds)? {
        let n = g.layout.channels;
        let all: Vec<Bind<'_>> = binds.iter().map(|b| b.bind(g.first, n)).collect();
        rec.dispatch(
            kernel,
            &params(n),
            &all,
            n.div_ceil(u64::from(WORKGROUP_SIZE)),
        )?;
    }
    Ok(())
}

/// Records an elementwise `kernel` (its scalar form; the vec4 or channels-last variant
/// is picked from the layout) over `layout`, window by window. Bindings: `params`,
/// then `windowed` (tensors shaped like the layout, bound window by window), then
/// `whole` (per-slice values, bound group by group, and fixed bindings), then `out`
/// (windowed).
///
/// Half tensors run natively when they all share `out`'s type and the layout has vec4
/// or channels-last units; otherwise through f32 (see `cast.rs`).
pub(crate) fn record_elementwise(
    rec: &mut Recording<'_>,
    kernel: Kernel,
    layout: &ChannelLayout,
    windowed: &[&Tensor],
    whole: &[PerSlice<'_>],
    out: &Tensor,
    extra: Extra,
) -> Result<()> {
    let ctx = rec.context();
    // A slice group's variant is never a narrower one than its layout's (see
    // `slice_groups`), so what runs natively here runs natively in every group.
    let (_, units) = variant(kernel, layout);
    let dtype = out.dtype();
    let native = windowed.iter().all(|t| t.dtype() == dtype)
        && (dtype == DType::F32 || units != Variant::Scalar);
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
    for group in groups_for(rec, kernel.def().label, layout, whole)? {
        let layout = &group.layout;
        let (kernel4, variant) = variant(kernel, layout);
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
            let bound = w.skip + w.len;
            let mut binds: Vec<Bind<'_>> = windowed
                .iter()
                .map(|b| Bind::window(*b, w.start, bound))
                .collect();
            binds.extend(whole.iter().map(|b| b.bind(group.first, layout.slices())));
            binds.push(Bind::window(out, w.start, bound));
            rec.dispatch_spec(kernel4, spec, &params, &binds, groups)?;
        }
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
        let (channels, outer) = (u64::from(p.channels), u64::from(p.outer));
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
                // Where unit e really is: the element the shader indexes (`skip + e`
                // units into the binding) is the layout's x[a, o, c, j].
                let (unit, c_el, j_el) = match variant {
                    Variant::Scalar => (1, u64::from(c), u64::from(j)),
                    Variant::Vec4 => (4, u64::from(c), 4 * u64::from(j)),
                    Variant::ChannelsLast => (4, 4 * u64::from(c), 0),
                };
                let mem = layout.base
                    + (u64::from(a) * layout.outer + u64::from(o)) * layout.row_stride
                    + c_el * layout.inner
                    + j_el;
                assert_eq!(w.start + (u64::from(p.skip) + u64::from(e)) * unit, mem);
                assert!(u64::from(c) < channels && u64::from(o) < outer);
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
        let mut layouts = Vec::new();
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
            layouts.push(ChannelLayout::dense(batch, outer, channels, inner));
        }
        // Slice groups: runs of channels with strided rows (windows start mid-binding,
        // `skip`), runs of whole batch entries.
        for (whole, max) in [
            (ChannelLayout::dense(1, 3, 300, 1), 128),
            (ChannelLayout::dense(1, 2, 200, 4), 64),
            (ChannelLayout::dense(1, 3, 150, 3), 64),
            (ChannelLayout::dense(4, 3, 32, 1), 64),
            (ChannelLayout::dense(2, 2, 192, 1), 64),
        ] {
            let groups = super::super::layout::slice_groups("test", whole, max, 64).unwrap();
            assert!(groups.len() > 1);
            layouts.extend(groups.iter().map(|g| g.layout));
        }
        for layout in layouts {
            let ChannelLayout {
                batch,
                channels,
                inner,
                ..
            } = layout;
            for binding in [1 << 20, 512] {
                for w in element_windows(layout, &lim(binding)) {
                    for (coalesced, n) in [(true, 1), (true, 4), (false, 4), (false, 2)] {
                        check_walk(layout, w, Variant::Scalar, coalesced, n);
                        let by4 = layout.base % 4 == 0 && layout.row_stride % 4 == 0;
                        if by4 && inner % 4 == 0 {
                            check_walk(layout, w, Variant::Vec4, coalesced, n);
                        }
                        if by4 && inner == 1 && batch == 1 && channels % 4 == 0 {
                            check_walk(layout, w, Variant::ChannelsLast, coalesced, n);
                        }
                    }
                }
            }
        }
    }
}
