//! Batch Normalization on the GPU against the f64 CPU reference.

mod common;

use common::{assert_close, ctx, ctx_with_binding, Rng};
use ndarray::{Array1, ArrayD, IxDyn};
use wgnorm::reference::batch_norm as reference;
use wgnorm::{BatchNorm, BatchNormMode, BatchNormState, Context, Error, Momentum, Tensor};

/// f32 kernels against the f64 reference.
const RTOL: f32 = 1e-4;
const ATOL: f32 = 1e-4;
/// Gradients go through two reductions.
const GRAD_RTOL: f32 = 1e-3;

fn vec_tensor(ctx: &Context, v: &[f32]) -> Tensor {
    Tensor::from_slice(ctx, &[v.len()], v).unwrap()
}

fn check(
    ctx: &Context,
    config: &BatchNorm,
    shape: &[usize],
    mode: BatchNormMode,
    rng: &mut Rng,
    offset: f32,
) {
    let what = format!("{shape:?} {mode:?} {config:?}");
    let features = shape[config.resolved_axis(shape.len()).unwrap()];
    let x = rng.array(shape, offset, 2.0);
    let dy = rng.array(shape, 0.0, 1.0);
    let gamma: Vec<f32> = (0..features).map(|_| 1.0 + 0.3 * rng.normal()).collect();
    let beta: Vec<f32> = (0..features).map(|_| 0.5 * rng.normal()).collect();
    let rm: Vec<f32> = (0..features).map(|_| offset + rng.normal()).collect();
    let rv: Vec<f32> = (0..features).map(|_| 1.0 + rng.uniform() as f32).collect();
    let updates = 4;
    let (tx, tdy) = (
        Tensor::from_array(ctx, &x).unwrap(),
        Tensor::from_array(ctx, &dy).unwrap(),
    );
    let (tg, tb) = (vec_tensor(ctx, &gamma), vec_tensor(ctx, &beta));
    let (tg, gamma) = if config.scale {
        (Some(&tg), Some(gamma.as_slice()))
    } else {
        (None, None)
    };
    let (tb, beta) = if config.center {
        (Some(&tb), Some(beta.as_slice()))
    } else {
        (None, None)
    };
    let mut state = BatchNormState {
        running_mean: vec_tensor(ctx, &rm),
        running_var: vec_tensor(ctx, &rv),
        num_updates: updates,
    };
    let (fwd, grads) = ctx
        .run(|rec| {
            let fwd = config.record_forward(rec, &tx, tg, tb, Some(&mut state), mode)?;
            let grads = config.record_backward(rec, &tx, &tdy, &fwd)?;
            Ok((fwd, grads))
        })
        .unwrap();
    let got = ctx
        .read_all(&[
            &fwd.output,
            &state.running_mean,
            &state.running_var,
            &grads.input,
            &grads.gamma,
            &grads.beta,
        ])
        .unwrap();
    let want = reference::forward(config, x.view(), gamma, beta, &rm, &rv, updates, mode).unwrap();
    let (wdx, wdg, wdb) =
        reference::backward(config, x.view(), dy.view(), gamma, &rm, &rv, mode).unwrap();
    let d1 = |a: Array1<f32>| a.into_dyn();
    assert_close(&format!("output {what}"), &got[0], &want.output, RTOL, ATOL);
    assert_close(
        &format!("running_mean {what}"),
        &got[1],
        &d1(want.running_mean),
        RTOL,
        ATOL,
    );
    assert_close(
        &format!("running_var {what}"),
        &got[2],
        &d1(want.running_var),
        RTOL,
        ATOL,
    );
    let scale = |a: &ArrayD<f32>| a.iter().fold(1f32, |m, v| m.max(v.abs()));
    assert_close(
        &format!("grad_input {what}"),
        &got[3],
        &wdx,
        GRAD_RTOL,
        1e-4 * scale(&wdx),
    );
    let (wdg, wdb) = (d1(wdg), d1(wdb));
    assert_close(
        &format!("grad_gamma {what}"),
        &got[4],
        &wdg,
        GRAD_RTOL,
        1e-4 * scale(&wdg),
    );
    assert_close(
        &format!("grad_beta {what}"),
        &got[5],
        &wdb,
        GRAD_RTOL,
        1e-4 * scale(&wdb),
    );
    if mode == BatchNormMode::Train && config.track_running_stats {
        assert_eq!(state.num_updates, updates + 1);
    } else {
        assert_eq!(state.num_updates, updates);
    }
}

