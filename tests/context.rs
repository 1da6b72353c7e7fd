//! Adapter choice and the context's report.

mod common;

#[test]
fn report_names_the_adapter_and_honours_wgpu_backend() {
    let ctx = common::ctx();
    let info = ctx.info();
    println!("{info}");
    assert!(!info.name.is_empty());
    assert!(info.max_binding_bytes >= 1 << 20);
    assert!(info.max_buffer_bytes >= info.max_binding_bytes);
    if let Ok(b) = std::env::var("WGPU_BACKEND") {
        let want = match b.to_lowercase().as_str() {
            "gl" | "gles" | "opengl" => wgpu::Backend::Gl,
            "vulkan" | "vk" => wgpu::Backend::Vulkan,
            _ => return,
        };
        assert_eq!(info.backend, want, "WGPU_BACKEND={b} not honoured");
    }
    // GL has no subgroups: the kernels must not need them.
    if info.backend == wgpu::Backend::Gl {
        assert!(!info.subgroups);
    }
}

#[test]
fn a_device_the_caller_already_has_is_accepted() {
    let ctx = common::ctx();
    let wrapped = wgnorm::Context::from_device(ctx.device().clone(), ctx.queue().clone()).unwrap();
    assert_eq!(wrapped.info().name, ctx.info().name);
    let mut rng = common::Rng::new(1);
    let w = rng.array(&[5, 9], 2.0, 1.0);
    let t = wgnorm::Tensor::from_array(&wrapped, &w).unwrap();
    let config = wgnorm::WeightStandardization::default();
    let got = config
        .forward(&wrapped, &t)
        .unwrap()
        .to_array(&wrapped)
        .unwrap();
    let want = wgnorm::reference::weight_standardization::forward(&config, w.view()).unwrap();
    common::assert_close("from_device", &got, &want, 1e-4, 1e-4);
}

/// A dropped op output goes back to the context's pool, and a later recording's output
/// of the same size reuses it (never the recording that dropped it, which would order
/// its dispatches needlessly): the results are the same as with fresh buffers.
#[test]
fn dropped_outputs_are_reused_without_changing_results() {
    use wgnorm::{Recording, Tensor, WeightStandardization};
    let ctx = common::ctx();
    let mut rng = common::Rng::new(3);
    let x = Tensor::from_array(&ctx, &rng.array(&[64, 300], 1.0, 2.0)).unwrap();
    let ws = WeightStandardization::default();
    let first = ws.forward(&ctx, &x).unwrap();
    let want = first.to_array(&ctx).unwrap();
    drop(first);
    assert!(ctx.pooled_bytes() >= 64 * 300 * 4);
    let mut rec = Recording::new(&ctx);
    // Outputs dropped in a recording are reused after it is submitted.
    drop(ws.record_forward(&mut rec, &x).unwrap());
    let copied = wgnorm::ops::copy::record_copy(&mut rec, &x).unwrap();
    let again = ws.record_forward(&mut rec, &x).unwrap();
    rec.submit().unwrap();
    assert_eq!(again.to_array(&ctx).unwrap(), want);
    assert_eq!(copied.to_array(&ctx).unwrap(), x.to_array(&ctx).unwrap());
    for _ in 0..3 {
        let y = ws.forward(&ctx, &x).unwrap();
        assert_eq!(y.to_array(&ctx).unwrap(), want);
    }
}

