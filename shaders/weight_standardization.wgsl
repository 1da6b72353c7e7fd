// weight_standardization.wgsl: (W - mean) / sqrt(var + eps) per output channel.
//
// The statistics come from channel_stats.wgsl (Welford partials, Chan combine); this
// file holds the per-channel finalize and the two elementwise passes. The weight is
// viewed as [outer, channels, inner] with the output channels in the middle (axis 0:
// outer = 1; deconvolution weights, axis 1: outer = in_channels).
//
// Backward, with y = (x - mean) * r, r = 1 / sqrt(var + eps), var = sum (x - mean)^2 / d
// (d = n biased, n - 1 unbiased):
//   dx = r * (g - sum(g) / n - y * r * sum(g * (x - mean)) / d)
// The sums come from channel_stats' centred sum kernel, so a large common offset in
// the weight costs no precision.

const WG: u32 = 256u;

// Mirrors `FinalizeParams` in src/ops/weight_standardization.rs.
struct FinalizeParams {
    channels: u32,
    eps: f32,
    divisor: f32, // n (biased) or n - 1 (unbiased)
    _pad: u32,
}

// Mirrors `ElementParams` in src/ops/weight_standardization.rs.
struct ElementParams {
    count: u32,   // elements in this window
    channels: u32,
    inner: u32,
    c_start: u32, // channel of the window's first element
    j_start: u32, // column (within inner) of the window's first element
    _pad: u32,
    inv_n: f32,
    inv_divisor: f32,
}

// Elementwise passes: each thread handles PER_THREAD consecutive elements, computing
// its channel once and stepping it at row ends, so the per-channel values are loaded
// once per run rather than once per element (a large cost on software adapters).
const PER_THREAD: u32 = 4u;

struct Run {
    first: u32, // first element of the thread's run
    c: u32,     // its channel
    j: u32,     // its column within the channel's row
}

