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
