//! Views of burn tensors: wgnorm's weight standardization of a burn tensor, written
//! into a burn-allocated output, equals burn's own composition of it.

mod common;

use burn::tensor::{Distribution, Tensor};
use common::max_diff;
use wgnorm::{Recording, WeightStandardization};
use wgnorm_burn::Shared;

#[test]
fn weight_standardization_reads_and_writes_burn_buffers_in_place() {
    let shared = Shared::new(Default::default()).expect("shared device");
    let dev = &shared.burn_device();
    let w = Tensor::<2>::random([64, 288], Distribution::Uniform(-1.0, 1.0), dev);
    // burn's composition: (w - mean) / sqrt(var + eps), biased variance (Chainer).
    let mean = w.clone().mean_dim(1);
    let centred = w.clone() - mean;
    let var = centred.clone().powi_scalar(2).mean_dim(1);
    let expected = centred / (var + 1e-5).sqrt();
    let out = Tensor::<2>::zeros([64, 288], dev);
    let (wv, ov) = (shared.view(&w).unwrap(), shared.view(&out).unwrap());
    let mut rec = Recording::new(&shared.ctx);
    rec.write_next_output_to(&ov).unwrap();
    WeightStandardization::default()
        .record_forward(&mut rec, &wv)
        .unwrap();
    rec.submit().unwrap();
    let worst = max_diff(out, expected);
    assert!(worst < 1e-5, "worst difference {worst}");
}

/// PyTorch-style batch norm training on burn tensors: the output is written into a
/// burn tensor and the running statistics, burn tensors too, are updated in place.
#[test]
fn batch_norm_training_updates_burn_running_statistics_in_place() {
    use wgnorm::{BatchNorm, BatchNormMode, BatchNormState};
    let shared = Shared::new(Default::default()).expect("shared device");
    let dev = &shared.burn_device();
    let (n, c, h, w) = (4, 8, 5, 6);
    let x = Tensor::<4>::random([n, c, h, w], Distribution::Uniform(-2.0, 3.0), dev);
    let gamma = Tensor::<1>::random([c], Distribution::Uniform(0.5, 1.5), dev);
    let beta = Tensor::<1>::random([c], Distribution::Uniform(-0.5, 0.5), dev);
    let running_mean = Tensor::<1>::zeros([c], dev);
    let running_var = Tensor::<1>::ones([c], dev);
    let out = Tensor::<4>::zeros([n, c, h, w], dev);

    // burn's own composition (biased variance to normalize, unbiased for the average).
    let count = (n * h * w) as f32;
    let mean4 = x.clone().mean_dim(0).mean_dim(2).mean_dim(3);
    let centred = x.clone() - mean4.clone();
    let var4 = centred
        .clone()
        .powi_scalar(2)
        .mean_dim(0)
        .mean_dim(2)
        .mean_dim(3);
    let expected = centred / (var4.clone() + 1e-5).sqrt() * gamma.clone().reshape([1, c, 1, 1])
        + beta.clone().reshape([1, c, 1, 1]);
    let mean = mean4.reshape([c]);
    let var_unbiased = var4.reshape([c]) * (count / (count - 1.0));
    let expected_mean = mean * 0.1;
    let expected_var = Tensor::<1>::ones([c], dev) * 0.9 + var_unbiased * 0.1;

    let mut state = BatchNormState {
        running_mean: shared.view(&running_mean).unwrap(),
        running_var: shared.view(&running_var).unwrap(),
        num_updates: 0,
    };
    let (xv, gv, bv, ov) = (
        shared.view(&x).unwrap(),
        shared.view(&gamma).unwrap(),
        shared.view(&beta).unwrap(),
        shared.view(&out).unwrap(),
    );
    let trips = shared.ctx.host_round_trips();
    let mut rec = Recording::new(&shared.ctx);
    rec.write_next_output_to(&ov).unwrap();
    BatchNorm::pytorch()
        .record_forward(
            &mut rec,
            &xv,
            Some(&gv),
            Some(&bv),
            Some(&mut state),
            BatchNormMode::Train,
        )
        .unwrap();
    rec.submit().unwrap();
    // No readback and no wait on the step's path: burn reads the results on its own.
    assert_eq!(shared.ctx.host_round_trips(), trips);
    assert_eq!(state.num_updates, 1);
    assert!(max_diff(out, expected) < 1e-5);
    assert!(max_diff(running_mean, expected_mean) < 1e-5);
    assert!(max_diff(running_var, expected_var) < 1e-5);
}

/// A transposed (strided) burn tensor or one of another type has no view: an error,
/// not a view reading the wrong elements.
#[test]
fn strided_or_non_f32_tensors_have_no_view() {
    let shared = Shared::new(Default::default()).expect("shared device");
    let dev = &shared.burn_device();
    let w = Tensor::<2>::random([16, 24], Distribution::Uniform(-1.0, 1.0), dev);
    assert!(shared.view(&w).is_ok());
    let err = shared.view(&w.clone().transpose()).unwrap_err();
    assert!(err.to_string().contains("contiguous"), "{err}");
    let half = w.cast(burn::tensor::DType::F16);
    let err = shared.view(&half).unwrap_err();
    assert!(err.to_string().contains("f32"), "{err}");
}
