//! Record, then run: ops append dispatches to a [`Recording`]; one encoder and one
//! submission per recording; readback only at the end.

use std::sync::Arc;

use bytemuck::Pod;
use wgpu::util::DeviceExt;

use super::context::Context;
use super::kernels::{Kernel, Pipeline, Spec};
use crate::error::{Error, Result};

/// A window of a buffer bound to one binding: `size` bytes from `offset`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bind<'a> {
    pub buffer: &'a wgpu::Buffer,
    pub offset: u64,
    pub size: u64,
}

/// What can be bound: a buffer (of f32), or a tensor's (op outputs and pooled
/// scratch), whose element type sets the bytes per element.
pub(crate) trait AsBuffer {
    fn as_buffer(&self) -> &wgpu::Buffer;
    fn dtype(&self) -> crate::DType {
        crate::DType::F32
    }
    /// Where the elements start in the buffer, in bytes (a tensor view's offset).
    fn base(&self) -> u64 {
        0
    }
}

impl<T: AsBuffer + ?Sized> AsBuffer for &T {
    fn as_buffer(&self) -> &wgpu::Buffer {
        (**self).as_buffer()
    }
    fn dtype(&self) -> crate::DType {
        (**self).dtype()
    }
    fn base(&self) -> u64 {
        (**self).base()
    }
}

impl AsBuffer for wgpu::Buffer {
    fn as_buffer(&self) -> &wgpu::Buffer {
        self
    }
}

impl AsBuffer for Arc<wgpu::Buffer> {
    fn as_buffer(&self) -> &wgpu::Buffer {
        self
    }
}

impl AsBuffer for crate::Tensor {
    fn as_buffer(&self) -> &wgpu::Buffer {
        self.buffer()
    }
    fn dtype(&self) -> crate::DType {
        crate::Tensor::dtype(self)
    }
    fn base(&self) -> u64 {
        self.offset()
    }
}

impl<'a> Bind<'a> {
    /// The first `len` elements of `buffer` (at least one word is bound).
    pub fn elems(buffer: &'a (impl AsBuffer + ?Sized), len: u64) -> Self {
        Bind {
            buffer: buffer.as_buffer(),
            offset: buffer.base(),
            size: buffer.dtype().bytes(len).max(4),
        }
    }

    /// Elements `[start, start + len)` of `buffer`. Half-precision windows start on an
    /// even element (the plans start them at multiples of `PlanLimits::align_elems`).
    pub fn window(buffer: &'a (impl AsBuffer + ?Sized), start: u64, len: u64) -> Self {
        let dtype = buffer.dtype();
        debug_assert!(start.is_multiple_of(2) || !dtype.is_half());
        Bind {
            buffer: buffer.as_buffer(),
            offset: buffer.base() + start * dtype.size(),
            size: dtype.bytes(len).max(4),
        }
    }
}

enum Command {
    Dispatch {
        pipeline: Arc<Pipeline>,
        label: &'static str,
        /// Bindings 1.. as (buffer, offset, size); binding 0 is `params`.
        binds: Vec<(wgpu::Buffer, u64, u64)>,
        /// The params' bytes in the recording's uniform data: (offset, size).
        params: (u64, u64),
        grid: [u32; 3],
        /// Made at submission, when the recording's one uniform buffer exists.
        bind_group: Option<wgpu::BindGroup>,
    },
    /// A time boundary (see [`Recording::boundary`]).
    Boundary,
    /// The driver's buffer copy (`copy_buffer_to_buffer`), between compute passes.
    Copy {
        src: (wgpu::Buffer, u64),
        dst: (wgpu::Buffer, u64),
        bytes: u64,
    },
}

/// Called after the submission with the time of every boundary, in seconds from the
/// first one.
type TimingCallback<'c> = Box<dyn FnOnce(&[f64]) + 'c>;

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
    /// Every dispatch's params, each at the device's uniform offset alignment: one
    /// uniform buffer per recording instead of one per dispatch.
    uniforms: Vec<u8>,
    boundaries: usize,
    timing: Vec<TimingCallback<'c>>,
    /// Caller's tensors the next data-shaped outputs are written into, in order
    /// ([`Self::write_next_output_to`]).
    destinations: std::collections::VecDeque<crate::Tensor>,
}

