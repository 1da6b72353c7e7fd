//! Checkpoints written by PyTorch (tests/checkpoints/pytorch_checkpoints.py: spectral
//! norm on a conv and a deconv, weight norm on a linear, BatchNorm2d, three training
//! steps) in both of PyTorch's APIs and in f32, bf16 and f16 load, and give PyTorch's
//! evaluation weights and batch-norm output to `CHECKPOINT_TOL`; wgnorm's saves under
//! either API load back (and, checked by the script, in PyTorch).

mod common;

use std::path::{Path, PathBuf};

use common::{assert_close, ctx};
use ndarray::ArrayD;
use wgnorm::state::{self, Naming};
use wgnorm::{
    BatchNorm, BatchNormLayer, BatchNormMode, Context, SpectralNorm, SpectralNormHook, Tensor,
    Weight, WeightNorm, WeightNormHook,
};

/// f32 kernels against PyTorch's f32 results on the same values.
const CHECKPOINT_TOL: f32 = 1e-6;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/checkpoints")
}

/// The script's model: weights without data (shapes come from the file).
fn model(ctx: &Context) -> (Vec<Weight>, BatchNormLayer) {
    let sn = |name: &str, axis: usize| {
        let mut w = Weight::new(name, None);
        let config = SpectralNorm {
            axis,
            ..SpectralNorm::pytorch()
        };
        w.add_hook(ctx, Box::new(SpectralNormHook::new(config, 1)))
            .unwrap();
        w
    };
    let mut fc = Weight::new("fc", None);
    fc.add_hook(
        ctx,
        Box::new(WeightNormHook::new(WeightNorm::pytorch(Some(0)))),
    )
    .unwrap();
    let bn = BatchNormLayer::new(ctx, BatchNorm::pytorch(), 6).unwrap();
    (vec![sn("conv", 0), sn("deconv", 1), fc], bn)
}

fn expected(name: &str) -> std::collections::HashMap<String, ArrayD<f32>> {
    let bytes = std::fs::read(dir().join(name)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| {
            let data: Vec<f32> = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (k, ArrayD::from_shape_vec(v.shape().to_vec(), data).unwrap())
        })
        .collect()
}

/// Loads the hook-API checkpoint into `weights` and `bn`.
fn load_hooks_file(ctx: &Context, weights: &mut [&mut Weight], bn: &mut BatchNormLayer) {
    let file = dir().join("hooks.safetensors");
    state::load_with(ctx, &file, weights, &mut [], &mut [("bn", bn)]).unwrap();
}

/// Evaluation weights and the batch norm's evaluation output against the framework's
/// (`<m>.weight` for each weight, `bn.output` on `bn.input`).
fn check_against(
    ctx: &Context,
    weights: &mut [Weight],
    bn: &mut BatchNormLayer,
    want: &std::collections::HashMap<String, ArrayD<f32>>,
) {
    for w in weights.iter_mut() {
        let got = w.forward(ctx, false).unwrap().to_array(ctx).unwrap();
        let key = format!("{}.weight", w.name());
        assert_close(&key, &got, &want[&key], CHECKPOINT_TOL, CHECKPOINT_TOL);
    }
    let x = Tensor::from_array(ctx, &want["bn.input"]).unwrap();
    let y = bn.forward(ctx, &x, BatchNormMode::Eval).unwrap();
    let got = y.output.to_array(ctx).unwrap();
    assert_close(
        "bn.output",
        &got,
        &want["bn.output"],
        CHECKPOINT_TOL,
        CHECKPOINT_TOL,
    );
}

#[test]
fn pytorch_checkpoints_of_both_apis_and_dtypes_load() {
    let ctx = ctx();
    for api in ["hooks", "parametrizations"] {
        for dtype in ["", "_bf16", "_f16"] {
            let (mut weights, mut bn) = model(&ctx);
            let file = dir().join(format!("{api}{dtype}.safetensors"));
            let mut refs: Vec<&mut Weight> = weights.iter_mut().collect();
            state::load_with(&ctx, &file, &mut refs, &mut [], &mut [("bn", &mut bn)])
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            assert_eq!(bn.state.num_updates, 3, "{api}{dtype}");
            check_against(
                &ctx,
                &mut weights,
                &mut bn,
                &expected(&format!("{api}{dtype}_expected.safetensors")),
            );
            // The same bytes from memory.
            let (mut again, mut bn2) = model(&ctx);
            let mut refs: Vec<&mut Weight> = again.iter_mut().collect();
            let bytes = std::fs::read(&file).unwrap();
            state::load_bytes(&ctx, &bytes, &mut refs, &mut [], &mut [("bn", &mut bn2)]).unwrap();
            check_against(
                &ctx,
                &mut again,
                &mut bn2,
                &expected(&format!("{api}{dtype}_expected.safetensors")),
            );
        }
    }
}

