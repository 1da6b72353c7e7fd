//! The one list of shaders and kernels, and the lazy pipeline cache.
//!
//! Every kernel declares its bindings once, as an ordered list of kinds (binding `i`
//! of group 0 is `bindings[i]`); the bind group layout is built from that list, and
//! `tests/shaders.rs` checks the list against each shader with naga, with no GPU.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use super::context::Context;
use super::dtype::DType;
use crate::error::{Error, Result};

/// One composed shader module (build.rs): an op's WGSL file with its shared imports
/// inlined, with no defines or as one of the variants `shaders/permutations` lists.
#[derive(Debug)]
pub struct ShaderSource {
    /// `<op>` or `<op>.<variant>`, also the label prefix (`wgnorm.<name>`).
    pub name: &'static str,
    /// The defines it was composed with (`VEC4`, `CHANNELS_LAST`).
    pub defines: &'static [&'static str],
    /// The composed WGSL text, validated by naga at build time.
    pub source: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/shaders.rs"));

/// The kind of one binding, in the order the shader numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binding {
    /// `var<uniform>`: the kernel's params struct.
    Uniform,
    /// `var<storage, read>`.
    Read,
    /// `var<storage, read_write>`.
    ReadWrite,
}

/// A kernel: one entry point of one shader, with its bindings and override constants.
#[derive(Debug)]
pub struct KernelDef {
    /// The label, `wgnorm.<shader>.<entry>` (plus a suffix for override variants).
    pub label: &'static str,
    /// Index into [`SHADERS`].
    pub shader: usize,
    /// The entry point's name.
    pub entry: &'static str,
    /// The bindings of group 0, in binding order.
    pub bindings: &'static [Binding],
    /// Pipeline-overridable constants this variant sets.
    pub constants: &'static [(&'static str, f64)],
}

macro_rules! kernels {
    ($($variant:ident => ($shader:expr, $label:expr, $entry:expr, [$($b:ident),*], [$($c:expr),*]);)*) => {
        /// Every kernel of the crate.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Kernel { $(#[doc = $label] $variant),* }

        impl Kernel {
            /// All kernels, in declaration order.
            pub const ALL: &'static [Kernel] = &[$(Kernel::$variant),*];

            /// The kernel's definition.
            pub fn def(self) -> &'static KernelDef {
                match self {
                    $(Kernel::$variant => {
                        const DEF: KernelDef = KernelDef {
                            label: $label,
                            shader: $shader,
                            entry: $entry,
                            bindings: &[$(Binding::$b),*],
                            constants: &[$($c),*],
                        };
                        &DEF
                    })*
                }
            }
        }
    };
}

