// spectral_norm.wgsl: W / sigma(W), sigma from a power iteration.
//
// The weight is the matrix M = W with its `axis` moved to the front and the rest
// flattened, without a transposed copy: W is viewed as [A, R, J] (A = the axes before
// `axis`, R = `axis`, J = the axes after it), and M[r, c] with c = a * J + j is
// W[a, r, j]. For axis 0 (A = 1) M is W itself, row-major.
//
// One power-iteration half step each way:
//   M^T u: `mtv_partials` + `mtv_combine` (this file): column sums, each workgroup a
//          tile of 64 columns x a block of rows, consecutive threads on consecutive
//          columns, so every row of the tile is read as one coalesced run.
//   M v:   `dot_partials` in channel_stats.wgsl: row sums, rows read contiguously.
// `normalize` (one workgroup) turns the raw product into the unit vector, Chainer's
// x / (||x|| + eps) or PyTorch's x / max(||x||, eps), and when asked writes
// sigma = u^T M v = ||raw||^2 / denominator (the last raw product dotted with its own
// normalized vector), divided by `factor`. Vectors, norms and sigma never leave the
// GPU between iterations.
//
// Output `scale`: W * gamma / sigma. A sigma whose magnitude is below the smallest
// normal f32 (an all-zero weight, or u orthogonal to every column of M) is replaced
// by 1: the weight passes through unscaled instead of becoming NaN or Inf. (A
// negative sigma, possible in PyTorch's evaluation with arbitrary stored u and v, is
// used as it is, as PyTorch does.)
//
// Backward, with s = gamma (or 1), D = <G, W>, u and v constant:
//   grad_W = (s / sigma) G - (s D / (sigma^2 factor)) u v^T,  grad_gamma = D / sigma
// D comes from channel_stats.wgsl's sum kernel; `grad_coef` folds it into the two
// coefficients; `grad` applies them elementwise.

const WG: u32 = 256u;
const TILE: u32 = 64u;
const LANES: u32 = 4u; // WG / TILE row lanes per column
const MIN_NORMAL: f32 = 1.17549435e-38;

fn usable_sigma(sigma: f32) -> f32 {
    return select(1.0, sigma, abs(sigma) >= MIN_NORMAL);
}

fn linear_id(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

var<workgroup> red: array<f32, WG>;

fn tree_sum(lid: u32, value: f32) -> f32 {
    red[lid] = value;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            red[lid] = red[lid] + red[lid + s];
        }
        workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier();
    return total;
}

// ---- mtv_partials: partial column sums of M^T u over a block of rows ---------------

// Mirrors `ColumnParams` in src/ops/spectral_norm.rs.
struct ColumnParams {
    rows: u32,       // R
    inner: u32,      // J
    rj: u32,         // R * J
    cols: u32,       // A * J
    row_block: u32,  // rows per partial
    r0: u32,         // the box: rows [r0, r0 + nr), columns [c0, c0 + nc)
    nr: u32,
    c0: u32,
    nc: u32,
    bind_start: u32, // global index of the binding window's first element
    tiles: u32,      // column tiles in the box
    _pad: u32,
}

@group(0) @binding(0) var<uniform> cp: ColumnParams;
@group(0) @binding(1) var<storage, read> cp_m: array<f32>;
@group(0) @binding(2) var<storage, read> cp_u: array<f32>;
@group(0) @binding(3) var<storage, read_write> cp_out: array<f32>; // [blocks, cols]

// A box covers rows [r0, r0 + nr) of whole or partial row blocks (a block split
// across boxes when a binding is small): a workgroup reduces the part of one block
// inside the box, and adds to the partial when it is not the block's first part
// (earlier boxes were dispatched first).
@compute @workgroup_size(WG)
fn mtv_partials(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let linear = wid.x + wid.y * nwg.x;
    let first_block = cp.r0 / cp.row_block;
    let box_end = cp.r0 + cp.nr;
    let blocks = (box_end + cp.row_block - 1u) / cp.row_block - first_block;
    if (linear >= cp.tiles * blocks) {
        return;
    }
    let tile = linear % cp.tiles;
    let rb = first_block + linear / cp.tiles;
    let col = lid % TILE;
    let lane = lid / TILE;
    let cl = tile * TILE + col;
    let block_start = rb * cp.row_block;
    let r_begin = max(block_start, cp.r0);
    let r_end = min(block_start + cp.row_block, box_end);
    var acc = 0.0;
    if (cl < cp.nc) {
        let c = cp.c0 + cl;
        let a = c / cp.inner;
        let j = c - a * cp.inner;
        let step = LANES * cp.inner;
        var r = r_begin + lane;
        var e = a * cp.rj + r * cp.inner + j - cp.bind_start;
        for (; r < r_end; r += LANES) {
            acc = fma(cp_m[e], cp_u[r], acc);
            e += step;
        }
    }
    red[lid] = acc;
    workgroupBarrier();
    if (lane == 0u && cl < cp.nc) {
        var total = (red[col] + red[col + TILE]) + (red[col + 2u * TILE] + red[col + 3u * TILE]);
        let slot = rb * cp.cols + cp.c0 + cl;
        if (r_begin != block_start) {
            total += cp_out[slot];
        }
        cp_out[slot] = total;
    }
}

