//! Synchronized batch norm: the statistics, running averages and input gradients of
//! the whole batch when it is split over ranks (GPUs, adapters or machines), as
//! PyTorch's `SyncBatchNorm`, ChainerMN's `MultiNodeBatchNormalization` and Horovod's
//! `SyncBatchNormalization` compute them.
//!
//! Forward: each rank reduces its slice to per-feature `(count, mean, M2)`; the ranks
//! all-gather them in f64 and combine them with Chan's formula in rank order, so every
//! rank normalizes with, and updates its running averages from, the same bits. Ranks
//! may hold different batch sizes, or none. Backward: the per-feature sums of `dy` and
//! `dy (x - mean)` are summed over ranks (in rank order), so that each rank's
//! `grad_input` is its slice of single-device batch norm's on the concatenated batch;
//! `grad_gamma` and `grad_beta` stay this rank's own, which summed over ranks (as data
//! parallelism sums parameter gradients) are the single-device ones, as in PyTorch.
//! Only per-feature vectors cross the [`Collective`], never activations.
//!
//! Evaluation needs no synchronization: use [`BatchNorm::forward`] with
//! [`BatchNormMode::Eval`](crate::BatchNormMode::Eval) on each rank.

use crate::distributed::Collective;
use crate::error::{Error, Result};
use crate::gpu::{Context, Tensor};
use crate::ops::batch_norm::{
    BatchNorm, BatchNormForward, BatchNormGrads, BatchNormState, ChannelStats, DistributedSums,
};

const OP: &str = "batch_norm (synchronized)";

/// The result of [`BatchNorm::forward_sync`].
pub struct SyncForward {
    /// This rank's forward (its output and what its backward needs).
    pub forward: BatchNormForward,
    /// The statistics of the whole batch, the same on every rank.
    pub stats: ChannelStats,
}

/// The header every rank sends before its data: whether its input passed its checks
/// (`local` is `None` when not), its feature count, its values per feature.
fn agree(comm: &dyn Collective, local: Option<(usize, f64)>) -> Result<Vec<[f64; 3]>> {
    let header = match local {
        Some((features, count)) => [1.0, features as f64, count],
        None => [0.0, 0.0, 0.0],
    };
    let all = comm.all_gather(&header)?;
    let headers: Vec<[f64; 3]> = all.chunks(3).map(|h| [h[0], h[1], h[2]]).collect();
    if let Some(r) = headers.iter().position(|h| h[0] != 1.0) {
        return Err(Error::input(
            OP,
            format!("rank {r} of {} refused its input", comm.size()),
        ));
    }
    if let Some(r) = headers.iter().position(|h| h[1] != headers[0][1]) {
        return Err(Error::input(
            OP,
            format!(
                "rank {r} has {} features, rank 0 has {}",
                headers[r][1], headers[0][1]
            ),
        ));
    }
    Ok(headers)
}

impl BatchNorm {
    /// Training forward of this rank's slice of a batch split over the ranks of
    /// `comm`, normalized with the statistics of the whole batch (see the module
    /// docs); `state`'s running averages are updated from them, identically on every
    /// rank. Every rank must call it, with the same config; a rank whose input is
    /// refused makes every rank return an error. Matches PyTorch's `SyncBatchNorm` in
    /// training (and, with [`BatchNorm::chainer`], ChainerMN's
    /// `MultiNodeBatchNormalization`).
    pub fn forward_sync(
        &self,
        ctx: &Context,
        comm: &dyn Collective,
        x: &Tensor,
        gamma: Option<&Tensor>,
        beta: Option<&Tensor>,
        state: Option<&mut BatchNormState>,
    ) -> Result<SyncForward> {
        let local = self.local_forward_stats(ctx, x, gamma, beta, state.as_deref());
        let headers = agree(comm, local.as_ref().ok().map(|s| (s.mean.len(), s.count)));
        // This rank's own error first; else what the others reported.
        let local = local?;
        let headers = headers?;
        let features = local.mean.len();
        let all = comm.all_gather(&[local.mean.as_slice(), local.m2.as_slice()].concat())?;
        let mut stats = ChannelStats {
            count: 0.0,
            mean: vec![0.0; features],
            m2: vec![0.0; features],
        };
        for (r, header) in headers.iter().enumerate() {
            let part = &all[r * 2 * features..(r + 1) * 2 * features];
            stats = stats.combine(&ChannelStats {
                count: header[2],
                mean: part[..features].to_vec(),
                m2: part[features..].to_vec(),
            })?;
        }
        let forward = self.forward_with_stats(ctx, x, gamma, beta, state, &stats)?;
        Ok(SyncForward { forward, stats })
    }

    /// Backward of [`Self::forward_sync`] on this rank's slice: `grad_input` through
    /// the statistics of the whole batch (its sums over every rank), `grad_gamma` and
    /// `grad_beta` this rank's own (see the module docs). Every rank must call it.
    pub fn backward_sync(
        &self,
        ctx: &Context,
        comm: &dyn Collective,
        x: &Tensor,
        grad_output: &Tensor,
        forward: &SyncForward,
    ) -> Result<BatchNormGrads> {
        let local = self.local_grad_sums(ctx, x, grad_output, &forward.forward);
        let headers = agree(comm, local.as_ref().ok().map(|s| (s.len(), 0.0)));
        let local = local?;
        headers?;
        let mut global: Vec<f64> = local.iter().flatten().copied().collect();
        comm.all_reduce_sum(&mut global)?;
        let global: Vec<[f64; 2]> = global.chunks(2).map(|s| [s[0], s[1]]).collect();
        let sums = DistributedSums {
            local: &local,
            global: &global,
            count: forward.stats.count,
        };
        self.backward_with_sums(ctx, x, grad_output, &forward.forward, &sums)
    }

    /// This rank's statistics, after every check [`Self::forward_with_stats`] makes
    /// that does not depend on the other ranks (an empty batch gives count 0).
    fn local_forward_stats(
        &self,
        ctx: &Context,
        x: &Tensor,
        gamma: Option<&Tensor>,
        beta: Option<&Tensor>,
        state: Option<&BatchNormState>,
    ) -> Result<ChannelStats> {
        let mut tensors = vec![("x", x)];
        tensors.extend(gamma.map(|t| ("gamma", t)));
        tensors.extend(beta.map(|t| ("beta", t)));
        if let Some(st) = state {
            tensors.push(("running_mean", &st.running_mean));
            tensors.push(("running_var", &st.running_var));
        }
        ctx.check_tensors(OP, &tensors)?;
        let layout = self.layout_allowing_empty(x.shape())?;
        let features = layout.channels;
        self.check_vector("gamma", gamma, features, self.scale)?;
        self.check_vector("beta", beta, features, self.center)?;
        if self.track_running_stats {
            let st = state.ok_or_else(|| {
                Error::input(
                    OP,
                    "running statistics are tracked but no state was given".to_string(),
                )
            })?;
            if st.running_mean.shape() != [features as usize]
                || st.running_var.shape() != [features as usize]
            {
                return Err(Error::input(
                    OP,
                    format!("the running statistics are not of {features} features"),
                ));
            }
        }
        if layout.len() == 0 {
            return Ok(ChannelStats {
                count: 0.0,
                mean: vec![0.0; features as usize],
                m2: vec![0.0; features as usize],
            });
        }
        self.batch_statistics(ctx, x)
    }
}