kernels! {
    WelfordPartials => (CHANNEL_STATS, "wgnorm.channel_stats.welford_partials", "welford_partials",
        [Uniform, Read, ReadWrite], []);
    WelfordCombine => (CHANNEL_STATS, "wgnorm.channel_stats.welford_combine", "welford_combine",
        [Uniform, Read, ReadWrite], []);
    SumPartials => (CHANNEL_STATS, "wgnorm.channel_stats.sum_partials", "sum_partials",
        [Uniform, Read, Read, Read, ReadWrite], [("CENTERED", 0.0)]);
    SumPartialsCentered => (CHANNEL_STATS, "wgnorm.channel_stats.sum_partials.centered", "sum_partials",
        [Uniform, Read, Read, Read, ReadWrite], [("CENTERED", 1.0)]);
    DotPartials => (CHANNEL_STATS, "wgnorm.channel_stats.dot_partials", "dot_partials",
        [Uniform, Read, Read, ReadWrite], []);
    WelfordPartialsVec4 => (CHANNEL_STATS_VEC4, "wgnorm.channel_stats.vec4.welford_partials", "welford_partials",
        [Uniform, Read, ReadWrite], []);
    SumPartialsVec4 => (CHANNEL_STATS_VEC4, "wgnorm.channel_stats.vec4.sum_partials", "sum_partials",
        [Uniform, Read, Read, Read, ReadWrite], [("CENTERED", 0.0)]);
    SumPartialsCenteredVec4 => (CHANNEL_STATS_VEC4, "wgnorm.channel_stats.vec4.sum_partials.centered", "sum_partials",
        [Uniform, Read, Read, Read, ReadWrite], [("CENTERED", 1.0)]);
    DotPartialsVec4 => (CHANNEL_STATS_VEC4, "wgnorm.channel_stats.vec4.dot_partials", "dot_partials",
        [Uniform, Read, Read, ReadWrite], []);
    WelfordPartialsCl => (CHANNEL_STATS, "wgnorm.channel_stats.welford_partials_cl", "welford_partials_cl",
        [Uniform, Read, ReadWrite], []);
    SumPartialsCl => (CHANNEL_STATS, "wgnorm.channel_stats.sum_partials_cl", "sum_partials_cl",
        [Uniform, Read, Read, Read, ReadWrite], [("CENTERED", 0.0)]);
    SumPartialsCenteredCl => (CHANNEL_STATS, "wgnorm.channel_stats.sum_partials_cl.centered", "sum_partials_cl",
        [Uniform, Read, Read, Read, ReadWrite], [("CENTERED", 1.0)]);
    SumCombine => (CHANNEL_STATS, "wgnorm.channel_stats.sum_combine", "sum_combine",
        [Uniform, Read, ReadWrite], []);
    WsFinalize => (WEIGHT_STANDARDIZATION, "wgnorm.weight_standardization.finalize", "finalize",
        [Uniform, Read, ReadWrite], []);
    WsNormalize => (WEIGHT_STANDARDIZATION, "wgnorm.weight_standardization.normalize", "normalize",
        [Uniform, Read, Read, ReadWrite], []);
    WsNormalizeVec4 => (WEIGHT_STANDARDIZATION_VEC4, "wgnorm.weight_standardization.vec4.normalize", "normalize",
        [Uniform, Read, Read, ReadWrite], []);
    WsGrad => (WEIGHT_STANDARDIZATION, "wgnorm.weight_standardization.grad", "grad",
        [Uniform, Read, Read, Read, Read, ReadWrite], []);
    WsGradVec4 => (WEIGHT_STANDARDIZATION_VEC4, "wgnorm.weight_standardization.vec4.grad", "grad",
        [Uniform, Read, Read, Read, Read, ReadWrite], []);
    WsRowsForward => (WEIGHT_STANDARDIZATION, "wgnorm.weight_standardization.rows_forward", "rows_forward",
        [Uniform, Read, ReadWrite], []);
    WsRowsGrad => (WEIGHT_STANDARDIZATION, "wgnorm.weight_standardization.rows_grad", "rows_grad",
        [Uniform, Read, Read, ReadWrite], []);
    WsRowsForwardVec4 => (WEIGHT_STANDARDIZATION_VEC4, "wgnorm.weight_standardization.vec4.rows_forward", "rows_forward",
        [Uniform, Read, ReadWrite], []);
    WsRowsGradVec4 => (WEIGHT_STANDARDIZATION_VEC4, "wgnorm.weight_standardization.vec4.rows_grad", "rows_grad",
        [Uniform, Read, Read, ReadWrite], []);
    WnRowsForward => (WEIGHT_NORM, "wgnorm.weight_norm.rows_forward", "rows_forward",
        [Uniform, Read, Read, ReadWrite], []);
    WnRowsForwardVec4 => (WEIGHT_NORM_VEC4, "wgnorm.weight_norm.vec4.rows_forward", "rows_forward",
        [Uniform, Read, Read, ReadWrite], []);
    WnRowsGrad => (WEIGHT_NORM, "wgnorm.weight_norm.rows_grad", "rows_grad",
        [Uniform, Read, Read, Read, ReadWrite, ReadWrite], []);
    WnRowsGradVec4 => (WEIGHT_NORM_VEC4, "wgnorm.weight_norm.vec4.rows_grad", "rows_grad",
        [Uniform, Read, Read, Read, ReadWrite, ReadWrite], []);
    WnNorms => (WEIGHT_NORM, "wgnorm.weight_norm.norms", "norms",
        [Uniform, Read, ReadWrite], []);
    WnFactors => (WEIGHT_NORM, "wgnorm.weight_norm.factors", "factors",
        [Uniform, Read, Read, ReadWrite], []);
    WnApply => (WEIGHT_NORM, "wgnorm.weight_norm.apply", "apply",
        [Uniform, Read, Read, ReadWrite], []);
    WnApplyVec4 => (WEIGHT_NORM_VEC4, "wgnorm.weight_norm.vec4.apply", "apply",
        [Uniform, Read, Read, ReadWrite], []);
    WnGradFactors => (WEIGHT_NORM, "wgnorm.weight_norm.grad_factors", "grad_factors",
        [Uniform, Read, Read, ReadWrite, ReadWrite], []);
    WnGradV => (WEIGHT_NORM, "wgnorm.weight_norm.grad_v", "grad_v",
        [Uniform, Read, Read, Read, ReadWrite], []);
    WnGradVVec4 => (WEIGHT_NORM_VEC4, "wgnorm.weight_norm.vec4.grad_v", "grad_v",
        [Uniform, Read, Read, Read, ReadWrite], []);
    SnMtvPartials => (SPECTRAL_NORM, "wgnorm.spectral_norm.mtv_partials", "mtv_partials",
        [Uniform, Read, Read, ReadWrite], []);
    SnMtvPartialsVec4 => (SPECTRAL_NORM_VEC4, "wgnorm.spectral_norm.vec4.mtv_partials", "mtv_partials",
        [Uniform, Read, Read, ReadWrite], []);
    SnRowsDot => (SPECTRAL_NORM, "wgnorm.spectral_norm.rows_dot", "rows_dot",
        [Uniform, Read, Read, ReadWrite], []);
    SnRowsDotVec4 => (SPECTRAL_NORM_VEC4, "wgnorm.spectral_norm.vec4.rows_dot", "rows_dot",
        [Uniform, Read, Read, ReadWrite], []);
    SnMtvCombine => (SPECTRAL_NORM, "wgnorm.spectral_norm.mtv_combine", "mtv_combine",
        [Uniform, Read, ReadWrite], []);
    SnVecPartials => (SPECTRAL_NORM, "wgnorm.spectral_norm.vec_partials", "vec_partials",
        [Uniform, Read, Read, ReadWrite], []);
    SnNormalize => (SPECTRAL_NORM, "wgnorm.spectral_norm.normalize", "normalize",
        [Uniform, Read, ReadWrite, ReadWrite, ReadWrite, Read], []);
    SnDot => (SPECTRAL_NORM, "wgnorm.spectral_norm.dot", "dot",
        [Uniform, Read, Read, ReadWrite, Read], []);
    SnScale => (SPECTRAL_NORM, "wgnorm.spectral_norm.scale", "scale",
        [Uniform, Read, Read, Read, ReadWrite], []);
    SnScaleVec4 => (SPECTRAL_NORM_VEC4, "wgnorm.spectral_norm.vec4.scale", "scale",
        [Uniform, Read, Read, Read, ReadWrite], []);
    SnGradCoef => (SPECTRAL_NORM, "wgnorm.spectral_norm.grad_coef", "grad_coef",
        [Uniform, Read, Read, Read, ReadWrite, ReadWrite], []);
    SnGrad => (SPECTRAL_NORM, "wgnorm.spectral_norm.grad", "grad",
        [Uniform, Read, Read, Read, Read, ReadWrite], []);
    SnGradVec4 => (SPECTRAL_NORM_VEC4, "wgnorm.spectral_norm.vec4.grad", "grad",
        [Uniform, Read, Read, Read, Read, ReadWrite], []);
    BnFinalize => (BATCH_NORM, "wgnorm.batch_norm.finalize", "finalize",
        [Uniform, Read, Read, Read, ReadWrite, ReadWrite, ReadWrite], []);
    BnNormalize => (BATCH_NORM, "wgnorm.batch_norm.normalize", "normalize",
        [Uniform, Read, Read, ReadWrite], []);
    BnNormalizeVec4 => (BATCH_NORM_VEC4, "wgnorm.batch_norm.vec4.normalize", "normalize",
        [Uniform, Read, Read, ReadWrite], []);
    BnNormalizeCl => (BATCH_NORM_CL, "wgnorm.batch_norm.cl.normalize", "normalize",
        [Uniform, Read, Read, ReadWrite], []);
    BnNormalizeRunning => (BATCH_NORM, "wgnorm.batch_norm.normalize_running", "normalize_running",
        [Uniform, Read, Read, Read, Read, Read, ReadWrite, ReadWrite], []);
    BnNormalizeRunningVec4 => (BATCH_NORM_VEC4, "wgnorm.batch_norm.vec4.normalize_running", "normalize_running",
        [Uniform, Read, Read, Read, Read, Read, ReadWrite, ReadWrite], []);
    BnNormalizeRunningCl => (BATCH_NORM_CL, "wgnorm.batch_norm.cl.normalize_running", "normalize_running",
        [Uniform, Read, Read, Read, Read, Read, ReadWrite, ReadWrite], []);
    BnGradFactors => (BATCH_NORM, "wgnorm.batch_norm.grad_factors", "grad_factors",
        [Uniform, Read, Read, ReadWrite, ReadWrite, ReadWrite], []);
    BnGradInput => (BATCH_NORM, "wgnorm.batch_norm.grad_input", "grad_input",
        [Uniform, Read, Read, Read, ReadWrite], []);
    BnGradInputVec4 => (BATCH_NORM_VEC4, "wgnorm.batch_norm.vec4.grad_input", "grad_input",
        [Uniform, Read, Read, Read, ReadWrite], []);
    BnGradInputCl => (BATCH_NORM_CL, "wgnorm.batch_norm.cl.grad_input", "grad_input",
        [Uniform, Read, Read, Read, ReadWrite], []);
    BnMerge => (BATCH_NORM, "wgnorm.batch_norm.merge", "merge",
        [Uniform, Read, ReadWrite], []);
    Copy => (COPY, "wgnorm.copy.copy", "copy", [Uniform, Read, ReadWrite], []);
    CastWiden => (CAST, "wgnorm.cast.cast_widen", "cast_widen", [Uniform, Read, ReadWrite], []);
    CastNarrow => (CAST, "wgnorm.cast.cast_narrow", "cast_narrow", [Uniform, Read, ReadWrite], []);
    CopyVec4 => (COPY_VEC4, "wgnorm.copy.vec4.copy", "copy", [Uniform, Read, ReadWrite], []);
}

