//! Hooks on weights: add/remove with callbacks, global hooks, composition with its
//! backward against the reference, the timer, state save/load.

mod common;

use std::sync::{Arc, Mutex};

use common::{assert_close, ctx, Rng};
use ndarray::ArrayD;
use wgnorm::hooks::{HookArgs, SharedHook};
use wgnorm::reference::{spectral_norm as sn_ref, weight_standardization as ws_ref};
use wgnorm::{
    register_global, BatchNormState, Context, Recording, SpectralNorm, SpectralNormHook, Tensor,
    TimerHook, Weight, WeightHook, WeightNorm, WeightNormHook, WeightStandardization,
    WeightStandardizationHook,
};

const RTOL: f32 = 1e-3;
const ATOL: f32 = 1e-4;

/// An observer that logs its callbacks.
struct Log(Arc<Mutex<Vec<String>>>);

impl WeightHook for Log {
    fn name(&self) -> &str {
        "log"
    }
    fn added(&mut self, _: &Context, w: &str, data: Option<&Tensor>) -> wgnorm::Result<()> {
        self.0
            .lock()
            .unwrap()
            .push(format!("added {w} {}", data.is_some()));
        Ok(())
    }
    fn deleted(&mut self, _: &Context, w: &str) -> wgnorm::Result<()> {
        self.0.lock().unwrap().push(format!("deleted {w}"));
        Ok(())
    }
    fn forward_preprocess(
        &mut self,
        _: &mut Recording<'_>,
        a: &HookArgs<'_>,
    ) -> wgnorm::Result<()> {
        self.0.lock().unwrap().push(format!("pre {}", a.weight));
        Ok(())
    }
    fn forward_postprocess(
        &mut self,
        _: &mut Recording<'_>,
        a: &HookArgs<'_>,
    ) -> wgnorm::Result<()> {
        self.0.lock().unwrap().push(format!("post {}", a.weight));
        Ok(())
    }
    fn hook_preprocess(
        &mut self,
        _: &mut Recording<'_>,
        _: &HookArgs<'_>,
        h: &str,
    ) -> wgnorm::Result<()> {
        self.0.lock().unwrap().push(format!("before {h}"));
        Ok(())
    }
}

fn weight(ctx: &Context, rng: &mut Rng, name: &str, shape: &[usize]) -> (ArrayD<f32>, Weight) {
    let w = rng.array(shape, 0.1, 1.0);
    let t = Tensor::from_array(ctx, &w).unwrap();
    (w, Weight::new(name, Some(t)))
}

#[test]
fn add_and_remove_with_callbacks() {
    let ctx = ctx();
    let mut rng = Rng::new(1);
    let (raw, mut w) = weight(&ctx, &mut rng, "conv1", &[8, 4, 3, 3]);
    let log = Arc::new(Mutex::new(Vec::new()));
    w.add_hook(&ctx, Box::new(Log(log.clone()))).unwrap();
    w.add_hook(
        &ctx,
        Box::new(SpectralNormHook::new(SpectralNorm::chainer(), 0)),
    )
    .unwrap();
    assert_eq!(w.hook_names(), ["log", "spectral_norm"]);
    let dup = w.add_hook(
        &ctx,
        Box::new(SpectralNormHook::new(SpectralNorm::chainer(), 0)),
    );
    assert!(dup
        .unwrap_err()
        .to_string()
        .contains("already has a hook named `spectral_norm`"));
    let out = w.forward(&ctx, true).unwrap().to_array(&ctx).unwrap();
    assert!((&out - &raw).iter().any(|d| d.abs() > 1e-3), "normalized");
    assert_eq!(
        *log.lock().unwrap(),
        [
            "added conv1 true",
            "pre conv1",
            "before spectral_norm",
            "post conv1"
        ]
    );
    w.remove_hook(&ctx, "spectral_norm").unwrap();
    let plain = w.forward(&ctx, true).unwrap().to_array(&ctx).unwrap();
    assert_eq!(plain, raw, "no transform left: the raw weight");
    w.remove_hook(&ctx, "log").unwrap();
    assert_eq!(log.lock().unwrap().last().unwrap(), "deleted conv1");
    let err = w.remove_hook(&ctx, "log").err().unwrap().to_string();
    assert!(err.contains("no hook named `log`"), "{err}");
}

