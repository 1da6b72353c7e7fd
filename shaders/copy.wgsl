// copy.wgsl: the bandwidth yardstick. Every benchmark figure is also reported as a
// fraction of this kernel's bandwidth on the same adapter: it reads and writes each
// element once, with the same thread layout as the elementwise normalization passes.

const WG: u32 = 256u;
const PER_THREAD: u32 = 4u;

// Mirrors `CopyParams` in src/ops/copy.rs.
struct CopyParams {
    count: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: CopyParams;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

@compute @workgroup_size(WG)
fn copy(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    // The same thread layout as the normalization passes: PER_THREAD consecutive
    // elements per thread.
    let first = ((wid.x + wid.y * nwg.x) * WG + lid) * PER_THREAD;
    let end = min(first + PER_THREAD, p.count);
    for (var e = first; e < end; e += 1u) {
        dst[e] = src[e];
    }
}

// Four elements per load and store, for tensors whose length is a multiple of 4
// (`count` then counts vec4s): each thread copies PER_THREAD consecutive vec4s.
@group(0) @binding(0) var<uniform> p4: CopyParams;
@group(0) @binding(1) var<storage, read> src4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> dst4: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn copy_vec4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let first = ((wid.x + wid.y * nwg.x) * WG + lid) * PER_THREAD;
    let end = min(first + PER_THREAD, p4.count);
    for (var e = first; e < end; e += 1u) {
        dst4[e] = src4[e];
    }
}
