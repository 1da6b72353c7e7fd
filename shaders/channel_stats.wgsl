// channel_stats.wgsl: per-channel reductions over every axis but one.
//
// Shared by the normalizations: Weight Standardization (mean and variance per output
// channel), Weight Normalization (squared norms), Batch Normalization (batch statistics),
// and every backward pass (sums of the gradient and of gradient x centred input).
//
// Layout. A tensor is viewed as [batch, outer, channels, inner], row-major: slice
// s = a * channels + c owns x[a, o, c, j] for every o and j (batch is 1 but for Jittor's
// weight norm over a middle axis). The reduction is split into items (bb, c, jc): rows
// o in [b * rows_per_item, ...) of batch entry a (bb = a * blocks_per_batch + b) and
// columns j in [jc * row_chunk, ...) of channel c, a few thousand elements each (the
// host sizes them per adapter: small on GPUs, for enough workgroups in flight). One
// workgroup reduces one item to one partial, stored at a fixed slot
// `s * partials_per_channel + b * chunks_per_row + jc`; a combine kernel (one workgroup
// per slice) then reduces each slice's partials. Scratch memory is therefore
// slices x items-per-slice, never a copy of the tensor.
//
// Large tensors. The host groups items into boxes whose elements lie in one storage
// binding window (see `src/ops/channel_stats.rs`); a dispatch reduces one box, and
// `base_delta` is the box's first element relative to the (aligned) window start. All
// in-shader indices are window-relative, so they fit in u32 whatever the tensor size.
//
// Numerics. Each thread sums its elements shifted by the item's first element, turns
// the sums into (mean, M2), and Chan's parallel combine merges threads (shared-memory
// tree) and partials: never E[x^2] - E[x]^2 on raw values, which loses every digit for
// weights with a large common offset. No division per element, which matters on
// software adapters. Sums of squares that reach 2^64 are summed again scaled
// (welford.wgsl), so that they cannot overflow.
//
// Variants: `vec4` (shaders/permutations) when every row, item chunk and box start is
// a multiple of 4 elements: the params (inner, row_stride, row_chunk, base_delta)
// then count vec4s and so does the walk; each lane accumulates on its own and the
// lanes are summed at the end (they share the shift). The channels-last kernels
// (`*_cl`, at the end) are a different walk for [rows, channels] layouts.

const WG: u32 = 64u;

#import grid
#import elem
#import tree

// Mirrors `ReduceParams` in src/ops/channel_stats.rs.
struct ReduceParams {
    channels: u32,
    inner: u32,
    row_stride: u32, // channels * inner
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
    vector_start: u32, // dot_partials: the vector is bound from this element (unit)
    _pad2: u32,
    _pad3: u32,
    _pad4: u32,
}

// Mirrors `CombineParams` in src/ops/channel_stats.rs.
struct CombineParams {
    channels: u32,
    partials_per_channel: u32,
    _pad0: u32,
    _pad1: u32,
}

struct Item {
    slot: u32,  // where the partial goes
    c: u32,     // the slice, a * channels + c
    base: u32,  // window-relative index of the item's first unit
    cols: u32,  // units per row of the item
    count: u32, // units in the item
    o0: u32,    // the item's first row within its batch entry
    j0: u32,    // the item's first column within the channel's row
}

