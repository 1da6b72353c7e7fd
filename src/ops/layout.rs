//! GPU-free planning: how a tensor is viewed (`[batch, outer, channels, inner]`), the
//! input checks every per-channel op shares, and the binding-sized windows that the
//! elementwise passes and the row kernels run over. Everything here is plain
//! arithmetic with unit tests; recording lives in `element.rs` and `channel_stats.rs`.

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::gpu::PlanLimits;

/// A tensor seen as `[batch, outer, channels, inner]`: slice `a * channels + c` owns
/// `x[a, o, c, j]` for every `o` and `j`. `batch` is 1 except when a middle axis alone
/// is reduced (Jittor's weight norm): then the axes before it form the batch.
///
/// Where the elements lie: `x[a, o, c, j]` is element
/// `base + (a * outer + o) * row_stride + c * inner + j` of the tensor. A whole tensor
/// is dense (`base` 0, `row_stride = channels * inner`); a [`SliceGroup`] of a tensor
/// with more slices than one binding holds is a run of its channels, whose rows are
/// `row_stride` apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ChannelLayout {
    pub batch: u64,
    pub outer: u64,
    pub channels: u64,
    pub inner: u64,
    /// Element of `x[0, 0, 0, 0]` in the tensor.
    pub base: u64,
    /// Elements from `x[a, o, 0, 0]` to `x[a, o + 1, 0, 0]`.
    pub row_stride: u64,
}

impl ChannelLayout {
    /// A whole tensor of shape `[batch, outer, channels, inner]`.
    pub const fn dense(batch: u64, outer: u64, channels: u64, inner: u64) -> Self {
        ChannelLayout {
            batch,
            outer,
            channels,
            inner,
            base: 0,
            row_stride: channels * inner,
        }
    }

    /// The layout of `shape` with channels on `axis` (`None`: one channel, everything).
    pub fn new(shape: &[usize], axis: Option<usize>) -> Self {
        let p = |s: &[usize]| s.iter().map(|&d| d as u64).product::<u64>();
        match axis {
            Some(a) => Self::dense(1, p(&shape[..a]), shape[a] as u64, p(&shape[a + 1..])),
            None => Self::dense(1, 1, 1, p(shape)),
        }
    }

    /// The layout that reduces axis `k` of `shape` alone, keeping every other axis.
    pub fn reduce_one_axis(shape: &[usize], k: usize) -> Self {
        let p = |s: &[usize]| s.iter().map(|&d| d as u64).product::<u64>();
        Self::dense(p(&shape[..k]), shape[k] as u64, p(&shape[k + 1..]), 1)
    }

    /// Whether consecutive rows touch (`row_stride = channels * inner`), so that the
    /// layout's elements are one contiguous run from `base`.
    pub fn contiguous(&self) -> bool {
        self.row_stride == self.channels * self.inner
    }

    pub fn len(&self) -> u64 {
        self.batch * self.outer * self.channels * self.inner
    }

    /// Number of slices (one statistic each): `batch * channels`.
    pub fn slices(&self) -> u64 {
        self.batch * self.channels
    }

    /// Elements per channel.
    pub fn per_channel(&self) -> u64 {
        self.outer * self.inner
    }
}

/// The checks every per-channel op makes on its main input, with the op's own words:
/// rank >= 2, `axis` in range, no empty dimension, `eps` finite and positive. Returns
/// the layout with channels on `axis`.
pub(crate) fn check_channel_input(
    op: &'static str,
    input: &str,
    axis_name: &str,
    shape: &[usize],
    axis: usize,
    eps: f32,
) -> Result<ChannelLayout> {
    if shape.len() < 2 {
        return Err(Error::input(
            op,
            format!("the {input} must have rank >= 2, got shape {shape:?}"),
        ));
    }
    if axis >= shape.len() {
        return Err(Error::input(
            op,
            format!("{axis_name} {axis} is out of range for the {input} of shape {shape:?}"),
        ));
    }
    if shape.contains(&0) {
        return Err(Error::input(
            op,
            format!("the {input} is empty (shape {shape:?})"),
        ));
    }
    if !eps.is_finite() || eps <= 0.0 {
        return Err(Error::input(
            op,
            format!("eps must be finite and positive, got {eps}"),
        ));
    }
    Ok(ChannelLayout::new(shape, Some(axis)))
}

/// A window of an elementwise pass: elements `[start + skip, start + skip + len)` of
/// the tensor, bound from `start` (aligned), whose first element sits at
/// `x[a_start, o_start, c_start, j_start]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ElementWindow {
    pub start: u64,
    pub skip: u64,
    pub len: u64,
    pub a_start: u64,
    pub o_start: u64,
    pub c_start: u64,
    pub j_start: u64,
}

