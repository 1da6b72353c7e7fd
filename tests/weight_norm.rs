//! Weight Normalization on the GPU against the f64 CPU reference.

mod common;

use common::{assert_close, ctx, ctx_with_binding, Rng};
use ndarray::{ArrayD, IxDyn};
use wgnorm::reference::weight_norm as reference;
use wgnorm::{Context, Error, Tensor, WeightNorm, WeightNormGrads, WeightNormParams};

/// f32 kernels against the f64 reference; outputs and gradients are O(|g|).
const RTOL: f32 = 1e-4;
const ATOL: f32 = 1e-5;

fn check(ctx: &Context, config: &WeightNorm, shape: &[usize], rng: &mut Rng) {
    let what = format!("{shape:?} {config:?}");
    let v = rng.array(shape, 0.2, 1.0);
    let gw = rng.array(shape, 0.0, 1.0);
    let g = rng.array(&config.g_shape(shape).unwrap(), 1.0, 0.5);
    let (tg, tv, tgw) = (
        Tensor::from_array(ctx, &g).unwrap(),
        Tensor::from_array(ctx, &v).unwrap(),
        Tensor::from_array(ctx, &gw).unwrap(),
    );
    let (
        w,
        WeightNormGrads {
            g: grad_g,
            v: grad_v,
        },
    ) = ctx
        .run(|rec| {
            Ok((
                config.record_forward(rec, &tg, &tv)?,
                config.record_backward(rec, &tg, &tv, &tgw)?,
            ))
        })
        .unwrap();
    let got = ctx.read_all(&[&w, &grad_g, &grad_v]).unwrap();
    let want_w = reference::forward(config, g.view(), v.view()).unwrap();
    let (want_gg, want_gv) = reference::backward(config, g.view(), v.view(), gw.view()).unwrap();
    let scale = |a: &ArrayD<f32>| a.iter().fold(1f32, |m, x| m.max(x.abs()));
    assert_close(
        &format!("W {what}"),
        &got[0],
        &want_w,
        RTOL,
        ATOL * scale(&want_w),
    );
    // grad_g sums over a whole slice: allow for the length of the sum.
    assert_close(
        &format!("grad_g {what}"),
        &got[1],
        &want_gg,
        1e-3,
        1e-4 * scale(&want_gg),
    );
    // grad_v = (g/n) G - (g <G, v> / n^3) v is a difference of two terms of size
    // |g/n G| = |W/v G|; where they cancel (one-element slices: exactly 0), f32 leaves
    // an error relative to the terms, not to the result. Scale the tolerance by them.
    let terms = want_w
        .iter()
        .zip(v.iter())
        .zip(gw.iter())
        .filter(|((_, v), _)| **v != 0.0)
        .fold(0f32, |m, ((w, v), g)| m.max((w / v * g).abs()));
    assert_close(
        &format!("grad_v {what}"),
        &got[2],
        &want_gv,
        1e-3,
        1e-4 * scale(&want_gv).max(terms),
    );
}

/// Every kept axis of seeded random rank 2 to 5 tensors, sizes not multiples of the
/// workgroup, plus dim=None and Jittor's first and last axes.
#[test]
fn every_dim_of_random_shapes_matches_the_reference() {
    let ctx = ctx();
    let mut rng = Rng::new(4);
    for rank in 2..=5 {
        for trial in 0..2 {
            let shape: Vec<usize> = (0..rank)
                .map(|i| {
                    if i < 2 {
                        1 + rng.below(40)
                    } else {
                        1 + rng.below(7)
                    }
                })
                .collect();
            for dim in 0..rank {
                check(&ctx, &WeightNorm::pytorch(Some(dim)), &shape, &mut rng);
            }
            check(&ctx, &WeightNorm::pytorch(None), &shape, &mut rng);
            // Jittor's convention: every reduced axis, counted from either end.
            for dim in 0..rank as isize {
                let d = if trial == 0 { dim } else { dim - rank as isize };
                check(&ctx, &WeightNorm::jittor(d), &shape, &mut rng);
            }
        }
    }
    // Long slices that take several partials per slice, and 1 x N / N x 1.
    for shape in [vec![3, 70001], vec![1, 513], vec![513, 1], vec![2, 300, 77]] {
        for dim in 0..shape.len() {
            check(&ctx, &WeightNorm::pytorch(Some(dim)), &shape, &mut rng);
        }
    }
}

