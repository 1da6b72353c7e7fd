// cast.wgsl: conversions between f32 and the half types, a 32-bit word of half data
// (two elements) per invocation, so that no two invocations write the same word.
// `widen` turns half data into f32, `narrow` rounds f32 to half (nearest even, the
// codec of shaders/shared/elem.wgsl). They serve users' casts and the layouts whose
// kernels have no half variant (rows not a multiple of 4 long): those run on f32
// copies, rounded once at the end. Only the modules `cast.f16` and `cast.bf16` are
// dispatched; the f32 module exists so that the kernel list can name one.

const WG: u32 = 256u;

#import grid
#import elem

#ifndef HALF
fn unpack_pair(w: u32) -> vec2<f32> {
    return vec2<f32>(bitcast<f32>(w), 0.0);
}

fn pack_pair(v: vec2<f32>) -> u32 {
    return bitcast<u32>(v.x);
}
#endif

// Mirrors `CastParams` in src/ops/cast.rs.
struct CastParams {
    count: u32, // elements in this window (the window starts on an even element)
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> wp: CastParams;
@group(0) @binding(1) var<storage, read> w_half: array<u32>;
@group(0) @binding(2) var<storage, read_write> w_out: array<f32>;

@compute @workgroup_size(WG)
fn cast_widen(ids: Ids) {
    let k = linear_id(ids);
    let e = 2u * k;
    if (e >= wp.count) {
        return;
    }
    let v = unpack_pair(w_half[k]);
    w_out[e] = v.x;
    if (e + 1u < wp.count) {
        w_out[e + 1u] = v.y;
    }
}

@group(0) @binding(0) var<uniform> np: CastParams;
@group(0) @binding(1) var<storage, read> n_in: array<f32>;
@group(0) @binding(2) var<storage, read_write> n_half: array<u32>;

@compute @workgroup_size(WG)
fn cast_narrow(ids: Ids) {
    let k = linear_id(ids);
    let e = 2u * k;
    if (e >= np.count) {
        return;
    }
    // The padding half of an odd-length tensor's last word is written as zero.
    let hi = select(0.0, n_in[min(e + 1u, np.count - 1u)], e + 1u < np.count);
    n_half[k] = pack_pair(vec2<f32>(n_in[e], hi));
}
