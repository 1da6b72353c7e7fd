//! Spectral Normalization against the copy kernel (the bandwidth yardstick) and the CPU
//! reference, on the default adapter.
//!
//! Bytes counted, the minimum each pass must move: one power iteration reads W twice
//! (`M^T u`, then `M v`) and the output reads W once and writes it once, so a training
//! forward with one iteration moves `4 x |W|` bytes (`16 n`); PyTorch's evaluation
//! forward reads W once for sigma (`u^T M v`) and once for the output, and writes it
//! (`12 n`); backward reads W and grad_output for `<G, W>`, grad_output again, and
//! writes grad_weight (`16 n`). The copy moves `8 n`.
//!
//! ```text
//! cargo bench --bench spectral_norm
//! ```

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ndarray::ArrayD;
use wgnorm::ops::copy::record_copy;
use wgnorm::reference::spectral_norm as reference;
use wgnorm::{Context, Recording, SpectralNorm, Tensor};

fn bench(c: &mut Criterion) {
    let ctx = Context::headless().expect("an adapter");
    eprintln!("adapter: {}", ctx.info());
    let shapes: Vec<(&str, Vec<usize>)> = vec![
        ("conv_512x512x3x3", vec![512, 512, 3, 3]),
        ("linear_4096x4608", vec![4096, 4608]),
        ("embedding_50000x512", vec![50000, 512]),
    ];
    let mut group = c.benchmark_group("spectral_norm");
    group.sample_size(10);
    for (name, shape) in &shapes {
        let n: usize = shape.iter().product();
        let host = ArrayD::from_shape_vec(
            shape.clone(),
            (0..n).map(|i| ((i * 7919) % 17) as f32 - 8.0).collect(),
        )
        .unwrap();
        let w = Tensor::from_array(&ctx, &host).unwrap();
        let chainer = SpectralNorm::chainer();
        let torch = SpectralNorm::pytorch();
        let mut st_chainer = chainer.init_state(&ctx, &w, 0).unwrap();
        let mut st_torch = torch.init_state(&ctx, &w, 0).unwrap();
        let fwd = chainer.forward(&ctx, &w, &mut st_chainer, true).unwrap();
        let sync = || ctx.wait().unwrap();
        let n = n as u64;
        group.throughput(Throughput::Bytes(8 * n));
        group.bench_function(BenchmarkId::new("gpu/copy", name), |b| {
            b.iter(|| {
                let mut rec = Recording::new(&ctx);
                record_copy(&mut rec, &w).unwrap();
                rec.submit().unwrap();
                sync()
            })
        });
        group.throughput(Throughput::Bytes(16 * n));
        group.bench_function(BenchmarkId::new("gpu/forward_train_chainer", name), |b| {
            b.iter(|| {
                chainer.forward(&ctx, &w, &mut st_chainer, true).unwrap();
                sync()
            })
        });
        group.bench_function(BenchmarkId::new("gpu/forward_train_pytorch", name), |b| {
            b.iter(|| {
                torch.forward(&ctx, &w, &mut st_torch, true).unwrap();
                sync()
            })
        });
        group.throughput(Throughput::Bytes(12 * n));
        group.bench_function(BenchmarkId::new("gpu/forward_eval_pytorch", name), |b| {
            b.iter(|| {
                torch.forward(&ctx, &w, &mut st_torch, false).unwrap();
                sync()
            })
        });
        group.throughput(Throughput::Bytes(16 * n));
        group.bench_function(BenchmarkId::new("gpu/backward", name), |b| {
            b.iter(|| {
                chainer.backward(&ctx, &w, &w, &fwd, &st_chainer).unwrap();
                sync()
            })
        });
        let (u0, v0) = (
            st_chainer.u.to_array(&ctx).unwrap(),
            st_chainer.v.to_array(&ctx).unwrap(),
        );
        let (u0, v0) = (u0.as_slice().unwrap(), v0.as_slice().unwrap());
        group.bench_function(
            BenchmarkId::new("reference/forward_train_chainer", name),
            |b| b.iter(|| reference::forward(&chainer, host.view(), u0, v0, 1.0, true).unwrap()),
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