/// Seeded random shapes, NCHW and NHWC, rank 2 to 5, every preset and mode.
#[test]
fn random_shapes_match_the_reference() {
    let ctx = ctx();
    let mut rng = Rng::new(31);
    let presets = [
        BatchNorm::pytorch(),
        BatchNorm::keras(),
        BatchNorm::chainer(),
        BatchNorm::gomlx(),
        BatchNorm {
            momentum: Momentum::Cumulative,
            ..BatchNorm::pytorch()
        },
        BatchNorm {
            track_running_stats: false,
            ..BatchNorm::pytorch()
        },
        BatchNorm {
            center: false,
            ..BatchNorm::keras()
        },
        BatchNorm {
            scale: false,
            center: false,
            ..BatchNorm::chainer()
        },
    ];
    let shapes: [(Vec<usize>, usize); 11] = [
        (vec![13, 7], 1),
        (vec![5, 6, 9, 11], 1),   // NCHW
        (vec![5, 9, 11, 6], 3),   // NHWC
        (vec![3, 7, 5, 12], 3),   // NHWC, channels a multiple of 4: channels-last kernels
        (vec![33, 8], 1),         // BatchNorm1d, 8 features
        (vec![7, 3, 260], 2),     // 260 features: 65 groups of 4
        (vec![5, 6, 8, 12], 1),   // NCHW, rows a multiple of 4: vec4 kernels
        (vec![2, 3, 4, 5, 6], 1), // rank 5, NCDHW
        (vec![2, 4, 5, 6, 3], 4), // rank 5, channels last
        (vec![300, 3], 1),
        (vec![3, 70, 50], 0), // features first
    ];
    for (i, (shape, axis)) in shapes.iter().enumerate() {
        for (j, preset) in presets.iter().enumerate() {
            let config = BatchNorm {
                feature_axis: *axis as isize,
                ..*preset
            };
            let mode = [
                BatchNormMode::Train,
                BatchNormMode::Eval,
                BatchNormMode::Frozen,
            ][(i + j) % 3];
            check(&ctx, &config, shape, mode, &mut rng, 0.0);
        }
    }
}

/// Inputs with a large common offset: the statistics stay stable.
#[test]
fn large_offset_is_stable() {
    let ctx = ctx();
    let mut rng = Rng::new(5);
    check(
        &ctx,
        &BatchNorm::pytorch(),
        &[16, 4, 17, 17],
        BatchNormMode::Train,
        &mut rng,
        1000.0,
    );
}

/// Bindings capped at 16 KiB: every pass is split into windows.
#[test]
fn split_bindings_match_the_reference() {
    let ctx = ctx_with_binding(16 * 1024);
    let mut rng = Rng::new(6);
    check(
        &ctx,
        &BatchNorm::pytorch(),
        &[4, 3, 40, 41],
        BatchNormMode::Train,
        &mut rng,
        0.0,
    );
    check(
        &ctx,
        &BatchNorm {
            feature_axis: 3,
            ..BatchNorm::keras()
        },
        &[4, 40, 41, 3],
        BatchNormMode::Train,
        &mut rng,
        0.0,
    );
    // Channels last, a multiple of 4: windows start mid-row (c_start != 0).
    for (shape, axis) in [(vec![4, 20, 21, 12], 3), (vec![70, 100], 1)] {
        check(
            &ctx,
            &BatchNorm {
                feature_axis: axis,
                ..BatchNorm::pytorch()
            },
            &shape,
            BatchNormMode::Train,
            &mut rng,
            0.0,
        );
    }
    check(
        &ctx,
        &BatchNorm::chainer(),
        &[4, 3, 40, 41],
        BatchNormMode::Eval,
        &mut rng,
        0.0,
    );
}

