// welford.wgsl: Chan's parallel combine of Welford states vec4(mean, m2, count, flag):
// never E[x^2] - E[x]^2, which loses every digit for data with a large common offset.
//
// Sums of squares that cannot overflow (issue 14). Values are summed as they always
// were; where a sum of squares reaches BIG = 2^64 (values beyond about 1e9 in
// magnitude, far past any trained weight), the values are summed again, each scaled by
// DOWN = 2^-70, an exact power of two, and that sum is kept in units of 2^140:
// - plain sums of squares (weight norm, spectral norm's vectors, backward sums) keep
//   it as a second part beside the plain one (`scaled_sqrt`); a thread whose own sum
//   reached BIG sums its units again;
// - Welford states keep m2 in those units and set the flag (w = 1). A run whose
//   squares reached BIG is flagged by `welford_state`, plain combines carry the flag
//   (`chan_plain`), and a row, item or block whose total `needs_scaling` is redone
//   scaled by the invocation that writes it, alone (no extra barrier, no extra work
//   on the common path).
// Squares of f32 values scaled so cannot overflow (below 2^116 each), and values whose
// scaled squares underflow (below about 2 in magnitude) are worth less than 2^-50 of a
// sum that reached 2^64. Below BIG the arithmetic is the plain one. Means are never
// scaled. (A flagged state is valid only as the output of a redo: the trees' outputs.)

const BIG: f32 = 18446744073709551616.0; // 2^64
const DOWN: f32 = 8.470329472543003e-22; // 2^-70
// Never written as DOWN * DOWN: a driver may fold that to 2^-140, subnormal, and flush
// it to zero; ldexp by this is one exact step.
const DOWN2_EXP: i32 = -140;

// sqrt(small + big * 2^140), from a sum of squares kept in two parts (`big` 0 when no
// thread reached BIG). A NaN in `big` propagates: tested as `!(big == 0.0)`, since
// some compilers turn `!=` into an ordered comparison, false for NaN.
fn scaled_sqrt(small: f32, big: f32) -> f32 {
    if (!(big == 0.0)) {
        return sqrt(big + ldexp(small, DOWN2_EXP)) * 1.1805916207174113e21; // * 2^70
    }
    return sqrt(small);
}

// 1 / sqrt(m2 * inv_divisor + eps) of a Welford state, scaled or not (eps is below
// f32's resolution of a variance that reached 2^64 / n, and dropped there).
fn welford_rstd(st: vec4<f32>, inv_divisor: f32, eps: f32) -> f32 {
    if (st.w != 0.0) {
        return DOWN / sqrt(max(st.y, 0.0) * inv_divisor);
    }
    return 1.0 / sqrt(max(st.y, 0.0) * inv_divisor + eps);
}

// Chan's combine of two plain states: the formula of every thread's runs and every
// tree level, as before scaled sums existed. The flag is carried (max), not honoured: a
// result that needs scaling (flagged, or m2 past 2^64) is redone scaled by the caller,
// so the common path costs what it did.
fn chan_plain(a: vec4<f32>, b: vec4<f32>) -> vec4<f32> {
    if (b.z == 0.0) {
        return a;
    }
    if (a.z == 0.0) {
        return b;
    }
    let n = a.z + b.z;
    let wb = b.z / n;
    let d = b.x - a.x;
    return vec4<f32>(a.x + d * wb, a.y + b.y + d * d * a.z * wb, n, max(a.w, b.w));
}

// Whether a state from plain combines must be redone scaled: flagged (a run whose
// squares reached 2^64, or a scaled state mixed in), or m2 past 2^64 (or NaN).
fn needs_scaling(st: vec4<f32>) -> bool {
    return st.w != 0.0 || !(st.y < BIG);
}

// A valid state (plain or scaled) in units of 2^140, flagged.
fn to_scaled(st: vec4<f32>) -> vec4<f32> {
    if (st.w != 0.0) {
        return st;
    }
    return vec4<f32>(st.x, ldexp(st.y, DOWN2_EXP), st.z, 1.0);
}

// Chan's combine of valid states, plain or scaled, in units of 2^140 (flagged).
fn chan_scaled(a: vec4<f32>, b: vec4<f32>) -> vec4<f32> {
    if (b.z == 0.0) {
        return to_scaled(a);
    }
    if (a.z == 0.0) {
        return to_scaled(b);
    }
    let n = a.z + b.z;
    let wb = b.z / n;
    let d = b.x - a.x;
    let ds = d * DOWN;
    return vec4<f32>(a.x + d * wb, to_scaled(a).y + to_scaled(b).y + ds * ds * a.z * wb, n, 1.0);
}

// Chan's combine of valid states, plain or scaled (one thread's loop over partials):
// plain while that suffices, else scaled.
fn chan(a: vec4<f32>, b: vec4<f32>) -> vec4<f32> {
    let r = chan_plain(a, b);
    if (!needs_scaling(r)) {
        return r;
    }
    return chan_scaled(a, b);
}

// Units a thread sums against one shift before folding them into its state: an outlier
// taken as the shift then spoils at most this many units' sums, whatever the order of
// the data (the result stays within a few ulps of the f32 floor).
const RESHIFT: u32 = 32u;

// The Welford state vec4(mean, m2, n, 0) of n values from their sums s1, s2 of x - shift,
// flagged (w = 1: not valid, to be redone scaled) when s2 reached 2^64.
fn welford_state(shift: f32, s1: f32, s2: f32, n: u32) -> vec4<f32> {
    if (n == 0u) {
        return vec4<f32>(0.0);
    }
    let nf = f32(n);
    let dm = s1 / nf;
    return vec4<f32>(shift + dm, max(s2 - s1 * dm, 0.0), nf, select(1.0, 0.0, s2 < BIG));
}

// `welford_state` with m2 from the scaled sums q1 = sum d, q2 = sum d^2 of
// d = (x - shift) DOWN, in units of 2^140 (flagged); the mean from the plain s1. (No
// product of two scaled values: a driver that reassociates it could overflow.)
fn welford_state_scaled(shift: f32, s1: f32, q1: f32, q2: f32, n: u32) -> vec4<f32> {
    let nf = f32(n);
    return vec4<f32>(shift + s1 / nf, max(q2 - q1 * (q1 / nf), 0.0), nf, 1.0);
}
