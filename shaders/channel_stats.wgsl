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
// columns j in [jc * row_chunk, ...) of channel c, a few thousand elements each. One
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
// Numerics. Each thread sums its elements (at most ITEM_ELEMS / WG of them) shifted by
// the item's first element, turns the sums into (mean, M2), and Chan's parallel combine
// merges threads (shared-memory tree) and partials: never E[x^2] - E[x]^2 on raw values,
// which loses every digit for weights with a large common offset. No division per
// element, which matters on software adapters. The tree needs no subgroup operations, so it runs on adapters
// without them (GL) and is correct for any subgroup size.

const WG: u32 = 64u;

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
    base: u32,  // window-relative index of the item's first element
    cols: u32,  // elements per row of the item
    count: u32, // elements in the item
    o0: u32,    // the item's first row within its batch entry
    j0: u32,    // the item's first column within the channel's row
}

fn item_at(p: ReduceParams, linear: u32) -> Item {
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
    var it: Item;
    it.slot = (a * p.channels + c) * p.partials_per_channel + b * p.chunks_per_row + jc;
    it.c = a * p.channels + c;
    it.base = p.base_delta + rows_from * p.row_stride + cl * p.inner + jl * p.row_chunk;
    it.cols = cols;
    it.count = rows * cols;
    it.o0 = b * p.rows_per_item;
    it.j0 = jc * p.row_chunk;
    return it;
}

// A thread's walk over an item: elements lid, lid + WG, ... in row-major item order,
// kept as (row, column) and advanced without a division per element.
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

// Window-relative index of the walk's current element.
fn walk_index(p: ReduceParams, it: Item, w: Walk) -> u32 {
    return it.base + w.row * p.row_stride + w.col;
}

// Welford states are vec4(mean, m2, count, 0).
fn chan(a: vec4<f32>, b: vec4<f32>) -> vec4<f32> {
    if (b.z == 0.0) {
        return a;
    }
    if (a.z == 0.0) {
        return b;
    }
    let n = a.z + b.z;
    let wb = b.z / n;
    let d = b.x - a.x;
    return vec4<f32>(a.x + d * wb, a.y + b.y + d * d * a.z * wb, n, 0.0);
}

var<workgroup> tree: array<vec4<f32>, WG>;

fn tree_welford(lid: u32, value: vec4<f32>) -> vec4<f32> {
    tree[lid] = value;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            tree[lid] = chan(tree[lid], tree[lid + s]);
        }
        workgroupBarrier();
    }
    return tree[0];
}

fn tree_sum(lid: u32, value: vec4<f32>) -> vec4<f32> {
    tree[lid] = value;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            tree[lid] = tree[lid] + tree[lid + s];
        }
        workgroupBarrier();
    }
    return tree[0];
}

// ---- Welford: mean, M2 and count per channel ------------------------------------

@group(0) @binding(0) var<uniform> wp: ReduceParams;
@group(0) @binding(1) var<storage, read> wp_x: array<f32>;
@group(0) @binding(2) var<storage, read_write> wp_out: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn welford_partials(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let linear = wid.x + wid.y * nwg.x;
    if (linear >= wp.box_nb * wp.box_nc * wp.box_njc) {
        return;
    }
    let it = item_at(wp, linear);
    // Per thread: sums of (x - shift) and its square, shifted by the item's first
    // element so that they stay of the order of the spread, not of the offset; then
    // (mean, m2) per thread, and Chan's combine across threads and partials.
    let shift = wp_x[it.base];
    var s1 = 0.0;
    var s2 = 0.0;
    var n = 0u;
    var w = walk_start(it, lid);
    while (w.row < w.rows) {
        let d = wp_x[walk_index(wp, it, w)] - shift;
        s1 += d;
        s2 = fma(d, d, s2);
        n += 1u;
        walk_next(&w, it.cols);
    }
    var acc = vec4<f32>(0.0);
    if (n > 0u) {
        let nf = f32(n);
        let dm = s1 / nf;
        acc = vec4<f32>(shift + dm, max(s2 - s1 * dm, 0.0), nf, 0.0);
    }
    let total = tree_welford(lid, acc);
    if (lid == 0u) {
        wp_out[it.slot] = total;
    }
}

