//! wgnorm on burn's wgpu device: one `wgpu::Device` shared by burn and wgnorm, wgnorm
//! tensor views of burn's own buffers (wgnorm's kernels read and write burn tensors in
//! place, no copy in either direction), the four normalizations as burn autodiff ops
//! with wgnorm's backward kernels, and as burn modules: spectral, weight norm and weight
//! standardization as reparameterizations of any burn layer's weight
//! ([`with_spectral_norm`], [`with_weight_norm`], [`with_weight_standardization`]) and
//! a [`BatchNorm`] that loads `burn::nn::BatchNorm`'s records. `examples/train.rs`
//! trains a small conv net through it and through burn's own ops.

use burn::backend::wgpu::graphics::AutoGraphicsApi;
use std::sync::{Arc, Mutex};

mod autodiff;
mod modules;
pub use autodiff::{batch_norm, spectral_norm, weight_norm, weight_standardization};
pub use modules::{
    with_spectral_norm, with_weight_norm, with_weight_standardization, BatchNorm, BatchNormConfig,
    Select, SpectralNormReparam, WeightNormReparam, WeightStandardizationReparam,
};

use burn::backend::wgpu::wgpu;
use burn::backend::wgpu::{try_init_setup, AutoCompiler, CubeTensor, RuntimeOptions, WgpuDevice};
use burn::backend::Wgpu;
use burn::tensor::Tensor;
use cubecl_wgpu::WgpuServer;

/// Errors of this crate: wgnorm's, or burn's runtime refusing to hand out a buffer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// wgnorm refused or failed.
    #[error(transparent)]
    Wgnorm(#[from] wgnorm::Error),
    /// burn's runtime could not give the tensor's buffer.
    #[error("burn's runtime: {0}")]
    Burn(String),
}

/// A `Result` of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// burn's wgpu device and a wgnorm context on the same `wgpu::Device` and queue.
pub struct Shared {
    /// The burn device (pass it to burn's tensor constructors).
    pub device: WgpuDevice,
    /// wgnorm's context on that device.
    pub ctx: wgnorm::Context,
}

impl Shared {
    /// Brings up burn's runtime on `device` (burn's `init_setup`, default options) and a
    /// wgnorm context on the same device and queue. The first call for a device must
    /// come before burn first uses it (burn then runs on the device this crate brought
    /// up); later calls reuse that device. A device burn brought up by itself is an
    /// error: its `wgpu::Device` cannot be reached.
    pub fn new(device: WgpuDevice) -> Result<Self> {
        // burn registers a device's runtime once per process: keep what it returned.
        static SETUPS: Mutex<Vec<(WgpuDevice, wgpu::Device, wgpu::Queue)>> = Mutex::new(Vec::new());
        let mut setups = SETUPS.lock().unwrap_or_else(|e| e.into_inner());
        let (gpu, queue) = match setups.iter().find(|(d, _, _)| *d == device) {
            Some((_, gpu, queue)) => (gpu.clone(), queue.clone()),
            None => {
                let setup = try_init_setup::<AutoGraphicsApi>(&device, RuntimeOptions::default())
                    .map_err(|e| {
                        Error::Burn(format!(
                            "bringing up {device:?} ({e:?}); create the Shared before burn first uses the device"
                        ))
                    })?;
                setups.push((device.clone(), setup.device.clone(), setup.queue.clone()));
                (setup.device, setup.queue)
            }
        };
        let ctx = wgnorm::Context::from_device(gpu, queue)?;
        Ok(Shared { device, ctx })
    }

    /// The burn device to make tensors on (`Tensor::zeros(shape, &shared.burn_device())`).
    pub fn burn_device(&self) -> burn::tensor::Device {
        burn::tensor::Device::from(self.device.clone())
    }

    /// A wgnorm view of a contiguous f32 burn tensor's buffer: ops read it (and write
    /// it, as an output) in place. burn's pending work on it is submitted first, so
    /// wgnorm's submissions, on the same queue, come after it.
    pub fn view<const D: usize>(&self, t: &Tensor<D>) -> Result<wgnorm::Tensor> {
        let prim: CubeTensor = t
            .clone()
            .try_into_primitive::<Wgpu>()
            .map_err(|e| Error::Burn(format!("not a wgpu tensor: {e:?}")))?;
        self.view_primitive(&prim, &t.dims())
    }

    /// [`Self::view`] of burn's backend primitive, shaped `shape`. Only a contiguous
    /// f32 tensor of that many elements has one: anything else is an error, never a
    /// view that reads the wrong elements.
    pub fn view_primitive(&self, prim: &CubeTensor, shape: &[usize]) -> Result<wgnorm::Tensor> {
        if prim.dtype != burn::tensor::DType::F32 {
            return Err(Error::Burn(format!(
                "a view needs an f32 tensor, this one is {:?}",
                prim.dtype
            )));
        }
        let elements = prim.meta.shape().num_elements();
        if !prim.is_contiguous() || elements != shape.iter().product::<usize>() {
            return Err(Error::Burn(format!(
                "a view needs a contiguous tensor of {} elements (shape {shape:?}); this one has \
                 {elements}, contiguous: {} (make it contiguous first)",
                shape.iter().product::<usize>(),
                prim.is_contiguous()
            )));
        }
        let resource = prim
            .client
            .get_resource::<WgpuServer<AutoCompiler>>(prim.handle.clone())
            .map_err(|e| Error::Burn(format!("{e:?}")))?;
        let r = resource.resource();
        Ok(wgnorm::Tensor::from_buffer(
            &self.ctx,
            &r.buffer,
            r.offset,
            shape,
            wgnorm::DType::F32,
        )?)
    }

    /// The `Shared` of `device` for this process, brought up on first use (see
    /// [`Self::new`]): what the autodiff ops use in burn's backward pass, where only
    /// the device is at hand.
    pub fn of(device: &WgpuDevice) -> Result<Arc<Shared>> {
        static ALL: Mutex<Vec<Arc<Shared>>> = Mutex::new(Vec::new());
        let mut all = ALL.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = all.iter().find(|s| s.device == *device) {
            return Ok(s.clone());
        }
        let s = Arc::new(Shared::new(device.clone())?);
        all.push(s.clone());
        Ok(s)
    }
}
