//! Spectral Normalization on the GPU against the f64 CPU reference.

mod common;

use common::{assert_close, ctx, ctx_with_binding, Rng};
use ndarray::{Array1, Array2, ArrayD, IxDyn};
use wgnorm::reference::spectral_norm as reference;
use wgnorm::{
    Context, Error, SpectralFlavor, SpectralNorm, SpectralNormGrads, SpectralNormState, Tensor,
};

/// f32 kernels against the f64 reference. Outputs are O(1) (W / sigma); the vectors
/// are unit vectors; one power iteration amplifies f32 rounding only mildly.
const RTOL: f32 = 1e-3;
const ATOL: f32 = 1e-4;

struct Case {
    config: SpectralNorm,
    shape: Vec<usize>,
    training: bool,
}

fn state_for(
    ctx: &Context,
    config: &SpectralNorm,
    shape: &[usize],
    rng: &mut Rng,
) -> (Vec<f32>, Vec<f32>, f32, SpectralNormState) {
    let (rows, cols) = config.matrix_shape(shape).unwrap();
    let u: Vec<f32> = (0..rows).map(|_| rng.normal()).collect();
    let v: Vec<f32> = (0..cols).map(|_| rng.normal()).collect();
    let gamma = 1.5 + rng.normal().abs();
    let state = SpectralNormState {
        u: Tensor::from_slice(ctx, &[rows], &u).unwrap(),
        v: Tensor::from_slice(ctx, &[cols], &v).unwrap(),
        gamma: config
            .use_gamma
            .then(|| Tensor::from_slice(ctx, &[1], &[gamma]).unwrap()),
        sigma: None,
    };
    (u, v, gamma, state)
}

fn check(ctx: &Context, case: &Case, rng: &mut Rng) {
    let Case {
        config,
        shape,
        training,
    } = case;
    let what = format!("{shape:?} training={training} {config:?}");
    let w = rng.array(shape, 0.0, 1.0);
    let gw = rng.array(shape, 0.0, 1.0);
    let (u0, v0, gamma, mut state) = state_for(ctx, config, shape, rng);
    let tw = Tensor::from_array(ctx, &w).unwrap();
    let tgw = Tensor::from_array(ctx, &gw).unwrap();
    let (
        fwd,
        SpectralNormGrads {
            weight: grad,
            gamma: grad_gamma,
        },
    ) = ctx
        .run(|rec| {
            let fwd = config.record_forward(rec, &tw, &mut state, *training)?;
            let grads = config.record_backward(rec, &tw, &tgw, &fwd, &state)?;
            Ok((fwd, grads))
        })
        .unwrap();
    let got = ctx
        .read_all(&[
            &fwd.weight,
            &fwd.u,
            &fwd.v,
            &fwd.sigma,
            &grad,
            &state.u,
            &state.v,
        ])
        .unwrap();
    let want = reference::forward(config, w.view(), &u0, &v0, gamma, *training).unwrap();
    let (want_grad, want_gg) =
        reference::backward(config, w.view(), gw.view(), &want, gamma).unwrap();
    let scale = |a: &ArrayD<f32>| a.iter().fold(1f32, |m, x| m.max(x.abs()));
    assert_close(
        &format!("output {what}"),
        &got[0],
        &want.output,
        RTOL,
        ATOL * scale(&want.output),
    );
    assert_close(
        &format!("u {what}"),
        &got[1],
        &want.u.clone().into_dyn(),
        RTOL,
        ATOL,
    );
    assert_close(
        &format!("v {what}"),
        &got[2],
        &want.v.clone().into_dyn(),
        RTOL,
        ATOL,
    );
    assert_close(
        &format!("sigma {what}"),
        &got[3],
        &ArrayD::from_shape_vec(IxDyn(&[1]), vec![want.sigma]).unwrap(),
        RTOL,
        0.0,
    );
    assert_close(
        &format!("grad {what}"),
        &got[4],
        &want_grad,
        RTOL,
        ATOL * scale(&want_grad),
    );
    // The state: new vectors in training, untouched in evaluation.
    let (keep_u, keep_v) = if *training {
        (want.u.clone(), want.v.clone())
    } else {
        (Array1::from(u0.clone()), Array1::from(v0.clone()))
    };
    assert_close(
        &format!("state u {what}"),
        &got[5],
        &keep_u.into_dyn(),
        RTOL,
        ATOL,
    );
    assert_close(
        &format!("state v {what}"),
        &got[6],
        &keep_v.into_dyn(),
        RTOL,
        ATOL,
    );
    match grad_gamma {
        Some(gg) => {
            let gg = gg.to_array(ctx).unwrap();
            let want = ArrayD::from_shape_vec(IxDyn(&[1]), vec![want_gg]).unwrap();
            assert_close(
                &format!("grad_gamma {what}"),
                &gg,
                &want,
                RTOL,
                ATOL * scale(&want),
            );
        }
        None => assert!(!config.use_gamma, "{what}: no grad_gamma"),
    }
}

