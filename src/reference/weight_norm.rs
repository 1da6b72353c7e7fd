//! Weight Normalization on the CPU, in f64.

use ndarray::{ArrayD, ArrayViewD, Axis};

use crate::error::{Error, Result};
use crate::ops::weight_norm::{NormAxes, WeightNorm};

/// The axes the norm sums over, in descending order (so keep-dims sums stay aligned).
fn reduced_axes(config: &WeightNorm, rank: usize) -> Vec<usize> {
    let mut axes: Vec<usize> = match config.axes {
        NormAxes::All => (0..rank).collect(),
        NormAxes::Keep(k) => (0..rank).filter(|&a| a != k).collect(),
        NormAxes::Reduce(d) => vec![if d < 0 {
            (d + rank as isize) as usize
        } else {
            d as usize
        }],
    };
    axes.sort_unstable_by(|a, b| b.cmp(a));
    axes
}

/// Sum over the reduced axes, keeping them with length 1 (the shape of g, rank kept).
fn sum_keep(config: &WeightNorm, x: &ArrayD<f64>) -> ArrayD<f64> {
    let mut s = x.clone();
    for a in reduced_axes(config, x.ndim()) {
        s = s.sum_axis(Axis(a)).insert_axis(Axis(a));
    }
    s
}

fn to_f64(a: &ArrayViewD<'_, f32>) -> ArrayD<f64> {
    a.mapv(f64::from)
}

/// `g` as given (shape [] for `All`) broadcast to v's rank.
fn g_full(config: &WeightNorm, g: &ArrayViewD<'_, f32>, v_shape: &[usize]) -> Result<ArrayD<f64>> {
    let want = config.g_shape(v_shape)?;
    let scalar_ok = config.axes == NormAxes::All && g.ndim() == 0;
    if g.shape() != want.as_slice() && !scalar_ok {
        return Err(Error::input(
            "weight_norm",
            format!("g has shape {:?}, expected {want:?}", g.shape()),
        ));
    }
    let keep: Vec<usize> = (0..v_shape.len())
        .map(|a| {
            if reduced_axes(config, v_shape.len()).contains(&a) {
                1
            } else {
                v_shape[a]
            }
        })
        .collect();
    Ok(to_f64(g)
        .into_shape_with_order(keep)
        .expect("same element count"))
}

/// `W = g * v / sqrt(max(|v|^2, eps))` (see [`WeightNorm`]).
pub fn forward(
    config: &WeightNorm,
    g: ArrayViewD<'_, f32>,
    v: ArrayViewD<'_, f32>,
) -> Result<ArrayD<f32>> {
    config.layout(v.shape())?;
    let gf = g_full(config, &g, v.shape())?;
    let v = to_f64(&v);
    let norm = sum_keep(config, &(&v * &v)).mapv(|s| s.max(f64::from(config.eps)).sqrt());
    Ok((&v * &(&gf / &norm)).mapv(|x| x as f32))
}

/// `(grad_g, grad_v)` of `sum(W * grad_w)`.
pub fn backward(
    config: &WeightNorm,
    g: ArrayViewD<'_, f32>,
    v: ArrayViewD<'_, f32>,
    grad_w: ArrayViewD<'_, f32>,
) -> Result<(ArrayD<f32>, ArrayD<f32>)> {
    config.layout(v.shape())?;
    if grad_w.shape() != v.shape() {
        return Err(Error::input(
            "weight_norm",
            format!(
                "grad_w has shape {:?} but v has shape {:?}",
                grad_w.shape(),
                v.shape()
            ),
        ));
    }
    let g_shape = g.shape().to_vec();
    let gf = g_full(config, &g, v.shape())?;
    let v = to_f64(&v);
    let gw = to_f64(&grad_w);
    let eps = f64::from(config.eps);
    let sq = sum_keep(config, &(&v * &v));
    let norm = sq.mapv(|s| s.max(eps).sqrt());
    // d(v_i / n)/dv_j = delta_ij / n - v_i v_j / n^3 (the second term only where n is
    // not clamped), so grad_v = g/n G - g <G, v> / n^3 v, and grad_g = <G, v> / n.
    let dot = sum_keep(config, &(&gw * &v));
    let grad_g = &dot / &norm;
    let unclamped = sq.mapv(|s| if s >= eps { 1.0 } else { 0.0 });
    let coef1 = &gf / &norm;
    let coef2 = &(&(&gf * &dot) / &norm.mapv(|n| n * n * n)) * &unclamped;
    let grad_v = &(&gw * &coef1) - &(&v * &coef2);
    let grad_g = grad_g
        .into_shape_with_order(g_shape)
        .expect("same element count");
    Ok((grad_g.mapv(|x| x as f32), grad_v.mapv(|x| x as f32)))
}