/// wgnorm's own saves under either API load back here, and are left in
/// `target/checkpoints/` for `pytorch_checkpoints.py check` (done by hand: the script
/// needs torch; see the module docs).
#[test]
fn saves_under_either_api_load_back() {
    let ctx = ctx();
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/checkpoints");
    std::fs::create_dir_all(&out).unwrap();
    for (naming, name) in [
        (Naming::PyTorchHooks, "hooks"),
        (Naming::PyTorchParametrizations, "parametrizations"),
    ] {
        let (mut weights, mut bn) = model(&ctx);
        load_hooks_file(&ctx, &mut weights.iter_mut().collect::<Vec<_>>(), &mut bn);
        let path = out.join(format!("wgnorm_{name}.safetensors"));
        let refs: Vec<&Weight> = weights.iter().collect();
        state::save_with(&ctx, &path, &refs, &[], &[("bn", &bn)], naming).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let names: Vec<String> = safetensors::SafeTensors::deserialize(&bytes)
            .unwrap()
            .names()
            .into_iter()
            .map(String::from)
            .collect();
        for key in [
            "bn.weight",
            "bn.bias",
            "bn.running_var",
            "bn.num_batches_tracked",
        ] {
            assert!(
                names.iter().any(|n| n == key),
                "{name}: {key} missing in {names:?}"
            );
        }
        let parametrized = names
            .iter()
            .any(|n| n.contains("parametrizations.weight.original"));
        assert_eq!(
            parametrized,
            naming == Naming::PyTorchParametrizations,
            "{names:?}"
        );
        let (mut back, mut bn2) = model(&ctx);
        let mut refs: Vec<&mut Weight> = back.iter_mut().collect();
        state::load_with(&ctx, &path, &mut refs, &mut [], &mut [("bn", &mut bn2)]).unwrap();
        check_against(
            &ctx,
            &mut back,
            &mut bn2,
            &expected("hooks_expected.safetensors"),
        );
    }
}

/// Removing weight normalization leaves `g * v / ||v||` in place (PyTorch's
/// `remove_weight_norm`, Jittor's `remove`), not `v`.
#[test]
fn removing_weight_norm_folds_the_weight() {
    let ctx = ctx();
    let (mut weights, _) = model(&ctx);
    let fc = &mut weights[2];
    let mut bn = BatchNormLayer::new(&ctx, BatchNorm::pytorch(), 6).unwrap();
    load_hooks_file(&ctx, &mut [&mut *fc], &mut bn);
    let normalized = fc.forward(&ctx, false).unwrap().to_array(&ctx).unwrap();
    fc.remove_hook(&ctx, "weight_norm").unwrap();
    let raw = fc.data().unwrap().to_array(&ctx).unwrap();
    assert_eq!(raw, normalized);
    assert_eq!(
        fc.forward(&ctx, false).unwrap().to_array(&ctx).unwrap(),
        normalized
    );
    assert_close(
        "fc.weight",
        &raw,
        &expected("hooks_expected.safetensors")["fc.weight"],
        CHECKPOINT_TOL,
        CHECKPOINT_TOL,
    );
}

/// The chain of tests/chainer/chainer_checkpoint.py: spectral norm on a conv (with
/// gamma) and a deconv (axis 1), weight standardization on a linear, batch norm.
fn chainer_model(ctx: &Context) -> (Vec<Weight>, BatchNormLayer) {
    let sn = |name: &str, config: SpectralNorm| {
        let mut w = Weight::new(name, None);
        w.add_hook(ctx, Box::new(SpectralNormHook::new(config, 1)))
            .unwrap();
        w
    };
    let mut fc = Weight::new("fc", None);
    fc.add_hook(ctx, Box::new(wgnorm::WeightStandardizationHook::default()))
        .unwrap();
    let conv = SpectralNorm {
        use_gamma: true,
        ..SpectralNorm::chainer()
    };
    let deconv = SpectralNorm {
        axis: 1,
        ..SpectralNorm::chainer()
    };
    let bn = BatchNormLayer::new(ctx, BatchNorm::chainer(), 6).unwrap();
    (vec![sn("conv", conv), sn("deconv", deconv), fc], bn)
}

