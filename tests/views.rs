//! Tensor views of the caller's buffer (`Tensor::from_buffer`): every op reads views at
//! offsets inside one shared buffer, updates state views in place, gives the same
//! values as on tensors of its own, and touches nothing outside the views; bad views
//! are refused.

mod common;

use common::{ctx, ctx_with_binding, Rng};
use ndarray::ArrayD;
use wgnorm::{
    BatchNorm, BatchNormMode, BatchNormState, Context, DType, SpectralNorm, SpectralNormState,
    Tensor, WeightNorm, WeightStandardization,
};

/// Storage offsets are multiples of this many bytes on every device (WebGPU's largest
/// allowed `min_storage_buffer_offset_alignment`).
const ALIGN: u64 = 256;
/// What the shared buffer holds outside the views.
const SENTINEL: f32 = -12345.0;

/// A shared buffer of `words` f32 words filled with the sentinel, and a helper to
/// place arrays into it at aligned offsets, returning views.
struct Shared {
    buffer: wgpu::Buffer,
    next: u64,
}

impl Shared {
    fn new(ctx: &Context, words: usize) -> Self {
        let buffer = ctx.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("caller's buffer"),
            size: words as u64 * 4,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let fill = vec![SENTINEL; words];
        ctx.queue()
            .write_buffer(&buffer, 0, bytemuck::cast_slice(&fill));
        // Start one alignment in, so that no view sits at offset 0.
        Shared {
            buffer,
            next: ALIGN,
        }
    }

    /// `a` written at the next aligned offset, as a view of type `dtype`.
    fn place(&mut self, ctx: &Context, a: &ArrayD<f32>, dtype: DType) -> Tensor {
        let bytes: Vec<u8> = match dtype {
            DType::F32 => a.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::F16 => a
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
            DType::BF16 => a
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
        };
        let mut padded = bytes.clone();
        padded.resize(bytes.len().next_multiple_of(4), 0);
        ctx.queue().write_buffer(&self.buffer, self.next, &padded);
        let view = Tensor::from_buffer(ctx, &self.buffer, self.next, a.shape(), dtype).unwrap();
        // A gap of one alignment after each view, left as sentinel.
        self.next = (self.next + padded.len() as u64).next_multiple_of(ALIGN) + ALIGN;
        view
    }

    /// Asserts that every word outside the byte ranges `regions` still holds the
    /// sentinel.
    #[track_caller]
    fn assert_untouched_outside(&self, ctx: &Context, regions: &[(u64, u64)], what: &str) {
        let len = (self.buffer.size() / 4) as usize;
        let all = Tensor::from_buffer(ctx, &self.buffer, 0, &[len], DType::F32).unwrap();
        for (i, &word) in all.to_array(ctx).unwrap().iter().enumerate() {
            let byte = i as u64 * 4;
            if !regions.iter().any(|&(a, b)| byte >= a && byte < b) {
                assert_eq!(
                    word, SENTINEL,
                    "{what}: word {i} outside every view was written"
                );
            }
        }
    }
}

fn tensor(ctx: &Context, a: &ArrayD<f32>, dtype: DType) -> Tensor {
    Tensor::from_array_as(ctx, a, dtype).unwrap()
}

fn read(ctx: &Context, t: &Tensor) -> ArrayD<f32> {
    t.to_array(ctx).unwrap()
}

