// batch_norm.wgsl: y = (x - mean) / sqrt(var + eps) * gamma + beta per feature.
//
// Statistics over every axis but the feature axis come from channel_stats.wgsl
// (Welford partials, Chan combine): x is viewed as [outer, features, inner]. This file
// holds the per-feature finalize (which also updates the running averages, on the GPU,
// in the same submission), the elementwise passes, and the merge of a batch's
// statistics into a population accumulator (exact recomputed averages).
//
// Per-feature values, vec4 each:
//   norm = (mean, invstd, gamma, beta)   the statistics used to normalize
//   coef = (k1, k2, k3, mean)            backward: dx = k1 * (dy - k2 - (x - mean) * k3)
// Training backward (biased batch variance, n values per feature):
//   k1 = gamma * invstd, k2 = sum(dy) / n, k3 = invstd^2 * sum(dy (x - mean)) / n
// Evaluation backward (running statistics are constants): k2 = k3 = 0.

const WG: u32 = 256u;

// Mirrors `FinalizeParams` in src/ops/batch_norm.rs.
struct FinalizeParams {
    features: u32,
    from_batch: u32,   // 1: normalize with the batch statistics, 0: with the running ones
    update: u32,       // 1: update the running statistics (training)
    has_gamma: u32,
    has_beta: u32,
    eps: f32,
    weight: f32,       // weight of the batch in the running update
    var_correction: f32, // n / (n - 1) for an unbiased running variance, else 1
}

// Mirrors `GradParams` in src/ops/batch_norm.rs.
struct GradParams {
    features: u32,
    training: u32,
    inv_n: f32,
    _pad: u32,
}

// Mirrors `ElementParams` in src/ops/channel_stats.rs (batch is always 1 here, so
// outer, o_start and a_start are unused).
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

// ---- finalize ------------------------------------------------------------------------

@group(0) @binding(0) var<uniform> fp: FinalizeParams;
@group(0) @binding(1) var<storage, read> fp_stats: array<vec4<f32>>; // (mean, m2, n, 0)
@group(0) @binding(2) var<storage, read> fp_gamma: array<f32>;
@group(0) @binding(3) var<storage, read> fp_beta: array<f32>;
@group(0) @binding(4) var<storage, read_write> fp_running_mean: array<f32>;
@group(0) @binding(5) var<storage, read_write> fp_running_var: array<f32>;
@group(0) @binding(6) var<storage, read_write> fp_norm: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn finalize(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = linear_id(wid, nwg, lid);
    if (c >= fp.features) {
        return;
    }
    var mean: f32;
    var var_: f32;
    if (fp.from_batch == 1u) {
        let s = fp_stats[c];
        mean = s.x;
        var_ = max(s.y, 0.0) / s.z; // biased batch variance
        if (fp.update == 1u) {
            let w = fp.weight;
            fp_running_mean[c] = (1.0 - w) * fp_running_mean[c] + w * mean;
            fp_running_var[c] = (1.0 - w) * fp_running_var[c] + w * (var_ * fp.var_correction);
        }
    } else {
        mean = fp_running_mean[c];
        var_ = fp_running_var[c];
    }
    var gamma = 1.0;
    if (fp.has_gamma == 1u) {
        gamma = fp_gamma[c];
    }
    var beta = 0.0;
    if (fp.has_beta == 1u) {
        beta = fp_beta[c];
    }
    fp_norm[c] = vec4<f32>(mean, 1.0 / sqrt(var_ + fp.eps), gamma, beta);
}

