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
//          columns (units), so every row of the tile is read as one coalesced run.
//   M v:   `dot_partials` in channel_stats.wgsl: row sums, rows read contiguously.
// `normalize` (one workgroup) turns the raw product into the unit vector, Chainer's
// x / (||x|| + eps) or PyTorch's x / max(||x||, eps), and when asked writes
// sigma = u^T M v = ||raw||^2 / denominator (the last raw product dotted with its own
// normalized vector), divided by `factor`. Vectors, norms and sigma never leave the
// GPU between iterations.
//
// Output `scale`: W * gamma / sigma. A sigma whose magnitude is below the smallest
// normal f32 (an all-zero weight, or u orthogonal to every column of M) is replaced
// by 1: the weight passes through unscaled instead of becoming NaN or Inf. A NaN
// sigma (a NaN in W) is used as it is: the output is NaN, as in PyTorch and Chainer.
// (A negative sigma, possible in PyTorch's evaluation with arbitrary stored u and v, is
// used as it is, as PyTorch does.)
//
// Backward, with s = gamma (or 1), D = <G, W>, u and v constant:
//   grad_W = (s / sigma) G - (s D / (sigma^2 factor)) u v^T,  grad_gamma = D / sigma
// D comes from channel_stats.wgsl's sum kernel; `grad_coef` folds it into the two
// coefficients; `grad` applies them elementwise.

const WG: u32 = 256u;
const TILE: u32 = 64u;
const MIN_NORMAL: f32 = 1.17549435e-38;

#import elem
#import element
#import tree
#import rows

fn usable_sigma(sigma: f32) -> f32 {
    // Written as "below" so that a NaN sigma (a NaN in W) is used, and propagates as in
    // PyTorch and Chainer, instead of passing W through.
    return select(sigma, 1.0, abs(sigma) < MIN_NORMAL);
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
    u_start: u32,    // u is bound from this row (the box's rows, from an aligned row)
    p_start: u32,    // the partials are bound from this slot
    _pad0: u32,
    _pad1: u32,
}

// A tile's 64 columns are TILE_UNITS units (VEC4: 16 quads); the WG threads are
// ROW_LANES row lanes of TILE_UNITS threads, each summing its unit over every
// ROW_LANES-th row of the block; the lanes are added in shared memory.
const TILE_UNITS: u32 = TILE / LANES;
const ROW_LANES: u32 = WG / TILE_UNITS;

var<workgroup> red: array<V, WG>;

@group(0) @binding(0) var<uniform> cp: ColumnParams;
@group(0) @binding(1) var<storage, read> cp_m: array<D>;
@group(0) @binding(2) var<storage, read> cp_u: array<f32>;
@group(0) @binding(3) var<storage, read_write> cp_out: array<f32>; // [blocks, cols]

// A box covers rows [r0, r0 + nr) of whole or partial row blocks (a block split
// across boxes when a binding is small): a workgroup reduces the part of one block
// inside the box, and adds to the partial when it is not the block's first part
// (earlier boxes were dispatched first). VEC4 needs M's rows and every box start to
// be multiples of 4 (column, binding).
@compute @workgroup_size(WG)
fn mtv_partials(ids: Ids) {
    let linear = group_id(ids);
    let first_block = cp.r0 / cp.row_block;
    let box_end = cp.r0 + cp.nr;
    let blocks = (box_end + cp.row_block - 1u) / cp.row_block - first_block;
    if (linear >= cp.tiles * blocks) {
        return;
    }
    let tile = linear % cp.tiles;
    let rb = first_block + linear / cp.tiles;
    let unit = ids.lid % TILE_UNITS;
    let lane_ = ids.lid / TILE_UNITS;
    let cl = tile * TILE + unit * LANES; // the unit's first column, box-relative
    let block_start = rb * cp.row_block;
    let r_begin = max(block_start, cp.r0);
    let r_end = min(block_start + cp.row_block, box_end);
    var acc = V(0.0);
    if (cl < cp.nc) {
        let c = cp.c0 + cl;
        let a = c / cp.inner;
        let j = c - a * cp.inner;
        let step = ROW_LANES * cp.inner / LANES;
        var r = r_begin + lane_;
        var e = (a * cp.rj + r * cp.inner + j - cp.bind_start) / LANES;
        for (; r < r_end; r += ROW_LANES) {
            acc = fma(dload(cp_m[e]), V(cp_u[r - cp.u_start]), acc);
            e += step;
        }
    }
    red[ids.lid] = acc;
    workgroupBarrier();
    if (lane_ == 0u && cl < cp.nc) {
        var total = V(0.0);
        for (var k = 0u; k < ROW_LANES; k += 1u) {
            total += red[unit + k * TILE_UNITS];
        }
        for (var i = 0u; i < LANES; i += 1u) {
            let slot = rb * cp.cols + cp.c0 + cl + i - cp.p_start;
            var t = lane(total, i);
            if (r_begin != block_start) {
                t += cp_out[slot];
            }
            cp_out[slot] = t;
        }
    }
}