/// Every op on views and on its own tensors: the same values, bit for bit (the same
/// kernels on the same data); state views updated in place; the sentinel intact
/// everywhere else. `dtype` is the type of the data views.
fn every_op_on_views(ctx: &Context, dtype: DType) {
    let mut rng = Rng::new(31);
    let w = rng.array(&[24, 6, 3, 3], 0.1, 1.0);
    let g = rng.array(&[24, 6, 3, 3], 0.0, 1.0);
    let x = rng.array(&[4, 8, 5, 4], 0.5, 2.0);
    let dy = rng.array(&[4, 8, 5, 4], 0.0, 1.0);
    let wn_g = rng.array(&[24, 1, 1, 1], 1.0, 0.3);
    let u = rng.array(&[24], 0.2, 1.0);
    let v = rng.array(&[54], 0.2, 1.0);
    let rm = rng.array(&[8], 0.0, 1.0);
    let rv = rng.array(&[8], 1.5, 0.2);

    let mut shared = Shared::new(ctx, 16 * 1024);
    let vw = shared.place(ctx, &w, dtype);
    let vg = shared.place(ctx, &g, dtype);
    let vx = shared.place(ctx, &x, dtype);
    let vdy = shared.place(ctx, &dy, dtype);
    let vwn_g = shared.place(ctx, &wn_g, DType::F32);
    let vu = shared.place(ctx, &u, DType::F32);
    let vv = shared.place(ctx, &v, DType::F32);
    let vrm = shared.place(ctx, &rm, DType::F32);
    let vrv = shared.place(ctx, &rv, DType::F32);
    let regions: Vec<(u64, u64)> = [&vw, &vg, &vx, &vdy, &vwn_g, &vu, &vv, &vrm, &vrv]
        .iter()
        .map(|t| (t.offset(), t.offset() + t.bytes()))
        .collect();
    let (tw, tg, tx, tdy) = (
        tensor(ctx, &w, dtype),
        tensor(ctx, &g, dtype),
        tensor(ctx, &x, dtype),
        tensor(ctx, &dy, dtype),
    );
    let (twn_g, tu, tv, trm, trv) = (
        tensor(ctx, &wn_g, DType::F32),
        tensor(ctx, &u, DType::F32),
        tensor(ctx, &v, DType::F32),
        tensor(ctx, &rm, DType::F32),
        tensor(ctx, &rv, DType::F32),
    );
    assert_eq!(
        read(ctx, &vw),
        read(ctx, &tw),
        "{dtype}: a view reads back its values"
    );

    let ws = WeightStandardization::default();
    let (a, b) = (
        ws.forward_backward(ctx, &vw, &vg).unwrap(),
        ws.forward_backward(ctx, &tw, &tg).unwrap(),
    );
    assert_eq!(
        read(ctx, &a.output),
        read(ctx, &b.output),
        "{dtype}: WS output"
    );
    assert_eq!(read(ctx, &a.grad), read(ctx, &b.grad), "{dtype}: WS grad");

    let wn = WeightNorm::pytorch(Some(0));
    let (a, b) = (
        wn.backward(ctx, &vwn_g, &vw, &vg).unwrap(),
        wn.backward(ctx, &twn_g, &tw, &tg).unwrap(),
    );
    assert_eq!(
        read(ctx, &wn.forward(ctx, &vwn_g, &vw).unwrap()),
        read(ctx, &wn.forward(ctx, &twn_g, &tw).unwrap())
    );
    assert_eq!(read(ctx, &a.g), read(ctx, &b.g), "{dtype}: WN grad_g");
    assert_eq!(read(ctx, &a.v), read(ctx, &b.v), "{dtype}: WN grad_v");

    // Spectral norm: the state's u and v are views, updated in place in training.
    let sn = SpectralNorm::pytorch();
    let mut in_view = SpectralNormState {
        u: vu.clone(),
        v: vv.clone(),
        gamma: None,
        sigma: None,
    };
    let mut own = SpectralNormState {
        u: tu,
        v: tv,
        gamma: None,
        sigma: None,
    };
    let fa = sn.forward(ctx, &vw, &mut in_view, true).unwrap();
    let fb = sn.forward(ctx, &tw, &mut own, true).unwrap();
    assert_eq!(
        read(ctx, &fa.weight),
        read(ctx, &fb.weight),
        "{dtype}: SN output"
    );
    assert_eq!(read(ctx, &in_view.u), read(ctx, &own.u), "{dtype}: SN u");
    assert_eq!(in_view.u.offset(), vu.offset(), "u stays the caller's view");
    assert_eq!(
        read(ctx, &vu),
        read(ctx, &own.u),
        "{dtype}: u updated in place"
    );
    let (ga, gb) = (
        sn.backward(ctx, &vw, &vg, &fa, &in_view).unwrap(),
        sn.backward(ctx, &tw, &tg, &fb, &own).unwrap(),
    );
    assert_eq!(
        read(ctx, &ga.weight),
        read(ctx, &gb.weight),
        "{dtype}: SN grad"
    );

    // Batch norm: running statistics are views, updated in place.
    let bn = BatchNorm::pytorch();
    let (gamma, beta) = (
        Tensor::from_slice(ctx, &[8], &[1.1f32; 8]).unwrap(),
        Tensor::from_slice(ctx, &[8], &[0.2f32; 8]).unwrap(),
    );
    let mut sa = BatchNormState {
        running_mean: vrm.clone(),
        running_var: vrv.clone(),
        num_updates: 0,
    };
    let mut sb = BatchNormState {
        running_mean: trm,
        running_var: trv,
        num_updates: 0,
    };
    let (ba, bb) = (
        bn.forward(
            ctx,
            &vx,
            Some(&gamma),
            Some(&beta),
            Some(&mut sa),
            BatchNormMode::Train,
        )
        .unwrap(),
        bn.forward(
            ctx,
            &tx,
            Some(&gamma),
            Some(&beta),
            Some(&mut sb),
            BatchNormMode::Train,
        )
        .unwrap(),
    );
    assert_eq!(
        read(ctx, &ba.output),
        read(ctx, &bb.output),
        "{dtype}: BN output"
    );
    assert_eq!(
        read(ctx, &vrm),
        read(ctx, &sb.running_mean),
        "{dtype}: running mean in place"
    );
    assert_eq!(
        read(ctx, &vrv),
        read(ctx, &sb.running_var),
        "{dtype}: running var in place"
    );
    let (da, db) = (
        bn.backward(ctx, &vx, &vdy, &ba).unwrap(),
        bn.backward(ctx, &tx, &tdy, &bb).unwrap(),
    );
    assert_eq!(
        read(ctx, &da.input),
        read(ctx, &db.input),
        "{dtype}: BN grad_input"
    );

    shared.assert_untouched_outside(ctx, &regions, &format!("{dtype}"));
}

