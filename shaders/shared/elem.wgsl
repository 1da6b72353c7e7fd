// elem.wgsl: the storage element of a kernel variant. Without defines a unit is one
// f32; with VEC4 (layouts whose rows are a multiple of 4 long, windows starting on a
// vec4) a unit is a vec4<f32>: a quarter of the loads, and a vec4 never straddles two
// slices. With CHANNELS_LAST too, the 4 lanes of a unit are 4 consecutive features
// (the slice index then counts groups of 4 features).

#ifdef VEC4
alias V = vec4<f32>;
const LANES: u32 = 4u;

fn hsum(v: V) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

fn lane0(v: V) -> f32 {
    return v.x;
}

fn from_lanes(v: vec4<f32>) -> V {
    return v;
}

fn lane(v: V, i: u32) -> f32 {
    return v[i];
}
#else
alias V = f32;
const LANES: u32 = 1u;

fn hsum(v: V) -> f32 {
    return v;
}

fn lane0(v: V) -> f32 {
    return v;
}

fn from_lanes(v: vec4<f32>) -> V {
    return v.x;
}

fn lane(v: V, i: u32) -> f32 {
    return v;
}
#endif

// The per-slice vec4s that the lanes of a unit of slice `s` read: one slice for every
// lane, or with CHANNELS_LAST features 4 s .. 4 s + 3. Load them, transpose, and
// `from_lanes(m[k])` is component k of each lane's values.
fn unit_slices(s: u32) -> vec4<u32> {
#ifdef CHANNELS_LAST
    return vec4<u32>(4u * s) + vec4<u32>(0u, 1u, 2u, 3u);
#else
    return vec4<u32>(s);
#endif
}
