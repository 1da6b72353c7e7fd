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
