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
