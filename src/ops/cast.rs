//! Conversions between f32 and the half types on the GPU (`shaders/cast.wgsl`), and the
//! f32 detour of layouts whose kernels have no half variant.
//!
//! Half tensors are read and written by the vec4 and channels-last kernels directly
//! (`shaders/shared/elem.wgsl`). Layouts that need the scalar kernels (rows not a
//! multiple of 4 long) run those on f32 copies instead: the half inputs are widened
//! (exactly), the op runs in f32, and its output is rounded once into the half
//! tensor: the same values, at the cost of a copy.

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::gpu::{Bind, DType, Kernel, Recording, Spec, Tensor, WORKGROUP_SIZE};

// Mirrors `CastParams` in shaders/cast.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct CastParams {
    count: u32,
    _pad: [u32; 3],
}

/// Records a conversion of `src` to `dtype` into a new tensor of the same shape: f32 to
/// f16 or bf16 rounds to nearest even (PyTorch's `.to(torch.float16)`); half to f32 is
/// exact; between f16 and bf16 goes through f32 (one rounding, as the value is exact
/// in f32); the same type is a copy.
pub fn record_cast(rec: &mut Recording<'_>, src: &Tensor, dtype: DType) -> Result<Tensor> {
    rec.context().check_tensors("cast", &[("source", src)])?;
    let out = rec.output("cast", src.shape(), dtype)?;
    record_cast_into(rec, src, &out)?;
    Ok(out)
}

/// [`record_cast`] into a new tensor that no destination of
/// [`Recording::write_next_output_to`] takes (per-channel gradients of half parameters).
pub(crate) fn cast_internal(rec: &mut Recording<'_>, src: &Tensor, dtype: DType) -> Result<Tensor> {
    let out = Tensor::output_typed(rec.context(), src.shape(), dtype)?;
    record_cast_into(rec, src, &out)?;
    Ok(out)
}

/// Records the conversion of `src` into `dst` (same shape, any types).
pub(crate) fn record_cast_into(rec: &mut Recording<'_>, src: &Tensor, dst: &Tensor) -> Result<()> {
    if src.shape() != dst.shape() {
        return Err(Error::input(
            "cast",
            format!(
                "source shape {:?} and destination shape {:?} differ",
                src.shape(),
                dst.shape()
            ),
        ));
    }
    match (src.dtype(), dst.dtype()) {
        (a, b) if a == b => {
            rec.copy_buffer(src, dst, src.bytes());
            Ok(())
        }
        (DType::F32, half) => record_pass(rec, Kernel::CastNarrow, half, src, dst),
        (half, DType::F32) => record_pass(rec, Kernel::CastWiden, half, src, dst),
        (_, _) => {
            let wide = Tensor::output(rec.context(), src.shape())?;
            record_cast_into(rec, src, &wide)?;
            record_cast_into(rec, &wide, dst)
        }
    }
}

/// One cast kernel over `src` into `dst`, window by window (windows of whole words,
/// starting at multiples of the binding alignment, in elements of either type).
fn record_pass(
    rec: &mut Recording<'_>,
    kernel: Kernel,
    half: DType,
    src: &Tensor,
    dst: &Tensor,
) -> Result<()> {
    let limits = rec.context().limits;
    let len = src.len() as u64;
    let align = limits.align_elems.max(2);
    let chunk = (limits.max_binding_elems / align * align).max(align);
    let spec = Spec {
        dtype: half,
        ..Spec::default()
    };
    let mut start = 0;
    while start < len {
        let n = chunk.min(len - start);
        let params = CastParams {
            count: n as u32,
            _pad: [0; 3],
        };
        let words = n.div_ceil(2);
        rec.dispatch_spec(
            kernel,
            spec,
            &params,
            &[Bind::window(src, start, n), Bind::window(dst, start, n)],
            words.div_ceil(u64::from(WORKGROUP_SIZE)),
        )?;
        start += n;
    }
    Ok(())
}

/// `t` as f32: itself, or a widened copy recorded now.
pub(crate) fn widened(rec: &mut Recording<'_>, t: &Tensor) -> Result<Tensor> {
    if t.dtype() == DType::F32 {
        Ok(t.clone())
    } else {
        cast_internal(rec, t, DType::F32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_mirror_the_wgsl_struct() {
        use crate::gpu::kernels::mirror;
        mirror!("cast.f16", CastParams, [count]);
    }
}
