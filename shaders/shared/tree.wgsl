// tree.wgsl: workgroup reductions of one vec4 per invocation through shared memory: a
// sum, and Chan's combine of Welford states (mean, m2, count, scaled). No subgroup
// operations, so they run where there are none (GL) and are right for any subgroup
// size. `WG` is the importing kernel's workgroup size, a power of two.
#import welford

var<workgroup> tree: array<vec4<f32>, WG>;

fn tree_sum(lid: u32, value: vec4<f32>) -> vec4<f32> {
    tree[lid] = value;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            tree[lid] = tree[lid] + tree[lid + s];
        }
        workgroupBarrier();
    }
    let total = tree[0];
    workgroupBarrier();
    return total;
}

// Plain combines (`chan_plain`, welford.wgsl): a total that `needs_scaling` (rare) is
// redone by the kernel, in the invocation that writes it (no barrier there).
fn tree_welford(lid: u32, value: vec4<f32>) -> vec4<f32> {
    tree[lid] = value;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            tree[lid] = chan_plain(tree[lid], tree[lid + s]);
        }
        workgroupBarrier();
    }
    let total = tree[0];
    workgroupBarrier();
    return total;
}
