//! Per-channel reductions shared by the normalizations (`shaders/channel_stats.wgsl`):
//! the split of a [`ChannelLayout`] into items and binding-sized boxes, and their
//! recording (partials, then a combine per channel).

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::gpu::{
    Bind, Context, DType, Kernel, PlanLimits, Recording, Spec, Tensor, WORKGROUP_SIZE,
};

use super::cast::widened;
use super::layout::{slice_groups, ChannelLayout};

/// Threads per workgroup of the reductions (`WG` in shaders/channel_stats.wgsl).
pub(crate) const REDUCE_WORKGROUP: u64 = 64;

// Mirrors `ReduceParams` in shaders/channel_stats.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct ReduceParams {
    channels: u32,
    inner: u32,
    row_stride: u32,
    outer: u32,
    rows_per_item: u32,
    row_chunk: u32,
    chunks_per_row: u32,
    partials_per_channel: u32,
    box_b0: u32,
    box_c0: u32,
    box_jc0: u32,
    box_nb: u32,
    box_nc: u32,
    box_njc: u32,
    base_delta: u32,
    blocks_per_batch: u32,
    vector_start: u32,
    _pad: [u32; 3],
}

// Mirrors `CombineParams` in shaders/channel_stats.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct CombineParams {
    channels: u32,
    partials_per_channel: u32,
    _pad: [u32; 2],
}

/// A box of items `b0.., c0.., jc0..` that one dispatch reduces, and the window it reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ReduceBox {
    pub b0: u64,
    pub nb: u64,
    pub c0: u64,
    pub nc: u64,
    pub jc0: u64,
    pub njc: u64,
    /// First element of the binding window (aligned).
    pub bind_start: u64,
    /// Elements in the binding window.
    pub bind_len: u64,
    /// First element of the box, minus `bind_start`.
    pub base_delta: u64,
}

/// How a reduction over a [`ChannelLayout`] is split: into slice groups whose
/// per-slice results fit one binding (one group, the whole layout, unless there are
/// more slices than that), each reduced by its own plan.
#[derive(Clone, Debug)]
pub(crate) struct ReducePlan {
    pub layout: ChannelLayout,
    /// (first slice, plan) of each group.
    groups: Vec<(u64, GroupPlan)>,
}

/// How the reduction of one slice group is split into items and binding-sized boxes.
#[derive(Clone, Debug)]
struct GroupPlan {
    layout: ChannelLayout,
    pub rows_per_item: u64,
    pub row_chunk: u64,
    pub chunks_per_row: u64,
    /// Item blocks along `outer` in one batch entry.
    blocks_per_batch: u64,
    boxes: Vec<ReduceBox>,
    /// The channels-last split, when the layout has one (see [`ChannelsLastPlan`]).
    channels_last: Option<ChannelsLastPlan>,
    /// Binding windows start at multiples of this many elements.
    align: u64,
}

/// Channels-last reductions (`batch == 1`, `inner == 1`, channels a multiple of 4,
/// e.g. NHWC batch norm): a workgroup reduces a block of rows for up to 64 groups of
/// 4 channels, each thread accumulating a vec4 (4 channels) over every `tr`-th row of
/// the block, so the reads are whole contiguous rows rather than one strided column
/// per item. Partial slot: `channel * blocks + block`.
#[derive(Clone, Debug)]
pub(crate) struct ChannelsLastPlan {
    /// Channels / 4.
    c4: u64,
    /// Groups of 4 channels per workgroup (`min(c4, 64)`).
    group: u64,
    /// Threads along the rows (`64 / group`).
    tr: u64,
    /// Workgroups across the channels (`c4 / group`, rounded up).
    ngroups: u64,
    rows_per_block: u64,
    /// Blocks of rows: the partials per channel.
    pub blocks: u64,
    boxes: Vec<ClBox>,
}

/// A run of blocks in one binding window.
#[derive(Clone, Copy, Debug)]
struct ClBox {
    block0: u64,
    nblocks: u64,
    bind_start: u64,
    bind_len: u64,
    base_delta: u64,
}

