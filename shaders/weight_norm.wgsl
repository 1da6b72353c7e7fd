// weight_norm.wgsl: W = g * v / ||v||, the norm over every axis but the kept one.
//
// The squared norms (and, for backward, <grad_W, v>) come from channel_stats.wgsl's sum
// kernel in one pass over v; this file turns them into per-slice factors and applies
// them elementwise. v is viewed as [batch, outer, channels, inner], slice
// a * channels + c owning v[a, o, c, j] (PyTorch's `dim` kept: batch = 1, outer = the
// axes before it, inner = after it; Jittor's `dim` reduced: outer = that axis, batch =
// the axes before it, channels = after it).
//
// Zero norms: the squared norm is clamped at `eps` (Jittor's convention, default 1e-30),
// so a zero slice gives W = 0 and finite gradients instead of PyTorch's NaN.
//
// Backward, with n = sqrt(max(|v|^2, eps)) and s = <G, v>:
//   grad_g = s / n
//   grad_v = (g / n) * G - (g s / n^3) * v      (the second term is 0 when clamped)

const WG: u32 = 256u;

// Mirrors `SliceParams` in src/ops/weight_norm.rs.
struct SliceParams {
    slices: u32,
    eps: f32,
    _pad0: u32,
    _pad1: u32,
}

// Mirrors `ElementParams` in src/ops/channel_stats.rs.
struct ElementParams {
    count: u32,
    channels: u32,
    inner: u32,
    c_start: u32,
    j_start: u32,
    outer: u32,
    o_start: u32,
    a_start: u32,
}

// Elementwise passes: each thread handles PER_THREAD consecutive elements, computing
// its channel once and stepping it at row ends, so the per-channel values are loaded
// once per run rather than once per element (a large cost on software adapters).
const PER_THREAD: u32 = 4u;

struct Run {
    first: u32, // first element of the thread's run
    a: u32,     // its batch entry
    o: u32,     // its row within the batch entry
    c: u32,     // its channel
    j: u32,     // its column within the channel's row
}

