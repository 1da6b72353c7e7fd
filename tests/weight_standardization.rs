//! Weight Standardization on the GPU against the f64 CPU reference.

mod common;

use common::{assert_close, ctx, ctx_with_binding, Rng};
use ndarray::{ArrayD, IxDyn};
use wgnorm::reference::weight_standardization as reference;
use wgnorm::{Context, Error, Recording, Tensor, Variance, WeightStandardization};

/// f32 kernels against the f64 reference: outputs are O(1), so a few ulp of the
/// statistics show up as ~1e-6; gradients go through two reductions.
const OUTPUT_RTOL: f32 = 1e-4;
const OUTPUT_ATOL: f32 = 1e-4;
const GRAD_RTOL: f32 = 1e-3;
const GRAD_ATOL: f32 = 1e-4;
/// Norm-relative error allowed whatever the order of the elements (see
/// `statistics_do_not_depend_on_element_order`): a few times the f32 floor of that data.
const ORDER_RTOL: f64 = 2e-5;

fn check(ctx: &Context, config: &WeightStandardization, w: &ArrayD<f32>, g: &ArrayD<f32>) {
    let what = format!("{:?} {config:?}", w.shape());
    let tw = Tensor::from_array(ctx, w).unwrap();
    let tg = Tensor::from_array(ctx, g).unwrap();
    // The fused path here; forward and backward alone are checked by the tests below.
    let step = config.forward_backward(ctx, &tw, &tg).unwrap();
    let got = ctx.read_all(&[&step.output, &step.grad]).unwrap();
    let want_out = reference::forward(config, w.view()).unwrap();
    let want_grad = reference::backward(config, w.view(), g.view()).unwrap();
    // Gradients are of order |g| * rstd; scale the absolute tolerance with them.
    let scale = want_grad.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
    assert_close(
        &format!("output {what}"),
        &got[0],
        &want_out,
        OUTPUT_RTOL,
        OUTPUT_ATOL,
    );
    assert_close(
        &format!("grad {what}"),
        &got[1],
        &want_grad,
        GRAD_RTOL,
        GRAD_ATOL * scale,
    );
}

/// 24 seeded random shapes of rank 2 to 5, sizes not multiples of 8, 64 or 256, both
/// variances and both output axes, plus the 1 x N and N x 1 weights.
#[test]
fn random_shapes_match_the_reference() {
    let ctx = ctx();
    let mut rng = Rng::new(2024);
    let mut shapes: Vec<Vec<usize>> = vec![
        vec![1, 1000],
        vec![1000, 1],
        vec![257, 513],
        vec![3, 5000],
        vec![64, 3, 7, 7],
        vec![13, 11, 3, 3],
        vec![5, 7, 3, 3, 3],
    ];
    while shapes.len() < 24 {
        let rank = 2 + rng.below(4);
        let shape: Vec<usize> = (0..rank)
            .map(|i| {
                if i < 2 {
                    1 + rng.below(70)
                } else {
                    1 + rng.below(6)
                }
            })
            .collect();
        shapes.push(shape);
    }
    for (i, shape) in shapes.iter().enumerate() {
        let variance = if i % 2 == 0 {
            Variance::Biased
        } else {
            Variance::Unbiased
        };
        let axis = if i % 3 == 2 { 1 } else { 0 };
        let config = WeightStandardization {
            eps: if i % 4 == 3 { 1e-8 } else { 1e-5 },
            variance,
            axis,
        };
        let per_channel: usize = shape.iter().product::<usize>() / shape[axis];
        let config = if per_channel < 2 {
            WeightStandardization {
                variance: Variance::Biased,
                ..config
            }
        } else {
            config
        };
        let w = rng.array(shape, 0.1, 0.5);
        let g = rng.array(shape, 0.0, 1.0);
        check(&ctx, &config, &w, &g);
    }
}

/// Weights with mean 100 and std 0.01: E[x^2] - E[x]^2 in f32 would return noise.
#[test]
fn large_offset_is_stable() {
    let ctx = ctx();
    let mut rng = Rng::new(7);
    for shape in [vec![8, 4096], vec![16, 3, 33, 33]] {
        let w = rng.array(&shape, 100.0, 0.01);
        let g = rng.array(&shape, 0.0, 1.0);
        let config = WeightStandardization::default();
        let tw = Tensor::from_array(&ctx, &w).unwrap();
        let got = config.forward(&ctx, &tw).unwrap().to_array(&ctx).unwrap();
        let want = reference::forward(&config, w.view()).unwrap();
        // Inputs are f32 near 100: each carries ~4e-6 of rounding, 4e-4 of one std.
        assert_close("offset output", &got, &want, 2e-3, 2e-3);
        let tg = Tensor::from_array(&ctx, &g).unwrap();
        let got = config
            .backward(&ctx, &tw, &tg)
            .unwrap()
            .to_array(&ctx)
            .unwrap();
        let want = reference::backward(&config, w.view(), g.view()).unwrap();
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert_close("offset grad", &got, &want, 2e-3, 2e-3 * scale);
    }
}

