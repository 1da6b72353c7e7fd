//! Helpers shared by the integration tests: a context, seeded data, comparisons.
#![allow(dead_code)]

use ndarray::ArrayD;
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
        Tuning::software()
    } else {
        Tuning::gpu()
    };
    Context::headless_with(ContextOptions {
        max_binding_bytes: Some(bytes),
        tuning: Some(other),
    })
    .unwrap_or_else(|e| panic!("no GPU adapter for the tests: {e}"))
}

/// Contexts with storage bindings capped at `bytes`, in both thread layouts (the
/// adapter's own and the other one).
pub fn ctx_with_binding_both_layouts(bytes: u64) -> [Context; 2] {
    let own = Context::headless_with(ContextOptions {
        max_binding_bytes: Some(bytes),
        tuning: None,
    })
    .unwrap_or_else(|e| panic!("no GPU adapter for the tests: {e}"));
    [own, ctx_with_binding(bytes)]
}

/// The default adapter with the other thread layout (see [`ctx_with_binding`]) and no
/// cap on bindings.
pub fn ctx_other_layout() -> Context {
    ctx_with_binding(u64::MAX)
}

/// The crate's seeded generator (SplitMix64, Box-Muller), shared with the library.
#[allow(unused_imports)]
pub use wgnorm::rng::Rng;

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

/// `||got - want|| / ||want||` in f64 (2-norms over every element).
pub fn relative_error(got: &ArrayD<f32>, want: &ArrayD<f32>) -> f64 {
    assert_eq!(got.shape(), want.shape());
    let sq = |a: f32| f64::from(a) * f64::from(a);
    let err: f64 = got.iter().zip(want.iter()).map(|(g, w)| sq(g - w)).sum();
    let norm: f64 = want.iter().map(|&w| sq(w)).sum();
    (err / norm).sqrt()
}

/// Contexts the property tests draw from, made once per test binary: the default
/// adapter, and bindings capped at 16 KiB and at 64 KiB with the other thread layout
/// (every split path, both layouts).
pub fn property_contexts() -> &'static [Context] {
    static CONTEXTS: std::sync::OnceLock<Vec<Context>> = std::sync::OnceLock::new();
    CONTEXTS.get_or_init(|| {
        vec![
            ctx(),
            ctx_with_binding(16 * 1024),
            ctx_with_binding(64 * 1024),
        ]
    })
}

/// Cases per property: `PROPTEST_CASES` where set, else `default` (kept small: every
/// case runs on a software adapter in CI).
pub fn property_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Shapes for the property tests: a first dimension up to 47, a second below `second`,
/// up to two more below `rest` (sizes that are not multiples of a workgroup, a vec4 or
/// a subgroup).
pub fn property_shape(
    second: usize,
    rest: usize,
) -> impl proptest::strategy::Strategy<Value = Vec<usize>> {
    use proptest::prelude::*;
    let dims = (
        1usize..48,
        1usize..second,
        prop::collection::vec(1usize..rest, 0..3),
    );
    dims.prop_map(|(a, b, more)| {
        let mut shape = vec![a, b];
        shape.extend(more);
        shape
    })
}