// ---- normalize: y = (x - mean) * (invstd * gamma) + beta ------------------------------

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
    var scale = m.y * m.z;
    let end = min(r.first + PER_THREAD, np.count);
    for (var e = r.first; e < end; e += 1u) {
        np_y[e] = (np_x[e] - m.x) * scale + m.w;
        if (run_step(np, &r)) {
            m = np_norm[r.c];
            scale = m.y * m.z;
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
    var scale = m.y * m.z;
    let end = min(r.first + PER_THREAD, np4.count);
    for (var e = r.first; e < end; e += 1u) {
        np4_y[e] = (np4_x[e] - m.x) * scale + m.w;
        if (run_step(np4, &r)) {
            m = np4_norm[r.c];
            scale = m.y * m.z;
        }
    }
}

// ---- channels-last (NHWC) twins -------------------------------------------------
//
// When the features are the last axis (inner = 1) and a multiple of 4: `count`,
// `channels` and `c_start` count vec4s, and each thread keeps one group of 4 features
// for PER_THREAD rows, so it loads its per-feature values once (4 vec4, transposed)
// rather than once per element. Neighbouring threads read neighbouring vec4s.

struct ClRun {
    first: u32, // the thread's first vec4 (window-relative)
    step: u32,  // vec4s between its rows
    g: u32,     // its group of 4 features
}

fn cl_run(p: ElementParams, wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> ClRun {
    let t = linear_id(wid, nwg, lid);
    let tg = t % p.channels;
    var r: ClRun;
    r.first = (t / p.channels) * PER_THREAD * p.channels + tg;
    r.step = p.channels;
    r.g = (p.c_start + tg) % p.channels;
    return r;
}

// Component `k` of the per-feature vec4s of features 4g .. 4g + 3, as one vec4.
fn lanes(a: vec4<f32>, b: vec4<f32>, c: vec4<f32>, d: vec4<f32>, k: u32) -> vec4<f32> {
    return vec4<f32>(a[k], b[k], c[k], d[k]);
}

@group(0) @binding(0) var<uniform> ncl: ElementParams;
@group(0) @binding(1) var<storage, read> ncl_x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> ncl_norm: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> ncl_y: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn normalize_cl(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r = cl_run(ncl, wid, nwg, lid);
    if (r.first >= ncl.count) {
        return;
    }
    let f = 4u * r.g;
    let m0 = ncl_norm[f];
    let m1 = ncl_norm[f + 1u];
    let m2 = ncl_norm[f + 2u];
    let m3 = ncl_norm[f + 3u];
    let mean = lanes(m0, m1, m2, m3, 0u);
    let scale = lanes(m0, m1, m2, m3, 1u) * lanes(m0, m1, m2, m3, 2u);
    let beta = lanes(m0, m1, m2, m3, 3u);
    for (var k = 0u; k < PER_THREAD; k += 1u) {
        let e = r.first + k * r.step;
        if (e < ncl.count) {
            ncl_y[e] = (ncl_x[e] - mean) * scale + beta;
        }
    }
}

@group(0) @binding(0) var<uniform> gcl: ElementParams;
@group(0) @binding(1) var<storage, read> gcl_x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> gcl_dy: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> gcl_coef: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> gcl_dx: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn grad_input_cl(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r = cl_run(gcl, wid, nwg, lid);
    if (r.first >= gcl.count) {
        return;
    }
    let f = 4u * r.g;
    let k0 = gcl_coef[f];
    let k1 = gcl_coef[f + 1u];
    let k2 = gcl_coef[f + 2u];
    let k3 = gcl_coef[f + 3u];
    let a = lanes(k0, k1, k2, k3, 0u);
    let b = lanes(k0, k1, k2, k3, 1u);
    let c = lanes(k0, k1, k2, k3, 2u);
    let mean = lanes(k0, k1, k2, k3, 3u);
    for (var k = 0u; k < PER_THREAD; k += 1u) {
        let e = r.first + k * r.step;
        if (e < gcl.count) {
            gcl_dx[e] = a * (gcl_dy[e] - b - (gcl_x[e] - mean) * c);
        }
    }
}

// ---- grad_factors: grad_gamma, grad_beta and the coefficients of grad_input ---------

@group(0) @binding(0) var<uniform> gf: GradParams;
@group(0) @binding(1) var<storage, read> gf_norm: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> gf_sums: array<vec4<f32>>; // (sum dy, sum dy (x - mean))
@group(0) @binding(3) var<storage, read_write> gf_grad_gamma: array<f32>;
@group(0) @binding(4) var<storage, read_write> gf_grad_beta: array<f32>;
@group(0) @binding(5) var<storage, read_write> gf_coef: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn grad_factors(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = linear_id(wid, nwg, lid);
    if (c >= gf.features) {
        return;
    }
    let m = gf_norm[c];
    let s = gf_sums[c];
    gf_grad_gamma[c] = m.y * s.y;
    gf_grad_beta[c] = s.x;
    var k2 = 0.0;
    var k3 = 0.0;
    if (gf.training == 1u) {
        k2 = s.x * gf.inv_n;
        k3 = m.y * m.y * s.y * gf.inv_n;
    }
    gf_coef[c] = vec4<f32>(m.z * m.y, k2, k3, m.x);
}

// ---- grad_input: dx = k1 * (dy - k2 - (x - mean) * k3) --------------------------------

@group(0) @binding(0) var<uniform> gi: ElementParams;
@group(0) @binding(1) var<storage, read> gi_x: array<f32>;
@group(0) @binding(2) var<storage, read> gi_dy: array<f32>;
@group(0) @binding(3) var<storage, read> gi_coef: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> gi_dx: array<f32>;

@compute @workgroup_size(WG)
fn grad_input(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    var r = run_start(gi, wid, nwg, lid);
    if (r.first >= gi.count) {
        return;
    }
    var k = gi_coef[r.c];
    let end = min(r.first + PER_THREAD, gi.count);
    for (var e = r.first; e < end; e += 1u) {
        gi_dx[e] = k.x * (gi_dy[e] - k.y - (gi_x[e] - k.w) * k.z);
        if (run_step(gi, &r)) {
            k = gi_coef[r.c];
        }
    }
}

// `grad_input` on vec4s, for layouts whose rows are a multiple of 4 long (`count`, `inner`
// and `j_start` then count vec4s; a vec4 never straddles two channels).
@group(0) @binding(0) var<uniform> gi4: ElementParams;
@group(0) @binding(1) var<storage, read> gi4_x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> gi4_dy: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> gi4_coef: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> gi4_dx: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn grad_input_vec4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    var r = run_start(gi4, wid, nwg, lid);
    if (r.first >= gi4.count) {
        return;
    }
    var k = gi4_coef[r.c];
    let end = min(r.first + PER_THREAD, gi4.count);
    for (var e = r.first; e < end; e += 1u) {
        gi4_dx[e] = k.x * (gi4_dy[e] - k.y - (gi4_x[e] - k.w) * k.z);
        if (run_step(gi4, &r)) {
            k = gi4_coef[r.c];
        }
    }
}

// ---- merge: population accumulator += batch statistics (Chan's combine) -------------

struct MergeParams {
    features: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> mp: MergeParams;
@group(0) @binding(1) var<storage, read> mp_batch: array<vec4<f32>>; // (mean, m2, n, 0)
@group(0) @binding(2) var<storage, read_write> mp_acc: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn merge(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = linear_id(wid, nwg, lid);
    if (c >= mp.features) {
        return;
    }
    let a = mp_acc[c];
    let b = mp_batch[c];
    if (b.z == 0.0) {
        return;
    }
    if (a.z == 0.0) {
        mp_acc[c] = b;
        return;
    }
    let n = a.z + b.z;
    let wb = b.z / n;
    let d = b.x - a.x;
    mp_acc[c] = vec4<f32>(a.x + d * wb, a.y + b.y + d * d * a.z * wb, n, 0.0);
}