impl<'c> Recording<'c> {
    /// An empty recording on `ctx`.
    pub fn new(ctx: &'c Context) -> Self {
        ctx.pool.open();
        Recording {
            ctx,
            commands: Vec::new(),
            uniforms: Vec::new(),
            boundaries: 0,
            timing: Vec::new(),
            destinations: std::collections::VecDeque::new(),
        }
    }

    /// Records a time boundary between the dispatches before and after it and returns
    /// its index. After [`Self::submit`], callbacks given to [`Self::on_times`] get
    /// the time of every boundary: from GPU timestamp queries when the device has
    /// them (`Features::TIMESTAMP_QUERY_INSIDE_ENCODERS`), otherwise from the wall
    /// clock, the work between boundaries then being submitted and waited on in
    /// segments.
    pub fn boundary(&mut self) -> usize {
        self.commands.push(Command::Boundary);
        self.boundaries += 1;
        self.boundaries - 1
    }

    /// Registers `f` to receive the boundary times (seconds from the first boundary)
    /// once the recording has been submitted and has finished.
    pub fn on_times(&mut self, f: impl FnOnce(&[f64]) + 'c) {
        self.timing.push(Box::new(f));
    }

    /// Whether boundaries are timed on the GPU (else with the wall clock).
    pub fn gpu_timed(&self) -> bool {
        self.ctx.device.features().contains(
            wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS,
        )
    }