// The item of workgroup `linear` of the box, or none (`count` 0) past the box.
fn item_at(p: ReduceParams, linear: u32) -> Item {
    var it: Item;
    it.count = 0u;
    if (linear >= p.box_nb * p.box_nc * p.box_njc) {
        return it;
    }
    let jl = linear % p.box_njc;
    let rest = linear / p.box_njc;
    let cl = rest % p.box_nc;
    let bl = rest / p.box_nc;
    let bb = p.box_b0 + bl;
    let a = bb / p.blocks_per_batch;
    let b = bb % p.blocks_per_batch;
    let a0 = p.box_b0 / p.blocks_per_batch;
    let b0 = p.box_b0 % p.blocks_per_batch;
    let c = p.box_c0 + cl;
    let jc = p.box_jc0 + jl;
    let rows = min(p.rows_per_item, p.outer - b * p.rows_per_item);
    let cols = min(p.row_chunk, p.inner - jc * p.row_chunk);
    // Rows of [batch * outer, row_stride] between the box's first block and this one
    // (never negative: blocks are numbered in memory order).
    let rows_from = (a - a0) * p.outer + b * p.rows_per_item - b0 * p.rows_per_item;
    it.slot = (a * p.channels + c) * p.partials_per_channel + b * p.chunks_per_row + jc;
    it.c = a * p.channels + c;
    it.base = p.base_delta + rows_from * p.row_stride + cl * p.inner + jl * p.row_chunk;
    it.cols = cols;
    it.count = rows * cols;
    it.o0 = b * p.rows_per_item;
    it.j0 = jc * p.row_chunk;
    return it;
}

// A thread's walk over an item: units lid, lid + WG, ... in row-major item order
// (consecutive threads on consecutive units), kept as (row, column) and advanced
// without a division per unit.
struct Walk {
    row: u32,
    col: u32,
    rows: u32,
    drow: u32,
    dcol: u32,
}

fn walk_start(it: Item, lid: u32) -> Walk {
    var w: Walk;
    w.row = lid / it.cols;
    w.col = lid % it.cols;
    w.rows = it.count / it.cols;
    w.drow = WG / it.cols;
    w.dcol = WG % it.cols;
    return w;
}

fn walk_next(w: ptr<function, Walk>, cols: u32) {
    (*w).col += (*w).dcol;
    (*w).row += (*w).drow;
    if ((*w).col >= cols) {
        (*w).col -= cols;
        (*w).row += 1u;
    }
}

// Window-relative index of the walk's current unit.
fn walk_index(p: ReduceParams, it: Item, w: Walk) -> u32 {
    return it.base + w.row * p.row_stride + w.col;
}

// ---- Welford: mean, M2 and count per channel ------------------------------------

@group(0) @binding(0) var<uniform> wp: ReduceParams;
@group(0) @binding(1) var<storage, read> wp_x: array<D>;
@group(0) @binding(2) var<storage, read_write> wp_out: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn welford_partials(ids: Ids) {
    let it = item_at(wp, group_id(ids));
    if (it.count == 0u) {
        return;
    }
    // Per thread: runs of RESHIFT units summed as (x - shift) and its square, shifted by
    // the run's first unit so that the sums stay of the order of the spread, not of the
    // offset, and an outlier spoils only its own run's sums; each run folded into the
    // thread's (mean, m2, n) by Chan's combine, then across threads and partials. The
    // result does not depend on which element comes first beyond rounding.
    var acc = vec4<f32>(0.0);
    var w = walk_start(it, ids.lid);
    while (w.row < w.rows) {
        let shift = lane0(dload(wp_x[walk_index(wp, it, w)]));
        var s1 = V(0.0);
        var s2 = V(0.0);
        var n = 0u;
        for (var k = 0u; k < RESHIFT && w.row < w.rows; k += 1u) {
            let d = dload(wp_x[walk_index(wp, it, w)]) - shift;
            s1 += d;
            s2 = fma(d, d, s2);
            n += LANES;
            walk_next(&w, it.cols);
        }
        acc = chan_plain(acc, welford_state(shift, hsum(s1), hsum(s2), n));
    }
    let total = tree_welford(ids.lid, acc);
    if (ids.lid == 0u) {
        var out = total;
        if (needs_scaling(total)) {
            // Squares reaching 2^64 somewhere in the item (welford.wgsl: the rare path):
            // the whole item again by this invocation, in runs of RESHIFT units, scaled.
            out = vec4<f32>(0.0);
            var r = walk_start(it, 0u);
            r.drow = 1u / it.cols;
            r.dcol = 1u % it.cols;
            while (r.row < r.rows) {
                let shift = lane0(dload(wp_x[walk_index(wp, it, r)]));
                var s1 = V(0.0);
                var q1 = V(0.0);
                var q2 = V(0.0);
                var n = 0u;
                for (var k = 0u; k < RESHIFT && r.row < r.rows; k += 1u) {
                    let x = dload(wp_x[walk_index(wp, it, r)]);
                    s1 += x - shift;
                    let d = x * DOWN - shift * DOWN;
                    q1 += d;
                    q2 = fma(d, d, q2);
                    n += LANES;
                    walk_next(&r, it.cols);
                }
                out = chan_scaled(out, welford_state_scaled(shift, hsum(s1), hsum(q1), hsum(q2), n));
            }
        }
        wp_out[it.slot] = out;
    }
}