// Mirrors `ClParams` in shaders/channel_stats.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct ClParams {
    c4: u32,
    rows: u32,
    rows_per_block: u32,
    group: u32,
    tr: u32,
    ngroups: u32,
    block0: u32,
    nblocks: u32,
    base_delta: u32,
    blocks: u32,
    _pad: [u32; 2],
}

impl ChannelsLastPlan {
    fn new(layout: ChannelLayout, limits: &PlanLimits) -> Option<Self> {
        let ChannelLayout {
            batch,
            outer,
            channels,
            inner,
            ..
        } = layout;
        let align = limits.align_elems.max(1);
        if batch != 1
            || inner != 1
            || channels == 0
            || !channels.is_multiple_of(4)
            || outer == 0
            || outer > u64::from(u32::MAX)
        {
            return None;
        }
        let window = limits.max_binding_elems.saturating_sub(align);
        let window_rows = window / channels;
        if window_rows == 0 {
            return None;
        }
        let c4 = channels / 4;
        let group = c4.min(REDUCE_WORKGROUP);
        let tr = REDUCE_WORKGROUP / group;
        // Elements a block aims at: the adapter's reduction item (enough workgroups in
        // flight on a GPU, enough work per workgroup on a CPU), and shifted sums over
        // few enough rows per thread to stay accurate.
        let block_elems = limits.tuning.cl_block_elems;
        let mut rows_per_block = (block_elems / channels).clamp(tr, 1024).min(window_rows);
        // The partials (a vec4 per channel and block) are bound whole: with many
        // channels, blocks grow until they fit one binding ([1024, 16384] would need
        // four times the input in partials, past a 128 MiB binding).
        let max_blocks = limits.max_binding_elems / (channels * 4);
        if max_blocks == 0 {
            return None;
        }
        rows_per_block = rows_per_block.max(outer.div_ceil(max_blocks));
        if rows_per_block > window_rows {
            return None;
        }
        let blocks = outer.div_ceil(rows_per_block);
        let per_box = (window_rows / rows_per_block).max(1);
        let mut boxes = Vec::new();
        let mut b = 0;
        while b < blocks {
            let nblocks = per_box.min(blocks - b);
            let start = b * rows_per_block * channels;
            let end = ((b + nblocks) * rows_per_block).min(outer) * channels;
            let bind_start = start / align * align;
            boxes.push(ClBox {
                block0: b,
                nblocks,
                bind_start,
                bind_len: end - bind_start,
                base_delta: start - bind_start,
            });
            b += nblocks;
        }
        Some(ChannelsLastPlan {
            c4,
            group,
            tr,
            ngroups: c4.div_ceil(group),
            rows_per_block,
            blocks,
            boxes,
        })
    }

    fn params(&self, rows: u64, bx: &ClBox) -> ClParams {
        ClParams {
            c4: self.c4 as u32,
            rows: rows as u32,
            rows_per_block: self.rows_per_block as u32,
            group: self.group as u32,
            tr: self.tr as u32,
            ngroups: self.ngroups as u32,
            block0: bx.block0 as u32,
            nblocks: bx.nblocks as u32,
            base_delta: (bx.base_delta / 4) as u32,
            blocks: self.blocks as u32,
            _pad: [0; 2],
        }
    }
}

impl ReducePlan {
    pub fn new(op: &'static str, layout: ChannelLayout, limits: &PlanLimits) -> Result<Self> {
        // A vec4 per slice (results, a centre) in one binding, per group; and the
        // group's partials, at least one per slice and more for long slices (a group
        // whose rows are strided has a partial per row at least): groups are made
        // smaller until their partials fit one binding too.
        let align = limits.align_elems.max(1);
        let mut max_slices = limits.max_binding_elems / 4;
        loop {
            let plans = slice_groups(op, layout, max_slices, align)?
                .into_iter()
                .map(|g| Ok((g.first, GroupPlan::new(op, g.layout, limits)?)))
                .collect::<Result<Vec<_>>>();
            match plans {
                Err(Error::TooLarge { .. }) if max_slices.min(layout.slices()) > align => {
                    max_slices = (max_slices.min(layout.slices()) / 2).max(align);
                }
                plans => {
                    return Ok(ReducePlan {
                        layout,
                        groups: plans?,
                    })
                }
            }
        }
    }