/// More features than one binding holds per-feature values for (a vec4 of statistics,
/// 16 bytes, per feature: 1024 fill a 16 KiB cap) run in groups of features, each
/// binding its part of the statistics, parameters and running averages (issue 14: they
/// were refused as `TooLarge`). NCHW (the group's rows strided across the tensor), [N, C]
/// and NHWC (channels-last kernels per group), a count that is not a multiple of 4,
/// training, evaluation and the backward, in both thread layouts.
#[test]
fn more_features_than_a_binding_of_statistics() {
    let mut rng = Rng::new(41);
    for ctx in common::ctx_with_binding_both_layouts(16 * 1024) {
        let nhwc = BatchNorm {
            feature_axis: 3,
            ..BatchNorm::keras()
        };
        for (config, shape) in [
            (BatchNorm::pytorch(), vec![2, 2500, 3]),
            (BatchNorm::pytorch(), vec![3, 2600]),
            (BatchNorm::chainer(), vec![4, 1031]),
            (nhwc, vec![2, 2, 1, 2052]),
        ] {
            for mode in [BatchNormMode::Train, BatchNormMode::Eval] {
                check(&ctx, &config, &shape, mode, &mut rng, 0.5);
            }
        }
    }
}

/// Every refused call leaves the running statistics and the update count as they were.
#[test]
fn a_failed_call_leaves_the_running_statistics_unchanged() {
    let ctx = ctx();
    let bn = BatchNorm::pytorch();
    let rm = [0.5f32, -1.0, 2.0];
    let rv = [1.5f32, 0.25, 3.0];
    let mut state = BatchNormState {
        running_mean: vec_tensor(&ctx, &rm),
        running_var: vec_tensor(&ctx, &rv),
        num_updates: 7,
    };
    let x = |shape: &[usize]| Tensor::from_array(&ctx, &ArrayD::<f32>::ones(IxDyn(shape))).unwrap();
    let g3 = vec_tensor(&ctx, &[1.0; 3]);
    let g4 = vec_tensor(&ctx, &[1.0; 4]);
    let expect = |r: wgnorm::Result<wgnorm::BatchNormForward>, needle: &str| match r {
        Err(
            e @ Error::InvalidInput {
                op: "batch_norm", ..
            },
        ) => {
            assert!(e.to_string().contains(needle), "{e} lacks {needle:?}")
        }
        Err(e) => panic!("wrong error for {needle}: {e}"),
        Ok(_) => panic!("accepted bad input ({needle})"),
    };
    expect(
        bn.forward(
            &ctx,
            &x(&[4, 3]),
            Some(&g4),
            Some(&g3),
            Some(&mut state),
            BatchNormMode::Train,
        ),
        "gamma has shape [4]",
    );
    expect(
        bn.forward(
            &ctx,
            &x(&[4, 3]),
            Some(&g3),
            Some(&g4),
            Some(&mut state),
            BatchNormMode::Train,
        ),
        "beta has shape [4]",
    );
    expect(
        bn.forward(
            &ctx,
            &x(&[4, 3]),
            Some(&g3),
            None,
            Some(&mut state),
            BatchNormMode::Train,
        ),
        "beta is required",
    );
    expect(
        bn.forward(
            &ctx,
            &x(&[1, 3]),
            Some(&g3),
            Some(&g3),
            Some(&mut state),
            BatchNormMode::Train,
        ),
        "more than one value",
    );
    expect(
        bn.forward(
            &ctx,
            &x(&[1, 3, 1, 1]),
            Some(&g3),
            Some(&g3),
            Some(&mut state),
            BatchNormMode::Train,
        ),
        "more than one value",
    );
    expect(
        bn.forward(
            &ctx,
            &x(&[4, 3]),
            Some(&g3),
            Some(&g3),
            None,
            BatchNormMode::Train,
        ),
        "no state",
    );
    let bad_axis = BatchNorm {
        feature_axis: 2,
        ..bn
    };
    expect(
        bad_axis.forward(
            &ctx,
            &x(&[4, 3]),
            Some(&g3),
            Some(&g3),
            Some(&mut state),
            BatchNormMode::Train,
        ),
        "feature axis 2",
    );
    for eps in [f32::NAN, f32::INFINITY, 0.0, -1.0] {
        let c = BatchNorm { eps, ..bn };
        expect(
            c.forward(
                &ctx,
                &x(&[4, 3]),
                Some(&g3),
                Some(&g3),
                Some(&mut state),
                BatchNormMode::Train,
            ),
            "eps",
        );
    }
    for m in [-0.1, 1.5, f32::NAN] {
        let c = BatchNorm {
            momentum: Momentum::Batch(m),
            ..bn
        };
        expect(
            c.forward(
                &ctx,
                &x(&[4, 3]),
                Some(&g3),
                Some(&g3),
                Some(&mut state),
                BatchNormMode::Train,
            ),
            "momentum",
        );
    }
    let mut wrong = BatchNormState::new(&ctx, 4).unwrap();
    expect(
        bn.forward(
            &ctx,
            &x(&[4, 3]),
            Some(&g3),
            Some(&g3),
            Some(&mut wrong),
            BatchNormMode::Train,
        ),
        "running_mean has shape [4]",
    );
    expect(
        bn.forward(
            &ctx,
            &x(&[4]),
            Some(&g3),
            Some(&g3),
            Some(&mut state),
            BatchNormMode::Train,
        ),
        "rank >= 2",
    );
    assert_eq!(state.num_updates, 7);
    assert_eq!(
        state
            .running_mean
            .to_array(&ctx)
            .unwrap()
            .as_slice()
            .unwrap(),
        &rm
    );
    assert_eq!(
        state
            .running_var
            .to_array(&ctx)
            .unwrap()
            .as_slice()
            .unwrap(),
        &rv
    );
    // One value per feature is fine in evaluation (running statistics).
    assert!(bn
        .forward(
            &ctx,
            &x(&[1, 3]),
            Some(&g3),
            Some(&g3),
            Some(&mut state),
            BatchNormMode::Eval
        )
        .is_ok());
}

