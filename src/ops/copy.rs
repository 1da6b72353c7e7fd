//! A plain copy kernel: the bandwidth yardstick the benchmarks compare every op with.

use bytemuck::{Pod, Zeroable};

use crate::error::Result;
use crate::gpu::{Bind, Kernel, Recording, Tensor, ELEMENTS_PER_WORKGROUP};

use super::channel_stats::{element_windows, ChannelLayout};

// Mirrors `CopyParams` in shaders/copy.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct CopyParams {
    count: u32,
    _pad: [u32; 3],
}

/// Records a copy of `src` into a new tensor: reads and writes every element once,
/// with the same thread layout as the elementwise normalization passes. The
/// benchmarks report each op's bandwidth as a fraction of this kernel's.
pub fn record_copy(rec: &mut Recording<'_>, src: &Tensor) -> Result<Tensor> {
    let ctx = rec.context();
    let dst = Tensor::zeros(ctx, src.shape())?;
    let layout = ChannelLayout::new(src.shape(), None);
    // Windows start aligned; with a length that is a multiple of 4, every window is
    // too, and the copy moves vec4s.
    let (kernel, unit) = if layout.len().is_multiple_of(4) {
        (Kernel::CopyVec4, 4)
    } else {
        (Kernel::Copy, 1)
    };
    for w in element_windows(layout, &ctx.limits) {
        let count = w.len / unit;
        rec.dispatch(
            kernel,
            &CopyParams {
                count: count as u32,
                _pad: [0; 3],
            },
            &[
                Bind::window(src.buffer(), w.start, w.len),
                Bind::window(dst.buffer(), w.start, w.len),
            ],
            count.div_ceil(ELEMENTS_PER_WORKGROUP),
        )?;
    }
    Ok(dst)
}
