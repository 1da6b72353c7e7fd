//! f16 and bf16 tensors: the codec against the `half` crate (every 16-bit pattern),
//! uploads and readbacks, and every op on half inputs against the f64 reference, on
//! the same random shapes, axes, thread layouts and binding caps as the f32 property
//! tests, with tolerances derived from the type's epsilon.

mod common;

use common::{assert_close, ctx, Rng};
use half::{bf16, f16};
use ndarray::{ArrayD, IxDyn};
use wgnorm::ops::cast::record_cast;
use wgnorm::reference;
use wgnorm::{
    BatchNorm, BatchNormMode, BatchNormState, Context, DType, SpectralNorm, SpectralNormState,
    Tensor, WeightNorm, WeightStandardization,
};

/// Outputs in f32 computed from half inputs (statistics, `u`, `v`, sigma, the
/// gradients of f32 parameters): the f32 tests' tolerances for gradients, relative to
/// the tensor's largest magnitude for the absolute part.
const F32_RTOL: f32 = 1e-3;
const F32_ATOL_OF_MAX: f32 = 1e-4;

/// `a` rounded to `dtype` (nearest even).
fn round(dtype: DType, a: &ArrayD<f32>) -> ArrayD<f32> {
    a.mapv(|x| dtype.round(x))
}

fn upload(ctx: &Context, dtype: DType, a: &ArrayD<f32>) -> Tensor {
    Tensor::from_array_as(ctx, a, dtype).unwrap()
}

fn max_abs(a: &ArrayD<f32>) -> f32 {
    a.iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// A half output against the f64 reference rounded once to its type: `rtol` = the
/// type's epsilon, `atol` = half an epsilon times the largest expected magnitude (the
/// golden cases' tolerances, tests/conformance/README.md), and at least half an
/// epsilon: the data here are O(1), so an output that cancels to 0 (weight norm's
/// gradient on one-element slices) keeps the f32 residue of O(1) terms. An output
/// accumulated in half precision misses it.
#[track_caller]
fn check_half(ctx: &Context, what: &str, got: &Tensor, want: &ArrayD<f32>, dtype: DType) {
    assert_eq!(got.dtype(), dtype, "{what}: type");
    let want = round(dtype, want);
    let eps = dtype.epsilon() as f32;
    let atol = 0.5 * eps * max_abs(&want).max(1.0);
    assert_close(what, &got.to_array(ctx).unwrap(), &want, eps, atol);
}

#[track_caller]
fn check_f32(ctx: &Context, what: &str, got: &Tensor, want: &ArrayD<f32>) {
    assert_eq!(got.dtype(), DType::F32, "{what}: type");
    let atol = F32_ATOL_OF_MAX * max_abs(want).max(1e-3);
    assert_close(what, &got.to_array(ctx).unwrap(), want, F32_RTOL, atol);
}

fn half_type(bf: bool) -> DType {
    if bf {
        DType::BF16
    } else {
        DType::F16
    }
}

/// Every f16 and bf16 bit pattern widens to the `half` crate's f32 and narrows back
/// to itself (NaN stays NaN): the kernels' codec, exhaustively.
#[test]
fn the_codec_round_trips_every_half_value() {
    let ctx = ctx();
    for dtype in [DType::F16, DType::BF16] {
        let bits: Vec<u16> = (0..=u16::MAX).collect();
        let (t, want): (Tensor, Vec<f32>) = match dtype {
            DType::F16 => {
                let h: Vec<f16> = bits.iter().map(|&b| f16::from_bits(b)).collect();
                (
                    Tensor::from_slice(&ctx, &[h.len()], &h).unwrap(),
                    h.iter().map(|v| v.to_f32()).collect(),
                )
            }
            _ => {
                let h: Vec<bf16> = bits.iter().map(|&b| bf16::from_bits(b)).collect();
                (
                    Tensor::from_slice(&ctx, &[h.len()], &h).unwrap(),
                    h.iter().map(|v| v.to_f32()).collect(),
                )
            }
        };
        let (wide, back) = ctx
            .run(|rec| {
                let wide = record_cast(rec, &t, DType::F32)?;
                let back = record_cast(rec, &wide, dtype)?;
                Ok((wide, back))
            })
            .unwrap();
        let got = wide.to_array(&ctx).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                "{dtype} {i:#06x}: widened to {g}, want {w}"
            );
        }
        let back = back.to_array(&ctx).unwrap();
        for (i, (g, w)) in back.iter().zip(&want).enumerate() {
            assert!(
                g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                "{dtype} {i:#06x}: narrowed back to {g}, want {w}"
            );
        }
    }
}

