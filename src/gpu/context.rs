//! The GPU context: adapter choice, device, queue, what the adapter can do.

use std::fmt;
use std::sync::Arc;

use wgpu::util::DeviceExt;

use super::kernels::KernelCache;
use crate::error::{Error, Result};

/// Options for [`Context::headless_with`] and [`Context::from_device_with`].
#[derive(Clone, Debug, Default)]
pub struct ContextOptions {
    /// Cap on the bytes one storage binding may cover, below the adapter's own
    /// `max_storage_buffer_binding_size`. `None` (the default) uses the adapter's limit.
    ///
    /// Kernels split any tensor larger than this into several bound windows, so a
    /// small cap lets tests exercise that path with small tensors.
    pub max_binding_bytes: Option<u64>,
    /// The kernels' thread layout. `None` (the default) picks it from the adapter
    /// ([`Tuning::for_adapter`]); tests set it to run the GPU layout on a software
    /// adapter and the other way round.
    pub tuning: Option<Tuning>,
}

/// How the kernels lay out their work, chosen per adapter class, never per op.
///
/// GPUs want consecutive invocations on consecutive addresses (coalescing) and many
/// workgroups in flight; software adapters (lavapipe, llvmpipe) run invocations as
/// CPU SIMD lanes, prefer each invocation to walk a run of consecutive addresses, and
/// pay for every extra workgroup. Both layouts compute the same values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// Elementwise passes and the copy: `true` puts consecutive invocations on
    /// consecutive vec4s (each invocation 4 of them, a workgroup apart); `false` gives
    /// each invocation a run of 4 consecutive ones (or, channels last, one group of 4
    /// features over 4 rows).
    pub coalesced: bool,
    /// Elements one workgroup of the per-channel reductions reads at most (a power of
    /// two, at least 256): small on GPUs, for enough workgroups to fill the device;
    /// large on CPUs, where each workgroup costs a tree reduction.
    pub reduce_item_elems: u64,
    /// Units (vec4s, or elements of scalar kernels) each invocation of an elementwise
    /// pass handles, `stride` apart: a power of two, 1 to 16.
    pub per_thread: u32,
    /// Elements one workgroup of a channels-last reduction (NHWC batch norm) reads:
    /// rows of all channels. Larger than `reduce_item_elems` on GPUs, where each
    /// block's partials must be combined channel by channel afterwards.
    pub cl_block_elems: u64,
    /// Row kernels take a thread's units four at a time, their loads issued together
    /// (the `ROW_BATCH` override of `shaders/shared/rows.wgsl`).
    pub row_batch: bool,
    /// Batch-norm evaluation with running statistics in one pass, the per-feature
    /// factors computed by the normalizing threads (no `finalize` dispatch before it).
    pub one_pass_eval: bool,
}

