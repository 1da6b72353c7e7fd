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