/// Rows at most this long are handled by one workgroup each ("row kernels"): a row of
/// 16 Ki f32 (64 KiB) stays in a GPU's L2 and a CPU's L2 between the passes over it.
pub(crate) const ROW_KERNEL_MAX_LEN: u64 = 16 * 1024;

/// Threads per workgroup of the row kernels on GPUs (the shaders' `RWG` override,
/// whose default this is); software adapters use [`ROW_WORKGROUP_CPU`].
pub(crate) const ROW_WORKGROUP: u64 = 256;

/// Threads per workgroup of the row kernels on software adapters (what lavapipe was
/// tuned with: fewer rows per workgroup, fewer invocations per barrier).
pub(crate) const ROW_WORKGROUP_CPU: u64 = 64;

/// How a row kernel covers rows of `layout.inner` elements: by vec4 when rows are a
/// multiple of 4 long (windows then start at multiples of 4 too), with `tpr` threads
/// per row (about 8 loads each, a power of two up to a whole workgroup), so short rows
/// share a workgroup.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowGeometry {
    /// Four elements per load.
    pub vec4: bool,
    /// Loads per row.
    pub len: u32,
    /// Threads per row.
    pub tpr: u32,
    unit: u64,
    rows_per_group: u64,
    /// Threads per workgroup (the `RWG` override).
    pub workgroup: u32,
    /// The `ROW_BATCH` override.
    pub batch: bool,
}

impl RowGeometry {
    /// Threads per row: about 8 loads each on software adapters, at most 64 (what
    /// lavapipe was tuned with); about 4 loads each on GPUs, up to the whole workgroup,
    /// so that a thread's loads are all in flight at once.
    pub fn new(layout: &ChannelLayout, tuning: &crate::gpu::Tuning) -> Self {
        let vec4 = layout.inner.is_multiple_of(4);
        let unit = if vec4 { 4 } else { 1 };
        let len = layout.inner / unit;
        let (loads, workgroup) = if tuning.coalesced {
            (4, ROW_WORKGROUP)
        } else {
            (8, ROW_WORKGROUP_CPU)
        };
        let tpr = len.div_ceil(loads).next_power_of_two().clamp(1, workgroup);
        RowGeometry {
            vec4,
            len: len as u32,
            tpr: tpr as u32,
            unit,
            rows_per_group: workgroup / tpr,
            workgroup: workgroup as u32,
            batch: tuning.row_batch,
        }
    }

    /// Loads of window `w` before its first row.
    pub fn skip(&self, w: &RowWindow) -> u32 {
        (w.skip / self.unit) as u32
    }

    /// Workgroups for window `w`.
    pub fn groups(&self, w: &RowWindow) -> u64 {
        w.rows.div_ceil(self.rows_per_group)
    }
}

/// A run of whole rows that fits one binding: bind `len` elements from `start`
/// (aligned); the first row begins `skip` elements in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RowWindow {
    pub start: u64,
    pub len: u64,
    pub skip: u64,
    pub rows: u64,
}

/// When every slice of `layout` is one contiguous row (`outer == 1`, `batch == 1`) of
/// at most [`ROW_KERNEL_MAX_LEN`] elements, the windows of whole rows for a row
/// kernel; `None` when the layout does not qualify.
pub(crate) fn row_windows(layout: ChannelLayout, limits: &PlanLimits) -> Option<Vec<RowWindow>> {
    row_windows_of_at_most(layout, limits, u64::MAX)
}

/// [`row_windows`] of at most `max_rows` rows each (for a kernel that binds a vec4 per
/// row of the window).
pub(crate) fn row_windows_of_at_most(
    layout: ChannelLayout,
    limits: &PlanLimits,
    max_rows: u64,
) -> Option<Vec<RowWindow>> {
    let (rows, len) = (layout.channels, layout.inner);
    if !layout.contiguous()
        || layout.base != 0
        || layout.batch != 1
        || layout.outer != 1
        || len == 0
        || len > ROW_KERNEL_MAX_LEN
        || rows == 0
    {
        return None;
    }
    let align = limits.align_elems.max(1);
    let per_window = (limits.max_binding_elems.saturating_sub(align) / len).min(max_rows);
    if per_window == 0 {
        return None;
    }
    let mut out = Vec::new();
    let mut first = 0;
    while first < rows {
        let n = per_window.min(rows - first);
        let begin = first * len;
        let start = begin / align * align;
        let skip = begin - start;
        out.push(RowWindow {
            start,
            len: skip + n * len,
            skip,
            rows: n,
        });
        first += n;
    }
    Some(out)
}

