//! GPU tensors: a storage buffer, a shape and an element type (f32, f16, bf16),
//! uploaded from and downloaded to ndarray.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use ndarray::{ArrayBase, ArrayD, Data, Dimension, IxDyn};

use super::context::Context;
use super::dtype::{encode_f32, widen_bytes, DType, Element};
use crate::error::{Error, Result};

/// A dense row-major tensor in GPU memory: f32, or f16 / bf16 packed two per 32-bit
/// word (see [`DType`]).
///
/// Cloning is cheap and shares the buffer. A tensor belongs to the [`Context`] that
/// made it; every op and readback refuses a tensor of another context with
/// [`Error::ForeignTensor`].
#[derive(Clone, Debug)]
pub struct Tensor {
    storage: Arc<Storage>,
    /// Where the tensor starts in the buffer, in bytes (0 but for views,
    /// [`Tensor::from_buffer`]).
    offset: u64,
    shape: Vec<usize>,
    dtype: DType,
    context: u64,
}

/// A tensor's buffer; an op's output goes back to its context's [`BufferPool`] when the
/// last tensor sharing it is dropped.
#[derive(Debug)]
struct Storage {
    buffer: wgpu::Buffer,
    pool: Option<Weak<BufferPool>>,
}

impl Drop for Storage {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.as_ref().and_then(Weak::upgrade) {
            pool.put(self.buffer.clone());
        }
    }
}

/// Output buffers of dropped tensors, kept by size for the next op's outputs: creating
/// a buffer of tens of MiB costs milliseconds on a GPU driver (about 5 ms for 64 MiB
/// on an H100), several times the kernel.
///
/// A buffer is reusable once no unsubmitted recording can still use it: dropped while
/// no [`Recording`](crate::Recording) of the context is open, it is free at once (its
/// last use is already submitted, and later submissions run after it); dropped while
/// one is open, it waits until every open recording is submitted or dropped. So a
/// recording never gets a buffer that it, or another open recording, still writes
/// (which would also order independent dispatches with a barrier).
#[derive(Debug, Default)]
pub(crate) struct BufferPool {
    free: Mutex<(HashMap<u64, Vec<wgpu::Buffer>>, u64)>,
    pending: Mutex<Pending>,
}

#[derive(Debug, Default)]
struct Pending {
    buffers: Vec<wgpu::Buffer>,
    /// Recordings of the context not yet submitted or dropped.
    open: usize,
}

/// Bytes the pool keeps at most; buffers past it are released.
const POOL_BYTES: u64 = 1 << 30;

impl BufferPool {
    fn take(&self, size: u64) -> Option<wgpu::Buffer> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let buffer = free.0.get_mut(&size)?.pop()?;
        free.1 -= size;
        Some(buffer)
    }

    fn put(&self, buffer: wgpu::Buffer) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.open == 0 {
            self.release([buffer]);
        } else {
            pending.buffers.push(buffer);
        }
    }

    /// A recording of the context was made.
    pub fn open(&self) {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).open += 1;
    }

    /// A recording was submitted or dropped: when it was the last open one, the
    /// buffers dropped meanwhile become reusable.
    pub fn close(&self) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.open -= 1;
        if pending.open == 0 {
            let buffers = std::mem::take(&mut pending.buffers);
            self.release(buffers);
        }
    }

    /// Into the free lists, up to [`POOL_BYTES`] (the caller holds `pending`).
    fn release(&self, buffers: impl IntoIterator<Item = wgpu::Buffer>) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        for buffer in buffers {
            let size = buffer.size();
            if free.1 + size <= POOL_BYTES {
                free.1 += size;
                free.0.entry(size).or_default().push(buffer);
            }
        }
    }

    /// Bytes held for reuse, now or once the open recordings are submitted.
    pub fn bytes(&self) -> u64 {
        let pending: u64 = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .buffers
            .iter()
            .map(wgpu::Buffer::size)
            .sum();
        self.free.lock().unwrap_or_else(|e| e.into_inner()).1 + pending
    }
}