    /// The context this recording belongs to.
    pub fn context(&self) -> &'c Context {
        self.ctx
    }

    /// How many dispatches have been recorded.
    pub fn dispatches(&self) -> usize {
        self.commands.len()
    }

    /// Makes the next output an op recorded here allocates be `dst` instead of a new
    /// tensor: the op writes into it (a view of your buffer, [`crate::Tensor::from_buffer`],
    /// or any tensor of this context), no copy made. Call it once per output, in the
    /// order the op makes them. The outputs this reaches are the ones shaped like the
    /// op's data: the normalized weight or activation ([`record_forward`] of every op),
    /// the gradient of the weight or input (`record_backward`; with
    /// `record_forward_backward`, the output then the gradient), weight norm's `v` and
    /// gradient of `v`, a copy or a cast; per-channel outputs (`g`, `u`, `v`, sigma, the
    /// gradients of `g`, gamma, beta) are always new tensors.
    ///
    /// A half-precision destination must hold an even number of elements (kernels write
    /// whole 32-bit words). Checked when the op allocates the output: `dst` must have
    /// its shape and type
    /// (an error names both); a destination no op has taken fails [`Self::submit`].
    /// `dst` may be a view of the same buffer as the op's inputs (the dispatch then runs
    /// the kernel's read-write twin, every storage binding `read_write`), but
    /// not over an input's range: that is refused when the op is recorded.
    ///
    /// [`record_forward`]: crate::WeightStandardization::record_forward
    pub fn write_next_output_to(&mut self, dst: &crate::Tensor) -> Result<()> {
        self.ctx
            .check_tensors("write_next_output_to", &[("destination", dst)])?;
        if dst.dtype().is_half() && dst.len() % 2 == 1 {
            // Kernels write whole 32-bit words: the last word's other half, past the
            // destination, would be overwritten.
            return Err(Error::input(
                "write_next_output_to",
                format!(
                    "a destination of {} {} elements (an odd count): half outputs are written a 32-bit word at a time",
                    dst.len(),
                    dst.dtype()
                ),
            ));
        }
        self.destinations.push_back(dst.clone());
        Ok(())
    }

    /// An op's data-shaped output: the next destination the caller gave
    /// ([`Self::write_next_output_to`]), which must have this shape and type, or a new
    /// tensor from the context's pool.
    pub(crate) fn output(
        &mut self,
        op: &'static str,
        shape: &[usize],
        dtype: crate::DType,
    ) -> Result<crate::Tensor> {
        match self.destinations.pop_front() {
            None => crate::Tensor::output_typed(self.ctx, shape, dtype),
            Some(dst) if dst.shape() == shape && dst.dtype() == dtype => Ok(dst),
            Some(dst) => Err(Error::input(
                op,
                format!(
                    "the output is {shape:?} {dtype} but the destination given is {:?} {}",
                    dst.shape(),
                    dst.dtype()
                ),
            )),
        }
    }

    /// Records a copy of `src` into `dst` by the driver (`copy_buffer_to_buffer`): the
    /// second bandwidth yardstick of the benchmarks, beside the copy kernel. Two
    /// views of one buffer (which the driver's copy refuses) are copied by the copy
    /// kernel; overlapping ranges are an error.
    pub fn copy_tensor(&mut self, src: &crate::Tensor, dst: &crate::Tensor) -> Result<()> {
        self.ctx
            .check_tensors("copy_tensor", &[("source", src), ("destination", dst)])?;
        if src.shape() != dst.shape() {
            return Err(Error::input(
                "copy_tensor",
                format!(
                    "source shape {:?} and destination shape {:?} differ",
                    src.shape(),
                    dst.shape()
                ),
            ));
        }
        if src.dtype() != dst.dtype() {
            return Err(Error::input(
                "copy_tensor",
                format!(
                    "source type {} and destination type {} differ",
                    src.dtype(),
                    dst.dtype()
                ),
            ));
        }
        if src.buffer() == dst.buffer() && src.bytes() > 0 {
            if src.offset() == dst.offset() {
                return Ok(()); // the same tensor
            }
            // Two views of one caller's buffer (burn's pooled tensors): the driver's
            // copy refuses a buffer as both source and destination, the copy kernel
            // takes it (and refuses overlapping ranges).
            self.destinations.push_front(dst.clone());
            return crate::ops::copy::record_copy(self, src).map(drop);
        }
        self.copy_buffer(src, dst, src.bytes());
        Ok(())
    }

    /// Records a copy of the first `bytes` of `src` (scratch, for readback) into `dst`,
    /// which must hold them.
    pub(crate) fn copy_buffer(&mut self, src: &crate::Tensor, dst: &crate::Tensor, bytes: u64) {
        debug_assert!(bytes <= dst.bytes().max(16));
        if bytes > 0 {
            self.commands.push(Command::Copy {
                src: (src.buffer().clone(), src.offset()),
                dst: (dst.buffer().clone(), dst.offset()),
                bytes,
            });
        }
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
        self.dispatch_spec(kernel, Spec::default(), params, binds, groups)
    }

    /// [`Self::dispatch`] of `kernel` specialised by `spec` (elementwise kernels).
    pub(crate) fn dispatch_spec<P: Pod>(
        &mut self,
        kernel: Kernel,
        spec: Spec,
        params: &P,
        binds: &[Bind<'_>],
        groups: u64,
    ) -> Result<()> {
        let def = kernel.def();
        debug_assert_eq!(def.bindings.len(), binds.len() + 1, "{}", def.label);
        if groups == 0 {
            return Ok(());
        }
        // Every binding within the context's binding limit (the adapter's, or the cap
        // of `ContextOptions::max_binding_bytes`, which tests lower to force splits):
        // a plan that overreaches is refused here, on every adapter, rather than only
        // by the drivers whose real limit it passes.
        let max_bytes = self.ctx.limits.max_binding_elems * 4;
        if let Some((i, b)) = binds.iter().enumerate().find(|(_, b)| b.size > max_bytes) {
            return Err(Error::TooLarge {
                op: def.label,
                problem: format!(
                    "binding {} covers {} bytes, past the storage binding limit of {max_bytes}",
                    i + 1,
                    b.size
                ),
            });
        }
        // A buffer bound for reading and for writing (views of one caller's buffer):
        // the all-read-write twin of the kernel, which wgpu accepts, unless the ranges
        // overlap (an output over an input: refused).
        let mut spec = spec;
        for (i, a) in binds.iter().enumerate() {
            for (j, b) in binds.iter().enumerate().skip(i + 1) {
                let writes = |k: usize| def.bindings[k + 1] == super::kernels::Binding::ReadWrite;
                if a.buffer != b.buffer || writes(i) == writes(j) {
                    continue;
                }
                if a.offset < b.offset + b.size && b.offset < a.offset + a.size {
                    return Err(Error::input(
                        def.label,
                        format!(
                            "bindings {} and {} overlap in one buffer (bytes {}..{} and {}..{}), one read and one written: an output over an input",
                            i + 1,
                            j + 1,
                            a.offset,
                            a.offset + a.size,
                            b.offset,
                            b.offset + b.size
                        ),
                    ));
                }
                spec.aliased = true;
            }
        }
        let grid = self.ctx.grid(def.label, groups)?;
        let pipeline = self.ctx.pipeline(kernel, spec)?;
        let align = self.ctx.limits.uniform_align as usize;
        let offset = self.uniforms.len().next_multiple_of(align);
        self.uniforms.resize(offset, 0);
        self.uniforms.extend_from_slice(bytemuck::bytes_of(params));
        self.commands.push(Command::Dispatch {
            pipeline,
            label: def.label,
            binds: binds
                .iter()
                .map(|b| (b.buffer.clone(), b.offset, b.size))
                .collect(),
            params: (offset as u64, std::mem::size_of::<P>() as u64),
            grid,
            bind_group: None,
        });
        Ok(())
    }

    /// Encodes everything recorded into one command buffer and submits it. Does not
    /// wait: read results with [`Context::read_all`] or [`Tensor::to_array`](crate::Tensor::to_array).
    /// With time boundaries it waits for the work, and calls the timing callbacks.
    pub fn submit(mut self) -> Result<()> {
        if let Some(dst) = self.destinations.front() {
            return Err(Error::input(
                "submit",
                format!(
                    "{} destination(s) given to write_next_output_to were taken by no op (the first: {:?} {}); nothing was submitted",
                    self.destinations.len(),
                    dst.shape(),
                    dst.dtype()
                ),
            ));
        }
        let device = &self.ctx.device;
        let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
        self.make_bind_groups();
        let times = if self.boundaries == 0 {
            let mut encoder = self.encoder();
            encode(&mut encoder, &self.commands, |_, _| {});
            self.ctx.queue.submit([encoder.finish()]);
            None
        } else if self.gpu_timed() {
            Some(self.submit_gpu_timed()?)
        } else {
            Some(self.submit_wall_timed()?)
        };
        if let Some(e) = pollster::block_on(validation.pop()) {
            return Err(Error::Gpu {
                during: "submit",
                reason: e.to_string(),
            });
        }
        if let Some(times) = times {
            for f in std::mem::take(&mut self.timing) {
                f(&times);
            }
        }
        Ok(())
    }

    /// Submits with a GPU timestamp around every dispatch (each in its own compute
    /// pass), waits, and returns each dispatch's label, grid and seconds, in order:
    /// where a multi-pass op spends its time. A tuning aid (`examples/profile.rs`);
    /// a pass per dispatch adds a fixed cost to each (20-30 us on an H100), so the
    /// times compare dispatches with each other, not with [`Self::submit`]'s. Time
    /// boundaries and their callbacks are ignored. Needs timestamp queries inside
    /// encoders: otherwise an error.
    #[doc(hidden)]
    pub fn submit_profiled(mut self) -> Result<Vec<(&'static str, [u32; 3], f64)>> {
        if !self.gpu_timed() {
            return Err(Error::input(
                "submit_profiled",
                "the device has no timestamp queries inside encoders",
            ));
        }
        let device = &self.ctx.device;
        let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
        self.make_bind_groups();
        let dispatches: Vec<(&'static str, [u32; 3])> = self
            .commands
            .iter()
            .filter_map(|c| match c {
                Command::Dispatch { label, grid, .. } => Some((*label, *grid)),
                _ => None,
            })
            .collect();
        let stamps = Timestamps::new(device, dispatches.len() as u32 + 1);
        let queries = &stamps.queries;
        let mut encoder = self.encoder();
        encoder.write_timestamp(queries, 0);
        let mut slot = 1;
        for command in &self.commands {
            match command {
                Command::Dispatch {
                    pipeline,
                    bind_group: Some(bind_group),
                    grid,
                    ..
                } => {
                    {
                        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                            label: Some("wgnorm.profile"),
                            timestamp_writes: None,
                        });
                        pass.set_pipeline(&pipeline.pipeline);
                        pass.set_bind_group(0, bind_group, &[]);
                        pass.dispatch_workgroups(grid[0], grid[1], grid[2]);
                    }
                    encoder.write_timestamp(queries, slot);
                    slot += 1;
                }
                Command::Copy { src, dst, bytes } => {
                    encoder.copy_buffer_to_buffer(&src.0, src.1, &dst.0, dst.1, *bytes);
                }
                _ => {}
            }
        }
        stamps.resolve(&mut encoder);
        self.ctx.queue.submit([encoder.finish()]);
        if let Some(e) = pollster::block_on(validation.pop()) {
            return Err(Error::Gpu {
                during: "submit_profiled",
                reason: e.to_string(),
            });
        }
        let times = stamps.read(self.ctx)?;
        Ok(dispatches
            .into_iter()
            .zip(times.windows(2))
            .map(|((label, grid), t)| (label, grid, t[1] - t[0]))
            .collect())
    }

    /// Uploads every dispatch's params as one uniform buffer and makes the bind groups
    /// (inside the submission's validation scope, so a bad binding is an error, not a
    /// panic).
    fn make_bind_groups(&mut self) {
        if self.uniforms.is_empty() {
            return;
        }
        let device = &self.ctx.device;
        let uniform = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("wgnorm.params"),
            contents: &self.uniforms,
            usage: wgpu::BufferUsages::UNIFORM,
        });
        for command in &mut self.commands {
            if let Command::Dispatch {
                pipeline,
                label,
                binds,
                params,
                bind_group,
                ..
            } = command
            {
                let mut entries = Vec::with_capacity(binds.len() + 1);
                entries.push(wgpu::BindGroupEntry {
                    binding: 0,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: &uniform,
                        offset: params.0,
                        size: wgpu::BufferSize::new(params.1),
                    }),
                });
                for (i, (buffer, offset, size)) in binds.iter().enumerate() {
                    entries.push(wgpu::BindGroupEntry {
                        binding: i as u32 + 1,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer,
                            offset: *offset,
                            size: wgpu::BufferSize::new(*size),
                        }),
                    });
                }
                *bind_group = Some(device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some(label),
                    layout: &pipeline.layout,
                    entries: &entries,
                }));
            }
        }
    }

    fn encoder(&self) -> wgpu::CommandEncoder {
        self.ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("wgnorm.recording"),
            })
    }

    /// One submission; a timestamp written between compute passes at each boundary.
    fn submit_gpu_timed(&self) -> Result<Vec<f64>> {
        let stamps = Timestamps::new(&self.ctx.device, self.boundaries as u32);
        let mut encoder = self.encoder();
        encode(&mut encoder, &self.commands, |encoder, slot| {
            encoder.write_timestamp(&stamps.queries, slot as u32)
        });
        stamps.resolve(&mut encoder);
        self.ctx.queue.submit([encoder.finish()]);
        stamps.read(self.ctx)
    }

    /// One submission per segment between boundaries, each waited on.
    fn submit_wall_timed(&self) -> Result<Vec<f64>> {
        let mut times = Vec::with_capacity(self.boundaries);
        let mut start = None;
        for segment in self
            .commands
            .split_inclusive(|c| matches!(c, Command::Boundary))
        {
            let mut encoder = self.encoder();
            encode(&mut encoder, segment, |_, _| {});
            self.ctx.queue.submit([encoder.finish()]);
            self.ctx.wait()?;
            if matches!(segment.last(), Some(Command::Boundary)) {
                let now = std::time::Instant::now();
                let t0 = *start.get_or_insert(now);
                times.push(now.duration_since(t0).as_secs_f64());
            }
        }
        Ok(times)
    }
}

