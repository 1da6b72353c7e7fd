//! Batch Normalization on the CPU, in f64.

use ndarray::{Array1, ArrayD, ArrayViewD, Axis, Zip};

use crate::error::Result;
use crate::ops::batch_norm::{BatchNorm, BatchNormMode, RunningVar};

/// The result of [`forward`]: the output and the running statistics after the step.
#[derive(Clone, Debug)]
pub struct Forward {
    /// The normalized output.
    pub output: ArrayD<f32>,
    /// Running mean after the step (unchanged outside training).
    pub running_mean: Array1<f32>,
    /// Running variance after the step.
    pub running_var: Array1<f32>,
}

/// Mean and biased variance of each feature.
/// The feature axis of an input of rank `ndim`, checked by `forward` and `backward`
/// before anything uses it.
fn feature_axis(config: &BatchNorm, ndim: usize) -> usize {
    config
        .resolved_axis(ndim)
        .expect("checked at the top of forward and backward")
}

fn batch_stats(config: &BatchNorm, x: &ArrayD<f64>) -> (Vec<f64>, Vec<f64>) {
    x.axis_iter(Axis(feature_axis(config, x.ndim())))
        .map(|s| {
            let n = s.len() as f64;
            let mean = s.sum() / n;
            (
                mean,
                s.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n,
            )
        })
        .unzip()
}

/// One forward step (see [`BatchNorm`]); `gamma`/`beta` of `None` mean 1 and 0.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    config: &BatchNorm,
    x: ArrayViewD<'_, f32>,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    running_mean: &[f32],
    running_var: &[f32],
    num_updates: u64,
    mode: BatchNormMode,
) -> Result<Forward> {
    config.resolved_axis(x.ndim())?;
    let x = x.mapv(f64::from);
    let from_batch = !config.track_running_stats || mode == BatchNormMode::Train;
    let update = config.track_running_stats && mode == BatchNormMode::Train;
    let (mean, var) = if from_batch {
        batch_stats(config, &x)
    } else {
        (
            running_mean.iter().map(|&v| f64::from(v)).collect(),
            running_var.iter().map(|&v| f64::from(v)).collect(),
        )
    };
    let mut out = x.clone();
    for (c, mut s) in out
        .axis_iter_mut(Axis(feature_axis(config, x.ndim())))
        .enumerate()
    {
        let g = gamma.map_or(1.0, |g| f64::from(g[c]));
        let b = beta.map_or(0.0, |b| f64::from(b[c]));
        let invstd = 1.0 / (var[c] + f64::from(config.eps)).sqrt();
        s.mapv_inplace(|v| (v - mean[c]) * invstd * g + b);
    }
    let mut rm: Vec<f64> = running_mean.iter().map(|&v| f64::from(v)).collect();
    let mut rv: Vec<f64> = running_var.iter().map(|&v| f64::from(v)).collect();
    if update {
        let w = f64::from(config.batch_weight(num_updates));
        let n = (x.len() / x.shape()[feature_axis(config, x.ndim())]) as f64;
        for c in 0..rm.len() {
            let stored_var = match config.running_var {
                RunningVar::Unbiased => var[c] * n / (n - 1.0).max(1.0),
                RunningVar::Biased => var[c],
            };
            rm[c] = (1.0 - w) * rm[c] + w * mean[c];
            rv[c] = (1.0 - w) * rv[c] + w * stored_var;
        }
    }
    Ok(Forward {
        output: out.mapv(|v| v as f32),
        running_mean: rm.iter().map(|&v| v as f32).collect(),
        running_var: rv.iter().map(|&v| v as f32).collect(),
    })
}

