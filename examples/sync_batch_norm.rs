//! Data-parallel batch norm over MPI ranks: each rank trains a batch-norm layer
//! (gamma and beta by SGD on `0.5 mean((y - target)^2)`) on its slice of every batch,
//! with the statistics and input gradients of the whole batch (synchronized batch
//! norm), the parameter gradients summed over ranks as data parallelism does. Every
//! rank also runs the same training on the whole batch alone and compares: the worst
//! difference over outputs, input gradients, running averages and parameters is
//! printed by rank 0, and the process fails past 1e-5.
//!
//! ```text
//! cargo build --release --features mpi --example sync_batch_norm
//! mpirun -np 4 target/release/examples/sync_batch_norm            # as root: --allow-run-as-root
//! mpirun -np 4 --oversubscribe target/release/examples/sync_batch_norm -- --bad-rank
//! ```
//!
//! The batch is split evenly, then unevenly (the last rank of three or more gets
//! none), in NCHW and NHWC. `--bad-rank` gives rank 1 a wrong feature count instead and checks that
//! every rank returns an error rather than waiting.

use mpi::traits::Communicator;
use ndarray::{ArrayD, Axis, Slice};
use wgnorm::distributed::MpiComm;
use wgnorm::rng::Rng;
use wgnorm::{BatchNorm, BatchNormMode, BatchNormState, Collective, Context, Tensor};

const STEPS: usize = 3;
const LR: f32 = 0.1;
const TOLERANCE: f64 = 1e-5;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let universe = mpi::initialize().ok_or("MPI is already initialized")?;
    let comm = MpiComm::world(&universe);
    let (rank, size) = (comm.rank(), comm.size());
    let ctx = Context::headless()?;
    if std::env::args().any(|a| a == "--bad-rank") {
        return bad_rank(&ctx, &comm);
    }
    if rank == 0 {
        println!("{size} ranks; rank 0 on {}", ctx.info());
    }
    let mut worst = 0f64;
    for (layout, shape, axis) in [("NCHW", [16, 8, 6, 5], 1), ("NHWC", [16, 6, 5, 8], 3)] {
        for even in [true, false] {
            let sizes = split(shape[0], size, even);
            let w = train(&ctx, &comm, &shape, axis, &sizes)?;
            if rank == 0 {
                println!("{layout} {shape:?}, rows per rank {sizes:?}: worst difference from one process {w:.2e}");
            }
            worst = worst.max(w);
        }
    }
    // Every rank's worst, so that any rank failing fails the job.
    let all = comm.all_gather(&[worst])?;
    let worst = all.iter().copied().fold(0f64, f64::max);
    if rank == 0 {
        println!("worst over every rank: {worst:.2e} (tolerance {TOLERANCE:.0e})");
    }
    if worst > TOLERANCE {
        universe.world().abort(1);
    }
    Ok(())
}

/// Rows of the batch for each rank: as even as they divide, or uneven with none for
/// the last of three or more.
fn split(rows: usize, size: usize, even: bool) -> Vec<usize> {
    if even {
        return (0..size)
            .map(|r| rows / size + usize::from(r < rows % size))
            .collect();
    }
    let takers = if size >= 3 { size - 1 } else { size };
    let mut sizes: Vec<usize> = (0..takers)
        .map(|r| rows / takers + usize::from(r < rows % takers))
        .collect();
    sizes[0] += 1;
    if let Some(last) = sizes.last_mut() {
        *last -= 1;
    }
    sizes.resize(size, 0);
    sizes
}

