//! # wgnorm
//!
//! GPU kernels, on wgpu and WGSL, for the normalizations deep-learning code applies to
//! weights and activations, validated against Chainer and PyTorch golden values:
//!
//! - [`WeightStandardization`]: `(W - mean) / sqrt(var + eps)` per output channel
//!   (Chainer's `link_hooks.WeightStandardization`, the labml.ai PyTorch version),
//!   forward and backward.
//! - [`SpectralNorm`]: `W / sigma(W)` with a persistent power-iteration vector
//!   (Chainer's `link_hooks.SpectralNormalization`, PyTorch's `spectral_norm`), forward
//!   and backward, `factor`, `use_gamma`, deconvolution axes, a converging sigma estimate.
//! - [`WeightNorm`]: `W = g * v / ||v||` (PyTorch's `weight_norm`, Jittor's `weightnorm`),
//!   forward, backward, decompose and fold back.
//! - [`BatchNorm`]: batch statistics over every axis but a feature axis, running
//!   averages in every framework's convention (PyTorch, Keras, Chainer, GoMLX), forward
//!   and backward, exact recomputed averages, mergeable statistics.
//!
//! [`BatchNorm::forward_sync`] and [`BatchNorm::backward_sync`] synchronize batch norm
//! across ranks (PyTorch's `SyncBatchNorm`) over a [`distributed::Collective`]: threads
//! with one context each, or MPI processes (feature `mpi`).
//!
//! [`hooks`] attach them to weights after Chainer's `LinkHook` (composition, backward
//! through the chain, a timer hook); [`state`] saves and loads their state under
//! PyTorch's names with safetensors.
//!
//! `wgnorm::bench`, behind the `bench` feature, is the benchmark suite (every op at
//! realistic sizes, the bytes each must move, kernel and end-to-end time against a
//! copy kernel and the driver's copy, the CPU reference and a peer, a report with SVG
//! plots) behind `cargo bench --features bench`, the `report` example and the burn peer
//! crate in `benches/peer`.
//!
//! Tensors are f32, f16 or bf16 ([`DType`]): half-precision weights, activations and
//! gradients are read and written by the kernels themselves (two per 32-bit word, on
//! every adapter), with f32 statistics and one rounding of each output.
//!
//! Every op runs on any wgpu adapter: hardware GPUs, Vulkan software (lavapipe) and
//! OpenGL (llvmpipe over EGL, which has no subgroup operations). Statistics use
//! Welford and Chan's combine; tensors larger than one storage binding are split, not
//! refused. A CPU reference in f64 ([`reference`](mod@reference)) validates every kernel.
//!
//! ```no_run
//! use ndarray::Array4;
//! use wgnorm::{Context, Tensor, WeightStandardization};
//!
//! # fn main() -> wgnorm::Result<()> {
//! let ctx = Context::headless()?; // honours WGPU_BACKEND, WGPU_ADAPTER_NAME
//! println!("adapter: {}", ctx.info());
//! let weight = Array4::<f32>::from_shape_fn((64, 32, 3, 3), |(o, i, y, x)| {
//!     ((o * 7 + i * 3 + y * 5 + x) % 11) as f32 - 5.0
//! });
//! let w = Tensor::from_array(&ctx, &weight)?;
//! let ws = WeightStandardization::default(); // Chainer: eps 1e-5, biased variance
//! let out = ws.forward(&ctx, &w)?.to_array(&ctx)?;
//! let cpu = wgnorm::reference::weight_standardization::forward(&ws, weight.view().into_dyn())?;
//! let worst = (&out - &cpu).iter().fold(0f32, |m, d| m.max(d.abs()));
//! assert!(worst < 1e-4);
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

// The README's usage example runs as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

#[cfg(feature = "bench")]
pub mod bench;
pub mod conformance;
pub mod distributed;
mod error;
pub mod gpu;
pub mod hooks;
pub mod ops;
pub mod reference;
pub mod rng;
pub mod shapes;
pub mod state;

/// The `half` crate's `f16` and `bf16`, the host types of half-precision tensors.
pub use half;

pub use distributed::{Collective, ThreadComm, ThreadGroup};
pub use error::{Error, Result};
pub use gpu::{
    AdapterReport, Context, ContextOptions, DType, Element, Readback, Recording, Tensor, Tuning,
};
pub use hooks::{
    register_global, register_global_named, SpectralNormHook, TimerHook, Weight, WeightHook,
    WeightNormHook, WeightStandardizationHook,
};
pub use ops::batch_norm::{
    BatchNorm, BatchNormForward, BatchNormGrads, BatchNormLayer, BatchNormMode, BatchNormState,
    ChannelStats, Mode, Momentum, PopulationStats, RunningVar,
};
pub use ops::spectral_norm::{
    SigmaEstimate, SpectralFlavor, SpectralNorm, SpectralNormGrads, SpectralNormOutput,
    SpectralNormState,
};
pub use ops::sync_batch_norm::SyncForward;
pub use ops::weight_norm::{NormAxes, WeightNorm, WeightNormGrads, WeightNormParams};
pub use ops::weight_standardization::{Variance, WeightStandardization, WeightStandardizationStep};
/// The wgpu this crate is built on, for callers that bring their own device.
pub use wgpu;
