//! wgnorm's weight standardization as a burn autodiff op: forward and gradient match
//! burn's own composition of it (burn's autodiff through its tensor ops).

use burn::tensor::{Distribution, Tensor};
use wgnorm::WeightStandardization;
use wgnorm_burn::{weight_standardization, Shared};

fn max_diff(a: Tensor<2>, b: Tensor<2>) -> f32 {
    let a: Vec<f32> = a.into_data().try_to_vec::<f32>().unwrap();
    let b: Vec<f32> = b.into_data().try_to_vec::<f32>().unwrap();
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

#[test]
fn weight_standardization_gradient_matches_burn_composition() {
    let shared = Shared::of(&Default::default()).expect("shared device");
    let plain = shared.burn_device();
    let dev = plain.clone().autodiff();
    let (rows, cols) = (32, 75);
    let data =
        Tensor::<2>::random([rows, cols], Distribution::Uniform(-1.0, 1.0), &plain).into_data();
    let upstream = Tensor::<2>::random([rows, cols], Distribution::Uniform(-1.0, 1.0), &dev);

    // wgnorm through the custom backward.
    let x = Tensor::<2>::from_data(data.clone(), &dev).require_grad();
    let y = weight_standardization(&WeightStandardization::default(), x.clone()).unwrap();
    let grads = (y.clone() * upstream.clone()).sum().backward();
    let gx = x.grad(&grads).expect("gradient of x");

    // burn composed: (x - mean) / sqrt(var + eps), biased variance (Chainer).
    let x2 = Tensor::<2>::from_data(data, &dev).require_grad();
    let mean = x2.clone().mean_dim(1);
    let centred = x2.clone() - mean;
    let var = centred.clone().powi_scalar(2).mean_dim(1);
    let y2 = centred / (var + 1e-5).sqrt();
    let grads2 = (y2.clone() * upstream).sum().backward();
    let gx2 = x2.grad(&grads2).expect("gradient of x2");

    let fwd = max_diff(y.inner(), y2.inner());
    let bwd = max_diff(gx, gx2);
    assert!(fwd < 1e-5, "forward differs by {fwd}");
    assert!(bwd < 1e-5, "gradient differs by {bwd}");
}

#[test]
fn weight_standardization_runs_on_a_plain_device_too() {
    let shared = Shared::of(&Default::default()).expect("shared device");
    let dev = shared.burn_device();
    let x = Tensor::<2>::random([8, 20], Distribution::Uniform(-1.0, 1.0), &dev);
    let y = weight_standardization(&WeightStandardization::default(), x.clone()).unwrap();
    let mean: f32 = y.clone().mean().into_scalar();
    assert!(mean.abs() < 1e-5, "rows standardized: mean {mean}");
}

#[test]
fn weight_norm_gradients_match_burn_composition() {
    use wgnorm::WeightNorm;
    use wgnorm_burn::weight_norm;
    let shared = Shared::of(&Default::default()).expect("shared device");
    let plain = shared.burn_device();
    let dev = plain.clone().autodiff();
    let (rows, cols) = (24, 60);
    let vd =
        Tensor::<2>::random([rows, cols], Distribution::Uniform(-1.0, 1.0), &plain).into_data();
    let gd = Tensor::<2>::random([rows, 1], Distribution::Uniform(0.5, 2.0), &plain).into_data();
    let upstream = Tensor::<2>::random([rows, cols], Distribution::Uniform(-1.0, 1.0), &dev);

    let (g, v) = (
        Tensor::<2>::from_data(gd.clone(), &dev).require_grad(),
        Tensor::<2>::from_data(vd.clone(), &dev).require_grad(),
    );
    let w = weight_norm(&WeightNorm::default(), g.clone(), v.clone()).unwrap();
    let grads = (w.clone() * upstream.clone()).sum().backward();

    // burn composed: g * v / ||v|| per row.
    let (g2, v2) = (
        Tensor::<2>::from_data(gd, &dev).require_grad(),
        Tensor::<2>::from_data(vd, &dev).require_grad(),
    );
    let norm = v2.clone().powi_scalar(2).sum_dim(1).sqrt();
    let w2 = v2.clone() * g2.clone() / norm;
    let grads2 = (w2.clone() * upstream).sum().backward();

    assert!(max_diff(w.inner(), w2.inner()) < 1e-5);
    let gv = max_diff(v.grad(&grads).unwrap(), v2.grad(&grads2).unwrap());
    let gg = max_diff(g.grad(&grads).unwrap(), g2.grad(&grads2).unwrap());
    assert!(gv < 1e-5, "grad v differs by {gv}");
    assert!(gg < 1e-5, "grad g differs by {gg}");
}