fn configs(axis: usize) -> Vec<SpectralNorm> {
    let mut out = Vec::new();
    for flavor in [SpectralFlavor::Chainer, SpectralFlavor::PyTorch] {
        let base = match flavor {
            SpectralFlavor::Chainer => SpectralNorm::chainer(),
            SpectralFlavor::PyTorch => SpectralNorm::pytorch(),
        };
        out.push(SpectralNorm { axis, ..base });
        out.push(SpectralNorm {
            axis,
            n_power_iterations: 3,
            factor: Some(0.7),
            use_gamma: true,
            ..base
        });
    }
    out
}

#[test]
fn gpu_matches_reference_on_random_shapes() {
    let ctx = ctx();
    let mut rng = Rng::new(31);
    let shapes: &[&[usize]] = &[
        &[10, 7],
        &[1, 300],
        &[300, 1],
        &[65, 129],
        &[32, 16, 3, 3],
        &[17, 5, 3, 3],
        &[3, 67, 5],
        &[5, 3, 3, 3, 3],
        &[2, 3, 4, 5, 6],
        &[4, 700],
    ];
    for shape in shapes {
        for axis in 0..shape.len().min(2) {
            check_configs(&ctx, shape, axis, &mut rng);
        }
    }
}

/// Vectors longer than 16 Ki elements (`u` of a tall weight, `v` of a wide one) are
/// normalized and dotted by many workgroups: the same results as one.
#[test]
fn long_vectors_match_the_reference() {
    let ctx = ctx();
    let mut rng = Rng::new(77);
    for shape in [&[20_001usize, 3][..], &[2, 17_000], &[9000, 2, 2]] {
        check_configs(&ctx, shape, 0, &mut rng);
    }
}

/// Every config of `axis`, training and not, on one shape.
fn check_configs(ctx: &Context, shape: &[usize], axis: usize, rng: &mut Rng) {
    for config in configs(axis) {
        for training in [true, false] {
            let case = Case {
                config,
                shape: shape.to_vec(),
                training,
            };
            check(ctx, &case, rng);
        }
    }
}

/// Bindings capped at 16 KiB (4096 elements, windows of 4032 after alignment) take
/// the splits of the large-tensor path: several `a` per box and runs of rows. (`u` and
/// `v` must each fit one binding as a vec4 per element, so no row of `M` is longer
/// than a window.)
#[test]
fn split_bindings_match_reference() {
    let ctx = ctx_with_binding(16 * 1024);
    let mut rng = Rng::new(5);
    let shapes: &[(&[usize], usize)] = &[
        (&[64, 300], 0),      // runs of rows
        (&[12, 1000], 0),     // a few whole rows per box
        (&[40, 30, 3, 3], 1), // [R, J] matrices of several `a` per box
        (&[3, 40, 200], 1),   // one `a` per box, split into runs of rows
    ];
    for (shape, axis) in shapes {
        for config in configs(*axis) {
            let case = Case {
                config,
                shape: shape.to_vec(),
                training: true,
            };
            check(&ctx, &case, &mut rng);
        }
    }
}

