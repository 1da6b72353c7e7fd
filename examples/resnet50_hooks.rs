//! ResNet-50's 53 convolution weights as hooked weights: Spectral Normalization on
//! every one, then Weight Standardization on every one. Prints the time of one refresh
//! of the whole model (one submission) against refreshing the weights one by one (a
//! submission and a wait each), and the timer hook's report per weight and hook.
//!
//! ```text
//! cargo run --release --example resnet50_hooks
//! ```

use std::sync::{Arc, Mutex};
use std::time::Instant;

use wgnorm::hooks::SharedHook;
use wgnorm::{
    register_global, Context, Recording, SpectralNorm, SpectralNormHook, Tensor, TimerHook, Weight,
    WeightHook, WeightStandardizationHook,
};

fn model(
    ctx: &Context,
    hook: &dyn Fn(usize) -> Box<dyn WeightHook>,
) -> wgnorm::Result<Vec<Weight>> {
    let mut seed = 7u64;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    let mut weights = Vec::new();
    for (i, s) in wgnorm::shapes::resnet50_conv_weights().iter().enumerate() {
        let n: usize = s.iter().product();
        let data: Vec<f32> = (0..n).map(|_| next()).collect();
        let t = Tensor::from_slice(ctx, s, &data)?;
        let mut w = Weight::new(format!("conv{i:02}"), Some(t));
        w.add_hook(ctx, hook(i))?;
        weights.push(w);
    }
    Ok(weights)
}

fn time(ctx: &Context, weights: &mut [Weight], reps: usize) -> wgnorm::Result<(f64, f64)> {
    // Warm up (pipelines, lazy state).
    let mut rec = Recording::new(ctx);
    for w in weights.iter_mut() {
        w.record_forward(&mut rec, true)?;
    }
    rec.submit()?;
    ctx.wait()?;
    let t = Instant::now();
    for _ in 0..reps {
        let mut rec = Recording::new(ctx);
        for w in weights.iter_mut() {
            w.record_forward(&mut rec, true)?;
        }
        rec.submit()?;
        ctx.wait()?;
    }
    let together = t.elapsed().as_secs_f64() / reps as f64;
    let t = Instant::now();
    for _ in 0..reps {
        for w in weights.iter_mut() {
            w.forward(ctx, true)?;
            ctx.wait()?;
        }
    }
    let one_by_one = t.elapsed().as_secs_f64() / reps as f64;
    Ok((together, one_by_one))
}

fn main() -> wgnorm::Result<()> {
    let ctx = Context::headless()?;
    println!("adapter: {}", ctx.info());
    let reps = 3;
    let mut sn = model(&ctx, &|i| {
        Box::new(SpectralNormHook::new(SpectralNorm::default(), i as u64))
    })?;
    let (a, b) = time(&ctx, &mut sn, reps)?;
    println!(
        "spectral norm, 53 weights: one submission {:.1} ms, one by one {:.1} ms ({:.2}x)",
        a * 1e3,
        b * 1e3,
        b / a
    );
    let mut ws = model(&ctx, &|_| Box::new(WeightStandardizationHook::default()))?;
    let (a, b) = time(&ctx, &mut ws, reps)?;
    println!(
        "weight standardization, 53 weights: one submission {:.1} ms, one by one {:.1} ms ({:.2}x)",
        a * 1e3,
        b * 1e3,
        b / a
    );
    // The timer hook on one refresh of the spectral-norm model (first 5 weights shown).
    let timer = Arc::new(Mutex::new(TimerHook::new()));
    let shared: SharedHook = timer.clone();
    let guard = register_global(shared)?;
    let mut rec = Recording::new(&ctx);
    for w in sn.iter_mut() {
        w.record_forward(&mut rec, true)?;
    }
    rec.submit()?;
    drop(guard);
    let report = timer.lock().expect("timer lock").report();
    let text = report.to_string();
    for line in text.lines().take(11) {
        println!("{line}");
    }
    let total: f64 = report
        .entries
        .iter()
        .filter(|e| e.1 == "(forward)")
        .map(|e| e.3)
        .sum();
    println!(
        "timer: {} spans, forward total {:.1} ms",
        report.entries.len(),
        total * 1e3
    );
    Ok(())
}
