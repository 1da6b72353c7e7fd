// weight_norm.wgsl: W = g * v / ||v||, the norm over every axis but the kept one.
//
// Row kernels (rows.wgsl) when every slice is one contiguous row (PyTorch's dim 0)
// short enough to stay in cache: the squared norm (and <G, v>) in one pass, then the
// output from cache, one read of v from memory, as PyTorch's fused `_weight_norm`.
// Otherwise the squared norms (and, for backward, <grad_W, v>) come from
// channel_stats.wgsl's sum kernel in one pass over v, and this file turns them into
// per-slice factors and applies them elementwise. v is viewed as
// [batch, outer, channels, inner], slice a * channels + c owning v[a, o, c, j]
// (PyTorch's `dim` kept: batch = 1, outer = the axes before it, inner = after it;
// Jittor's `dim` reduced: outer = that axis, batch = the axes before it, channels =
// after it).
//
// Zero norms: the squared norm is clamped at `eps` (Jittor's convention, default 1e-30),
// so a zero slice gives W = 0 and finite gradients instead of PyTorch's NaN.
//
// Backward, with n = sqrt(max(|v|^2, eps)) and s = <G, v>:
//   grad_g = s / n
//   grad_v = (g / n) * G - (g s / n^3) * v      (the second term is 0 when clamped)

const WG: u32 = 256u;

#import elem
#import element
#import rows

// Mirrors `SliceParams` in src/ops/weight_norm.rs.
struct SliceParams {
    slices: u32,
    eps: f32,
    _pad0: u32,
    _pad1: u32,
}

// The norm of a slice from its squared norm in two parts (welford.wgsl: `sq.y` the
// part summed scaled, 0 unless some thread's squares reached 2^64), clamped at eps.
fn clamped_norm(sq: vec2<f32>, eps: f32) -> f32 {
    if (!(sq.y == 0.0)) {
        return scaled_sqrt(sq.x, sq.y);
    }
    return sqrt(max(sq.x, eps));
}

// grad_g = s / n, grad_v = (g / n) G - (g s / n^3) v (second term 0 when clamped);
// s = <G, v>, `sq` = |v|^2 in two parts. Returns (grad_g, g / n, c, k) with
// grad_v = (g / n) G - c (k v): c = g s / n^3 and k = 1, or for a norm beyond 2^32
// (whose 1 / n^3 underflows) c = g s / n^2 and k = 1 / n.
fn grad_coef(g: f32, s: f32, sq: vec2<f32>, eps: f32) -> vec4<f32> {
    let inv = 1.0 / clamped_norm(sq, eps);
    var second = 0.0;
    var k = 1.0;
    if (!(sq.y == 0.0)) {
        second = (g * inv) * (s * inv);
        k = inv;
    } else if (sq.x >= eps) {
        second = g * s * inv * inv * inv;
    }
    return vec4<f32>(s * inv, g * inv, second, k);
}

// ---- norms: g = ||v|| per slice (decompose) ---------------------------------------

@group(0) @binding(0) var<uniform> nm: SliceParams;
@group(0) @binding(1) var<storage, read> nm_sums: array<vec4<f32>>; // z, w: sum v^2 (two parts)
@group(0) @binding(2) var<storage, read_write> nm_g: array<f32>;

@compute @workgroup_size(WG)
fn norms(ids: Ids) {
    let c = linear_id(ids);
    if (c >= nm.slices) {
        return;
    }
    // The plain norm: decomposing must leave the weight unchanged, g * v / ||v|| = v.
    nm_g[c] = scaled_sqrt(nm_sums[c].z, nm_sums[c].w);
}

// ---- factors: f = g / ||v|| per slice -----------------------------------------------

@group(0) @binding(0) var<uniform> fa: SliceParams;
@group(0) @binding(1) var<storage, read> fa_g: array<f32>;
@group(0) @binding(2) var<storage, read> fa_sums: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> fa_out: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn factors(ids: Ids) {
    let c = linear_id(ids);
    if (c >= fa.slices) {
        return;
    }
    fa_out[c] = vec4<f32>(fa_g[c] / clamped_norm(fa_sums[c].zw, fa.eps), 0.0, 0.0, 0.0);
}

// ---- apply: W = f[slice] * v ----------------------------------------------------------

@group(0) @binding(0) var<uniform> ap: ElementParams;
@group(0) @binding(1) var<storage, read> ap_v: array<D>;
@group(0) @binding(2) var<storage, read> ap_f: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> ap_w: array<D>;