/// A tensor made on one context and given to another is refused by every op and by
/// the readback with a typed error naming the op, the input and both contexts (it used
/// to read or overwrite the other context's unrelated buffers, or panic in wgpu-core).
#[test]
fn tensors_of_another_context_are_refused() {
    use wgnorm::{
        BatchNorm, BatchNormMode, BatchNormState, Error, SpectralNorm, Tensor, WeightNorm,
        WeightStandardization,
    };
    let (a, b) = (common::ctx(), common::ctx());
    assert_ne!(a.id(), b.id());
    let mut rng = common::Rng::new(9);
    let host = rng.array(&[8, 6], 0.0, 1.0);
    let (xa, xb) = (
        Tensor::from_array(&a, &host).unwrap(),
        Tensor::from_array(&b, &host).unwrap(),
    );
    assert_eq!(xa.context_id(), a.id());
    let foreign = |r: Result<(), Error>, op: &str, input: &str| match r {
        Err(Error::ForeignTensor {
            op: o,
            tensor,
            tensor_context,
            context,
        }) => {
            assert_eq!((o, tensor.as_str()), (op, input));
            assert_eq!((tensor_context, context), (a.id(), b.id()));
        }
        other => panic!("{op} {input}: {other:?}"),
    };
    let ws = WeightStandardization::default();
    foreign(
        ws.forward(&b, &xa).map(drop),
        "weight_standardization",
        "weight",
    );
    foreign(
        ws.backward(&b, &xb, &xa).map(drop),
        "weight_standardization",
        "grad_output",
    );
    let wn = WeightNorm::default();
    let ga = Tensor::from_array(&a, &ndarray::Array2::<f32>::ones((8, 1))).unwrap();
    foreign(wn.forward(&b, &ga, &xb).map(drop), "weight_norm", "g");
    let bn = BatchNorm::pytorch();
    let (gb, bb) = (
        Tensor::from_slice(&b, &[6], &[1.0; 6]).unwrap(),
        Tensor::from_slice(&b, &[6], &[0.0; 6]).unwrap(),
    );
    let mut state_a = BatchNormState::new(&a, 6).unwrap();
    foreign(
        bn.forward(
            &b,
            &xb,
            Some(&gb),
            Some(&bb),
            Some(&mut state_a),
            BatchNormMode::Train,
        )
        .map(drop),
        "batch_norm",
        "running_mean",
    );
    assert_eq!(state_a.num_updates, 0);
    let sn = SpectralNorm::default();
    let mut sn_state = sn.init_state(&a, &xa, 0).unwrap();
    foreign(
        sn.forward(&b, &xb, &mut sn_state, true).map(drop),
        "spectral_norm",
        "u",
    );
    foreign(
        b.run(|rec| wgnorm::ops::copy::record_copy(rec, &xa))
            .map(drop),
        "copy",
        "source",
    );
    foreign(b.read_all(&[&xb, &xa]).map(drop), "readback", "tensor 1");
    // B's own tensors are untouched and still work.
    assert_eq!(xb.to_array(&b).unwrap(), host);
}

/// An output dropped while its recording is still open is not handed to another op
/// before that recording is submitted: the open recording would later write into the
/// other op's output (seen with the pool's first version: `b` below came back as
/// `ws(x)` instead of `ws(y)`).
#[test]
fn buffers_of_an_open_recording_are_not_reused() {
    use wgnorm::{Recording, Tensor, WeightStandardization};
    let ctx = common::ctx();
    let mut rng = common::Rng::new(12);
    let (hx, hy) = (
        rng.array(&[32, 40], 0.0, 1.0),
        rng.array(&[32, 40], 5.0, 3.0),
    );
    let (x, y) = (
        Tensor::from_array(&ctx, &hx).unwrap(),
        Tensor::from_array(&ctx, &hy).unwrap(),
    );
    let ws = WeightStandardization::default();
    let want = ws.forward(&ctx, &y).unwrap().to_array(&ctx).unwrap();
    let mut open = Recording::new(&ctx);
    drop(ws.record_forward(&mut open, &x).unwrap());
    // Other work submitted while `open` is still open.
    let a = ws.forward(&ctx, &y).unwrap();
    let b = ws.forward(&ctx, &y).unwrap();
    open.submit().unwrap();
    assert_eq!(a.to_array(&ctx).unwrap(), want);
    assert_eq!(b.to_array(&ctx).unwrap(), want);
}