// ---- rows_dot: M v by rows, when M's rows are contiguous (axis 0) and short ---------
//
// `tpr` threads per row (rows.wgsl), each row read once: out[row] = vec4(M[row] . v,
// 0, 0, 0), the layout `dot_partials` gives for longer or strided rows.

@group(0) @binding(0) var<uniform> rd: RowParams;
@group(0) @binding(1) var<storage, read> rd_m: array<D>;
@group(0) @binding(2) var<storage, read> rd_v: array<V>;
@group(0) @binding(3) var<storage, read_write> rd_out: array<vec4<f32>>;

@compute @workgroup_size(RWG)
fn rows_dot(ids: Ids) {
    if (!rows_left(rd, ids)) {
        return;
    }
    let slot = row_slot(rd, ids);
    let t = rd.tpr;
    let base = slot.base;
    var acc = V(0.0);
    var i = slot.tl;
    if (ROW_BATCH) {
        var acc1 = V(0.0);
        for (; i + 3u * t < rd.len && slot.live; i += 4u * t) {
            let a = dload(rd_m[base + i]);
            let b = dload(rd_m[base + i + t]);
            let c = dload(rd_m[base + i + 2u * t]);
            let d = dload(rd_m[base + i + 3u * t]);
            acc = fma(a, rd_v[i], acc);
            acc1 = fma(b, rd_v[i + t], acc1);
            acc = fma(c, rd_v[i + 2u * t], acc);
            acc1 = fma(d, rd_v[i + 3u * t], acc1);
        }
        acc += acc1;
    }
    for (; i < rd.len && slot.live; i += t) {
        acc = fma(dload(rd_m[base + i]), rd_v[i], acc);
    }
    let total = row_sum(ids.lid, slot.tl, rd.tpr, vec4<f32>(hsum(acc), 0.0, 0.0, 0.0)).x;
    if (slot.tl == 0u && slot.live) {
        rd_out[rd.first_row + slot.row] = vec4<f32>(total, 0.0, 0.0, 0.0);
    }
}

// ---- mtv_combine: the column sums of the partials ---------------------------------
//
// A workgroup takes COMBINE_COLS consecutive columns; its WG / COMBINE_COLS lanes each
// add every lanes-th block of them (consecutive threads on consecutive columns), then
// the lanes are added in shared memory: the GPU has many loads in flight even for a
// few hundred columns of many blocks (the 50000 x 512 embedding).

const COMBINE_COLS: u32 = 16u;
const COMBINE_LANES: u32 = WG / COMBINE_COLS;

// Mirrors `CombineParams` in src/ops/spectral_norm.rs.
struct CombineParams {
    cols: u32,   // columns of the partials, [blocks, cols]
    blocks: u32,
    c0: u32,     // this dispatch's first column: `partials` and `out` are bound from it
    n: u32,      // columns in this dispatch
}

var<workgroup> comb: array<f32, WG>;

@group(0) @binding(0) var<uniform> mc: CombineParams;
@group(0) @binding(1) var<storage, read> mc_partials: array<f32>;
@group(0) @binding(2) var<storage, read_write> mc_out: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn mtv_combine(ids: Ids) {
    let col = ids.lid % COMBINE_COLS;
    let lane_ = ids.lid / COMBINE_COLS;
    let cl = group_id(ids) * COMBINE_COLS + col; // dispatch-relative
    var acc = 0.0;
    if (cl < mc.n) {
        for (var b = lane_; b < mc.blocks; b += COMBINE_LANES) {
            acc += mc_partials[b * mc.cols + cl];
        }
    }
    comb[ids.lid] = acc;
    workgroupBarrier();
    if (lane_ == 0u && cl < mc.n) {
        var total = 0.0;
        for (var k = 0u; k < COMBINE_LANES; k += 1u) {
            total += comb[col + k * COMBINE_COLS];
        }
        mc_out[cl] = vec4<f32>(total, 0.0, 0.0, 0.0);
    }
}

