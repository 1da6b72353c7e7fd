//! Issue 14: sums of squares that cannot overflow. Weights near 1e19 and beyond (their
//! squares past f32's range) give the f64 reference's answer on every path (row
//! kernels, split reductions, channels-last reductions, long spectral-norm vectors),
//! both thread layouts and small binding caps, also when only a few elements are huge.
//! Before the scaled sums: weight norm returned 0, weight standardization `x /
//! sqrt(eps)`, spectral norm passed the weight through.

mod common;

use common::{ctx, ctx_other_layout, ctx_with_binding, relative_error, Rng};
use ndarray::ArrayD;
use wgnorm::reference::{
    batch_norm as bn_ref, spectral_norm as sn_ref, weight_norm as wn_ref,
    weight_standardization as ws_ref,
};
use wgnorm::{
    BatchNorm, BatchNormMode, BatchNormState, Context, NormAxes, SpectralNorm, SpectralNormState,
    Tensor, WeightNorm, WeightStandardization,
};

/// Relative error (2-norm) allowed against f64: a few f32 roundings.
const RTOL: f64 = 1e-5;

fn contexts() -> Vec<(&'static str, Context)> {
    vec![
        ("default", ctx()),
        ("other layout", ctx_other_layout()),
        ("16 KiB bindings", ctx_with_binding(16 * 1024)),
    ]
}

/// Data of `shape` at `magnitude`: all of it (`few` false), or standard normal with one
/// element in 50 that large (threads with and without huge values, combined).
fn data(rng: &mut Rng, shape: &[usize], magnitude: f32, few: bool) -> ArrayD<f32> {
    let mut a = rng.array(shape, 0.0, 1.0);
    for (i, x) in a.iter_mut().enumerate() {
        if !few {
            *x *= magnitude;
        } else if i % 50 == 7 {
            *x = magnitude * x.signum().max(0.5);
        }
    }
    a
}

fn check(what: &str, got: &ArrayD<f32>, want: &ArrayD<f32>) {
    assert!(
        got.iter().all(|x| x.is_finite()),
        "{what}: not finite (first values {:?})",
        got.iter().take(4).collect::<Vec<_>>()
    );
    let err = relative_error(got, want);
    assert!(err <= RTOL, "{what}: relative error {err}");
}

/// Shapes and axes per path: short contiguous rows (row kernels), rows past the row
/// kernels' limit (split reduction), a middle axis (split reduction, strided), the last
/// axis of 32 channels (channels-last reduction).
const CASES: [(&[usize], usize); 4] = [
    (&[8, 300], 0),
    (&[3, 17_000], 0),
    (&[6, 10, 7], 1),
    (&[64, 32], 1),
];

#[test]
fn weight_norm_of_huge_weights() {
    for (name, ctx) in contexts() {
        let mut rng = Rng::new(3);
        for (shape, axis) in CASES {
            for (magnitude, few) in [(1e19, false), (1e30, false), (1e20, true)] {
                let what = format!("{name} {shape:?} axis {axis} {magnitude:e} few={few}");
                let config = WeightNorm {
                    axes: NormAxes::Keep(axis),
                    ..WeightNorm::pytorch(Some(axis))
                };
                let v = data(&mut rng, shape, magnitude, few);
                let mut g_shape = vec![1; shape.len()];
                g_shape[axis] = shape[axis];
                let g = rng.array(&g_shape, 1.0, 0.3);
                let gw = rng.array(shape, 0.0, 1.0);
                let (tv, tg, tgw) = (
                    Tensor::from_array(&ctx, &v).unwrap(),
                    Tensor::from_array(&ctx, &g).unwrap(),
                    Tensor::from_array(&ctx, &gw).unwrap(),
                );
                let w = config.forward(&ctx, &tg, &tv).unwrap();
                let grads = config.backward(&ctx, &tg, &tv, &tgw).unwrap();
                let norms = config.decompose(&ctx, &tv).unwrap().g;
                let got = ctx.read_all(&[&w, &grads.g, &grads.v, &norms]).unwrap();
                let want_w = wn_ref::forward(&config, g.view(), v.view()).unwrap();
                let (want_gg, want_gv) =
                    wn_ref::backward(&config, g.view(), v.view(), gw.view()).unwrap();
                let (want_norms, _) = wn_ref::decompose(&config, v.view()).unwrap();
                check(&format!("W {what}"), &got[0], &want_w);
                check(&format!("grad g {what}"), &got[1], &want_gg);
                check(&format!("grad v {what}"), &got[2], &want_gv);
                check(&format!("norms {what}"), &got[3], &want_norms);
            }
        }
    }
}

