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
// Numerics, whatever the order of the elements: each thread sums runs of RESHIFT of
// its elements shifted by the run's first element (sums of the order of the spread,
// not of a common offset), folds each run into a Welford state (mean, M2, n), and
// Chan's combine merges the threads' states. An outlier therefore only spoils the sums
// of its own run instead of the whole row's. Backward also needs G = sum g and
// C = sum g (x - mean): each thread keeps its own (G, C about its own mean), and the
// combine carries them along with Welford's state, as a co-moment:
// C = C_a + C_b + (mean_a - mean) G_a + (mean_b - mean) G_b, one tree for everything.

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
    var rstd: f32;
    if (s.w != 0.0) {
        rstd = welford_rstd(s, 1.0 / fp.divisor, fp.eps); // m2 scaled (welford.wgsl)
    } else {
        rstd = 1.0 / sqrt(max(s.y, 0.0) / fp.divisor + fp.eps);
    }
    fp_norm[c] = vec4<f32>(s.x, rstd, 0.0, 0.0);
}

@group(0) @binding(0) var<uniform> np: ElementParams;
@group(0) @binding(1) var<storage, read> np_x: array<D>;
@group(0) @binding(2) var<storage, read> np_norm: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> np_y: array<D>;

@compute @workgroup_size(WG)
fn normalize(ids: Ids) {
    var m: vec4<f32>;
    for (var w = cursor_start(np, ids); cursor_live(w); cursor_next(np, &w)) {
        if (w.fresh) {
            m = np_norm[w.slice];
        }
        np_y[w.e] = dstore((dload(np_x[w.e]) - m.x) * m.y);
    }
}

// aux0 = 1 / n, aux1 = 1 / d.
@group(0) @binding(0) var<uniform> gp: ElementParams;
@group(0) @binding(1) var<storage, read> gp_x: array<D>;
@group(0) @binding(2) var<storage, read> gp_g: array<D>;
@group(0) @binding(3) var<storage, read> gp_norm: array<vec4<f32>>; // (mean, rstd, 0, 0)
@group(0) @binding(4) var<storage, read> gp_sums: array<vec4<f32>>; // (sum g, sum g (x - mean), 0, 0)
@group(0) @binding(5) var<storage, read_write> gp_dx: array<D>;

@compute @workgroup_size(WG)
fn grad(ids: Ids) {
    var m: vec4<f32>;
    var a = 0.0;
    var b = 0.0;
    for (var w = cursor_start(gp, ids); cursor_live(w); cursor_next(gp, &w)) {
        if (w.fresh) {
            m = gp_norm[w.slice];
            let s = gp_sums[w.slice];
            // Per slice: r * sum(g (x - mean)) / d, as the row kernels do; never r * r on
            // its own, which underflows for weights near 1e19 when a driver reassociates.
            a = s.x * gp.aux0;
            b = m.y * s.y * gp.aux1;
        }
        let y = (dload(gp_x[w.e]) - m.x) * m.y;
        gp_dx[w.e] = dstore(m.y * (dload(gp_g[w.e]) - a - y * b));
    }
}

// ---- row kernels ------------------------------------------------------------------

// Welford's state plus (G, C), for the backward's single tree.
struct GradState {
    w: vec4<f32>, // (mean, m2, n, 0)
    g: vec2<f32>, // (sum g, sum g (x - mean))
}

// Chan's combine of GradStates: `combine` is `chan_plain`, `chan` or `chan_scaled`
// (welford.wgsl) for the Welford part; (G, C) are plain sums either way.
fn chan_grad(a: GradState, b: GradState, combine: u32) -> GradState {
    if (b.w.z == 0.0) {
        return a;
    }
    if (a.w.z == 0.0) {
        return b;
    }
    let n = a.w.z + b.w.z;
    let wb = b.w.z / n;
    let d = b.w.x - a.w.x;
    var r: GradState;
    if (combine == 0u) {
        r.w = chan_plain(a.w, b.w);
    } else if (combine == 1u) {
        r.w = chan(a.w, b.w);
    } else {
        r.w = chan_scaled(a.w, b.w);
    }
    // mean - mean_a = d wb, mean - mean_b = -d (1 - wb).
    r.g = vec2<f32>(a.g.x + b.g.x, a.g.y + b.g.y - d * wb * a.g.x + d * (1.0 - wb) * b.g.x);
    return r;
}

