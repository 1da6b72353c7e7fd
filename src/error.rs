//! The crate's one error type.

/// Everything that can go wrong in `wgnorm`.
///
/// Input errors name the op (`weight_standardization`, ...) and the problem, so a
/// message read in a log says what to fix. No public function panics on bad input.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No usable GPU adapter: the message lists what was tried and how to get one.
    #[error("no GPU adapter found ({tried}). Install a software adapter, for example `apt-get install mesa-vulkan-drivers` (Vulkan, lavapipe), or set WGPU_BACKEND=gl to use OpenGL through EGL (llvmpipe)")]
    NoAdapter {
        /// What was tried, in order.
        tried: String,
    },
    /// The adapter was found but refused to open a device.
    #[error("could not open a device on adapter `{adapter}`: {reason}")]
    RequestDevice {
        /// The adapter's name.
        adapter: String,
        /// What wgpu said.
        reason: String,
    },
    /// An op's input is invalid: wrong shape, out-of-range parameter, ...
    #[error("{op}: {problem}")]
    InvalidInput {
        /// The op that refused the input, e.g. `weight_standardization`.
        op: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// A tensor is larger than the device can hold in one buffer.
    #[error("{op}: {problem}")]
    TooLarge {
        /// The op or the operation (`upload`, ...).
        op: &'static str,
        /// Sizes involved.
        problem: String,
    },
    /// The GPU reported an error (validation, out of memory, lost device, failed readback).
    #[error("gpu error during {during}: {reason}")]
    Gpu {
        /// What the crate was doing.
        during: &'static str,
        /// What wgpu said.
        reason: String,
    },
    /// A tensor made on one [`Context`](crate::Context) was given to another: its
    /// buffer belongs to another device.
    #[error("{op}: {tensor} belongs to context #{tensor_context}, not to this context (#{context}); make it on this context or read it back and upload it")]
    ForeignTensor {
        /// The op that refused it.
        op: &'static str,
        /// Which input (`weight`, `running_mean`, ...).
        tensor: String,
        /// The context that made the tensor.
        tensor_context: u64,
        /// The context the op ran on.
        context: u64,
    },
    /// A conformance case or state file could not be read.
    #[error("{path}: {problem}")]
    File {
        /// The file.
        path: String,
        /// What is wrong with it.
        problem: String,
    },
}

/// `Result` with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Shorthand for [`Error::InvalidInput`].
    pub(crate) fn input(op: &'static str, problem: impl Into<String>) -> Self {
        Error::InvalidInput {
            op,
            problem: problem.into(),
        }
    }
}
