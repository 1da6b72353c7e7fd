//! The public ops: configs with documented defaults, input checks, dispatch sizing.

pub mod batch_norm;
pub mod cast;
pub(crate) mod channel_stats;
pub mod copy;
pub(crate) mod element;
pub(crate) mod layout;
pub mod spectral_norm;
pub mod sync_batch_norm;
pub mod weight_norm;
pub mod weight_standardization;