/// `u` and `v` longer than one binding holds their products' vec4s (`M v` and `M^T u`
/// keep a vec4 per element: 4096 fill a 64 KiB cap) are normalized, dotted and summed
/// in windows: tall (the row kernel's output in windows), wide (column sums in
/// windows), strided (`M v` by the reduction in slice groups) weights, both flavours,
/// training and evaluation, in both thread layouts (issue 14: `TooLarge` before). `u`
/// and `v` themselves (f32, bound whole) fit one binding: 16384 elements here.
#[test]
fn vectors_longer_than_a_binding_of_vec4s() {
    let mut rng = Rng::new(53);
    for ctx in common::ctx_with_binding_both_layouts(64 * 1024) {
        let shapes: &[(&[usize], usize)] = &[
            (&[12_000, 3], 0),
            (&[5000, 2, 2], 0),
            (&[2, 9000], 0),
            (&[3, 6000, 2], 1),
        ];
        for (shape, axis) in shapes {
            check_configs(&ctx, shape, *axis, &mut rng);
        }
    }
}

/// `u` or `v` themselves longer than one binding (f32: 16384 elements fill a 64 KiB
/// cap): every kernel binds its part of them (the column sums' rows of u and slots of
/// their partials, `M v`'s boxes' elements of v, the normalizations' runs, the
/// gradient's runs of whole matrices, of rows, or of pieces of a row). Tall, wide,
/// wide through many `a`, rows a multiple of 4; both flavours, training and
/// evaluation, in both thread layouts (issue 14: `TooLarge` before).
#[test]
fn vectors_longer_than_a_binding() {
    let mut rng = Rng::new(59);
    for ctx in common::ctx_with_binding_both_layouts(64 * 1024) {
        let shapes: &[(&[usize], usize)] = &[
            (&[20_000, 3], 0),
            (&[17_000, 4], 0),
            (&[2, 20_000], 0),
            (&[3000, 2, 7], 1),
        ];
        for (shape, axis) in shapes {
            check_configs(&ctx, shape, *axis, &mut rng);
        }
    }
}

/// Many weights (both flavors, both axes) normalized in one submission.
#[test]
fn many_layers_in_one_submission() {
    let ctx = ctx();
    let mut rng = Rng::new(8);
    let shapes: [&[usize]; 4] = [&[16, 8, 3, 3], &[8, 16, 3, 3], &[100, 30], &[7, 5]];
    let mut layers = Vec::new();
    for (i, shape) in shapes.iter().enumerate() {
        let config = SpectralNorm {
            axis: i % 2,
            ..if i < 2 {
                SpectralNorm::chainer()
            } else {
                SpectralNorm::pytorch()
            }
        };
        let w = rng.array(shape, 0.0, 1.0);
        let (u, v, _, state) = state_for(&ctx, &config, shape, &mut rng);
        layers.push((config, w, u, v, state));
    }
    let mut rec = wgnorm::Recording::new(&ctx);
    let mut outs = Vec::new();
    for (config, w, _, _, state) in layers.iter_mut() {
        let tw = Tensor::from_array(&ctx, w).unwrap();
        outs.push(config.record_forward(&mut rec, &tw, state, true).unwrap());
    }
    rec.submit().unwrap();
    for ((config, w, u, v, _), out) in layers.iter().zip(&outs) {
        let want = reference::forward(config, w.view(), u, v, 1.0, true).unwrap();
        let got = out.weight.to_array(&ctx).unwrap();
        assert_close("layer output", &got, &want.output, RTOL, ATOL * 10.0);
    }
}