/// Splits an elementwise pass over `layout` into windows that fit one binding, each
/// bound from an aligned element (`start`) and beginning `skip` elements into it. A
/// contiguous layout is one run of elements; a slice group's rows (see [`SliceGroup`])
/// are a run each, so that no window holds another group's elements.
pub(crate) fn element_windows(layout: ChannelLayout, limits: &PlanLimits) -> Vec<ElementWindow> {
    let align = limits.align_elems.max(1);
    let chunk = (limits.max_binding_elems / align * align).max(align);
    let inner = layout.inner.max(1);
    let channels = layout.channels.max(1);
    let outer = layout.outer.max(1);
    let row_len = layout.channels * layout.inner;
    // Runs of elements: (first element in the tensor, first unit of the layout, length).
    let runs: Vec<(u64, u64, u64)> = if layout.contiguous() {
        vec![(layout.base, 0, layout.len())]
    } else {
        (0..layout.batch * layout.outer)
            .map(|r| (layout.base + r * layout.row_stride, r * row_len, row_len))
            .collect()
    };
    let mut out = Vec::new();
    for (first, unit, len) in runs {
        let mut done = 0;
        while done < len {
            let at = first + done;
            let start = at / align * align;
            let skip = at - start;
            let n = (chunk - skip).min(len - done);
            let u = unit + done;
            let row = u / (inner * channels);
            out.push(ElementWindow {
                start,
                skip,
                len: n,
                a_start: row / outer,
                o_start: row % outer,
                c_start: (u / inner) % channels,
                j_start: u % inner,
            });
            done += n;
        }
    }
    out
}

/// A run of a layout's slices whose per-slice values (statistics, coefficients,
/// parameters) fit one storage binding: an op binds its per-slice buffers from slice
/// `first` and runs its passes on `layout`, the run's part of the tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SliceGroup {
    pub first: u64,
    pub layout: ChannelLayout,
}

/// Splits `layout` into groups of at most `max_slices` slices, each starting on a
/// multiple of `align` slices so that per-slice buffers (4 or 16 bytes a slice) are
/// bound at aligned offsets; the whole layout, as one group, when it fits. Runs of
/// whole batch entries where they fit, else runs of channels of one batch entry (rows
/// `row_stride` apart). Refused (`TooLarge`) only for batched layouts whose batch
/// entries cannot start on aligned slices (Jittor's weight norm over a middle axis,
/// with more slices than a binding holds and a channel count that is not a multiple of
/// `align`).
pub(crate) fn slice_groups(
    op: &'static str,
    layout: ChannelLayout,
    max_slices: u64,
    align: u64,
) -> Result<Vec<SliceGroup>> {
    if layout.slices() <= max_slices {
        return Ok(vec![SliceGroup { first: 0, layout }]);
    }
    let align = align.max(1);
    let per = max_slices / align * align;
    let too_large = |why: String| Error::TooLarge {
        op,
        problem: format!("{} slices: {why}", layout.slices()),
    };
    if per == 0 {
        return Err(too_large(format!(
            "a binding holds the values of {max_slices} slices, fewer than the {align} of an aligned offset"
        )));
    }
    let ChannelLayout {
        batch,
        outer,
        channels,
        inner,
        base,
        row_stride,
    } = layout;
    let mut groups = Vec::new();
    if batch > 1 && channels <= per && layout.contiguous() {
        // Batch entries between aligned slices, and as many of those as fit.
        let step = align / gcd(channels, align);
        let n = per / channels / step * step;
        if n > 0 {
            let mut a0 = 0;
            while a0 < batch {
                let na = n.min(batch - a0);
                groups.push(SliceGroup {
                    first: a0 * channels,
                    layout: ChannelLayout {
                        batch: na,
                        base: base + a0 * outer * row_stride,
                        ..layout
                    },
                });
                a0 += na;
            }
            return Ok(groups);
        }
    }
    if batch > 1 && !channels.is_multiple_of(align) {
        return Err(too_large(format!(
            "batch entries of {channels} slices do not start on multiples of {align} slices, where per-slice buffers can be bound"
        )));
    }
    for a in 0..batch {
        let mut c0 = 0;
        while c0 < channels {
            let n = per.min(channels - c0);
            groups.push(SliceGroup {
                first: a * channels + c0,
                layout: ChannelLayout {
                    batch: 1,
                    outer,
                    channels: n,
                    inner,
                    base: base + a * outer * row_stride + c0 * inner,
                    // A single row is contiguous whatever the stride.
                    row_stride: if outer == 1 { n * inner } else { row_stride },
                },
            });
            c0 += n;
        }
    }
    Ok(groups)
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Refuses a gradient (or any second input) whose shape is not the weight's, naming both.
pub(crate) fn check_same_shape(
    op: &'static str,
    what: &str,
    got: &[usize],
    weight: &[usize],
) -> Result<()> {
    if got != weight {
        return Err(Error::input(
            op,
            format!("{what} has shape {got:?} but the weight has shape {weight:?}"),
        ));
    }
    Ok(())
}

/// A gradient has its tensor's type (PyTorch's autograd keeps them equal): `what`,
/// of type `got`, must be of `whose` type `want`.
pub(crate) fn check_grad_dtype(
    op: &'static str,
    what: &str,
    got: crate::DType,
    whose: &str,
    want: crate::DType,
) -> Result<()> {
    if got != want {
        return Err(Error::input(
            op,
            format!("{what} is {got} but {whose} is {want}; a gradient has its tensor's type"),
        ));
    }
    Ok(())
}

/// The checks of a weight's incoming gradient: the weight's shape and type.
pub(crate) fn check_weight_grad(
    op: &'static str,
    grad_output: &crate::Tensor,
    weight: &crate::Tensor,
) -> Result<()> {
    check_same_shape(op, "grad_output", grad_output.shape(), weight.shape())?;
    check_grad_dtype(
        op,
        "grad_output",
        grad_output.dtype(),
        "the weight",
        weight.dtype(),
    )
}

// Mirrors `RowParams` in shaders/shared/rows.wgsl (WS and WN row kernels).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct RowParams {
    pub rows: u32,
    pub len: u32,
    pub skip: u32,
    pub tpr: u32,
    pub first_row: u32,
    pub eps: f32,
    pub inv_n: f32,
    pub inv_divisor: f32,
}