impl Kernel {
    /// The vec4 twin of an elementwise or partial-reduction kernel (the same body on
    /// `array<vec4<f32>>`), used when every row of the layout is a multiple of 4
    /// elements long.
    pub(crate) fn vec4_twin(self) -> Option<Kernel> {
        match self {
            Kernel::WsNormalize => Some(Kernel::WsNormalizeVec4),
            Kernel::WsGrad => Some(Kernel::WsGradVec4),
            Kernel::WnApply => Some(Kernel::WnApplyVec4),
            Kernel::WnGradV => Some(Kernel::WnGradVVec4),
            Kernel::BnNormalize => Some(Kernel::BnNormalizeVec4),
            Kernel::BnNormalizeRunning => Some(Kernel::BnNormalizeRunningVec4),
            Kernel::BnGradInput => Some(Kernel::BnGradInputVec4),
            Kernel::WelfordPartials => Some(Kernel::WelfordPartialsVec4),
            Kernel::SumPartials => Some(Kernel::SumPartialsVec4),
            Kernel::SumPartialsCentered => Some(Kernel::SumPartialsCenteredVec4),
            Kernel::DotPartials => Some(Kernel::DotPartialsVec4),
            Kernel::WsRowsForward => Some(Kernel::WsRowsForwardVec4),
            Kernel::WsRowsGrad => Some(Kernel::WsRowsGradVec4),
            Kernel::WnRowsForward => Some(Kernel::WnRowsForwardVec4),
            Kernel::WnRowsGrad => Some(Kernel::WnRowsGradVec4),
            Kernel::SnMtvPartials => Some(Kernel::SnMtvPartialsVec4),
            Kernel::SnScale => Some(Kernel::SnScaleVec4),
            Kernel::SnRowsDot => Some(Kernel::SnRowsDotVec4),
            Kernel::SnGrad => Some(Kernel::SnGradVec4),
            Kernel::Copy => Some(Kernel::CopyVec4),
            _ => None,
        }
    }

