// grid.wgsl: linear ids of a dispatch. Past 65535 workgroups the host spills the grid
// over y (`Context::grid` in src/gpu/recording.rs), so ids are `wid.x + wid.y * nwg.x`
// and every kernel bounds-checks them. `WG`, the workgroup size, is the importing
// kernel's own constant.

fn group_id(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

fn linear_id(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return group_id(wid, nwg) * WG + lid;
}