impl Tuning {
    /// `default`, with `WGNORM_LAYOUT=coalesced` or `WGNORM_LAYOUT=runs` forcing the
    /// elementwise layout, `WGNORM_REDUCE_ITEM=<elements>` the reduction items and
    /// `WGNORM_PER_THREAD=<n>` the units per thread of elementwise passes,
    /// `WGNORM_CL_BLOCK=<elements>` the channels-last reduction blocks,
    /// `WGNORM_ROW_BATCH=1|0` the row kernels' batched loads, `WGNORM_ONE_PASS_EVAL=1|0`
    /// batch-norm evaluation in one pass (for
    /// benchmarking one layout on another adapter class, and tuning).
    pub fn from_env(default: Tuning) -> Self {
        let mut t = default;
        match std::env::var("WGNORM_LAYOUT").as_deref() {
            Ok("coalesced") => t.coalesced = true,
            Ok("runs") => t.coalesced = false,
            _ => {}
        }
        if let Some(n) = std::env::var("WGNORM_REDUCE_ITEM")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            t.reduce_item_elems = n;
        }
        if let Some(n) = std::env::var("WGNORM_PER_THREAD")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|n| n.is_power_of_two() && *n <= 16)
        {
            t.per_thread = n;
        }
        if let Some(n) = std::env::var("WGNORM_CL_BLOCK")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            t.cl_block_elems = n;
        }
        match std::env::var("WGNORM_ONE_PASS_EVAL").as_deref() {
            Ok("1") => t.one_pass_eval = true,
            Ok("0") => t.one_pass_eval = false,
            _ => {}
        }
        match std::env::var("WGNORM_ROW_BATCH").as_deref() {
            Ok("1") => t.row_batch = true,
            Ok("0") => t.row_batch = false,
            _ => {}
        }
        t
    }

    /// GPUs, as measured on an H100: coalesced, 4 units per thread (1 to 8 measured
    /// within 2%), 2048-element reduction items (best among 1024 to 16384 for batch
    /// norm), 4096-element channels-last blocks (2048 to 32768 measured: NHWC batch
    /// norm training 67, 57, 60, 72, 98 us, the combine of many small blocks' partials
    /// being the cost below 4096), batched row loads (weight norm on the embedding
    /// 103 -> 91 us, the rest within 2%), batch-norm evaluation in one pass (29.6 ->
    /// 27.1 us NCHW, 31.2 -> 27.4 us NHWC, the copy 26.1 us).
    pub fn gpu() -> Self {
        Tuning {
            coalesced: true,
            reduce_item_elems: 2 * 1024,
            per_thread: 4,
            cl_block_elems: 4 * 1024,
            row_batch: true,
            one_pass_eval: true,
        }
    }

    /// Software adapters: runs, 4 units per thread, 16384-element items and blocks,
    /// row loads one at a time (what lavapipe was tuned with).
    pub fn software() -> Self {
        Tuning {
            coalesced: false,
            reduce_item_elems: 16 * 1024,
            per_thread: 4,
            cl_block_elems: 16 * 1024,
            row_batch: false,
            one_pass_eval: false,
        }
    }

    /// [`Tuning::software`] on software adapters, else [`Tuning::gpu`].
    pub fn for_adapter(report: &AdapterReport) -> Self {
        if report.is_software() {
            Tuning::software()
        } else {
            Tuning::gpu()
        }
    }
}

/// What the context got: reported by [`Context::info`] and printed by the examples.
#[derive(Clone, Debug)]
pub struct AdapterReport {
    /// The adapter's name, e.g. `llvmpipe (LLVM 15.0.6, 256 bits)`.
    pub name: String,
    /// The backend: Vulkan, Gl, Metal, Dx12.
    pub backend: wgpu::Backend,
    /// Discrete, integrated, CPU (software), ...
    pub device_type: wgpu::DeviceType,
    /// The driver's name and version, where reported.
    pub driver: String,
    /// Whether subgroup operations were enabled on the device.
    pub subgroups: bool,
    /// The subgroup sizes the adapter may use (meaningful only with `subgroups`).
    pub subgroup_sizes: (u32, u32),
    /// Whether GPU timestamp queries were enabled on the device.
    pub timestamps: bool,
    /// Largest storage binding in bytes the kernels will use (after [`ContextOptions`]).
    pub max_binding_bytes: u64,
    /// Largest buffer in bytes the device allows, hence the largest tensor.
    pub max_buffer_bytes: u64,
    /// The kernels' thread layout on this adapter.
    pub tuning: Tuning,
}

impl AdapterReport {
    /// Whether this is a software adapter (lavapipe, llvmpipe, WARP, ...).
    pub fn is_software(&self) -> bool {
        self.device_type == wgpu::DeviceType::Cpu
            || self.name.to_lowercase().contains("llvmpipe")
            || self.name.to_lowercase().contains("lavapipe")
    }
}

impl fmt::Display for AdapterReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({:?}, {:?}{}), subgroups: {}, timestamps: {}, max binding {} MiB, layout: {}, reduction items {}",
            self.name,
            self.backend,
            self.device_type,
            if self.driver.is_empty() {
                String::new()
            } else {
                format!(", driver {}", self.driver)
            },
            if self.subgroups {
                format!(
                    "yes ({}..={})",
                    self.subgroup_sizes.0, self.subgroup_sizes.1
                )
            } else {
                "no".to_string()
            },
            if self.timestamps { "yes" } else { "no" },
            self.max_binding_bytes >> 20,
            if self.tuning.coalesced { "coalesced" } else { "runs" },
            self.tuning.reduce_item_elems,
        )
    }
}