    /// The channels-last twin of an elementwise or partial-reduction kernel: for
    /// layouts whose channels are the last axis and a multiple of 4, one group of 4
    /// channels per thread.
    pub(crate) fn channels_last_twin(self) -> Option<Kernel> {
        match self {
            Kernel::BnNormalize => Some(Kernel::BnNormalizeCl),
            Kernel::BnNormalizeRunning => Some(Kernel::BnNormalizeRunningCl),
            Kernel::BnGradInput => Some(Kernel::BnGradInputCl),
            Kernel::WelfordPartials => Some(Kernel::WelfordPartialsCl),
            Kernel::SumPartials => Some(Kernel::SumPartialsCl),
            Kernel::SumPartialsCentered => Some(Kernel::SumPartialsCenteredCl),
            _ => None,
        }
    }
}

/// Threads per workgroup of the elementwise kernels (their shaders' `WG`).
pub const WORKGROUP_SIZE: u32 = 256;

/// How an elementwise kernel (one importing `shaders/shared/element.wgsl`) is
/// specialised through its override constants: the thread layout and whether slices
/// span a batch of rows. Dead paths are compiled out, which matters on software
/// adapters, where every branch and division costs each SIMD lane. Other kernels use
/// `Spec::default()` and get no constants.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct Spec {
    /// `Some(LAYOUT)`: 0 runs (stride 1), 1 coalesced (stride WG), 2 any stride, 3 a
    /// row at a time.
    pub layout: Option<u32>,
    /// `BATCHED`: slices are `a * channels + c` with a batch over the rows.
    pub batched: bool,
    /// `PER_THREAD`: units per thread of an elementwise pass (with `layout`).
    pub per_thread: u32,
    /// `Some(RWG)`: the row kernels' workgroup size (`shaders/shared/rows.wgsl`).
    pub rows: Option<u32>,
    /// `ROW_BATCH` (with `rows`): row kernels load four units at a time.
    pub row_batch: bool,
    /// The element type of the data bindings (`D` in `shaders/shared/elem.wgsl`): a
    /// half type picks the kernel's module `<module>_<dtype>` (`<module>.<dtype>`
    /// for an op's scalar module), which only vec4 and channels-last kernels may use.
    pub dtype: DType,
    /// Every storage binding read-write (the module's `_rw` twin, build.rs): for a
    /// dispatch that binds one buffer both for reading and for writing (views of one
    /// caller's buffer), which wgpu refuses with read-only bindings.
    pub aliased: bool,
}

