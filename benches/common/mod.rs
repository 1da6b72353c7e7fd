//! The criterion driver the bench targets share: one group per op family, each with
//! both bandwidth yardsticks on the same workloads (the copy kernel, `copy/...`, and
//! the driver's buffer copy, `driver_copy/...`), every op of the
//! family as kernel time (GPU timestamps, where the adapter has them) and end-to-end
//! time (recording, submission, completion), and the CPU reference. Throughput counts
//! the bytes each op must move at minimum ([`wgnorm::bench::Op::bytes_per_element`]).
//!
//! Short runs: `cargo bench --features bench --bench <name> -- --warm-up-time 1 --measurement-time 3`.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use wgnorm::bench::{Case, Op, Prepared};
use wgnorm::{Context, Recording};

/// Benches every op of `family` (see [`Op::family`]) on its workloads.
pub fn bench_family(c: &mut Criterion, family: &str) {
    let ctx = Context::headless().expect("an adapter (see README: install mesa-vulkan-drivers)");
    eprintln!("adapter: {}", ctx.info());
    let timestamps = Recording::new(&ctx).gpu_timed();
    if !timestamps {
        eprintln!("no timestamp queries inside encoders: kernel times skipped, end-to-end only");
    }
    let ops: Vec<Op> = Op::ALL
        .into_iter()
        .filter(|op| op.family() == family)
        .collect();
    let mut group = c.benchmark_group(family);
    group.sample_size(10);
    for workload in ops[0].workloads() {
        let copy = Case {
            op: Op::Copy,
            workload: workload.clone(),
        };
        for case in std::iter::once(copy).chain(ops.iter().map(|&op| Case {
            op,
            workload: workload.clone(),
        })) {
            let mut prepared = Prepared::new(&ctx, &case).expect("inputs");
            let name = case.op.name();
            group.throughput(Throughput::Bytes(case.min_bytes()));
            if timestamps {
                group.bench_function(
                    BenchmarkId::new(format!("{name}/kernel"), &workload.name),
                    |b| b.iter_custom(|iters| kernel_time(&mut prepared, iters)),
                );
            }
            group.bench_function(
                BenchmarkId::new(format!("{name}/end_to_end"), &workload.name),
                |b| b.iter(|| prepared.run().expect("run")),
            );
            if case.op != Op::Copy {
                group.bench_function(
                    BenchmarkId::new(format!("{name}/cpu_reference"), &workload.name),
                    |b| b.iter(|| prepared.run_reference().expect("reference")),
                );
            } else if timestamps {
                // The second yardstick: the same copy by the driver.
                prepared.driver_copy = true;
                group.bench_function(
                    BenchmarkId::new("driver_copy/kernel", &workload.name),
                    |b| b.iter_custom(|iters| kernel_time(&mut prepared, iters)),
                );
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