/// Statistics of two halves computed on two separate contexts and combined match one
/// context over the whole batch, and normalizing with them matches too.
#[test]
fn statistics_from_two_contexts_combine_to_the_whole_batch() {
    let (a, b) = (ctx(), ctx());
    let mut rng = Rng::new(12);
    let bn = BatchNorm::pytorch();
    let whole = rng.array(&[10, 5, 7, 3], 3.0, 2.0);
    let first = whole
        .slice(ndarray::s![..4, .., .., ..])
        .to_owned()
        .into_dyn();
    let second = whole
        .slice(ndarray::s![4.., .., .., ..])
        .to_owned()
        .into_dyn();
    let sa = bn
        .batch_statistics(&a, &Tensor::from_array(&a, &first).unwrap())
        .unwrap();
    let sb = bn
        .batch_statistics(&b, &Tensor::from_array(&b, &second).unwrap())
        .unwrap();
    let combined = sa.combine(&sb).unwrap();
    let tw = Tensor::from_array(&a, &whole).unwrap();
    let direct = bn.batch_statistics(&a, &tw).unwrap();
    assert_eq!(combined.count, direct.count);
    for c in 0..5 {
        assert!((combined.mean[c] - direct.mean[c]).abs() < 1e-5, "mean {c}");
        assert!(
            (combined.m2[c] - direct.m2[c]).abs() < 1e-4 * direct.m2[c],
            "m2 {c}"
        );
    }
    // Normalizing the first half with the combined statistics = the whole batch's
    // normalization restricted to that half.
    let g = vec_tensor(&a, &[1.0; 5]);
    let z = vec_tensor(&a, &[0.0; 5]);
    let mut whole_state = BatchNormState::new(&a, 5).unwrap();
    let whole_out = bn
        .forward(
            &a,
            &tw,
            Some(&g),
            Some(&z),
            Some(&mut whole_state),
            BatchNormMode::Train,
        )
        .unwrap()
        .output
        .to_array(&a)
        .unwrap();
    let mut st = BatchNormState::new(&a, 5).unwrap();
    let half = bn
        .forward_with_stats(
            &a,
            &Tensor::from_array(&a, &first).unwrap(),
            Some(&g),
            Some(&z),
            Some(&mut st),
            &combined,
        )
        .unwrap()
        .output
        .to_array(&a)
        .unwrap();
    let want = whole_out
        .slice(ndarray::s![..4, .., .., ..])
        .to_owned()
        .into_dyn();
    assert_close("sync normalization", &half, &want, RTOL, ATOL);
}

