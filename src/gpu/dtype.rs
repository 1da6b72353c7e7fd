//! Element types of tensors: f32, and the two half-precision formats of mixed-precision
//! training (IEEE f16 and bfloat16), stored two per 32-bit word.

/// The element type of a [`Tensor`](crate::Tensor).
///
/// Half-precision tensors are stored packed, two elements per 32-bit word (element `2k`
/// in the low half), so every adapter runs them, OpenGL included, with no
/// `shader-f16`: kernels widen to f32 on load, accumulate in f32, and round once to the
/// tensor's type on store (round to nearest even, as PyTorch's casts do). The default
/// is [`DType::F32`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    #[default]
    F32,
    /// IEEE binary16 (`torch.float16`, `half::f16`).
    F16,
    /// bfloat16: the upper half of an f32 (`torch.bfloat16`, `half::bf16`).
    BF16,
}

impl DType {
    /// Bytes per element: 4 or 2.
    pub const fn size(self) -> u64 {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Whether this is a half-precision type.
    pub const fn is_half(self) -> bool {
        !matches!(self, DType::F32)
    }

    /// The name used in shader module names, safetensors and messages: `f32`, `f16`,
    /// `bf16`.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// The spacing of 1.0 and the next value: 2^-23, 2^-10, 2^-7 (the tolerances of
    /// the half-precision golden cases are derived from it).
    pub const fn epsilon(self) -> f64 {
        match self {
            DType::F32 => f32::EPSILON as f64,
            DType::F16 => 0.0009765625,
            DType::BF16 => 0.0078125,
        }
    }

    /// `x` rounded to this type (nearest even) and widened back to f32.
    pub fn round(self, x: f32) -> f32 {
        match self {
            DType::F32 => x,
            DType::F16 => half::f16::from_f32(x).to_f32(),
            DType::BF16 => half::bf16::from_f32(x).to_f32(),
        }
    }

    /// Bytes of `len` elements, as stored (half types rounded up to whole words).
    pub(crate) const fn bytes(self, len: u64) -> u64 {
        match self {
            DType::F32 => len * 4,
            DType::F16 | DType::BF16 => len.div_ceil(2) * 4,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A host element type that tensors upload from and download to: `f32`, `half::f16`,
/// `half::bf16`.
pub trait Element: bytemuck::Pod + Send + Sync + 'static {
    /// The tensor type it maps to.
    const DTYPE: DType;
    /// Exact widening to f32.
    fn to_f32(self) -> f32;
    /// Rounding from f32 (nearest even).
    fn from_f32(x: f32) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Element for half::f16 {
    const DTYPE: DType = DType::F16;
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
}

impl Element for half::bf16 {
    const DTYPE: DType = DType::BF16;
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
}

/// `values` rounded to `dtype` (nearest even) as stored bytes, little-endian, two bytes
/// per half element (unpadded): the inverse of [`widen_bytes`] for values of the type.
pub(crate) fn encode_f32(dtype: DType, values: &[f32]) -> Vec<u8> {
    match dtype {
        DType::F32 => bytemuck::cast_slice(values).to_vec(),
        DType::F16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        DType::BF16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
    }
}

/// Widens stored bytes of `dtype` (as [`DType::bytes`] lays them out) to `len` f32s.
pub(crate) fn widen_bytes(dtype: DType, bytes: &[u8], len: usize) -> Vec<f32> {
    match dtype {
        DType::F32 => bytemuck::cast_slice::<u8, f32>(&bytes[..len * 4]).to_vec(),
        DType::F16 => bytes[..len * 2]
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        DType::BF16 => bytes[..len * 2]
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_rounding() {
        assert_eq!(DType::F16.bytes(3), 8);
        assert_eq!(DType::BF16.bytes(4), 8);
        assert_eq!(DType::F32.bytes(3), 12);
        // 1 + 2^-11 is halfway between two f16s: ties go to the even one, 1.0.
        assert_eq!(DType::F16.round(1.0 + 2f32.powi(-11)), 1.0);
        assert_eq!(DType::BF16.round(1.0 + 2f32.powi(-8)), 1.0);
        assert_eq!(
            DType::BF16.round(1.0 + 3.0 * 2f32.powi(-8)),
            1.0 + 2f32.powi(-6)
        );
    }
}