#[test]
fn every_op_reads_views_and_updates_state_in_place() {
    let ctx = ctx();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        every_op_on_views(&ctx, dtype);
    }
}

/// With bindings capped at 16 KiB the ops run window by window: every window is bound
/// at the view's offset plus its own.
#[test]
fn views_split_into_windows() {
    let ctx = ctx_with_binding(16 * 1024);
    every_op_on_views(&ctx, DType::F32);
    every_op_on_views(&ctx, DType::F16);
}

#[test]
fn bad_views_are_refused() {
    let ctx = ctx();
    let buffer = |usage| {
        ctx.device().create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: 4096,
            usage,
            mapped_at_creation: false,
        })
    };
    let storage = buffer(wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC);
    let err = |r: wgnorm::Result<Tensor>| r.unwrap_err().to_string();
    let e = err(Tensor::from_buffer(&ctx, &storage, 3, &[4], DType::F32));
    assert!(e.contains("not a multiple"), "{e}");
    let e = err(Tensor::from_buffer(
        &ctx,
        &storage,
        2048,
        &[600],
        DType::F32,
    ));
    assert!(e.contains("pass the buffer's end"), "{e}");
    let e = err(Tensor::from_buffer(
        &ctx,
        &buffer(wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::MAP_READ),
        0,
        &[4],
        DType::F32,
    ));
    assert!(e.contains("lacks STORAGE"), "{e}");
    // The whole buffer in half precision fits; one element more does not.
    assert!(Tensor::from_buffer(&ctx, &storage, 0, &[2048], DType::BF16).is_ok());
    assert!(Tensor::from_buffer(&ctx, &storage, 0, &[2049], DType::BF16).is_err());
}