/// f32 values that round in every way: ties to even, just past ties, subnormal
/// results, the overflow threshold, infinities, NaN, signed zeros. The GPU's rounding
/// is the `half` crate's (nearest even), bit for bit.
#[test]
fn narrowing_rounds_to_nearest_even() {
    let ctx = ctx();
    let mut values: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        1.0 + 2f32.powi(-11),
        1.0 + 3.0 * 2f32.powi(-11),
        1.0 + 2f32.powi(-11) + 2f32.powi(-20),
        1.0 + 2f32.powi(-8),
        1.0 + 3.0 * 2f32.powi(-8),
        65504.0,
        65519.0,
        65520.0,
        1e6,
        -1e6,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        6.0e-5,
        2f32.powi(-14),
        2f32.powi(-24),
        2f32.powi(-25),
        2f32.powi(-25) * 1.0001,
        3.0 * 2f32.powi(-25),
        1e-30,
        f32::MIN_POSITIVE / 2.0,
        3.4e38,
        -3.4e38,
    ];
    let mut rng = Rng::new(5);
    values.extend((0..997).map(|_| rng.normal() * 10f32.powi((rng.uniform() * 12.0) as i32 - 6)));
    let t = Tensor::from_slice(&ctx, &[values.len()], &values).unwrap();
    let (h, b) = ctx
        .run(|rec| {
            Ok((
                record_cast(rec, &t, DType::F16)?,
                record_cast(rec, &t, DType::BF16)?,
            ))
        })
        .unwrap();
    let h = h.to_array_of::<f16>(&ctx).unwrap();
    let b = b.to_array_of::<bf16>(&ctx).unwrap();
    for (i, &x) in values.iter().enumerate() {
        let (wh, wb) = (f16::from_f32(x), bf16::from_f32(x));
        assert!(
            h[i].to_bits() == wh.to_bits() || (x.is_nan() && h[i].is_nan()),
            "f16 of {x:e}: got {:#06x}, want {:#06x}",
            h[i].to_bits(),
            wh.to_bits()
        );
        assert!(
            b[i].to_bits() == wb.to_bits() || (x.is_nan() && b[i].is_nan()),
            "bf16 of {x:e}: got {:#06x}, want {:#06x}",
            b[i].to_bits(),
            wb.to_bits()
        );
    }
}

/// Half tensors of odd length upload and read back bit for bit, and copy; asking for
/// another type is an error naming both.
#[test]
fn odd_lengths_upload_read_back_and_copy() {
    let ctx = ctx();
    for len in [1usize, 7, 513] {
        let h: Vec<f16> = (0..len)
            .map(|i| f16::from_f32(i as f32 * 0.37 - 3.0))
            .collect();
        let t = Tensor::from_slice(&ctx, &[len], &h).unwrap();
        assert_eq!(t.dtype(), DType::F16);
        assert_eq!(t.bytes(), len.div_ceil(2) as u64 * 4);
        let back = t.to_array_of::<f16>(&ctx).unwrap();
        assert_eq!(back.as_slice().unwrap(), h.as_slice());
        let copy = ctx
            .run(|rec| wgnorm::ops::copy::record_copy(rec, &t))
            .unwrap();
        assert_eq!(copy.dtype(), DType::F16);
        assert_eq!(copy.to_array_of::<f16>(&ctx).unwrap(), back);
        let err = t.to_array_of::<bf16>(&ctx).unwrap_err().to_string();
        assert!(err.contains("f16") && err.contains("bf16"), "{err}");
    }
}