fn chainer_expected() -> std::collections::HashMap<String, ArrayD<f32>> {
    let file = std::fs::File::open(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/chainer/chainer_expected.npz"),
    )
    .unwrap();
    let mut npz = ndarray_npy::NpzReader::new(file).unwrap();
    npz.names()
        .unwrap()
        .into_iter()
        .map(|k| {
            let a: ArrayD<f32> = npz.by_name(&k).unwrap();
            (k, a)
        })
        .collect()
}

/// A file written by Chainer 7.8.1's `save_npz` after three training steps loads, and
/// gives Chainer's evaluation weights (spectral norm still iterating once from the
/// stored `u`, as Chainer does) and batch-norm output to `CHECKPOINT_TOL`; wgnorm's
/// own npz save loads back (and, checked by the script, in Chainer).
#[test]
fn chainer_npz_checkpoints_load_and_save() {
    let ctx = ctx();
    let chainer = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/chainer/chainer.npz");
    let want = chainer_expected();
    let check =
        |weights: &mut [Weight], bn: &mut BatchNormLayer| check_against(&ctx, weights, bn, &want);
    let (mut weights, mut bn) = chainer_model(&ctx);
    let mut refs: Vec<&mut Weight> = weights.iter_mut().collect();
    state::load_chainer_npz(&ctx, &chainer, &mut refs, &mut [("bn", &mut bn)]).unwrap();
    // Chainer's N counts finetune steps only: three ordinary steps leave it at 0.
    assert_eq!(bn.state.num_updates, 0);
    check(&mut weights, &mut bn);

    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/checkpoints");
    std::fs::create_dir_all(&out).unwrap();
    let saved = out.join("wgnorm_chainer.npz");
    let refs: Vec<&Weight> = weights.iter().collect();
    state::save_chainer_npz(&ctx, &saved, &refs, &[("bn", &bn)]).unwrap();
    let (mut back, mut bn2) = chainer_model(&ctx);
    let mut refs: Vec<&mut Weight> = back.iter_mut().collect();
    state::load_chainer_npz(&ctx, &saved, &mut refs, &mut [("bn", &mut bn2)]).unwrap();
    check(&mut back, &mut bn2);

    // Weight normalization has no Chainer name: refused, with the reason.
    let (mut pytorch, _) = model(&ctx);
    let mut refs: Vec<&mut Weight> = pytorch.iter_mut().collect();
    let e = state::load_chainer_npz(&ctx, &chainer, &mut refs, &mut []).unwrap_err();
    assert!(e.to_string().contains("no weight normalization"), "{e}");
}