    /// Whether a reduction of `kernel` reads its data in units of four elements in
    /// every group (vec4 or channels-last kernels), so that half data need no widening.
    fn by_four(&self, kernel: Kernel) -> bool {
        self.groups.iter().all(|(_, g)| {
            (g.channels_last.is_some() && kernel.channels_last_twin().is_some())
                || (g.by_vec4() && kernel.vec4_twin().is_some())
        })
    }
}

impl GroupPlan {
    fn new(op: &'static str, layout: ChannelLayout, limits: &PlanLimits) -> Result<Self> {
        let ChannelLayout {
            batch,
            outer,
            channels,
            inner,
            base,
            row_stride,
        } = layout;
        let align = limits.align_elems.max(1);
        // Room for the box start to be aligned down.
        let window = limits.max_binding_elems.saturating_sub(align);
        // Items are sized per adapter (`Tuning::reduce_item_elems`: small on GPUs, for
        // enough workgroups in flight) and shrink with tiny bindings (a test option).
        let item_elems = limits.tuning.reduce_item_elems.min(window);
        if window < u64::from(WORKGROUP_SIZE) {
            return Err(Error::TooLarge {
                op,
                problem: format!(
                    "storage bindings of {} elements are too small",
                    limits.max_binding_elems
                ),
            });
        }
        if row_stride > u64::from(u32::MAX)
            || batch * outer > u64::from(u32::MAX)
            || layout.slices() > u64::from(u32::MAX)
        {
            return Err(Error::TooLarge {
                op,
                problem: format!("layout {layout:?} has a dimension past u32"),
            });
        }
        // The partials and the per-channel results (a vec4 per slice) are bound whole.
        let max_ppc = limits.max_binding_elems / (layout.slices().max(1) * 4);
        if max_ppc == 0 {
            return Err(Error::TooLarge {
                op,
                problem: format!(
                    "{} slices need per-slice statistics of {} bytes, past one storage binding ({} bytes)",
                    layout.slices(),
                    layout.slices() * 16,
                    limits.max_binding_elems * 4
                ),
            });
        }
        let mut row_chunk = inner.clamp(1, item_elems);
        if inner.div_ceil(row_chunk) > max_ppc {
            // Few partials per row: chunks as long as a window allows.
            row_chunk = inner.div_ceil(max_ppc).min(window);
        }
        let chunks_per_row = inner.div_ceil(row_chunk).max(1);
        let mut rows_per_item = (item_elems / row_chunk).clamp(1, outer.max(1));
        // Items long enough for the partials of every slice to fit one binding.
        rows_per_item = rows_per_item.max(outer.div_ceil((max_ppc / chunks_per_row).max(1)));
        if row_stride <= window {
            rows_per_item = rows_per_item.min((window / row_stride).max(1));
        } else {
            rows_per_item = 1;
        }
        let blocks_per_batch = outer.div_ceil(rows_per_item);
        if layout.slices() * blocks_per_batch * chunks_per_row > max_ppc * layout.slices() {
            return Err(Error::TooLarge {
                op,
                problem: format!(
                    "layout {layout:?}: its reduction partials do not fit one storage binding of {} bytes",
                    limits.max_binding_elems * 4
                ),
            });
        }
        let blocks = batch * blocks_per_batch;
        // Blocks are numbered batch-major; block bb covers rows [first_row, + rows) of
        // the [batch * outer, row_stride] matrix, so consecutive blocks are contiguous.
        let first_row =
            |bb: u64| (bb / blocks_per_batch) * outer + (bb % blocks_per_batch) * rows_per_item;
        let block_rows =
            |bb: u64| rows_per_item.min(outer - (bb % blocks_per_batch) * rows_per_item);
        let total = layout.len();
        let mut boxes = Vec::new();
        let mut push = |b0, nb, c0, nc, jc0, njc, start: u64, end: u64| {
            let (start, end) = (base + start, base + end);
            let bind_start = start / align * align;
            boxes.push(ReduceBox {
                b0,
                nb,
                c0,
                nc,
                jc0,
                njc,
                bind_start,
                bind_len: end - bind_start,
                base_delta: start - bind_start,
            });
        };
        if total == 0 {
            // Nothing to read; channels (if any) still get empty partials via combine.
        } else if rows_per_item * row_stride <= window {
            let per_box = (window / (rows_per_item * row_stride)).max(1);
            let mut b = 0;
            while b < blocks {
                let nb = per_box.min(blocks - b);
                let last = b + nb - 1;
                let start = first_row(b) * row_stride;
                // The last row ends with the layout's channels (a slice group's rows
                // are `row_stride` apart, longer than that).
                let end = (first_row(last) + block_rows(last) - 1) * row_stride + channels * inner;
                push(b, nb, 0, channels, 0, chunks_per_row, start, end);
                b += nb;
            }
        } else if inner <= window {
            let per_box = (window / inner).max(1);
            for b in 0..blocks {
                let mut c = 0;
                while c < channels {
                    let nc = per_box.min(channels - c);
                    let start = first_row(b) * row_stride + c * inner;
                    push(b, 1, c, nc, 0, chunks_per_row, start, start + nc * inner);
                    c += nc;
                }
            }
        } else {
            let per_box = (window / row_chunk).max(1);
            for b in 0..blocks {
                for c in 0..channels {
                    let mut jc = 0;
                    while jc < chunks_per_row {
                        let njc = per_box.min(chunks_per_row - jc);
                        let row = first_row(b) * row_stride + c * inner;
                        let start = row + jc * row_chunk;
                        let end = row + ((jc + njc) * row_chunk).min(inner);
                        push(b, 1, c, 1, jc, njc, start, end);
                        jc += njc;
                    }
                }
            }
        }
        Ok(GroupPlan {
            layout,
            rows_per_item,
            row_chunk,
            chunks_per_row,
            blocks_per_batch,
            boxes,
            // The channels-last kernels read whole rows of a whole tensor.
            channels_last: if layout.contiguous() && base == 0 {
                ChannelsLastPlan::new(layout, limits)
            } else {
                None
            },
            align,
        })
    }

