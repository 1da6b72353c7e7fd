//! Normalizations attached to a weight, after Chainer's `LinkHook`: a [`Weight`] keeps
//! its raw parameter and a list of hooks; its forward applies them in order (global
//! hooks first, then its own) and gives the normalized weight the layer uses; its
//! backward chains the gradient back through them to the raw parameter.
//!
//! Hooks get Chainer's callbacks: `added` and `deleted`, `forward_preprocess` and
//! `forward_postprocess` around each weight's forward, plus `hook_preprocess` /
//! `hook_postprocess` around each normalization (what [`TimerHook`] times).

mod normalizations;
mod timer;

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

pub use normalizations::{SpectralNormHook, WeightNormHook, WeightStandardizationHook};
pub use timer::{TimerHook, TimerReport, TimerRow, TimerSummary};

use crate::error::{Error, Result};
use crate::gpu::{Context, Recording, Tensor};

const OP: &str = "hooks";

/// What a callback is told about the forward in progress.
#[derive(Clone, Copy, Debug)]
pub struct HookArgs<'a> {
    /// The weight's name (its module path, e.g. `layer1.0.conv1`).
    pub weight: &'a str,
    /// Training (`true`) or evaluation.
    pub training: bool,
}

/// A hook on a weight. Every method has a default that does nothing, so an observer
/// implements only its callbacks and a normalization its transform.
pub trait WeightHook: Send {
    /// The hook's name, unique on a weight (e.g. `spectral_norm`).
    fn name(&self) -> &str;

    /// Whether the hook holds state for one weight (Spectral Normalization's `u`,
    /// Weight Normalization's `g`). Such a hook cannot be registered globally.
    fn per_weight(&self) -> bool {
        false
    }

    /// Called when the hook is added to `weight` (`data` is `None` while the weight
    /// is not initialised).
    fn added(&mut self, _ctx: &Context, _weight: &str, _data: Option<&Tensor>) -> Result<()> {
        Ok(())
    }

    /// Called when the hook is removed from `weight`.
    fn deleted(&mut self, _ctx: &Context, _weight: &str) -> Result<()> {
        Ok(())
    }

    /// Called when the hook is registered globally ([`register_global`]); Chainer
    /// calls `added(None)` then.
    fn added_global(&mut self) -> Result<()> {
        Ok(())
    }

    /// Called when a global registration ends (its guard is dropped); Chainer calls
    /// `deleted(None)` then.
    fn deleted_global(&mut self) {}

