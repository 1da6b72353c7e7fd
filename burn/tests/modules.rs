//! wgnorm's burn modules: spectral, weight norm and weight standardization as
//! reparameterizations of burn's own layers' weights, and the batch-norm replacement,
//! against f64 values, burn's composition of the same formulas and `burn::nn::BatchNorm`.

mod common;

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNormConfig as BurnBatchNormConfig, Linear, LinearConfig};
use burn::tensor::{Distribution, Tensor};
use common::{max_diff, values};
use wgnorm_burn::{
    with_spectral_norm, with_weight_norm, with_weight_standardization, BatchNorm, BatchNormConfig,
    Shared, SpectralNormReparam,
};

/// The tolerance of every comparison here (issue 18: 1e-5).
const TOL: f32 = 1e-5;

fn devices() -> (burn::tensor::Device, burn::tensor::Device) {
    let shared = Shared::of(&Default::default()).expect("shared device");
    let plain = shared.burn_device();
    (plain.clone(), plain.autodiff())
}

fn norm(x: &[f64]) -> f64 {
    x.iter().map(|a| a * a).sum::<f64>().sqrt()
}

/// `M x` of a row-major `rows x cols` matrix, in f64.
fn matvec(m: &[f32], rows: usize, cols: usize, x: &[f64]) -> Vec<f64> {
    (0..rows)
        .map(|r| (0..cols).map(|c| m[r * cols + c] as f64 * x[c]).sum())
        .collect()
}

/// `M^T x`, in f64.
fn matvec_t(m: &[f32], rows: usize, cols: usize, x: &[f64]) -> Vec<f64> {
    (0..cols)
        .map(|c| (0..rows).map(|r| m[r * cols + c] as f64 * x[r]).sum())
        .collect()
}

