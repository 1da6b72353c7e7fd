// rows.wgsl: row kernels. When every slice is one contiguous row short enough to stay
// in cache (`ROW_KERNEL_MAX_LEN` in src/ops/layout.rs), `tpr` threads reduce a row and
// then write it, the second read hitting the cache: one pass from memory. Short rows
// share a workgroup (RWG / tpr rows each), so no thread idles on a row of 64 elements.
// `len` and `skip` count units (elements, or vec4s in VEC4 variants).

#import grid
#import welford

// Whether a thread's loop over its units takes them four at a time, the four loads
// issued before any is used (a loop of load-then-use keeps one load in flight per
// thread; the tail goes one at a time). Set per adapter by the host.
override ROW_BATCH: bool = false;

// Threads per workgroup, set per adapter by the host (`RowGeometry` in
// src/ops/layout.rs: 256 on GPUs, 64 on software adapters).
override RWG: u32 = 256u;

// Mirrors `RowParams` in src/ops/layout.rs.
struct RowParams {
    rows: u32,      // rows in this window
    len: u32,       // units per row
    skip: u32,      // units of the window before its first row (alignment)
    tpr: u32,       // threads per row, a power of two dividing RWG
    first_row: u32, // the window's first row (index into per-row buffers)
    eps: f32,
    inv_n: f32,     // op-specific scalars
    inv_divisor: f32,
}

var<workgroup> row_red: array<vec4<f32>, RWG>;

struct RowSlot {
    row: u32,  // the thread's row, clamped to the window (see `live`)
    tl: u32,   // its index among the row's `tpr` threads
    live: bool,
    base: u32, // the row's first unit
}

fn row_slot(p: RowParams, ids: Ids) -> RowSlot {
    var r: RowSlot;
    let row = group_id(ids) * (RWG / p.tpr) + ids.lid / p.tpr;
    r.tl = ids.lid % p.tpr;
    r.live = row < p.rows;
    r.row = min(row, p.rows - 1u);
    r.base = p.skip + r.row * p.len;
    return r;
}

// Whether the workgroup has any row (uniform: an early return before the barriers).
fn rows_left(p: RowParams, ids: Ids) -> bool {
    return group_id(ids) * (RWG / p.tpr) < p.rows;
}

// Chan's combine (`chan_plain`) of the Welford states vec4(mean, m2, count, flag) of the
// `tpr` threads of each row; each of them gets its row's state. A row whose state
// `needs_scaling` (welford.wgsl: rare) is redone by the kernel, each of its threads
// alone over the whole row (no barrier: rows of one workgroup decide apart).
fn row_welford(lid: u32, tl: u32, tpr: u32, v: vec4<f32>) -> vec4<f32> {
    row_red[lid] = v;
    workgroupBarrier();
    for (var s = tpr / 2u; s > 0u; s >>= 1u) {
        if (tl < s) {
            row_red[lid] = chan_plain(row_red[lid], row_red[lid + s]);
        }
        workgroupBarrier();
    }
    let total = row_red[lid - tl];
    workgroupBarrier();
    return total;
}

// Sum over the `tpr` threads of each row; each of them gets its row's total.
fn row_sum(lid: u32, tl: u32, tpr: u32, v: vec4<f32>) -> vec4<f32> {
    row_red[lid] = v;
    workgroupBarrier();
    for (var s = tpr / 2u; s > 0u; s >>= 1u) {
        if (tl < s) {
            row_red[lid] += row_red[lid + s];
        }
        workgroupBarrier();
    }
    let total = row_red[lid - tl];
    workgroupBarrier();
    return total;
}