impl RowGeometry {
    /// The pipeline specialisation of the row kernels: their workgroup size.
    pub fn spec(&self) -> crate::gpu::Spec {
        crate::gpu::Spec {
            rows: Some(self.workgroup),
            row_batch: self.batch,
            ..Default::default()
        }
    }

    /// `kernel`, or its vec4 variant when rows are a multiple of 4 long.
    pub fn pick(&self, kernel: crate::gpu::Kernel) -> crate::gpu::Kernel {
        kernel.vec4_twin().filter(|_| self.vec4).unwrap_or(kernel)
    }

    /// The row-kernel params of window `w` (the op fills `eps`, `inv_n`, `inv_divisor`).
    pub fn params(&self, w: &RowWindow, first_row: u64) -> RowParams {
        RowParams {
            rows: w.rows as u32,
            len: self.len,
            skip: self.skip(w),
            tpr: self.tpr,
            first_row: first_row as u32,
            ..RowParams::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_params_mirror_the_wgsl_struct() {
        use crate::gpu::kernels::mirror;
        for module in [
            "weight_standardization",
            "weight_norm.vec4",
            "spectral_norm",
        ] {
            mirror!(
                module,
                RowParams,
                [rows, len, skip, tpr, first_row, eps, inv_n, inv_divisor]
            );
        }
    }

    fn limits(binding: u64, align: u64) -> PlanLimits {
        PlanLimits::for_tests(binding, align, false)
    }

    /// Row windows cover every row exactly once, whole, inside one binding, from an
    /// aligned start; layouts that are not contiguous rows are refused.
    #[test]
    fn row_windows_cover_whole_rows() {
        for (rows, len, binding, align) in [
            (10, 7, 64, 4),
            (1000, 513, 4096, 64),
            (3, 100, 1 << 20, 64),
            (5, 64, 64, 64),
        ] {
            let layout = ChannelLayout::new(&[rows as usize, len as usize], Some(0));
            let lim = limits(binding, align);
            let windows = row_windows(layout, &lim);
            if len + align > binding {
                assert!(windows.is_none(), "{rows}x{len} in {binding}");
                continue;
            }
            let windows = windows.unwrap();
            let mut next = 0;
            for w in &windows {
                assert_eq!(w.start % align, 0);
                assert!(w.len <= binding);
                assert_eq!(w.start + w.skip, next * len);
                assert_eq!(w.len, w.skip + w.rows * len);
                next += w.rows;
            }
            assert_eq!(next, rows);
        }
        let deconv = ChannelLayout::new(&[4, 8, 3], Some(1));
        assert!(row_windows(deconv, &limits(1 << 20, 64)).is_none());
        let long = ChannelLayout::new(&[2, ROW_KERNEL_MAX_LEN as usize + 1], Some(0));
        assert!(row_windows(long, &limits(1 << 30, 64)).is_none());
    }

    #[test]
    fn element_windows_cover_and_locate() {
        let layout = ChannelLayout::dense(2, 3, 5, 1001);
        let w = element_windows(layout, &limits(1000, 64));
        let mut next = 0;
        for win in &w {
            assert_eq!(win.start, next);
            assert_eq!(win.start % 64, 0);
            assert_eq!(win.c_start, (win.start / 1001) % 5);
            assert_eq!(win.j_start, win.start % 1001);
            assert_eq!(win.o_start, (win.start / 5005) % 3);
            assert_eq!(win.a_start, win.start / 15015);
            next += win.len;
        }
        assert_eq!(next, layout.len());
    }
}
