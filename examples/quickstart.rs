//! The main job: Weight Standardization of ResNet-50's 53 convolution weights, forward
//! and backward, on the default adapter, checked against the f64 CPU reference.
//!
//! ```text
//! cargo run --release --example quickstart
//! ```
//! Choose the adapter with WGPU_BACKEND (vulkan, gl), WGPU_ADAPTER_NAME, WGPU_POWER_PREF.

use std::time::Instant;

use ndarray::ArrayD;
use wgnorm::reference::weight_standardization as reference;
use wgnorm::{Context, Recording, Tensor, WeightStandardization};

fn main() -> wgnorm::Result<()> {
    let ctx = Context::headless()?;
    println!("adapter: {}", ctx.info());

    // Kaiming-normal weights (std = sqrt(2 / fan_in)) from a fixed seed.
    let shapes = wgnorm::shapes::resnet50_conv_weights();
    let mut seed = 42u64;
    let mut normal = move || {
        let mut uniform = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let (a, b) = (uniform(), uniform());
        ((-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()) as f32
    };
    let weights: Vec<ArrayD<f32>> = shapes
        .iter()
        .map(|s| {
            let std = (2.0 / (s[1] * s[2] * s[3]) as f32).sqrt();
            ArrayD::from_shape_simple_fn(s.to_vec(), || std * normal())
        })
        .collect();
    let grads: Vec<ArrayD<f32>> = shapes
        .iter()
        .map(|s| ArrayD::from_shape_simple_fn(s.to_vec(), &mut normal))
        .collect();
    let elems: usize = weights.iter().map(|w| w.len()).sum();
    println!(
        "ResNet-50: {} convolution weights, {:.1}M values",
        weights.len(),
        elems as f64 / 1e6
    );

    let upload = |a: &Vec<ArrayD<f32>>| -> wgnorm::Result<Vec<Tensor>> {
        a.iter().map(|w| Tensor::from_array(&ctx, w)).collect()
    };
    let (tw, tg) = (upload(&weights)?, upload(&grads)?);
    let ws = WeightStandardization::default();

    // Warm-up: builds the pipelines once.
    let mut rec = Recording::new(&ctx);
    ws.record_forward(&mut rec, &tw[0])?;
    rec.submit()?;
    ctx.wait()?;

    // One recording, one submission for the whole model, forward and backward.
    let start = Instant::now();
    let mut rec = Recording::new(&ctx);
    let mut outputs = Vec::new();
    for (w, g) in tw.iter().zip(&tg) {
        let step = ws.record_forward_backward(&mut rec, w, g)?;
        outputs.push(step.output);
        outputs.push(step.grad);
    }
    let dispatches = rec.dispatches();
    rec.submit()?;
    ctx.wait()?;
    let gpu_time = start.elapsed();
    let results = ctx.read_all(&outputs.iter().collect::<Vec<_>>())?;

    let start = Instant::now();
    let (mut worst_out, mut worst_grad) = (0f32, 0f32);
    for (i, (w, g)) in weights.iter().zip(&grads).enumerate() {
        let want_out = reference::forward(&ws, w.view())?;
        let want_grad = reference::backward(&ws, w.view(), g.view())?;
        let diff = |a: &ArrayD<f32>, b: &ArrayD<f32>| {
            a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        };
        worst_out = worst_out.max(diff(&results[2 * i], &want_out));
        worst_grad = worst_grad.max(diff(&results[2 * i + 1], &want_grad));
    }
    let cpu_time = start.elapsed();

    println!(
        "GPU forward + backward, {dispatches} dispatches in one submission: {:.2} ms",
        gpu_time.as_secs_f64() * 1e3
    );
    println!(
        "CPU f64 reference, forward + backward: {:.2} ms",
        cpu_time.as_secs_f64() * 1e3
    );
    println!("worst |GPU - reference|: output {worst_out:.2e}, grad_weight {worst_grad:.2e}");
    let ok = worst_out < 1e-4 && worst_grad < 1e-3;
    println!("{}", if ok { "OK" } else { "MISMATCH" });
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}