// `mtv_partials` on vec4s, when M's rows are a multiple of 4 long and every box starts
// at a multiple of 4 (column, binding): the 64 columns of a tile are 16 quads, each
// thread sums one quad over every 16th row of the block, and 16 row lanes are added
// in shared memory. Same partial slots as the scalar kernel.
const QUADS: u32 = 16u;      // TILE / 4
const LANES4: u32 = 16u;     // WG / QUADS

var<workgroup> red4: array<vec4<f32>, WG>;

@group(0) @binding(0) var<uniform> cp4: ColumnParams;
@group(0) @binding(1) var<storage, read> cp4_m: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> cp4_u: array<f32>;
@group(0) @binding(3) var<storage, read_write> cp4_out: array<f32>; // [blocks, cols]

@compute @workgroup_size(WG)
fn mtv_partials_vec4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let linear = wid.x + wid.y * nwg.x;
    let first_block = cp4.r0 / cp4.row_block;
    let box_end = cp4.r0 + cp4.nr;
    let blocks = (box_end + cp4.row_block - 1u) / cp4.row_block - first_block;
    if (linear >= cp4.tiles * blocks) {
        return;
    }
    let tile = linear % cp4.tiles;
    let rb = first_block + linear / cp4.tiles;
    let quad = lid % QUADS;
    let lane = lid / QUADS;
    let cl = tile * TILE + quad * 4u; // the quad's first column, box-relative
    let block_start = rb * cp4.row_block;
    let r_begin = max(block_start, cp4.r0);
    let r_end = min(block_start + cp4.row_block, box_end);
    var acc = vec4<f32>(0.0);
    if (cl < cp4.nc) {
        let c = cp4.c0 + cl;
        let a = c / cp4.inner;
        let j = c - a * cp4.inner;
        let step = LANES4 * cp4.inner / 4u;
        var r = r_begin + lane;
        var e = (a * cp4.rj + r * cp4.inner + j - cp4.bind_start) / 4u;
        for (; r < r_end; r += LANES4) {
            acc = fma(cp4_m[e], vec4<f32>(cp4_u[r]), acc);
            e += step;
        }
    }
    red4[lid] = acc;
    workgroupBarrier();
    if (lane == 0u && cl < cp4.nc) {
        var total = vec4<f32>(0.0);
        for (var k = 0u; k < LANES4; k += 1u) {
            total += red4[quad + k * QUADS];
        }
        for (var i = 0u; i < 4u; i += 1u) {
            let slot = rb * cp4.cols + cp4.c0 + cl + i;
            var t = total[i];
            if (r_begin != block_start) {
                t += cp4_out[slot];
            }
            cp4_out[slot] = t;
        }
    }
}

// ---- mtv_combine: the column sums, one thread per column -------------------------

