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
//
// Variants (shaders/permutations): `vec4` for rows a multiple of 4 long, `cl` for
// features on the last axis (NHWC), 4 features per vec4.

const WG: u32 = 256u;

#import elem
#import element
#import welford

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

// ---- finalize ------------------------------------------------------------------------

@group(0) @binding(0) var<uniform> fp: FinalizeParams;
@group(0) @binding(1) var<storage, read> fp_stats: array<vec4<f32>>; // (mean, m2, n, 0)
@group(0) @binding(2) var<storage, read> fp_gamma: array<f32>;
@group(0) @binding(3) var<storage, read> fp_beta: array<f32>;
@group(0) @binding(4) var<storage, read_write> fp_running_mean: array<f32>;
@group(0) @binding(5) var<storage, read_write> fp_running_var: array<f32>;
@group(0) @binding(6) var<storage, read_write> fp_norm: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn finalize(ids: Ids) {
    let c = linear_id(ids);
    if (c >= fp.features) {
        return;
    }
    var mean: f32;
    var var_: f32;
    var rstd: f32;
    if (fp.from_batch == 1u) {
        let s = fp_stats[c];
        mean = s.x;
        var_ = max(s.y, 0.0) / s.z; // biased batch variance
        rstd = 1.0 / sqrt(var_ + fp.eps);
        if (s.w != 0.0) {
            // m2 in units of 2^140 (welford.wgsl); the variance for the running average
            // is Inf beyond f32.
            rstd = welford_rstd(s, 1.0 / s.z, fp.eps);
            var_ = ldexp(var_, 140);
        }
        if (fp.update == 1u) {
            let w = fp.weight;
            fp_running_mean[c] = (1.0 - w) * fp_running_mean[c] + w * mean;
            fp_running_var[c] = (1.0 - w) * fp_running_var[c] + w * (var_ * fp.var_correction);
        }
    } else {
        mean = fp_running_mean[c];
        var_ = fp_running_var[c];
        rstd = 1.0 / sqrt(var_ + fp.eps);
    }
    var gamma = 1.0;
    if (fp.has_gamma == 1u) {
        gamma = fp_gamma[c];
    }
    var beta = 0.0;
    if (fp.has_beta == 1u) {
        beta = fp_beta[c];
    }
    fp_norm[c] = vec4<f32>(mean, rstd, gamma, beta);
}

// ---- normalize: y = (x - mean) * (invstd * gamma) + beta ------------------------------

@group(0) @binding(0) var<uniform> bn: ElementParams;
@group(0) @binding(1) var<storage, read> bn_x: array<D>;
@group(0) @binding(2) var<storage, read> bn_norm: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> bn_y: array<D>;

// The per-feature vec4s of a unit's slice s as `Lanes` (elem.wgsl): the 4 features
// 4 s .. 4 s + 3 channels last, else the one feature of every lane.
fn norm_at(s: u32) -> Lanes {
#ifdef CHANNELS_LAST
    return lanes_of(bn_norm[4u * s], bn_norm[4u * s + 1u], bn_norm[4u * s + 2u], bn_norm[4u * s + 3u]);
#else
    return bn_norm[s];
#endif
}

fn coef_at(s: u32) -> Lanes {
#ifdef CHANNELS_LAST
    return lanes_of(gi_coef[4u * s], gi_coef[4u * s + 1u], gi_coef[4u * s + 2u], gi_coef[4u * s + 3u]);
#else
    return gi_coef[s];
#endif
}

// A thread's per-feature values are reloaded when its slice changes. Channels last, the
// host's stride is a multiple of the feature groups, so a thread keeps one group and
// loads its values once (on SIMD software adapters every branch costs its body).
fn reload(w: Cursor) -> bool {
#ifdef CHANNELS_LAST
    return false;
#else
    return w.fresh;
#endif
}

@compute @workgroup_size(WG)
fn normalize(ids: Ids) {
    var w = cursor_start(bn, ids);
    var m = norm_at(w.slice);
    for (; cursor_live(w); cursor_next(bn, &w)) {
        if (reload(w)) {
            m = norm_at(w.slice);
        }
        let scale = lane_value(m, 1u) * lane_value(m, 2u);
        bn_y[w.e] = dstore((dload(bn_x[w.e]) - lane_value(m, 0u)) * scale + lane_value(m, 3u));
    }
}

