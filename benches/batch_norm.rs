//! Batch Normalization: every op of the family on the workloads of issue 7, against the copy
//! kernel and the CPU reference, on the default adapter (see `benches/common`).
//!
//! ```text
//! cargo bench --bench batch_norm
//! ```

use criterion::{criterion_group, criterion_main, Criterion};

mod common;

fn bench(c: &mut Criterion) {
    common::bench_family(c, "batch_norm");
}

criterion_group!(benches, bench);
criterion_main!(benches);