/// Bindings capped at 16 KiB: every reduction and elementwise pass is split into
/// windows, along rows, along channels and within a row.
#[test]
fn split_bindings_match_the_reference() {
    let ctx = ctx_with_binding(16 * 1024);
    assert_eq!(ctx.info().max_binding_bytes, 16 * 1024);
    let mut rng = Rng::new(99);
    for (shape, axis) in [
        (vec![3, 20000], 0),   // a row larger than a binding
        (vec![50, 300], 0),    // many rows per binding
        (vec![3, 300, 15], 1), // deconvolution layout, channels split
        (vec![2, 500, 9], 1),  // a whole outer row larger than a binding
        (vec![33, 17, 5, 3], 0),
    ] {
        let config = WeightStandardization {
            axis,
            ..WeightStandardization::labml()
        };
        let w = rng.array(&shape, -0.3, 2.0);
        let g = rng.array(&shape, 0.0, 1.0);
        check(&ctx, &config, &w, &g);
    }
}

/// One weight larger than the storage binding limit: the adapter's own where it is at
/// most 128 MiB (lavapipe and llvmpipe: a 132 MiB weight), else capped at 128 MiB with
/// the adapter's thread layout (GPUs bind 2 GiB: a weight past that and its f64
/// reference took 60-90 s on an H100).
#[test]
fn weight_larger_than_one_binding() {
    let ctx = wgnorm::Context::headless_with(wgnorm::ContextOptions {
        max_binding_bytes: Some(128 << 20),
        tuning: None,
    })
    .unwrap();
    let limit = ctx.info().max_binding_bytes;
    let rows = 64;
    let cols = (limit / 4 / rows as u64 + 1_000_000 / rows as u64) as usize;
    let shape = [rows, cols];
    let bytes = (rows * cols * 4) as u64;
    assert!(bytes > limit, "{bytes} <= {limit}");
    if bytes > ctx.info().max_buffer_bytes {
        panic!(
            "the adapter's largest buffer ({} bytes) is smaller than the test weight",
            ctx.info().max_buffer_bytes
        );
    }
    let mut rng = Rng::new(3);
    let w = rng.array(&shape, 0.5, 1.0);
    let g = rng.array(&shape, 0.0, 1.0);
    check(&ctx, &WeightStandardization::default(), &w, &g);
}

#[test]
fn non_contiguous_views_upload_in_logical_order() {
    let ctx = ctx();
    let mut rng = Rng::new(5);
    let base = rng.array(&[40, 30], 0.0, 1.0);
    let transposed = base.t();
    let t = Tensor::from_array(&ctx, &transposed).unwrap();
    assert_eq!(t.shape(), &[30, 40]);
    assert_eq!(t.to_array(&ctx).unwrap(), transposed.to_owned());
    let config = WeightStandardization::default();
    let got = config.forward(&ctx, &t).unwrap().to_array(&ctx).unwrap();
    let want = reference::forward(&config, transposed.view()).unwrap();
    assert_close("transposed", &got, &want, OUTPUT_RTOL, OUTPUT_ATOL);
}

/// Many layers in one recording, one submission, one readback.
#[test]
fn many_layers_in_one_submission() {
    let ctx = ctx();
    let mut rng = Rng::new(11);
    let shapes = [
        vec![64, 3, 7, 7],
        vec![64, 64, 3, 3],
        vec![128, 64, 1, 1],
        vec![10, 512],
        // Rows past the row kernels' limit: the split reduction path.
        vec![3, 17_000],
    ];
    let weights: Vec<ArrayD<f32>> = shapes.iter().map(|s| rng.array(s, 0.0, 0.1)).collect();
    let tensors: Vec<Tensor> = weights
        .iter()
        .map(|w| Tensor::from_array(&ctx, w).unwrap())
        .collect();
    let config = WeightStandardization::default();
    let mut rec = Recording::new(&ctx);
    let outs: Vec<Tensor> = tensors
        .iter()
        .map(|t| config.record_forward(&mut rec, t).unwrap())
        .collect();
    assert!(rec.dispatches() >= shapes.len());
    rec.submit().unwrap();
    let got = ctx.read_all(&outs.iter().collect::<Vec<_>>()).unwrap();
    for (w, g) in weights.iter().zip(&got) {
        let want = reference::forward(&config, w.view()).unwrap();
        assert_close("layer", g, &want, OUTPUT_RTOL, OUTPUT_ATOL);
    }
}