fn run_start(p: ElementParams, wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> Run {
    var r: Run;
    r.first = ((wid.x + wid.y * nwg.x) * WG + lid) * PER_THREAD;
    let t = p.j_start + r.first;
    r.j = t % p.inner;
    let tc = p.c_start + t / p.inner;
    r.c = tc % p.channels;
    let to = p.o_start + tc / p.channels;
    r.o = to % p.outer;
    r.a = p.a_start + to / p.outer;
    return r;
}

// The slice of the run's current element.
fn run_slice(p: ElementParams, r: Run) -> u32 {
    return r.a * p.channels + r.c;
}

// Moves the run to the next element; returns true when the slice changed.
fn run_step(p: ElementParams, r: ptr<function, Run>) -> bool {
    (*r).j += 1u;
    if ((*r).j < p.inner) {
        return false;
    }
    (*r).j = 0u;
    (*r).c += 1u;
    if ((*r).c == p.channels) {
        (*r).c = 0u;
        (*r).o += 1u;
        if ((*r).o == p.outer) {
            (*r).o = 0u;
            (*r).a += 1u;
        }
    }
    return true;
}

fn linear_id(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

fn clamped_norm(sq: f32, eps: f32) -> f32 {
    return sqrt(max(sq, eps));
}

// ---- norms: g = ||v|| per slice (decompose) ---------------------------------------

@group(0) @binding(0) var<uniform> nm: SliceParams;
@group(0) @binding(1) var<storage, read> nm_sums: array<vec4<f32>>; // z: sum v^2
@group(0) @binding(2) var<storage, read_write> nm_g: array<f32>;

@compute @workgroup_size(WG)
fn norms(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = linear_id(wid, nwg, lid);
    if (c >= nm.slices) {
        return;
    }
    // The plain norm: decomposing must leave the weight unchanged, g * v / ||v|| = v.
    nm_g[c] = sqrt(nm_sums[c].z);
}

// ---- factors: f = g / ||v|| per slice -----------------------------------------------

@group(0) @binding(0) var<uniform> fa: SliceParams;
@group(0) @binding(1) var<storage, read> fa_g: array<f32>;
@group(0) @binding(2) var<storage, read> fa_sums: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> fa_out: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn factors(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = linear_id(wid, nwg, lid);
    if (c >= fa.slices) {
        return;
    }
    fa_out[c] = vec4<f32>(fa_g[c] / clamped_norm(fa_sums[c].z, fa.eps), 0.0, 0.0, 0.0);
}

// ---- apply: W = f[c] * v ------------------------------------------------------------

@group(0) @binding(0) var<uniform> ap: ElementParams;
@group(0) @binding(1) var<storage, read> ap_v: array<f32>;
@group(0) @binding(2) var<storage, read> ap_f: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> ap_w: array<f32>;

@compute @workgroup_size(WG)
fn apply(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    var r = run_start(ap, wid, nwg, lid);
    if (r.first >= ap.count) {
        return;
    }
    var f = ap_f[run_slice(ap, r)].x;
    let end = min(r.first + PER_THREAD, ap.count);
    for (var e = r.first; e < end; e += 1u) {
        ap_w[e] = f * ap_v[e];
        if (run_step(ap, &r)) {
            f = ap_f[run_slice(ap, r)].x;
        }
    }
}

// `apply` on vec4s, for layouts whose rows are a multiple of 4 long (`count`, `inner`
// and `j_start` then count vec4s; a vec4 never straddles two channels).
@group(0) @binding(0) var<uniform> ap4: ElementParams;
@group(0) @binding(1) var<storage, read> ap4_v: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> ap4_f: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> ap4_w: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn apply_vec4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    var r = run_start(ap4, wid, nwg, lid);
    if (r.first >= ap4.count) {
        return;
    }
    var f = ap4_f[run_slice(ap4, r)].x;
    let end = min(r.first + PER_THREAD, ap4.count);
    for (var e = r.first; e < end; e += 1u) {
        ap4_w[e] = f * ap4_v[e];
        if (run_step(ap4, &r)) {
            f = ap4_f[run_slice(ap4, r)].x;
        }
    }
}

// ---- grad_factors: grad_g and the two coefficients of grad_v -------------------------

@group(0) @binding(0) var<uniform> gf: SliceParams;
@group(0) @binding(1) var<storage, read> gf_g: array<f32>;
@group(0) @binding(2) var<storage, read> gf_sums: array<vec4<f32>>; // y: <G, v>, z: |v|^2
@group(0) @binding(3) var<storage, read_write> gf_grad_g: array<f32>;
@group(0) @binding(4) var<storage, read_write> gf_coef: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn grad_factors(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = linear_id(wid, nwg, lid);
    if (c >= gf.slices) {
        return;
    }
    let s = gf_sums[c];
    let inv = 1.0 / clamped_norm(s.z, gf.eps);
    let g = gf_g[c];
    gf_grad_g[c] = s.y * inv;
    var second = 0.0;
    if (s.z >= gf.eps) {
        second = g * s.y * inv * inv * inv;
    }
    gf_coef[c] = vec4<f32>(g * inv, second, 0.0, 0.0);
}

// ---- grad_v = coef.x * G - coef.y * v -----------------------------------------------

@group(0) @binding(0) var<uniform> gv: ElementParams;
@group(0) @binding(1) var<storage, read> gv_v: array<f32>;
@group(0) @binding(2) var<storage, read> gv_grad: array<f32>;
@group(0) @binding(3) var<storage, read> gv_coef: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> gv_out: array<f32>;

@compute @workgroup_size(WG)
fn grad_v(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    var r = run_start(gv, wid, nwg, lid);
    if (r.first >= gv.count) {
        return;
    }
    var k = gv_coef[run_slice(gv, r)];
    let end = min(r.first + PER_THREAD, gv.count);
    for (var e = r.first; e < end; e += 1u) {
        gv_out[e] = k.x * gv_grad[e] - k.y * gv_v[e];
        if (run_step(gv, &r)) {
            k = gv_coef[run_slice(gv, r)];
        }
    }
}

// `grad_v` on vec4s, for layouts whose rows are a multiple of 4 long (`count`, `inner`
// and `j_start` then count vec4s; a vec4 never straddles two channels).
@group(0) @binding(0) var<uniform> gv4: ElementParams;
@group(0) @binding(1) var<storage, read> gv4_v: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> gv4_grad: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> gv4_coef: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> gv4_out: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn grad_v_vec4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    var r = run_start(gv4, wid, nwg, lid);
    if (r.first >= gv4.count) {
        return;
    }
    var k = gv4_coef[run_slice(gv4, r)];
    let end = min(r.first + PER_THREAD, gv4.count);
    for (var e = r.first; e < end; e += 1u) {
        gv4_out[e] = k.x * gv4_grad[e] - k.y * gv4_v[e];
        if (run_step(gv4, &r)) {
            k = gv4_coef[run_slice(gv4, r)];
        }
    }
}

