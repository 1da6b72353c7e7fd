//! Weight Standardization in the benchmark suite: Chainer's defaults
//! ([`WeightStandardization::default`]) on the weight workloads.

use ndarray::ArrayD;

use super::{Input, Item, OpDef, Workload};
use crate::error::Result;
use crate::gpu::{Recording, Tensor};
use crate::ops::weight_standardization::WeightStandardization;
use crate::reference::weight_standardization as reference;

const FORWARD: OpDef = OpDef {
    name: "ws_forward",
    family: "weight_standardization",
    doc: "Weight Standardization forward.",
    bytes_per_element: 8, // read W, write the output
    workloads: Workload::weights,
    prepare: |input| Ws::prepare(input, false),
};

/// The family's ops, registered in [`FAMILIES`](super::FAMILIES).
pub(super) const OPS: &[OpDef] = &[
    FORWARD,
    OpDef {
        name: "ws_backward",
        doc: "Weight Standardization backward.",
        bytes_per_element: 12, // read W and grad, write grad
        prepare: |input| Ws::prepare(input, true),
        ..FORWARD
    },
];

struct Ws {
    backward: bool,
    w: Tensor,
    grad: Tensor,
    host: ArrayD<f32>,
    host_grad: ArrayD<f32>,
}

impl Ws {
    fn prepare(input: &Input<'_>, backward: bool) -> Result<Box<dyn Item>> {
        let host_grad = input.gradient();
        Ok(Box::new(Ws {
            backward,
            w: input.upload(&input.host)?,
            grad: input.upload(&host_grad)?,
            host: input.host.clone(),
            host_grad,
        }))
    }
}

impl Item for Ws {
    fn record(&mut self, rec: &mut Recording<'_>) -> Result<()> {
        let ws = WeightStandardization::default();
        if self.backward {
            ws.record_backward(rec, &self.w, &self.grad).map(drop)
        } else {
            ws.record_forward(rec, &self.w).map(drop)
        }
    }

    fn reference(&self) -> Result<()> {
        let ws = WeightStandardization::default();
        if self.backward {
            reference::backward(&ws, self.host.view(), self.host_grad.view()).map(drop)
        } else {
            reference::forward(&ws, self.host.view()).map(drop)
        }
    }
}
