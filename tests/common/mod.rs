//! Helpers shared by the integration tests: a context, seeded data, comparisons.
#![allow(dead_code)]

use ndarray::{ArrayD, IxDyn};
use wgnorm::{Context, ContextOptions, Tuning};

/// The default adapter. Tests fail, never skip, when there is none: CI installs one.
pub fn ctx() -> Context {
    Context::headless().unwrap_or_else(|e| panic!("no GPU adapter for the tests: {e}"))
}

/// A context whose storage bindings are capped at `bytes`, so that small tensors take
/// the split-into-windows path of large ones, and whose thread layout is the one the
/// adapter would *not* pick (the GPU layout on lavapipe and llvmpipe, the software one
/// on a GPU), so that both layouts are checked on every adapter.
pub fn ctx_with_binding(bytes: u64) -> Context {
    let default = ctx().info().tuning;
    let other = if default.coalesced {
        Tuning {
            coalesced: false,
            reduce_item_elems: 16 * 1024,
        }
    } else {
        Tuning {
            coalesced: true,
            reduce_item_elems: 4 * 1024,
        }
    };
    Context::headless_with(ContextOptions {
        max_binding_bytes: Some(bytes),
        tuning: Some(other),
    })
    .unwrap_or_else(|e| panic!("no GPU adapter for the tests: {e}"))
}

/// The default adapter with the other thread layout (see [`ctx_with_binding`]) and no
/// cap on bindings.
pub fn ctx_other_layout() -> Context {
    ctx_with_binding(u64::MAX)
}

/// A small seeded generator (SplitMix64), so the data never depends on a crate version.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn array(&mut self, shape: &[usize], mean: f32, std: f32) -> ArrayD<f32> {
        ArrayD::from_shape_simple_fn(IxDyn(shape), || mean + std * self.normal())
    }
}

/// Asserts `|got - want| <= atol + rtol |want|` element-wise, reporting the first few
/// mismatches with their index.
#[track_caller]
pub fn assert_close(what: &str, got: &ArrayD<f32>, want: &ArrayD<f32>, rtol: f32, atol: f32) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    // NaN is never close: `within` is false for it.
    let within = |g: f32, w: f32| (g - w).abs() <= atol + rtol * w.abs();
    let bad: Vec<String> = got
        .iter()
        .zip(want.iter())
        .enumerate()
        .filter(|(_, (g, w))| !within(**g, **w))
        .take(5)
        .map(|(i, (g, w))| format!("[{i}] got {g}, want {w}"))
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: {} mismatches (rtol {rtol}, atol {atol}), first: {}",
        got.iter()
            .zip(want.iter())
            .filter(|(g, w)| !within(**g, **w))
            .count(),
        bad.join(", ")
    );
}