impl Tensor {
    /// Uploads any ndarray of f32, `half::f16` or `half::bf16` (views, slices and
    /// non-contiguous arrays too; they are laid out row-major on the way). The tensor
    /// has the array's element type.
    pub fn from_array<T, S, D>(ctx: &Context, array: &ArrayBase<S, D>) -> Result<Self>
    where
        T: Element,
        S: Data<Elem = T>,
        D: Dimension,
    {
        let standard = array.as_standard_layout();
        let data = standard
            .as_slice()
            .expect("as_standard_layout returns a contiguous array");
        Self::from_slice(ctx, array.shape(), data)
    }

    /// Uploads f32 values as a tensor of `dtype`, rounded to it (nearest even, as
    /// PyTorch's `.to(dtype)`): f32 data given to a half-precision tensor.
    pub fn from_array_as<S, D>(ctx: &Context, array: &ArrayBase<S, D>, dtype: DType) -> Result<Self>
    where
        S: Data<Elem = f32>,
        D: Dimension,
    {
        let standard = array.as_standard_layout();
        let data = standard
            .as_slice()
            .expect("as_standard_layout returns a contiguous array");
        let len = checked_len("upload", array.shape())?;
        Self::upload_bytes(ctx, array.shape(), len, dtype, &encode_f32(dtype, data))
    }

    /// Uploads `data` (row-major) with the given shape; the element type is `T`'s.
    pub fn from_slice<T: Element>(ctx: &Context, shape: &[usize], data: &[T]) -> Result<Self> {
        let len = checked_len("upload", shape)?;
        if len != data.len() {
            return Err(Error::input(
                "upload",
                format!(
                    "shape {shape:?} holds {len} elements but {} were given",
                    data.len()
                ),
            ));
        }
        Self::upload_bytes(ctx, shape, len, T::DTYPE, bytemuck::cast_slice(data))
    }

    /// A new tensor of `len` elements of `dtype` holding `bytes` (as stored, unpadded).
    fn upload_bytes(
        ctx: &Context,
        shape: &[usize],
        len: usize,
        dtype: DType,
        bytes: &[u8],
    ) -> Result<Self> {
        let buffer = ctx.storage_buffer("upload", dtype.bytes(len as u64), true)?;
        if len > 0 {
            let mut view = buffer
                .slice(..dtype.bytes(len as u64))
                .get_mapped_range_mut()
                .map_err(|e| Error::Gpu {
                    during: "upload",
                    reason: e.to_string(),
                })?;
            if bytes.len() == view.len() {
                view.copy_from_slice(bytes);
            } else {
                // An odd-length half tensor: its last word's upper half is padding.
                let mut padded = bytes.to_vec();
                padded.resize(view.len(), 0);
                view.copy_from_slice(&padded);
            }
        }
        buffer.unmap();
        Ok(Tensor::wrap(ctx, buffer, shape, dtype, None))
    }

    fn wrap(
        ctx: &Context,
        buffer: wgpu::Buffer,
        shape: &[usize],
        dtype: DType,
        pool: Option<Weak<BufferPool>>,
    ) -> Self {
        Tensor {
            storage: Arc::new(Storage { buffer, pool }),
            offset: 0,
            shape: shape.to_vec(),
            dtype,
            context: ctx.id(),
        }
    }