@group(0) @binding(0) var<uniform> wc: CombineParams;
@group(0) @binding(1) var<storage, read> wc_partials: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> wc_out: array<vec4<f32>>;

// One workgroup per channel: out[c] = vec4(mean, m2, count, 0).
@compute @workgroup_size(WG)
fn welford_combine(ids: Ids) {
    let c = group_id(ids);
    if (c >= wc.channels) {
        return;
    }
    let first = c * wc.partials_per_channel;
    var acc = vec4<f32>(0.0);
    for (var i = ids.lid; i < wc.partials_per_channel; i += WG) {
        acc = chan_plain(acc, wc_partials[first + i]);
    }
    let total = tree_welford(ids.lid, acc);
    if (ids.lid == 0u) {
        var out = total;
        if (needs_scaling(total)) {
            // A scaled partial, or m2 past 2^64 (welford.wgsl: the rare path): the
            // partials again by this invocation, scaled where they must be.
            out = vec4<f32>(0.0);
            for (var i = 0u; i < wc.partials_per_channel; i += 1u) {
                out = chan(out, wc_partials[first + i]);
            }
        }
        wc_out[c] = out;
    }
}

// ---- Sums: (sum a, sum a (b - centre[c]), sum (b - centre[c])^2) per channel -----
// (the last in two parts, z and w: welford.wgsl's scaled sums of squares)
//
// With a = grad, b = v and no centre: <grad, v> and the squared norm of v in one pass.
// With a = grad, b = x, centre = mean: the two sums every normalization backward needs,
// centred so that a large common offset in x costs no precision.

override CENTERED: bool = false;

@group(0) @binding(0) var<uniform> sp: ReduceParams;
@group(0) @binding(1) var<storage, read> sp_a: array<D>;
@group(0) @binding(2) var<storage, read> sp_b: array<D>;
// vec4 per channel; the centre is its first component (a Welford or finalize output).
@group(0) @binding(3) var<storage, read> sp_centre: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> sp_out: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn sum_partials(ids: Ids) {
    let it = item_at(sp, group_id(ids));
    if (it.count == 0u) {
        return;
    }
    var centre = 0.0;
    if (CENTERED) {
        centre = sp_centre[it.c].x;
    }
    var sa = V(0.0);
    var sab = V(0.0);
    var sbb = V(0.0);
    var w = walk_start(it, ids.lid);
    while (w.row < w.rows) {
        let e = walk_index(sp, it, w);
        let a = dload(sp_a[e]);
        let b = dload(sp_b[e]) - centre;
        sa += a;
        sab = fma(a, b, sab);
        sbb = fma(b, b, sbb);
        walk_next(&w, it.cols);
    }
    // The sum of (b - centre)^2 in two parts (welford.wgsl): z plain, w scaled when
    // this thread's reached 2^64.
    var bb = vec2<f32>(hsum(sbb), 0.0);
    if (!(bb.x < BIG)) {
        var q = V(0.0);
        var r = walk_start(it, ids.lid);
        while (r.row < r.rows) {
            let b = dload(sp_b[walk_index(sp, it, r)]) * DOWN - centre * DOWN;
            q = fma(b, b, q);
            walk_next(&r, it.cols);
        }
        bb = vec2<f32>(0.0, hsum(q));
    }
    let total = tree_sum(ids.lid, vec4<f32>(hsum(sa), hsum(sab), bb));
    if (ids.lid == 0u) {
        sp_out[it.slot] = total;
    }
}

