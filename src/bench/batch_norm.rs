//! Batch Normalization in the benchmark suite: PyTorch's `BatchNorm` defaults with the
//! workload's feature axis, on the activation workloads (NCHW and NHWC).

use ndarray::ArrayD;

use super::{Input, Item, OpDef, Step, Workload};
use crate::error::Result;
use crate::gpu::{Recording, Tensor};
use crate::ops::batch_norm::{BatchNorm, BatchNormForward, BatchNormMode, BatchNormState};
use crate::reference::batch_norm as reference;

const TRAIN: OpDef = OpDef {
    name: "bn_forward_train",
    family: "batch_norm",
    doc: "Batch Normalization training forward (batch statistics, running averages).",
    // The statistics read x, then x is read again and y written: a channel is spread
    // over the whole batch, so no element can be written before its channel is reduced.
    bytes_per_element: 12,
    workloads: Workload::activations,
    prepare: |input| Bn::prepare(input, Step::Train),
};

/// The family's ops, registered in [`FAMILIES`](super::FAMILIES).
pub(super) const OPS: &[OpDef] = &[
    TRAIN,
    OpDef {
        name: "bn_forward_eval",
        doc: "Batch Normalization evaluation forward (running averages).",
        bytes_per_element: 8, // read x, write y
        prepare: |input| Bn::prepare(input, Step::Eval),
        ..TRAIN
    },
    OpDef {
        name: "bn_backward",
        doc: "Batch Normalization training backward (grad x, gamma, beta).",
        // sums of dy and dy * x_hat (read x, dy), then read x, dy and write dx
        bytes_per_element: 20,
        prepare: |input| Bn::prepare(input, Step::Backward),
        ..TRAIN
    },
];

struct Bn {
    step: Step,
    config: BatchNorm,
    x: Tensor,
    grad: Tensor,
    gamma: Tensor,
    beta: Tensor,
    state: BatchNormState,
    fwd: BatchNormForward,
    host: ArrayD<f32>,
    host_grad: ArrayD<f32>,
    host_gamma: Vec<f32>,
    host_beta: Vec<f32>,
}

impl Bn {
    fn prepare(input: &Input<'_>, step: Step) -> Result<Box<dyn Item>> {
        let ctx = input.ctx;
        let config = BatchNorm {
            feature_axis: input.case.workload.feature_axis as isize,
            ..BatchNorm::pytorch()
        };
        let features = input.shape[config.resolved_axis(input.shape.len())?];
        let host_gamma: Vec<f32> = (0..features).map(|c| 1.0 + c as f32 * 0.01).collect();
        let host_beta: Vec<f32> = (0..features).map(|c| c as f32 * -0.02).collect();
        let x = input.upload(&input.host)?;
        let gamma = Tensor::from_slice(ctx, &[features], &host_gamma)?;
        let beta = Tensor::from_slice(ctx, &[features], &host_beta)?;
        let mut state = BatchNormState::new(ctx, features)?;
        let fwd = config.forward(
            ctx,
            &x,
            Some(&gamma),
            Some(&beta),
            Some(&mut state),
            BatchNormMode::Train,
        )?;
        let host_grad = input.gradient();
        Ok(Box::new(Bn {
            step,
            config,
            grad: input.upload(&host_grad)?,
            x,
            gamma,
            beta,
            state,
            fwd,
            host: input.host.clone(),
            host_grad,
            host_gamma,
            host_beta,
        }))
    }
}

impl Item for Bn {
    fn record(&mut self, rec: &mut Recording<'_>) -> Result<()> {
        let mode = match self.step {
            Step::Train => BatchNormMode::Train,
            Step::Eval => BatchNormMode::Eval,
            Step::Backward => {
                return self
                    .config
                    .record_backward(rec, &self.x, &self.grad, &self.fwd)
                    .map(drop)
            }
        };
        self.config
            .record_forward(
                rec,
                &self.x,
                Some(&self.gamma),
                Some(&self.beta),
                Some(&mut self.state),
                mode,
            )
            .map(drop)
    }

    fn reference(&self) -> Result<()> {
        let features = self.host_gamma.len();
        let (mean, var) = (vec![0.0; features], vec![1.0; features]);
        let (x, gamma) = (self.host.view(), Some(self.host_gamma.as_slice()));
        match self.step {
            Step::Backward => reference::backward(
                &self.config,
                x,
                self.host_grad.view(),
                gamma,
                &mean,
                &var,
                BatchNormMode::Train,
            )
            .map(drop),
            step => {
                let mode = if step == Step::Train {
                    BatchNormMode::Train
                } else {
                    BatchNormMode::Eval
                };
                let beta = Some(self.host_beta.as_slice());
                reference::forward(&self.config, x, gamma, beta, &mean, &var, 0, mode).map(drop)
            }
        }
    }
}