    /// Partials per channel: the scratch is `channels x` this many vec4.
    pub fn partials_per_channel(&self) -> u64 {
        self.blocks_per_batch * self.chunks_per_row
    }

    /// Whether the partial kernels can run on vec4s: rows, item chunks, box starts
    /// and lengths all multiples of 4 elements.
    fn by_vec4(&self) -> bool {
        self.layout.inner.is_multiple_of(4)
            && self.layout.row_stride.is_multiple_of(4)
            && self.row_chunk.is_multiple_of(4)
            && self
                .boxes
                .iter()
                .all(|b| b.base_delta.is_multiple_of(4) && b.bind_len.is_multiple_of(4))
    }

    /// The partial kernel to run (`kernel`, or with `by4` its vec4 twin, see
    /// [`Self::by_vec4`]) and its params for `bx`.
    fn partials(&self, kernel: Kernel, by4: bool, bx: &ReduceBox) -> (Kernel, ReduceParams) {
        let mut p = self.params(bx);
        match kernel.vec4_twin().filter(|_| by4) {
            Some(k4) => {
                p.inner /= 4;
                p.row_stride /= 4;
                p.row_chunk /= 4;
                p.base_delta /= 4;
                p.vector_start /= 4;
                (k4, p)
            }
            None => (kernel, p),
        }
    }

    fn params(&self, bx: &ReduceBox) -> ReduceParams {
        let l = self.layout;
        ReduceParams {
            channels: l.channels as u32,
            inner: l.inner as u32,
            row_stride: l.row_stride as u32,
            outer: l.outer as u32,
            rows_per_item: self.rows_per_item as u32,
            row_chunk: self.row_chunk as u32,
            chunks_per_row: self.chunks_per_row as u32,
            partials_per_channel: self.partials_per_channel() as u32,
            box_b0: bx.b0 as u32,
            box_c0: bx.c0 as u32,
            box_jc0: bx.jc0 as u32,
            box_nb: bx.nb as u32,
            box_nc: bx.nc as u32,
            box_njc: bx.njc as u32,
            base_delta: bx.base_delta as u32,
            blocks_per_batch: self.blocks_per_batch as u32,
            vector_start: self.vector_window(bx).0 as u32,
            _pad: [0; 3],
        }
    }