/// Outputs written into the caller's buffer (`Recording::write_next_output_to`): every
/// op's data-shaped outputs land in views of one shared buffer, with the values of
/// outputs of its own, returned as those views; nothing else in the buffer changes.
/// Half outputs of a layout that runs through f32 copies land there too.
fn outputs_into_views(ctx: &Context, dtype: DType, shape: &[usize]) {
    let mut rng = Rng::new(41);
    let w = rng.array(shape, 0.1, 1.0);
    let g = rng.array(shape, 0.0, 1.0);
    let (tw, tg) = (tensor(ctx, &w, dtype), tensor(ctx, &g, dtype));
    let zeros = ArrayD::zeros(shape);
    let mut shared = Shared::new(ctx, 16 * 1024);
    let mut dst = || shared.place(ctx, &zeros, dtype);
    let dsts: Vec<Tensor> = (0..9).map(|_| dst()).collect();
    let regions: Vec<(u64, u64)> = dsts
        .iter()
        .map(|t| (t.offset(), t.offset() + t.bytes()))
        .collect();

    let ws = WeightStandardization::default();
    let wn = WeightNorm::pytorch(Some(0));
    let sn = SpectralNorm::pytorch();
    let bn = BatchNorm {
        scale: false,
        center: false,
        track_running_stats: false,
        ..BatchNorm::pytorch()
    };
    let wn_g = Tensor::from_array(ctx, &rng.array(&wn.g_shape(shape).unwrap(), 1.0, 0.2)).unwrap();
    let mut sn_state = sn.init_state(ctx, &tw, 5).unwrap();
    let again = |t: &Tensor| Tensor::from_array(ctx, &read(ctx, t)).unwrap();
    let mut sn_state2 = SpectralNormState {
        u: again(&sn_state.u),
        v: again(&sn_state.v),
        gamma: None,
        sigma: None,
    };
    let own = ctx
        .run(|rec| {
            let step = ws.record_forward_backward(rec, &tw, &tg)?;
            let wn_out = wn.record_forward(rec, &wn_g, &tw)?;
            let wn_grads = wn.record_backward(rec, &wn_g, &tw, &tg)?;
            let sn_out = sn.record_forward(rec, &tw, &mut sn_state2, true)?;
            let sn_grads = sn.record_backward(rec, &tw, &tg, &sn_out, &sn_state2)?;
            let bn_out = bn.record_forward(rec, &tw, None, None, None, BatchNormMode::Train)?;
            Ok((step, wn_out, wn_grads, sn_out, sn_grads, bn_out))
        })
        .unwrap();
    let mut rec = wgnorm::Recording::new(ctx);
    for d in &dsts[..8] {
        rec.write_next_output_to(d).unwrap();
    }
    let step = ws.record_forward_backward(&mut rec, &tw, &tg).unwrap();
    let wn_out = wn.record_forward(&mut rec, &wn_g, &tw).unwrap();
    let wn_grads = wn.record_backward(&mut rec, &wn_g, &tw, &tg).unwrap();
    let sn_out = sn
        .record_forward(&mut rec, &tw, &mut sn_state, true)
        .unwrap();
    let sn_grads = sn
        .record_backward(&mut rec, &tw, &tg, &sn_out, &sn_state)
        .unwrap();
    let cast = wgnorm::ops::cast::record_cast(&mut rec, &tw, dtype).unwrap();
    let copy = wgnorm::ops::copy::record_copy(&mut rec, &tw).unwrap();
    rec.submit().unwrap();
    let got = [
        &step.output,
        &step.grad,
        &wn_out,
        &wn_grads.v,
        &sn_out.weight,
        &sn_grads.weight,
        &cast,
        &copy,
    ];
    let want = [
        &own.0.output,
        &own.0.grad,
        &own.1,
        &own.2.v,
        &own.3.weight,
        &own.4.weight,
        &tw,
        &tw,
    ];
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert_eq!(
            a.offset(),
            dsts[i].offset(),
            "{dtype} {shape:?}: output {i} is the destination"
        );
        assert_eq!(read(ctx, a), read(ctx, b), "{dtype} {shape:?}: output {i}");
    }
    // Batch norm (a forward over the weight as a batch of rows) takes the last one.
    let mut rec = wgnorm::Recording::new(ctx);
    rec.write_next_output_to(&dsts[8]).unwrap();
    let y = bn
        .record_forward(&mut rec, &tw, None, None, None, BatchNormMode::Train)
        .unwrap();
    rec.submit().unwrap();
    assert_eq!(y.output.offset(), dsts[8].offset());
    assert_eq!(
        read(ctx, &y.output),
        read(ctx, &own.5.output),
        "{dtype}: BN"
    );
    shared.assert_untouched_outside(ctx, &regions, &format!("{dtype} {shape:?}"));
}

#[test]
fn outputs_are_written_into_the_callers_buffer() {
    let ctx = ctx();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        // Rows of 36 (vec4 kernels) and of 45 (half data through f32 copies).
        outputs_into_views(&ctx, dtype, &[16, 4, 3, 3]);
        outputs_into_views(&ctx, dtype, &[12, 5, 3, 3]);
    }
}

/// A destination of another shape or type is refused by the op that would take it; a
/// destination no op takes fails the submission (nothing is submitted).
#[test]
fn mismatched_or_unused_destinations_are_errors() {
    let ctx = ctx();
    let w = Tensor::from_array(&ctx, &Rng::new(2).array(&[8, 9], 0.0, 1.0)).unwrap();
    let wrong = Tensor::zeros(&ctx, &[9, 8]).unwrap();
    let mut rec = wgnorm::Recording::new(&ctx);
    rec.write_next_output_to(&wrong).unwrap();
    let e = WeightStandardization::default()
        .record_forward(&mut rec, &w)
        .unwrap_err()
        .to_string();
    assert!(e.contains("[8, 9] f32") && e.contains("[9, 8] f32"), "{e}");
    let half = Tensor::zeros_typed(&ctx, &[8, 9], DType::BF16).unwrap();
    let mut rec = wgnorm::Recording::new(&ctx);
    rec.write_next_output_to(&half).unwrap();
    assert!(WeightStandardization::default()
        .record_forward(&mut rec, &w)
        .is_err());
    let mut rec = wgnorm::Recording::new(&ctx);
    rec.write_next_output_to(&w).unwrap();
    let e = rec.submit().unwrap_err().to_string();
    assert!(e.contains("taken by no op"), "{e}");
    // An odd number of half elements: the word past the end would be written.
    let odd = Tensor::zeros_typed(&ctx, &[7], DType::F16).unwrap();
    let mut rec = wgnorm::Recording::new(&ctx);
    let e = rec.write_next_output_to(&odd).unwrap_err().to_string();
    assert!(e.contains("odd count"), "{e}");
}