    /// A view of the caller's buffer: `shape` elements of `dtype`, row-major, from byte
    /// `offset`, read and written in place by the ops (no copy in either direction):
    /// for sharing memory with other GPU code on the same device (a burn tensor's
    /// storage, a buffer of your own; [`Context::from_device`] shares the device).
    ///
    /// Checked: the buffer has `STORAGE` usage (`COPY_SRC` too, for readback), the
    /// offset is a multiple of the device's storage offset alignment
    /// (`min_storage_buffer_offset_alignment`, 256 bytes on most devices), and the
    /// elements fit in the buffer. The buffer must belong to `ctx`'s device; one of
    /// another device is an [`Error::Gpu`] when an op binds it. Ops write only their
    /// outputs and state (running statistics, `u`), never their inputs.
    pub fn from_buffer(
        ctx: &Context,
        buffer: &wgpu::Buffer,
        offset: u64,
        shape: &[usize],
        dtype: DType,
    ) -> Result<Self> {
        const OP: &str = "tensor view";
        let len = checked_len(OP, shape)?;
        let bytes = dtype.bytes(len as u64);
        if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
            return Err(Error::input(
                OP,
                format!("the buffer's usage {:?} lacks STORAGE", buffer.usage()),
            ));
        }
        let align = ctx.limits.storage_align;
        if !offset.is_multiple_of(align) {
            return Err(Error::input(
                OP,
                format!("offset {offset} is not a multiple of the device's storage alignment ({align} bytes)"),
            ));
        }
        if offset
            .checked_add(bytes)
            .is_none_or(|end| end > buffer.size())
        {
            return Err(Error::input(
                OP,
                format!(
                    "{len} {dtype} elements ({bytes} bytes) from offset {offset} pass the buffer's end ({} bytes)",
                    buffer.size()
                ),
            ));
        }
        Ok(Tensor {
            storage: Arc::new(Storage {
                buffer: buffer.clone(),
                pool: None,
            }),
            offset,
            shape: shape.to_vec(),
            dtype,
            context: ctx.id(),
        })
    }

    /// Where the tensor starts in [`Self::buffer`], in bytes: 0, but for views.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes the elements take in the buffer (half types rounded up to whole words).
    pub fn bytes(&self) -> u64 {
        self.dtype.bytes(self.len() as u64)
    }

    /// The [`Context::id`] of the context that made this tensor.
    pub fn context_id(&self) -> u64 {
        self.context
    }

    /// An f32 op output: a buffer from the context's pool when one of the size is
    /// free, else a new one. Its contents are unspecified: the op writes every element.
    pub(crate) fn output(ctx: &Context, shape: &[usize]) -> Result<Self> {
        Self::output_typed(ctx, shape, DType::F32)
    }

    /// [`Self::output`] of element type `dtype`.
    pub(crate) fn output_typed(ctx: &Context, shape: &[usize], dtype: DType) -> Result<Self> {
        let len = checked_len("output", shape)?;
        let mut t = ctx.scratch_bytes("output", dtype.bytes(len as u64))?;
        t.shape = shape.to_vec();
        t.dtype = dtype;
        Ok(t)
    }

    /// An f32 tensor of zeros.
    pub fn zeros(ctx: &Context, shape: &[usize]) -> Result<Self> {
        Self::zeros_typed(ctx, shape, DType::F32)
    }

    /// A tensor of zeros of element type `dtype`.
    pub fn zeros_typed(ctx: &Context, shape: &[usize], dtype: DType) -> Result<Self> {
        let len = checked_len("zeros", shape)?;
        let buffer = ctx.storage_buffer("zeros", dtype.bytes(len as u64), false)?;
        Ok(Tensor::wrap(ctx, buffer, shape, dtype, None))
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The underlying buffer (row-major, laid out as [`DType`] says, from
    /// [`Self::offset`]; at least 16 bytes even when empty).
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.storage.buffer
    }

    /// Downloads the tensor as f32 (half types widened, exactly). Waits for all work
    /// submitted so far.
    pub fn to_array(&self, ctx: &Context) -> Result<ArrayD<f32>> {
        Ok(ctx.read_all(&[self])?.remove(0))
    }

    /// Downloads the tensor as `T`, which must be its element type (`half::bf16` for a
    /// bf16 tensor): the stored values (bit for bit, but for NaN payloads, which go
    /// through f32).
    pub fn to_array_of<T: Element>(&self, ctx: &Context) -> Result<ArrayD<T>> {
        if T::DTYPE != self.dtype {
            return Err(Error::input(
                "readback",
                format!(
                    "the tensor holds {} but {} was asked for",
                    self.dtype,
                    T::DTYPE
                ),
            ));
        }
        // The f32 readback widened exactly; rounding back gives the stored values.
        Ok(self.to_array(ctx)?.mapv(T::from_f32))
    }

    /// [`Self::to_array`] as a future (see [`Context::read_all_async`]).
    pub async fn to_array_async(&self, ctx: &Context) -> Result<ArrayD<f32>> {
        Ok(ctx.read_all_async(&[self])?.await?.remove(0))
    }
}