/// The sizes kernels plan their dispatches with, read from the device limits.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PlanLimits {
    /// Largest storage binding, in f32 elements.
    pub max_binding_elems: u64,
    /// Storage binding windows start at multiples of this many elements: the device's
    /// offset alignment counted in 2-byte (half-precision) elements, so that windows
    /// of f32 and half tensors alike are aligned, but at least 4, so that every window
    /// starts on a vec4 and the vec4 kernels need no check of their own (some drivers
    /// allow 4-byte offsets).
    pub align_elems: u64,
    /// Largest workgroup count in one grid dimension.
    pub max_groups_per_dim: u32,
    /// Largest buffer, in bytes.
    pub max_buffer_bytes: u64,
    /// The adapter's thread layout.
    pub tuning: Tuning,
    /// Storage bindings start at multiples of this many bytes (the device's
    /// `min_storage_buffer_offset_alignment`): where a tensor view may start.
    pub storage_align: u64,
    /// Offsets of uniform bindings are multiples of this many bytes (at least 16).
    pub uniform_align: u64,
}

#[cfg(test)]
impl PlanLimits {
    /// Limits for planning tests: bindings of `binding` elements aligned to `align`,
    /// the software adapters' tuning unless `coalesced`.
    pub(crate) fn for_tests(binding: u64, align: u64, coalesced: bool) -> Self {
        PlanLimits {
            max_binding_elems: binding,
            align_elems: align,
            max_groups_per_dim: 65535,
            max_buffer_bytes: u64::MAX,
            storage_align: 256,
            tuning: if coalesced {
                Tuning::gpu()
            } else {
                Tuning::software()
            },
            uniform_align: 256,
        }
    }
}

/// A GPU context: adapter, device, queue, and the cache of compiled kernels.
///
/// Cheap to share: wrap it in an `Arc` (or borrow it) from several threads; every
/// op takes `&Context`. Make one with [`Context::headless`] or, when your program
/// already has a device, with [`Context::from_device`].
pub struct Context {
    /// Unique per context in this process: tensors carry it (see [`Context::id`]).
    id: u64,
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    report: AdapterReport,
    pub(crate) limits: PlanLimits,
    pub(crate) kernels: KernelCache,
    /// A small zeroed storage buffer bound where a kernel's optional input is unused.
    pub(crate) dummy: Arc<wgpu::Buffer>,
    /// Output buffers of dropped tensors, for reuse.
    pub(crate) pool: Arc<super::tensor::BufferPool>,
    /// Host round trips so far (see [`Context::host_round_trips`]).
    round_trips: std::sync::atomic::AtomicU64,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("adapter", &self.report)
            .finish_non_exhaustive()
    }
}

/// Features the kernels can use when the adapter has them.
const WANTED_FEATURES: wgpu::Features = wgpu::Features::SUBGROUP
    .union(wgpu::Features::TIMESTAMP_QUERY)
    .union(wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS);

impl Context {
    /// Opens a headless context on the best adapter, with default options.
    ///
    /// Honours `WGPU_BACKEND` (e.g. `vulkan`, `gl`), `WGPU_ADAPTER_NAME` (a substring
    /// of the adapter's name, case-insensitive) and `WGPU_POWER_PREF` (`low`, `high`).
    /// Otherwise it prefers a hardware adapter, then Vulkan software (lavapipe), then
    /// OpenGL (llvmpipe over EGL). With no adapter at all the error lists what was
    /// tried and how to install one.
    pub fn headless() -> Result<Self> {
        Self::headless_with(ContextOptions::default())
    }

