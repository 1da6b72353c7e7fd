// copy.wgsl: the bandwidth yardstick. Every benchmark figure is also reported as a
// fraction of this kernel's bandwidth on the same adapter: it reads and writes each
// unit once, with the same thread layout as the elementwise normalization passes
// (element.wgsl: coalesced on GPUs, runs on software adapters).

const WG: u32 = 256u;

#import elem
#import element

@group(0) @binding(0) var<uniform> p: ElementParams;
@group(0) @binding(1) var<storage, read> src: array<D>;
@group(0) @binding(2) var<storage, read_write> dst: array<D>;

@compute @workgroup_size(WG)
fn copy(ids: Ids) {
    let range = units(p, ids);
    for (var e = range.x; e < range.y; e += p.stride) {
        dst[e] = src[e]; // storage as is: a half tensor moves half the bytes
    }
}
