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

fn channel_of(p: ElementParams, e: u32) -> u32 {
    let t = p.j_start + e;
    return (p.c_start + t / p.inner) % p.channels;
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
    let e = linear_id(wid, nwg, lid);
    if (e >= np.count) {
        return;
    }
    let m = np_norm[channel_of(np, e)];
    np_y[e] = (np_x[e] - m.x) * m.y;
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
    let e = linear_id(wid, nwg, lid);
    if (e >= gp.count) {
        return;
    }
    let c = channel_of(gp, e);
    let m = gp_norm[c];
    let s = gp_sums[c];
    let y = (gp_x[e] - m.x) * m.y;
    gp_dx[e] = m.y * (gp_g[e] - s.x * gp.inv_n - y * m.y * s.y * gp.inv_divisor);
}