/// `(g, v) = (||W||, W)`: registering weight norm on an existing weight.
pub fn decompose(
    config: &WeightNorm,
    weight: ArrayViewD<'_, f32>,
) -> Result<(ArrayD<f32>, ArrayD<f32>)> {
    config.layout(weight.shape())?;
    let w = to_f64(&weight);
    let g = sum_keep(config, &(&w * &w)).mapv(f64::sqrt);
    let g = g
        .into_shape_with_order(config.g_shape(weight.shape())?)
        .expect("same element count");
    Ok((g.mapv(|x| x as f32), weight.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    fn seq(shape: &[usize], seed: u64) -> ArrayD<f32> {
        let mut s = seed;
        ArrayD::from_shape_simple_fn(IxDyn(shape), || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
    }

    /// The analytic gradients match central finite differences of the forward (in f64
    /// through the f32 interface, so with a loose step and tolerance).
    #[test]
    fn backward_matches_finite_differences() {
        for (config, shape) in [
            (WeightNorm::pytorch(Some(0)), vec![3, 4]),
            (WeightNorm::pytorch(Some(1)), vec![2, 3, 2]),
            (WeightNorm::pytorch(None), vec![2, 3]),
            (WeightNorm::jittor(-1), vec![2, 2, 3]),
        ] {
            let v = seq(&shape, 1);
            let gw = seq(&shape, 2);
            let g = seq(&config.g_shape(&shape).unwrap(), 3);
            let (dg, dv) = backward(&config, g.view(), v.view(), gw.view()).unwrap();
            let loss = |g: &ArrayD<f32>, v: &ArrayD<f32>| -> f64 {
                let w = forward(&config, g.view(), v.view()).unwrap();
                w.iter()
                    .zip(gw.iter())
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum()
            };
            let h = 1e-2f32;
            for i in 0..v.len() {
                let (mut vp, mut vm) = (v.clone(), v.clone());
                vp.as_slice_mut().unwrap()[i] += h;
                vm.as_slice_mut().unwrap()[i] -= h;
                let fd = (loss(&g, &vp) - loss(&g, &vm)) / (2.0 * f64::from(h));
                let got = f64::from(dv.as_slice().unwrap()[i]);
                assert!(
                    (fd - got).abs() < 2e-3 * (1.0 + fd.abs()),
                    "{config:?} v[{i}]: {fd} vs {got}"
                );
            }
            for i in 0..g.len() {
                let (mut gp, mut gm) = (g.clone(), g.clone());
                gp.as_slice_mut().unwrap()[i] += h;
                gm.as_slice_mut().unwrap()[i] -= h;
                let fd = (loss(&gp, &v) - loss(&gm, &v)) / (2.0 * f64::from(h));
                let got = f64::from(dg.as_slice().unwrap()[i]);
                assert!(
                    (fd - got).abs() < 2e-3 * (1.0 + fd.abs()),
                    "{config:?} g[{i}]: {fd} vs {got}"
                );
            }
        }
    }
}