/// A matrix with known singular values, U diag(s) V^T with random orthonormal U, V
/// (Gram-Schmidt in f64).
fn with_singular_values(rng: &mut Rng, rows: usize, cols: usize, s: &[f64]) -> Array2<f32> {
    let k = s.len();
    let orthonormal = |rng: &mut Rng, n: usize| -> Vec<Vec<f64>> {
        let mut basis: Vec<Vec<f64>> = Vec::new();
        while basis.len() < k {
            let mut x: Vec<f64> = (0..n).map(|_| f64::from(rng.normal())).collect();
            for b in &basis {
                let d: f64 = x.iter().zip(b).map(|(a, b)| a * b).sum();
                x.iter_mut().zip(b).for_each(|(a, b)| *a -= d * b);
            }
            let n: f64 = x.iter().map(|a| a * a).sum::<f64>().sqrt();
            basis.push(x.into_iter().map(|a| a / n).collect());
        }
        basis
    };
    let u = orthonormal(rng, rows);
    let v = orthonormal(rng, cols);
    Array2::from_shape_fn((rows, cols), |(r, c)| {
        (0..k).map(|i| s[i] * u[i][r] * v[i][c]).sum::<f64>() as f32
    })
}

#[test]
fn estimate_sigma_reaches_the_top_singular_value() {
    let ctx = ctx();
    let mut rng = Rng::new(77);
    // Known spectrum with a 10% gap.
    let s = [5.0, 4.5, 3.0, 1.0, 0.5];
    let w = with_singular_values(&mut rng, 96, 80, &s);
    let tw = Tensor::from_array(&ctx, &w).unwrap();
    let u: Vec<f32> = (0..96).map(|_| rng.normal()).collect();
    let tu = Tensor::from_slice(&ctx, &[96], &u).unwrap();
    for config in [SpectralNorm::chainer(), SpectralNorm::pytorch()] {
        let est = config.estimate_sigma(&ctx, &tw, &tu, 1e-7, 1000).unwrap();
        assert!(est.converged, "{config:?}: {est:?}");
        assert!(est.iterations < 1000);
        let err = (f64::from(est.sigma) - 5.0).abs() / 5.0;
        assert!(
            err < 1e-4,
            "{config:?}: sigma {} vs 5 after {}",
            est.sigma,
            est.iterations
        );
    }
    // A random Gaussian matrix against the f64 reference's power iteration, on axis 1.
    let w = rng.array(&[20, 48, 3, 3], 0.0, 1.0);
    let want = reference::top_singular_value(w.view(), 1).unwrap();
    let tw = Tensor::from_array(&ctx, &w).unwrap();
    let config = SpectralNorm {
        axis: 1,
        ..SpectralNorm::chainer()
    };
    let u: Vec<f32> = (0..48).map(|_| rng.normal()).collect();
    let tu = Tensor::from_slice(&ctx, &[48], &u).unwrap();
    let est = config.estimate_sigma(&ctx, &tw, &tu, 1e-7, 5000).unwrap();
    let err = (f64::from(est.sigma) - want).abs() / want;
    assert!(
        err < 1e-4,
        "sigma {} vs {want} after {}",
        est.sigma,
        est.iterations
    );
    // Without convergence within the limit: the iterations run are reported.
    let est = config.estimate_sigma(&ctx, &tw, &tu, 0.0, 3).unwrap();
    assert_eq!(est.iterations, 3);
    // rtol 0 needs two bit-identical estimates: not after 3 iterations from random u.
    assert!(!est.converged, "{est:?}");
    assert!(
        est.sigma > 0.0 && est.sigma <= want as f32 * 1.0001,
        "{est:?}"
    );
}