// Mirrors `CombineParams` in src/ops/spectral_norm.rs.
struct CombineParams {
    cols: u32,
    blocks: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> mc: CombineParams;
@group(0) @binding(1) var<storage, read> mc_partials: array<f32>;
@group(0) @binding(2) var<storage, read_write> mc_out: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn mtv_combine(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = linear_id(wid, nwg, lid);
    if (c >= mc.cols) {
        return;
    }
    var acc = 0.0;
    for (var b = 0u; b < mc.blocks; b += 1u) {
        acc += mc_partials[b * mc.cols + c];
    }
    mc_out[c] = vec4<f32>(acc, 0.0, 0.0, 0.0);
}

// ---- normalize / dot: one workgroup over a vector ---------------------------------

// Mirrors `VectorParams` in src/ops/spectral_norm.rs.
struct VectorParams {
    n: u32,
    eps: f32,
    pytorch: u32,     // 1: x / max(||x||, eps); 0: x / (||x|| + eps) (Chainer)
    write_sigma: u32, // 1: sigma[sigma_index] = ||x||^2 / denominator / factor
    factor: f32,
    sigma_index: u32,
    keep: u32,        // 1: also write the normalized vector to `keep`
    _pad: u32,
}

@group(0) @binding(0) var<uniform> np: VectorParams;
@group(0) @binding(1) var<storage, read> np_raw: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> np_out: array<f32>;
@group(0) @binding(3) var<storage, read_write> np_keep: array<f32>;
@group(0) @binding(4) var<storage, read_write> np_sigma: array<f32>;

@compute @workgroup_size(WG)
fn normalize(@builtin(local_invocation_index) lid: u32) {
    var part = 0.0;
    for (var i = lid; i < np.n; i += WG) {
        let x = np_raw[i].x;
        part = fma(x, x, part);
    }
    let ss = tree_sum(lid, part);
    let norm = sqrt(ss);
    var denom = norm + np.eps;
    if (np.pytorch == 1u) {
        denom = max(norm, np.eps);
    }
    for (var i = lid; i < np.n; i += WG) {
        let y = np_raw[i].x / denom;
        np_out[i] = y;
        if (np.keep == 1u) {
            np_keep[i] = y;
        }
    }
    if (np.write_sigma == 1u && lid == 0u) {
        np_sigma[np.sigma_index] = ss / denom / np.factor;
    }
}

@group(0) @binding(0) var<uniform> dt: VectorParams;
@group(0) @binding(1) var<storage, read> dt_raw: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> dt_vector: array<f32>;
@group(0) @binding(3) var<storage, read_write> dt_sigma: array<f32>;

// sigma = vector . raw / factor (PyTorch's evaluation: u^T (M v) with u, v as stored).
@compute @workgroup_size(WG)
fn dot(@builtin(local_invocation_index) lid: u32) {
    var part = 0.0;
    for (var i = lid; i < dt.n; i += WG) {
        part = fma(dt_raw[i].x, dt_vector[i], part);
    }
    let total = tree_sum(lid, part);
    if (lid == 0u) {
        dt_sigma[dt.sigma_index] = total / dt.factor;
    }
}

// ---- scale: W * gamma / sigma -----------------------------------------------------

// Mirrors `ScaleParams` in src/ops/spectral_norm.rs.
struct ScaleParams {
    count: u32,
    use_gamma: u32,
    _pad0: u32,
    _pad1: u32,
}

const PER_THREAD: u32 = 4u;

@group(0) @binding(0) var<uniform> sc: ScaleParams;
@group(0) @binding(1) var<storage, read> sc_w: array<f32>;
@group(0) @binding(2) var<storage, read> sc_sigma: array<f32>;
@group(0) @binding(3) var<storage, read> sc_gamma: array<f32>;
@group(0) @binding(4) var<storage, read_write> sc_out: array<f32>;

@compute @workgroup_size(WG)
fn scale(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let first = linear_id(wid, nwg, lid) * PER_THREAD;
    if (first >= sc.count) {
        return;
    }
    var s = 1.0;
    if (sc.use_gamma == 1u) {
        s = sc_gamma[0];
    }
    let k = s / usable_sigma(sc_sigma[0]);
    let end = min(first + PER_THREAD, sc.count);
    for (var e = first; e < end; e += 1u) {
        sc_out[e] = sc_w[e] * k;
    }
}

// `scale` on vec4s, for tensors a multiple of 4 long (`count` counts vec4s).
@group(0) @binding(0) var<uniform> sc4: ScaleParams;
@group(0) @binding(1) var<storage, read> sc4_w: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> sc4_sigma: array<f32>;
@group(0) @binding(3) var<storage, read> sc4_gamma: array<f32>;
@group(0) @binding(4) var<storage, read_write> sc4_out: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn scale_vec4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let first = linear_id(wid, nwg, lid) * PER_THREAD;
    if (first >= sc4.count) {
        return;
    }
    var s = 1.0;
    if (sc4.use_gamma == 1u) {
        s = sc4_gamma[0];
    }
    let k = s / usable_sigma(sc4_sigma[0]);
    let end = min(first + PER_THREAD, sc4.count);
    for (var e = first; e < end; e += 1u) {
        sc4_out[e] = sc4_w[e] * k;
    }
}

// ---- grad_coef: the two coefficients of grad_W, and grad_gamma --------------------