/// Recomputed averages are the exact population statistics, not an exponential average.
#[test]
fn recomputed_averages_are_the_population_statistics() {
    let ctx = ctx();
    let mut rng = Rng::new(21);
    for bn in [
        BatchNorm::pytorch(),
        BatchNorm {
            feature_axis: 3,
            ..BatchNorm::gomlx()
        },
    ] {
        let shape_of = |n: usize| {
            if bn.feature_axis == 1 {
                vec![n, 4, 6, 5]
            } else {
                vec![n, 6, 5, 4]
            }
        };
        let batches: Vec<ArrayD<f32>> = [3, 5, 2]
            .iter()
            .map(|&n| rng.array(&shape_of(n), 2.0, 3.0))
            .collect();
        let mut state = BatchNormState::new(&ctx, 4).unwrap();
        let mut pop = bn.population(&ctx, 4).unwrap();
        for b in &batches {
            pop.add(&ctx, &Tensor::from_array(&ctx, b).unwrap())
                .unwrap();
        }
        pop.finish(&ctx, &mut state).unwrap();
        let all = ndarray::concatenate(
            ndarray::Axis(0),
            &batches.iter().map(|b| b.view()).collect::<Vec<_>>(),
        )
        .unwrap();
        let per_feature: Vec<Vec<f64>> = (0..4)
            .map(|c| {
                all.index_axis(ndarray::Axis(bn.feature_axis as usize), c)
                    .iter()
                    .map(|&v| f64::from(v))
                    .collect()
            })
            .collect();
        let mean: Vec<f32> = per_feature
            .iter()
            .map(|v| (v.iter().sum::<f64>() / v.len() as f64) as f32)
            .collect();
        let var: Vec<f32> = per_feature
            .iter()
            .zip(&mean)
            .map(|(v, &m)| {
                let ss: f64 = v.iter().map(|x| (x - f64::from(m)).powi(2)).sum();
                let d = match bn.running_var {
                    wgnorm::RunningVar::Unbiased => v.len() as f64 - 1.0,
                    wgnorm::RunningVar::Biased => v.len() as f64,
                };
                (ss / d) as f32
            })
            .collect();
        assert_close(
            "population mean",
            &state.running_mean.to_array(&ctx).unwrap(),
            &Array1::from(mean).into_dyn(),
            1e-5,
            1e-5,
        );
        assert_close(
            "population var",
            &state.running_var.to_array(&ctx).unwrap(),
            &Array1::from(var).into_dyn(),
            1e-5,
            1e-5,
        );
    }
}

/// External statistics that cannot come from data are refused, with the state left as
/// it was: a NaN or infinite count (which used to write NaN into every running
/// variance), non-finite means, negative m2, and `m2` shorter than `mean` (which made
/// `ChannelStats::combine` index out of bounds).
#[test]
fn impossible_external_statistics_are_refused() {
    use wgnorm::ChannelStats;
    let ctx = ctx();
    let bn = BatchNorm::pytorch();
    let mut state = BatchNormState::new(&ctx, 3).unwrap();
    let x = Tensor::from_array(&ctx, &ArrayD::<f32>::ones(IxDyn(&[4, 3]))).unwrap();
    let g = vec_tensor(&ctx, &[1.0; 3]);
    let good = ChannelStats {
        count: 8.0,
        mean: vec![0.0, 1.0, 2.0],
        m2: vec![1.0, 2.0, 3.0],
    };
    let bad = [
        ChannelStats {
            count: f64::NAN,
            ..good.clone()
        },
        ChannelStats {
            count: f64::INFINITY,
            ..good.clone()
        },
        ChannelStats {
            mean: vec![0.0, f64::NAN, 2.0],
            ..good.clone()
        },
        ChannelStats {
            m2: vec![1.0, -2.0, 3.0],
            ..good.clone()
        },
        ChannelStats {
            m2: vec![1.0, 2.0],
            ..good.clone()
        },
    ];
    for stats in &bad {
        let r = bn.forward_with_stats(&ctx, &x, Some(&g), Some(&g), Some(&mut state), stats);
        assert!(
            matches!(
                r,
                Err(Error::InvalidInput {
                    op: "batch_norm",
                    ..
                })
            ),
            "{stats:?} accepted"
        );
        assert!(good.combine(stats).is_err(), "{stats:?} combined");
        assert!(stats.combine(&good).is_err(), "{stats:?} combined");
    }
    assert_eq!(state.num_updates, 0);
    assert_eq!(state.running_mean.to_array(&ctx).unwrap().sum(), 0.0);
    assert_eq!(state.running_var.to_array(&ctx).unwrap().sum(), 3.0);
    bn.forward_with_stats(&ctx, &x, Some(&g), Some(&g), Some(&mut state), &good)
        .unwrap();
    assert_eq!(state.num_updates, 1);
}

