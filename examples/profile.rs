//! Where each benchmark case spends its GPU time: every dispatch of the op timed on
//! its own (GPU timestamps around each dispatch, each in its own compute pass), the
//! median of 10 runs after 5 warm-ups, with the kernel's label and grid. A tuning aid
//! for GPUs; needs timestamp queries inside encoders (lavapipe has them, GL not).
//! A pass of its own costs each dispatch a fixed amount: on an H100 (NVIDIA 580) a
//! one-workgroup dispatch reads 20-30 us this way and large ones up to twice their
//! time in the report, so compare dispatches with each other, not with the report.
//!
//! ```text
//! cargo run --release --features bench --example profile -- [--only OP] [--dtype f32] [--workload TEXT]
//! ```

use wgnorm::bench::{arg_value, median, suite, Prepared};
use wgnorm::{Context, Recording};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| arg_value(&args, flag);
    let ctx = Context::headless()?;
    println!("adapter: {}", ctx.info());
    for case in suite() {
        if value("--only").is_some_and(|o| !case.op.name().contains(o.as_str()))
            || value("--dtype").is_some_and(|d| case.workload.dtype.name() != d)
            || value("--workload").is_some_and(|w| !case.workload.name.contains(w.as_str()))
        {
            continue;
        }
        let mut prepared = Prepared::new(&ctx, &case)?;
        for _ in 0..5 {
            prepared.run()?;
        }
        let mut runs = Vec::new();
        for _ in 0..10 {
            let mut rec = Recording::new(&ctx);
            prepared.record(&mut rec)?;
            runs.push(rec.submit_profiled()?);
        }
        let first = &runs[0];
        let total: Vec<f64> = runs.iter().map(|r| r.iter().map(|d| d.2).sum()).collect();
        println!(
            "{} {}: {} dispatches, {:.1} us summed",
            case.op.name(),
            case.workload.label(),
            first.len(),
            median(&total) * 1e6
        );
        // Merge consecutive dispatches of one label (ResNet's 53 weights) into one line.
        let mut i = 0;
        while i < first.len() {
            let mut j = i;
            while j + 1 < first.len() && first[j + 1].0 == first[i].0 {
                j += 1;
            }
            let t: Vec<f64> = runs
                .iter()
                .map(|r| r[i..=j].iter().map(|d| d.2).sum())
                .collect();
            println!(
                "  {:>3} x{:<3} {:<34} grid {:>6}x{:<3} {:>9.1} us",
                i,
                j - i + 1,
                first[i].0,
                first[i].1[0],
                first[i].1[1],
                median(&t) * 1e6
            );
            i = j + 1;
        }
    }
    Ok(())
}
