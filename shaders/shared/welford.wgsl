// welford.wgsl: Chan's parallel combine of Welford states vec4(mean, m2, count, scaled):
// never E[x^2] - E[x]^2, which loses every digit for data with a large common offset.
//
// Sums of squares that cannot overflow (issue 14). A thread (or a run of units) whose
// sum of squares reaches BIG = 2^64 sums its units again, each scaled by DOWN = 2^-70,
// an exact power of two; the result is kept in units of 2^140 beside the plain sums
// (the `big` part of a sum of squares; a Welford state's m2 flagged by `scaled` = 1).
// Squares of f32 values scaled so cannot overflow (below 2^116 each), and the units
// whose scaled squares underflow (below about 2 in magnitude) are worth less than
// 2^-50 of a sum that reached 2^64. Below BIG nothing changes: the results of
// ordinary data are bit for bit those of plain sums. Means are never scaled.

const BIG: f32 = 18446744073709551616.0; // 2^64
const DOWN: f32 = 8.470329472543003e-22; // 2^-70
const UP: f32 = 1.1805916207174113e21; // 2^70

// sqrt(small + big * 2^140), from a sum of squares kept in two parts (`big` 0 when no
// thread reached BIG). A NaN in `big` propagates: tested as `!(big == 0.0)`, since
// some compilers turn `!=` into an ordered comparison, false for NaN.
fn scaled_sqrt(small: f32, big: f32) -> f32 {
    if (!(big == 0.0)) {
        return sqrt(big + small * DOWN * DOWN) * UP;
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

fn chan(a: vec4<f32>, b: vec4<f32>) -> vec4<f32> {
    if (b.z == 0.0) {
        return a;
    }
    if (a.z == 0.0) {
        return b;
    }
    let n = a.z + b.z;
    let wb = b.z / n;
    let d = b.x - a.x;
    let mean = a.x + d * wb;
    if (a.w == 0.0 && b.w == 0.0) {
        let m2 = a.y + b.y + d * d * a.z * wb;
        if (m2 < BIG) {
            return vec4<f32>(mean, m2, n, 0.0);
        }
    }
    // In units of 2^140: the plain m2 of either side scaled down (exactly, by powers of
    // two), the difference of the means too.
    let ya = select(a.y, a.y * DOWN * DOWN, a.w == 0.0);
    let yb = select(b.y, b.y * DOWN * DOWN, b.w == 0.0);
    let ds = d * DOWN;
    return vec4<f32>(mean, ya + yb + ds * ds * a.z * wb, n, 1.0);
}

// Units a thread sums against one shift before folding them into its state: an outlier
// taken as the shift then spoils at most this many units' sums, whatever the order of
// the data (the result stays within a few ulps of the f32 floor).
const RESHIFT: u32 = 32u;

// The Welford state vec4(mean, m2, n, 0) of n values from their sums s1, s2 of x - shift.
fn welford_state(shift: f32, s1: f32, s2: f32, n: u32) -> vec4<f32> {
    if (n == 0u) {
        return vec4<f32>(0.0);
    }
    let nf = f32(n);
    let dm = s1 / nf;
    return vec4<f32>(shift + dm, max(s2 - s1 * dm, 0.0), nf, 0.0);
}

// `welford_state` with the squares summed scaled: s2s = sum ((x - shift) DOWN)^2; m2 in
// units of 2^140 (flagged).
fn welford_state_scaled(shift: f32, s1: f32, s2s: f32, n: u32) -> vec4<f32> {
    let nf = f32(n);
    let dm = s1 / nf;
    return vec4<f32>(shift + dm, max(s2s - (s1 * DOWN) * (dm * DOWN), 0.0), nf, 1.0);
}