/// One context used from several threads at once: pipelines are built once and
/// every thread's results are right.
#[test]
fn one_context_from_many_threads() {
    let ctx = ctx();
    let built_before = ctx.pipelines_built();
    std::thread::scope(|s| {
        for t in 0..6u64 {
            let ctx = &ctx;
            s.spawn(move || {
                let mut rng = Rng::new(100 + t);
                for _ in 0..3 {
                    let shape = [1 + rng.below(50), 1 + rng.below(300)];
                    let w = rng.array(&shape, 1.0, 3.0);
                    let g = rng.array(&shape, 0.0, 1.0);
                    check(ctx, &WeightStandardization::default(), &w, &g);
                }
            });
        }
    });
    // These weights (rows of at most 300 on axis 0) take the row kernels: forward and
    // grad, each scalar or vec4, so 2 to 4 kernels. Each is built once, so more work
    // builds none.
    let built = ctx.pipelines_built() - built_before;
    assert!((2..=4).contains(&built), "{built} pipelines built");
    let mut rng = Rng::new(1);
    let w = rng.array(&[7, 33], 0.0, 1.0);
    check(&ctx, &WeightStandardization::default(), &w, &w);
    assert_eq!(ctx.pipelines_built() - built_before, built);
}

#[test]
fn bad_input_is_a_typed_error_naming_the_op() {
    let ctx = ctx();
    let ws = WeightStandardization::default();
    let expect_input_error = |r: wgnorm::Result<Tensor>, needle: &str| match r {
        Err(e @ Error::InvalidInput { op, .. }) => {
            assert_eq!(op, "weight_standardization");
            let msg = e.to_string();
            assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
            assert!(msg.starts_with("weight_standardization: "), "{msg}");
        }
        Err(e) => panic!("wrong error for {needle}: {e}"),
        Ok(_) => panic!("accepted bad input ({needle})"),
    };
    let t = |shape: &[usize]| Tensor::from_array(&ctx, &ArrayD::<f32>::ones(IxDyn(shape))).unwrap();
    expect_input_error(ws.forward(&ctx, &t(&[0, 5])), "empty");
    expect_input_error(ws.forward(&ctx, &t(&[4, 0, 3])), "empty");
    expect_input_error(ws.forward(&ctx, &t(&[5])), "rank >= 2");
    expect_input_error(ws.forward(&ctx, &t(&[])), "rank >= 2");
    for eps in [0.0, -1e-5, f32::NAN, f32::INFINITY] {
        let bad = WeightStandardization { eps, ..ws };
        expect_input_error(bad.forward(&ctx, &t(&[3, 4])), "eps");
    }
    let bad_axis = WeightStandardization { axis: 2, ..ws };
    expect_input_error(bad_axis.forward(&ctx, &t(&[3, 4])), "axis 2");
    expect_input_error(ws.backward(&ctx, &t(&[3, 4]), &t(&[4, 3])), "grad_output");
    expect_input_error(
        WeightStandardization::labml().forward(&ctx, &t(&[3, 1])),
        "at least 2",
    );
    // The reference refuses the same inputs.
    assert!(reference::forward(&ws, ArrayD::<f32>::ones(IxDyn(&[5])).view()).is_err());
}

#[test]
fn one_element_channels_standardize_to_zero_when_biased() {
    // var = 0 for a single element: (x - x) / sqrt(eps) = 0, gradient 0.
    let ctx = ctx();
    let w = ArrayD::from_shape_vec(IxDyn(&[4, 1]), vec![1.0, -2.0, 3.5, 1e6]).unwrap();
    let g = ArrayD::from_shape_vec(IxDyn(&[4, 1]), vec![1.0, 1.0, -1.0, 2.0]).unwrap();
    check(&ctx, &WeightStandardization::default(), &w, &g);
    let tw = Tensor::from_array(&ctx, &w).unwrap();
    let out = WeightStandardization::default()
        .forward(&ctx, &tw)
        .unwrap()
        .to_array(&ctx)
        .unwrap();
    assert!(out.iter().all(|&v| v == 0.0), "{out:?}");
}

