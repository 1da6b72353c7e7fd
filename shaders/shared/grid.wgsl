// grid.wgsl: the ids of an invocation, and linear ids of a dispatch. Past 65535
// workgroups the host spills the grid over y (`Context::grid` in
// src/gpu/recording.rs), so ids are `wid.x + wid.y * nwg.x` and every kernel
// bounds-checks them. `WG`, the workgroup size, is the importing kernel's constant.

struct Ids {
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
}

fn group_id(ids: Ids) -> u32 {
    return ids.wid.x + ids.wid.y * ids.nwg.x;
}

fn linear_id(ids: Ids) -> u32 {
    return group_id(ids) * WG + ids.lid;
}
