//! CPU references on ndarray, accumulating in f64, written from the math rather than
//! transcribed from the shaders. They validate every kernel in the tests, and a user
//! without a GPU can call them directly.

pub mod batch_norm;
pub mod spectral_norm;
pub mod weight_norm;
pub mod weight_standardization;