    /// The raw weight to leave in place when the hook is removed, given the current
    /// one (`None`: leave it as it is). Weight normalization folds `g * v / ||v||`
    /// back in, as PyTorch's `remove_weight_norm` and Jittor's `remove` do.
    fn fold(&self, _ctx: &Context, _data: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Whether the hook transforms the weight ([`Self::record_forward`] returns a
    /// tensor) rather than only observing.
    fn is_transform(&self) -> bool {
        false
    }

    /// Whether [`Self::initialize`] still has to run before the first forward.
    fn needs_init(&self) -> bool {
        false
    }

    /// Lazy initialisation from the raw weight, before its first forward (Chainer
    /// initialises a hook's state from the link's raw `W` once it has data).
    fn initialize(&mut self, _ctx: &Context, _weight: &str, _data: &Tensor) -> Result<()> {
        Ok(())
    }

    /// Before the weight's forward.
    fn forward_preprocess(&mut self, _rec: &mut Recording<'_>, _args: &HookArgs<'_>) -> Result<()> {
        Ok(())
    }

    /// After the weight's forward.
    fn forward_postprocess(
        &mut self,
        _rec: &mut Recording<'_>,
        _args: &HookArgs<'_>,
    ) -> Result<()> {
        Ok(())
    }

    /// Before the normalization `hook` runs on the weight.
    fn hook_preprocess(
        &mut self,
        _rec: &mut Recording<'_>,
        _args: &HookArgs<'_>,
        _hook: &str,
    ) -> Result<()> {
        Ok(())
    }

    /// After the normalization `hook` ran on the weight.
    fn hook_postprocess(
        &mut self,
        _rec: &mut Recording<'_>,
        _args: &HookArgs<'_>,
        _hook: &str,
    ) -> Result<()> {
        Ok(())
    }

    /// The transform: records the hook's output from `input` (the raw weight or the
    /// previous hook's output). `None`: an observer, the input passes through.
    fn record_forward(
        &mut self,
        _rec: &mut Recording<'_>,
        _input: &Tensor,
        _args: &HookArgs<'_>,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// The gradient with respect to `input`, given the gradient of the output; the
    /// hook keeps gradients of its own parameters (see [`Self::param_grads`]).
    fn record_backward(
        &mut self,
        _rec: &mut Recording<'_>,
        _input: &Tensor,
        grad: &Tensor,
    ) -> Result<Tensor> {
        Ok(grad.clone())
    }

    /// Gradients of the hook's own parameters from the last backward, by state name.
    fn param_grads(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }

    /// The name PyTorch gives the raw parameter under this hook (`weight_orig` for
    /// spectral norm, `weight_v` for weight norm); `None` leaves it `weight`.
    fn raw_name(&self) -> Option<&'static str> {
        None
    }

    /// The hook's state by PyTorch name (`weight_u`, `weight_v`, `weight_g`).
    fn state(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }

    /// The names and shapes [`Self::set_state`] accepts, for a raw weight of shape
    /// `weight_shape`.
    fn state_shapes(&self, _weight_shape: &[usize]) -> Result<Vec<(String, Vec<usize>)>> {
        Ok(Vec::new())
    }

    /// The state entries (names as in [`Self::state`]) that stay f32 whatever type a
    /// checkpoint stores them in: spectral norm's `u`, `v` and `gamma`, which the op
    /// keeps in f32 for weights of any type. Default: none (an entry loads in the
    /// file's type: f32, f16 or bf16).
    fn f32_state(&self) -> &'static [&'static str] {
        &[]
    }

    /// Replaces the hook's state (already checked against [`Self::state_shapes`]).
    fn set_state(&mut self, _state: Vec<(String, Tensor)>) -> Result<()> {
        Ok(())
    }
}

/// A hook shared by every weight: registered with [`register_global`].
pub type SharedHook = Arc<Mutex<dyn WeightHook>>;

thread_local! {
    static GLOBAL: RefCell<Vec<(u64, String, SharedHook)>> = const { RefCell::new(Vec::new()) };
    static NEXT_ID: RefCell<u64> = const { RefCell::new(0) };
}

/// Keeps a global hook registered; dropping it unregisters the hook (Chainer's
/// `with hook:` block).
#[derive(Debug)]
pub struct GlobalHookGuard {
    id: u64,
}

impl Drop for GlobalHookGuard {
    fn drop(&mut self) {
        let removed = GLOBAL.with(|g| {
            let mut g = g.borrow_mut();
            let i = g.iter().position(|(id, ..)| *id == self.id)?;
            Some(g.remove(i).2)
        });
        if let Some(hook) = removed {
            if let Ok(mut h) = hook.lock() {
                h.deleted_global();
            }
        }
    }
}

/// The global hooks of this thread with their registered names, in order.
fn globals() -> Vec<(String, SharedHook)> {
    GLOBAL.with(|g| {
        g.borrow()
            .iter()
            .map(|(_, name, h)| (name.clone(), h.clone()))
            .collect()
    })
}

/// Registers `hook` for every weight's forward on this thread, under its own name,
/// until the guard is dropped (Chainer's `with hook:`; Chainer's global link hooks are
/// per thread too). Global hooks run before a weight's own. As in Chainer, a second
/// global hook of the same name is refused, and the hook is told
/// ([`WeightHook::added_global`], then [`WeightHook::deleted_global`] when the guard
/// is dropped). A hook with per-weight state ([`WeightHook::per_weight`]) is refused:
/// add it to each weight instead.
pub fn register_global(hook: SharedHook) -> Result<GlobalHookGuard> {
    let name = lock(&hook)?.name().to_string();
    register_global_named(hook, &name)
}

/// [`register_global`] under `name` (Chainer's global hooks are keyed by name).
pub fn register_global_named(hook: SharedHook, name: &str) -> Result<GlobalHookGuard> {
    if GLOBAL.with(|g| g.borrow().iter().any(|(_, n, _)| n == name)) {
        return Err(Error::input(
            OP,
            format!("a global hook named `{name}` is already registered"),
        ));
    }
    {
        let mut h = lock(&hook)?;
        if h.per_weight() {
            return Err(Error::input(
                OP,
                format!(
                    "hook `{}` keeps per-weight state and cannot be global; add it to each weight",
                    h.name()
                ),
            ));
        }
        h.added_global()?;
    }
    let id = NEXT_ID.with(|n| {
        let mut n = n.borrow_mut();
        *n += 1;
        *n
    });
    GLOBAL.with(|g| g.borrow_mut().push((id, name.to_string(), hook)));
    Ok(GlobalHookGuard { id })
}

fn lock(hook: &SharedHook) -> Result<std::sync::MutexGuard<'_, dyn WeightHook + 'static>> {
    hook.lock()
        .map_err(|_| Error::input(OP, "a global hook's lock is poisoned"))
}

enum Applied {
    Global(SharedHook),
    Local(usize),
}

/// A weight parameter that carries normalizations (Chainer's link with link hooks;
/// PyTorch's module with `spectral_norm` / `weight_norm` applied to its `weight`).
///
/// The raw tensor stays the parameter; [`Self::forward`] gives the normalized weight.
pub struct Weight {
    name: String,
    data: Option<Tensor>,
    hooks: Vec<Box<dyn WeightHook>>,
    /// Each hook's name on this weight (its own unless added with another).
    names: Vec<String>,
    /// The transforms of the last forward and their inputs, for the backward.
    applied: Vec<(Applied, Tensor)>,
}

impl std::fmt::Debug for Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weight")
            .field("name", &self.name)
            .field("shape", &self.data.as_ref().map(Tensor::shape))
            .field("hooks", &self.hook_names())
            .finish()
    }
}