/// A gradient of another type than its tensor, and half state where the frameworks
/// keep f32, are refused with errors that say so.
#[test]
fn mismatched_types_are_refused() {
    let ctx = ctx();
    let mut rng = Rng::new(3);
    let w = rng.array(&[8, 12], 0.0, 1.0);
    let (w16, w32) = (upload(&ctx, DType::F16, &w), upload(&ctx, DType::F32, &w));
    let ws = WeightStandardization::default();
    let err = ws.backward(&ctx, &w16, &w32).unwrap_err().to_string();
    assert!(
        err.contains("grad_output is f32 but the weight is f16"),
        "{err}"
    );

    let sn = SpectralNorm::pytorch();
    let mut state = SpectralNormState {
        u: upload(&ctx, DType::F16, &rng.array(&[8], 0.0, 1.0)),
        v: upload(&ctx, DType::F32, &rng.array(&[12], 0.0, 1.0)),
        gamma: None,
        sigma: None,
    };
    let err = sn
        .forward(&ctx, &w16, &mut state, true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("u is f16") && err.contains("f32"), "{err}");

    let bn = BatchNorm {
        scale: false,
        center: false,
        ..BatchNorm::pytorch()
    };
    let mut st = BatchNormState {
        running_mean: upload(&ctx, DType::BF16, &rng.array(&[12], 0.0, 1.0)),
        running_var: upload(&ctx, DType::F32, &rng.array(&[12], 1.0, 0.1)),
        num_updates: 0,
    };
    let x = upload(&ctx, DType::BF16, &rng.array(&[4, 12, 3], 0.0, 1.0));
    let err = bn
        .forward(&ctx, &x, None, None, Some(&mut st), BatchNormMode::Train)
        .unwrap_err()
        .to_string();
    assert!(err.contains("running_mean is bf16"), "{err}");
    assert_eq!(st.num_updates, 0);

    // Half per-channel parameters of the wrong shape: refused before anything is
    // recorded (no cast to f32 left behind in the caller's recording).
    let mut rec = wgnorm::Recording::new(&ctx);
    let gamma = upload(&ctx, DType::F16, &rng.array(&[5], 1.0, 0.1));
    let e = BatchNorm::pytorch()
        .record_forward(
            &mut rec,
            &x,
            Some(&gamma),
            Some(&gamma),
            None,
            BatchNormMode::Eval,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("gamma has shape [5]"), "{e}");
    let g = upload(&ctx, DType::BF16, &rng.array(&[3, 1], 1.0, 0.1));
    let e = WeightNorm::pytorch(Some(0))
        .record_forward(&mut rec, &g, &w16)
        .unwrap_err()
        .to_string();
    assert!(e.contains("weight_norm"), "{e}");
    assert_eq!(rec.dispatches(), 0);
}

/// The f32 property tests' shapes (`common::property_shape(second, rest)`), with the
/// last axis made a multiple of 4 half the time, so that the vec4 and channels-last
/// kernels read half data themselves, the f32 detour otherwise.
fn shape_strategy(
    second: usize,
    rest: usize,
) -> impl proptest::strategy::Strategy<Value = Vec<usize>> {
    use proptest::prelude::*;
    (common::property_shape(second, rest), any::<bool>()).prop_map(|(mut s, by4)| {
        if by4 {
            *s.last_mut().unwrap() *= 4;
        }
        s
    })
}

