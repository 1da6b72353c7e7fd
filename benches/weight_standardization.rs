//! Weight Standardization against the copy kernel (the bandwidth yardstick) and the
//! CPU reference, on the default adapter. Throughput counts the bytes each op must move
//! at minimum: forward reads W and writes the output; backward reads W and grad_output
//! and writes grad_weight.
//!
//! ```text
//! cargo bench --bench weight_standardization
//! ```

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ndarray::ArrayD;
use wgnorm::ops::copy::record_copy;
use wgnorm::reference::weight_standardization as reference;
use wgnorm::{Context, Recording, Tensor, WeightStandardization};

fn bench(c: &mut Criterion) {
    let ctx = Context::headless().expect("an adapter");
    eprintln!("adapter: {}", ctx.info());
    let shapes: Vec<(&str, Vec<usize>)> = vec![
        ("resnet50_3x3_512", vec![512, 512, 3, 3]),
        ("linear_4096x4096", vec![4096, 4096]),
        ("embedding_50000x512", vec![50000, 512]),
    ];
    let ws = WeightStandardization::default();
    let mut group = c.benchmark_group("weight_standardization");
    group.sample_size(10);
    for (name, shape) in &shapes {
        let n: usize = shape.iter().product();
        let host = ArrayD::from_shape_vec(shape.clone(), (0..n).map(|i| (i % 17) as f32).collect())
            .unwrap();
        let w = Tensor::from_array(&ctx, &host).unwrap();
        let run = |f: &dyn Fn(&mut Recording) -> wgnorm::Result<Tensor>| {
            let mut rec = Recording::new(&ctx);
            f(&mut rec).unwrap();
            rec.submit().unwrap();
            ctx.wait().unwrap();
        };
        group.throughput(Throughput::Bytes(n as u64 * 8));
        group.bench_function(BenchmarkId::new("gpu/copy", name), |b| {
            b.iter(|| run(&|rec| record_copy(rec, &w)))
        });
        group.bench_function(BenchmarkId::new("gpu/forward", name), |b| {
            b.iter(|| run(&|rec| ws.record_forward(rec, &w)))
        });
        group.throughput(Throughput::Bytes(n as u64 * 12));
        group.bench_function(BenchmarkId::new("gpu/backward", name), |b| {
            b.iter(|| run(&|rec| ws.record_backward(rec, &w, &w)))
        });
        group.throughput(Throughput::Bytes(n as u64 * 8));
        group.bench_function(BenchmarkId::new("reference/forward", name), |b| {
            b.iter(|| reference::forward(&ws, host.view()).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