@compute @workgroup_size(WG)
fn apply(ids: Ids) {
    var f = 0.0;
    for (var w = cursor_start(ap, ids); cursor_live(w); cursor_next(ap, &w)) {
        if (w.fresh) {
            f = ap_f[w.slice].x;
        }
        ap_w[w.e] = dstore(f * dload(ap_v[w.e]));
    }
}

// ---- grad_factors: grad_g and the two coefficients of grad_v -------------------------

@group(0) @binding(0) var<uniform> gf: SliceParams;
@group(0) @binding(1) var<storage, read> gf_g: array<f32>;
@group(0) @binding(2) var<storage, read> gf_sums: array<vec4<f32>>; // y: <G, v>, z, w: |v|^2
@group(0) @binding(3) var<storage, read_write> gf_grad_g: array<f32>;
@group(0) @binding(4) var<storage, read_write> gf_coef: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn grad_factors(ids: Ids) {
    let c = linear_id(ids);
    if (c >= gf.slices) {
        return;
    }
    let k = grad_coef(gf_g[c], gf_sums[c].y, gf_sums[c].zw, gf.eps);
    gf_grad_g[c] = k.x;
    gf_coef[c] = vec4<f32>(k.y, k.z, k.w, 0.0);
}

// ---- grad_v = coef.x * G - coef.y * (coef.z * v) -------------------------------------

@group(0) @binding(0) var<uniform> gv: ElementParams;
@group(0) @binding(1) var<storage, read> gv_v: array<D>;
@group(0) @binding(2) var<storage, read> gv_grad: array<D>;
@group(0) @binding(3) var<storage, read> gv_coef: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> gv_out: array<D>;

@compute @workgroup_size(WG)
fn grad_v(ids: Ids) {
    var k = vec4<f32>(0.0);
    for (var w = cursor_start(gv, ids); cursor_live(w); cursor_next(gv, &w)) {
        if (w.fresh) {
            k = gv_coef[w.slice];
        }
        gv_out[w.e] = dstore(k.x * dload(gv_grad[w.e]) - k.y * (k.z * dload(gv_v[w.e])));
    }
}

// ---- row kernels ----------------------------------------------------------------

@group(0) @binding(0) var<uniform> rf: RowParams;
@group(0) @binding(1) var<storage, read> rf_g: array<f32>;
@group(0) @binding(2) var<storage, read> rf_v: array<D>;
@group(0) @binding(3) var<storage, read_write> rf_w: array<D>;

@compute @workgroup_size(RWG)
fn rows_forward(ids: Ids) {
    if (!rows_left(rf, ids)) {
        return;
    }
    let slot = row_slot(rf, ids);
    let base = slot.base;
    let t = rf.tpr;
    var sq = V(0.0);
    var i = slot.tl;
    if (ROW_BATCH) {
        var sq1 = V(0.0);
        for (; i + 3u * t < rf.len && slot.live; i += 4u * t) {
            let a = dload(rf_v[base + i]);
            let b = dload(rf_v[base + i + t]);
            let c = dload(rf_v[base + i + 2u * t]);
            let d = dload(rf_v[base + i + 3u * t]);
            sq = fma(a, a, sq);
            sq1 = fma(b, b, sq1);
            sq = fma(c, c, sq);
            sq1 = fma(d, d, sq1);
        }
        sq += sq1;
    }
    for (; i < rf.len && slot.live; i += t) {
        let v = dload(rf_v[base + i]);
        sq = fma(v, v, sq);
    }
    // Squares reaching 2^64 (welford.wgsl): summed again, scaled, in the second part.
    var sq2 = vec2<f32>(hsum(sq), 0.0);
    if (!(sq2.x < BIG)) {
        var q = V(0.0);
        for (var j = slot.tl; j < rf.len && slot.live; j += t) {
            let v = dload(rf_v[base + j]) * DOWN;
            q = fma(v, v, q);
        }
        sq2 = vec2<f32>(0.0, hsum(q));
    }
    let total = row_sum(ids.lid, slot.tl, rf.tpr, vec4<f32>(sq2, 0.0, 0.0)).xy;
    let f = rf_g[rf.first_row + slot.row] / clamped_norm(total, rf.eps);
    i = slot.tl;
    if (ROW_BATCH) {
        for (; i + 3u * t < rf.len && slot.live; i += 4u * t) {
            let a = dload(rf_v[base + i]);
            let b = dload(rf_v[base + i + t]);
            let c = dload(rf_v[base + i + 2u * t]);
            let d = dload(rf_v[base + i + 3u * t]);
            rf_w[base + i] = dstore(f * a);
            rf_w[base + i + t] = dstore(f * b);
            rf_w[base + i + 2u * t] = dstore(f * c);
            rf_w[base + i + 3u * t] = dstore(f * d);
        }
    }
    for (; i < rf.len && slot.live; i += t) {
        rf_w[base + i] = dstore(f * dload(rf_v[base + i]));
    }
}

