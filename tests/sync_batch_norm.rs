//! Synchronized batch norm over threads, each rank with its own context: forward,
//! running averages and backward against single-device batch norm on the concatenated
//! batch (tolerance `SYNC_TOL`), with even, uneven and empty slices, NCHW and NHWC.

mod common;

use std::time::Duration;

use common::{assert_close, ctx, Rng};
use ndarray::{concatenate, ArrayD, Axis, Slice};
use wgnorm::{
    BatchNorm, BatchNormMode, BatchNormState, Collective, Context, Error, Tensor, ThreadComm,
    ThreadGroup,
};

/// What the issue asks of the distributed result against the single-device one (the
/// sums are merely added in another order).
const SYNC_TOL: f32 = 1e-5;

/// One rank's results: output, running mean, running var, grad input, gamma, beta.
type RankResult = [ArrayD<f32>; 6];

fn vector(ctx: &Context, v: &[f32]) -> Tensor {
    Tensor::from_slice(ctx, &[v.len()], v).unwrap()
}

/// Two training steps (the second checks the running update weight) on one rank's
/// slices; returns the second step's results.
fn rank_step(
    comm: &dyn Collective,
    config: &BatchNorm,
    xs: &[ArrayD<f32>],
    dy: &ArrayD<f32>,
    gamma: &[f32],
    beta: &[f32],
) -> wgnorm::Result<RankResult> {
    let ctx = ctx();
    let (g, b) = (vector(&ctx, gamma), vector(&ctx, beta));
    let mut state = BatchNormState::new(&ctx, gamma.len())?;
    let mut last = None;
    for x in xs {
        let tx = Tensor::from_array(&ctx, x)?;
        let fwd = config.forward_sync(&ctx, comm, &tx, Some(&g), Some(&b), Some(&mut state))?;
        let grads = config.backward_sync(&ctx, comm, &tx, &Tensor::from_array(&ctx, dy)?, &fwd)?;
        last = Some((fwd, grads));
    }
    let (fwd, grads) = last.expect("at least one step");
    let got = ctx.read_all(&[
        &fwd.forward.output,
        &state.running_mean,
        &state.running_var,
        &grads.input,
        &grads.gamma,
        &grads.beta,
    ])?;
    assert_eq!(state.num_updates, xs.len() as u64);
    Ok(got.try_into().expect("six tensors"))
}

/// Splits `a` along axis 0 into slices of `sizes`.
fn split(a: &ArrayD<f32>, sizes: &[usize]) -> Vec<ArrayD<f32>> {
    let mut start = 0;
    sizes
        .iter()
        .map(|&n| {
            let s = a
                .slice_axis(Axis(0), Slice::from(start..start + n))
                .to_owned();
            start += n;
            s
        })
        .collect()
}

