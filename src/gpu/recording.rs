//! Record, then run: ops append dispatches to a [`Recording`]; one encoder and one
//! submission per recording; readback only at the end.

use std::sync::Arc;

use bytemuck::Pod;
use wgpu::util::DeviceExt;

use super::context::Context;
use super::kernels::{Kernel, Pipeline};
use crate::error::{Error, Result};

/// A window of a buffer bound to one binding: `size` bytes from `offset`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bind<'a> {
    pub buffer: &'a wgpu::Buffer,
    pub offset: u64,
    pub size: u64,
}

impl<'a> Bind<'a> {
    /// The first `len` f32 elements of `buffer` (at least one element is bound).
    pub fn elems(buffer: &'a wgpu::Buffer, len: u64) -> Self {
        Bind {
            buffer,
            offset: 0,
            size: (len * 4).max(4),
        }
    }

    /// Elements `[start, start + len)` of `buffer`.
    pub fn window(buffer: &'a wgpu::Buffer, start: u64, len: u64) -> Self {
        Bind {
            buffer,
            offset: start * 4,
            size: (len * 4).max(4),
        }
    }
}

enum Command {
    Dispatch {
        pipeline: Arc<Pipeline>,
        bind_group: wgpu::BindGroup,
        grid: [u32; 3],
    },
}

/// A list of GPU commands from any number of ops, submitted together.
///
/// ```no_run
/// # fn main() -> wgnorm::Result<()> {
/// use wgnorm::{Context, Recording, Tensor, WeightStandardization};
/// let ctx = Context::headless()?;
/// let a = Tensor::from_array(&ctx, &ndarray::Array2::<f32>::ones((64, 27)))?;
/// let b = Tensor::from_array(&ctx, &ndarray::Array2::<f32>::ones((128, 576)))?;
/// let ws = WeightStandardization::default();
/// let mut rec = Recording::new(&ctx);
/// let wa = ws.record_forward(&mut rec, &a)?;
/// let wb = ws.record_forward(&mut rec, &b)?;
/// rec.submit()?; // one submission for both layers
/// let out = ctx.read_all(&[&wa, &wb])?; // one readback at the end
/// # Ok(()) }
/// ```
pub struct Recording<'c> {
    ctx: &'c Context,
    commands: Vec<Command>,
}

impl<'c> Recording<'c> {
    /// An empty recording on `ctx`.
    pub fn new(ctx: &'c Context) -> Self {
        Recording {
            ctx,
            commands: Vec::new(),
        }
    }

    /// The context this recording belongs to.
    pub fn context(&self) -> &'c Context {
        self.ctx
    }

    /// How many dispatches have been recorded.
    pub fn dispatches(&self) -> usize {
        self.commands.len()
    }

    /// Records one dispatch of `kernel` over `groups` workgroups (skipped when zero).
    /// Binding 0 is `params`; `binds` fill bindings 1.. in order.
    pub(crate) fn dispatch<P: Pod>(
        &mut self,
        kernel: Kernel,
        params: &P,
        binds: &[Bind<'_>],
        groups: u64,
    ) -> Result<()> {
        let def = kernel.def();
        debug_assert_eq!(def.bindings.len(), binds.len() + 1, "{}", def.label);
        if groups == 0 {
            return Ok(());
        }
        let grid = self.ctx.grid(def.label, groups)?;
        let pipeline = self.ctx.pipeline(kernel);
        let device = &self.ctx.device;
        let uniform = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(def.label),
            contents: bytemuck::bytes_of(params),
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let mut entries = Vec::with_capacity(binds.len() + 1);
        entries.push(wgpu::BindGroupEntry {
            binding: 0,
            resource: uniform.as_entire_binding(),
        });
        for (i, b) in binds.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: b.buffer,
                    offset: b.offset,
                    size: wgpu::BufferSize::new(b.size),
                }),
            });
        }
        let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(def.label),
            layout: &pipeline.layout,
            entries: &entries,
        });
        self.commands.push(Command::Dispatch {
            pipeline,
            bind_group,
            grid,
        });
        Ok(())
    }

    /// Encodes everything recorded into one command buffer and submits it. Does not
    /// wait: read results with [`Context::read_all`] or [`Tensor::to_array`](crate::Tensor::to_array).
    pub fn submit(self) -> Result<()> {
        let device = &self.ctx.device;
        let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("wgnorm.recording"),
        });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("wgnorm.recording"),
                timestamp_writes: None,
            });
            for command in &self.commands {
                match command {
                    Command::Dispatch {
                        pipeline,
                        bind_group,
                        grid,
                    } => {
                        pass.set_pipeline(&pipeline.pipeline);
                        pass.set_bind_group(0, bind_group, &[]);
                        pass.dispatch_workgroups(grid[0], grid[1], grid[2]);
                    }
                }
            }
        }
        self.ctx.queue.submit([encoder.finish()]);
        if let Some(e) = pollster::block_on(validation.pop()) {
            return Err(Error::Gpu {
                during: "submit",
                reason: e.to_string(),
            });
        }
        Ok(())
    }
}

impl Context {
    /// Workgroup grid for `groups` workgroups: x up to the per-dimension limit, the
    /// rest over y. Shaders compute the linear id as `wid.x + wid.y * nwg.x` and
    /// bounds-check it.
    pub(crate) fn grid(&self, label: &'static str, groups: u64) -> Result<[u32; 3]> {
        let max = u64::from(self.limits.max_groups_per_dim);
        let x = groups.min(max);
        let y = groups.div_ceil(x);
        if y > max {
            return Err(Error::TooLarge {
                op: label,
                problem: format!("{groups} workgroups exceed a {max} x {max} grid"),
            });
        }
        Ok([x as u32, y as u32, 1])
    }

    /// Runs `f` on a fresh recording and submits it.
    pub fn run<T>(&self, f: impl FnOnce(&mut Recording<'_>) -> Result<T>) -> Result<T> {
        let mut rec = Recording::new(self);
        let out = f(&mut rec)?;
        rec.submit()?;
        Ok(out)
    }
}