impl Spec {
    fn constants(&self) -> Vec<(&'static str, f64)> {
        let mut c = Vec::new();
        if let Some(layout) = self.layout {
            c.push(("LAYOUT", f64::from(layout)));
            c.push(("BATCHED", f64::from(u8::from(self.batched))));
            c.push(("PER_THREAD", f64::from(self.per_thread)));
        }
        if let Some(rwg) = self.rows {
            c.push(("RWG", f64::from(rwg)));
            c.push(("ROW_BATCH", f64::from(u8::from(self.row_batch))));
        }
        c
    }
}

/// A compiled kernel.
#[derive(Debug)]
pub(crate) struct Pipeline {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
}

/// The module of `shader` (an index into [`SHADERS`]) for data of `dtype`: the shader
/// itself for f32, its half twin otherwise. Half data has no scalar units (the host
/// widens it first), so only vec4 and channels-last kernels have a twin; asking for
/// another is a bug of the caller, reported as an error rather than run on the wrong
/// bytes.
pub fn module_for(kernel: Kernel, dtype: DType, aliased: bool) -> Result<usize> {
    let def = kernel.def();
    let base = &SHADERS[def.shader];
    let units_of_four = base.defines.contains(&"VEC4")
        || def.entry.ends_with("_cl")
        || def.entry.starts_with("cast_");
    let twin = |module: &str, suffix: &str| {
        if module.contains('.') {
            format!("{module}_{suffix}")
        } else {
            format!("{module}.{suffix}")
        }
    };
    let mut name = base.name.to_string();
    if dtype != DType::F32 {
        if !units_of_four {
            return Err(Error::Gpu {
                during: def.label,
                reason: format!("no {dtype} variant of this kernel (a bug of wgnorm's planning)"),
            });
        }
        name = twin(&name, dtype.name());
    }
    if aliased {
        name = twin(&name, "rw");
    }
    SHADERS
        .iter()
        .position(|s| s.name == name)
        .ok_or_else(|| Error::Gpu {
            during: def.label,
            reason: format!("no shader module {name} (a bug of wgnorm's build)"),
        })
}