    /// The elements `[start, start + len)` (`start` aligned) of a per-column vector
    /// (`vector[o * inner + j]`, `record_dot`'s, batch 1) that box `bx` reads: at most
    /// a window, since the box's rows (or part of one) fit one.
    fn vector_window(&self, bx: &ReduceBox) -> (u64, u64) {
        let l = self.layout;
        if bx.nb == 0 || l.outer == 0 {
            return (0, 0);
        }
        let first = (bx.b0 % self.blocks_per_batch) * self.rows_per_item;
        let last = ((bx.b0 % self.blocks_per_batch + bx.nb) * self.rows_per_item).min(l.outer) - 1;
        let lo = first * l.inner + bx.jc0 * self.row_chunk;
        let hi = last * l.inner + ((bx.jc0 + bx.njc) * self.row_chunk).min(l.inner);
        let start = lo / self.align * self.align;
        (start, hi.max(lo) - start)
    }
}

/// Scratch of `count` vec4 for per-channel results (from the context's pool).
pub(crate) fn vec4_buffer(ctx: &Context, op: &'static str, count: u64) -> Result<Tensor> {
    ctx.scratch(op, count.max(1) * 4)
}

/// Records the per-channel Welford statistics of `x`: returns a buffer of
/// `vec4(mean, m2, count, 0)` per channel.
pub(crate) fn record_welford(
    rec: &mut Recording<'_>,
    op: &'static str,
    plan: &ReducePlan,
    x: &Tensor,
) -> Result<Tensor> {
    let kernel = Kernel::WelfordPartials;
    let (data, dtype) = data_tensors(rec, plan, kernel, &[x])?;
    record_partials(rec, op, plan, kernel, Kernel::WelfordCombine, dtype, |w| {
        vec![Bind::window(&data[0], w.start, w.len)]
    })
}

/// Records per-channel `(sum a, sum a (b - centre[c]), sum (b - centre[c])^2, 0)`; `centre` is a vec4 per
/// channel buffer whose first component is subtracted (none: no centring).
pub(crate) fn record_sums(
    rec: &mut Recording<'_>,
    op: &'static str,
    plan: &ReducePlan,
    a: &Tensor,
    b: &Tensor,
    centre: Option<&Tensor>,
) -> Result<Tensor> {
    let dummy = rec.context().dummy.clone();
    let kernel = match centre {
        Some(_) => Kernel::SumPartialsCentered,
        None => Kernel::SumPartials,
    };
    let (data, dtype) = data_tensors(rec, plan, kernel, &[a, b])?;
    record_partials(rec, op, plan, kernel, Kernel::SumCombine, dtype, |w| {
        vec![
            Bind::window(&data[0], w.start, w.len),
            Bind::window(&data[1], w.start, w.len),
            centre.map_or(Bind::elems(&*dummy, 4), |c| {
                Bind::window(c, w.first * 4, w.slices * 4)
            }),
        ]
    })
}

/// Records per-channel `sum_{o, j} x[o, c, j] * vector[o * inner + j]` (first component
/// of a vec4 per channel), for a layout with `batch == 1`: the row reduction `M v`.
/// `vector` is f32, bound box by box (the elements each box reads).
pub(crate) fn record_dot(
    rec: &mut Recording<'_>,
    op: &'static str,
    plan: &ReducePlan,
    x: &Tensor,
    vector: &Tensor,
) -> Result<Tensor> {
    debug_assert_eq!(plan.layout.batch, 1);
    let kernel = Kernel::DotPartials;
    let (data, dtype) = data_tensors(rec, plan, kernel, &[x])?;
    record_partials(rec, op, plan, kernel, Kernel::SumCombine, dtype, |w| {
        vec![
            Bind::window(&data[0], w.start, w.len),
            Bind::window(vector, w.vector.0, w.vector.1),
        ]
    })
}