/// Scratch (partials, per-channel statistics) comes from the same pool as outputs, with
/// whatever a dropped tensor left in it: every op must write its scratch before reading
/// it. Fill the pool with NaN buffers of every small size, then every op family must
/// give bit for bit what it gave on fresh (zeroed) buffers.
#[test]
fn pooled_scratch_is_written_before_it_is_read() {
    use wgnorm::{
        BatchNorm, BatchNormMode, BatchNormState, SpectralNorm, Tensor, WeightNorm,
        WeightStandardization,
    };
    let ctx = common::ctx();
    let mut rng = common::Rng::new(21);
    let w = Tensor::from_array(&ctx, &rng.array(&[16, 8, 3, 3], 0.5, 1.0)).unwrap();
    let gw = Tensor::from_array(&ctx, &rng.array(&[16, 8, 3, 3], 0.0, 1.0)).unwrap();
    let g = Tensor::from_array(&ctx, &rng.array(&[16, 1, 1, 1], 1.0, 0.5)).unwrap();
    let x = Tensor::from_array(&ctx, &rng.array(&[8, 16, 5, 5], 2.0, 3.0)).unwrap();
    let dy = Tensor::from_array(&ctx, &rng.array(&[8, 16, 5, 5], 0.0, 1.0)).unwrap();
    let ones = Tensor::from_slice(&ctx, &[16], &[1.0; 16]).unwrap();
    let all = || {
        let ws = WeightStandardization::default();
        let wn = WeightNorm::pytorch(Some(0));
        let sn = SpectralNorm::chainer();
        let bn = BatchNorm::pytorch();
        let mut sn_state = sn.init_state(&ctx, &w, 1).unwrap();
        let sn_fwd = sn.forward(&ctx, &w, &mut sn_state, true).unwrap();
        let sn_grad = sn.backward(&ctx, &w, &gw, &sn_fwd, &sn_state).unwrap();
        let mut bn_state = BatchNormState::new(&ctx, 16).unwrap();
        let bn_fwd = bn
            .forward(
                &ctx,
                &x,
                Some(&ones),
                Some(&ones),
                Some(&mut bn_state),
                BatchNormMode::Train,
            )
            .unwrap();
        let bn_grad = bn.backward(&ctx, &x, &dy, &bn_fwd).unwrap();
        let wn_grad = wn.backward(&ctx, &g, &w, &gw).unwrap();
        let out = [
            ws.forward(&ctx, &w).unwrap(),
            ws.backward(&ctx, &w, &gw).unwrap(),
            wn.forward(&ctx, &g, &w).unwrap(),
            wn_grad.g,
            wn_grad.v,
            sn_fwd.weight,
            sn_fwd.sigma,
            sn_grad.weight,
            bn_fwd.output,
            bn_state.running_var,
            bn_grad.input,
            bn_grad.gamma,
        ];
        out.iter()
            .map(|t| t.to_array(&ctx).unwrap())
            .collect::<Vec<_>>()
    };
    let fresh = all();
    let nan: Vec<_> = (1..=4096)
        .map(|n| Tensor::from_slice(&ctx, &[n], &vec![f32::NAN; n]).unwrap())
        .collect();
    let poison = ctx
        .run(|rec| {
            nan.iter()
                .map(|t| wgnorm::ops::copy::record_copy(rec, t))
                .collect::<wgnorm::Result<Vec<_>>>()
        })
        .unwrap();
    drop(poison);
    assert!(ctx.pooled_bytes() >= 4096 * 4097 / 2 * 4);
    let again = all();
    for (i, (a, b)) in fresh.iter().zip(&again).enumerate() {
        assert!(a.iter().all(|v| v.is_finite()), "output {i}: {a:?}");
        assert_eq!(a, b, "output {i} changed on pooled scratch");
    }
}