@group(0) @binding(0) var<uniform> wc: CombineParams;
@group(0) @binding(1) var<storage, read> wc_partials: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> wc_out: array<vec4<f32>>;

// One workgroup per channel: out[c] = vec4(mean, m2, count, 0).
@compute @workgroup_size(WG)
fn welford_combine(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = wid.x + wid.y * nwg.x;
    if (c >= wc.channels) {
        return;
    }
    let first = c * wc.partials_per_channel;
    var acc = vec4<f32>(0.0);
    for (var i = lid; i < wc.partials_per_channel; i += WG) {
        acc = chan(acc, wc_partials[first + i]);
    }
    let total = tree_welford(lid, acc);
    if (lid == 0u) {
        wc_out[c] = total;
    }
}

// ---- Sums: (sum a, sum a (b - centre[c]), sum (b - centre[c])^2) per channel -----
//
// With a = grad, b = v and no centre: <grad, v> and the squared norm of v in one pass.
// With a = grad, b = x, centre = mean: the two sums every normalization backward needs,
// centred so that a large common offset in x costs no precision.

override CENTERED: bool = false;

@group(0) @binding(0) var<uniform> sp: ReduceParams;
@group(0) @binding(1) var<storage, read> sp_a: array<f32>;
@group(0) @binding(2) var<storage, read> sp_b: array<f32>;
// vec4 per channel; the centre is its first component (a Welford or finalize output).
@group(0) @binding(3) var<storage, read> sp_centre: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> sp_out: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn sum_partials(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let linear = wid.x + wid.y * nwg.x;
    if (linear >= sp.box_nb * sp.box_nc * sp.box_njc) {
        return;
    }
    let it = item_at(sp, linear);
    var centre = 0.0;
    if (CENTERED) {
        centre = sp_centre[it.c].x;
    }
    var acc = vec4<f32>(0.0);
    var w = walk_start(it, lid);
    while (w.row < w.rows) {
        let e = walk_index(sp, it, w);
        let a = sp_a[e];
        let b = sp_b[e] - centre;
        acc.x += a;
        acc.y = fma(a, b, acc.y);
        acc.z = fma(b, b, acc.z);
        walk_next(&w, it.cols);
    }
    let total = tree_sum(lid, acc);
    if (lid == 0u) {
        sp_out[it.slot] = total;
    }
}

@group(0) @binding(0) var<uniform> sc: CombineParams;
@group(0) @binding(1) var<storage, read> sc_partials: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> sc_out: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn sum_combine(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = wid.x + wid.y * nwg.x;
    if (c >= sc.channels) {
        return;
    }
    let first = c * sc.partials_per_channel;
    var acc = vec4<f32>(0.0);
    for (var i = lid; i < sc.partials_per_channel; i += WG) {
        acc += sc_partials[first + i];
    }
    let total = tree_sum(lid, acc);
    if (lid == 0u) {
        sc_out[c] = total;
    }
}

// ---- Dots: sum_{o, j} x[o, c, j] * vector[o * inner + j] per channel ---------------
//
// With batch = 1: the matrix-vector product M v of spectral normalization, where M's
// row c is everything of channel c (outer x inner) and v runs over (o, j). Rows are
// read contiguously (the walk's row-major order). Result in the first component.

@group(0) @binding(0) var<uniform> dp: ReduceParams;
@group(0) @binding(1) var<storage, read> dp_x: array<f32>;
@group(0) @binding(2) var<storage, read> dp_vector: array<f32>;
@group(0) @binding(3) var<storage, read_write> dp_out: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn dot_partials(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let linear = wid.x + wid.y * nwg.x;
    if (linear >= dp.box_nb * dp.box_nc * dp.box_njc) {
        return;
    }
    let it = item_at(dp, linear);
    var acc = 0.0;
    var w = walk_start(it, lid);
    while (w.row < w.rows) {
        let e = walk_index(dp, it, w);
        acc = fma(dp_x[e], dp_vector[(it.o0 + w.row) * dp.inner + it.j0 + w.col], acc);
        walk_next(&w, it.cols);
    }
    let total = tree_sum(lid, vec4<f32>(acc, 0.0, 0.0, 0.0));
    if (lid == 0u) {
        dp_out[it.slot] = total;
    }
}