/// The worst difference between this rank's data-parallel training and the same
/// training on the whole batch in one process.
fn train(
    ctx: &Context,
    comm: &MpiComm,
    shape: &[usize],
    axis: usize,
    sizes: &[usize],
) -> Result<f64, Box<dyn std::error::Error>> {
    let config = BatchNorm {
        feature_axis: axis as isize,
        ..BatchNorm::pytorch()
    };
    let features = shape[axis];
    let start: usize = sizes[..comm.rank()].iter().sum();
    let mine = |a: &ArrayD<f32>| {
        a.slice_axis(Axis(0), Slice::from(start..start + sizes[comm.rank()]))
            .to_owned()
    };
    // The same data on every rank (the same seeds): no activations cross MPI.
    let mut rng = Rng::new(2026);
    let batches: Vec<(ArrayD<f32>, ArrayD<f32>)> = (0..STEPS)
        .map(|_| (rng.array(shape, 1.5, 2.0), rng.array(shape, 0.0, 1.0)))
        .collect();

    // The loss is the mean over the whole batch: dy = (y - target) / its size.
    let scale = 1.0 / x_len(shape) as f32;
    let mut whole = Layer::new(ctx, features)?;
    let mut part = Layer::new(ctx, features)?;
    let mut worst = 0f64;
    for (x, target) in &batches {
        // One process, the whole batch.
        let tx = Tensor::from_array(ctx, x)?;
        let (g, b) = whole.tensors(ctx)?;
        let fwd = config.forward(
            ctx,
            &tx,
            Some(&g),
            Some(&b),
            Some(&mut whole.state),
            BatchNormMode::Train,
        )?;
        let y = fwd.output.to_array(ctx)?;
        let dy = Tensor::from_array(ctx, &((&y - target) * scale))?;
        let grads = config.backward(ctx, &tx, &dy, &fwd)?;
        let dx_whole = grads.input.to_array(ctx)?;
        whole.sgd(&grads.gamma.to_array(ctx)?, &grads.beta.to_array(ctx)?);

        // This rank's slice, synchronized.
        let tx = Tensor::from_array(ctx, &mine(x))?;
        let (g, b) = part.tensors(ctx)?;
        let fwd = config.forward_sync(ctx, comm, &tx, Some(&g), Some(&b), Some(&mut part.state))?;
        let y_part = fwd.forward.output.to_array(ctx)?;
        let dy = Tensor::from_array(ctx, &((&y_part - &mine(target)) * scale))?;
        let grads = config.backward_sync(ctx, comm, &tx, &dy, &fwd)?;
        // Data parallelism: parameter gradients summed over ranks.
        let mut dgamma: Vec<f64> = grads
            .gamma
            .to_array(ctx)?
            .iter()
            .map(|&v| f64::from(v))
            .collect();
        let mut dbeta: Vec<f64> = grads
            .beta
            .to_array(ctx)?
            .iter()
            .map(|&v| f64::from(v))
            .collect();
        comm.all_reduce_sum(&mut dgamma)?;
        comm.all_reduce_sum(&mut dbeta)?;
        let as_f32 = |v: Vec<f64>| {
            ArrayD::from_shape_vec(vec![features], v.into_iter().map(|x| x as f32).collect())
        };
        part.sgd(&as_f32(dgamma)?, &as_f32(dbeta)?);

        let diff = |a: &ArrayD<f32>, b: &ArrayD<f32>| {
            a.iter()
                .zip(b.iter())
                .map(|(x, y)| f64::from((x - y).abs()))
                .fold(0f64, f64::max)
        };
        worst = worst
            .max(diff(&y_part, &mine(&y)))
            .max(diff(&grads.input.to_array(ctx)?, &mine(&dx_whole)))
            .max(diff(
                &part.state.running_mean.to_array(ctx)?,
                &whole.state.running_mean.to_array(ctx)?,
            ))
            .max(diff(
                &part.state.running_var.to_array(ctx)?,
                &whole.state.running_var.to_array(ctx)?,
            ))
            .max(diff(&part.gamma, &whole.gamma))
            .max(diff(&part.beta, &whole.beta));
    }
    Ok(worst)
}

fn x_len(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// gamma, beta (host, updated by SGD) and the running statistics.
struct Layer {
    gamma: ArrayD<f32>,
    beta: ArrayD<f32>,
    state: BatchNormState,
}

impl Layer {
    fn new(ctx: &Context, features: usize) -> wgnorm::Result<Self> {
        Ok(Layer {
            gamma: ArrayD::from_elem(vec![features], 1.0),
            beta: ArrayD::zeros(vec![features]),
            state: BatchNormState::new(ctx, features)?,
        })
    }

    fn tensors(&self, ctx: &Context) -> wgnorm::Result<(Tensor, Tensor)> {
        Ok((
            Tensor::from_array(ctx, &self.gamma)?,
            Tensor::from_array(ctx, &self.beta)?,
        ))
    }

    fn sgd(&mut self, dgamma: &ArrayD<f32>, dbeta: &ArrayD<f32>) {
        self.gamma = &self.gamma - &(dgamma * LR);
        self.beta = &self.beta - &(dbeta * LR);
    }
}

/// Rank 1 passes 7 features where the others pass 8: every rank must get an error.
fn bad_rank(ctx: &Context, comm: &MpiComm) -> Result<(), Box<dyn std::error::Error>> {
    let config = BatchNorm {
        center: false,
        scale: false,
        ..BatchNorm::pytorch()
    };
    let features = if comm.rank() == 1 { 7 } else { 8 };
    let x = Tensor::from_array(ctx, &Rng::new(1).array(&[4, features, 3], 0.0, 1.0))?;
    let mut state = BatchNormState::new(ctx, features)?;
    let refused = match config.forward_sync(ctx, comm, &x, None, None, Some(&mut state)) {
        Ok(_) => false,
        Err(e) => {
            println!("rank {}: refused: {e}", comm.rank());
            true
        }
    };
    let all = comm.all_gather(&[f64::from(u8::from(refused))])?;
    if comm.rank() == 0 {
        println!(
            "{} of {} ranks refused the step",
            all.iter().sum::<f64>(),
            all.len()
        );
    }
    if all.iter().any(|&r| r != 1.0) {
        return Err("a rank accepted a step another rank refused".into());
    }
    Ok(())
}