#[test]
fn split_bindings_match_the_reference() {
    let ctx = ctx_with_binding(16 * 1024);
    let mut rng = Rng::new(8);
    for (shape, dim) in [
        (vec![3, 20000], 0),
        // Row kernels over several windows, rows a multiple of 4 long and not.
        (vec![300, 64], 0),
        (vec![200, 37], 0),
        // Channels split; per-channel statistics (16 bytes each) fit one binding.
        (vec![3, 300, 15], 1),
        (vec![1000, 3], 1),
    ] {
        check(&ctx, &WeightNorm::pytorch(Some(dim)), &shape, &mut rng);
    }
    check(&ctx, &WeightNorm::pytorch(None), &[50, 400], &mut rng);
    // Jittor, middle axis: batch blocks split across windows.
    check(&ctx, &WeightNorm::jittor(1), &[5, 700, 3], &mut rng);
    check(&ctx, &WeightNorm::jittor(1), &[3, 8, 300], &mut rng);
}

/// Decompose then forward gives the weight back; fold gives the plain weight.
#[test]
fn decompose_then_fold_is_the_identity() {
    let ctx = ctx();
    let mut rng = Rng::new(2);
    for (config, shape) in [
        (WeightNorm::pytorch(Some(0)), vec![64, 3, 7, 7]),
        (WeightNorm::pytorch(Some(2)), vec![6, 5, 4]),
        (WeightNorm::pytorch(None), vec![8, 4, 3]),
        (WeightNorm::jittor(-1), vec![10, 33]),
        (WeightNorm::jittor(1), vec![4, 5, 3, 3]),
    ] {
        let w = rng.array(&shape, 0.0, 1.0);
        let tw = Tensor::from_array(&ctx, &w).unwrap();
        let WeightNormParams { g, v } = config.decompose(&ctx, &tw).unwrap();
        assert_eq!(g.shape(), config.g_shape(&shape).unwrap().as_slice());
        let (want_g, _) = reference::decompose(&config, w.view()).unwrap();
        assert_close("g", &g.to_array(&ctx).unwrap(), &want_g, RTOL, ATOL);
        assert_eq!(v.to_array(&ctx).unwrap(), w, "v must equal the weight");
        let back = config.fold(&ctx, &g, &v).unwrap().to_array(&ctx).unwrap();
        assert_close("fold", &back, &w, RTOL, ATOL);
    }
}

/// A slice of v that is all zeros: W = 0, grad_g = 0 and a finite grad_v, never NaN
/// (PyTorch returns NaN here).
#[test]
fn zero_norm_slice_is_defined_not_nan() {
    let ctx = ctx();
    let config = WeightNorm::default();
    let mut v = ArrayD::from_shape_fn(IxDyn(&[3, 4]), |i| (i[0] * 4 + i[1]) as f32 - 3.0);
    v.index_axis_mut(ndarray::Axis(0), 1).fill(0.0);
    let g = ArrayD::from_shape_vec(IxDyn(&[3, 1]), vec![2.0, 3.0, 0.5]).unwrap();
    let gw = ArrayD::from_elem(IxDyn(&[3, 4]), 1e-16f32);
    let (tg, tv, tgw) = (
        Tensor::from_array(&ctx, &g).unwrap(),
        Tensor::from_array(&ctx, &v).unwrap(),
        Tensor::from_array(&ctx, &gw).unwrap(),
    );
    let w = config
        .forward(&ctx, &tg, &tv)
        .unwrap()
        .to_array(&ctx)
        .unwrap();
    let grads = config.backward(&ctx, &tg, &tv, &tgw).unwrap();
    let (gg, gv) = (
        grads.g.to_array(&ctx).unwrap(),
        grads.v.to_array(&ctx).unwrap(),
    );
    assert!(w.iter().chain(&gg).chain(&gv).all(|x| x.is_finite()));
    assert!(w.index_axis(ndarray::Axis(0), 1).iter().all(|&x| x == 0.0));
    assert_eq!(gg[[1, 0]], 0.0);
    // grad_v = g / sqrt(eps) * grad_w on the clamped slice: 3 / 1e-15 * 1e-16 = 0.3.
    for &x in gv.index_axis(ndarray::Axis(0), 1) {
        assert!((x - 0.3).abs() < 1e-6, "{x}");
    }
    let want = reference::forward(&config, g.view(), v.view()).unwrap();
    assert_close("W", &w, &want, RTOL, ATOL);
}

