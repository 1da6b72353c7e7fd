// weight_standardization.wgsl: (W - mean) / sqrt(var + eps) per output channel.
//
// Two strategies. Row kernels (rows.wgsl), when every output channel is one contiguous
// row (axis 0) short enough to stay in cache: one workgroup standardizes whole rows,
// one statistics pass and one output pass from cache, in one dispatch: forward moves
// 8 bytes per element from memory (read, write), backward 12. Otherwise the
// statistics come from channel_stats.wgsl (Welford partials, Chan combine), this
// file's `finalize` turns them into (mean, rstd), and `normalize` / `grad` run over
// the weight viewed as [outer, channels, inner] with the output channels in the middle
// (axis 0: outer = 1; deconvolution weights, axis 1: outer = in_channels).
//
// Backward, with y = (x - mean) * r, r = 1 / sqrt(var + eps), var = sum (x - mean)^2 / d
// (d = n biased, n - 1 unbiased):
//   dx = r * (g - sum(g) / n - y * r * sum(g * (x - mean)) / d)
// The sums are centred (channel_stats' centred sums, or the row kernels' shifted sums),
// so a large common offset in the weight costs no precision.
//
// Row numerics: the sums are shifted by the row's first element, s1 = sum (x - x0) and
// s2 = sum (x - x0)^2, so they are of the order of the spread and not of a common
// offset; then mean = x0 + s1 / n and sum (x - mean)^2 = s2 - s1^2 / n (the shifted-
// data algorithm); sum g (x - mean) = sum g (x - x0) - (mean - x0) sum g.

const WG: u32 = 256u;

#import elem
#import element
#import rows

// Mirrors `FinalizeParams` in src/ops/weight_standardization.rs.
struct FinalizeParams {
    channels: u32,
    eps: f32,
    divisor: f32, // n (biased) or n - 1 (unbiased)
    _pad: u32,
}

@group(0) @binding(0) var<uniform> fp: FinalizeParams;
@group(0) @binding(1) var<storage, read> fp_stats: array<vec4<f32>>; // (mean, m2, n, 0)
@group(0) @binding(2) var<storage, read_write> fp_norm: array<vec4<f32>>; // (mean, rstd, 0, 0)

@compute @workgroup_size(WG)
fn finalize(ids: Ids) {
    let c = linear_id(ids);
    if (c >= fp.channels) {
        return;
    }
    let s = fp_stats[c];
    let var_ = max(s.y, 0.0) / fp.divisor;
    fp_norm[c] = vec4<f32>(s.x, 1.0 / sqrt(var_ + fp.eps), 0.0, 0.0);
}

@group(0) @binding(0) var<uniform> np: ElementParams;
@group(0) @binding(1) var<storage, read> np_x: array<V>;
@group(0) @binding(2) var<storage, read> np_norm: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> np_y: array<V>;

@compute @workgroup_size(WG)
fn normalize(ids: Ids) {
    var m: vec4<f32>;
    for (var w = cursor_start(np, ids); cursor_live(w); cursor_next(np, &w)) {
        if (w.fresh) {
            m = np_norm[w.slice];
        }
        np_y[w.e] = (np_x[w.e] - m.x) * m.y;
    }
}

// aux0 = 1 / n, aux1 = 1 / d.
@group(0) @binding(0) var<uniform> gp: ElementParams;
@group(0) @binding(1) var<storage, read> gp_x: array<V>;
@group(0) @binding(2) var<storage, read> gp_g: array<V>;
@group(0) @binding(3) var<storage, read> gp_norm: array<vec4<f32>>; // (mean, rstd, 0, 0)
@group(0) @binding(4) var<storage, read> gp_sums: array<vec4<f32>>; // (sum g, sum g (x - mean), 0, 0)
@group(0) @binding(5) var<storage, read_write> gp_dx: array<V>;

@compute @workgroup_size(WG)
fn grad(ids: Ids) {
    var m: vec4<f32>;
    var s: vec4<f32>;
    for (var w = cursor_start(gp, ids); cursor_live(w); cursor_next(gp, &w)) {
        if (w.fresh) {
            m = gp_norm[w.slice];
            s = gp_sums[w.slice];
        }
        let y = (gp_x[w.e] - m.x) * m.y;
        gp_dx[w.e] = m.y * (gp_g[w.e] - s.x * gp.aux0 - y * m.y * s.y * gp.aux1);
    }
}

// ---- row kernels ------------------------------------------------------------------

// (mean, 1 / sqrt(var + eps)) from the shifted sums (s1, s2).
fn row_norm(p: RowParams, shift: f32, s1: f32, s2: f32) -> vec2<f32> {
    let dm = s1 * p.inv_n;
    let var_ = max(s2 - s1 * dm, 0.0) * p.inv_divisor;
    return vec2<f32>(shift + dm, 1.0 / sqrt(var_ + p.eps));
}

@group(0) @binding(0) var<uniform> rp: RowParams;
@group(0) @binding(1) var<storage, read> rp_x: array<V>;
@group(0) @binding(2) var<storage, read_write> rp_y: array<V>;

@compute @workgroup_size(RWG)
fn rows_forward(ids: Ids) {
    if (!rows_left(rp, ids)) {
        return;
    }
    let slot = row_slot(rp, ids);
    let base = slot.base;
    let shift = lane0(rp_x[base]);
    var s1 = V(0.0);
    var s2 = V(0.0);
    for (var i = slot.tl; i < rp.len && slot.live; i += rp.tpr) {
        let d = rp_x[base + i] - shift;
        s1 += d;
        s2 = fma(d, d, s2);
    }
    let t = row_sum(ids.lid, slot.tl, rp.tpr, vec4<f32>(hsum(s1), hsum(s2), 0.0, 0.0));
    let m = row_norm(rp, shift, t.x, t.y);
    for (var i = slot.tl; i < rp.len && slot.live; i += rp.tpr) {
        rp_y[base + i] = (rp_x[base + i] - m.x) * m.y;
    }
}

@group(0) @binding(0) var<uniform> rg: RowParams;
@group(0) @binding(1) var<storage, read> rg_x: array<V>;
@group(0) @binding(2) var<storage, read> rg_g: array<V>;
@group(0) @binding(3) var<storage, read_write> rg_dx: array<V>;

// dx = r * (g - sum(g) / n - y * r * sum(g (x - mean)) / d), y = (x - mean) * r.
@compute @workgroup_size(RWG)
fn rows_grad(ids: Ids) {
    if (!rows_left(rg, ids)) {
        return;
    }
    let slot = row_slot(rg, ids);
    let base = slot.base;
    let shift = lane0(rg_x[base]);
    var sd = V(0.0);
    var sdd = V(0.0);
    var sg = V(0.0);
    var sgd = V(0.0);
    for (var i = slot.tl; i < rg.len && slot.live; i += rg.tpr) {
        let d = rg_x[base + i] - shift;
        let g = rg_g[base + i];
        sd += d;
        sdd = fma(d, d, sdd);
        sg += g;
        sgd = fma(g, d, sgd);
    }
    let t = row_sum(ids.lid, slot.tl, rg.tpr, vec4<f32>(hsum(sd), hsum(sdd), hsum(sg), hsum(sgd)));
    let m = row_norm(rg, shift, t.x, t.y);
    let a = t.z * rg.inv_n;
    let b = m.y * (t.w - (m.x - shift) * t.z) * rg.inv_divisor;
    for (var i = slot.tl; i < rg.len && slot.live; i += rg.tpr) {
        let y = (rg_x[base + i] - m.x) * m.y;
        rg_dx[base + i] = m.y * (rg_g[base + i] - a - y * b);
    }
}