// ---- vec4 twins -------------------------------------------------------------------
//
// The three partial kernels above on vec4s, when every row of the layout, the item
// chunk and every box start are multiples of 4 elements: the params (inner,
// row_stride, row_chunk, base_delta) then count vec4s and so does the walk, a vec4
// never straddles two channels, and a quarter of the walk's steps remain. Each lane
// accumulates on its own; the lanes are summed at the end (they share the shift).

fn hsum4(v: vec4<f32>) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

@group(0) @binding(0) var<uniform> wp4: ReduceParams;
@group(0) @binding(1) var<storage, read> wp4_x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> wp4_out: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn welford_partials_vec4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let linear = wid.x + wid.y * nwg.x;
    if (linear >= wp4.box_nb * wp4.box_nc * wp4.box_njc) {
        return;
    }
    let it = item_at(wp4, linear);
    let shift = wp4_x[it.base].x;
    var s1 = vec4<f32>(0.0);
    var s2 = vec4<f32>(0.0);
    var n = 0u;
    var w = walk_start(it, lid);
    while (w.row < w.rows) {
        let d = wp4_x[walk_index(wp4, it, w)] - shift;
        s1 += d;
        s2 = fma(d, d, s2);
        n += 4u;
        walk_next(&w, it.cols);
    }
    var acc = vec4<f32>(0.0);
    if (n > 0u) {
        let nf = f32(n);
        let t1 = hsum4(s1);
        let dm = t1 / nf;
        acc = vec4<f32>(shift + dm, max(hsum4(s2) - t1 * dm, 0.0), nf, 0.0);
    }
    let total = tree_welford(lid, acc);
    if (lid == 0u) {
        wp4_out[it.slot] = total;
    }
}

@group(0) @binding(0) var<uniform> sp4: ReduceParams;
@group(0) @binding(1) var<storage, read> sp4_a: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> sp4_b: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> sp4_centre: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> sp4_out: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn sum_partials_vec4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let linear = wid.x + wid.y * nwg.x;
    if (linear >= sp4.box_nb * sp4.box_nc * sp4.box_njc) {
        return;
    }
    let it = item_at(sp4, linear);
    var centre = 0.0;
    if (CENTERED) {
        centre = sp4_centre[it.c].x;
    }
    var sa = vec4<f32>(0.0);
    var sab = vec4<f32>(0.0);
    var sbb = vec4<f32>(0.0);
    var w = walk_start(it, lid);
    while (w.row < w.rows) {
        let e = walk_index(sp4, it, w);
        let a = sp4_a[e];
        let b = sp4_b[e] - centre;
        sa += a;
        sab = fma(a, b, sab);
        sbb = fma(b, b, sbb);
        walk_next(&w, it.cols);
    }
    let total = tree_sum(lid, vec4<f32>(hsum4(sa), hsum4(sab), hsum4(sbb), 0.0));
    if (lid == 0u) {
        sp4_out[it.slot] = total;
    }
}

@group(0) @binding(0) var<uniform> dp4: ReduceParams;
@group(0) @binding(1) var<storage, read> dp4_x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> dp4_vector: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> dp4_out: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn dot_partials_vec4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let linear = wid.x + wid.y * nwg.x;
    if (linear >= dp4.box_nb * dp4.box_nc * dp4.box_njc) {
        return;
    }
    let it = item_at(dp4, linear);
    var acc = vec4<f32>(0.0);
    var w = walk_start(it, lid);
    while (w.row < w.rows) {
        let e = walk_index(dp4, it, w);
        acc = fma(dp4_x[e], dp4_vector[(it.o0 + w.row) * dp4.inner + it.j0 + w.col], acc);
        walk_next(&w, it.cols);
    }
    let total = tree_sum(lid, vec4<f32>(hsum4(acc), 0.0, 0.0, 0.0));
    if (lid == 0u) {
        dp4_out[it.slot] = total;
    }
}