/// Asynchronous readback: the future gives what the blocking readback gives (the
/// blocking one is a wrapper over it), polled by any executor; a foreign tensor is
/// refused before anything is submitted; an empty tensor reads as empty.
#[test]
fn asynchronous_readback_matches_the_blocking_one() {
    use wgnorm::{Error, Tensor};
    let ctx = common::ctx();
    let a = Tensor::from_slice(&ctx, &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    let big = Tensor::from_array(
        &ctx,
        &ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[512, 1024]), |ix| {
            (ix[0] * 7 + ix[1]) as f32
        }),
    )
    .unwrap();
    let empty = Tensor::zeros(&ctx, &[0, 4]).unwrap();
    // What was uploaded (read_all wraps the future, so it is no independent witness).
    let host_big = ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[512, 1024]), |ix| {
        (ix[0] * 7 + ix[1]) as f32
    });
    let host_a = ndarray::ArrayD::from_shape_vec(
        ndarray::IxDyn(&[2, 3]),
        vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
    )
    .unwrap();
    let blocking = vec![
        host_a,
        host_big,
        ndarray::ArrayD::zeros(ndarray::IxDyn(&[0, 4])),
    ];
    let future = ctx.read_all_async(&[&a, &big, &empty]).unwrap();
    let got = pollster::block_on(future).unwrap();
    assert_eq!(got, blocking);
    assert_eq!(ctx.read_all(&[&a, &big, &empty]).unwrap(), blocking);
    assert_eq!(got[2].shape(), [0, 4]);
    assert_eq!(
        pollster::block_on(a.to_array_async(&ctx)).unwrap(),
        blocking[0]
    );
    // Several in flight at once, awaited in the other order.
    let f1 = ctx.read_all_async(&[&a]).unwrap();
    let f2 = ctx.read_all_async(&[&big]).unwrap();
    assert_eq!(pollster::block_on(f2).unwrap()[0], blocking[1]);
    assert_eq!(pollster::block_on(f1).unwrap()[0], blocking[0]);
    let other = common::ctx();
    let foreign = Tensor::zeros(&other, &[3]).unwrap();
    assert!(matches!(
        ctx.read_all_async(&[&foreign]),
        Err(Error::ForeignTensor { .. })
    ));
}

/// A training step of every op, recorded and submitted, makes no host round trip; the
/// readback after it does (issue 18: nothing in an op's hot path blocks the thread).
#[test]
fn a_training_step_makes_no_host_round_trip() {
    use ndarray::{ArrayD, IxDyn};
    use wgnorm::{
        BatchNorm, BatchNormMode, BatchNormState, Recording, SpectralNorm, Tensor, WeightNorm,
        WeightStandardization,
    };
    let ctx = common::ctx();
    let data = |shape: &[usize], seed: f32| {
        let n = shape.iter().product::<usize>();
        let values = (0..n).map(|k| (k as f32 * 0.37 + seed).sin()).collect();
        ArrayD::from_shape_vec(IxDyn(shape), values).unwrap()
    };
    let upload = |a: &ArrayD<f32>| Tensor::from_array(&ctx, a).unwrap();
    let w = upload(&data(&[16, 3, 3, 3], 0.1));
    let gw = upload(&data(&[16, 3, 3, 3], 0.7));
    let x = upload(&data(&[4, 16, 5, 5], 0.3));
    let gx = upload(&data(&[4, 16, 5, 5], 0.9));
    let g = upload(&data(&[16, 1, 1, 1], 0.5));
    let (gamma, beta) = (upload(&data(&[16], 0.2)), upload(&data(&[16], 0.4)));
    let sn = SpectralNorm::pytorch();
    let mut sn_state = sn.init_state(&ctx, &w, 7).unwrap();
    let bn = BatchNorm::pytorch();
    let mut bn_state = BatchNormState::new(&ctx, 16).unwrap();

    let before = ctx.host_round_trips();
    let mut rec = Recording::new(&ctx);
    let ws = WeightStandardization::default();
    ws.record_forward(&mut rec, &w).unwrap();
    ws.record_backward(&mut rec, &w, &gw).unwrap();
    let wn = WeightNorm::default();
    wn.record_forward(&mut rec, &g, &w).unwrap();
    wn.record_backward(&mut rec, &g, &w, &gw).unwrap();
    let out = sn
        .record_forward(&mut rec, &w, &mut sn_state, true)
        .unwrap();
    sn.record_backward(&mut rec, &w, &gw, &out, &sn_state)
        .unwrap();
    let fwd = bn
        .record_forward(
            &mut rec,
            &x,
            Some(&gamma),
            Some(&beta),
            Some(&mut bn_state),
            BatchNormMode::Train,
        )
        .unwrap();
    let grads = bn.record_backward(&mut rec, &x, &gx, &fwd).unwrap();
    rec.submit().unwrap();
    assert_eq!(
        ctx.host_round_trips(),
        before,
        "a round trip inside the step"
    );

    let dx = grads.input.to_array(&ctx).unwrap();
    assert!(dx.iter().all(|v| v.is_finite()));
    assert!(ctx.host_round_trips() > before, "the readback is counted");
}
