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
