// element.wgsl: the walk of an elementwise pass over [rows, channels, inner] units
// (rows = batch * outer), one thread PER_THREAD units `stride` apart.
//
// The host picks the stride per adapter (src/ops/element.rs): on GPUs it is the
// workgroup size, so consecutive invocations touch consecutive units (coalesced,
// several independent loads in flight per thread); on software adapters, which run
// invocations as CPU SIMD lanes and prefer runs, it is 1 (each thread a run of
// consecutive units) or the channel count of a channels-last layout (each thread one
// group of features over several rows). A thread locates its first unit with
// divisions, then moves by `stride` with the host's precomputed (row, channel,
// column) step and two carries: no division per unit.
#import grid

const PER_THREAD: u32 = 4u;

// Mirrors `ElementParams` in src/ops/element.rs.
struct ElementParams {
    count: u32,     // units in this window
    channels: u32,  // the layout, in units: [rows, channels, inner]
    inner: u32,
    outer: u32,     // rows per batch entry
    c_start: u32,   // the window's first unit is x[row_start, c_start, j_start]
    j_start: u32,
    row_start: u32,
    batched: u32,   // 1: slices are (row / outer) * channels + c (a batch over the rows)
    stride: u32,    // units between a thread's consecutive units
    step_j: u32,    // `stride` as a move: stride % inner,
    step_c: u32,    //   (stride / inner) % channels,
    step_r: u32,    //   stride / (inner * channels)
    flag: u32,      // op-specific
    _pad: u32,
    aux0: f32,      // op-specific scalars
    aux1: f32,
}

// A thread's position: its unit `e` (window-relative), that unit's place in the layout
// and its slice; `fresh` says the slice differs from the previous unit's, so per-slice
// values are loaded once per slice, not once per unit (a real cost on software
// adapters). Kernels loop as
//   for (var w = cursor_start(p, ids); cursor_live(p, w); cursor_next(p, &w)) { ... }
struct Cursor {
    e: u32,
    j: u32,
    c: u32,
    r: u32,
    k: u32,     // units visited so far
    slice: u32,
    fresh: bool,
}

fn cursor_slice(p: ElementParams, w: Cursor) -> u32 {
    if (p.batched == 1u) {
        return (w.r / p.outer) * p.channels + w.c;
    }
    return w.c;
}

fn cursor_start(p: ElementParams, ids: Ids) -> Cursor {
    let t = linear_id(ids);
    var w: Cursor;
    w.e = (t / p.stride) * p.stride * PER_THREAD + t % p.stride;
    let u = p.j_start + w.e;
    w.j = u % p.inner;
    let q = p.c_start + u / p.inner;
    w.c = q % p.channels;
    w.r = p.row_start + q / p.channels;
    w.k = 0u;
    w.slice = cursor_slice(p, w);
    w.fresh = true;
    return w;
}

fn cursor_live(p: ElementParams, w: Cursor) -> bool {
    return w.k < PER_THREAD && w.e < p.count;
}

fn cursor_next(p: ElementParams, w: ptr<function, Cursor>) {
    (*w).k += 1u;
    (*w).e += p.stride;
    (*w).j += p.step_j;
    (*w).c += p.step_c;
    (*w).r += p.step_r;
    if ((*w).j >= p.inner) {
        (*w).j -= p.inner;
        (*w).c += 1u;
    }
    if ((*w).c >= p.channels) {
        (*w).c -= p.channels;
        (*w).r += 1u;
    }
    let slice = cursor_slice(p, *w);
    (*w).fresh = slice != (*w).slice;
    (*w).slice = slice;
}
