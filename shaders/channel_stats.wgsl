// channel_stats.wgsl: per-channel reductions over every axis but one.
//
// Shared by the normalizations: Weight Standardization (mean and variance per output
// channel), Weight Normalization (squared norms), Batch Normalization (batch statistics),
// and every backward pass (sums of the gradient and of gradient x centred input).
//
// Layout. A tensor is viewed as [outer, channels, inner], row-major: channel c owns
// x[o, c, j] for every o and j. The reduction is split into items (b, c, jc): rows
// o in [b * rows_per_item, ...) and columns j in [jc * row_chunk, ...) of channel c,
// a few thousand elements each. One workgroup reduces one item to one partial, stored
// at a fixed slot `c * partials_per_channel + b * chunks_per_row + jc`; a combine kernel
// (one workgroup per channel) then reduces each channel's partials. Scratch memory is
// therefore channels x items-per-channel, never a copy of the tensor.
//
// Large tensors. The host groups items into boxes whose elements lie in one storage
// binding window (see `src/ops/channel_stats.rs`); a dispatch reduces one box, and
// `base_delta` is the box's first element relative to the (aligned) window start. All
// in-shader indices are window-relative, so they fit in u32 whatever the tensor size.
//
// Numerics. Means and variances use Welford per thread and Chan's parallel combine in
// a shared-memory tree: never E[x^2] - E[x]^2, which loses every digit for weights with
// a large common offset. The tree needs no subgroup operations, so it runs on adapters
// without them (GL) and is correct for any subgroup size.

const WG: u32 = 256u;

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
    _pad: u32,
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
    c: u32,     // the channel
    base: u32,  // window-relative index of the item's first element
    cols: u32,  // elements per row of the item
    count: u32, // elements in the item
}

fn item_at(p: ReduceParams, linear: u32) -> Item {
    let jl = linear % p.box_njc;
    let rest = linear / p.box_njc;
    let cl = rest % p.box_nc;
    let bl = rest / p.box_nc;
    let b = p.box_b0 + bl;
    let c = p.box_c0 + cl;
    let jc = p.box_jc0 + jl;
    let o0 = b * p.rows_per_item;
    let rows = min(p.rows_per_item, p.outer - o0);
    let cols = min(p.row_chunk, p.inner - jc * p.row_chunk);
    var it: Item;
    it.slot = c * p.partials_per_channel + b * p.chunks_per_row + jc;
    it.c = c;
    it.base = p.base_delta + bl * p.rows_per_item * p.row_stride + cl * p.inner + jl * p.row_chunk;
    it.cols = cols;
    it.count = rows * cols;
    return it;
}

// Window-relative index of element k of an item.
fn element(p: ReduceParams, it: Item, k: u32) -> u32 {
    return it.base + (k / it.cols) * p.row_stride + k % it.cols;
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
    var acc = vec4<f32>(0.0);
    for (var k = lid; k < it.count; k += WG) {
        let v = wp_x[element(wp, it, k)];
        acc.z += 1.0;
        let d = v - acc.x;
        acc.x += d / acc.z;
        acc.y += d * (v - acc.x);
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

// ---- Sums: (sum a, sum a * (b - centre[c])) per channel -------------------------
//
// With a = b = v and no centre: the squared norm of v (second component).
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
    for (var k = lid; k < it.count; k += WG) {
        let e = element(sp, it, k);
        let a = sp_a[e];
        acc.x += a;
        acc.y += a * (sp_b[e] - centre);
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