fn run_start(p: ElementParams, wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> Run {
    var r: Run;
    r.first = ((wid.x + wid.y * nwg.x) * WG + lid) * PER_THREAD;
    let t = p.j_start + r.first;
    r.c = (p.c_start + t / p.inner) % p.channels;
    r.j = t % p.inner;
    return r;
}

// Moves the run to the next element; returns true when the channel changed.
fn run_step(p: ElementParams, r: ptr<function, Run>) -> bool {
    (*r).j += 1u;
    if ((*r).j == p.inner) {
        (*r).j = 0u;
        (*r).c += 1u;
        if ((*r).c == p.channels) {
            (*r).c = 0u;
        }
        return true;
    }
    return false;
}

fn linear_id(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

@group(0) @binding(0) var<uniform> fp: FinalizeParams;
@group(0) @binding(1) var<storage, read> fp_stats: array<vec4<f32>>; // (mean, m2, n, 0)
@group(0) @binding(2) var<storage, read_write> fp_norm: array<vec4<f32>>; // (mean, rstd, 0, 0)

@compute @workgroup_size(WG)
fn finalize(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = linear_id(wid, nwg, lid);
    if (c >= fp.channels) {
        return;
    }
    let s = fp_stats[c];
    let var_ = max(s.y, 0.0) / fp.divisor;
    fp_norm[c] = vec4<f32>(s.x, 1.0 / sqrt(var_ + fp.eps), 0.0, 0.0);
}

@group(0) @binding(0) var<uniform> np: ElementParams;
@group(0) @binding(1) var<storage, read> np_x: array<f32>;
@group(0) @binding(2) var<storage, read> np_norm: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> np_y: array<f32>;

@compute @workgroup_size(WG)
fn normalize(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    var r = run_start(np, wid, nwg, lid);
    if (r.first >= np.count) {
        return;
    }
    var m = np_norm[r.c];
    let end = min(r.first + PER_THREAD, np.count);
    for (var e = r.first; e < end; e += 1u) {
        np_y[e] = (np_x[e] - m.x) * m.y;
        if (run_step(np, &r)) {
            m = np_norm[r.c];
        }
    }
}

// `normalize` on vec4s, for layouts whose rows are a multiple of 4 long (`count`, `inner`
// and `j_start` then count vec4s; a vec4 never straddles two channels).
@group(0) @binding(0) var<uniform> np4: ElementParams;
@group(0) @binding(1) var<storage, read> np4_x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> np4_norm: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> np4_y: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn normalize_vec4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    var r = run_start(np4, wid, nwg, lid);
    if (r.first >= np4.count) {
        return;
    }
    var m = np4_norm[r.c];
    let end = min(r.first + PER_THREAD, np4.count);
    for (var e = r.first; e < end; e += 1u) {
        np4_y[e] = (np4_x[e] - m.x) * m.y;
        if (run_step(np4, &r)) {
            m = np4_norm[r.c];
        }
    }
}

@group(0) @binding(0) var<uniform> gp: ElementParams;
@group(0) @binding(1) var<storage, read> gp_x: array<f32>;
@group(0) @binding(2) var<storage, read> gp_g: array<f32>;
@group(0) @binding(3) var<storage, read> gp_norm: array<vec4<f32>>; // (mean, rstd, 0, 0)
@group(0) @binding(4) var<storage, read> gp_sums: array<vec4<f32>>; // (sum g, sum g (x - mean), 0, 0)
@group(0) @binding(5) var<storage, read_write> gp_dx: array<f32>;

@compute @workgroup_size(WG)
fn grad(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    var r = run_start(gp, wid, nwg, lid);
    if (r.first >= gp.count) {
        return;
    }
    var m = gp_norm[r.c];
    var s = gp_sums[r.c];
    let end = min(r.first + PER_THREAD, gp.count);
    for (var e = r.first; e < end; e += 1u) {
        let y = (gp_x[e] - m.x) * m.y;
        gp_dx[e] = m.y * (gp_g[e] - s.x * gp.inv_n - y * m.y * s.y * gp.inv_divisor);
        if (run_step(gp, &r)) {
            m = gp_norm[r.c];
            s = gp_sums[r.c];
        }
    }
}

// `grad` on vec4s, for layouts whose rows are a multiple of 4 long (`count`, `inner`
// and `j_start` then count vec4s; a vec4 never straddles two channels).
@group(0) @binding(0) var<uniform> gp4: ElementParams;
@group(0) @binding(1) var<storage, read> gp4_x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> gp4_g: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> gp4_norm: array<vec4<f32>>; // (mean, rstd, 0, 0)
@group(0) @binding(4) var<storage, read> gp4_sums: array<vec4<f32>>; // (sum g, sum g (x - mean), 0, 0)
@group(0) @binding(5) var<storage, read_write> gp4_dx: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn grad_vec4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    var r = run_start(gp4, wid, nwg, lid);
    if (r.first >= gp4.count) {
        return;
    }
    var m = gp4_norm[r.c];
    var s = gp4_sums[r.c];
    let end = min(r.first + PER_THREAD, gp4.count);
    for (var e = r.first; e < end; e += 1u) {
        let y = (gp4_x[e] - m.x) * m.y;
        gp4_dx[e] = m.y * (gp4_g[e] - s.x * gp4.inv_n - y * m.y * s.y * gp4.inv_divisor);
        if (run_step(gp4, &r)) {
            m = gp4_norm[r.c];
            s = gp4_sums[r.c];
        }
    }
}

// ---------------------------------------------------------------------------------
// Row kernels: when each output channel is one contiguous row (axis 0) short enough
// to stay in cache, one workgroup standardizes a whole row: one pass for the
// statistics, one for the output (whose read hits the cache). Forward moves 8 bytes
// per element from memory (read, write) instead of 12, backward 12 instead of 20, in
// one dispatch per window instead of four.
//
// Numerics: the sums are shifted by the row's first element, s1 = sum (x - x0) and
// s2 = sum (x - x0)^2, so they are of the order of the spread and not of a common
// offset; then mean = x0 + s1 / n and sum (x - mean)^2 = s2 - s1^2 / n (the shifted-
// data algorithm, as the per-thread sums of channel_stats.wgsl). Backward also needs
// sum g (x - mean) = sum g (x - x0) - (mean - x0) sum g.