// ---- normalize / dot over a vector ------------------------------------------------
//
// Short vectors (parts = 0): one workgroup does everything. Long ones (the 50000 rows
// of an embedding) would leave a GPU idle that way, so `vec_partials` first reduces
// chunks of VEC_CHUNK elements in parallel, and `normalize` then runs one workgroup
// per chunk, each adding the (few) partials itself before normalizing its chunk.

const VEC_CHUNK: u32 = 4096u;

// Mirrors `VectorParams` in src/ops/spectral_norm.rs.
struct VectorParams {
    n: u32,
    eps: f32,
    pytorch: u32,     // 1: x / max(||x||, eps); 0: x / (||x|| + eps) (Chainer)
    write_sigma: u32, // 1: sigma[sigma_index] = ||x||^2 / denominator / factor
    factor: f32,
    sigma_index: u32,
    keep: u32,        // 1: also write the normalized vector to `keep`
    parts: u32,       // 0: one workgroup; else the partials of `vec_partials`
    dot: u32,         // vec_partials: 1 also sums x * vector (else vector is unused)
    chunk0: u32,      // wide vectors: the dispatch's first chunk; `raw` is bound from it
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> vp: VectorParams;
@group(0) @binding(1) var<storage, read> vp_raw: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> vp_vector: array<f32>;
@group(0) @binding(3) var<storage, read_write> vp_out: array<vec4<f32>>;

// Per chunk: (sum x^2, sum x * vector) of x = raw[i].x (vector: a dummy unless for a dot).
// A vector longer than a binding of vec4s is dispatched in runs of chunks: `raw` and
// `vector` are bound from chunk `chunk0`, the partials whole.
@compute @workgroup_size(WG)
fn vec_partials(ids: Ids) {
    let first = group_id(ids) * VEC_CHUNK;
    let offset = vp.chunk0 * VEC_CHUNK;
    let last = min(first + VEC_CHUNK, vp.n - offset);
    var part = vec2<f32>(0.0);
    for (var i = first + ids.lid; i < last; i += WG) {
        let x = vp_raw[i].x;
        var y = 0.0;
        if (vp.dot == 1u) {
            y = vp_vector[i];
        }
        part = fma(vec2<f32>(x), vec2<f32>(x, y), part);
    }
    // Squares reaching 2^64 (welford.wgsl): summed again, scaled, into z.
    var big = 0.0;
    if (!(part.x < BIG)) {
        for (var i = first + ids.lid; i < last; i += WG) {
            let x = vp_raw[i].x * DOWN;
            big = fma(x, x, big);
        }
        part.x = 0.0;
    }
    let total = tree_sum(ids.lid, vec4<f32>(part, big, 0.0));
    if (ids.lid == 0u) {
        vp_out[vp.chunk0 + group_id(ids)] = total;
    }
}

@group(0) @binding(0) var<uniform> np: VectorParams;
@group(0) @binding(1) var<storage, read> np_raw: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> np_out: array<f32>;
@group(0) @binding(3) var<storage, read_write> np_keep: array<f32>;
@group(0) @binding(4) var<storage, read_write> np_sigma: array<f32>;
@group(0) @binding(5) var<storage, read> np_partials: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn normalize(ids: Ids) {
    var part = 0.0;
    var big = 0.0; // squares summed scaled (welford.wgsl)
    var first = 0u;
    var last = np.n;
    if (np.parts == 0u) {
        for (var i = ids.lid; i < np.n; i += WG) {
            let x = np_raw[i].x;
            part = fma(x, x, part);
        }
        if (!(part < BIG)) {
            for (var i = ids.lid; i < np.n; i += WG) {
                let x = np_raw[i].x * DOWN;
                big = fma(x, x, big);
            }
            part = 0.0;
        }
    } else {
        for (var i = ids.lid; i < np.parts; i += WG) {
            part += np_partials[i].x;
            big += np_partials[i].z;
        }
        // Runs of chunks (see `vec_partials`): `raw`, `out` and `keep` bound from
        // chunk `chunk0`.
        first = group_id(ids) * VEC_CHUNK;
        last = min(first + VEC_CHUNK, np.n - np.chunk0 * VEC_CHUNK);
    }
    let sums = tree_sum(ids.lid, vec4<f32>(part, big, 0.0, 0.0)).xy;
    let ss = sums.x;
    let norm = scaled_sqrt(sums.x, sums.y);
    var denom = norm + np.eps;
    if (np.pytorch == 1u) {
        denom = max(norm, np.eps);
    }
    for (var i = first + ids.lid; i < last; i += WG) {
        let y = np_raw[i].x / denom;
        np_out[i] = y;
        if (np.keep == 1u) {
            np_keep[i] = y;
        }
    }
    if (np.write_sigma == 1u && ids.lid == 0u && group_id(ids) == 0u && np.chunk0 == 0u) {
        var sigma = ss / denom;
        if (!(sums.y == 0.0)) {
            sigma = norm * (norm / denom); // ||raw||^2 beyond f32
        }
        np_sigma[np.sigma_index] = sigma / np.factor;
    }
}

@group(0) @binding(0) var<uniform> dt: VectorParams;
@group(0) @binding(1) var<storage, read> dt_raw: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> dt_vector: array<f32>;
@group(0) @binding(3) var<storage, read_write> dt_sigma: array<f32>;
@group(0) @binding(4) var<storage, read> dt_partials: array<vec4<f32>>;

// sigma = vector . raw / factor (PyTorch's evaluation: u^T (M v) with u, v as stored).
@compute @workgroup_size(WG)
fn dot(ids: Ids) {
    var part = 0.0;
    if (dt.parts == 0u) {
        for (var i = ids.lid; i < dt.n; i += WG) {
            part = fma(dt_raw[i].x, dt_vector[i], part);
        }
    } else {
        for (var i = ids.lid; i < dt.parts; i += WG) {
            part += dt_partials[i].y;
        }
    }
    let total = tree_sum(ids.lid, vec4<f32>(part, 0.0, 0.0, 0.0)).x;
    if (ids.lid == 0u) {
        dt_sigma[dt.sigma_index] = total / dt.factor;
    }
}

// ---- scale: W * gamma / sigma (flag: use gamma) --------------------------------------

@group(0) @binding(0) var<uniform> sc: ElementParams;
@group(0) @binding(1) var<storage, read> sc_w: array<D>;
@group(0) @binding(2) var<storage, read> sc_sigma: array<f32>;
@group(0) @binding(3) var<storage, read> sc_gamma: array<f32>;
@group(0) @binding(4) var<storage, read_write> sc_out: array<D>;

@compute @workgroup_size(WG)
fn scale(ids: Ids) {
    var s = 1.0;
    if (sc.flag == 1u) {
        s = sc_gamma[0];
    }
    let k = s / usable_sigma(sc_sigma[0]);
    let range = units(sc, ids);
    for (var e = range.x; e < range.y; e += sc.stride) {
        sc_out[e] = dstore(dload(sc_w[e]) * k);
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
fn grad_coef(ids: Ids) {
    var part = 0.0;
    for (var i = ids.lid; i < gc.slices; i += WG) {
        part += gc_sums[i].y;
    }
    let d = tree_sum(ids.lid, vec4<f32>(part, 0.0, 0.0, 0.0)).x;
    if (ids.lid == 0u) {
        let sigma = gc_sigma[0];
        let su = usable_sigma(sigma);
        var s = 1.0;
        if (gc.use_gamma == 1u) {
            s = gc_gamma[0];
            gc_grad_gamma[0] = d / su;
        }
        var b = 0.0;
        if (!(abs(sigma) < MIN_NORMAL)) {
            b = s * d / (su * su * gc.factor);
        }
        gc_coef[0] = vec4<f32>(s / su, b, 0.0, 0.0);
    }
}

// ---- grad: grad_W = coef.x G - coef.y u[r] v[a * J + j] ----------------------------
//
// The element walk over [A, R, J] (rows = A, channels = R, inner = J): the cursor's
// channel is r and its row a; with VEC4 a unit has one r and v is read as vec4s.
// Where u or v pass a binding the host runs the pass on runs of rows of one a (or on
// pieces of one row), binding u and v from aligned elements: `flag` and `aux2` are
// the run's first row and column past them (units of u, and of v's array).

@group(0) @binding(0) var<uniform> gr: ElementParams;
@group(0) @binding(1) var<storage, read> gr_g: array<D>;
@group(0) @binding(2) var<storage, read> gr_u: array<f32>;
@group(0) @binding(3) var<storage, read> gr_v: array<V>;
@group(0) @binding(4) var<storage, read> gr_coef: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> gr_out: array<D>;

@compute @workgroup_size(WG)
fn grad(ids: Ids) {
    let k = gr_coef[0];
    for (var w = cursor_start(gr, ids); cursor_live(w); cursor_next(gr, &w)) {
        gr_out[w.e] = dstore(k.x * dload(gr_g[w.e]) - (k.y * gr_u[w.c + gr.flag]) * gr_v[w.o * gr.inner + w.j + gr.aux2 / LANES]);
    }
}