// ---- channels-last twins ----------------------------------------------------------
//
// For layouts whose channels are the last axis (inner = 1) and a multiple of 4, e.g.
// NHWC batch norm: a workgroup takes a block of rows and up to 64 groups of 4
// channels; thread (tg, tr) accumulates the vec4 of channels 4 g .. 4 g + 3 over rows
// r0 + tr, r0 + tr + TR, ..., so the workgroup reads whole contiguous rows. Sums are
// shifted by the block's first row (one shift per channel, shared by the threads of a
// channel group), then added across tr and written as one partial per channel and
// block, at `channel * blocks + block`. Indices count vec4s.

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

var<workgroup> cl_a: array<vec4<f32>, WG>;
var<workgroup> cl_b: array<vec4<f32>, WG>;
var<workgroup> cl_c: array<vec4<f32>, WG>;

@group(0) @binding(0) var<uniform> wcl: ClParams;
@group(0) @binding(1) var<storage, read> wcl_x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> wcl_out: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn welford_partials_cl(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let linear = wid.x + wid.y * nwg.x;
    if (linear >= wcl.nblocks * wcl.ngroups) {
        return;
    }
    let t = cl_thread(wcl, linear, lid);
    var shift = vec4<f32>(0.0);
    var s1 = vec4<f32>(0.0);
    var s2 = vec4<f32>(0.0);
    var n = 0.0;
    if (t.live) {
        shift = wcl_x[t.first];
        for (var r = t.r0 + t.tr; r < t.r1; r += wcl.tr) {
            let d = wcl_x[t.first + (r - t.r0) * wcl.c4] - shift;
            s1 += d;
            s2 = fma(d, d, s2);
            n += 1.0;
        }
    }
    cl_a[lid] = s1;
    cl_b[lid] = s2;
    cl_c[lid] = vec4<f32>(n);
    workgroupBarrier();
    if (t.live && t.tr == 0u) {
        for (var k = 1u; k < wcl.tr; k += 1u) {
            s1 += cl_a[lid + k * wcl.group];
            s2 += cl_b[lid + k * wcl.group];
            n += cl_c[lid + k * wcl.group].x;
        }
        let dm = s1 / n;
        let mean = shift + dm;
        let m2 = max(s2 - s1 * dm, vec4<f32>(0.0));
        for (var i = 0u; i < 4u; i += 1u) {
            wcl_out[(t.g4 * 4u + i) * wcl.blocks + t.block] = vec4<f32>(mean[i], m2[i], n, 0.0);
        }
    }
}

@group(0) @binding(0) var<uniform> scl: ClParams;
@group(0) @binding(1) var<storage, read> scl_a: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> scl_b: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> scl_centre: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> scl_out: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn sum_partials_cl(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let linear = wid.x + wid.y * nwg.x;
    if (linear >= scl.nblocks * scl.ngroups) {
        return;
    }
    let t = cl_thread(scl, linear, lid);
    var sa = vec4<f32>(0.0);
    var sab = vec4<f32>(0.0);
    var sbb = vec4<f32>(0.0);
    if (t.live) {
        var centre = vec4<f32>(0.0);
        if (CENTERED) {
            let c = t.g4 * 4u;
            centre = vec4<f32>(scl_centre[c].x, scl_centre[c + 1u].x, scl_centre[c + 2u].x, scl_centre[c + 3u].x);
        }
        for (var r = t.r0 + t.tr; r < t.r1; r += scl.tr) {
            let e = t.first + (r - t.r0) * scl.c4;
            let a = scl_a[e];
            let b = scl_b[e] - centre;
            sa += a;
            sab = fma(a, b, sab);
            sbb = fma(b, b, sbb);
        }
    }
    cl_a[lid] = sa;
    cl_b[lid] = sab;
    cl_c[lid] = sbb;
    workgroupBarrier();
    if (t.live && t.tr == 0u) {
        for (var k = 1u; k < scl.tr; k += 1u) {
            sa += cl_a[lid + k * scl.group];
            sab += cl_b[lid + k * scl.group];
            sbb += cl_c[lid + k * scl.group];
        }
        for (var i = 0u; i < 4u; i += 1u) {
            scl_out[(t.g4 * 4u + i) * scl.blocks + t.block] = vec4<f32>(sa[i], sab[i], sbb[i], 0.0);
        }
    }
}
