// copy.wgsl: the bandwidth yardstick. Every benchmark figure is also reported as a
// fraction of this kernel's bandwidth on the same adapter: it reads and writes each
// unit once, with the same thread layout as the elementwise normalization passes
// (element.wgsl: coalesced on GPUs, runs on software adapters).

const WG: u32 = 256u;

#import elem
#import element

@group(0) @binding(0) var<uniform> p: ElementParams;
@group(0) @binding(1) var<storage, read> src: array<V>;
@group(0) @binding(2) var<storage, read_write> dst: array<V>;

@compute @workgroup_size(WG)
fn copy(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    var e = cursor_start(p, wid, nwg, lid).e;
    for (var k = 0u; k < PER_THREAD && e < p.count; k += 1u) {
        dst[e] = src[e];
        e += p.stride;
    }
}