#[test]
fn lazy_initialisation() {
    let ctx = ctx();
    let mut w = Weight::new("fc", None);
    w.add_hook(
        &ctx,
        Box::new(SpectralNormHook::new(SpectralNorm::pytorch(), 3)),
    )
    .unwrap();
    let err = w.forward(&ctx, true).unwrap_err().to_string();
    assert!(err.contains("no data yet"), "{err}");
    let data = ArrayD::from_shape_fn(ndarray::IxDyn(&[6, 5]), |i| (i[0] * 5 + i[1]) as f32 - 14.0);
    w.set_data(Tensor::from_array(&ctx, &data).unwrap());
    let out = w.forward(&ctx, true).unwrap().to_array(&ctx).unwrap();
    let top = sn_ref::top_singular_value(data.view(), 0).unwrap() as f32;
    // After 15 warm-up iterations and one more, W / sigma has spectral norm ~1.
    let got = sn_ref::top_singular_value(out.view(), 0).unwrap() as f32;
    assert!(
        (got - 1.0).abs() < 1e-3,
        "normalized spectral norm {got} (sigma of W {top})"
    );
}

#[test]
fn global_hooks_apply_to_every_weight() {
    let ctx = ctx();
    let mut rng = Rng::new(2);
    let (a, mut wa) = weight(&ctx, &mut rng, "a", &[5, 7]);
    let (b, mut wb) = weight(&ctx, &mut rng, "b", &[3, 2, 3, 3]);
    let ws = WeightStandardization::default();
    {
        let hook: SharedHook = Arc::new(Mutex::new(WeightStandardizationHook(ws)));
        let _guard = register_global(hook).unwrap();
        for (w, raw) in [(&mut wa, &a), (&mut wb, &b)] {
            let out = w.forward(&ctx, true).unwrap().to_array(&ctx).unwrap();
            let want = ws_ref::forward(&ws, raw.view()).unwrap();
            assert_close("global ws", &out, &want, RTOL, ATOL);
        }
    }
    // The guard is gone: no hook any more.
    assert_eq!(wa.forward(&ctx, true).unwrap().to_array(&ctx).unwrap(), a);
    let sn: SharedHook = Arc::new(Mutex::new(SpectralNormHook::new(
        SpectralNorm::chainer(),
        0,
    )));
    let err = register_global(sn).unwrap_err().to_string();
    assert!(err.contains("per-weight state"), "{err}");
}

/// Weight Standardization then Spectral Normalization, forward and backward through
/// both to the raw weight, against the references chained on the CPU.
#[test]
fn composition_and_its_backward() {
    let ctx = ctx();
    let mut rng = Rng::new(4);
    let shape = [12, 6, 3, 3];
    let (raw, mut w) = weight(&ctx, &mut rng, "conv", &shape);
    let ws = WeightStandardization::default();
    let sn = SpectralNorm {
        use_gamma: true,
        ..SpectralNorm::chainer()
    };
    w.add_hook(&ctx, Box::new(WeightStandardizationHook(ws)))
        .unwrap();
    w.add_hook(&ctx, Box::new(SpectralNormHook::new(sn, 9)))
        .unwrap();
    // The SN state before the step (u, gamma), for the reference.
    let hook = w.hook("spectral_norm").unwrap();
    let state = hook.state();
    let u0: Vec<f32> = state[0].1.to_array(&ctx).unwrap().iter().copied().collect();
    let gamma: f32 = state[2].1.to_array(&ctx).unwrap()[[0]];
    let g = rng.array(&shape, 0.0, 1.0);
    let tg = Tensor::from_array(&ctx, &g).unwrap();
    let (out, grad) = ctx
        .run(|rec| {
            let out = w.record_forward(rec, true)?;
            let grad = w.record_backward(rec, &tg)?;
            Ok((out, grad))
        })
        .unwrap();
    let got = ctx.read_all(&[&out, &grad]).unwrap();
    let ws_out = ws_ref::forward(&ws, raw.view()).unwrap();
    let v0 = vec![0.0; 54];
    let fwd = sn_ref::forward(&sn, ws_out.view(), &u0, &v0, gamma, true).unwrap();
    let (grad_ws, _) = sn_ref::backward(&sn, ws_out.view(), g.view(), &fwd, gamma).unwrap();
    let want_grad = ws_ref::backward(&ws, raw.view(), grad_ws.view()).unwrap();
    assert_close("composed output", &got[0], &fwd.output, RTOL, ATOL);
    let scale = want_grad.iter().fold(1f32, |m, x| m.max(x.abs()));
    assert_close("composed grad", &got[1], &want_grad, 2e-3, 2e-4 * scale);
}