impl Weight {
    /// A weight named `name` (its module path), with data or not yet initialised.
    pub fn new(name: impl Into<String>, data: Option<Tensor>) -> Self {
        Weight {
            name: name.into(),
            data,
            hooks: Vec::new(),
            names: Vec::new(),
            applied: Vec::new(),
        }
    }

    /// The weight's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The raw parameter, if initialised.
    pub fn data(&self) -> Option<&Tensor> {
        self.data.as_ref()
    }

    /// Sets (or replaces) the raw parameter. Hooks that still need initialising do it
    /// at the next forward.
    pub fn set_data(&mut self, data: Tensor) {
        self.data = Some(data);
    }

    /// The hooks' names, in order.
    pub fn hook_names(&self) -> Vec<&str> {
        self.names.iter().map(String::as_str).collect()
    }

    /// The hook named `name` on this weight.
    pub fn hook(&self, name: &str) -> Option<&dyn WeightHook> {
        self.names
            .iter()
            .position(|n| n == name)
            .map(|i| self.hooks[i].as_ref())
    }

    /// Adds `hook` after the existing ones, under its own name, and calls its
    /// `added`. A second hook of the same name is refused (Chainer's
    /// `link.add_hook(hook)`).
    pub fn add_hook(&mut self, ctx: &Context, hook: Box<dyn WeightHook>) -> Result<()> {
        let name = hook.name().to_string();
        self.add_hook_named(ctx, hook, &name)
    }

    /// [`Self::add_hook`] under `name` (Chainer's `link.add_hook(hook, name)`), so that
    /// one weight can carry two hooks of one kind.
    pub fn add_hook_named(
        &mut self,
        ctx: &Context,
        mut hook: Box<dyn WeightHook>,
        name: &str,
    ) -> Result<()> {
        if self.hook(name).is_some() {
            return Err(Error::input(
                OP,
                format!("weight `{}` already has a hook named `{name}`", self.name),
            ));
        }
        hook.added(ctx, &self.name, self.data.as_ref())?;
        self.hooks.push(hook);
        self.names.push(name.to_string());
        self.applied.clear();
        Ok(())
    }

    /// Removes the hook named `name`, calls its `deleted` and returns it. A hook that
    /// folds (weight normalization) leaves the normalized weight as the raw one.
    pub fn remove_hook(&mut self, ctx: &Context, name: &str) -> Result<Box<dyn WeightHook>> {
        let i = self.names.iter().position(|n| n == name).ok_or_else(|| {
            Error::input(
                OP,
                format!("weight `{}` has no hook named `{name}`", self.name),
            )
        })?;
        let folded = match &self.data {
            Some(d) => self.hooks[i].fold(ctx, d)?,
            None => None,
        };
        let mut hook = self.hooks.remove(i);
        if let Err(e) = hook.deleted(ctx, &self.name) {
            self.hooks.insert(i, hook);
            return Err(e);
        }
        self.names.remove(i);
        if let Some(d) = folded {
            self.data = Some(d);
        }
        self.applied.clear();
        Ok(hook)
    }

    /// The normalized weight: every global hook, then the weight's own, in order.
    pub fn forward(&mut self, ctx: &Context, training: bool) -> Result<Tensor> {
        ctx.run(|rec| self.record_forward(rec, training))
    }

