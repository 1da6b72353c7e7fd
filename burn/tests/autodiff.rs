//! wgnorm's weight standardization as a burn autodiff op: forward and gradient match
//! burn's own composition of it (burn's autodiff through its tensor ops).

mod common;

use burn::tensor::{Distribution, Tensor};
use common::{max_diff, max_diff_values, values};
use wgnorm::WeightStandardization;
use wgnorm_burn::{weight_standardization, Shared};

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

/// PyTorch's spectral-norm parametrization in training: one power iteration from the
/// stored `v` (u = normalize(W v), then v = normalize(W^T u)), sigma = u^T W v with `u` and `v` held constant, W / sigma.
#[test]
fn spectral_norm_training_matches_burn_composition() {
    use wgnorm::SpectralNorm;
    use wgnorm_burn::spectral_norm;
    let shared = Shared::of(&Default::default()).expect("shared device");
    let plain = shared.burn_device();
    let dev = plain.clone().autodiff();
    let (rows, cols) = (20, 36);
    let wd =
        Tensor::<2>::random([rows, cols], Distribution::Uniform(-1.0, 1.0), &plain).into_data();
    let upstream = Tensor::<2>::random([rows, cols], Distribution::Uniform(-1.0, 1.0), &dev);
    let sn = SpectralNorm::pytorch();
    let seed_w = shared
        .view(&Tensor::<2>::from_data(wd.clone(), &plain))
        .unwrap();
    let mut state = sn.init_state(&shared.ctx, &seed_w, 3).unwrap();
    let u0: Vec<f32> = state
        .u
        .to_array(&shared.ctx)
        .unwrap()
        .iter()
        .copied()
        .collect();

    let w = Tensor::<2>::from_data(wd.clone(), &dev).require_grad();
    let y = spectral_norm(&sn, w.clone(), &mut state, true).unwrap();
    let grads = (y.clone() * upstream.clone()).sum().backward();
    let u_after: Vec<f32> = state
        .u
        .to_array(&shared.ctx)
        .unwrap()
        .iter()
        .copied()
        .collect();

    // burn composed.
    let w2 = Tensor::<2>::from_data(wd, &dev).require_grad();
    let normalize = |t: Tensor<1>| {
        let n = t.clone().powi_scalar(2).sum().sqrt().clamp_min(1e-12);
        t / n
    };
    let wc = w2.clone().detach();
    let u = Tensor::<1>::from_floats(u0.as_slice(), &dev);
    let v = normalize(
        wc.clone()
            .transpose()
            .matmul(u.reshape([rows, 1]))
            .reshape([cols]),
    );
    let u = normalize(wc.matmul(v.clone().reshape([cols, 1])).reshape([rows]));
    let wv = w2.clone().matmul(v.reshape([cols, 1])).reshape([rows]);
    let sigma = (u.clone() * wv).sum();
    let y2 = w2.clone() / sigma.reshape([1, 1]);
    let grads2 = (y2.clone() * upstream.clone()).sum().backward();

    // The gradient in f64 from the forward's own u, v (the state after it):
    // G / sigma - <G, W> / sigma^2 u v^T.
    let v_after: Vec<f32> = state
        .v
        .to_array(&shared.ctx)
        .unwrap()
        .iter()
        .copied()
        .collect();
    let wv = values(w2.clone().inner());
    let gv = values(upstream.inner());
    let (r_of, c_of) = (|k: usize| k / cols, |k: usize| k % cols);
    let sigma: f64 = (0..rows * cols)
        .map(|k| u_after[r_of(k)] as f64 * wv[k] as f64 * v_after[c_of(k)] as f64)
        .sum();
    let gw: f64 = wv.iter().zip(&gv).map(|(a, b)| *a as f64 * *b as f64).sum();
    let exact: Vec<f64> = (0..rows * cols)
        .map(|k| {
            gv[k] as f64 / sigma
                - gw / (sigma * sigma) * u_after[r_of(k)] as f64 * v_after[c_of(k)] as f64
        })
        .collect();
    let off = |t: Tensor<2>| {
        values(t)
            .iter()
            .zip(&exact)
            .map(|(a, e)| (*a as f64 - e).abs())
            .fold(0.0f64, f64::max)
    };
    let yv = values(y.inner());
    let fwd = yv
        .iter()
        .zip(&wv)
        .map(|(a, w)| (*a as f64 - *w as f64 / sigma).abs())
        .fold(0.0f64, f64::max);
    let burn_fwd = max_diff_values(&values(y2.inner()), &yv);
    let bwd = off(w.grad(&grads).unwrap());
    let burn_bwd = off(w2.grad(&grads2).unwrap());
    let du = max_diff_values(&u_after, &values(u.inner()));
    assert!(fwd < 1e-5, "forward differs from the f64 one by {fwd}");
    assert!(
        burn_fwd < 1e-2,
        "burn's composed forward is off by {burn_fwd}"
    );
    assert!(bwd < 1e-5, "gradient differs from the f64 one by {bwd}");
    // burn's own composition (its matmul and reductions in f32 on this adapter) lands
    // 1e-5 to 2e-3 from the exact values, run to run: wgnorm is held to the f64 ones,
    // burn's only to a bound that a different formula (values up to about 0.2) would
    // break.
    assert!(
        burn_bwd < 1e-2,
        "burn's composed gradient is off by {burn_bwd}"
    );
    assert!(du < 1e-5, "the state's u differs by {du}");
}