#[test]
fn timer_reports_every_weight_and_hook() {
    let ctx = ctx();
    let mut rng = Rng::new(6);
    let timer = Arc::new(Mutex::new(TimerHook::new()));
    let shared: SharedHook = timer.clone();
    let _guard = register_global(shared).unwrap();
    let mut weights = Vec::new();
    for (i, shape) in [[16usize, 8, 3, 3], [32, 16, 1, 1]].iter().enumerate() {
        let (_, mut w) = weight(&ctx, &mut rng, &format!("layer{i}"), shape);
        w.add_hook(&ctx, Box::new(WeightStandardizationHook::default()))
            .unwrap();
        w.add_hook(
            &ctx,
            Box::new(SpectralNormHook::new(SpectralNorm::pytorch(), 1)),
        )
        .unwrap();
        weights.push(w);
    }
    let mut rec = Recording::new(&ctx);
    let gpu = rec.gpu_timed();
    for w in weights.iter_mut() {
        w.record_forward(&mut rec, true).unwrap();
    }
    rec.submit().unwrap();
    let report = timer.lock().unwrap().report();
    let rows = timer.lock().unwrap().rows();
    assert_eq!(rows.len(), 6, "{rows:?}");
    for i in 0..2 {
        for hook in ["(forward)", "weight_standardization", "spectral_norm"] {
            let t = report.total(&format!("layer{i}"), hook).unwrap();
            assert!(t.is_finite() && t >= 0.0, "{hook}: {t}");
        }
        let whole = report.total(&format!("layer{i}"), "(forward)").unwrap();
        let parts = report.total(&format!("layer{i}"), "spectral_norm").unwrap();
        assert!(
            whole >= parts,
            "the forward contains its hooks: {whole} < {parts}"
        );
    }
    assert!(rows.iter().all(|r| r.gpu == gpu));
    let text = report.to_string();
    assert!(text.contains("layer1") && text.contains("spectral_norm") && text.contains("mean ms"));
    assert!(text.contains(if gpu { "gpu" } else { "wall" }));
}

