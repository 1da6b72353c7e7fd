//! Spectral Normalization in f64: the power iteration on `M = W` with `axis` moved to
//! the front (an explicit permuted copy here; the kernels use index arithmetic).

use ndarray::{Array1, Array2, ArrayD, ArrayViewD, IxDyn};

use crate::error::{Error, Result};
use crate::ops::spectral_norm::{SpectralFlavor, SpectralNorm};

/// What the forward gives: the normalized weight, the vectors it used, sigma.
#[derive(Clone, Debug)]
pub struct Forward {
    /// `gamma * W / sigma`.
    pub output: ArrayD<f32>,
    /// The `u` used (and stored, in training).
    pub u: Array1<f32>,
    /// The `v` used.
    pub v: Array1<f32>,
    /// Sigma after `factor`.
    pub sigma: f32,
}

/// `M` (rows = `W.shape[axis]`) as an f64 matrix.
pub fn matrix(weight: ArrayViewD<'_, f32>, axis: usize) -> Result<Array2<f64>> {
    if weight.ndim() < 2 || axis >= weight.ndim() || weight.is_empty() {
        return Err(Error::input(
            "spectral_norm",
            format!(
                "reference needs a non-empty weight of rank >= 2 and axis in range, got {:?} axis {axis}",
                weight.shape()
            ),
        ));
    }
    let rows = weight.shape()[axis];
    let cols = weight.len() / rows;
    let mut moved = weight.mapv(f64::from);
    // Axis to the front, the others in order: [R, A..., J...].
    let mut order: Vec<usize> = vec![axis];
    order.extend((0..weight.ndim()).filter(|&k| k != axis));
    moved = moved.permuted_axes(IxDyn(&order));
    let flat: Vec<f64> = moved.iter().copied().collect();
    Ok(Array2::from_shape_vec((rows, cols), flat).expect("rows * cols elements"))
}

fn normalize(x: Array1<f64>, config: &SpectralNorm) -> Array1<f64> {
    let norm = x.dot(&x).sqrt();
    let eps = f64::from(config.eps);
    let d = match config.flavor {
        SpectralFlavor::Chainer => norm + eps,
        SpectralFlavor::PyTorch => norm.max(eps),
    };
    x / d
}

/// The sigma floor of the kernels: below it the weight passes through unscaled.
fn usable(sigma: f64) -> f64 {
    if sigma.abs() >= f64::from(f32::MIN_POSITIVE) {
        sigma
    } else {
        1.0
    }
}

/// The forward of `config` from `u` (and `v`, PyTorch) with gamma `gamma` (ignored
/// unless `use_gamma`).
pub fn forward(
    config: &SpectralNorm,
    weight: ArrayViewD<'_, f32>,
    u: &[f32],
    v: &[f32],
    gamma: f32,
    training: bool,
) -> Result<Forward> {
    let m = matrix(weight.view(), config.axis)?;
    let mut u: Array1<f64> = u.iter().map(|&x| f64::from(x)).collect();
    let mut v: Array1<f64> = v.iter().map(|&x| f64::from(x)).collect();
    let iterate = training || config.flavor == SpectralFlavor::Chainer;
    if iterate {
        for _ in 0..config.n_power_iterations {
            match config.flavor {
                SpectralFlavor::Chainer => {
                    v = normalize(m.t().dot(&u), config);
                    u = normalize(m.dot(&v), config);
                }
                SpectralFlavor::PyTorch => {
                    u = normalize(m.dot(&v), config);
                    v = normalize(m.t().dot(&u), config);
                }
            }
        }
    }
    let sigma = u.dot(&m.dot(&v)) / f64::from(config.factor.unwrap_or(1.0));
    let s = if config.use_gamma {
        f64::from(gamma)
    } else {
        1.0
    };
    let k = s / usable(sigma);
    Ok(Forward {
        output: weight.mapv(|w| (f64::from(w) * k) as f32),
        u: u.mapv(|x| x as f32),
        v: v.mapv(|x| x as f32),
        sigma: sigma as f32,
    })
}

/// Gradients with respect to `W` and `gamma`, `u`, `v` and `sigma` (after factor)
/// being the forward's: `(s G - <G, output> u v^T / factor) / sigma`, `<G, W / sigma>`.
pub fn backward(
    config: &SpectralNorm,
    weight: ArrayViewD<'_, f32>,
    grad_output: ArrayViewD<'_, f32>,
    fwd: &Forward,
    gamma: f32,
) -> Result<(ArrayD<f32>, f32)> {
    let axis = config.axis;
    let factor = f64::from(config.factor.unwrap_or(1.0));
    let s = if config.use_gamma {
        f64::from(gamma)
    } else {
        1.0
    };
    let sigma = f64::from(fwd.sigma);
    let su = usable(sigma);
    let d: f64 = weight
        .iter()
        .zip(grad_output.iter())
        .map(|(&w, &g)| f64::from(w) * f64::from(g))
        .sum();
    let b = if sigma.abs() >= f64::from(f32::MIN_POSITIVE) {
        s * d / (su * su * factor)
    } else {
        0.0
    };
    // u v^T laid out like W: element (.., r on axis, ..) -> u[r] v[c].
    let shape = weight.shape().to_vec();
    let rows = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let mut grad = ArrayD::<f32>::zeros(IxDyn(&shape));
    for (e, (g, out)) in grad_output.iter().zip(grad.iter_mut()).enumerate() {
        let j = e % inner;
        let r = (e / inner) % rows;
        let a = e / (inner * rows);
        let c = a * inner + j;
        let uv = f64::from(fwd.u[r]) * f64::from(fwd.v[c]);
        *out = (s / su * f64::from(*g) - b * uv) as f32;
    }
    Ok((grad, (d / su) as f32))
}

/// The largest singular value of `M`, by the power iteration on `M^T M` in f64 until
/// it changes by less than 1e-15 relative (or 100000 iterations).
pub fn top_singular_value(weight: ArrayViewD<'_, f32>, axis: usize) -> Result<f64> {
    let m = matrix(weight, axis)?;
    let mut v = Array1::<f64>::from_shape_fn(m.ncols(), |i| 1.0 + (i as f64 * 0.618).sin());
    let mut sigma = 0.0;
    for _ in 0..100_000 {
        let mv = m.dot(&v);
        let w = m.t().dot(&mv);
        let n = w.dot(&w).sqrt();
        if n == 0.0 {
            return Ok(0.0);
        }
        v = w / n;
        let s = m.dot(&v).dot(&m.dot(&v)).sqrt();
        if (s - sigma).abs() <= 1e-15 * s {
            return Ok(s);
        }
        sigma = s;
    }
    Ok(sigma)
}