impl Drop for Recording<'_> {
    /// Submitted or abandoned: outputs dropped while it was open may be reused once no
    /// recording of the context is open (see `BufferPool`).
    fn drop(&mut self) {
        self.ctx.pool.close();
    }
}

/// `n` timestamp queries with their resolve and readback buffers.
struct Timestamps {
    queries: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    readback: wgpu::Buffer,
    n: u32,
}

impl Timestamps {
    fn new(device: &wgpu::Device, n: u32) -> Self {
        let bytes = u64::from(n) * 8;
        let buffer = |label, usage| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes,
                usage,
                mapped_at_creation: false,
            })
        };
        Timestamps {
            queries: device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("wgnorm.timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: n,
            }),
            resolve: buffer(
                "wgnorm.timestamps.resolve",
                wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            ),
            readback: buffer(
                "wgnorm.timestamps.readback",
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            ),
            n,
        }
    }

    /// Resolves the queries into the readback buffer, at the end of `encoder`.
    fn resolve(&self, encoder: &mut wgpu::CommandEncoder) {
        encoder.resolve_query_set(&self.queries, 0..self.n, &self.resolve, 0);
        encoder.copy_buffer_to_buffer(&self.resolve, 0, &self.readback, 0, u64::from(self.n) * 8);
    }

    /// Once the encoder is submitted: waits for it and returns every query's time, in
    /// seconds from the first.
    fn read(&self, ctx: &Context) -> Result<Vec<f64>> {
        let failed = |reason: String| Error::Gpu {
            during: "reading timestamps",
            reason,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        self.readback
            .slice(..)
            .map_async(wgpu::MapMode::Read, move |r| drop(tx.send(r)));
        ctx.wait()?;
        rx.recv()
            .map_err(|e| failed(e.to_string()))?
            .map_err(|e| failed(e.to_string()))?;
        let view = self
            .readback
            .slice(..)
            .get_mapped_range()
            .map_err(|e| failed(e.to_string()))?;
        let ticks: Vec<u64> = bytemuck::cast_slice::<u8, u64>(&view).to_vec();
        drop(view);
        let period = f64::from(ctx.queue.get_timestamp_period()) * 1e-9;
        Ok(ticks
            .iter()
            .map(|&t| t.wrapping_sub(ticks[0]) as f64 * period)
            .collect())
    }
}