@group(0) @binding(0) var<uniform> sc: CombineParams;
@group(0) @binding(1) var<storage, read> sc_partials: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> sc_out: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn sum_combine(ids: Ids) {
    let c = group_id(ids);
    if (c >= sc.channels) {
        return;
    }
    let first = c * sc.partials_per_channel;
    var acc = vec4<f32>(0.0);
    for (var i = ids.lid; i < sc.partials_per_channel; i += WG) {
        acc += sc_partials[first + i];
    }
    let total = tree_sum(ids.lid, acc);
    if (ids.lid == 0u) {
        sc_out[c] = total;
    }
}

// ---- Dots: sum_{o, j} x[o, c, j] * vector[o * inner + j] per channel ---------------
//
// With batch = 1: the matrix-vector product M v of spectral normalization, where M's
// row c is everything of channel c (outer x inner) and v runs over (o, j). Rows are
// read contiguously (the walk's row-major order). Result in the first component.

@group(0) @binding(0) var<uniform> dp: ReduceParams;
@group(0) @binding(1) var<storage, read> dp_x: array<D>;
@group(0) @binding(2) var<storage, read> dp_vector: array<V>;
@group(0) @binding(3) var<storage, read_write> dp_out: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn dot_partials(ids: Ids) {
    let it = item_at(dp, group_id(ids));
    if (it.count == 0u) {
        return;
    }
    var acc = V(0.0);
    var w = walk_start(it, ids.lid);
    while (w.row < w.rows) {
        let e = walk_index(dp, it, w);
        acc = fma(dload(dp_x[e]), dp_vector[(it.o0 + w.row) * dp.inner + it.j0 + w.col - dp.vector_start], acc);
        walk_next(&w, it.cols);
    }
    let total = tree_sum(ids.lid, vec4<f32>(hsum(acc), 0.0, 0.0, 0.0));
    if (ids.lid == 0u) {
        dp_out[it.slot] = total;
    }
}

// ---- channels-last reductions -----------------------------------------------------
//
// For layouts whose channels are the last axis (inner = 1) and a multiple of 4, e.g.
// NHWC batch norm: a workgroup takes a block of rows and up to 64 groups of 4
// channels; thread (tg, tr) accumulates the vec4 of channels 4 g .. 4 g + 3 over rows
// r0 + tr, r0 + tr + TR, ..., so the workgroup reads whole contiguous rows. Sums are
// shifted by the block's first row (one shift per channel, shared by the threads of a
// channel group), then added across tr and written as one partial per channel and
// block, at `channel * blocks + block`. Indices count vec4s. These kernels read vec4s
// in every module; the list uses the base module's.

// Mirrors `ClParams` in src/ops/channel_stats.rs.
struct ClParams {
    c4: u32,             // channels / 4
    rows: u32,           // rows of the whole tensor
    rows_per_block: u32,
    group: u32,          // channel groups per workgroup
    tr: u32,             // threads along the rows
    ngroups: u32,        // workgroups across the channel groups
    block0: u32,         // the box's first block
    nblocks: u32,        // blocks in the box
    base_delta: u32,     // the box's first vec4, window-relative
    blocks: u32,         // blocks in all: partials per channel
    _pad0: u32,
    _pad1: u32,
}

struct ClThread {
    block: u32,
    g4: u32,       // the thread's group of 4 channels
    tr: u32,
    live: bool,
    first: u32,    // window-relative vec4 of the block's first row, channel group g4
    r0: u32,
    r1: u32,
}