const RWG: u32 = 64u;

// Mirrors `RowParams` in src/ops/weight_standardization.rs.
struct RowParams {
    rows: u32,  // rows in this window
    len: u32,   // elements (or vec4s) per row
    skip: u32,  // elements (or vec4s) of the window before its first row (alignment)
    tpr: u32,   // threads per row, a power of two dividing RWG: RWG / tpr rows per workgroup
    eps: f32,
    inv_n: f32,
    inv_divisor: f32,
    _pad1: u32,
}

var<workgroup> row_red: array<vec4<f32>, RWG>;

// A thread's row and its index among the row's `tpr` threads. Short rows share a
// workgroup, so no thread idles on a row of 64 elements.
struct RowSlot {
    row: u32,
    tl: u32,
    live: bool,
}

fn row_slot(p: RowParams, wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> RowSlot {
    var r: RowSlot;
    r.row = (wid.x + wid.y * nwg.x) * (RWG / p.tpr) + lid / p.tpr;
    r.tl = lid % p.tpr;
    r.live = r.row < p.rows;
    return r;
}

// Whether the workgroup has any row (uniform: an early return before the barriers).
fn rows_left(p: RowParams, wid: vec3<u32>, nwg: vec3<u32>) -> bool {
    return (wid.x + wid.y * nwg.x) * (RWG / p.tpr) < p.rows;
}

// Sum over the `tpr` threads of each row; each of them gets its row's total.
fn row_sum(lid: u32, tl: u32, tpr: u32, v: vec4<f32>) -> vec4<f32> {
    row_red[lid] = v;
    workgroupBarrier();
    for (var s = tpr / 2u; s > 0u; s >>= 1u) {
        if (tl < s) {
            row_red[lid] += row_red[lid + s];
        }
        workgroupBarrier();
    }
    let total = row_red[lid - tl];
    workgroupBarrier();
    return total;
}

// (mean, 1 / sqrt(var + eps)) from the shifted sums (s1, s2).
fn row_norm(p: RowParams, shift: f32, s1: f32, s2: f32) -> vec2<f32> {
    let dm = s1 * p.inv_n;
    let var_ = max(s2 - s1 * dm, 0.0) * p.inv_divisor;
    return vec2<f32>(shift + dm, 1.0 / sqrt(var_ + p.eps));
}

fn hsum(v: vec4<f32>) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

@group(0) @binding(0) var<uniform> rp: RowParams;
@group(0) @binding(1) var<storage, read> rp_x: array<f32>;
@group(0) @binding(2) var<storage, read_write> rp_y: array<f32>;

@compute @workgroup_size(RWG)
fn rows_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if (!rows_left(rp, wid, nwg)) {
        return;
    }
    let slot = row_slot(rp, wid, nwg, lid);
    let row = min(slot.row, rp.rows - 1u);
    let base = rp.skip + row * rp.len;
    let shift = rp_x[base];
    var s = vec4<f32>(0.0);
    for (var i = slot.tl; i < rp.len && slot.live; i += rp.tpr) {
        let d = rp_x[base + i] - shift;
        s.x += d;
        s.y = fma(d, d, s.y);
    }
    let t = row_sum(lid, slot.tl, rp.tpr, s);
    let m = row_norm(rp, shift, t.x, t.y);
    for (var i = slot.tl; i < rp.len && slot.live; i += rp.tpr) {
        rp_y[base + i] = (rp_x[base + i] - m.x) * m.y;
    }
}

@group(0) @binding(0) var<uniform> rg: RowParams;
@group(0) @binding(1) var<storage, read> rg_x: array<f32>;
@group(0) @binding(2) var<storage, read> rg_g: array<f32>;
@group(0) @binding(3) var<storage, read_write> rg_dx: array<f32>;