// ---- row kernels ----------------------------------------------------------------
//
// When each slice is one contiguous row (PyTorch's dim 0) short enough to stay in
// cache, one workgroup handles a whole row: the squared norm (and <G, v>) in one pass,
// then the output, whose read of v hits the cache: forward moves 8 bytes per element
// from memory instead of 12, backward 12 instead of 16, in one dispatch per window.
// The `_vec4` versions, for rows a multiple of 4 long, count `len` and `skip` in vec4s.

const RWG: u32 = 64u;

// Mirrors `RowParams` in src/ops/weight_norm.rs.
struct RowParams {
    rows: u32,      // rows in this window
    len: u32,       // elements (or vec4s) per row
    skip: u32,      // elements (or vec4s) of the window before its first row
    first_row: u32, // the window's first row: index into g and grad_g
    eps: f32,
    tpr: u32,       // threads per row, a power of two dividing RWG: RWG / tpr rows per workgroup
    _pad1: u32,
    _pad2: u32,
}

var<workgroup> row_red: array<vec2<f32>, RWG>;

// A thread's row and its index among the row's `tpr` threads (short rows share a
// workgroup).
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

fn rows_left(p: RowParams, wid: vec3<u32>, nwg: vec3<u32>) -> bool {
    return (wid.x + wid.y * nwg.x) * (RWG / p.tpr) < p.rows;
}

// Sum over the `tpr` threads of each row; each of them gets its row's total.
fn row_sum(lid: u32, tl: u32, tpr: u32, v: vec2<f32>) -> vec2<f32> {
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

fn hsum(v: vec4<f32>) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

@group(0) @binding(0) var<uniform> rf: RowParams;
@group(0) @binding(1) var<storage, read> rf_g: array<f32>;
@group(0) @binding(2) var<storage, read> rf_v: array<f32>;
@group(0) @binding(3) var<storage, read_write> rf_w: array<f32>;

@compute @workgroup_size(RWG)
fn rows_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if (!rows_left(rf, wid, nwg)) {
        return;
    }
    let slot = row_slot(rf, wid, nwg, lid);
    let row = min(slot.row, rf.rows - 1u);
    let base = rf.skip + row * rf.len;
    var sq = 0.0;
    for (var i = slot.tl; i < rf.len && slot.live; i += rf.tpr) {
        let v = rf_v[base + i];
        sq = fma(v, v, sq);
    }
    let f = rf_g[rf.first_row + row] / clamped_norm(row_sum(lid, slot.tl, rf.tpr, vec2<f32>(sq, 0.0)).x, rf.eps);
    for (var i = slot.tl; i < rf.len && slot.live; i += rf.tpr) {
        rf_w[base + i] = f * rf_v[base + i];
    }
}

@group(0) @binding(0) var<uniform> rf4: RowParams;
@group(0) @binding(1) var<storage, read> rf4_g: array<f32>;
@group(0) @binding(2) var<storage, read> rf4_v: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> rf4_w: array<vec4<f32>>;