// Mirrors `GradCoefParams` in src/ops/spectral_norm.rs.
struct GradCoefParams {
    slices: u32,
    use_gamma: u32,
    factor: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> gc: GradCoefParams;
@group(0) @binding(1) var<storage, read> gc_sums: array<vec4<f32>>; // y: <G, W> per slice
@group(0) @binding(2) var<storage, read> gc_sigma: array<f32>;
@group(0) @binding(3) var<storage, read> gc_gamma: array<f32>;
@group(0) @binding(4) var<storage, read_write> gc_coef: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> gc_grad_gamma: array<f32>;

@compute @workgroup_size(WG)
fn grad_coef(@builtin(local_invocation_index) lid: u32) {
    var part = 0.0;
    for (var i = lid; i < gc.slices; i += WG) {
        part += gc_sums[i].y;
    }
    let d = tree_sum(lid, part);
    if (lid == 0u) {
        let sigma = gc_sigma[0];
        let su = usable_sigma(sigma);
        var s = 1.0;
        if (gc.use_gamma == 1u) {
            s = gc_gamma[0];
            gc_grad_gamma[0] = d / su;
        }
        var b = 0.0;
        if (abs(sigma) >= MIN_NORMAL) {
            b = s * d / (su * su * gc.factor);
        }
        gc_coef[0] = vec4<f32>(s / su, b, 0.0, 0.0);
    }
}

// ---- grad: grad_W = coef.x G - coef.y u[r] v[a * J + j] ----------------------------

// Mirrors `ElementParams` in src/ops/channel_stats.rs; here outer = A, channels = R,
// inner = J.
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

@group(0) @binding(0) var<uniform> gr: ElementParams;
@group(0) @binding(1) var<storage, read> gr_g: array<f32>;
@group(0) @binding(2) var<storage, read> gr_u: array<f32>;
@group(0) @binding(3) var<storage, read> gr_v: array<f32>;
@group(0) @binding(4) var<storage, read> gr_coef: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> gr_out: array<f32>;

@compute @workgroup_size(WG)
fn grad(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let first = linear_id(wid, nwg, lid) * PER_THREAD;
    if (first >= gr.count) {
        return;
    }
    // The run's first element (a, r, j), then stepped without divisions.
    let t = gr.j_start + first;
    var j = t % gr.inner;
    let tr = gr.c_start + t / gr.inner;
    var r = tr % gr.channels;
    var a = gr.o_start + tr / gr.channels;
    let k = gr_coef[0];
    var ku = k.y * gr_u[r];
    let end = min(first + PER_THREAD, gr.count);
    for (var e = first; e < end; e += 1u) {
        gr_out[e] = fma(k.x, gr_g[e], -ku * gr_v[a * gr.inner + j]);
        j += 1u;
        if (j == gr.inner) {
            j = 0u;
            r += 1u;
            if (r == gr.channels) {
                r = 0u;
                a += 1u;
            }
            ku = k.y * gr_u[min(r, gr.channels - 1u)];
        }
    }
}

// `grad` on vec4s, for layouts whose rows are a multiple of 4 long (`count`, `inner`
// and `j_start` count vec4s; a vec4 has one r, and v is read as vec4s).
@group(0) @binding(0) var<uniform> gr4: ElementParams;
@group(0) @binding(1) var<storage, read> gr4_g: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> gr4_u: array<f32>;
@group(0) @binding(3) var<storage, read> gr4_v: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> gr4_coef: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> gr4_out: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn grad_vec4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let first = linear_id(wid, nwg, lid) * PER_THREAD;
    if (first >= gr4.count) {
        return;
    }
    // The run's first element (a, r, j), then stepped without divisions.
    let t = gr4.j_start + first;
    var j = t % gr4.inner;
    let tr = gr4.c_start + t / gr4.inner;
    var r = tr % gr4.channels;
    var a = gr4.o_start + tr / gr4.channels;
    let k = gr4_coef[0];
    var ku = k.y * gr4_u[r];
    let end = min(first + PER_THREAD, gr4.count);
    for (var e = first; e < end; e += 1u) {
        gr4_out[e] = k.x * gr4_g[e] - ku * gr4_v[a * gr4.inner + j];
        j += 1u;
        if (j == gr4.inner) {
            j = 0u;
            r += 1u;
            if (r == gr4.channels) {
                r = 0u;
                a += 1u;
            }
            ku = k.y * gr4_u[min(r, gr4.channels - 1u)];
        }
    }
}
