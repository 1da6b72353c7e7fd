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

// Units per thread, set per adapter by the host (`Tuning::per_thread`): fewer on GPUs,
// where other threads hide a load's latency, than on CPUs, where a thread's setup
// (two divisions) is shared by its units.
override PER_THREAD: u32 = 4u;

// Set per dispatch by the host (`Spec` in src/gpu/kernels.rs), so that the paths a
// layout does not take are compiled out. LAYOUT: 0 runs (stride 1), 1 coalesced
// (stride WG), 2 any stride, 3 channels last a row at a time (inner = 1, stride =
// channels). BATCHED: slices are a * channels + c over a batch of
// rows (Jittor's weight norm over a middle axis); else a is always 0.
override LAYOUT: u32 = 0u;
override BATCHED: bool = false;

// Mirrors `ElementParams` in src/ops/element.rs.
struct ElementParams {
    count: u32,     // units in this window
    channels: u32,  // the layout, in units: [batch, outer, channels, inner]
    inner: u32,
    outer: u32,
    c_start: u32,   // the window's first unit is x[a_start, o_start, c_start, j_start]
    j_start: u32,
    o_start: u32,
    a_start: u32,
    stride: u32,    // units between a thread's consecutive units
    step_j: u32,    // `stride` as a move in (a, o, c, j): stride % inner,
    step_c: u32,    //   (stride / inner) % channels,
    step_o: u32,    //   (stride / (inner * channels)) % outer,
    step_a: u32,    //   stride / (inner * channels * outer)
    step_fresh: u32, // 1: every step may land in another slice
    flag: u32,      // op-specific
    aux0: f32,      // op-specific scalars
    aux1: f32,
    skip: u32,      // units bound before the window's first unit (a slice group's rows)
    aux2: u32,      // op-specific
}

// A thread's position: its unit `e` (window-relative), that unit's place in the layout
// and its slice `a * channels + c`; `fresh` says the slice differs from the previous
// unit's, so per-slice values are loaded once per slice, not once per unit. Kernels
// loop as
//   for (var w = cursor_start(p, ids); cursor_live(w); cursor_next(p, &w)) { ... }
// The steps are branch-free and division-free: software adapters run invocations as
// SIMD lanes, where every branch costs both sides and a division tens of instructions.
struct Cursor {
    e: u32,
    end: u32,   // past the thread's last unit (PER_THREAD units, or the window's end)
    j: u32,
    c: u32,
    o: u32,
    a: u32,
    slice: u32,
    fresh: bool,
}

// The thread's units: `first`, `first + stride`, ... below `end`, as indices into the
// window's bindings (`skip` included); runs (stride 1) and the coalesced layout
// (stride WG) need no division.
fn units(p: ElementParams, ids: Ids) -> vec2<u32> {
    var first: u32;
    if (LAYOUT == 0u) {
        first = linear_id(ids) * PER_THREAD;
    } else if (LAYOUT == 1u) {
        first = group_id(ids) * (WG * PER_THREAD) + ids.lid;
    } else {
        let t = linear_id(ids);
        first = (t / p.stride) * p.stride * (PER_THREAD - 1u) + t;
    }
    return vec2<u32>(first, min(first + PER_THREAD * p.stride, p.count)) + p.skip;
}

fn cursor_start(p: ElementParams, ids: Ids) -> Cursor {
    var w: Cursor;
    var r: u32;
    if (LAYOUT == 3u) {
        // Channels last (inner = 1), a row per step: the thread's row block b and
        // feature group from one division; the group's offset from the window's first
        // feature wraps at most once.
        let t = linear_id(ids);
        let b = t / p.channels;
        let g = t - b * p.channels;
        let first = b * p.channels * PER_THREAD + g;
        w.e = first + p.skip;
        w.end = min(first + PER_THREAD * p.stride, p.count) + p.skip;
        let cg = p.c_start + g;
        let wrap = cg >= p.channels;
        w.j = 0u;
        w.c = select(cg, cg - p.channels, wrap);
        r = p.o_start + b * PER_THREAD + u32(wrap);
    } else {
        let range = units(p, ids);
        w.e = range.x;
        w.end = range.y;
        // Located from the window's first unit.
        let u = p.j_start + w.e - p.skip;
        let qj = u / p.inner;
        w.j = u - qj * p.inner;
        let q = p.c_start + qj;
        let qc = q / p.channels;
        w.c = q - qc * p.channels;
        r = p.o_start + qc;
    }
    if (BATCHED) {
        let qo = r / p.outer;
        w.o = r - qo * p.outer;
        w.a = p.a_start + qo;
    } else {
        w.o = r;
        w.a = 0u;
    }
    w.slice = w.a * p.channels + w.c;
    w.fresh = true;
    return w;
}

fn cursor_live(w: Cursor) -> bool {
    return w.e < w.end;
}

fn cursor_next(p: ElementParams, w: ptr<function, Cursor>) {
    if (LAYOUT == 0u) {
        // Runs (stride 1): an odometer, a unit at a time; the fewest operations per
        // unit, which is what a software adapter's SIMD lanes pay for.
        (*w).e += 1u;
        let j = (*w).j + 1u;
        let cj = j == p.inner;
        (*w).j = select(j, 0u, cj);
        let c = (*w).c + u32(cj);
        let cc = c == p.channels;
        (*w).c = select(c, 0u, cc);
        (*w).o += u32(cc);
        if (BATCHED) {
            let co = (*w).o == p.outer;
            (*w).o = select((*w).o, 0u, co);
            (*w).a += u32(co);
        }
        (*w).fresh = cj;
    } else if (LAYOUT == 3u) {
        // A row at a time (stride = channels * inner, channels last on a software
        // adapter): the same slice, the next row.
        (*w).e += p.stride;
        (*w).o += 1u;
        if (BATCHED) {
            let co = (*w).o == p.outer;
            (*w).o = select((*w).o, 0u, co);
            (*w).a += u32(co);
        }
        (*w).fresh = BATCHED;
    } else {
        (*w).e += p.stride;
        let j = (*w).j + p.step_j;
        let cj = j >= p.inner;
        (*w).j = select(j, j - p.inner, cj);
        let c = (*w).c + p.step_c + u32(cj);
        let cc = c >= p.channels;
        (*w).c = select(c, c - p.channels, cc);
        let o = (*w).o + p.step_o + u32(cc);
        if (BATCHED) {
            let co = o >= p.outer;
            (*w).o = select(o, o - p.outer, co);
            (*w).a += p.step_a + u32(co);
        } else {
            (*w).o = o;
        }
        // The slice changes with c, hence with a carry out of j or a step of channels;
        // a step that moves only a (batched layouts) is counted in `step_fresh`.
        (*w).fresh = cj || p.step_fresh == 1u;
    }
    if (BATCHED) {
        (*w).slice = (*w).a * p.channels + (*w).c;
    } else {
        (*w).slice = (*w).c;
    }
}
