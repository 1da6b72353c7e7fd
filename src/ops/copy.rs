//! A plain copy kernel: the bandwidth yardstick the benchmarks compare every op with.

use crate::error::Result;
use crate::gpu::{Kernel, Recording, Tensor};

use super::element::{record_elementwise, Extra};
use super::layout::ChannelLayout;

/// Records a copy of `src` into a new tensor: reads and writes every element once,
/// with the same thread layout as the elementwise normalization passes (coalesced
/// vec4s on GPUs, runs on software adapters). The benchmarks report each op's
/// bandwidth as a fraction of this kernel's, or of the driver's buffer copy where
/// that is faster.
pub fn record_copy(rec: &mut Recording<'_>, src: &Tensor) -> Result<Tensor> {
    rec.context().check_tensors("copy", &[("source", src)])?;
    let dst = rec.output("copy", src.shape(), src.dtype())?;
    // One slice of every element: a length that is a multiple of 4 moves vec4s.
    let layout = ChannelLayout::new(src.shape(), None);
    record_elementwise(
        rec,
        Kernel::Copy,
        &layout,
        &[src],
        &[],
        &dst,
        Extra::default(),
    )?;
    Ok(dst)
}

/// [`record_copy`] into a new tensor that no destination of
/// [`Recording::write_next_output_to`] takes (an op's internal copies).
pub(crate) fn copy_internal(rec: &mut Recording<'_>, src: &Tensor) -> Result<Tensor> {
    let dst = Tensor::output_typed(rec.context(), src.shape(), src.dtype())?;
    rec.copy_buffer(src, &dst, src.bytes());
    Ok(dst)
}