#[test]
fn save_and_load_round_trip_and_refusal() {
    let ctx = ctx();
    let mut rng = Rng::new(8);
    let dir = std::env::temp_dir().join(format!("wgnorm-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("state.safetensors");
    let (_, mut sn_w) = weight(&ctx, &mut rng, "conv1", &[8, 4, 3, 3]);
    sn_w.add_hook(
        &ctx,
        Box::new(SpectralNormHook::new(SpectralNorm::pytorch(), 5)),
    )
    .unwrap();
    sn_w.forward(&ctx, true).unwrap();
    let (_, mut wn_w) = weight(&ctx, &mut rng, "fc", &[10, 6]);
    wn_w.add_hook(
        &ctx,
        Box::new(WeightNormHook::new(WeightNorm::pytorch(Some(0)))),
    )
    .unwrap();
    let mut bn = BatchNormState::new(&ctx, 4).unwrap();
    bn.running_mean = Tensor::from_slice(&ctx, &[4], &[1.0, 2.0, 3.0, 4.0]).unwrap();
    bn.num_updates = 7;
    wgnorm::state::save(&ctx, &path, &[&sn_w, &wn_w], &[("bn1", &bn)]).unwrap();
    // The names PyTorch uses.
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "bn1.num_batches_tracked",
            "bn1.running_mean",
            "bn1.running_var",
            "conv1.weight_orig",
            "conv1.weight_u",
            "conv1.weight_v",
            "fc.weight_g",
            "fc.weight_v"
        ]
    );
    // Load into fresh, uninitialised weights: the same normalized weights.
    let mut sn2 = Weight::new("conv1", None);
    sn2.add_hook(
        &ctx,
        Box::new(SpectralNormHook::new(SpectralNorm::pytorch(), 99)),
    )
    .unwrap();
    let mut wn2 = Weight::new("fc", None);
    wn2.add_hook(
        &ctx,
        Box::new(WeightNormHook::new(WeightNorm::pytorch(Some(0)))),
    )
    .unwrap();
    let mut bn2 = BatchNormState::new(&ctx, 4).unwrap();
    wgnorm::state::load(
        &ctx,
        &path,
        &mut [&mut sn2, &mut wn2],
        &mut [("bn1", &mut bn2)],
    )
    .unwrap();
    for (a, b) in [(&mut sn_w, &mut sn2), (&mut wn_w, &mut wn2)] {
        let x = a.forward(&ctx, false).unwrap().to_array(&ctx).unwrap();
        let y = b.forward(&ctx, false).unwrap().to_array(&ctx).unwrap();
        assert_eq!(x, y, "{}", a.name());
    }
    assert_eq!(bn2.num_updates, 7);
    assert_eq!(
        bn2.running_mean.to_array(&ctx).unwrap().as_slice().unwrap(),
        [1.0, 2.0, 3.0, 4.0]
    );

    // A malformed file: weight_u of the wrong length. Nothing changes.
    let u_before = sn2.hook("spectral_norm").unwrap().state()[0]
        .1
        .to_array(&ctx)
        .unwrap();
    let bad = dir.join("bad.safetensors");
    let mut tensors: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(k, _)| k != "conv1.weight_u")
        .collect();
    let short = vec![0u8; 4 * 5];
    tensors.push((
        "conv1.weight_u".into(),
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![5], &short).unwrap(),
    ));
    safetensors::serialize_to_file(tensors, None, &bad).unwrap();
    let mut bn3 = BatchNormState::new(&ctx, 4).unwrap();
    let err = wgnorm::state::load(
        &ctx,
        &bad,
        &mut [&mut wn2, &mut sn2],
        &mut [("bn1", &mut bn3)],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("conv1.weight_u") && err.contains("[5]"),
        "{err}"
    );
    assert_eq!(
        sn2.hook("spectral_norm").unwrap().state()[0]
            .1
            .to_array(&ctx)
            .unwrap(),
        u_before
    );
    assert_eq!(bn3.num_updates, 0, "batch norm untouched");
    std::fs::write(&bad, b"not a safetensors file").unwrap();
    let err = wgnorm::state::load(&ctx, &bad, &mut [&mut sn2], &mut []).unwrap_err();
    assert!(err.to_string().contains("not a safetensors file"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A weight without data when its hooks are added (Chainer's lazily initialised link):
/// at the first forward each hook initialises from the weight as the hooks before it
/// leave it. WS then SN: SN's `gamma` (Chainer, `use_gamma`) and warmed-up `u`
/// (PyTorch) are those of the standardized weight, not of the raw one.
#[test]
fn lazily_added_hooks_initialise_from_the_earlier_hooks_output() {
    let ctx = ctx();
    let mut rng = Rng::new(21);
    let raw = rng.array(&[12, 5, 3, 3], 0.5, 2.0);
    let ws = WeightStandardization::default();
    let standardized = ws
        .forward(&ctx, &Tensor::from_array(&ctx, &raw).unwrap())
        .unwrap();
    let raw_t = Tensor::from_array(&ctx, &raw).unwrap();
    for config in [
        SpectralNorm {
            use_gamma: true,
            ..SpectralNorm::chainer()
        },
        SpectralNorm::pytorch(),
    ] {
        let mut w = Weight::new("conv", None);
        w.add_hook(&ctx, Box::new(WeightStandardizationHook::default()))
            .unwrap();
        w.add_hook(&ctx, Box::new(SpectralNormHook::new(config, 3)))
            .unwrap();
        w.set_data(Tensor::from_array(&ctx, &raw).unwrap());
        w.forward(&ctx, false).unwrap();
        let state = w.hook("spectral_norm").unwrap().state();
        let of = |t: &Tensor| config.init_state(&ctx, t, 3).unwrap();
        let (want, raw_init) = (of(&standardized), of(&raw_t));
        let get = |k: &str| {
            state
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, t)| t.to_array(&ctx).unwrap())
                .unwrap()
        };
        let (key, want, raw_init) = match &want.gamma {
            Some(g) => ("weight_gamma", g.clone(), raw_init.gamma.unwrap()),
            None => ("weight_u", want.u.clone(), raw_init.u),
        };
        let (want, raw_init) = (
            want.to_array(&ctx).unwrap(),
            raw_init.to_array(&ctx).unwrap(),
        );
        assert_close(key, &get(key), &want, 1e-5, 1e-6);
        let apart = (&want - &raw_init).iter().fold(0f32, |m, d| m.max(d.abs()));
        assert!(
            apart > 1e-3,
            "{key}: the raw weight gives the same ({apart})"
        );
    }
}

/// The timer's summary, total and report in every unit, against what Chainer 7.8.1's
/// `TimerHook` prints for the same call history (tests/chainer/timer_report.py; its
/// `LinkName` column is wgnorm's `HookName`).
#[test]
fn timer_reports_as_chainer_prints_them() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/chainer/timer_report.json");
    let golden: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let mut timer = TimerHook::new();
    for entry in golden["history"].as_array().unwrap() {
        timer.record(wgnorm::hooks::TimerRow {
            weight: "conv".into(),
            hook: entry[0].as_str().unwrap().into(),
            seconds: entry[1].as_f64().unwrap(),
            gpu: false,
        });
    }
    let summary = timer.summary();
    let want = golden["summary"].as_array().unwrap();
    assert_eq!(summary.len(), want.len());
    for ((name, s), w) in summary.iter().zip(want) {
        assert_eq!(name, w[0].as_str().unwrap());
        assert!(
            (s.elapsed_time - w[1].as_f64().unwrap()).abs() < 1e-12,
            "{name}"
        );
        assert_eq!(s.occurrence as u64, w[2].as_u64().unwrap(), "{name}");
    }
    // The weights' whole forwards are the outermost spans.
    assert_eq!(timer.total_time(), 1.5);
    for (unit, text) in golden["reports"].as_object().unwrap() {
        let want = text.as_str().unwrap().replace("LinkName", "HookName");
        assert_eq!(timer.report_text(unit).unwrap(), want, "unit {unit}");
    }
    assert!(timer.report_text("minutes").is_err());
}