/// PyTorch-style batch-norm training as a burn op: output and the gradients of x,
/// gamma and beta against burn's composition, running statistics updated.
#[test]
fn batch_norm_training_gradients_match_burn_composition() {
    use wgnorm::{BatchNorm, BatchNormMode, BatchNormState};
    use wgnorm_burn::batch_norm;
    let shared = Shared::of(&Default::default()).expect("shared device");
    let plain = shared.burn_device();
    let dev = plain.clone().autodiff();
    let (n, c, h, w) = (4, 6, 5, 4);
    let xd =
        Tensor::<4>::random([n, c, h, w], Distribution::Uniform(-2.0, 3.0), &plain).into_data();
    let gd = Tensor::<1>::random([c], Distribution::Uniform(0.5, 1.5), &plain).into_data();
    let bd = Tensor::<1>::random([c], Distribution::Uniform(-0.5, 0.5), &plain).into_data();
    let upstream = Tensor::<4>::random([n, c, h, w], Distribution::Uniform(-1.0, 1.0), &dev);
    let mut state = BatchNormState::new(&shared.ctx, c).unwrap();

    let x = Tensor::<4>::from_data(xd.clone(), &dev).require_grad();
    let gamma = Tensor::<1>::from_data(gd.clone(), &dev).require_grad();
    let beta = Tensor::<1>::from_data(bd.clone(), &dev).require_grad();
    let y = batch_norm(
        &BatchNorm::pytorch(),
        x.clone(),
        gamma.clone(),
        beta.clone(),
        &mut state,
        BatchNormMode::Train,
    )
    .unwrap();
    let grads = (y.clone() * upstream.clone()).sum().backward();
    assert_eq!(state.num_updates, 1);

    let x2 = Tensor::<4>::from_data(xd, &dev).require_grad();
    let gamma2 = Tensor::<1>::from_data(gd, &dev).require_grad();
    let beta2 = Tensor::<1>::from_data(bd, &dev).require_grad();
    let mean = x2.clone().mean_dim(0).mean_dim(2).mean_dim(3);
    let centred = x2.clone() - mean;
    let var = centred
        .clone()
        .powi_scalar(2)
        .mean_dim(0)
        .mean_dim(2)
        .mean_dim(3);
    let y2 = centred / (var + 1e-5).sqrt() * gamma2.clone().reshape([1, c, 1, 1])
        + beta2.clone().reshape([1, c, 1, 1]);
    let grads2 = (y2.clone() * upstream).sum().backward();

    let fwd = max_diff(y.inner(), y2.inner());
    let gx = max_diff(x.grad(&grads).unwrap(), x2.grad(&grads2).unwrap());
    let gg = max_diff(gamma.grad(&grads).unwrap(), gamma2.grad(&grads2).unwrap());
    let gb = max_diff(beta.grad(&grads).unwrap(), beta2.grad(&grads2).unwrap());
    assert!(fwd < 1e-5, "forward differs by {fwd}");
    assert!(gx < 1e-5, "grad x differs by {gx}");
    assert!(gg < 1e-5, "grad gamma differs by {gg}");
    assert!(gb < 1e-5, "grad beta differs by {gb}");
}

/// Inputs on an autodiff device and on a plain one: an error, and the state untouched.
#[test]
fn mixed_autodiff_and_plain_inputs_are_refused_before_anything_runs() {
    use wgnorm::{BatchNorm, BatchNormMode, BatchNormState};
    use wgnorm_burn::batch_norm;
    let shared = Shared::of(&Default::default()).expect("shared device");
    let plain = shared.burn_device();
    let dev = plain.clone().autodiff();
    let x =
        Tensor::<4>::random([2, 3, 4, 4], Distribution::Uniform(-1.0, 1.0), &dev).require_grad();
    let gamma = Tensor::<1>::ones([3], &plain);
    let beta = Tensor::<1>::zeros([3], &dev).require_grad();
    let mut state = BatchNormState::new(&shared.ctx, 3).unwrap();
    let err = batch_norm(
        &BatchNorm::pytorch(),
        x,
        gamma,
        beta,
        &mut state,
        BatchNormMode::Train,
    )
    .unwrap_err();
    assert!(err.to_string().contains("batch_norm"), "{err}");
    assert_eq!(state.num_updates, 0);
}