/// A step that fails on the GPU (here: its input's buffer destroyed behind the
/// tensor's back, which wgpu's validation refuses at submission) is an error, not a
/// panic, and leaves `num_updates` where it was.
#[test]
fn a_step_that_fails_on_the_gpu_counts_no_update() {
    let ctx = ctx();
    let bn = BatchNorm {
        center: false,
        scale: false,
        ..BatchNorm::pytorch()
    };
    let mut state = BatchNormState::new(&ctx, 3).unwrap();
    let x = Tensor::from_array(&ctx, &Rng::new(5).array(&[4, 3, 5], 0.0, 1.0)).unwrap();
    x.buffer().destroy();
    let e = bn
        .forward(&ctx, &x, None, None, Some(&mut state), BatchNormMode::Train)
        .expect_err("a destroyed input");
    assert!(matches!(e, Error::Gpu { .. }), "{e}");
    assert_eq!(state.num_updates, 0);
    // The context still works.
    let y = Tensor::from_array(&ctx, &Rng::new(5).array(&[4, 3, 5], 0.0, 1.0)).unwrap();
    bn.forward(&ctx, &y, None, None, Some(&mut state), BatchNormMode::Train)
        .unwrap();
    assert_eq!(state.num_updates, 1);
}

/// Many channels with few rows each: the reduction partials (a vec4 per channel and
/// block of rows) used to be bound whole at four times the input ([1024, 16384] on a
/// 128 MiB binding failed); blocks now grow until they fit one binding. Here with
/// bindings capped at 1 MiB: a 2 MiB input whose partials at the default block size
/// would be 8 MiB, channels last and channels first.
#[test]
fn many_channels_fit_their_partials_in_one_binding() {
    let ctx = ctx_with_binding(1 << 20);
    for (shape, axis) in [
        (vec![256usize, 2048], 1),
        (vec![64, 2048, 4], 1),
        (vec![128, 4096], 1),
    ] {
        let x = Rng::new(9).array(&shape, 3.0, 2.0);
        let bn = BatchNorm {
            feature_axis: axis as isize,
            center: false,
            scale: false,
            ..BatchNorm::pytorch()
        };
        let features = shape[axis];
        let mut state = BatchNormState::new(&ctx, features).unwrap();
        let xt = Tensor::from_array(&ctx, &x).unwrap();
        let fwd = bn
            .forward(
                &ctx,
                &xt,
                None,
                None,
                Some(&mut state),
                BatchNormMode::Train,
            )
            .unwrap_or_else(|e| panic!("{shape:?}: {e}"));
        let got = fwd.output.to_array(&ctx).unwrap();
        let (mean, var) = (vec![0.0; features], vec![1.0; features]);
        let want = wgnorm::reference::batch_norm::forward(
            &bn,
            x.view(),
            None,
            None,
            &mean,
            &var,
            0,
            BatchNormMode::Train,
        )
        .unwrap();
        assert_close(&format!("{shape:?}"), &got, &want.output, RTOL, ATOL);
        let running = state.running_var.to_array(&ctx).unwrap();
        assert_close(
            "running var",
            &running,
            &want.running_var.into_dyn(),
            RTOL,
            ATOL,
        );
    }
}

/// Norm-relative error allowed whatever the order of the elements: a few times the f32
/// floor of the data of `statistics_do_not_depend_on_element_order`.
const ORDER_RTOL: f64 = 2e-5;