/// The result, or `None` where the op refuses the layout as too large for the
/// context's binding cap (the property contexts cap bindings at 16 and 64 KiB; the
/// same limit as in f32, README's "Limits that remain"): such cases are skipped.
fn unless_too_large<T>(r: wgnorm::Result<T>) -> Option<T> {
    match r {
        Err(wgnorm::Error::TooLarge { .. }) => None,
        r => Some(r.unwrap()),
    }
}

fn pick<'a>(index: &proptest::sample::Index) -> &'a Context {
    index.get(common::property_contexts())
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(common::property_cases(48)))]

    /// Weight standardization on f16/bf16 weights and gradients, forward and backward.
    #[test]
    fn property_weight_standardization(
        shape in shape_strategy(48, 6),
        axis in proptest::prelude::any::<proptest::sample::Index>(),
        bf in proptest::prelude::any::<bool>(),
        context in proptest::prelude::any::<proptest::sample::Index>(),
        seed in proptest::prelude::any::<u64>(),
    ) {
        let ctx = pick(&context);
        let dtype = half_type(bf);
        let config = WeightStandardization { axis: axis.index(shape.len()), ..WeightStandardization::chainer() };
        let mut rng = Rng::new(seed);
        let w = round(dtype, &rng.array(&shape, -0.3, 2.0));
        let g = round(dtype, &rng.array(&shape, 0.0, 1.0));
        let step = unless_too_large(
            config.forward_backward(ctx, &upload(ctx, dtype, &w), &upload(ctx, dtype, &g)),
        );
        proptest::prop_assume!(step.is_some());
        let step = step.unwrap();
        let what = format!("{dtype} {shape:?} axis {}", config.axis);
        let want = reference::weight_standardization::forward(&config, w.view()).unwrap();
        check_half(ctx, &format!("output {what}"), &step.output, &want, dtype);
        let want = reference::weight_standardization::backward(&config, w.view(), g.view()).unwrap();
        check_half(ctx, &format!("grad {what}"), &step.grad, &want, dtype);
    }

    /// Weight norm with half `v` and gradient and an f32 `g`, every kept axis and none.
    #[test]
    fn property_weight_norm(
        shape in shape_strategy(48, 6),
        axis in proptest::prelude::any::<proptest::sample::Index>(),
        whole in proptest::prelude::any::<bool>(),
        bf in proptest::prelude::any::<bool>(),
        context in proptest::prelude::any::<proptest::sample::Index>(),
        seed in proptest::prelude::any::<u64>(),
    ) {
        let ctx = pick(&context);
        let dtype = half_type(bf);
        let dim = (!whole).then(|| axis.index(shape.len()));
        let config = WeightNorm::pytorch(dim);
        let mut rng = Rng::new(seed);
        let v = round(dtype, &rng.array(&shape, 0.2, 1.0));
        let gw = round(dtype, &rng.array(&shape, 0.0, 1.0));
        let g_shape = config.g_shape(&shape).unwrap();
        let g = rng.array(&g_shape, 1.0, 0.5);
        let (tg, tv, tgw) = (upload(ctx, DType::F32, &g), upload(ctx, dtype, &v), upload(ctx, dtype, &gw));
        let run = unless_too_large(
            ctx.run(|rec| Ok((config.record_forward(rec, &tg, &tv)?, config.record_backward(rec, &tg, &tv, &tgw)?))),
        );
        proptest::prop_assume!(run.is_some());
        let (out, grads) = run.unwrap();
        let what = format!("{dtype} {shape:?} dim {dim:?}");
        let want = reference::weight_norm::forward(&config, g.view(), v.view()).unwrap();
        check_half(ctx, &format!("output {what}"), &out, &want, dtype);
        let (want_g, want_v) = reference::weight_norm::backward(&config, g.view(), v.view(), gw.view()).unwrap();
        check_f32(ctx, &format!("grad_g {what}"), &grads.g, &want_g);
        check_half(ctx, &format!("grad_v {what}"), &grads.v, &want_v, dtype);
    }

    /// Spectral norm (both flavours, training) with a half weight and f32 `u`, `v`.
    #[test]
    fn property_spectral_norm(
        shape in shape_strategy(20, 5),
        axis in proptest::prelude::any::<proptest::sample::Index>(),
        chainer in proptest::prelude::any::<bool>(),
        bf in proptest::prelude::any::<bool>(),
        context in proptest::prelude::any::<proptest::sample::Index>(),
        seed in proptest::prelude::any::<u64>(),
    ) {
        let ctx = pick(&context);
        let dtype = half_type(bf);
        let base = if chainer { SpectralNorm::chainer() } else { SpectralNorm::pytorch() };
        let config = SpectralNorm { axis: axis.index(shape.len()), ..base };
        let (rows, cols) = config.matrix_shape(&shape).unwrap();
        let mut rng = Rng::new(seed);
        let w = round(dtype, &rng.array(&shape, 0.1, 1.0));
        let gw = round(dtype, &rng.array(&shape, 0.0, 1.0));
        let u: Vec<f32> = (0..rows).map(|_| 0.1 + rng.uniform() as f32).collect();
        let v: Vec<f32> = (0..cols).map(|_| 0.1 + rng.uniform() as f32).collect();
        let mut state = SpectralNormState {
            u: Tensor::from_slice(ctx, &[rows], &u).unwrap(),
            v: Tensor::from_slice(ctx, &[cols], &v).unwrap(),
            gamma: None,
            sigma: None,
        };
        let (tw, tgw) = (upload(ctx, dtype, &w), upload(ctx, dtype, &gw));
        let run = unless_too_large(ctx.run(|rec| {
            let fwd = config.record_forward(rec, &tw, &mut state, true)?;
            let grads = config.record_backward(rec, &tw, &tgw, &fwd, &state)?;
            Ok((fwd, grads))
        }));
        proptest::prop_assume!(run.is_some());
        let (fwd, grads) = run.unwrap();
        let what = format!("{dtype} {shape:?} {config:?}");
        let want = reference::spectral_norm::forward(&config, w.view(), &u, &v, 1.0, true).unwrap();
        let vec = |x: &[f32]| ArrayD::from_shape_vec(IxDyn(&[x.len()]), x.to_vec()).unwrap();
        check_f32(ctx, &format!("u {what}"), &state.u, &vec(want.u.as_slice().unwrap()));
        check_f32(ctx, &format!("sigma {what}"), &fwd.sigma, &vec(&[want.sigma]));
        check_half(ctx, &format!("output {what}"), &fwd.weight, &want.output, dtype);
        let (want_grad, _) = reference::spectral_norm::backward(&config, w.view(), gw.view(), &want, 1.0).unwrap();
        check_half(ctx, &format!("grad {what}"), &grads.weight, &want_grad, dtype);
    }

    /// Batch norm on half inputs with f32 gamma, beta and running statistics: any
    /// feature axis (the last one with a multiple of 4 features takes the
    /// channels-last kernels), training and evaluation, forward and backward.
    #[test]
    fn property_batch_norm(
        shape in shape_strategy(48, 6),
        axis in proptest::prelude::any::<proptest::sample::Index>(),
        train in proptest::prelude::any::<bool>(),
        bf in proptest::prelude::any::<bool>(),
        context in proptest::prelude::any::<proptest::sample::Index>(),
        seed in proptest::prelude::any::<u64>(),
    ) {
        let ctx = pick(&context);
        let dtype = half_type(bf);
        let config = BatchNorm { feature_axis: axis.index(shape.len()) as isize, ..BatchNorm::pytorch() };
        let features = shape[config.feature_axis as usize];
        let mode = if train { BatchNormMode::Train } else { BatchNormMode::Eval };
        proptest::prop_assume!(!train || shape.iter().product::<usize>() / features > 1);
        let mut rng = Rng::new(seed);
        let x = round(dtype, &rng.array(&shape, 0.5, 2.0));
        let dy = round(dtype, &rng.array(&shape, 0.0, 1.0));
        let gamma: Vec<f32> = (0..features).map(|_| 1.0 + 0.3 * rng.normal()).collect();
        let beta: Vec<f32> = (0..features).map(|_| 0.5 * rng.normal()).collect();
        let rm: Vec<f32> = (0..features).map(|_| 0.5 + rng.normal()).collect();
        let rv: Vec<f32> = (0..features).map(|_| 1.0 + rng.uniform() as f32).collect();
        let vt = |v: &[f32]| Tensor::from_slice(ctx, &[v.len()], v).unwrap();
        let (tg, tb) = (vt(&gamma), vt(&beta));
        let mut state = BatchNormState { running_mean: vt(&rm), running_var: vt(&rv), num_updates: 3 };
        let (tx, tdy) = (upload(ctx, dtype, &x), upload(ctx, dtype, &dy));
        let run = unless_too_large(ctx.run(|rec| {
            let fwd = config.record_forward(rec, &tx, Some(&tg), Some(&tb), Some(&mut state), mode)?;
            let grads = config.record_backward(rec, &tx, &tdy, &fwd)?;
            Ok((fwd, grads))
        }));
        proptest::prop_assume!(run.is_some());
        let (fwd, grads) = run.unwrap();
        let what = format!("{dtype} {shape:?} axis {} {mode:?}", config.feature_axis);
        let want = reference::batch_norm::forward(&config, x.view(), Some(&gamma), Some(&beta), &rm, &rv, 3, mode).unwrap();
        check_half(ctx, &format!("output {what}"), &fwd.output, &want.output, dtype);
        check_f32(ctx, &format!("running_mean {what}"), &state.running_mean, &want.running_mean.clone().into_dyn());
        check_f32(ctx, &format!("running_var {what}"), &state.running_var, &want.running_var.clone().into_dyn());
        let (want_dx, want_dg, want_db) =
            reference::batch_norm::backward(&config, x.view(), dy.view(), Some(&gamma), &rm, &rv, mode).unwrap();
        check_half(ctx, &format!("grad_input {what}"), &grads.input, &want_dx, dtype);
        check_f32(ctx, &format!("grad_gamma {what}"), &grads.gamma, &want_dg.into_dyn());
        check_f32(ctx, &format!("grad_beta {what}"), &grads.beta, &want_db.into_dyn());
    }
}

