//! Spectral Normalization in the benchmark suite on the weight workloads: Chainer's
//! defaults (one power iteration per training step) for training and backward,
//! PyTorch's for the evaluation forward (no iteration).

use ndarray::ArrayD;

use super::{Input, Item, OpDef, Step, Workload};
use crate::error::Result;
use crate::gpu::{Recording, Tensor};
use crate::ops::spectral_norm::{SpectralNorm, SpectralNormOutput, SpectralNormState};
use crate::reference::spectral_norm as reference;

const TRAIN: OpDef = OpDef {
    name: "sn_forward_train",
    family: "spectral_norm",
    doc: "Spectral Normalization training forward (Chainer, one power iteration).",
    bytes_per_element: 16, // M^T u, M v, then read W and write the output
    workloads: Workload::weights,
    prepare: |input| Sn::prepare(input, Step::Train),
};

/// The family's ops, registered in [`FAMILIES`](super::FAMILIES).
pub(super) const OPS: &[OpDef] = &[
    TRAIN,
    OpDef {
        name: "sn_forward_eval",
        doc: "Spectral Normalization evaluation forward (PyTorch: no iteration).",
        bytes_per_element: 12, // u^T M v, then read W and write the output
        prepare: |input| Sn::prepare(input, Step::Eval),
        ..TRAIN
    },
    OpDef {
        name: "sn_backward",
        doc: "Spectral Normalization backward.",
        bytes_per_element: 16, // <G, W>, then read G and write grad W
        prepare: |input| Sn::prepare(input, Step::Backward),
        ..TRAIN
    },
];

struct Sn {
    step: Step,
    w: Tensor,
    grad: Tensor,
    state: SpectralNormState,
    fwd: SpectralNormOutput,
    host: ArrayD<f32>,
    host_grad: ArrayD<f32>,
    u: Vec<f32>,
    v: Vec<f32>,
}

impl Sn {
    fn config(&self) -> SpectralNorm {
        if self.step == Step::Eval {
            SpectralNorm::pytorch()
        } else {
            SpectralNorm::chainer()
        }
    }

    fn prepare(input: &Input<'_>, step: Step) -> Result<Box<dyn Item>> {
        let ctx = input.ctx;
        let w = input.upload(&input.host)?;
        // Chainer's initial state (a seeded u, no warm-up) serves both flavors: the
        // timing does not depend on the vectors' values.
        let mut state = SpectralNorm::chainer().init_state(ctx, &w, input.seed)?;
        let fwd = SpectralNorm::chainer().forward(ctx, &w, &mut state, true)?;
        let host_grad = input.gradient();
        let u = fwd.u.to_array(ctx)?.into_raw_vec_and_offset().0;
        let v = fwd.v.to_array(ctx)?.into_raw_vec_and_offset().0;
        Ok(Box::new(Sn {
            step,
            grad: input.upload(&host_grad)?,
            w,
            state,
            fwd,
            host: input.host.clone(),
            host_grad,
            u,
            v,
        }))
    }
}

impl Item for Sn {
    fn record(&mut self, rec: &mut Recording<'_>) -> Result<()> {
        let config = self.config();
        let (w, state) = (&self.w, &mut self.state);
        match self.step {
            Step::Train => config.record_forward(rec, w, state, true).map(drop),
            Step::Eval => config.record_forward(rec, w, state, false).map(drop),
            Step::Backward => config
                .record_backward(rec, w, &self.grad, &self.fwd, state)
                .map(drop),
        }
    }

    fn reference(&self) -> Result<()> {
        let config = self.config();
        let training = self.step != Step::Eval;
        let fwd = reference::forward(&config, self.host.view(), &self.u, &self.v, 1.0, training)?;
        if self.step == Step::Backward {
            reference::backward(&config, self.host.view(), self.host_grad.view(), &fwd, 1.0)?;
        }
        Ok(())
    }
}