fn largest_off(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn spectral_norm_on_a_burn_conv_trains_as_pytorch_parametrization() {
    let (_, dev) = devices();
    let conv: Conv2d = Conv2dConfig::new([3, 6], [3, 3]).init(&dev);
    let mut paths = Vec::new();
    let conv = with_spectral_norm(conv, wgnorm::SpectralNorm::pytorch(), 7, |path, dims| {
        paths.push(path.to_string());
        dims.len() == 4
    })
    .unwrap();
    assert!(paths.iter().any(|p| p.ends_with("weight")), "{paths:?}");
    let sn = conv
        .weight
        .reparameterization::<SpectralNormReparam>()
        .expect("attached to the weight");
    assert!(
        conv.bias
            .as_ref()
            .unwrap()
            .reparameterization::<SpectralNormReparam>()
            .is_none(),
        "the bias is left alone"
    );
    let (rows, cols) = (6, 27);
    let w = values(conv.weight.base().inner());
    let (u0, v0) = (values(sn.u.value()), values(sn.v.value()));
    assert_eq!((u0.len(), v0.len()), (rows, cols));

    // One training forward: u = normalize(W v), v = normalize(W^T u), W / (u^T W v).
    let x = Tensor::<4>::random([2, 3, 8, 8], Distribution::Uniform(-1.0, 1.0), &dev);
    let y = conv.forward(x);
    assert_eq!(y.dims(), [2, 6, 6, 6]);
    let v0: Vec<f64> = v0.iter().map(|&a| a as f64).collect();
    let u1 = matvec(&w, rows, cols, &v0);
    let u1: Vec<f64> = u1.iter().map(|a| a / norm(&u1)).collect();
    let v1 = matvec_t(&w, rows, cols, &u1);
    let v1: Vec<f64> = v1.iter().map(|a| a / norm(&v1)).collect();
    let sn = conv
        .weight
        .reparameterization::<SpectralNormReparam>()
        .unwrap();
    assert!(largest_off(&values(sn.u.value_sync()), &u1) < TOL as f64);
    assert!(largest_off(&values(sn.v.value_sync()), &v1) < TOL as f64);

    // The gradient of the weight through sigma, u and v constant:
    // G / sigma - <G, W> / sigma^2 u v^T, with G the gradient of the effective weight.
    let upstream = Tensor::<4>::random([6, 3, 3, 3], Distribution::Uniform(-1.0, 1.0), &dev);
    let effective = conv.weight.val();
    let grads = (effective.clone() * upstream.clone()).sum().backward();
    // That second val() ran one more iteration: its u and v are the ones below.
    let g = values(
        conv.weight
            .base()
            .grad(&grads)
            .expect("gradient of the weight"),
    );
    let sn = conv
        .weight
        .reparameterization::<SpectralNormReparam>()
        .unwrap();
    let (u2, v2) = (values(sn.u.value_sync()), values(sn.v.value_sync()));
    let sigma2: f64 = (0..rows * cols)
        .map(|k| u2[k / cols] as f64 * w[k] as f64 * v2[k % cols] as f64)
        .sum();
    let up = values(upstream);
    let gw: f64 = up.iter().zip(&w).map(|(a, b)| *a as f64 * *b as f64).sum();
    let exact: Vec<f64> = (0..rows * cols)
        .map(|k| {
            up[k] as f64 / sigma2
                - gw / (sigma2 * sigma2) * u2[k / cols] as f64 * v2[k % cols] as f64
        })
        .collect();
    assert!(largest_off(&g, &exact) < TOL as f64, "gradient");
    let w_sn: Vec<f64> = w.iter().map(|a| *a as f64 / sigma2).collect();
    assert!(
        largest_off(&values(effective.inner()), &w_sn) < TOL as f64,
        "training weight W / sigma"
    );

    // Evaluation (burn's valid()): the stored u, v, sigma = u^T W v, no iteration.
    let eval = conv.valid();
    let before = values(
        eval.weight
            .reparameterization::<SpectralNormReparam>()
            .unwrap()
            .u
            .value(),
    );
    let we = values(eval.weight.val());
    let expected: Vec<f64> = w.iter().map(|a| *a as f64 / sigma2).collect();
    assert!(
        largest_off(&we, &expected) < TOL as f64,
        "evaluation weight"
    );
    let after = values(
        eval.weight
            .reparameterization::<SpectralNormReparam>()
            .unwrap()
            .u
            .value(),
    );
    assert_eq!(before, after, "evaluation keeps u");
}

#[test]
fn spectral_norm_state_round_trips_through_a_burn_record() {
    let (plain, _) = devices();
    let make = |seed| {
        let conv: Conv2d = Conv2dConfig::new([2, 4], [3, 3]).init(&plain);
        with_spectral_norm(conv, wgnorm::SpectralNorm::pytorch(), seed, |_, d| {
            d.len() == 4
        })
        .unwrap()
    };
    let a = make(1);
    let record = a.clone().into_record();
    let bytes = record.into_bytes().unwrap();
    let b = make(2).load_record(burn::store::ModuleRecord::from_bytes(bytes).unwrap());
    let sa = a
        .weight
        .reparameterization::<SpectralNormReparam>()
        .unwrap();
    let sb = b
        .weight
        .reparameterization::<SpectralNormReparam>()
        .unwrap();
    assert_eq!(values(sa.u.value()), values(sb.u.value()), "u loaded");
    assert_eq!(values(sa.v.value()), values(sb.v.value()), "v loaded");
    assert!(max_diff(a.weight.val(), b.weight.val()) < TOL);
}

#[test]
fn weight_norm_on_a_burn_linear_matches_burn_composition() {
    let (_, dev) = devices();
    // burn's Linear weight is [d_input, d_output]: PyTorch's dim=0 (per output) is axis 1.
    let linear: Linear = LinearConfig::new(12, 5).init(&dev);
    let w0 = linear.weight.val();
    let linear = with_weight_norm(linear, 1, |path, _| path.ends_with("weight")).unwrap();
    assert!(
        max_diff(linear.weight.val().inner(), w0.inner()) < TOL,
        "g starts as the norms: the weight is unchanged"
    );
    let x = Tensor::<2>::random([7, 12], Distribution::Uniform(-1.0, 1.0), &dev);
    let upstream = Tensor::<2>::random([7, 5], Distribution::Uniform(-1.0, 1.0), &dev);
    let grads = (linear.forward(x.clone()) * upstream.clone())
        .sum()
        .backward();
    let wn = linear
        .weight
        .reparameterization::<wgnorm_burn::WeightNormReparam>()
        .unwrap();
    let gv = linear.weight.base().grad(&grads).expect("gradient of v");
    let gg = wn.g.val().grad(&grads).expect("gradient of g");

    // burn composed: g * v / ||v|| per column, the same values.
    let v2 = Tensor::<2>::from_data(linear.weight.base().into_data(), &dev).require_grad();
    let g2 = Tensor::<1>::from_data(wn.g.val().into_data(), &dev).require_grad();
    let w2 = v2.clone() * g2.clone().reshape([1, 5]) / v2.clone().powi_scalar(2).sum_dim(0).sqrt();
    let y2 = x.matmul(w2) + linear.bias.as_ref().unwrap().val().reshape([1, 5]);
    let grads2 = (y2 * upstream).sum().backward();
    assert!(
        max_diff(gv, v2.grad(&grads2).unwrap()) < TOL,
        "gradient of v"
    );
    assert!(
        max_diff(gg, g2.grad(&grads2).unwrap()) < TOL,
        "gradient of g"
    );
}

#[test]
fn weight_standardization_on_a_burn_conv_matches_burn_composition() {
    let (_, dev) = devices();
    let conv: Conv2d = Conv2dConfig::new([4, 8], [3, 3]).init(&dev);
    let conv =
        with_weight_standardization(conv, wgnorm::WeightStandardization::chainer(), |_, d| {
            d.len() == 4
        });
    let upstream = Tensor::<4>::random([8, 4, 3, 3], Distribution::Uniform(-1.0, 1.0), &dev);
    let grads = (conv.weight.val() * upstream.clone()).sum().backward();
    let g = conv.weight.base().grad(&grads).unwrap();

    let w2 = Tensor::<4>::from_data(conv.weight.base().into_data(), &dev).require_grad();
    let flat = w2.clone().reshape([8, 36]);
    let centred = flat.clone() - flat.mean_dim(1);
    let var = centred.clone().powi_scalar(2).mean_dim(1);
    let ws = (centred / (var + 1e-5).sqrt()).reshape([8, 4, 3, 3]);
    let grads2 = (ws.clone() * upstream).sum().backward();
    assert!(max_diff(conv.weight.val().inner(), ws.inner()) < TOL);
    assert!(max_diff(g, w2.grad(&grads2).unwrap()) < TOL);
}

#[test]
fn batch_norm_replacement_matches_burn_batch_norm() {
    let (_, dev) = devices();
    let ours = BatchNormConfig::new(5).init(&dev).unwrap();
    let theirs = BurnBatchNormConfig::new(5).init(&dev);
    let gamma = Tensor::<1>::random([5], Distribution::Uniform(0.5, 1.5), &dev);
    let beta = Tensor::<1>::random([5], Distribution::Uniform(-0.5, 0.5), &dev);
    let ours = BatchNorm {
        gamma: burn::module::Param::from_tensor(gamma.clone()),
        beta: burn::module::Param::from_tensor(beta.clone()),
        ..ours
    };
    let theirs = burn::nn::BatchNorm {
        gamma: burn::module::Param::from_tensor(gamma),
        beta: burn::module::Param::from_tensor(beta),
        ..theirs
    };
    for step in 0..3 {
        let xd = Tensor::<4>::random([4, 5, 6, 7], Distribution::Normal(1.0, 2.0), &dev);
        let up = Tensor::<4>::random([4, 5, 6, 7], Distribution::Uniform(-1.0, 1.0), &dev);
        let (x1, x2) = (
            Tensor::<4>::from_data(xd.clone().into_data(), &dev).require_grad(),
            Tensor::<4>::from_data(xd.into_data(), &dev).require_grad(),
        );
        let (y1, y2) = (ours.forward(x1.clone()), theirs.forward(x2.clone()));
        let g1 = (y1.clone() * up.clone()).sum().backward();
        let g2 = (y2.clone() * up).sum().backward();
        let at = format!("step {step}");
        assert!(max_diff(y1.inner(), y2.inner()) < TOL, "{at}: output");
        assert!(
            max_diff(x1.grad(&g1).unwrap(), x2.grad(&g2).unwrap()) < TOL,
            "{at}: gradient of x"
        );
        for (a, b, what) in [
            (&ours.gamma, &theirs.gamma, "gamma"),
            (&ours.beta, &theirs.beta, "beta"),
        ] {
            let (ga, gb) = (a.val().grad(&g1).unwrap(), b.val().grad(&g2).unwrap());
            assert!(max_diff(ga, gb) < TOL, "{at}: gradient of {what}");
        }
        let rm = max_diff(
            ours.running_mean.value_sync(),
            theirs.running_mean.value_sync(),
        );
        let rv = max_diff(
            ours.running_var.value_sync(),
            theirs.running_var.value_sync(),
        );
        assert!(rm < TOL && rv < TOL, "{at}: running statistics {rm} {rv}");
    }
    // Evaluation with the running statistics.
    let x = Tensor::<3>::random([3, 5, 10], Distribution::Normal(1.0, 2.0), &dev);
    let (ours, theirs) = (ours.valid(), theirs.valid());
    let (y1, y2) = (ours.forward(x.clone().inner()), theirs.forward(x.inner()));
    assert!(max_diff(y1, y2) < TOL, "evaluation");
}

#[test]
fn a_burn_batch_norm_record_loads_into_the_replacement() {
    let (plain, dev) = devices();
    let theirs = BurnBatchNormConfig::new(4).init(&dev);
    for _ in 0..2 {
        let x = Tensor::<2>::random([16, 4], Distribution::Normal(3.0, 2.0), &dev);
        let _ = theirs.forward(x);
    }
    let theirs = burn::nn::BatchNorm {
        gamma: burn::module::Param::from_tensor(Tensor::from_floats([1.5, 0.5, 2.0, 1.0], &dev)),
        ..theirs
    };
    let bytes = theirs.into_record().into_bytes().unwrap();
    let record = || burn::store::ModuleRecord::from_bytes(bytes.clone()).unwrap();
    // The checkpoint in burn's own BatchNorm and in the replacement.
    let theirs = BurnBatchNormConfig::new(4)
        .init(&plain)
        .load_record(record())
        .valid();
    let ours = BatchNormConfig::new(4)
        .init(&plain)
        .unwrap()
        .load_record(record())
        .valid();
    for (a, b, what) in [
        (&ours.gamma, &theirs.gamma, "gamma"),
        (&ours.beta, &theirs.beta, "beta"),
    ] {
        assert_eq!(values(a.val()), values(b.val()), "{what}");
    }
    let rm = values(ours.running_mean.value());
    assert!(
        rm.iter().all(|m| m.abs() > 0.1),
        "running mean loaded: {rm:?}"
    );
    assert_eq!(rm, values(theirs.running_mean.value()));
    assert_eq!(
        values(ours.running_var.value()),
        values(theirs.running_var.value())
    );
    let x = Tensor::<2>::random([8, 4], Distribution::Normal(3.0, 2.0), &plain);
    assert!(max_diff(ours.forward(x.clone()), theirs.forward(x)) < TOL);
}

#[test]
fn a_training_step_of_the_modules_makes_no_host_round_trip() {
    let shared = Shared::of(&Default::default()).unwrap();
    let dev = shared.burn_device().autodiff();
    let conv: Conv2d = Conv2dConfig::new([3, 4], [3, 3]).init(&dev);
    let conv = with_spectral_norm(conv, wgnorm::SpectralNorm::pytorch(), 1, |_, d| {
        d.len() == 4
    })
    .unwrap();
    let bn = BatchNormConfig::new(4).init(&dev).unwrap();
    let x = Tensor::<4>::random([2, 3, 8, 8], Distribution::Normal(0.0, 1.0), &dev);
    let before = shared.ctx.host_round_trips();
    let y = bn.forward(conv.forward(x));
    let grads = y.powi_scalar(2).mean().backward();
    assert_eq!(shared.ctx.host_round_trips(), before, "no readback or wait");
    // The check can fail: a readback of the state counts.
    let sn = conv
        .weight
        .reparameterization::<SpectralNormReparam>()
        .unwrap();
    let _ = shared
        .view(&sn.u.value_sync().inner())
        .unwrap()
        .to_array(&shared.ctx)
        .unwrap();
    assert!(shared.ctx.host_round_trips() > before);
    let _ = grads;
}

#[test]
fn batch_norm_after_a_burn_convolution_runs_in_its_memory_order() {
    let shared = Shared::of(&Default::default()).unwrap();
    let dev = shared.burn_device().autodiff();
    let conv: Conv2d = Conv2dConfig::new([3, 5], [3, 3]).init(&dev);
    let ours = BatchNormConfig::new(5).init(&dev).unwrap();
    let theirs = BurnBatchNormConfig::new(5).init(&dev);
    let x = Tensor::<4>::random([3, 3, 9, 7], Distribution::Normal(0.0, 1.0), &dev);
    let h = conv.forward(x).detach().require_grad();
    // burn's convolution returns channels-last strides: no row-major view of it.
    let strided = shared.view(&h.clone().inner()).is_err();
    let up = Tensor::<4>::random(h.dims(), Distribution::Uniform(-1.0, 1.0), &dev);
    let (y1, y2) = (ours.forward(h.clone()), theirs.forward(h.clone()));
    let g1 = (y1.clone() * up.clone()).sum().backward();
    let gx1 = h.grad(&g1).unwrap();
    let g2 = (y2.clone() * up).sum().backward();
    let gx2 = h.grad(&g2).unwrap();
    assert!(max_diff(y1.inner(), y2.inner()) < TOL, "output");
    assert!(max_diff(gx1, gx2) < TOL, "gradient of the input");
    let rm = max_diff(
        ours.running_mean.value_sync(),
        theirs.running_mean.value_sync(),
    );
    assert!(rm < TOL, "running mean {rm}");
    assert!(
        strided,
        "burn 0.22.1's convolution gives channels-last strides: the path under test"
    );
}