/// Statistics do not depend on which element comes first: a row of 16383 values
/// `1e4 + N(0, 1e-2)` with one value set to 0, first, in the middle or last,
/// standardizes to within a small multiple of the f32 rounding floor of the f64
/// reference, forward and backward. The floor: the mean, stored in f32 near 1e4, is off
/// by up to half an ulp (5e-4) against deviations of 0.6, about 6e-6 of the output's
/// norm. With the outlier first the shift of the whole row's sums used to be the
/// outlier: 1.1e-2.
#[test]
fn statistics_do_not_depend_on_element_order() {
    let config = WeightStandardization::default();
    for (name, ctx) in [
        ("default", ctx()),
        ("other layout", common::ctx_other_layout()),
    ] {
        for outlier in [0, 8191, 16382] {
            let mut rng = Rng::new(21);
            let mut w = rng.array(&[2, 16383], 1e4, 1e-2);
            w[[0, outlier]] = 0.0;
            w[[1, 16382 - outlier]] = 0.0;
            let g = rng.array(&[2, 16383], 0.0, 1.0);
            let tw = Tensor::from_array(&ctx, &w).unwrap();
            let tg = Tensor::from_array(&ctx, &g).unwrap();
            let step = config.forward_backward(&ctx, &tw, &tg).unwrap();
            let got = ctx.read_all(&[&step.output, &step.grad]).unwrap();
            let want = [
                reference::forward(&config, w.view()).unwrap(),
                reference::backward(&config, w.view(), g.view()).unwrap(),
            ];
            for (what, got, want) in [("output", &got[0], &want[0]), ("grad", &got[1], &want[1])] {
                let err = common::relative_error(got, want);
                assert!(
                    err <= ORDER_RTOL,
                    "{name}, outlier at {outlier}: {what} relative error {err}"
                );
            }
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(common::property_cases(64)))]
    /// Random shapes, axes, flavours, thread layouts and binding caps (see
    /// `common::property_contexts`) against the f64 reference, forward and backward.
    #[test]
    fn property_random_configs_match_the_reference(
        shape in common::property_shape(48, 6),
        axis in proptest::prelude::any::<proptest::sample::Index>(),
        labml in proptest::prelude::any::<bool>(),
        context in proptest::prelude::any::<proptest::sample::Index>(),
        seed in proptest::prelude::any::<u64>(),
    ) {
        let base = if labml { WeightStandardization::labml() } else { WeightStandardization::chainer() };
        let config = WeightStandardization { axis: axis.index(shape.len()), ..base };
        // labml's unbiased variance needs two elements per channel (refused otherwise).
        let per_channel = shape.iter().product::<usize>() / shape[config.axis];
        proptest::prop_assume!(!labml || per_channel > 1);
        let mut rng = Rng::new(seed);
        let w = rng.array(&shape, -0.3, 2.0);
        let g = rng.array(&shape, 0.0, 1.0);
        check(context.get(common::property_contexts()), &config, &w, &g);
    }
}

/// Many short rows (axis 0) take the row kernels, which keep no per-channel scratch:
/// more rows than a binding holds statistics for (2000 x 16 bytes past a 16 KiB cap)
/// still standardize, forward and backward.
#[test]
fn more_rows_than_a_binding_of_statistics_use_the_row_kernels() {
    let ctx = ctx_with_binding(16 * 1024);
    let mut rng = Rng::new(17);
    let w = rng.array(&[2000, 3, 1, 1], 0.5, 1.0);
    let g = rng.array(&[2000, 3, 1, 1], 0.0, 1.0);
    check(&ctx, &WeightStandardization::default(), &w, &g);
}

/// More output channels than a binding holds statistics for (16 bytes each: 1024 fill a
/// 16 KiB cap) where the row kernels do not apply (output axis 1, or rows longer than
/// theirs): the op runs in groups of channels (issue 14: refused as `TooLarge` before),
/// forward and backward, in both thread layouts.
#[test]
fn more_channels_than_a_binding_of_statistics() {
    let mut rng = Rng::new(43);
    for ctx in common::ctx_with_binding_both_layouts(16 * 1024) {
        for (shape, axis) in [
            (vec![3, 2500], 1),       // deconvolution layout, rows strided
            (vec![2, 1300, 3], 1),    // and rows of 3
            (vec![2, 2052, 2, 2], 1), // rows a multiple of 4 (vec4)
        ] {
            let config = WeightStandardization {
                axis,
                ..WeightStandardization::labml()
            };
            let w = rng.array(&shape, 0.3, 1.0);
            let g = rng.array(&shape, 0.0, 1.0);
            check(&ctx, &config, &w, &g);
        }
    }
}
