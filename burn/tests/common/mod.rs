//! What the burn crate's tests share.

use burn::tensor::Tensor;

/// A burn tensor's values, on the host.
pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

/// The largest absolute difference of two tensors of the same shape (or of host
/// values of the same length).
pub fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    max_diff_values(&values(a), &values(b))
}

/// [`max_diff`] of host values.
pub fn max_diff_values(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}