/// Counts its global registrations (Chainer calls `added(None)` / `deleted(None)`).
struct Counting {
    added: Arc<Mutex<(u32, u32)>>,
}

impl WeightHook for Counting {
    fn name(&self) -> &str {
        "counting"
    }
    fn added_global(&mut self) -> wgnorm::Result<()> {
        self.added.lock().unwrap().0 += 1;
        Ok(())
    }
    fn deleted_global(&mut self) {
        self.added.lock().unwrap().1 += 1;
    }
}

/// Chainer's `link.add_hook(hook, name)`: two hooks of one kind on one weight under
/// their own names, applied in order and removed by name; Chainer's global
/// registration: `added` and `deleted` called, a second hook of a name refused.
#[test]
fn named_hooks_and_global_registration_as_chainer() {
    let ctx = ctx();
    let mut rng = Rng::new(30);
    let (raw, mut w) = weight(&ctx, &mut rng, "conv", &[8, 3, 3, 3]);
    let sn = SpectralNorm::pytorch();
    w.add_hook_named(&ctx, Box::new(SpectralNormHook::new(sn, 1)), "sn_a")
        .unwrap();
    w.add_hook_named(&ctx, Box::new(SpectralNormHook::new(sn, 2)), "sn_b")
        .unwrap();
    assert_eq!(w.hook_names(), ["sn_a", "sn_b"]);
    let err = w
        .add_hook_named(&ctx, Box::new(SpectralNormHook::new(sn, 3)), "sn_a")
        .unwrap_err();
    assert!(
        err.to_string().contains("already has a hook named `sn_a`"),
        "{err}"
    );
    // Both apply: the output of two spectral normalizations has sigma 1 (the second
    // divides by ~1), against one applied to the raw weight.
    let twice = w.forward(&ctx, false).unwrap().to_array(&ctx).unwrap();
    w.remove_hook(&ctx, "sn_b").unwrap();
    assert_eq!(w.hook_names(), ["sn_a"]);
    let once = w.forward(&ctx, false).unwrap().to_array(&ctx).unwrap();
    assert_ne!(once, raw);
    assert_close("sn twice ~ once", &twice, &once, 2e-2, 1e-3);
    assert!(w.remove_hook(&ctx, "sn_b").is_err());

    let counts = Arc::new(Mutex::new((0, 0)));
    {
        let hook: SharedHook = Arc::new(Mutex::new(Counting {
            added: counts.clone(),
        }));
        let _guard = register_global(hook.clone()).unwrap();
        assert_eq!(*counts.lock().unwrap(), (1, 0));
        let err = register_global(hook.clone()).unwrap_err();
        assert!(err.to_string().contains("already registered"), "{err}");
        // Under another name it may be registered twice.
        let _second = wgnorm::register_global_named(hook, "counting_2").unwrap();
        assert_eq!(*counts.lock().unwrap(), (2, 0));
    }
    assert_eq!(*counts.lock().unwrap(), (2, 2));
}