var<workgroup> row_red_g: array<vec2<f32>, RWG>;

// `row_welford` with (G, C) carried along (plain combines; a row that
// `needs_scaling` is redone by the kernel).
fn row_welford_grad(lid: u32, tl: u32, tpr: u32, v: GradState) -> GradState {
    row_red[lid] = v.w;
    row_red_g[lid] = v.g;
    workgroupBarrier();
    for (var s = tpr / 2u; s > 0u; s >>= 1u) {
        if (tl < s) {
            let c = chan_grad(GradState(row_red[lid], row_red_g[lid]), GradState(row_red[lid + s], row_red_g[lid + s]), 0u);
            row_red[lid] = c.w;
            row_red_g[lid] = c.g;
        }
        workgroupBarrier();
    }
    let total = GradState(row_red[lid - tl], row_red_g[lid - tl]);
    workgroupBarrier();
    return total;
}

@group(0) @binding(0) var<uniform> rp: RowParams;
@group(0) @binding(1) var<storage, read> rp_x: array<D>;
@group(0) @binding(2) var<storage, read_write> rp_y: array<D>;

@compute @workgroup_size(RWG)
fn rows_forward(ids: Ids) {
    if (!rows_left(rp, ids)) {
        return;
    }
    let slot = row_slot(rp, ids);
    let base = slot.base;
    var own = vec4<f32>(0.0);
    var i = slot.tl;
    while (i < rp.len && slot.live) {
        let shift = lane0(dload(rp_x[base + i]));
        var s1 = V(0.0);
        var s2 = V(0.0);
        var n = 0u;
        for (var k = 0u; k < RESHIFT && i < rp.len; k += 1u) {
            let d = dload(rp_x[base + i]) - shift;
            s1 += d;
            s2 = fma(d, d, s2);
            n += LANES;
            i += rp.tpr;
        }
        own = chan_plain(own, welford_state(shift, hsum(s1), hsum(s2), n));
    }
    var st = row_welford(ids.lid, slot.tl, rp.tpr, own);
    if (needs_scaling(st) && slot.live) {
        // Squares reaching 2^64 in this row (welford.wgsl): the whole row again, scaled,
        // by each of its threads alone (no barrier: the rare path).
        st = vec4<f32>(0.0);
        for (var r = 0u; r < rp.len; r += RESHIFT) {
            let shift = lane0(dload(rp_x[base + r]));
            var s1 = V(0.0);
            var q1 = V(0.0);
            var q2 = V(0.0);
            let end = min(r + RESHIFT, rp.len);
            for (var k = r; k < end; k += 1u) {
                let x = dload(rp_x[base + k]);
                s1 += x - shift;
                let d = x * DOWN - shift * DOWN;
                q1 += d;
                q2 = fma(d, d, q2);
            }
            st = chan_scaled(st, welford_state_scaled(shift, hsum(s1), hsum(q1), hsum(q2), (end - r) * LANES));
        }
    }
    let mean = st.x;
    let rstd = welford_rstd(st, rp.inv_divisor, rp.eps); // plain or scaled m2
    let t = rp.tpr;
    i = slot.tl;
    if (ROW_BATCH) {
        for (; i + 3u * t < rp.len && slot.live; i += 4u * t) {
            let a = dload(rp_x[base + i]);
            let b = dload(rp_x[base + i + t]);
            let c = dload(rp_x[base + i + 2u * t]);
            let d = dload(rp_x[base + i + 3u * t]);
            rp_y[base + i] = dstore((a - mean) * rstd);
            rp_y[base + i + t] = dstore((b - mean) * rstd);
            rp_y[base + i + 2u * t] = dstore((c - mean) * rstd);
            rp_y[base + i + 3u * t] = dstore((d - mean) * rstd);
        }
    }
    for (; i < rp.len && slot.live; i += t) {
        rp_y[base + i] = dstore((dload(rp_x[base + i]) - mean) * rstd);
    }
}

@group(0) @binding(0) var<uniform> rg: RowParams;
@group(0) @binding(1) var<storage, read> rg_x: array<D>;
@group(0) @binding(2) var<storage, read> rg_g: array<D>;
@group(0) @binding(3) var<storage, read_write> rg_dx: array<D>;