fn cl_thread(p: ClParams, linear: u32, lid: u32) -> ClThread {
    var t: ClThread;
    t.block = p.block0 + linear / p.ngroups;
    let tg = lid % p.group;
    t.tr = lid / p.group;
    t.g4 = (linear % p.ngroups) * p.group + tg;
    t.live = t.tr < p.tr && t.g4 < p.c4;
    t.r0 = t.block * p.rows_per_block;
    t.r1 = min(t.r0 + p.rows_per_block, p.rows);
    t.first = p.base_delta + (t.r0 - p.block0 * p.rows_per_block) * p.c4 + t.g4;
    return t;
}

var<workgroup> cl_red: array<mat3x4<f32>, WG>;

// Adds the three accumulators of the `tr` threads of each channel group; the result
// is meaningful in the threads with tr == 0.
fn cl_rows_sum(p: ClParams, t: ClThread, lid: u32, acc: mat3x4<f32>) -> mat3x4<f32> {
    cl_red[lid] = acc;
    workgroupBarrier();
    var total = acc;
    if (t.live && t.tr == 0u) {
        for (var k = 1u; k < p.tr; k += 1u) {
            total += cl_red[lid + k * p.group];
        }
    }
    return total;
}

@group(0) @binding(0) var<uniform> wcl: ClParams;
@group(0) @binding(1) var<storage, read> wcl_x: array<D4>;
@group(0) @binding(2) var<storage, read_write> wcl_out: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn welford_partials_cl(ids: Ids) {
    let linear = group_id(ids);
    if (linear >= wcl.nblocks * wcl.ngroups) {
        return;
    }
    let t = cl_thread(wcl, linear, ids.lid);
    // Per thread: sums shifted by its own first row (4 features at once), turned into a
    // Welford state per feature: (mean, m2, count) as three vec4s.
    var acc = mat3x4<f32>();
    let r_first = t.r0 + t.tr;
    if (t.live && r_first < t.r1) {
        let shift = dload4(wcl_x[t.first + t.tr * wcl.c4]);
        var s1 = vec4<f32>(0.0);
        var s2 = vec4<f32>(0.0);
        var n = 0.0;
        for (var r = r_first; r < t.r1; r += wcl.tr) {
            let d = dload4(wcl_x[t.first + (r - t.r0) * wcl.c4]) - shift;
            s1 += d;
            s2 = fma(d, d, s2);
            n += 1.0;
        }
        let dm = s1 / n;
        // Where the squares reached 2^64, m2 is s2 itself (at least 2^64, or Inf): never
        // the NaN of Inf - Inf, so the combined m2 shows it.
        let m2 = select(s2, max(s2 - s1 * dm, vec4<f32>(0.0)), s2 < vec4<f32>(BIG));
        acc = mat3x4<f32>(shift + dm, m2, vec4<f32>(n));
    }
    cl_red[ids.lid] = acc;
    workgroupBarrier();
    if (t.live && t.tr == 0u) {
        // Chan's combine of the `tr` threads of this channel group, 4 features at once.
        for (var k = 1u; k < wcl.tr; k += 1u) {
            let b = cl_red[ids.lid + k * wcl.group];
            let nb = b[2];
            let n = acc[2] + nb;
            let wb = select(vec4<f32>(0.0), nb / n, n > vec4<f32>(0.0));
            let d = b[0] - acc[0];
            acc = mat3x4<f32>(acc[0] + d * wb, acc[1] + b[1] + d * d * acc[2] * wb, n);
        }
        var scaled = vec4<f32>(0.0);
        let need = !(acc[1] < vec4<f32>(BIG));
        if (any(need)) {
            // An m2 that reached 2^64 (welford.wgsl: the rare path): the whole block again
            // by this thread, in runs of RESHIFT rows, m2 in units of 2^140, for the
            // features that need it (the others' squares would underflow scaled).
            var m = vec4<f32>(0.0);
            var m2 = vec4<f32>(0.0);
            var cnt = vec4<f32>(0.0);
            for (var r0 = t.r0; r0 < t.r1; r0 += RESHIFT) {
                let shift = dload4(wcl_x[t.first + (r0 - t.r0) * wcl.c4]);
                let end = min(r0 + RESHIFT, t.r1);
                var s1 = vec4<f32>(0.0);
                var q1 = vec4<f32>(0.0);
                var q2 = vec4<f32>(0.0);
                for (var r = r0; r < end; r += 1u) {
                    let x = dload4(wcl_x[t.first + (r - t.r0) * wcl.c4]);
                    s1 += x - shift;
                    let d = x * DOWN - shift * DOWN;
                    q1 += d;
                    q2 = fma(d, d, q2);
                }
                let nr = vec4<f32>(f32(end - r0));
                let mean_r = shift + s1 / nr;
                let n = cnt + nr;
                let wb = nr / n;
                let ds = (mean_r - m) * DOWN;
                m2 = m2 + max(q2 - q1 * (q1 / nr), vec4<f32>(0.0)) + ds * ds * cnt * wb;
                m = m + (mean_r - m) * wb;
                cnt = n;
            }
            acc = mat3x4<f32>(select(acc[0], m, need), select(acc[1], m2, need), select(acc[2], cnt, need));
            scaled = select(scaled, vec4<f32>(1.0), need);
        }
        for (var i = 0u; i < 4u; i += 1u) {
            wcl_out[(t.g4 * 4u + i) * wcl.blocks + t.block] = vec4<f32>(acc[0][i], acc[1][i], acc[2][i], scaled[i]);
        }
    }
}