#[test]
fn init_state_follows_each_framework() {
    let ctx = ctx();
    let mut rng = Rng::new(3);
    let w = with_singular_values(&mut rng, 40, 30, &[3.0, 2.0, 1.0]);
    let tw = Tensor::from_array(&ctx, &w).unwrap();
    let norm = |a: &ArrayD<f32>| a.iter().map(|x| x * x).sum::<f32>().sqrt();
    // PyTorch: unit u and v after 15 warm-up iterations, v = normalize(M^T u).
    let torch = SpectralNorm::pytorch();
    let st = torch.init_state(&ctx, &tw, 11).unwrap();
    let (u, v) = (st.u.to_array(&ctx).unwrap(), st.v.to_array(&ctx).unwrap());
    assert!((norm(&u) - 1.0).abs() < 1e-5 && (norm(&v) - 1.0).abs() < 1e-5);
    let mtu: Vec<f64> = (0..30)
        .map(|c| {
            (0..40)
                .map(|r| f64::from(w[[r, c]]) * f64::from(u[[r]]))
                .sum()
        })
        .collect();
    let n: f64 = mtu.iter().map(|x| x * x).sum::<f64>().sqrt();
    for c in 0..30 {
        assert!((mtu[c] / n - f64::from(v[[c]])).abs() < 1e-4);
    }
    // Seeded: the same seed gives the same state.
    let again = torch.init_state(&ctx, &tw, 11).unwrap();
    assert_eq!(again.u.to_array(&ctx).unwrap(), u);
    // Chainer with use_gamma: gamma is the top singular value, u a raw normal vector.
    let chainer = SpectralNorm {
        use_gamma: true,
        ..SpectralNorm::chainer()
    };
    let st = chainer.init_state(&ctx, &tw, 11).unwrap();
    let gamma = st.gamma.unwrap().to_array(&ctx).unwrap()[[0]];
    assert!((gamma - 3.0).abs() < 1e-3, "gamma {gamma}");
    let u = st.u.to_array(&ctx).unwrap();
    assert!(
        (norm(&u) - 1.0).abs() > 1e-3,
        "Chainer's initial u is not normalized"
    );
}

/// An all-zero weight: no NaN or Inf; the weight passes through (zero), sigma is 0,
/// the gradient is gamma * grad.
/// A NaN anywhere in W makes sigma NaN and the output NaN everywhere, as in PyTorch
/// and Chainer (it used to be taken for a zero sigma and W passed through unscaled).
#[test]
fn a_nan_in_the_weight_gives_nan() {
    let ctx = ctx();
    let mut w = ArrayD::from_shape_fn(IxDyn(&[6, 4, 3]), |i| (i[0] + 2 * i[1] + i[2]) as f32);
    w[[2, 1, 0]] = f32::NAN;
    let tw = Tensor::from_array(&ctx, &w).unwrap();
    for config in [SpectralNorm::chainer(), SpectralNorm::pytorch()] {
        let mut state = config
            .init_state(
                &ctx,
                &Tensor::from_array(&ctx, &w.mapv(|x| if x.is_nan() { 1.0 } else { x })).unwrap(),
                1,
            )
            .unwrap();
        let fwd = config.forward(&ctx, &tw, &mut state, true).unwrap();
        let got = ctx.read_all(&[&fwd.weight, &fwd.sigma]).unwrap();
        assert!(got[1][[0]].is_nan(), "{config:?}: sigma {}", got[1][[0]]);
        assert!(
            got[0].iter().all(|x| x.is_nan()),
            "{config:?}: {:?}",
            got[0]
        );
    }
}

#[test]
fn zero_weight_is_finite() {
    let ctx = ctx();
    for config in [
        SpectralNorm::chainer(),
        SpectralNorm::pytorch(),
        SpectralNorm {
            use_gamma: true,
            ..SpectralNorm::chainer()
        },
    ] {
        let tw = Tensor::zeros(&ctx, &[8, 3, 3, 3]).unwrap();
        let g = ArrayD::from_shape_fn(IxDyn(&[8, 3, 3, 3]), |i| i[0] as f32 - 3.5);
        let tg = Tensor::from_array(&ctx, &g).unwrap();
        let mut state = config.init_state(&ctx, &tw, 1).unwrap();
        let gamma = state
            .gamma
            .as_ref()
            .map_or(1.0, |t| t.to_array(&ctx).unwrap()[[0]]);
        assert_eq!(gamma, if config.use_gamma { 0.0 } else { 1.0 });
        let fwd = config.forward(&ctx, &tw, &mut state, true).unwrap();
        let grad = config
            .backward(&ctx, &tw, &tg, &fwd, &state)
            .unwrap()
            .weight;
        let got = ctx
            .read_all(&[&fwd.weight, &fwd.sigma, &grad, &state.u])
            .unwrap();
        assert!(
            got.iter().all(|a| a.iter().all(|x| x.is_finite())),
            "{config:?}"
        );
        assert!(got[0].iter().all(|&x| x == 0.0));
        assert_eq!(got[1][[0]], 0.0);
        assert_close("grad", &got[2], &g.mapv(|x| x * gamma), 0.0, 0.0);
    }
}