/// The element count of `shape`, refusing overflow.
pub(crate) fn checked_len(op: &'static str, shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|n| n.checked_mul(4).is_some_and(|b| b <= isize::MAX as usize))
        .ok_or_else(|| Error::TooLarge {
            op,
            problem: format!("shape {shape:?} overflows the address space"),
        })
}

impl Context {
    /// Scratch of `len` f32 elements (partials, per-channel values), from the same
    /// pool as op outputs: contents unspecified, every kernel writes what it later
    /// reads. Held as a tensor, so that its buffer goes back to the pool only when the
    /// holder drops it and no recording that may use it is open.
    pub(crate) fn scratch(&self, op: &'static str, len: u64) -> Result<Tensor> {
        let len = len.max(1);
        let mut t = self.scratch_bytes(op, len * 4)?;
        t.shape = vec![len as usize];
        Ok(t)
    }

    /// Pooled scratch of `bytes` bytes, as an f32 tensor of `bytes / 4` elements.
    fn scratch_bytes(&self, op: &'static str, bytes: u64) -> Result<Tensor> {
        let bytes = bytes.max(4);
        let buffer = match self.pool.take(bytes.max(16)) {
            Some(b) => b,
            None => self.storage_buffer(op, bytes, false)?,
        };
        Ok(Tensor::wrap(
            self,
            buffer,
            &[(bytes / 4) as usize],
            DType::F32,
            Some(Arc::downgrade(&self.pool)),
        ))
    }

    /// A zeroed (or mapped, for upload) storage buffer of `bytes` bytes.
    pub(crate) fn storage_buffer(
        &self,
        op: &'static str,
        bytes: u64,
        mapped: bool,
    ) -> Result<wgpu::Buffer> {
        if bytes > self.limits.max_buffer_bytes {
            return Err(Error::TooLarge {
                op,
                problem: format!(
                    "{bytes} bytes exceed the device's largest buffer ({} bytes)",
                    self.limits.max_buffer_bytes
                ),
            });
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("wgnorm.tensor"),
            // Never zero-sized: empty tensors still get a bindable buffer.
            size: bytes.max(16),
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: mapped,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Gpu {
                during: op,
                reason: e.to_string(),
            });
        }
        Ok(buffer)
    }

    /// Downloads several tensors with one submission and one wait (a thin wrapper over
    /// [`Self::read_all_async`] that waits on this thread, so the future is ready when
    /// first polled and no helper thread is started).
    pub fn read_all(&self, tensors: &[&Tensor]) -> Result<Vec<ArrayD<f32>>> {
        let readback = self.read_all_async(tensors)?;
        self.wait()?;
        pollster::block_on(readback)
    }

    /// Downloads several tensors with one submission, asynchronously: the copies are
    /// submitted now, and the returned future resolves once the data is mapped, without
    /// blocking the thread that polls it (a helper thread waits on the device and wakes
    /// the task), so callers inside an async runtime can `.await` it. Checks (a tensor of
    /// another context) fail here, before anything is submitted.
    pub fn read_all_async(&self, tensors: &[&Tensor]) -> Result<Readback> {
        let named: Vec<(String, &Tensor)> = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("tensor {i}"), *t))
            .collect();
        let named: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), *t)).collect();
        self.check_tensors("readback", &named)?;
        self.count_round_trip();
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("wgnorm.readback"),
            });
        let mut staging = Vec::with_capacity(tensors.len());
        for t in tensors {
            let bytes = t.bytes();
            if bytes == 0 {
                staging.push(None);
                continue;
            }
            let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("wgnorm.readback"),
                size: bytes,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            encoder.copy_buffer_to_buffer(t.buffer(), t.offset(), &buf, 0, bytes);
            staging.push(Some(buf));
        }
        self.queue.submit([encoder.finish()]);
        let pending = staging.iter().flatten().count();
        let state = Arc::new(Mutex::new(MapState {
            pending,
            errors: Vec::new(),
            waker: None,
        }));
        for buf in staging.iter().flatten() {
            let state = state.clone();
            buf.slice(..).map_async(wgpu::MapMode::Read, move |r| {
                let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                st.pending -= 1;
                if let Err(e) = r {
                    st.errors.push(e.to_string());
                }
                if st.pending == 0 {
                    if let Some(w) = st.waker.take() {
                        w.wake();
                    }
                }
            });
        }
        Ok(Readback {
            device: self.device.clone(),
            shapes: tensors
                .iter()
                .map(|t| (t.shape().to_vec(), t.dtype()))
                .collect(),
            staging,
            state,
            waiter: None,
        })
    }
}