/// Pipelines built lazily, once, behind a read-mostly lock.
#[derive(Default)]
pub(crate) struct KernelCache {
    modules: RwLock<HashMap<usize, Arc<wgpu::ShaderModule>>>,
    pipelines: RwLock<HashMap<(Kernel, Spec), Arc<Pipeline>>>,
}

impl KernelCache {
    /// How many pipelines have been built so far.
    pub fn built(&self) -> usize {
        self.pipelines.read().map(|p| p.len()).unwrap_or(0)
    }
}

impl Context {
    /// The pipeline of `kernel` specialised by `spec`, built on first use.
    pub(crate) fn pipeline(&self, kernel: Kernel, spec: Spec) -> Result<Arc<Pipeline>> {
        let cache = &self.kernels;
        let key = (kernel, spec);
        if let Some(p) = cache
            .pipelines
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(p.clone());
        }
        let shader = module_for(kernel, spec.dtype, spec.aliased)?;
        let mut pipelines = cache.pipelines.write().unwrap_or_else(|e| e.into_inner());
        // Another thread may have built it while we waited for the write lock.
        if let Some(p) = pipelines.get(&key) {
            return Ok(p.clone());
        }
        let def = kernel.def();
        let mut constants = def.constants.to_vec();
        constants.extend(spec.constants());
        let module = self.shader_module(shader);
        let entries: Vec<wgpu::BindGroupLayoutEntry> = def
            .bindings
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupLayoutEntry {
                binding: i as u32,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: match b {
                        Binding::Uniform => wgpu::BufferBindingType::Uniform,
                        Binding::Read => wgpu::BufferBindingType::Storage {
                            read_only: !spec.aliased,
                        },
                        Binding::ReadWrite => wgpu::BufferBindingType::Storage { read_only: false },
                    },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            })
            .collect();
        let layout = self
            .device
            .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some(def.label),
                entries: &entries,
            });
        let pipeline_layout = self
            .device
            .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(def.label),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(def.label),
                layout: Some(&pipeline_layout),
                module: &module,
                entry_point: Some(def.entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &constants,
                    // Every kernel writes its workgroup memory before reading it.
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
        let built = Arc::new(Pipeline { pipeline, layout });
        pipelines.insert(key, built.clone());
        Ok(built)
    }

    fn shader_module(&self, shader: usize) -> Arc<wgpu::ShaderModule> {
        let cache = &self.kernels;
        if let Some(m) = cache
            .modules
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&shader)
        {
            return m.clone();
        }
        let mut modules = cache.modules.write().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = modules.get(&shader) {
            return m.clone();
        }
        let src = &SHADERS[shader];
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(src.name),
                source: wgpu::ShaderSource::Wgsl(src.source.into()),
            });
        let module = Arc::new(module);
        modules.insert(shader, module.clone());
        module
    }

    /// How many kernel pipelines this context has built so far (each is built once).
    pub fn pipelines_built(&self) -> usize {
        self.kernels.built()
    }
}