/// The data tensors a reduction reads, and their type: as given when they share one
/// and the plan reads them in units of four (vec4 or channels-last kernels), else
/// widened to f32 (see `cast.rs`).
fn data_tensors(
    rec: &mut Recording<'_>,
    plan: &ReducePlan,
    kernel: Kernel,
    tensors: &[&Tensor],
) -> Result<(Vec<Tensor>, DType)> {
    let dtype = tensors[0].dtype();
    let same = tensors.iter().all(|t| t.dtype() == dtype);
    if same && (dtype == DType::F32 || plan.by_four(kernel)) {
        return Ok((tensors.iter().map(|t| (*t).clone()).collect(), dtype));
    }
    let wide = tensors
        .iter()
        .map(|t| widened(rec, t))
        .collect::<Result<Vec<_>>>()?;
    Ok((wide, DType::F32))
}

/// What one dispatch of a reduction reads: the group's first slice and its slices,
/// the data window, and the elements of `record_dot`'s vector its box reads.
struct BoxWindow {
    first: u64,
    slices: u64,
    start: u64,
    len: u64,
    vector: (u64, u64),
}

/// The partials-then-combine scaffolding, group by group: one dispatch of `kernel` (or
/// its vec4 or channels-last twin) per box, with `binds(its window)` then the partials
/// binding; then `combine` into the group's part of the result (skipped when the layout
/// is one group and each slice has one partial). `dtype` is the type of the data
/// `binds` binds.
fn record_partials<'x>(
    rec: &mut Recording<'_>,
    op: &'static str,
    plan: &ReducePlan,
    kernel: Kernel,
    combine: Kernel,
    dtype: DType,
    binds: impl Fn(&BoxWindow) -> Vec<Bind<'x>>,
) -> Result<Tensor> {
    let ctx = rec.context();
    let spec = Spec {
        dtype,
        ..Spec::default()
    };
    // (partials per slice, no boxes) of each group.
    let shapes: Vec<(u64, bool)> = plan
        .groups
        .iter()
        .map(
            |(_, g)| match g.channels_last.as_ref().zip(kernel.channels_last_twin()) {
                Some((cl, _)) => (cl.blocks, cl.boxes.is_empty()),
                None => (g.partials_per_channel(), g.boxes.is_empty()),
            },
        )
        .collect();
    let most = plan
        .groups
        .iter()
        .zip(&shapes)
        .map(|((_, g), (ppc, _))| g.layout.slices() * ppc.max(&1))
        .max()
        .unwrap_or(1);
    // One partials buffer for every group: each group's combine reads it before the
    // next group's partials overwrite it (dispatches run in order).
    let partials = vec4_buffer(ctx, op, most)?;
    let single = plan.groups.len() == 1;
    let out = match (single, shapes.first()) {
        (true, Some(&(1, false))) => None,
        _ => Some(vec4_buffer(ctx, op, plan.layout.slices())?),
    };
    for ((first, g), &(ppc, empty)) in plan.groups.iter().zip(&shapes) {
        let slices = g.layout.slices();
        let partials_bind = Bind::elems(&partials, slices * ppc.max(1) * 4);
        let window = |start, len, vector| BoxWindow {
            first: *first,
            slices,
            start,
            len,
            vector,
        };
        match g.channels_last.as_ref().zip(kernel.channels_last_twin()) {
            Some((cl, kcl)) => {
                for bx in &cl.boxes {
                    // No channels-last kernel reads a vector.
                    let mut all = binds(&window(bx.bind_start, bx.bind_len, (0, 1)));
                    all.push(partials_bind);
                    let params = cl.params(g.layout.outer, bx);
                    rec.dispatch_spec(kcl, spec, &params, &all, bx.nblocks * cl.ngroups)?;
                }
            }
            None => {
                let by4 = g.by_vec4();
                for bx in &g.boxes {
                    let vector = g.vector_window(bx);
                    let mut all = binds(&window(bx.bind_start, bx.bind_len, vector));
                    all.push(partials_bind);
                    let (kernel, params) = g.partials(kernel, by4, bx);
                    rec.dispatch_spec(kernel, spec, &params, &all, bx.nb * bx.nc * bx.njc)?;
                }
            }
        }
        let Some(out) = &out else {
            // One group, one partial per slice, at slot c: it is already the result.
            return Ok(partials);
        };
        let params = CombineParams {
            channels: slices as u32,
            partials_per_channel: if empty { 0 } else { ppc as u32 },
            _pad: [0; 2],
        };
        rec.dispatch(
            combine,
            &params,
            &[partials_bind, Bind::window(out, first * 4, slices * 4)],
            slices,
        )?;
    }
    Ok(out.unwrap_or(partials))
}