@group(0) @binding(0) var<uniform> rb: RowParams;
@group(0) @binding(1) var<storage, read> rb_g: array<f32>;
@group(0) @binding(2) var<storage, read> rb_v: array<D>;
@group(0) @binding(3) var<storage, read> rb_grad: array<D>;
@group(0) @binding(4) var<storage, read_write> rb_grad_g: array<f32>;
@group(0) @binding(5) var<storage, read_write> rb_grad_v: array<D>;

@compute @workgroup_size(RWG)
fn rows_grad(ids: Ids) {
    if (!rows_left(rb, ids)) {
        return;
    }
    let slot = row_slot(rb, ids);
    let base = slot.base;
    let t = rb.tpr;
    var sgv = V(0.0);
    var svv = V(0.0);
    var i = slot.tl;
    if (ROW_BATCH) {
        for (; i + 3u * t < rb.len && slot.live; i += 4u * t) {
            let va = dload(rb_v[base + i]);
            let vb = dload(rb_v[base + i + t]);
            let vc = dload(rb_v[base + i + 2u * t]);
            let vd = dload(rb_v[base + i + 3u * t]);
            let ga = dload(rb_grad[base + i]);
            let gb = dload(rb_grad[base + i + t]);
            let gc = dload(rb_grad[base + i + 2u * t]);
            let gd = dload(rb_grad[base + i + 3u * t]);
            sgv = fma(ga, va, fma(gb, vb, fma(gc, vc, fma(gd, vd, sgv))));
            svv = fma(va, va, fma(vb, vb, fma(vc, vc, fma(vd, vd, svv))));
        }
    }
    for (; i < rb.len && slot.live; i += t) {
        let v = dload(rb_v[base + i]);
        sgv = fma(dload(rb_grad[base + i]), v, sgv);
        svv = fma(v, v, svv);
    }
    var sq = vec2<f32>(hsum(svv), 0.0);
    if (!(sq.x < BIG)) {
        // Squares reaching 2^64 (welford.wgsl): summed again, scaled.
        var q = V(0.0);
        for (var j = slot.tl; j < rb.len && slot.live; j += t) {
            let v = dload(rb_v[base + j]) * DOWN;
            q = fma(v, v, q);
        }
        sq = vec2<f32>(0.0, hsum(q));
    }
    let sums = row_sum(ids.lid, slot.tl, rb.tpr, vec4<f32>(hsum(sgv), sq, 0.0)).xyz;
    let k = grad_coef(rb_g[rb.first_row + slot.row], sums.x, sums.yz, rb.eps);
    if (slot.tl == 0u && slot.live) {
        rb_grad_g[rb.first_row + slot.row] = k.x;
    }
    i = slot.tl;
    if (ROW_BATCH) {
        for (; i + 3u * t < rb.len && slot.live; i += 4u * t) {
            let va = dload(rb_v[base + i]);
            let vb = dload(rb_v[base + i + t]);
            let vc = dload(rb_v[base + i + 2u * t]);
            let vd = dload(rb_v[base + i + 3u * t]);
            let ga = dload(rb_grad[base + i]);
            let gb = dload(rb_grad[base + i + t]);
            let gc = dload(rb_grad[base + i + 2u * t]);
            let gd = dload(rb_grad[base + i + 3u * t]);
            rb_grad_v[base + i] = dstore(k.y * ga - k.z * (k.w * va));
            rb_grad_v[base + i + t] = dstore(k.y * gb - k.z * (k.w * vb));
            rb_grad_v[base + i + 2u * t] = dstore(k.y * gc - k.z * (k.w * vc));
            rb_grad_v[base + i + 3u * t] = dstore(k.y * gd - k.z * (k.w * vd));
        }
    }
    for (; i < rb.len && slot.live; i += t) {
        rb_grad_v[base + i] = dstore(k.y * dload(rb_grad[base + i]) - k.z * (k.w * dload(rb_v[base + i])));
    }
}
