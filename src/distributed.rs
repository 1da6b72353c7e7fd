//! Collectives for data-parallel training: the transport of synchronized batch norm
//! ([`BatchNorm::forward_sync`](crate::BatchNorm::forward_sync)).
//!
//! Only per-feature vectors cross it (statistics and gradient sums, in f64), never
//! activations. Two implementations:
//!
//! - [`ThreadGroup`]: ranks are threads of one process, each with its own
//!   [`Context`](crate::Context) (several GPUs or adapters, or several contexts on one).
//! - `MpiComm` (cargo feature `mpi`): ranks are MPI processes (rsmpi), launched with
//!   `mpirun` or `srun` as a cluster does.
//!
//! Every rank must make the same sequence of collective calls. The synchronized ops
//! exchange a small header before their data, so that a rank whose input is bad (a
//! wrong feature count, an empty config) makes every rank return an error instead of
//! leaving the others waiting.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::error::{Error, Result};

/// A group of ranks exchanging small f64 vectors.
pub trait Collective {
    /// This rank, `0..size()`.
    fn rank(&self) -> usize;

    /// Ranks in the group.
    fn size(&self) -> usize;

    /// Every rank's `local`, concatenated in rank order, on every rank. All ranks must
    /// pass the same length (the synchronized ops agree on it through a fixed-size
    /// header first).
    fn all_gather(&self, local: &[f64]) -> Result<Vec<f64>>;

    /// The element-wise sum over ranks, added in rank order, so that every rank gets
    /// the same bits.
    fn all_reduce_sum(&self, values: &mut [f64]) -> Result<()> {
        let all = self.all_gather(values)?;
        let n = values.len();
        if all.len() != n * self.size() {
            return Err(Error::input(
                "all_reduce_sum",
                format!(
                    "gathered {} values from {} ranks of {n}",
                    all.len(),
                    self.size()
                ),
            ));
        }
        for (i, v) in values.iter_mut().enumerate() {
            *v = (0..self.size()).map(|r| all[r * n + i]).sum();
        }
        Ok(())
    }
}

/// Ranks as threads of one process: [`ThreadGroup::new`] makes one [`ThreadComm`] per
/// rank, each moved to its thread.
pub struct ThreadGroup;

impl ThreadGroup {
    /// `size` connected ranks (at least one). A rank that waits longer than `timeout`
    /// for the others (60 s by default, see [`ThreadComm::with_timeout`]) gets an error;
    /// a rank dropped while others wait makes them return an error at once.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(size: usize) -> Vec<ThreadComm> {
        let shared = Arc::new(Shared {
            state: Mutex::new(Exchange {
                generation: 0,
                arrived: 0,
                slots: vec![None; size.max(1)],
                result: None,
                closed: false,
            }),
            turn: Condvar::new(),
        });
        (0..size.max(1))
            .map(|rank| ThreadComm {
                rank,
                size: size.max(1),
                shared: shared.clone(),
                timeout: Duration::from_secs(60),
            })
            .collect()
    }
}

struct Shared {
    state: Mutex<Exchange>,
    turn: Condvar,
}

struct Exchange {
    /// Completed exchanges.
    generation: u64,
    arrived: usize,
    slots: Vec<Option<Vec<f64>>>,
    /// The last completed exchange, per rank.
    result: Option<Arc<Vec<Vec<f64>>>>,
    /// A rank was dropped: nobody can complete an exchange any more.
    closed: bool,
}

/// One rank of a [`ThreadGroup`].
pub struct ThreadComm {
    rank: usize,
    size: usize,
    shared: Arc<Shared>,
    timeout: Duration,
}