/// Checks a host params struct against its WGSL twin in a composed module: the same
/// size, and each named field at the same offset (no GPU needed; naga reads the WGSL).
#[cfg(test)]
pub(crate) fn check_mirror(module: &str, name: &str, size: usize, fields: &[(&str, usize)]) {
    let src = SHADERS
        .iter()
        .find(|s| s.name == module)
        .unwrap_or_else(|| panic!("no shader module {module}"));
    let parsed = naga::front::wgsl::parse_str(src.source).expect("composed modules parse");
    let (_, ty) = parsed
        .types
        .iter()
        .find(|(_, t)| t.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("{module}: no struct {name}"));
    let naga::TypeInner::Struct { members, span } = &ty.inner else {
        panic!("{module}: {name} is not a struct");
    };
    assert_eq!(*span as usize, size, "{module}: size of {name}");
    for (field, offset) in fields {
        let member = members
            .iter()
            .find(|m| m.name.as_deref() == Some(*field))
            .unwrap_or_else(|| panic!("{module}: {name} has no field {field}"));
        assert_eq!(member.offset as usize, *offset, "{module}: {name}.{field}");
    }
}

/// `mirror!("module", Type, [field, ...])`: [`check_mirror`] of the Rust struct `Type`
/// against the WGSL struct of the same name.
#[cfg(test)]
macro_rules! mirror {
    ($module:expr, $ty:ident, [$($field:ident),* $(,)?]) => {
        $crate::gpu::kernels::check_mirror(
            $module,
            stringify!($ty),
            std::mem::size_of::<$ty>(),
            &[$((stringify!($field), std::mem::offset_of!($ty, $field))),*],
        )
    };
}
#[cfg(test)]
pub(crate) use mirror;

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel's `@workgroup_size` is the host's constant for its kind: the row
    /// kernels', the reductions', or the elementwise kernels'.
    #[test]
    fn workgroup_sizes_match_the_host() {
        for &kernel in Kernel::ALL {
            let def = kernel.def();
            let src = &SHADERS[def.shader];
            let module = naga::front::wgsl::parse_str(src.source).expect("composed modules parse");
            let ep = module
                .entry_points
                .iter()
                .find(|e| e.name == def.entry)
                .unwrap_or_else(|| panic!("{}: no entry point", def.label));
            if def.entry.starts_with("rows_") {
                // The row kernels' size is the `RWG` override, set per adapter.
                assert!(
                    ep.workgroup_size_overrides.is_some(),
                    "{}: row kernels take RWG",
                    def.label
                );
                assert!(module
                    .overrides
                    .iter()
                    .any(|(_, o)| o.name.as_deref() == Some("RWG")));
                continue;
            }
            let want = if src.name.starts_with("channel_stats") {
                crate::ops::channel_stats::REDUCE_WORKGROUP
            } else {
                u64::from(WORKGROUP_SIZE)
            };
            assert_eq!(u64::from(ep.workgroup_size[0]), want, "{}", def.label);
            assert_eq!(ep.workgroup_size[1..], [1, 1], "{}", def.label);
        }
    }
}