/// Inputs, state and outputs all views of one buffer (as a framework's pooled memory
/// holds tensors): the ops run their read-write twins and give the same values; an
/// output over an input is refused, naming the overlap.
#[test]
fn inputs_and_outputs_may_share_a_buffer() {
    let ctx = ctx();
    for dtype in [DType::F32, DType::BF16] {
        let mut rng = Rng::new(51);
        let shape = [16usize, 4, 3, 3];
        let w = rng.array(&shape, 0.1, 1.0);
        let g = rng.array(&shape, 0.0, 1.0);
        let zeros = ArrayD::zeros(&shape[..]);
        let mut shared = Shared::new(&ctx, 16 * 1024);
        let (vw, vg) = (shared.place(&ctx, &w, dtype), shared.place(&ctx, &g, dtype));
        let outs: Vec<Tensor> = (0..4).map(|_| shared.place(&ctx, &zeros, dtype)).collect();
        let (tw, tg) = (tensor(&ctx, &w, dtype), tensor(&ctx, &g, dtype));
        let ws = WeightStandardization::default();
        let wn = WeightNorm::pytorch(Some(0));
        let wn_g = Tensor::from_array(&ctx, &rng.array(&[16, 1, 1, 1], 1.0, 0.2)).unwrap();
        let mut rec = wgnorm::Recording::new(&ctx);
        for o in &outs {
            rec.write_next_output_to(o).unwrap();
        }
        let step = ws.record_forward_backward(&mut rec, &vw, &vg).unwrap();
        let wn_out = wn.record_forward(&mut rec, &wn_g, &vw).unwrap();
        let wn_grads = wn.record_backward(&mut rec, &wn_g, &vw, &vg).unwrap();
        rec.submit().unwrap();
        let own = ws.forward_backward(&ctx, &tw, &tg).unwrap();
        let got = [&step.output, &step.grad, &wn_out, &wn_grads.v];
        let want = [
            own.output,
            own.grad,
            wn.forward(&ctx, &wn_g, &tw).unwrap(),
            wn.backward(&ctx, &wn_g, &tw, &tg).unwrap().v,
        ];
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                a.offset(),
                outs[i].offset(),
                "{dtype}: output {i} in the buffer"
            );
            assert_eq!(read(&ctx, a), read(&ctx, b), "{dtype}: output {i}");
        }
        // The weight's own range as the output: refused, nothing submitted.
        let mut rec = wgnorm::Recording::new(&ctx);
        rec.write_next_output_to(&vw).unwrap();
        let e = ws.record_forward(&mut rec, &vw).unwrap_err().to_string();
        assert!(e.contains("overlap"), "{e}");
        drop(rec);
        assert_eq!(
            read(&ctx, &vw),
            read(&ctx, &tw),
            "{dtype}: the input is untouched"
        );
    }
}

#[test]
fn copies_between_views_of_one_buffer() {
    // burn's pooled tensors share one buffer: the driver's copy refuses that, the
    // copy kernel takes it.
    let ctx = ctx();
    let mut rng = Rng::new(52);
    let a = rng.array(&[100], 0.0, 1.0);
    let mut shared = Shared::new(&ctx, 4096);
    let src = shared.place(&ctx, &a, DType::F32);
    let dst = shared.place(&ctx, &ArrayD::zeros(&[100][..]), DType::F32);
    let mut rec = wgnorm::Recording::new(&ctx);
    rec.copy_tensor(&src, &dst).unwrap();
    rec.copy_tensor(&src, &src).unwrap(); // itself: nothing to do
    rec.submit().unwrap();
    assert_eq!(read(&ctx, &dst), a);
    let regions = [src.offset(), dst.offset()].map(|o| (o, o + 400));
    shared.assert_untouched_outside(&ctx, &regions, "copy");
    // Overlapping ranges: refused.
    let shifted =
        Tensor::from_buffer(&ctx, src.buffer(), src.offset() + ALIGN, &[100], DType::F32).unwrap();
    let mut rec = wgnorm::Recording::new(&ctx);
    let e = rec.copy_tensor(&src, &shifted).unwrap_err().to_string();
    assert!(e.contains("overlap"), "{e}");
}
