//! Weight Standardization on the CPU, in f64.

use ndarray::{ArrayD, ArrayViewD, Axis, Zip};

use crate::error::{Error, Result};
use crate::ops::weight_standardization::{Variance, WeightStandardization};

/// `(W - mean) / sqrt(var + eps)` per output channel (see [`WeightStandardization`]).
pub fn forward(config: &WeightStandardization, weight: ArrayViewD<'_, f32>) -> Result<ArrayD<f32>> {
    config.check(weight.shape())?;
    let w = weight.mapv(f64::from);
    Ok(forward_f64(config, &w).mapv(|v| v as f32))
}

/// The gradient of `sum(output * grad_output)` with respect to the raw weight.
pub fn backward(
    config: &WeightStandardization,
    weight: ArrayViewD<'_, f32>,
    grad_output: ArrayViewD<'_, f32>,
) -> Result<ArrayD<f32>> {
    config.check(weight.shape())?;
    if weight.shape() != grad_output.shape() {
        return Err(Error::input(
            "weight_standardization",
            format!(
                "grad_output has shape {:?} but the weight has shape {:?}",
                grad_output.shape(),
                weight.shape()
            ),
        ));
    }
    let w = weight.mapv(f64::from);
    let g = grad_output.mapv(f64::from);
    Ok(backward_f64(config, &w, &g).mapv(|v| v as f32))
}

/// Mean and `1 / sqrt(var + eps)` of one output channel's slice, two-pass.
fn channel_stats(config: &WeightStandardization, slice: &ArrayViewD<'_, f64>) -> (f64, f64) {
    let n = slice.len() as f64;
    let mean = slice.sum() / n;
    let ss: f64 = slice.iter().map(|&x| (x - mean) * (x - mean)).sum();
    let divisor = match config.variance {
        Variance::Biased => n,
        Variance::Unbiased => n - 1.0,
    };
    let var = ss / divisor;
    (mean, 1.0 / (var + f64::from(config.eps)).sqrt())
}

pub(crate) fn forward_f64(config: &WeightStandardization, w: &ArrayD<f64>) -> ArrayD<f64> {
    let mut out = w.clone();
    for mut slice in out.axis_iter_mut(Axis(config.axis)) {
        let (mean, rstd) = channel_stats(config, &slice.view());
        slice.mapv_inplace(|x| (x - mean) * rstd);
    }
    out
}

/// With `y = (x - mean) r`, `r = (var + eps)^-1/2`, `var = sum (x - mean)^2 / d`:
/// `dy_i/dx_j = r (delta_ij - 1/n) - r^3 (x_i - mean)(x_j - mean) / d`, so
/// `dx_j = r (g_j - mean(g)) - r^3 (x_j - mean) / d * sum_i g_i (x_i - mean)`.
pub(crate) fn backward_f64(
    config: &WeightStandardization,
    w: &ArrayD<f64>,
    g: &ArrayD<f64>,
) -> ArrayD<f64> {
    let mut dx = ArrayD::zeros(w.raw_dim());
    let axis = Axis(config.axis);
    for ((ws, gs), mut ds) in w
        .axis_iter(axis)
        .zip(g.axis_iter(axis))
        .zip(dx.axis_iter_mut(axis))
    {
        let (mean, r) = channel_stats(config, &ws);
        let n = ws.len() as f64;
        let d = match config.variance {
            Variance::Biased => n,
            Variance::Unbiased => n - 1.0,
        };
        let g_mean = gs.sum() / n;
        let g_dot_centred: f64 = Zip::from(&ws)
            .and(&gs)
            .fold(0.0, |acc, &x, &g| acc + g * (x - mean));
        Zip::from(&mut ds).and(&ws).and(&gs).for_each(|dx, &x, &g| {
            *dx = r * (g - g_mean) - r * r * r * (x - mean) / d * g_dot_centred;
        });
    }
    dx
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    fn pseudo_random(shape: &[usize], seed: u64) -> ArrayD<f64> {
        let mut s = seed;
        ArrayD::from_shape_fn(IxDyn(shape), |_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
    }

    /// The analytic backward matches central finite differences of the forward.
    #[test]
    fn backward_matches_finite_differences() {
        for (variance, axis, shape) in [
            (Variance::Biased, 0, vec![3, 4, 2]),
            (Variance::Unbiased, 0, vec![2, 5]),
            (Variance::Biased, 1, vec![2, 3, 3]),
        ] {
            let config = WeightStandardization {
                eps: 1e-3,
                variance,
                axis,
            };
            let w = pseudo_random(&shape, 1);
            let g = pseudo_random(&shape, 2);
            let dx = backward_f64(&config, &w, &g);
            let h = 1e-6;
            for i in 0..w.len() {
                let mut wp = w.clone();
                let mut wm = w.clone();
                wp.as_slice_mut().unwrap()[i] += h;
                wm.as_slice_mut().unwrap()[i] -= h;
                let lp = (&forward_f64(&config, &wp) * &g).sum();
                let lm = (&forward_f64(&config, &wm) * &g).sum();
                let fd = (lp - lm) / (2.0 * h);
                let got = dx.as_slice().unwrap()[i];
                assert!((fd - got).abs() < 1e-6, "{shape:?} {i}: {fd} vs {got}");
            }
        }
    }
}
