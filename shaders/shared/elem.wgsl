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

// The storage of the op's data tensors (x, W, v, dy and the outputs computed from
// them): `D` holds one unit, `D4` four consecutive elements. In f32 modules they are
// `V` and vec4<f32>; in half modules (HALF, with F16 or BF16) four elements are two
// u32 words, element 2k in the low half. Kernels read data as `dload(x[i])` and write
// `y[i] = dstore(v)`: loads widen to f32, every statistic is accumulated in f32, and a
// store rounds once, to nearest even. Scalar units of half data do not exist: the
// host runs half tensors whose rows are not a multiple of 4 through f32 copies
// (src/ops/cast.rs), so the scalar modules keep f32 storage.
#ifdef HALF
alias D4 = vec2<u32>;

fn dload4(s: D4) -> vec4<f32> {
    return vec4<f32>(unpack_pair(s.x), unpack_pair(s.y));
}

fn dstore4(v: vec4<f32>) -> D4 {
    return vec2<u32>(pack_pair(v.xy), pack_pair(v.zw));
}

#ifdef BF16
// bfloat16 is the upper half of an f32.
fn unpack_pair(w: u32) -> vec2<f32> {
    return vec2<f32>(bitcast<f32>(w << 16u), bitcast<f32>(w & 0xffff0000u));
}

// Round to nearest even by integer arithmetic (WGSL leaves the rounding of its own
// conversions to the implementation); NaN stays a (quiet) NaN.
fn to_half(x: f32) -> u32 {
    let f = bitcast<u32>(x);
    let rounded = (f + 0x7fffu + ((f >> 16u) & 1u)) >> 16u;
    let nan = (f & 0x7fffffffu) > 0x7f800000u;
    return select(rounded, (f >> 16u) | 0x40u, nan);
}
#else
// IEEE binary16 bits to f32, exactly, by integer arithmetic (WGSL's unpack2x16float
// needs a capability not every adapter has): normal values re-biased, infinities and
// NaN kept, subnormals as m * 2^-24 (exact, and safe where f32 subnormals flush).
fn from_half(h: u32) -> f32 {
    let em = h & 0x7fffu;
    var bits = select((em << 13u) + (112u << 23u), (em << 13u) | 0x7f800000u, em >= 0x7c00u);
    bits = select(bits, bitcast<u32>(f32(i32(em)) * 5.9604644775390625e-8), em < 0x400u);
    return bitcast<f32>(bits | ((h & 0x8000u) << 16u));
}

fn unpack_pair(w: u32) -> vec2<f32> {
    return vec2<f32>(from_half(w & 0xffffu), from_half(w >> 16u));
}

// f32 to binary16 bits, rounded to nearest even (WGSL leaves pack2x16float's rounding
// to the implementation). Normal results drop 13 mantissa bits, ties to even, a carry
// reaching infinity; results below 2^-14 come from one f32 addition, which WGSL rounds
// correctly (F. Giesen's `float_to_half_fast3_rtne`); overflow gives infinity, NaN
// stays a quiet NaN.
fn to_half(x: f32) -> u32 {
    let f = bitcast<u32>(x);
    let a = f & 0x7fffffffu;
    let normal = (a + 0xc8000fffu + ((a >> 13u) & 1u)) >> 13u;
    let sub = bitcast<u32>(bitcast<f32>(a) + 0.5) - 0x3f000000u;
    var h = select(normal, sub, a < 0x38800000u);
    h = select(h, select(0x7c00u, 0x7e00u, a > 0x7f800000u), a >= 0x477ff000u);
    return ((f >> 16u) & 0x8000u) | h;
}
#endif

fn pack_pair(v: vec2<f32>) -> u32 {
    return to_half(v.x) | (to_half(v.y) << 16u);
}
#else
alias D4 = vec4<f32>;

fn dload4(s: D4) -> vec4<f32> {
    return s;
}

fn dstore4(v: vec4<f32>) -> D4 {
    return v;
}
#endif

#ifdef VEC4
alias D = D4;

fn dload(s: D) -> V {
    return dload4(s);
}

fn dstore(v: V) -> D {
    return dstore4(v);
}
#else
alias D = f32;

fn dload(s: D) -> V {
    return s;
}

fn dstore(v: V) -> D {
    return v;
}
#endif