#[test]
fn weight_standardization_of_huge_weights() {
    for (name, ctx) in contexts() {
        let mut rng = Rng::new(4);
        for (shape, axis) in CASES {
            for (magnitude, few) in [(1e19, false), (1e30, false), (1e20, true)] {
                let what = format!("{name} {shape:?} axis {axis} {magnitude:e} few={few}");
                let config = WeightStandardization {
                    axis,
                    ..WeightStandardization::chainer()
                };
                let w = data(&mut rng, shape, magnitude, few);
                let gy = rng.array(shape, 0.0, 1.0);
                let (tw, tg) = (
                    Tensor::from_array(&ctx, &w).unwrap(),
                    Tensor::from_array(&ctx, &gy).unwrap(),
                );
                let step = config.forward_backward(&ctx, &tw, &tg).unwrap();
                let got = ctx.read_all(&[&step.output, &step.grad]).unwrap();
                check(
                    &format!("output {what}"),
                    &got[0],
                    &ws_ref::forward(&config, w.view()).unwrap(),
                );
                check(
                    &format!("grad {what}"),
                    &got[1],
                    &ws_ref::backward(&config, w.view(), gy.view()).unwrap(),
                );
            }
        }
    }
}

#[test]
fn spectral_norm_of_huge_weights() {
    for (name, ctx) in contexts() {
        let mut rng = Rng::new(5);
        // The last shape's u (20,000 rows) takes the long-vector partials.
        for shape in [&[16usize, 40][..], &[20_000, 3]] {
            if shape[0] > 1024 && name.contains("KiB") {
                continue; // u's runs of 4096 vec4s pass a 16 KiB binding: TooLarge (README's limits)
            }
            for (magnitude, few) in [(1e19, false), (1e30, false), (1e20, true)] {
                let what = format!("{name} {shape:?} {magnitude:e} few={few}");
                for config in [SpectralNorm::pytorch(), SpectralNorm::chainer()] {
                    let w = data(&mut rng, shape, magnitude, few);
                    let (rows, cols) = config.matrix_shape(shape).unwrap();
                    let u: Vec<f32> = (0..rows).map(|_| rng.normal()).collect();
                    let v: Vec<f32> = (0..cols).map(|_| rng.normal()).collect();
                    let mut state = SpectralNormState {
                        u: Tensor::from_slice(&ctx, &[rows], &u).unwrap(),
                        v: Tensor::from_slice(&ctx, &[cols], &v).unwrap(),
                        gamma: None,
                        sigma: None,
                    };
                    let tw = Tensor::from_array(&ctx, &w).unwrap();
                    let out = config.forward(&ctx, &tw, &mut state, true).unwrap();
                    let got = ctx.read_all(&[&out.weight, &out.sigma]).unwrap();
                    let want = sn_ref::forward(&config, w.view(), &u, &v, 1.0, true).unwrap();
                    let what = format!("{what} {:?}", config.flavor);
                    check(&format!("output {what}"), &got[0], &want.output);
                    let sigma = ArrayD::from_elem(vec![1], want.sigma);
                    check(&format!("sigma {what}"), &got[1], &sigma);
                }
            }
        }
    }
}

#[test]
fn batch_norm_of_huge_activations() {
    for (name, ctx) in contexts() {
        let mut rng = Rng::new(6);
        for (shape, axis) in [(&[4usize, 6, 5, 5][..], 1isize), (&[4, 5, 5, 8], 3)] {
            for (magnitude, few) in [(1e19, false), (1e20, true)] {
                let what = format!("{name} {shape:?} axis {axis} {magnitude:e} few={few}");
                let config = BatchNorm {
                    feature_axis: axis,
                    scale: false,
                    center: false,
                    ..BatchNorm::pytorch()
                };
                let f = shape[axis as usize];
                let x = data(&mut rng, shape, magnitude, few);
                let (rm, rv) = (vec![0.0; f], vec![1.0; f]);
                let mut state = BatchNormState {
                    running_mean: Tensor::from_slice(&ctx, &[f], &rm).unwrap(),
                    running_var: Tensor::from_slice(&ctx, &[f], &rv).unwrap(),
                    num_updates: 0,
                };
                let tx = Tensor::from_array(&ctx, &x).unwrap();
                let out = config
                    .forward(
                        &ctx,
                        &tx,
                        None,
                        None,
                        Some(&mut state),
                        BatchNormMode::Train,
                    )
                    .unwrap();
                let got = ctx.read_all(&[&out.output, &state.running_mean]).unwrap();
                let want = bn_ref::forward(
                    &config,
                    x.view(),
                    None,
                    None,
                    &rm,
                    &rv,
                    0,
                    BatchNormMode::Train,
                )
                .unwrap();
                check(&format!("output {what}"), &got[0], &want.output);
                check(
                    &format!("running mean {what}"),
                    &got[1],
                    &want.running_mean.into_dyn(),
                );
            }
        }
    }
}