/// What the map callbacks of a [`Readback`] share with it.
struct MapState {
    pending: usize,
    errors: Vec<String>,
    waker: Option<std::task::Waker>,
}

/// The future of [`Context::read_all_async`]: the tensors' values, in order, once the
/// GPU has copied and mapped them.
pub struct Readback {
    device: wgpu::Device,
    shapes: Vec<(Vec<usize>, DType)>,
    staging: Vec<Option<wgpu::Buffer>>,
    state: Arc<Mutex<MapState>>,
    /// The helper thread waiting on the device, once the future was polled pending.
    waiter: Option<std::thread::JoinHandle<std::result::Result<(), String>>>,
}

impl std::future::Future for Readback {
    type Output = Result<Vec<ArrayD<f32>>>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        // A poll that does not wait: the copies may be done already.
        let _ = self.device.poll(wgpu::PollType::Poll);
        {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.pending > 0 {
                st.waker = Some(cx.waker().clone());
                drop(st);
                if self.waiter.is_none() {
                    let device = self.device.clone();
                    self.waiter = Some(std::thread::spawn(move || {
                        device
                            .poll(wgpu::PollType::wait_indefinitely())
                            .map(|_| ())
                            .map_err(|e| e.to_string())
                    }));
                }
                return std::task::Poll::Pending;
            }
        }
        if let Some(waiter) = self.waiter.take() {
            match waiter.join() {
                Ok(Ok(())) => {}
                Ok(Err(reason)) => {
                    return std::task::Poll::Ready(Err(Error::Gpu {
                        during: "readback",
                        reason,
                    }))
                }
                Err(_) => {
                    return std::task::Poll::Ready(Err(Error::Gpu {
                        during: "readback",
                        reason: "the thread waiting on the device panicked".into(),
                    }))
                }
            }
        }
        let errors =
            std::mem::take(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()).errors);
        if let Some(reason) = errors.into_iter().next() {
            return std::task::Poll::Ready(Err(Error::Gpu {
                during: "readback",
                reason,
            }));
        }
        let mut out = Vec::with_capacity(self.shapes.len());
        for ((shape, dtype), buf) in self.shapes.iter().zip(&self.staging) {
            let data = match buf {
                None => Vec::new(),
                Some(buf) => {
                    let view = match buf.slice(..).get_mapped_range() {
                        Ok(v) => v,
                        Err(e) => {
                            return std::task::Poll::Ready(Err(Error::Gpu {
                                during: "readback",
                                reason: e.to_string(),
                            }))
                        }
                    };
                    let v = widen_bytes(*dtype, &view, shape.iter().product());
                    drop(view);
                    buf.unmap();
                    v
                }
            };
            out.push(
                ArrayD::from_shape_vec(IxDyn(shape), data)
                    .expect("readback length matches the shape"),
            );
        }
        std::task::Poll::Ready(Ok(out))
    }
}
