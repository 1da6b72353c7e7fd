//! Criterion over the whole benchmark suite (`wgnorm::bench`): one group per op
//! family, each with both bandwidth yardsticks on the same workloads (the copy kernel,
//! `copy/...`, and the driver's buffer copy, `driver_copy/...`), every op of the
//! family as kernel time (GPU timestamps, where the adapter has them) and end-to-end
//! time (recording, submission, completion), and the CPU reference. Throughput counts
//! the bytes each op must move at minimum ([`wgnorm::bench::Op::bytes_per_element`]).
//! The families come from the suite's registry: a new one needs nothing here.
//!
//! ```text
//! cargo bench --features bench                   # every family
//! cargo bench --features bench -- weight_norm    # one family (criterion's filter)
//! cargo bench --features bench -- --warm-up-time 1 --measurement-time 3   # short
//! ```

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use wgnorm::bench::{Case, Op, Prepared};
use wgnorm::{Context, DType, Recording};

/// One group per family of the suite (the copy is every group's yardstick).
fn bench(c: &mut Criterion) {
    let ctx = Context::headless().expect("an adapter (see README: install mesa-vulkan-drivers)");
    eprintln!("adapter: {}", ctx.info());
    if !Recording::new(&ctx).gpu_timed() {
        eprintln!("no timestamp queries inside encoders: kernel times skipped, end-to-end only");
    }
    let mut families: Vec<&str> = Op::all().iter().map(|op| op.family()).collect();
    families.dedup();
    for family in families.into_iter().filter(|&f| f != Op::COPY.family()) {
        bench_family(c, &ctx, family);
    }
}

/// Benches every op of `family` (see [`Op::family`]) on its workloads.
fn bench_family(c: &mut Criterion, ctx: &Context, family: &str) {
    let timestamps = Recording::new(ctx).gpu_timed();
    let ops: Vec<Op> = Op::all()
        .into_iter()
        .filter(|op| op.family() == family)
        .collect();
    let mut group = c.benchmark_group(family);
    group.sample_size(10);
    // Each workload in f32, then f16 and bf16 (data tensors; statistics stay f32).
    let workloads = ops[0]
        .workloads()
        .into_iter()
        .flat_map(|w| [DType::F32, DType::F16, DType::BF16].map(|d| w.clone().with_dtype(d)));
    for workload in workloads {
        let label = workload.label();
        let copy = Case {
            op: Op::COPY,
            workload: workload.clone(),
        };
        for case in std::iter::once(copy).chain(ops.iter().map(|&op| Case {
            op,
            workload: workload.clone(),
        })) {
            let mut prepared = Prepared::new(ctx, &case).expect("inputs");
            let name = case.op.name();
            group.throughput(Throughput::Bytes(case.min_bytes()));
            if timestamps {
                group.bench_function(BenchmarkId::new(format!("{name}/kernel"), &label), |b| {
                    b.iter_custom(|iters| kernel_time(&mut prepared, iters))
                });
            }
            group.bench_function(
                BenchmarkId::new(format!("{name}/end_to_end"), &label),
                |b| b.iter(|| prepared.run().expect("run")),
            );
            if case.op != Op::COPY && workload.dtype == DType::F32 {
                group.bench_function(
                    BenchmarkId::new(format!("{name}/cpu_reference"), &label),
                    |b| b.iter(|| prepared.run_reference().expect("reference")),
                );
            } else if case.op == Op::COPY && timestamps {
                // The second yardstick: the same copy by the driver.
                let driver = Case {
                    op: Op::DRIVER_COPY,
                    workload: workload.clone(),
                };
                let mut prepared = Prepared::new(ctx, &driver).expect("inputs");
                group.bench_function(BenchmarkId::new("driver_copy/kernel", &label), |b| {
                    b.iter_custom(|iters| kernel_time(&mut prepared, iters))
                });
            }
        }
    }
    group.finish();
}

/// GPU time of `iters` runs of `prepared` (timestamps around its passes).
fn kernel_time(prepared: &mut Prepared<'_>, iters: u64) -> Duration {
    (0..iters)
        .map(|_| {
            let (kernel, _) = prepared.run_timed().expect("run");
            Duration::from_secs_f64(kernel.expect("timestamps"))
        })
        .sum()
}

criterion_group!(benches, bench);
criterion_main!(benches);