/// f64 entries and an int32 `num_batches_tracked` load (converted); an f64 value past
/// f32's range is refused and changes nothing.
#[test]
fn f64_and_int32_entries_load_and_out_of_range_is_refused() {
    let ctx = ctx();
    let file = |mean: f64| {
        let m: Vec<u8> = [mean, 2.0, 3.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let v: Vec<u8> = [0.5f64, 1.5, 2.5]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let n = 7i32.to_le_bytes().to_vec();
        let views = vec![
            (
                "bn.running_mean".to_string(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F64, vec![3], &m).unwrap(),
            ),
            (
                "bn.running_var".to_string(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F64, vec![3], &v).unwrap(),
            ),
            (
                "bn.num_batches_tracked".to_string(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![], &n).unwrap(),
            ),
        ];
        safetensors::serialize(views, None).unwrap()
    };
    let mut bn = wgnorm::BatchNormState::new(&ctx, 3).unwrap();
    state::load_bytes(&ctx, &file(1.25), &mut [], &mut [("bn", &mut bn)], &mut []).unwrap();
    assert_eq!(bn.num_updates, 7);
    assert_eq!(
        bn.running_mean.to_array(&ctx).unwrap().as_slice().unwrap(),
        [1.25, 2.0, 3.0]
    );
    assert_eq!(
        bn.running_var.to_array(&ctx).unwrap().as_slice().unwrap(),
        [0.5, 1.5, 2.5]
    );
    let e = state::load_bytes(&ctx, &file(1e300), &mut [], &mut [("bn", &mut bn)], &mut [])
        .unwrap_err();
    assert!(e.to_string().contains("past f32's range"), "{e}");
    assert_eq!(
        bn.running_mean.to_array(&ctx).unwrap().as_slice().unwrap(),
        [1.25, 2.0, 3.0]
    );
}

/// Half-precision weights save as F16 / BF16 entries (spectral norm's `u` and `v`, and
/// weight norm's `g` made from the weight, stay F32) and load back into a half model
/// bit for bit; an f32 file loads into a bf16 model rounded to nearest even, as
/// PyTorch's `load_state_dict` copies into a bf16 parameter.
#[test]
fn half_weights_save_and_load_in_their_types() {
    use half::{bf16, f16};
    let ctx = ctx();
    let values = |seed: u64, shape: &[usize]| common::Rng::new(seed).array(shape, 0.1, 1.0);
    let conv = values(1, &[8, 4, 3, 3]);
    let fc = values(2, &[6, 10]);
    let make = |conv_data: Option<Tensor>, fc_data: Option<Tensor>| {
        let mut c = Weight::new("conv", conv_data);
        c.add_hook(
            &ctx,
            Box::new(SpectralNormHook::new(SpectralNorm::pytorch(), 1)),
        )
        .unwrap();
        let mut f = Weight::new("fc", fc_data);
        f.add_hook(
            &ctx,
            Box::new(WeightNormHook::new(WeightNorm::pytorch(Some(0)))),
        )
        .unwrap();
        vec![c, f]
    };
    let conv_bf = Tensor::from_array(&ctx, &conv.mapv(bf16::from_f32)).unwrap();
    let fc_h = Tensor::from_array(&ctx, &fc.mapv(f16::from_f32)).unwrap();
    let mut weights = make(Some(conv_bf.clone()), Some(fc_h.clone()));
    let before: Vec<ArrayD<f32>> = weights
        .iter_mut()
        .map(|w| w.forward(&ctx, false).unwrap().to_array(&ctx).unwrap())
        .collect();
    let refs: Vec<&Weight> = weights.iter().collect();
    let bytes = state::to_bytes(&ctx, &refs, &[], &[], Naming::PyTorchHooks).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let dtype = |k: &str| st.tensor(k).unwrap().dtype();
    assert_eq!(dtype("conv.weight_orig"), safetensors::Dtype::BF16);
    assert_eq!(dtype("fc.weight_v"), safetensors::Dtype::F16);
    assert_eq!(dtype("conv.weight_u"), safetensors::Dtype::F32);
    assert_eq!(dtype("fc.weight_g"), safetensors::Dtype::F32);

    // Back into a half model (zeros of the same types): the same bits, the same forward.
    let zeros = |t: &Tensor| Tensor::zeros_typed(&ctx, t.shape(), t.dtype()).unwrap();
    let mut back = make(Some(zeros(&conv_bf)), Some(zeros(&fc_h)));
    let mut refs: Vec<&mut Weight> = back.iter_mut().collect();
    state::load_bytes(&ctx, &bytes, &mut refs, &mut [], &mut []).unwrap();
    let raw = back[0].data().unwrap();
    assert_eq!(raw.dtype(), wgnorm::DType::BF16);
    assert_eq!(
        raw.to_array_of::<bf16>(&ctx).unwrap(),
        conv_bf.to_array_of::<bf16>(&ctx).unwrap()
    );
    assert_eq!(back[1].data().unwrap().dtype(), wgnorm::DType::F16);
    for (w, want) in back.iter_mut().zip(&before) {
        let got = w.forward(&ctx, false).unwrap();
        assert_eq!(&got.to_array(&ctx).unwrap(), want, "{}", w.name());
    }

    // An f32 file into a bf16 model: rounded once, to nearest even.
    let f32_model = make(
        Some(Tensor::from_array(&ctx, &conv).unwrap()),
        Some(Tensor::from_array(&ctx, &fc).unwrap()),
    );
    let refs: Vec<&Weight> = f32_model.iter().collect();
    let bytes = state::to_bytes(&ctx, &refs, &[], &[], Naming::PyTorchHooks).unwrap();
    let mut half_model = make(Some(zeros(&conv_bf)), Some(zeros(&fc_h)));
    let mut refs: Vec<&mut Weight> = half_model.iter_mut().collect();
    state::load_bytes(&ctx, &bytes, &mut refs, &mut [], &mut []).unwrap();
    let raw = half_model[0].data().unwrap().to_array(&ctx).unwrap();
    assert_eq!(raw, conv.mapv(|x| bf16::from_f32(x).to_f32()));
}