    /// [`Context::headless`] with options.
    pub fn headless_with(options: ContextOptions) -> Result<Self> {
        let backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::all());
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
        desc.backends = backends;
        desc.flags = wgpu::InstanceFlags::from_build_config().with_env();
        let instance = wgpu::Instance::new(desc);
        let mut adapters = pollster::block_on(instance.enumerate_adapters(backends));
        let mut tried = vec![format!("backends {backends:?}")];
        if adapters.is_empty() {
            tried.push("no adapter on any of them".into());
            return Err(Error::NoAdapter {
                tried: tried.join("; "),
            });
        }
        let names: Vec<String> = adapters
            .iter()
            .map(|a| {
                let i = a.get_info();
                format!("{} ({:?}, {:?})", i.name, i.backend, i.device_type)
            })
            .collect();
        tried.push(format!("found {}", names.join(", ")));

        if let Ok(wanted) = std::env::var("WGPU_ADAPTER_NAME") {
            let wanted = wanted.to_lowercase();
            adapters.retain(|a| a.get_info().name.to_lowercase().contains(&wanted));
            if adapters.is_empty() {
                tried.push(format!("none matches WGPU_ADAPTER_NAME={wanted:?}"));
                return Err(Error::NoAdapter {
                    tried: tried.join("; "),
                });
            }
        }
        let pref = wgpu::PowerPreference::from_env().unwrap_or(wgpu::PowerPreference::None);
        adapters.sort_by_key(|a| std::cmp::Reverse(adapter_rank(&a.get_info(), pref)));