/// Batch statistics do not depend on which element comes first: features of 16383
/// values `1e4 + N(0, 1e-2)`, each with one value set to 0, first, in the middle or
/// last, normalize to within a few times the f32 floor of the f64 reference (about
/// 6e-6 of the output's norm, see the weight-standardization test of the same name), in
/// NCHW-like and channels-last layouts, in both thread layouts (with the outlier first,
/// the sums used to be shifted by it: 1.2e-4 to 1.6e-4).
#[test]
fn statistics_do_not_depend_on_element_order() {
    let bn = BatchNorm {
        center: false,
        scale: false,
        track_running_stats: false,
        ..BatchNorm::pytorch()
    };
    for (name, ctx) in [
        ("default", ctx()),
        ("other layout", common::ctx_other_layout()),
    ] {
        for (shape, axis) in [(vec![3, 4, 5461], 1), (vec![16383, 4], 1)] {
            for outlier in [0, 5000, 16382] {
                let mut rng = Rng::new(4);
                let mut x = rng.array(&shape, 1e4, 1e-2);
                let flat = x.as_slice_mut().unwrap();
                let features = shape[axis];
                let inner: usize = shape[axis + 1..].iter().product();
                // One outlier per feature, at the same place among its values (a
                // feature of 1e4 + N(0, 1e-2) alone has f32 inputs as coarse as its
                // spread).
                let (o, j) = (outlier / inner, outlier % inner);
                for c in 0..features {
                    flat[(o * features + c) * inner + j] = 0.0;
                }
                let config = BatchNorm {
                    feature_axis: axis as isize,
                    ..bn
                };
                let tx = Tensor::from_array(&ctx, &x).unwrap();
                let got = config
                    .forward(&ctx, &tx, None, None, None, BatchNormMode::Train)
                    .unwrap()
                    .output
                    .to_array(&ctx)
                    .unwrap();
                let (ones, zeros) = (vec![1.0f32; features], vec![0.0f32; features]);
                let want = reference::forward(
                    &config,
                    x.view(),
                    None,
                    None,
                    &zeros,
                    &ones,
                    0,
                    BatchNormMode::Train,
                )
                .unwrap()
                .output;
                let err = common::relative_error(&got, &want);
                assert!(
                    err <= ORDER_RTOL,
                    "{name} {shape:?}, outlier at {outlier}: relative error {err}"
                );
            }
        }
    }
}

/// Whether every feature of the `x` that `check` draws from `seed` has a spread well
/// above the f32 resolution of its values (`2^-24 max|x| / std <= 1e-5`).
fn well_conditioned(shape: &[usize], axis: usize, offset: f32, seed: u64) -> bool {
    let x = Rng::new(seed).array(shape, offset, 2.0); // the first draw of `check`
    (0..shape[axis]).all(|c| {
        let v = x.index_axis(ndarray::Axis(axis), c);
        let n = v.len() as f64;
        let mean = v.iter().map(|&a| f64::from(a)).sum::<f64>() / n;
        let std = (v
            .iter()
            .map(|&a| (f64::from(a) - mean).powi(2))
            .sum::<f64>()
            / n)
            .sqrt();
        let max = v.iter().fold(0f64, |m, &a| m.max(f64::from(a).abs()));
        max * 2f64.powi(-24) <= 1e-5 * std
    })
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(common::property_cases(64)))]
    /// Random shapes, feature axes, every framework's preset, training or evaluation,
    /// offsets, thread layouts and binding caps (see `common::property_contexts`)
    /// against the f64 reference (forward, running averages, backward).
    #[test]
    fn property_random_configs_match_the_reference(
        shape in common::property_shape(48, 6),
        axis in proptest::prelude::any::<proptest::sample::Index>(),
        preset in 0usize..4,
        train in proptest::prelude::any::<bool>(),
        offset in proptest::sample::select(vec![0.0f32, 3.0, -50.0]),
        context in proptest::prelude::any::<proptest::sample::Index>(),
        seed in proptest::prelude::any::<u64>(),
    ) {
        let base = [BatchNorm::pytorch(), BatchNorm::keras(), BatchNorm::chainer(), BatchNorm::gomlx()][preset];
        let config = BatchNorm { feature_axis: axis.index(shape.len()) as isize, ..base };
        // Training needs two values per feature (refused otherwise, as PyTorch does).
        let per_feature = shape.iter().product::<usize>() / shape[config.resolved_axis(shape.len()).unwrap()];
        proptest::prop_assume!(!train || per_feature > 1);
        // Training on a feature whose values lie within a few hundred f32 ulps of each
        // other (two values near -50, by chance close) is ill-conditioned: the inputs'
        // own rounding, not the kernel, decides its gradient. Such draws are left out:
        // the f32 resolution of the values over their spread stays below 1e-5.
        proptest::prop_assume!(!train || well_conditioned(&shape, config.resolved_axis(shape.len()).unwrap(), offset, seed));
        let mode = if train { BatchNormMode::Train } else { BatchNormMode::Eval };
        check(context.get(common::property_contexts()), &config, &shape, mode, &mut Rng::new(seed), offset);
    }
}

