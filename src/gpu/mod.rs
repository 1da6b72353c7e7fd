//! The dispatcher: context (adapter, device, queue, features), tensors, the kernel
//! list with its lazy pipeline cache, and recordings (many dispatches, one submit).

mod context;
mod dtype;
pub(crate) use dtype::{encode_f32, widen_bytes};
pub mod kernels;
mod recording;
mod tensor;

pub(crate) use context::PlanLimits;
pub use context::{AdapterReport, Context, ContextOptions, Tuning};
pub use dtype::{DType, Element};
pub(crate) use kernels::Spec;
pub use kernels::{Binding, Kernel, KernelDef, ShaderSource, SHADERS, WORKGROUP_SIZE};
pub(crate) use recording::Bind;
pub use recording::Recording;
pub use tensor::{Readback, Tensor};