/// Hooks on a bf16 weight (weight standardization, then spectral norm): the forward is
/// bf16 and matches the f32 chain on the same values to bf16's tolerance, and the
/// backward through both hooks gives a bf16 gradient of the raw weight.
#[test]
fn hooks_chain_on_a_bf16_weight() {
    use wgnorm::{SpectralNormHook, Weight, WeightStandardizationHook};
    let ctx = ctx();
    let w = round(DType::BF16, &Rng::new(9).array(&[16, 8, 3, 3], 0.1, 1.0));
    let chain = |data: Tensor| {
        let mut weight = Weight::new("conv", Some(data));
        weight
            .add_hook(&ctx, Box::new(WeightStandardizationHook::default()))
            .unwrap();
        weight
            .add_hook(
                &ctx,
                Box::new(SpectralNormHook::new(SpectralNorm::pytorch(), 3)),
            )
            .unwrap();
        weight
    };
    let mut half = chain(upload(&ctx, DType::BF16, &w));
    let mut full = chain(upload(&ctx, DType::F32, &w));
    let (yh, yf) = (
        half.forward(&ctx, false).unwrap(),
        full.forward(&ctx, false).unwrap(),
    );
    let want = yf.to_array(&ctx).unwrap();
    check_half(&ctx, "forward", &yh, &want, DType::BF16);
    let g = upload(
        &ctx,
        DType::BF16,
        &Rng::new(10).array(&[16, 8, 3, 3], 0.0, 1.0),
    );
    let grad = half.backward(&ctx, &g).unwrap();
    assert_eq!(grad.dtype(), DType::BF16);
    let gf = full
        .backward(&ctx, &upload(&ctx, DType::F32, &g.to_array(&ctx).unwrap()))
        .unwrap();
    check_half(
        &ctx,
        "backward",
        &grad,
        &gf.to_array(&ctx).unwrap(),
        DType::BF16,
    );
}