/// GoMLX's `UpdateAverages` (ResetWeights, then the debiased moving average over one
/// epoch of batches), against GoMLX's update written out on the host in f64: `n += 1;
/// d = min(m, 1 - 1/n); avg = d avg + (1 - d) batch` for the batch mean and the biased
/// batch variance. With 150 batches the average passes from equal weights per batch
/// (n < 100) to the 0.99 moving average. Uneven batch sizes: not the pooled statistics.
#[test]
fn gomlx_update_averages_is_gomlx_s_debiased_average() {
    let ctx = ctx();
    let bn = BatchNorm {
        feature_axis: -1,
        ..BatchNorm::gomlx()
    };
    let mut rng = Rng::new(44);
    let batches: Vec<ArrayD<f32>> = (0..150)
        .map(|i| rng.array(&[1 + i % 5, 3, 4], (i % 7) as f32, 1.0 + (i % 3) as f32))
        .collect();
    let mut state = BatchNormState::new(&ctx, 4).unwrap();
    state.num_updates = 999; // a trained layer: ResetWeights forgets the weight
    let tensors: Vec<Tensor> = batches
        .iter()
        .map(|b| Tensor::from_array(&ctx, b).unwrap())
        .collect();
    bn.update_averages(&ctx, &mut state, &tensors).unwrap();
    assert_eq!(state.num_updates, 150);
    let (mut mean, mut var) = (vec![0f64; 4], vec![1f64; 4]);
    for (n, b) in batches.iter().enumerate() {
        let d = 0.99f64.min(1.0 - 1.0 / (n as f64 + 1.0));
        for c in 0..4 {
            let vals: Vec<f64> = b
                .index_axis(ndarray::Axis(2), c)
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            let m = vals.iter().sum::<f64>() / vals.len() as f64;
            let v = vals.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / vals.len() as f64;
            mean[c] = d * mean[c] + (1.0 - d) * m;
            var[c] = d * var[c] + (1.0 - d) * v;
        }
    }
    let to32 =
        |v: &[f64]| ArrayD::from_shape_vec(vec![4], v.iter().map(|&x| x as f32).collect()).unwrap();
    assert_close(
        "gomlx mean",
        &state.running_mean.to_array(&ctx).unwrap(),
        &to32(&mean),
        RTOL,
        ATOL,
    );
    assert_close(
        "gomlx var",
        &state.running_var.to_array(&ctx).unwrap(),
        &to32(&var),
        RTOL,
        ATOL,
    );
    // A failing batch (wrong feature count) leaves the state as it was.
    let before = state.running_mean.to_array(&ctx).unwrap();
    let bad = Tensor::from_array(&ctx, &rng.array(&[2, 5], 0.0, 1.0)).unwrap();
    assert!(bn
        .update_averages(&ctx, &mut state, [&tensors[0], &bad])
        .is_err());
    assert_eq!(state.running_mean.to_array(&ctx).unwrap(), before);
    assert_eq!(state.num_updates, 150);
}

/// A negative feature axis counts from the end (`-1` as GoMLX and Keras allow); one
/// past the rank is refused, in the op and in the reference.
#[test]
fn negative_feature_axes_count_from_the_end() {
    let ctx = ctx();
    let x = Rng::new(3).array(&[4, 5, 6, 3], 1.0, 2.0);
    let tx = Tensor::from_array(&ctx, &x).unwrap();
    let run = |axis: isize| {
        let bn = BatchNorm {
            feature_axis: axis,
            scale: false,
            center: false,
            track_running_stats: false,
            ..BatchNorm::keras()
        };
        bn.forward(&ctx, &tx, None, None, None, BatchNormMode::Train)
            .map(|f| f.output.to_array(&ctx).unwrap())
    };
    assert_eq!(run(-1).unwrap(), run(3).unwrap());
    assert_eq!(run(-4).unwrap(), run(0).unwrap());
    let e = run(-5).unwrap_err();
    assert!(
        e.to_string().contains("feature axis -5 is out of range"),
        "{e}"
    );
    let bn = BatchNorm {
        feature_axis: -5,
        ..BatchNorm::keras()
    };
    assert!(reference::forward(
        &bn,
        x.view(),
        None,
        None,
        &[0.0; 3],
        &[1.0; 3],
        0,
        BatchNormMode::Train
    )
    .is_err());
}