// dx = r * (g - sum(g) / n - y * r * sum(g (x - mean)) / d), y = (x - mean) * r.
@compute @workgroup_size(RWG)
fn rows_grad(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if (!rows_left(rg, wid, nwg)) {
        return;
    }
    let slot = row_slot(rg, wid, nwg, lid);
    let row = min(slot.row, rg.rows - 1u);
    let base = rg.skip + row * rg.len;
    let shift = rg_x[base];
    var s = vec4<f32>(0.0); // sum d, sum d^2, sum g, sum g d (d = x - shift)
    for (var i = slot.tl; i < rg.len && slot.live; i += rg.tpr) {
        let d = rg_x[base + i] - shift;
        let g = rg_g[base + i];
        s += vec4<f32>(d, d * d, g, g * d);
    }
    let t = row_sum(lid, slot.tl, rg.tpr, s);
    let m = row_norm(rg, shift, t.x, t.y);
    let a = t.z * rg.inv_n;
    let b = m.y * (t.w - (m.x - shift) * t.z) * rg.inv_divisor;
    for (var i = slot.tl; i < rg.len && slot.live; i += rg.tpr) {
        let y = (rg_x[base + i] - m.x) * m.y;
        rg_dx[base + i] = m.y * (rg_g[base + i] - a - y * b);
    }
}

// The same two kernels on rows whose length is a multiple of 4, four elements per
// load (`len` and `skip` then count vec4s): a quarter of the loop iterations.

@group(0) @binding(0) var<uniform> r4p: RowParams;
@group(0) @binding(1) var<storage, read> r4p_x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> r4p_y: array<vec4<f32>>;

@compute @workgroup_size(RWG)
fn rows_forward_vec4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if (!rows_left(r4p, wid, nwg)) {
        return;
    }
    let slot = row_slot(r4p, wid, nwg, lid);
    let row = min(slot.row, r4p.rows - 1u);
    let base = r4p.skip + row * r4p.len;
    let shift = r4p_x[base].x;
    var s1 = vec4<f32>(0.0);
    var s2 = vec4<f32>(0.0);
    for (var i = slot.tl; i < r4p.len && slot.live; i += r4p.tpr) {
        let d = r4p_x[base + i] - shift;
        s1 += d;
        s2 = fma(d, d, s2);
    }
    let t = row_sum(lid, slot.tl, r4p.tpr, vec4<f32>(hsum(s1), hsum(s2), 0.0, 0.0));
    let m = row_norm(r4p, shift, t.x, t.y);
    for (var i = slot.tl; i < r4p.len && slot.live; i += r4p.tpr) {
        r4p_y[base + i] = (r4p_x[base + i] - m.x) * m.y;
    }
}

@group(0) @binding(0) var<uniform> r4g: RowParams;
@group(0) @binding(1) var<storage, read> r4g_x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> r4g_g: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> r4g_dx: array<vec4<f32>>;

@compute @workgroup_size(RWG)
fn rows_grad_vec4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if (!rows_left(r4g, wid, nwg)) {
        return;
    }
    let slot = row_slot(r4g, wid, nwg, lid);
    let row = min(slot.row, r4g.rows - 1u);
    let base = r4g.skip + row * r4g.len;
    let shift = r4g_x[base].x;
    var sd = vec4<f32>(0.0);
    var sdd = vec4<f32>(0.0);
    var sg = vec4<f32>(0.0);
    var sgd = vec4<f32>(0.0);
    for (var i = slot.tl; i < r4g.len && slot.live; i += r4g.tpr) {
        let d = r4g_x[base + i] - shift;
        let g = r4g_g[base + i];
        sd += d;
        sdd = fma(d, d, sdd);
        sg += g;
        sgd = fma(g, d, sgd);
    }
    let t = row_sum(lid, slot.tl, r4g.tpr, vec4<f32>(hsum(sd), hsum(sdd), hsum(sg), hsum(sgd)));
    let m = row_norm(r4g, shift, t.x, t.y);
    let a = t.z * r4g.inv_n;
    let b = m.y * (t.w - (m.x - shift) * t.z) * r4g.inv_divisor;
    for (var i = slot.tl; i < r4g.len && slot.live; i += r4g.tpr) {
        let y = (r4g_x[base + i] - m.x) * m.y;
        r4g_dx[base + i] = m.y * (r4g_g[base + i] - a - y * b);
    }
}
