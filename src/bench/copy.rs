//! The yardsticks: the copy kernel (in the suite, on every workload) and the driver's
//! buffer copy (measured beside it by [`run`](super::run), not a case of its own).

use super::{Item, OpDef, Workload};
use crate::error::Result;
use crate::gpu::{Recording, Tensor};
use crate::ops::copy::record_copy;

/// The copy kernel: consecutive invocations on consecutive vec4s.
pub(super) const COPY: OpDef = OpDef {
    name: "copy",
    family: "copy",
    doc: "The copy kernel (the bandwidth yardstick).",
    bytes_per_element: 8, // read, write
    workloads: || {
        Workload::weights()
            .into_iter()
            .chain(Workload::activations())
            .collect()
    },
    prepare: |input| {
        Ok(Box::new(Copy {
            x: input.upload(&input.host)?,
            driver: false,
        }))
    },
};

/// `copy_buffer_to_buffer` on the same workload: the second yardstick.
pub(super) const DRIVER_COPY: OpDef = OpDef {
    name: "driver_copy",
    doc: "The driver's buffer copy (the second bandwidth yardstick).",
    prepare: |input| {
        Ok(Box::new(Copy {
            x: input.upload(&input.host)?,
            driver: true,
        }))
    },
    ..COPY
};

/// The family's suite ops (the driver copy is measured beside the kernel, see above).
pub(super) const OPS: &[OpDef] = &[COPY];

struct Copy {
    x: Tensor,
    driver: bool,
}

impl Item for Copy {
    fn record(&mut self, rec: &mut Recording<'_>) -> Result<()> {
        if self.driver {
            let dst = Tensor::output_typed(rec.context(), self.x.shape(), self.x.dtype())?;
            rec.copy_tensor(&self.x, &dst)
        } else {
            record_copy(rec, &self.x).map(drop)
        }
    }

    /// The copy's reference is nothing: there is nothing to check a copy against.
    fn reference(&self) -> Result<()> {
        Ok(())
    }
}