    /// Records [`Self::forward`]. Hooks that need initialising are initialised
    /// first, each in a submission of its own.
    pub fn record_forward(&mut self, rec: &mut Recording<'_>, training: bool) -> Result<Tensor> {
        let data = self.data.clone().ok_or_else(|| {
            Error::input(
                OP,
                format!("weight `{}` has no data yet (set_data first)", self.name),
            )
        })?;
        let ctx = rec.context();
        self.initialize_lazily(ctx, &data)?;
        let (global_names, globals): (Vec<String>, Vec<SharedHook>) = globals().into_iter().unzip();
        let args = HookArgs {
            weight: &self.name,
            training,
        };
        for g in &globals {
            lock(g)?.forward_preprocess(rec, &args)?;
        }
        for h in self.hooks.iter_mut() {
            h.forward_preprocess(rec, &args)?;
        }
        let mut applied = Vec::new();
        let mut current = data;
        let n_global = globals.len();
        for k in 0..n_global + self.hooks.len() {
            let (transform, name) = if k < n_global {
                (lock(&globals[k])?.is_transform(), global_names[k].clone())
            } else {
                let i = k - n_global;
                (self.hooks[i].is_transform(), self.names[i].clone())
            };
            if !transform {
                continue;
            }
            notify(&globals, &mut self.hooks, rec, &args, &name, true)?;
            let out = if k < n_global {
                lock(&globals[k])?.record_forward(rec, &current, &args)?
            } else {
                self.hooks[k - n_global].record_forward(rec, &current, &args)?
            };
            notify(&globals, &mut self.hooks, rec, &args, &name, false)?;
            let Some(out) = out else { continue };
            let which = if k < n_global {
                Applied::Global(globals[k].clone())
            } else {
                Applied::Local(k - n_global)
            };
            applied.push((which, std::mem::replace(&mut current, out)));
        }
        for g in &globals {
            lock(g)?.forward_postprocess(rec, &args)?;
        }
        for h in self.hooks.iter_mut() {
            h.forward_postprocess(rec, &args)?;
        }
        self.applied = applied;
        Ok(current)
    }

    /// Initialises the hooks that still need it (the weight had no data when they
    /// were added), each from the weight as the transforms before it leave it: Chainer
    /// initialises a lazily initialised link's hooks at its first forward, when
    /// `link.W` holds the earlier hooks' output (WS then SN: SN's `gamma`, and
    /// PyTorch's warmed-up `u`, come from the standardized weight). The transforms
    /// before a hook run here in evaluation mode, in submissions of their own, so that
    /// no state of theirs moves; hooks added to a weight with data initialise from the
    /// raw weight in `added`, as Chainer's do.
    fn initialize_lazily(&mut self, ctx: &Context, data: &Tensor) -> Result<()> {
        let Some(last) = self.hooks.iter().rposition(|h| h.needs_init()) else {
            return Ok(());
        };
        let args = HookArgs {
            weight: &self.name,
            training: false,
        };
        let mut current = data.clone();
        for (_, g) in &globals() {
            let mut h = lock(g)?;
            if h.is_transform() {
                if let Some(out) = ctx.run(|rec| h.record_forward(rec, &current, &args))? {
                    current = out;
                }
            }
        }
        for i in 0..=last {
            let hook = &mut self.hooks[i];
            if hook.needs_init() {
                hook.initialize(ctx, &self.name, &current)?;
            }
            if i < last && hook.is_transform() {
                if let Some(out) = ctx.run(|rec| hook.record_forward(rec, &current, &args))? {
                    current = out;
                }
            }
        }
        Ok(())
    }

    /// The gradient with respect to the raw parameter, given the gradient of the
    /// normalized weight of the last forward, chained back through every transform.
    pub fn backward(&mut self, ctx: &Context, grad: &Tensor) -> Result<Tensor> {
        ctx.run(|rec| self.record_backward(rec, grad))
    }

    /// Records [`Self::backward`].
    pub fn record_backward(&mut self, rec: &mut Recording<'_>, grad: &Tensor) -> Result<Tensor> {
        if self.applied.is_empty() && self.hooks.iter().any(|h| h.needs_init()) {
            return Err(Error::input(
                OP,
                format!("weight `{}`: backward before any forward", self.name),
            ));
        }
        let mut grad = grad.clone();
        for (which, input) in self.applied.iter().rev() {
            grad = match which {
                Applied::Global(h) => lock(h)?.record_backward(rec, input, &grad)?,
                Applied::Local(i) => self.hooks[*i].record_backward(rec, input, &grad)?,
            };
        }
        Ok(grad)
    }