/// Downloads `count` vec4 of a scratch buffer, as a `[count, 4]` array, through a
/// recording (one submission path, one validation scope) and the tensor readback.
pub(crate) fn read_vec4(
    ctx: &Context,
    buffer: &Tensor,
    count: u64,
) -> Result<ndarray::ArrayD<f32>> {
    let t = Tensor::output(ctx, &[count as usize, 4])?;
    ctx.run(|rec| {
        rec.copy_buffer(buffer, &t, count * 16);
        Ok(())
    })?;
    t.to_array(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(binding: u64, align: u64) -> PlanLimits {
        PlanLimits::for_tests(binding, align, false)
    }

    /// Every element of every slice is covered by exactly one item of one box, every
    /// box's reads stay inside its window, every partial slot of a group is written
    /// once, and every item's elements belong to the slice its group numbers it. The
    /// index arithmetic is the shader's (`item_at` in channel_stats.wgsl).
    fn check_cover(layout: ChannelLayout, lim: &PlanLimits) {
        let binding = lim.max_binding_elems;
        let plan = match ReducePlan::new("test", layout, lim) {
            Ok(plan) => plan,
            Err(Error::TooLarge { .. })
                if slice_groups("test", layout, binding / 4, lim.align_elems).is_err() =>
            {
                // Batch entries that cannot start on aligned slices (see `slice_groups`).
                assert!(layout.batch > 1 && !layout.channels.is_multiple_of(lim.align_elems));
                return;
            }
            Err(Error::TooLarge { .. }) => {
                // Refused only when even a group of `align` slices has partials that
                // fit no split: single-row items of at most a window each, or as many
                // rows as a window holds.
                let window = binding - lim.align_elems;
                let row_stride = layout.channels * layout.inner;
                let fewest = if row_stride > window {
                    layout.outer * layout.inner.div_ceil(window)
                } else {
                    layout.outer.div_ceil(window / row_stride)
                };
                let group = layout.slices().min(lim.align_elems);
                assert!(group * fewest * 4 > binding, "{layout:?}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let mut seen = vec![0u8; layout.len() as usize];
        let mut next_slice = 0;
        for (first, g) in &plan.groups {
            assert_eq!(*first, next_slice, "groups are consecutive runs of slices");
            assert_eq!(first % lim.align_elems, 0, "groups start on aligned slices");
            let gl = g.layout;
            next_slice += gl.slices();
            // The per-slice results and the partials are bound whole, per group.
            assert!(gl.slices() * g.partials_per_channel() * 4 <= binding);
            if let Some(cl) = &g.channels_last {
                assert!(gl.channels * cl.blocks * 4 <= binding, "{gl:?}");
                assert!(cl.rows_per_block * gl.channels <= binding - lim.align_elems);
            }
            let ppc = g.partials_per_channel();
            let mut slots = vec![0u8; (gl.slices() * ppc) as usize];
            let k = gl.row_stride;
            let nb = g.blocks_per_batch;
            let ob = g.rows_per_item;
            for bx in &g.boxes {
                assert!(bx.bind_len <= lim.max_binding_elems, "{bx:?}");
                assert_eq!(bx.bind_start % lim.align_elems, 0);
                let (a0, b0) = (bx.b0 / nb, bx.b0 % nb);
                for bl in 0..bx.nb {
                    for cl in 0..bx.nc {
                        for jl in 0..bx.njc {
                            let (bb, c, jc) = (bx.b0 + bl, bx.c0 + cl, bx.jc0 + jl);
                            let (a, b) = (bb / nb, bb % nb);
                            let rows = ob.min(gl.outer - b * ob);
                            let cols = g.row_chunk.min(gl.inner - jc * g.row_chunk);
                            let rows_from = (a - a0) * gl.outer + b * ob - b0 * ob;
                            let base =
                                bx.base_delta + rows_from * k + cl * gl.inner + jl * g.row_chunk;
                            slots[((a * gl.channels + c) * ppc + b * g.chunks_per_row + jc)
                                as usize] += 1;
                            for r in 0..rows {
                                for j in 0..cols {
                                    let rel = base + r * k + j;
                                    assert!(rel < bx.bind_len, "{gl:?} {bx:?}");
                                    let flat = bx.bind_start + rel;
                                    let expect = gl.base
                                        + (a * gl.outer + b * ob + r) * k
                                        + c * gl.inner
                                        + jc * g.row_chunk
                                        + j;
                                    assert_eq!(flat, expect);
                                    // The element's slice in the whole tensor.
                                    let whole_c = flat / layout.inner % layout.channels;
                                    let whole_a =
                                        flat / (layout.inner * layout.channels * layout.outer);
                                    assert_eq!(
                                        whole_a * layout.channels + whole_c,
                                        first + a * gl.channels + c,
                                        "{layout:?} {gl:?}"
                                    );
                                    seen[flat as usize] += 1;
                                }
                            }
                        }
                    }
                }
            }
            assert!(slots.iter().all(|&s| s == 1), "{gl:?}");
        }
        assert_eq!(next_slice, layout.slices());
        assert!(seen.iter().all(|&s| s == 1), "{layout:?}");
    }

    #[test]
    fn params_mirror_the_wgsl_structs() {
        use crate::gpu::kernels::mirror;
        mirror!(
            "channel_stats",
            ReduceParams,
            [
                channels,
                inner,
                row_stride,
                outer,
                rows_per_item,
                row_chunk,
                chunks_per_row,
                partials_per_channel,
                box_b0,
                box_c0,
                box_jc0,
                box_nb,
                box_nc,
                box_njc,
                base_delta,
                blocks_per_batch,
                vector_start
            ]
        );
        mirror!(
            "channel_stats",
            CombineParams,
            [channels, partials_per_channel]
        );
        mirror!(
            "channel_stats",
            ClParams,
            [
                c4,
                rows,
                rows_per_block,
                group,
                tr,
                ngroups,
                block0,
                nblocks,
                base_delta,
                blocks
            ]
        );
    }

    #[test]
    fn plans_cover_every_element_once() {
        let cases = [
            (1, 1, 7, 5),
            (1, 1, 64, 288),
            (1, 1, 3, 10000),
            (1, 9, 13, 1),
            (1, 300, 5, 7),
            (1, 2, 3, 70000),
            (1, 5000, 4, 1),
            (3, 5, 7, 1),
            (4, 2000, 3, 1),
            (6, 7, 1200, 1),
            // Channels last with more partials than a binding holds at one block per
            // `reduce_item_elems` (BN on [1024, 16384] had four times the input).
            (1, 1024, 64, 1),
            (1, 300, 256, 1),
            // More slices than a small binding's vec4s: slice groups, contiguous
            // (outer 1, whole batch entries) and strided (runs of channels).
            (1, 1, 3000, 3),
            (1, 5, 2600, 1),
            (1, 3, 1100, 4),
            (7, 3, 320, 1),
            (3, 2, 1280, 1),
            (2, 2, 1000, 2),
        ];
        for (batch, outer, channels, inner) in cases {
            let layout = ChannelLayout::dense(batch, outer, channels, inner);
            check_cover(layout, &limits(1 << 20, 64));
            // Small bindings force every splitting strategy.
            check_cover(layout, &limits(8192, 64));
            check_cover(layout, &limits(4096 + 16, 16));
            check_cover(layout, &limits(1000, 64));
        }
    }
}