        let mut failures = Vec::new();
        for adapter in adapters {
            match Self::open(&adapter, &options) {
                Ok(ctx) => return Ok(ctx),
                Err(e) => failures.push(e.to_string()),
            }
        }
        tried.push(format!(
            "every adapter failed to open: {}",
            failures.join("; ")
        ));
        Err(Error::NoAdapter {
            tried: tried.join("; "),
        })
    }

    fn open(adapter: &wgpu::Adapter, options: &ContextOptions) -> Result<Self> {
        let info = adapter.get_info();
        let features = adapter.features() & WANTED_FEATURES;
        let desc = wgpu::DeviceDescriptor {
            label: Some("wgnorm"),
            required_features: features,
            required_limits: adapter.limits(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&desc)).map_err(|e| {
            Error::RequestDevice {
                adapter: info.name.clone(),
                reason: e.to_string(),
            }
        })?;
        Self::from_device_with(device, queue, options.clone())
    }

    /// Wraps a device and queue that the caller already has, with default options.
    ///
    /// The kernels use subgroup operations and timestamp queries only when the
    /// device was created with `Features::SUBGROUP` / `Features::TIMESTAMP_QUERY`.
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue) -> Result<Self> {
        Self::from_device_with(device, queue, ContextOptions::default())
    }

    /// [`Context::from_device`] with options.
    pub fn from_device_with(
        device: wgpu::Device,
        queue: wgpu::Queue,
        options: ContextOptions,
    ) -> Result<Self> {
        let info = device.adapter_info();
        let features = device.features();
        let limits = device.limits();
        let mut max_binding = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size)
            & !3;
        if let Some(cap) = options.max_binding_bytes {
            max_binding = max_binding.min(cap.max(1024) & !3);
        }
        let align = u64::from(limits.min_storage_buffer_offset_alignment).max(4);
        let report = AdapterReport {
            name: info.name.clone(),
            backend: info.backend,
            device_type: info.device_type,
            driver: [info.driver.as_str(), info.driver_info.as_str()]
                .iter()
                .filter(|s| !s.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join(" "),
            subgroups: features.contains(wgpu::Features::SUBGROUP),
            subgroup_sizes: (info.subgroup_min_size, info.subgroup_max_size),
            timestamps: features.contains(wgpu::Features::TIMESTAMP_QUERY),
            max_binding_bytes: max_binding,
            max_buffer_bytes: limits.max_buffer_size,
            // Set below, from the report itself.
            tuning: Tuning::gpu(),
        };
        let mut report = report;
        report.tuning = options
            .tuning
            .unwrap_or_else(|| Tuning::from_env(Tuning::for_adapter(&report)));
        report.tuning.reduce_item_elems = report.tuning.reduce_item_elems.clamp(256, 1 << 20);
        let plan = PlanLimits {
            max_binding_elems: max_binding / 4,
            // In 2-byte elements, so that half-precision windows are aligned too.
            align_elems: (align / 2).max(4),
            max_groups_per_dim: limits.max_compute_workgroups_per_dimension,
            max_buffer_bytes: limits.max_buffer_size,
            storage_align: align,
            tuning: report.tuning,
            uniform_align: u64::from(limits.min_uniform_buffer_offset_alignment).max(16),
        };
        let dummy = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("wgnorm.dummy"),
            contents: &[0u8; 16],
            usage: wgpu::BufferUsages::STORAGE,
        });
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Ok(Context {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            device,
            queue,
            report,
            limits: plan,
            kernels: KernelCache::default(),
            dummy: Arc::new(dummy),
            pool: Arc::default(),
            round_trips: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// This context's number, unique in the process; every [`Tensor`](crate::Tensor)
    /// remembers the context that made it ([`Tensor::context_id`](crate::Tensor::context_id)).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Refuses tensors made on another context, naming the op and the input.
    pub(crate) fn check_tensors(
        &self,
        op: &'static str,
        tensors: &[(&str, &crate::Tensor)],
    ) -> Result<()> {
        for (name, t) in tensors {
            if t.context_id() != self.id {
                return Err(Error::ForeignTensor {
                    op,
                    tensor: (*name).to_string(),
                    tensor_context: t.context_id(),
                    context: self.id,
                });
            }
        }
        Ok(())
    }

    /// What adapter and capabilities this context has.
    pub fn info(&self) -> &AdapterReport {
        &self.report
    }

    /// The wgpu device, for interoperation with the caller's own GPU code.
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The wgpu queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// Bytes of dropped outputs and op scratch this context keeps for reuse (at most
    /// 1 GiB): new outputs and scratch of the same size take them instead of
    /// allocating. Buffers dropped while a [`Recording`](crate::Recording) is open count only once every
    /// open recording is submitted or dropped.
    pub fn pooled_bytes(&self) -> u64 {
        self.pool.bytes()
    }

    /// How many host round trips this context has made: each readback
    /// ([`Self::read_all_async`], which [`Self::read_all`] and `Tensor::to_array` use)
    /// and each wait for the GPU ([`Self::wait`], which blocking readbacks, timed
    /// submissions and the blocking op methods call) counts one. Recording ops and
    /// [`Recording::submit`](crate::Recording::submit) without time boundaries add
    /// nothing: a training step that records and submits leaves it unchanged, which is
    /// how tests check that no round trip hides in one.
    pub fn host_round_trips(&self) -> u64 {
        self.round_trips.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn count_round_trip(&self) {
        self.round_trips
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Blocks until all submitted work has finished.
    pub fn wait(&self) -> Result<()> {
        self.count_round_trip();
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| Error::Gpu {
                during: "wait",
                reason: e.to_string(),
            })
    }
}

/// Higher is better: hardware first (honouring the power preference), then
/// software Vulkan, then software GL.
fn adapter_rank(info: &wgpu::AdapterInfo, pref: wgpu::PowerPreference) -> u32 {
    use wgpu::DeviceType as T;
    let hardware = match (info.device_type, pref) {
        (T::DiscreteGpu, wgpu::PowerPreference::LowPower) => 3,
        (T::DiscreteGpu, _) => 4,
        (T::IntegratedGpu, wgpu::PowerPreference::LowPower) => 4,
        (T::IntegratedGpu, _) => 3,
        (T::VirtualGpu, _) => 2,
        (T::Other, _) => 1,
        (T::Cpu, _) => 0,
    };
    let software_name = {
        let n = info.name.to_lowercase();
        n.contains("llvmpipe") || n.contains("lavapipe") || n.contains("swiftshader")
    };
    let hardware = if software_name { 0 } else { hardware };
    let backend = match info.backend {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 1,
        _ => 0,
    };
    hardware * 10 + backend
}