// ---- normalize_running: evaluation with running statistics in one pass ------------
//
// `normalize` with each thread computing its features' (mean, invstd, gamma, beta)
// from the running statistics, as `finalize` does (same arithmetic, same bits),
// instead of reading them from a `finalize` dispatch before it; the pass also writes
// `norm` for the backward. One dispatch and one barrier fewer, for GPUs (the host's
// `Tuning::one_pass_eval`): on SIMD software adapters the per-unit reload computes
// them under a mask on every unit. Flag bits 0 and 1: gamma, beta given; aux0 = eps.

@group(0) @binding(0) var<uniform> be: ElementParams;
@group(0) @binding(1) var<storage, read> be_x: array<D>;
@group(0) @binding(2) var<storage, read> be_running_mean: array<f32>;
@group(0) @binding(3) var<storage, read> be_running_var: array<f32>;
@group(0) @binding(4) var<storage, read> be_gamma: array<f32>;
@group(0) @binding(5) var<storage, read> be_beta: array<f32>;
@group(0) @binding(6) var<storage, read_write> be_norm: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read_write> be_y: array<D>;

fn running_norm(c: u32) -> vec4<f32> {
    var gamma = 1.0;
    if ((be.flag & 1u) != 0u) {
        gamma = be_gamma[c];
    }
    var beta = 0.0;
    if ((be.flag & 2u) != 0u) {
        beta = be_beta[c];
    }
    return vec4<f32>(be_running_mean[c], 1.0 / sqrt(be_running_var[c] + be.aux0), gamma, beta);
}

fn running_norm_at(s: u32) -> Lanes {
#ifdef CHANNELS_LAST
    return lanes_of(running_norm(4u * s), running_norm(4u * s + 1u), running_norm(4u * s + 2u), running_norm(4u * s + 3u));
#else
    return running_norm(s);
#endif
}

@compute @workgroup_size(WG)
fn normalize_running(ids: Ids) {
    // `norm` for the backward, every feature by some thread.
#ifdef CHANNELS_LAST
    let features = 4u * be.channels;
#else
    let features = be.channels;
#endif
    let threads = ids.nwg.x * ids.nwg.y * WG;
    for (var c = linear_id(ids); c < features; c += threads) {
        be_norm[c] = running_norm(c);
    }
    var w = cursor_start(be, ids);
    var m = running_norm_at(w.slice);
    for (; cursor_live(w); cursor_next(be, &w)) {
        if (reload(w)) {
            m = running_norm_at(w.slice);
        }
        let scale = lane_value(m, 1u) * lane_value(m, 2u);
        be_y[w.e] = dstore((dload(be_x[w.e]) - lane_value(m, 0u)) * scale + lane_value(m, 3u));
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
fn grad_factors(ids: Ids) {
    let c = linear_id(ids);
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
@group(0) @binding(1) var<storage, read> gi_x: array<D>;
@group(0) @binding(2) var<storage, read> gi_dy: array<D>;
@group(0) @binding(3) var<storage, read> gi_coef: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> gi_dx: array<D>;

@compute @workgroup_size(WG)
fn grad_input(ids: Ids) {
    var w = cursor_start(gi, ids);
    var k = coef_at(w.slice);
    for (; cursor_live(w); cursor_next(gi, &w)) {
        if (reload(w)) {
            k = coef_at(w.slice);
        }
        let centred = dload(gi_x[w.e]) - lane_value(k, 3u);
        gi_dx[w.e] = dstore(lane_value(k, 0u) * (dload(gi_dy[w.e]) - lane_value(k, 1u) - centred * lane_value(k, 2u)));
    }
}

// ---- merge: population accumulator += batch statistics (Chan's combine) -------------

// Mirrors `MergeParams` in src/ops/batch_norm.rs.
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
fn merge(ids: Ids) {
    let c = linear_id(ids);
    if (c >= mp.features) {
        return;
    }
    mp_acc[c] = chan(mp_acc[c], mp_batch[c]);
}