@compute @workgroup_size(RWG)
fn rows_forward_vec4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if (!rows_left(rf4, wid, nwg)) {
        return;
    }
    let slot = row_slot(rf4, wid, nwg, lid);
    let row = min(slot.row, rf4.rows - 1u);
    let base = rf4.skip + row * rf4.len;
    var sq = vec4<f32>(0.0);
    for (var i = slot.tl; i < rf4.len && slot.live; i += rf4.tpr) {
        let v = rf4_v[base + i];
        sq = fma(v, v, sq);
    }
    let total = row_sum(lid, slot.tl, rf4.tpr, vec2<f32>(hsum(sq), 0.0)).x;
    let f = rf4_g[rf4.first_row + row] / clamped_norm(total, rf4.eps);
    for (var i = slot.tl; i < rf4.len && slot.live; i += rf4.tpr) {
        rf4_w[base + i] = f * rf4_v[base + i];
    }
}

// grad_g = s / n, grad_v = (g / n) G - (g s / n^3) v (second term 0 when clamped).
fn row_grad_coef(g: f32, sums: vec2<f32>, eps: f32) -> vec3<f32> {
    let inv = 1.0 / clamped_norm(sums.y, eps);
    var second = 0.0;
    if (sums.y >= eps) {
        second = g * sums.x * inv * inv * inv;
    }
    return vec3<f32>(sums.x * inv, g * inv, second);
}

@group(0) @binding(0) var<uniform> rb: RowParams;
@group(0) @binding(1) var<storage, read> rb_g: array<f32>;
@group(0) @binding(2) var<storage, read> rb_v: array<f32>;
@group(0) @binding(3) var<storage, read> rb_grad: array<f32>;
@group(0) @binding(4) var<storage, read_write> rb_grad_g: array<f32>;
@group(0) @binding(5) var<storage, read_write> rb_grad_v: array<f32>;

@compute @workgroup_size(RWG)
fn rows_grad(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if (!rows_left(rb, wid, nwg)) {
        return;
    }
    let slot = row_slot(rb, wid, nwg, lid);
    let row = min(slot.row, rb.rows - 1u);
    let base = rb.skip + row * rb.len;
    var s = vec2<f32>(0.0); // <G, v>, |v|^2
    for (var i = slot.tl; i < rb.len && slot.live; i += rb.tpr) {
        let v = rb_v[base + i];
        s = fma(vec2<f32>(rb_grad[base + i], v), vec2<f32>(v), s);
    }
    let k = row_grad_coef(rb_g[rb.first_row + row], row_sum(lid, slot.tl, rb.tpr, s), rb.eps);
    if (slot.tl == 0u && slot.live) {
        rb_grad_g[rb.first_row + row] = k.x;
    }
    for (var i = slot.tl; i < rb.len && slot.live; i += rb.tpr) {
        rb_grad_v[base + i] = k.y * rb_grad[base + i] - k.z * rb_v[base + i];
    }
}

@group(0) @binding(0) var<uniform> rb4: RowParams;
@group(0) @binding(1) var<storage, read> rb4_g: array<f32>;
@group(0) @binding(2) var<storage, read> rb4_v: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> rb4_grad: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> rb4_grad_g: array<f32>;
@group(0) @binding(5) var<storage, read_write> rb4_grad_v: array<vec4<f32>>;

@compute @workgroup_size(RWG)
fn rows_grad_vec4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if (!rows_left(rb4, wid, nwg)) {
        return;
    }
    let slot = row_slot(rb4, wid, nwg, lid);
    let row = min(slot.row, rb4.rows - 1u);
    let base = rb4.skip + row * rb4.len;
    var sgv = vec4<f32>(0.0);
    var svv = vec4<f32>(0.0);
    for (var i = slot.tl; i < rb4.len && slot.live; i += rb4.tpr) {
        let v = rb4_v[base + i];
        sgv = fma(rb4_grad[base + i], v, sgv);
        svv = fma(v, v, svv);
    }
    let sums = row_sum(lid, slot.tl, rb4.tpr, vec2<f32>(hsum(sgv), hsum(svv)));
    let k = row_grad_coef(rb4_g[rb4.first_row + row], sums, rb4.eps);
    if (slot.tl == 0u && slot.live) {
        rb4_grad_g[rb4.first_row + row] = k.x;
    }
    for (var i = slot.tl; i < rb4.len && slot.live; i += rb4.tpr) {
        rb4_grad_v[base + i] = k.y * rb4_grad[base + i] - k.z * rb4_v[base + i];
    }
}