#[test]
fn bad_input_is_refused_and_leaves_the_state() {
    let ctx = ctx();
    let w = Tensor::from_array(&ctx, &ndarray::Array2::<f32>::eye(6)).unwrap();
    let sn = SpectralNorm::chainer();
    let mut state = sn.init_state(&ctx, &w, 2).unwrap();
    let u_before = state.u.to_array(&ctx).unwrap();
    let refuse = |config: SpectralNorm, state: &mut SpectralNormState, w: &Tensor, needle: &str| {
        let err = config.forward(&ctx, w, state, true).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::InvalidInput { .. }), "{msg}");
        assert!(msg.starts_with("spectral_norm:"), "{msg}");
        assert!(msg.contains(needle), "{msg} lacks {needle}");
    };
    refuse(
        SpectralNorm {
            n_power_iterations: 0,
            ..sn
        },
        &mut state,
        &w,
        "n_power_iterations",
    );
    refuse(
        SpectralNorm {
            eps: f32::NAN,
            ..sn
        },
        &mut state,
        &w,
        "eps",
    );
    refuse(SpectralNorm { axis: 2, ..sn }, &mut state, &w, "axis 2");
    refuse(
        SpectralNorm {
            factor: Some(0.0),
            ..sn
        },
        &mut state,
        &w,
        "factor",
    );
    refuse(
        SpectralNorm {
            use_gamma: true,
            ..sn
        },
        &mut state,
        &w,
        "gamma",
    );
    let mut wrong_u = state.clone();
    wrong_u.u = Tensor::zeros(&ctx, &[5]).unwrap();
    refuse(sn, &mut wrong_u, &w, "u has shape [5]");
    let mut wrong_v = state.clone();
    wrong_v.v = Tensor::zeros(&ctx, &[7]).unwrap();
    refuse(sn, &mut wrong_v, &w, "v has shape [7]");
    let empty = Tensor::zeros(&ctx, &[0, 3]).unwrap();
    refuse(sn, &mut state, &empty, "empty");
    let rank1 = Tensor::zeros(&ctx, &[6]).unwrap();
    refuse(sn, &mut state, &rank1, "rank");
    // Backward: a gradient of the wrong shape.
    let fwd = sn.forward(&ctx, &w, &mut state, false).unwrap();
    let g = Tensor::zeros(&ctx, &[6, 5]).unwrap();
    let err = sn.backward(&ctx, &w, &g, &fwd, &state).unwrap_err();
    assert!(
        err.to_string().contains("grad_output has shape [6, 5]"),
        "{err}"
    );
    // Nothing above touched u (evaluation does not store it either).
    assert_eq!(state.u.to_array(&ctx).unwrap(), u_before);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(common::property_cases(64)))]
    /// Random shapes, both axes, every config of `configs`, training or not, thread
    /// layouts and binding caps (see `common::property_contexts`) against the f64
    /// reference. `M` stays within 1024 columns, so that `u` and `v` fit the 16 KiB cap.
    #[test]
    fn property_random_configs_match_the_reference(
        shape in common::property_shape(20, 5),
        axis in 0usize..2,
        config in proptest::prelude::any::<proptest::sample::Index>(),
        training in proptest::prelude::any::<bool>(),
        context in proptest::prelude::any::<proptest::sample::Index>(),
        seed in proptest::prelude::any::<u64>(),
    ) {
        let case = Case {
            config: *config.get(&configs(axis)),
            shape,
            training,
        };
        check(context.get(common::property_contexts()), &case, &mut Rng::new(seed));
    }
}