// dx = r * (g - sum(g) / n - y * r * sum(g (x - mean)) / d), y = (x - mean) * r.
@compute @workgroup_size(RWG)
fn rows_grad(ids: Ids) {
    if (!rows_left(rg, ids)) {
        return;
    }
    let slot = row_slot(rg, ids);
    let base = slot.base;
    var own = GradState(vec4<f32>(0.0), vec2<f32>(0.0));
    var i = slot.tl;
    while (i < rg.len && slot.live) {
        let shift = lane0(dload(rg_x[base + i]));
        var sd = V(0.0);
        var sdd = V(0.0);
        var sg = V(0.0);
        var sgd = V(0.0);
        var n = 0u;
        for (var k = 0u; k < RESHIFT && i < rg.len; k += 1u) {
            let d = dload(rg_x[base + i]) - shift;
            let g = dload(rg_g[base + i]);
            sd += d;
            sdd = fma(d, d, sdd);
            sg += g;
            sgd = fma(g, d, sgd);
            n += LANES;
            i += rg.tpr;
        }
        var run: GradState;
        run.w = welford_state(shift, hsum(sd), hsum(sdd), n);
        let tg = hsum(sg);
        // sum g (x - run mean) = sum g (x - shift) - (run mean - shift) sum g.
        run.g = vec2<f32>(tg, hsum(sgd) - (run.w.x - shift) * tg);
        own = chan_grad(own, run, 0u);
    }
    var st = row_welford_grad(ids.lid, slot.tl, rg.tpr, own);
    if (needs_scaling(st.w) && slot.live) {
        // Squares reaching 2^64 in this row (welford.wgsl): the whole row again, m2
        // scaled, by each of its threads alone (no barrier: the rare path).
        st = GradState(vec4<f32>(0.0), vec2<f32>(0.0));
        for (var r = 0u; r < rg.len; r += RESHIFT) {
            let shift = lane0(dload(rg_x[base + r]));
            var sd = V(0.0);
            var q1 = V(0.0);
            var q2 = V(0.0);
            var sg = V(0.0);
            var sgd = V(0.0);
            let end = min(r + RESHIFT, rg.len);
            for (var k = r; k < end; k += 1u) {
                let x = dload(rg_x[base + k]);
                let g = dload(rg_g[base + k]);
                let d = x - shift;
                let ds = x * DOWN - shift * DOWN;
                sd += d;
                q1 += ds;
                q2 = fma(ds, ds, q2);
                sg += g;
                sgd = fma(g, d, sgd);
            }
            var run: GradState;
            run.w = welford_state_scaled(shift, hsum(sd), hsum(q1), hsum(q2), (end - r) * LANES);
            let tg = hsum(sg);
            run.g = vec2<f32>(tg, hsum(sgd) - (run.w.x - shift) * tg);
            st = chan_grad(st, run, 2u);
        }
    }
    let mean = st.w.x;
    let rstd = welford_rstd(st.w, rg.inv_divisor, rg.eps); // plain or scaled m2
    let t = st.g;
    let a = t.x * rg.inv_n;
    let b = rstd * t.y * rg.inv_divisor;
    let tp = rg.tpr;
    i = slot.tl;
    if (ROW_BATCH) {
        for (; i + 3u * tp < rg.len && slot.live; i += 4u * tp) {
            let xa = dload(rg_x[base + i]);
            let xb = dload(rg_x[base + i + tp]);
            let xc = dload(rg_x[base + i + 2u * tp]);
            let xd = dload(rg_x[base + i + 3u * tp]);
            let ga = dload(rg_g[base + i]);
            let gb = dload(rg_g[base + i + tp]);
            let gc = dload(rg_g[base + i + 2u * tp]);
            let gd = dload(rg_g[base + i + 3u * tp]);
            rg_dx[base + i] = dstore(rstd * (ga - a - (xa - mean) * rstd * b));
            rg_dx[base + i + tp] = dstore(rstd * (gb - a - (xb - mean) * rstd * b));
            rg_dx[base + i + 2u * tp] = dstore(rstd * (gc - a - (xc - mean) * rstd * b));
            rg_dx[base + i + 3u * tp] = dstore(rstd * (gd - a - (xd - mean) * rstd * b));
        }
    }
    for (; i < rg.len && slot.live; i += tp) {
        let y = (dload(rg_x[base + i]) - mean) * rstd;
        rg_dx[base + i] = dstore(rstd * (dload(rg_g[base + i]) - a - y * b));
    }
}