/// Encodes `commands` into compute passes; a buffer copy ends the pass and is encoded
/// between passes, and so is each boundary, which calls `at_boundary(encoder, index)`.
fn encode(
    encoder: &mut wgpu::CommandEncoder,
    commands: &[Command],
    mut at_boundary: impl FnMut(&mut wgpu::CommandEncoder, usize),
) {
    let mut slot = 0;
    let breaks = |c: &Command| matches!(c, Command::Boundary | Command::Copy { .. });
    for segment in commands.split_inclusive(breaks) {
        if segment
            .iter()
            .any(|c| matches!(c, Command::Dispatch { .. }))
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("wgnorm.recording"),
                timestamp_writes: None,
            });
            for command in segment {
                if let Command::Dispatch {
                    pipeline,
                    bind_group: Some(bind_group),
                    grid,
                    ..
                } = command
                {
                    pass.set_pipeline(&pipeline.pipeline);
                    pass.set_bind_group(0, bind_group, &[]);
                    pass.dispatch_workgroups(grid[0], grid[1], grid[2]);
                }
            }
        }
        match segment.last() {
            Some(Command::Boundary) => {
                at_boundary(encoder, slot);
                slot += 1;
            }
            Some(Command::Copy { src, dst, bytes }) => {
                encoder.copy_buffer_to_buffer(&src.0, src.1, &dst.0, dst.1, *bytes);
            }
            _ => {}
        }
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