/// `(grad_input, grad_gamma, grad_beta)` of `sum(output * dy)`. In training the
/// gradient goes through the batch mean and variance:
/// `dx = gamma invstd (dy - mean(dy) - xhat mean(dy xhat))`; with running statistics
/// they are constants, `dx = gamma invstd dy`.
pub fn backward(
    config: &BatchNorm,
    x: ArrayViewD<'_, f32>,
    dy: ArrayViewD<'_, f32>,
    gamma: Option<&[f32]>,
    running_mean: &[f32],
    running_var: &[f32],
    mode: BatchNormMode,
) -> Result<(ArrayD<f32>, Array1<f32>, Array1<f32>)> {
    config.resolved_axis(x.ndim())?;
    let x = x.mapv(f64::from);
    let dy = dy.mapv(f64::from);
    let from_batch = !config.track_running_stats || mode == BatchNormMode::Train;
    let (mean, var) = if from_batch {
        batch_stats(config, &x)
    } else {
        (
            running_mean.iter().map(|&v| f64::from(v)).collect(),
            running_var.iter().map(|&v| f64::from(v)).collect(),
        )
    };
    let axis = Axis(feature_axis(config, x.ndim()));
    let mut dx = ArrayD::zeros(x.raw_dim());
    let features = x.shape()[axis.index()];
    let (mut dgamma, mut dbeta) = (Array1::zeros(features), Array1::zeros(features));
    for (c, ((xs, ds), mut out)) in x
        .axis_iter(axis)
        .zip(dy.axis_iter(axis))
        .zip(dx.axis_iter_mut(axis))
        .enumerate()
    {
        let n = xs.len() as f64;
        let g = gamma.map_or(1.0, |g| f64::from(g[c]));
        let invstd = 1.0 / (var[c] + f64::from(config.eps)).sqrt();
        let xhat = xs.mapv(|v| (v - mean[c]) * invstd);
        let sum_dy = ds.sum();
        let sum_dy_xhat: f64 = Zip::from(&ds).and(&xhat).fold(0.0, |a, &d, &h| a + d * h);
        dgamma[c] = sum_dy_xhat as f32;
        dbeta[c] = sum_dy as f32;
        Zip::from(&mut out)
            .and(&ds)
            .and(&xhat)
            .for_each(|o, &d, &h| {
                *o = if from_batch {
                    g * invstd * (d - sum_dy / n - h * sum_dy_xhat / n)
                } else {
                    g * invstd * d
                };
            });
    }
    Ok((dx.mapv(|v| v as f32), dgamma, dbeta))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    #[test]
    fn training_backward_matches_finite_differences() {
        let config = BatchNorm {
            eps: 1e-3,
            ..BatchNorm::pytorch()
        };
        let shape = [3, 2, 4];
        let mut s = 7u64;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let x = ArrayD::from_shape_simple_fn(IxDyn(&shape), &mut next);
        let dy = ArrayD::from_shape_simple_fn(IxDyn(&shape), &mut next);
        let gamma = [1.5f32, -0.7];
        let (rm, rv) = ([0.0f32; 2], [1.0f32; 2]);
        let (dx, dg, _) = backward(
            &config,
            x.view(),
            dy.view(),
            Some(&gamma),
            &rm,
            &rv,
            BatchNormMode::Train,
        )
        .unwrap();
        let loss = |x: &ArrayD<f32>, gamma: &[f32]| -> f64 {
            let y = forward(
                &config,
                x.view(),
                Some(gamma),
                None,
                &rm,
                &rv,
                0,
                BatchNormMode::Train,
            )
            .unwrap()
            .output;
            y.iter()
                .zip(dy.iter())
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum()
        };
        let h = 1e-2f32;
        for i in 0..x.len() {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp.as_slice_mut().unwrap()[i] += h;
            xm.as_slice_mut().unwrap()[i] -= h;
            let fd = (loss(&xp, &gamma) - loss(&xm, &gamma)) / (2.0 * f64::from(h));
            let got = f64::from(dx.as_slice().unwrap()[i]);
            assert!(
                (fd - got).abs() < 5e-3 * (1.0 + fd.abs()),
                "x[{i}]: {fd} vs {got}"
            );
        }
        for c in 0..2 {
            let (mut gp, mut gm) = (gamma, gamma);
            gp[c] += h;
            gm[c] -= h;
            let fd = (loss(&x, &gp) - loss(&x, &gm)) / (2.0 * f64::from(h));
            assert!(
                (fd - f64::from(dg[c])).abs() < 5e-3 * (1.0 + fd.abs()),
                "gamma[{c}]"
            );
        }
    }
}