#[test]
fn bad_input_is_a_typed_error_naming_the_op() {
    let ctx = ctx();
    let t = |shape: &[usize]| Tensor::from_array(&ctx, &ArrayD::<f32>::ones(IxDyn(shape))).unwrap();
    let expect = |r: wgnorm::Result<Tensor>, needle: &str| match r {
        Err(
            e @ Error::InvalidInput {
                op: "weight_norm", ..
            },
        ) => {
            assert!(e.to_string().contains(needle), "{e} lacks {needle:?}")
        }
        Err(e) => panic!("wrong error for {needle}: {e}"),
        Ok(_) => panic!("accepted bad input ({needle})"),
    };
    let wn = WeightNorm::default();
    expect(
        wn.forward(&ctx, &t(&[1, 4]), &t(&[3, 4])),
        "g has shape [1, 4]",
    );
    expect(wn.forward(&ctx, &t(&[3]), &t(&[3, 4])), "must be [3, 1]");
    expect(
        WeightNorm::pytorch(Some(2)).forward(&ctx, &t(&[3, 1]), &t(&[3, 4])),
        "dim 2 is out of range",
    );
    expect(
        WeightNorm::jittor(-3).forward(&ctx, &t(&[3, 1]), &t(&[3, 4])),
        "out of range",
    );
    expect(
        WeightNorm::jittor(1).forward(&ctx, &t(&[2, 3, 1]), &t(&[2, 3, 4])),
        "must be [2, 1, 4]",
    );
    expect(wn.forward(&ctx, &t(&[0, 1]), &t(&[0, 4])), "non-empty");
    expect(
        WeightNorm {
            eps: f32::NAN,
            ..wn
        }
        .forward(&ctx, &t(&[3, 1]), &t(&[3, 4])),
        "eps",
    );
    expect(
        WeightNorm { eps: -1.0, ..wn }.forward(&ctx, &t(&[3, 1]), &t(&[3, 4])),
        "eps",
    );
    match wn.backward(&ctx, &t(&[3, 1]), &t(&[3, 4]), &t(&[4, 3])) {
        Err(
            e @ Error::InvalidInput {
                op: "weight_norm", ..
            },
        ) => {
            assert!(e.to_string().contains("grad_w has shape [4, 3]"), "{e}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("accepted a gradient of the wrong shape"),
    }
    // dim=None accepts g as [1] (PyTorch) or [] (a scalar).
    assert!(WeightNorm::pytorch(None)
        .forward(&ctx, &t(&[]), &t(&[3, 4]))
        .is_ok());
    assert_eq!(WeightNorm::pytorch(None).g_shape(&[3, 4]).unwrap(), vec![1]);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(common::property_cases(64)))]
    /// Random shapes, kept axes (or none), thread layouts and binding caps (see
    /// `common::property_contexts`) against the f64 reference, forward and backward.
    #[test]
    fn property_random_configs_match_the_reference(
        shape in common::property_shape(48, 6),
        dim in proptest::option::of(proptest::prelude::any::<proptest::sample::Index>()),
        context in proptest::prelude::any::<proptest::sample::Index>(),
        seed in proptest::prelude::any::<u64>(),
    ) {
        let config = WeightNorm::pytorch(dim.map(|d| d.index(shape.len())));
        check(context.get(common::property_contexts()), &config, &shape, &mut Rng::new(seed));
    }
}

/// Many short rows (dim 0) take the row kernels, which bind only `g` (4 bytes a row):
/// 2000 rows pass a 16 KiB cap on per-slice statistics (16 bytes a row) and still work.
#[test]
fn more_rows_than_a_binding_of_statistics_use_the_row_kernels() {
    let ctx = ctx_with_binding(16 * 1024);
    check(
        &ctx,
        &WeightNorm::pytorch(Some(0)),
        &[2000, 3],
        &mut Rng::new(19),
    );
}

/// More slices than a binding holds per-slice values for (16 bytes each: 1024 fill a
/// 16 KiB cap) where the row kernels do not apply: the op runs in groups of slices
/// (issue 14: refused as `TooLarge` before), PyTorch's kept axis 1 (rows strided) and
/// Jittor's middle axis (groups of whole batch entries, or of channels); and the row
/// kernels with more rows of `g` (4 bytes each) than one binding holds, which bind `g`
/// window by window. Forward, backward and decompose, in both thread layouts.
#[test]
fn more_slices_than_a_binding_of_statistics() {
    let mut rng = Rng::new(47);
    for ctx in common::ctx_with_binding_both_layouts(16 * 1024) {
        for (config, shape) in [
            (WeightNorm::pytorch(Some(1)), vec![3, 2500]),
            (WeightNorm::pytorch(Some(1)), vec![2, 1100, 4]),
            (WeightNorm::jittor(1), vec![6, 3, 640]),
            (WeightNorm::jittor(1), vec![2, 3, 1536]),
            (WeightNorm::pytorch(Some(0)), vec![5000, 2]),
            (WeightNorm::jittor(-1), vec![4500, 3]),
        ] {
            check(&ctx, &config, &shape, &mut rng);
            let w = rng.array(&shape, 0.0, 1.0);
            let tw = Tensor::from_array(&ctx, &w).unwrap();
            let WeightNormParams { g, .. } = config.decompose(&ctx, &tw).unwrap();
            let (want_g, _) = reference::decompose(&config, w.view()).unwrap();
            assert_close("g", &g.to_array(&ctx).unwrap(), &want_g, RTOL, ATOL);
        }
    }
}