/// Synchronized batch norm (two ranks on threads) on bf16 slices of a batch: each
/// rank's output and input gradient are bf16 and match one device on the whole bf16
/// batch to bf16's tolerance; the running statistics stay f32 and agree.
#[test]
fn synchronized_batch_norm_on_bf16_slices() {
    use wgnorm::ThreadGroup;
    let dtype = DType::BF16;
    let shape = [8usize, 12, 3, 4];
    let x = round(dtype, &Rng::new(21).array(&shape, 1.0, 2.0));
    let dy = round(dtype, &Rng::new(22).array(&shape, 0.0, 1.0));
    let bn = BatchNorm {
        scale: false,
        center: false,
        ..BatchNorm::pytorch()
    };
    let half = |a: &ArrayD<f32>, r: usize| {
        a.slice_axis(ndarray::Axis(0), ndarray::Slice::from(r * 4..r * 4 + 4))
            .to_owned()
    };
    let ranks: Vec<[ArrayD<f32>; 4]> = std::thread::scope(|s| {
        let handles: Vec<_> = ThreadGroup::new(2)
            .into_iter()
            .enumerate()
            .map(|(r, comm)| {
                let (x, dy) = (half(&x, r), half(&dy, r));
                s.spawn(move || {
                    let ctx = ctx();
                    let mut state = BatchNormState::new(&ctx, 12).unwrap();
                    let (tx, tdy) = (upload(&ctx, dtype, &x), upload(&ctx, dtype, &dy));
                    let fwd = bn
                        .forward_sync(&ctx, &comm, &tx, None, None, Some(&mut state))
                        .unwrap();
                    let grads = bn.backward_sync(&ctx, &comm, &tx, &tdy, &fwd).unwrap();
                    assert_eq!(fwd.forward.output.dtype(), dtype);
                    assert_eq!(grads.input.dtype(), dtype);
                    let got = ctx
                        .read_all(&[
                            &fwd.forward.output,
                            &grads.input,
                            &state.running_mean,
                            &state.running_var,
                        ])
                        .unwrap();
                    <[ArrayD<f32>; 4]>::try_from(got).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ctx = ctx();
    let mut state = BatchNormState::new(&ctx, 12).unwrap();
    let (tx, tdy) = (upload(&ctx, dtype, &x), upload(&ctx, dtype, &dy));
    let fwd = bn
        .forward(
            &ctx,
            &tx,
            None,
            None,
            Some(&mut state),
            BatchNormMode::Train,
        )
        .unwrap();
    let grads = bn.backward(&ctx, &tx, &tdy, &fwd).unwrap();
    let (y, dx) = (
        fwd.output.to_array(&ctx).unwrap(),
        grads.input.to_array(&ctx).unwrap(),
    );
    let eps = dtype.epsilon() as f32;
    for (r, got) in ranks.iter().enumerate() {
        // Half-an-ulp rounding apart at most: the statistics are f32 sums in another order.
        assert_close("output", &got[0], &half(&y, r), eps, eps);
        assert_close("grad_input", &got[1], &half(&dx, r), eps, eps);
        assert_close(
            "running_mean",
            &got[2],
            &state.running_mean.to_array(&ctx).unwrap(),
            1e-5,
            1e-6,
        );
        assert_close(
            "running_var",
            &got[3],
            &state.running_var.to_array(&ctx).unwrap(),
            1e-5,
            1e-6,
        );
    }
}
