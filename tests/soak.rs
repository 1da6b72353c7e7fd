//! Soak: several threads share two contexts (the default adapter, and the other thread
//! layout with bindings capped at 64 KiB) and run every op family, forward and
//! backward, for a bounded time; every result must equal, bit for bit, what the same
//! op gave on the same context from one thread. Catches races in the pipeline cache,
//! the output pool and the per-recording uniform buffers.
//!
//! `SOAK_SECONDS` sets the duration (default 4).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{ctx, ctx_with_binding, Rng};
use ndarray::ArrayD;
use wgnorm::{
    BatchNorm, BatchNormMode, BatchNormState, Context, SpectralNorm, Tensor, WeightNorm,
    WeightStandardization,
};

/// One op family's forward and backward on fixed inputs, from fresh state (so that
/// every run computes the same thing), read back.
type Job = fn(&Context, &Inputs) -> Vec<ArrayD<f32>>;

struct Inputs {
    weight: ArrayD<f32>,
    grad: ArrayD<f32>,
    x: ArrayD<f32>,
    dy: ArrayD<f32>,
}

fn up(ctx: &Context, a: &ArrayD<f32>) -> Tensor {
    Tensor::from_array(ctx, a).expect("upload")
}

fn ws(ctx: &Context, i: &Inputs) -> Vec<ArrayD<f32>> {
    let step = WeightStandardization::default()
        .forward_backward(ctx, &up(ctx, &i.weight), &up(ctx, &i.grad))
        .expect("ws");
    ctx.read_all(&[&step.output, &step.grad]).expect("read")
}

fn sn(ctx: &Context, i: &Inputs) -> Vec<ArrayD<f32>> {
    let config = SpectralNorm::chainer();
    let w = up(ctx, &i.weight);
    let mut state = config.init_state(ctx, &w, 7).expect("state");
    let fwd = config.forward(ctx, &w, &mut state, true).expect("sn");
    let grads = config
        .backward(ctx, &w, &up(ctx, &i.grad), &fwd, &state)
        .expect("sn backward");
    ctx.read_all(&[&fwd.weight, &fwd.sigma, &state.u, &grads.weight])
        .expect("read")
}

fn wn(ctx: &Context, i: &Inputs) -> Vec<ArrayD<f32>> {
    let config = WeightNorm::default();
    let g = ArrayD::from_elem(config.g_shape(i.weight.shape()).expect("g shape"), 1.5f32);
    let (g, v) = (up(ctx, &g), up(ctx, &i.weight));
    let w = config.forward(ctx, &g, &v).expect("wn");
    let grads = config
        .backward(ctx, &g, &v, &up(ctx, &i.grad))
        .expect("wn backward");
    ctx.read_all(&[&w, &grads.g, &grads.v]).expect("read")
}

fn bn(ctx: &Context, i: &Inputs) -> Vec<ArrayD<f32>> {
    let config = BatchNorm {
        center: false,
        scale: false,
        ..BatchNorm::pytorch()
    };
    let x = up(ctx, &i.x);
    let mut state = BatchNormState::new(ctx, i.x.shape()[1]).expect("state");
    let fwd = config
        .forward(ctx, &x, None, None, Some(&mut state), BatchNormMode::Train)
        .expect("bn");
    let grads = config
        .backward(ctx, &x, &up(ctx, &i.dy), &fwd)
        .expect("bn backward");
    ctx.read_all(&[&fwd.output, &state.running_var, &grads.input])
        .expect("read")
}

#[test]
fn threads_and_two_contexts_give_single_thread_results() {
    let seconds = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4.0);
    let contexts = [ctx(), ctx_with_binding(64 * 1024)];
    let mut rng = Rng::new(12);
    // Sizes off every multiple; the weight and the batch pass the 64 KiB cap.
    let inputs = Inputs {
        weight: rng.array(&[67, 33, 3, 3], 0.1, 1.0),
        grad: rng.array(&[67, 33, 3, 3], 0.0, 1.0),
        x: rng.array(&[6, 37, 9, 11], 2.0, 3.0),
        dy: rng.array(&[6, 37, 9, 11], 0.0, 1.0),
    };
    let jobs: [(&str, Job); 4] = [("ws", ws), ("sn", sn), ("wn", wn), ("bn", bn)];
    // The single-thread results, per context and job.
    let expected: Vec<Vec<Vec<ArrayD<f32>>>> = contexts
        .iter()
        .map(|c| jobs.iter().map(|(_, job)| job(c, &inputs)).collect())
        .collect();
    let runs = AtomicUsize::new(0);
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    std::thread::scope(|s| {
        for t in 0..6 {
            let (contexts, inputs, expected, runs, jobs) =
                (&contexts, &inputs, &expected, &runs, &jobs);
            s.spawn(move || {
                let mut k = t;
                while Instant::now() < deadline {
                    let (c, j) = (k % 2, (k / 2) % jobs.len());
                    let got = (jobs[j].1)(&contexts[c], inputs);
                    for (n, (g, e)) in got.iter().zip(&expected[c][j]).enumerate() {
                        let same = g.iter().zip(e.iter()).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(
                            same && g.shape() == e.shape(),
                            "thread {t}: {} output {n} on context {c} differs from the single-thread run",
                            jobs[j].0
                        );
                    }
                    runs.fetch_add(1, Ordering::Relaxed);
                    k += 1;
                }
            });
        }
    });
    let runs = runs.into_inner();
    eprintln!("soak: {runs} runs in {seconds} s over 6 threads, 2 contexts");
    assert!(runs >= 8, "only {runs} runs");
}