    /// The state under PyTorch's names, `<name>.weight_orig`, `<name>.weight_u`, ...:
    /// the raw parameter (renamed by the first hook that renames it) and every hook's
    /// state. Two hooks claiming one name is an error.
    pub fn state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        let data = self.data.clone().ok_or_else(|| {
            Error::input(OP, format!("weight `{}` has no data to save", self.name))
        })?;
        let mut out = vec![(self.raw_key(), data)];
        for h in &self.hooks {
            for (k, t) in h.state() {
                out.push((format!("{}.{k}", self.name), t));
            }
        }
        let mut names: Vec<&str> = out.iter().map(|(k, _)| k.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::input(
                OP,
                format!("two hooks of weight `{}` both store `{}`", self.name, w[0]),
            ));
        }
        Ok(out)
    }

    /// The raw parameter's name in a state dict: `<name>.weight`, or as the first
    /// hook that renames it says (`weight_orig`, `weight_v`).
    pub fn raw_key(&self) -> String {
        let raw = self
            .hooks
            .iter()
            .find_map(|h| h.raw_name())
            .unwrap_or("weight");
        format!("{}.{raw}", self.name)
    }

    /// Names and shapes [`Self::state_dict`] has for a raw weight of shape `shape`.
    pub(crate) fn state_shapes(&self, shape: &[usize]) -> Result<Vec<(String, Vec<usize>)>> {
        let mut out = vec![(self.raw_key(), shape.to_vec())];
        for h in &self.hooks {
            for (k, s) in h.state_shapes(shape)? {
                out.push((format!("{}.{k}", self.name), s));
            }
        }
        Ok(out)
    }

    /// Whether state entry `key` (a full name, as [`Self::state_shapes`] gives it)
    /// loads as f32 whatever the file's type (see [`WeightHook::f32_state`]).
    pub(crate) fn keeps_f32(&self, key: &str) -> bool {
        self.hooks.iter().any(|h| {
            h.f32_state()
                .iter()
                .any(|k| key == format!("{}.{k}", self.name))
        })
    }

    /// The type state entry `key` (a full name) loads in: f32 for what the ops keep in
    /// f32, else the type of the tensor it replaces (the raw weight's data, a hook's
    /// current state), else f32 — what PyTorch's `load_state_dict` does, copying into
    /// the existing tensors.
    pub(crate) fn load_dtype(&self, key: &str) -> crate::DType {
        if self.keeps_f32(key) {
            return crate::DType::F32;
        }
        if key == self.raw_key() {
            return self.data.as_ref().map_or(crate::DType::F32, Tensor::dtype);
        }
        self.hooks
            .iter()
            .flat_map(|h| h.state())
            .find(|(k, _)| key == format!("{}.{k}", self.name))
            .map_or(crate::DType::F32, |(_, t)| t.dtype())
    }

    /// Replaces the raw parameter and the hooks' state (already checked).
    pub(crate) fn set_state(&mut self, mut tensors: Vec<(String, Tensor)>) -> Result<()> {
        let prefix = format!("{}.", self.name);
        let raw_key = self.raw_key();
        let i = tensors
            .iter()
            .position(|(k, _)| *k == raw_key)
            .ok_or_else(|| Error::input(OP, format!("`{raw_key}` missing")))?;
        self.data = Some(tensors.remove(i).1);
        for h in self.hooks.iter_mut() {
            let mine: Vec<String> = h
                .state_shapes(self.data.as_ref().expect("set above").shape())?
                .into_iter()
                .map(|(k, _)| k)
                .collect();
            let mut part = Vec::new();
            for k in mine {
                let key = format!("{prefix}{k}");
                if let Some(j) = tensors.iter().position(|(n, _)| *n == key) {
                    part.push((k, tensors.remove(j).1));
                }
            }
            h.set_state(part)?;
        }
        self.applied.clear();
        Ok(())
    }
}

/// Calls `hook_preprocess` (`before`) or `hook_postprocess` on every hook.
fn notify(
    globals: &[SharedHook],
    locals: &mut [Box<dyn WeightHook>],
    rec: &mut Recording<'_>,
    args: &HookArgs<'_>,
    name: &str,
    before: bool,
) -> Result<()> {
    for g in globals {
        let mut g = lock(g)?;
        if before {
            g.hook_preprocess(rec, args, name)?;
        } else {
            g.hook_postprocess(rec, args, name)?;
        }
    }
    for h in locals.iter_mut() {
        if before {
            h.hook_preprocess(rec, args, name)?;
        } else {
            h.hook_postprocess(rec, args, name)?;
        }
    }
    Ok(())
}