fn check(config: &BatchNorm, shape: &[usize], sizes: &[usize], seed: u64) {
    assert_eq!(sizes.iter().sum::<usize>(), shape[0]);
    let what = format!("{shape:?} split {sizes:?}, axis {}", config.feature_axis);
    let mut rng = Rng::new(seed);
    let steps: Vec<ArrayD<f32>> = (0..2).map(|_| rng.array(shape, 2.0, 3.0)).collect();
    let dy = rng.array(shape, 0.0, 1.0);
    let features = shape[config.resolved_axis(shape.len()).unwrap()];
    let gamma: Vec<f32> = (0..features).map(|c| 1.0 + 0.1 * c as f32).collect();
    let beta: Vec<f32> = (0..features).map(|c| 0.05 * c as f32).collect();

    // Single device, the whole batch.
    let ctx = ctx();
    let (g, b) = (vector(&ctx, &gamma), vector(&ctx, &beta));
    let mut state = BatchNormState::new(&ctx, features).unwrap();
    let mut last = None;
    for x in &steps {
        let tx = Tensor::from_array(&ctx, x).unwrap();
        let fwd = config
            .forward(
                &ctx,
                &tx,
                Some(&g),
                Some(&b),
                Some(&mut state),
                BatchNormMode::Train,
            )
            .unwrap();
        let grads = config
            .backward(&ctx, &tx, &Tensor::from_array(&ctx, &dy).unwrap(), &fwd)
            .unwrap();
        last = Some((fwd, grads));
    }
    let (fwd, grads) = last.unwrap();
    let want = ctx
        .read_all(&[
            &fwd.output,
            &state.running_mean,
            &state.running_var,
            &grads.input,
            &grads.gamma,
            &grads.beta,
        ])
        .unwrap();

    // One thread per rank.
    let comms = ThreadGroup::new(sizes.len());
    let results: Vec<RankResult> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(r, comm)| {
                let xs: Vec<ArrayD<f32>> =
                    steps.iter().map(|x| split(x, sizes)[r].clone()).collect();
                let dy = split(&dy, sizes)[r].clone();
                let (gamma, beta) = (&gamma, &beta);
                s.spawn(move || {
                    let comm = comm.with_timeout(Duration::from_secs(120));
                    rank_step(&comm, config, &xs, &dy, gamma, beta).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let cat = |k: usize| {
        let views: Vec<_> = results.iter().map(|r| r[k].view()).collect();
        concatenate(Axis(0), &views).unwrap()
    };
    assert_close(
        &format!("output {what}"),
        &cat(0),
        &want[0],
        SYNC_TOL,
        SYNC_TOL,
    );
    assert_close(
        &format!("grad input {what}"),
        &cat(3),
        &want[3],
        SYNC_TOL,
        SYNC_TOL,
    );
    for (r, res) in results.iter().enumerate() {
        // Every rank's running averages are the single device's, and the same bits.
        assert_close(
            &format!("running mean {what} rank {r}"),
            &res[1],
            &want[1],
            SYNC_TOL,
            SYNC_TOL,
        );
        assert_close(
            &format!("running var {what} rank {r}"),
            &res[2],
            &want[2],
            SYNC_TOL,
            SYNC_TOL,
        );
        assert_eq!(
            res[1], results[0][1],
            "{what}: running mean of rank {r} differs from rank 0"
        );
        assert_eq!(
            res[2], results[0][2],
            "{what}: running var of rank {r} differs from rank 0"
        );
    }
    // gamma and beta gradients: each rank's own, summed over ranks.
    for (k, name) in [(4, "grad gamma"), (5, "grad beta")] {
        let sum = results
            .iter()
            .fold(ArrayD::zeros(want[k].shape()), |acc, r| acc + &r[k]);
        let scale = want[k].iter().fold(1f32, |m, v| m.max(v.abs()));
        assert_close(
            &format!("{name} {what}"),
            &sum,
            &want[k],
            SYNC_TOL,
            SYNC_TOL * scale,
        );
    }
}

#[test]
fn two_and_four_ranks_match_one_device_on_the_concatenated_batch() {
    let nchw = BatchNorm::pytorch();
    let nhwc = BatchNorm {
        feature_axis: 3,
        ..BatchNorm::pytorch()
    };
    check(&nchw, &[8, 5, 6, 7], &[4, 4], 1);
    check(&nhwc, &[8, 6, 7, 8], &[4, 4], 2);
    check(&nchw, &[12, 5, 6, 7], &[3, 3, 3, 3], 3);
    check(&nhwc, &[12, 6, 7, 8], &[3, 3, 3, 3], 4);
}

#[test]
fn uneven_and_empty_slices_match_one_device() {
    let nchw = BatchNorm::pytorch();
    let nhwc = BatchNorm {
        feature_axis: 3,
        ..BatchNorm::keras()
    };
    check(&nchw, &[10, 5, 6, 7], &[1, 9], 5);
    check(&nhwc, &[10, 6, 7, 8], &[3, 0, 5, 2], 6);
    check(&BatchNorm::chainer(), &[9, 4], &[0, 7, 2, 0], 7);
}

/// A rank whose input is refused (here: a wrong feature count) makes every rank
/// return an error, promptly; nobody waits for the collective timeout.
#[test]
fn a_bad_input_on_one_rank_is_an_error_on_every_rank() {
    let config = BatchNorm {
        center: false,
        scale: false,
        ..BatchNorm::pytorch()
    };
    let comms = ThreadGroup::new(3);
    let start = std::time::Instant::now();
    let results: Vec<wgnorm::Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm: ThreadComm| {
                let config = &config;
                s.spawn(move || {
                    let comm = comm.with_timeout(Duration::from_secs(30));
                    let ctx = ctx();
                    let features = if comm.rank() == 1 { 4 } else { 3 };
                    let x = Rng::new(1).array(&[5, features, 2], 0.0, 1.0);
                    let mut state = BatchNormState::new(&ctx, features)?;
                    let tx = Tensor::from_array(&ctx, &x)?;
                    config
                        .forward_sync(&ctx, &comm, &tx, None, None, Some(&mut state))
                        .map(drop)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (r, res) in results.iter().enumerate() {
        let e = res.as_ref().expect_err("every rank fails");
        assert!(matches!(e, Error::InvalidInput { .. }), "rank {r}: {e}");
        assert!(e.to_string().contains("features"), "rank {r}: {e}");
    }
    assert!(start.elapsed() < Duration::from_secs(20));
    // A refused config (here: a state missing on rank 0) likewise.
    let comms = ThreadGroup::new(2);
    let results: Vec<bool> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let config = BatchNorm::pytorch();
                s.spawn(move || {
                    let ctx = ctx();
                    let x =
                        Tensor::from_array(&ctx, &Rng::new(2).array(&[4, 3], 0.0, 1.0)).unwrap();
                    let (g, b) = (vector(&ctx, &[1.0; 3]), vector(&ctx, &[0.0; 3]));
                    let mut state = BatchNormState::new(&ctx, 3).unwrap();
                    let state = (comm.rank() != 0).then_some(&mut state);
                    config
                        .forward_sync(&ctx, &comm, &x, Some(&g), Some(&b), state)
                        .is_err()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results, vec![true, true]);
}
