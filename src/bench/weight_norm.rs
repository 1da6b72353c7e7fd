//! Weight Normalization in the benchmark suite: PyTorch's `weight_norm(dim=0)`
//! ([`WeightNorm::default`]) on the weight workloads.

use ndarray::ArrayD;

use super::{pseudo_random, Input, Item, OpDef, Workload};
use crate::error::Result;
use crate::gpu::{Recording, Tensor};
use crate::ops::weight_norm::WeightNorm;
use crate::reference::weight_norm as reference;

const FORWARD: OpDef = OpDef {
    name: "wn_forward",
    family: "weight_norm",
    doc: "Weight Normalization forward, `g * v / ||v||`.",
    bytes_per_element: 8, // read v, write W
    workloads: Workload::weights,
    prepare: |input| Wn::prepare(input, false),
};

/// The family's ops, registered in [`FAMILIES`](super::FAMILIES).
pub(super) const OPS: &[OpDef] = &[
    FORWARD,
    OpDef {
        name: "wn_backward",
        doc: "Weight Normalization backward (grad g and grad v).",
        bytes_per_element: 12, // read v and grad, write grad v
        prepare: |input| Wn::prepare(input, true),
        ..FORWARD
    },
];

struct Wn {
    backward: bool,
    g: Tensor,
    v: Tensor,
    grad: Tensor,
    host_g: ArrayD<f32>,
    host_v: ArrayD<f32>,
    host_grad: ArrayD<f32>,
}

impl Wn {
    fn prepare(input: &Input<'_>, backward: bool) -> Result<Box<dyn Item>> {
        let host_g = pseudo_random(&WeightNorm::default().g_shape(input.shape)?, input.seed + 2);
        let host_grad = input.gradient();
        Ok(Box::new(Wn {
            backward,
            // g stays f32 (PyTorch keeps it in the parameter's own type).
            g: Tensor::from_array(input.ctx, &host_g)?,
            v: input.upload(&input.host)?,
            grad: input.upload(&host_grad)?,
            host_g,
            host_v: input.host.clone(),
            host_grad,
        }))
    }
}

impl Item for Wn {
    fn record(&mut self, rec: &mut Recording<'_>) -> Result<()> {
        let wn = WeightNorm::default();
        if self.backward {
            wn.record_backward(rec, &self.g, &self.v, &self.grad)
                .map(drop)
        } else {
            wn.record_forward(rec, &self.g, &self.v).map(drop)
        }
    }

    fn reference(&self) -> Result<()> {
        let wn = WeightNorm::default();
        let (g, v) = (self.host_g.view(), self.host_v.view());
        if self.backward {
            reference::backward(&wn, g, v, self.host_grad.view()).map(drop)
        } else {
            reference::forward(&wn, g, v).map(drop)
        }
    }
}