@group(0) @binding(0) var<uniform> scl: ClParams;
@group(0) @binding(1) var<storage, read> scl_a: array<D4>;
@group(0) @binding(2) var<storage, read> scl_b: array<D4>;
@group(0) @binding(3) var<storage, read> scl_centre: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> scl_out: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn sum_partials_cl(ids: Ids) {
    let linear = group_id(ids);
    if (linear >= scl.nblocks * scl.ngroups) {
        return;
    }
    let t = cl_thread(scl, linear, ids.lid);
    var acc = mat3x4<f32>(); // sum a, sum a b, sum b^2
    var centre = vec4<f32>(0.0);
    if (t.live) {
        if (CENTERED) {
            let c = t.g4 * 4u;
            centre = vec4<f32>(scl_centre[c].x, scl_centre[c + 1u].x, scl_centre[c + 2u].x, scl_centre[c + 3u].x);
        }
        for (var r = t.r0 + t.tr; r < t.r1; r += scl.tr) {
            let e = t.first + (r - t.r0) * scl.c4;
            let a = dload4(scl_a[e]);
            let b = dload4(scl_b[e]) - centre;
            acc[0] += a;
            acc[1] = fma(a, b, acc[1]);
            acc[2] = fma(b, b, acc[2]);
        }
    }
    let s = cl_rows_sum(scl, t, ids.lid, acc);
    if (t.live && t.tr == 0u) {
        // Sums of squares that reached 2^64 (welford.wgsl: the rare path; a sum of
        // squares only grows, so any thread's shows in the total): those features'
        // squares again by this thread over the whole block, scaled, into the fourth
        // component.
        var small = s[2];
        var big = vec4<f32>(0.0);
        let over = !(small < vec4<f32>(BIG));
        if (any(over)) {
            var q = vec4<f32>(0.0);
            for (var r = t.r0; r < t.r1; r += 1u) {
                let b = dload4(scl_b[t.first + (r - t.r0) * scl.c4]) * DOWN - centre * DOWN;
                q = fma(b, b, q);
            }
            big = select(big, q, over);
            small = select(small, vec4<f32>(0.0), over);
        }
        for (var i = 0u; i < 4u; i += 1u) {
            scl_out[(t.g4 * 4u + i) * scl.blocks + t.block] = vec4<f32>(s[0][i], s[1][i], small[i], big[i]);
        }
    }
}