impl ThreadComm {
    /// The longest a collective call waits for the other ranks before it fails.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

impl Drop for ThreadComm {
    fn drop(&mut self) {
        if let Ok(mut st) = self.shared.state.lock() {
            st.closed = true;
        }
        self.shared.turn.notify_all();
    }
}

impl Collective for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_gather(&self, local: &[f64]) -> Result<Vec<f64>> {
        const OP: &str = "all_gather";
        let gone = || Error::input(OP, "a rank of the thread group was dropped".to_string());
        let mut st = self.shared.state.lock().map_err(|_| gone())?;
        if st.closed {
            return Err(gone());
        }
        let generation = st.generation;
        st.slots[self.rank] = Some(local.to_vec());
        st.arrived += 1;
        if st.arrived == self.size {
            let all: Vec<Vec<f64>> = st
                .slots
                .iter_mut()
                .map(|s| s.take().unwrap_or_default())
                .collect();
            st.result = Some(Arc::new(all));
            st.arrived = 0;
            st.generation += 1;
            self.shared.turn.notify_all();
        } else {
            let deadline = std::time::Instant::now() + self.timeout;
            while st.generation == generation {
                if st.closed {
                    return Err(gone());
                }
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    // This rank's vector is in the exchange: the group cannot go on.
                    st.closed = true;
                    self.shared.turn.notify_all();
                    return Err(Error::input(
                        OP,
                        format!(
                            "rank {} waited {:?} for the other ranks of the thread group",
                            self.rank, self.timeout
                        ),
                    ));
                }
                st = self
                    .shared
                    .turn
                    .wait_timeout(st, left)
                    .map_err(|_| gone())?
                    .0;
            }
        }
        // The exchange of `generation` is the last completed one: the next cannot
        // complete before this rank joins it.
        let all = st.result.clone().ok_or_else(gone)?;
        if all.iter().any(|v| v.len() != local.len()) {
            return Err(Error::input(
                OP,
                format!(
                    "ranks passed vectors of different lengths: {:?}",
                    all.iter().map(Vec::len).collect::<Vec<_>>()
                ),
            ));
        }
        Ok(all.concat())
    }
}

/// One rank of an MPI communicator (rsmpi), feature `mpi`: `MpiComm::world(&universe)`
/// after `mpi::initialize()`.
#[cfg(feature = "mpi")]
pub struct MpiComm {
    comm: mpi::topology::SimpleCommunicator,
}

#[cfg(feature = "mpi")]
impl MpiComm {
    /// Every process of the job (`MPI_COMM_WORLD`).
    pub fn world(universe: &mpi::environment::Universe) -> Self {
        MpiComm {
            comm: universe.world(),
        }
    }

    /// Any communicator of the caller's (a sub-group, a duplicate).
    pub fn new(comm: mpi::topology::SimpleCommunicator) -> Self {
        MpiComm { comm }
    }
}

#[cfg(feature = "mpi")]
impl Collective for MpiComm {
    fn rank(&self) -> usize {
        use mpi::traits::Communicator;
        self.comm.rank() as usize
    }

    fn size(&self) -> usize {
        use mpi::traits::Communicator;
        self.comm.size() as usize
    }

    fn all_gather(&self, local: &[f64]) -> Result<Vec<f64>> {
        use mpi::traits::CommunicatorCollectives;
        let mut all = vec![0.0; local.len() * self.size()];
        self.comm.all_gather_into(local, &mut all[..]);
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_gather_in_rank_order_and_sum_alike() {
        let comms = ThreadGroup::new(3);
        let results: Vec<(Vec<f64>, Vec<f64>)> = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        let r = c.rank() as f64;
                        let all = c.all_gather(&[r, r * 10.0]).unwrap();
                        let mut sum = vec![0.1 * (r + 1.0), 1.0];
                        c.all_reduce_sum(&mut sum).unwrap();
                        // A second exchange right after the first.
                        let again = c.all_gather(&[r]).unwrap();
                        assert_eq!(again, vec![0.0, 1.0, 2.0]);
                        (all, sum)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (all, sum) in &results {
            assert_eq!(all, &vec![0.0, 0.0, 1.0, 10.0, 2.0, 20.0]);
            assert_eq!(sum[1], 3.0);
            assert_eq!(sum[0].to_bits(), results[0].1[0].to_bits());
        }
    }

    #[test]
    fn a_dropped_rank_or_a_timeout_is_an_error_not_a_hang() {
        let mut comms = ThreadGroup::new(2);
        let last = comms.pop().unwrap();
        drop(last);
        assert!(comms[0].all_gather(&[1.0]).is_err());
        let comms: Vec<_> = ThreadGroup::new(2)
            .into_iter()
            .map(|c| c.with_timeout(Duration::from_millis(50)))
            .collect();
        assert!(comms[0].all_gather(&[1.0]).is_err());
        // Different lengths: every rank is told.
        let comms = ThreadGroup::new(2);
        std::thread::scope(|s| {
            let a = s.spawn(|| comms[0].all_gather(&[1.0]));
            let b = s.spawn(|| comms[1].all_gather(&[1.0, 2.0]));
            assert!(a.join().unwrap().is_err() && b.join().unwrap().is_err());
        });
    }
}
