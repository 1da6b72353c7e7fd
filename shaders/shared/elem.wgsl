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

// Per-slice values (a vec4 per slice) as seen by the lanes of a unit. Channels last
// the 4 lanes are 4 features, so a unit needs 4 vec4s, transposed: `Lanes` is a
// matrix whose column k holds component k of each feature's values. Otherwise every
// lane has the unit's one slice and `Lanes` is that slice's vec4, kept as 4 floats
// (registers matter on SIMD software adapters) and splat where used.
#ifdef CHANNELS_LAST
alias Lanes = mat4x4<f32>;

fn lanes_of(f0: vec4<f32>, f1: vec4<f32>, f2: vec4<f32>, f3: vec4<f32>) -> Lanes {
    return transpose(mat4x4<f32>(f0, f1, f2, f3));
}

fn lane_value(m: Lanes, k: u32) -> V {
    return m[k];
}
#else
alias Lanes = vec4<f32>;

fn lane_value(m: Lanes, k: u32) -> V {
    return V(m[k]);
}
#endif
