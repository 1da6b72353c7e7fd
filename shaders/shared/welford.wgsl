// welford.wgsl: Chan's parallel combine of Welford states vec4(mean, m2, count, 0):
// never E[x^2] - E[x]^2, which loses every digit for data with a large common offset.

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
    return vec4<f32>(a.x + d * wb, a.y + b.y + d * d * a.z * wb, n, 0.0);
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
