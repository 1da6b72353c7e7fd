//! A small burn conv net with spectral-normalized convolutions and batch norm, trained
//! for a few steps on the default adapter twice: through wgnorm-burn (wgnorm's kernels
//! on burn's buffers) and built from burn's own ops (burn's `BatchNorm`, spectral norm
//! composed from burn tensor ops as the same PyTorch parametrization). Prints the loss
//! of both and the time per step.
//!
//! ```text
//! cargo run --release --manifest-path burn/Cargo.toml --example train -- [--steps 20] [--batch 16] [--size 32]
//! ```
//!
//! The data is one fixed random batch (no download): the loss falls as the net learns
//! it by heart. Each step ends by reading the loss back, so a step's time is the whole
//! of its GPU work.

use std::time::{Duration, Instant};

use burn::module::{Module, Param, Reparameterization, Reparameterizer, RunningState};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::loss::CrossEntropyLoss;
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Distribution, Int, Tensor};
use wgnorm_burn::Shared;

/// A normalization over axis 1 of a 4-D activation.
trait Norm2d: Module + burn::module::ModuleDisplay {
    fn apply(&self, x: Tensor<4>) -> Tensor<4>;
}

impl Norm2d for burn::nn::BatchNorm {
    fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        self.forward(x)
    }
}

impl Norm2d for wgnorm_burn::BatchNorm {
    fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        self.forward(x)
    }
}

#[derive(Module, Debug)]
struct Net<N: Norm2d> {
    conv1: Conv2d,
    bn1: N,
    conv2: Conv2d,
    bn2: N,
    conv3: Conv2d,
    bn3: N,
    head: Linear,
}

impl<N: Norm2d> Net<N> {
    fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let x = relu(self.bn1.apply(self.conv1.forward(x)));
        let x = relu(self.bn2.apply(self.conv2.forward(x)));
        let x = relu(self.bn3.apply(self.conv3.forward(x)));
        let [n, c, _, _] = x.dims();
        self.head.forward(x.mean_dim(3).mean_dim(2).reshape([n, c]))
    }
}

/// The convolutions and head, the same initial values for both nets.
fn layers(device: &Device) -> (Conv2d, Conv2d, Conv2d, Linear) {
    let conv = |i, o, stride| {
        Conv2dConfig::new([i, o], [3, 3])
            .with_stride([stride, stride])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init(device)
    };
    (
        conv(3, 32, 1),
        conv(32, 64, 2),
        conv(64, 64, 2),
        LinearConfig::new(64, 10).init(device),
    )
}

// ---------------------------------------------------------------------------------
// Spectral norm from burn's own ops: PyTorch's parametrization, as a burn
// reparameterization (what a burn user writes today without wgnorm).

#[derive(Module, Debug)]
struct BurnSpectralNorm {
    u: RunningState<Tensor<1>>,
    v: RunningState<Tensor<1>>,
}

fn normalize(t: Tensor<1>) -> Tensor<1> {
    let n = t.clone().powi_scalar(2).sum().sqrt().clamp_min(1e-12);
    t / n
}

impl Reparameterization for BurnSpectralNorm {
    const NAME: &'static str = "burn_spectral_norm";

    fn apply<const D: usize>(&self, base: Tensor<D>) -> Tensor<D> {
        let dims = base.dims();
        let (rows, cols) = (dims[0], dims.iter().skip(1).product::<usize>());
        let w = base.clone().reshape([rows, cols]);
        let (mut u, mut v) = (self.u.value_sync(), self.v.value_sync());
        if base.device().is_autodiff() {
            // One power iteration, outside the graph (PyTorch's torch.no_grad()).
            let wd = w.clone().detach();
            u = normalize(wd.clone().matmul(v.reshape([cols, 1])).reshape([rows]));
            v = normalize(
                wd.transpose()
                    .matmul(u.clone().reshape([rows, 1]))
                    .reshape([cols]),
            );
            self.u.update(u.clone());
            self.v.update(v.clone());
        }
        let sigma = (u * w.matmul(v.reshape([cols, 1])).reshape([rows])).sum();
        base / sigma.reshape([1; D])
    }
}

struct BurnSpectralNormWeights;

impl Reparameterizer for BurnSpectralNormWeights {
    type Reparam = BurnSpectralNorm;

    fn reparameterize<const D: usize>(
        &mut self,
        _path: &str,
        param: Param<Tensor<D>>,
    ) -> (Param<Tensor<D>>, Option<BurnSpectralNorm>) {
        if D != 4 {
            return (param, None);
        }
        // PyTorch's start: normalized normal vectors, then 15 power iterations.
        let w = param.val();
        let dims = w.dims();
        let (rows, cols) = (dims[0], dims.iter().skip(1).product::<usize>());
        let w = w.reshape([rows, cols]).detach();
        let dev = w.device();
        let mut u = normalize(Tensor::random([rows], Distribution::Normal(0.0, 1.0), &dev));
        let mut v = normalize(Tensor::random([cols], Distribution::Normal(0.0, 1.0), &dev));
        for _ in 0..15 {
            u = normalize(w.clone().matmul(v.reshape([cols, 1])).reshape([rows]));
            v = normalize(
                w.clone()
                    .transpose()
                    .matmul(u.clone().reshape([rows, 1]))
                    .reshape([cols]),
            );
        }
        let sn = BurnSpectralNorm {
            u: RunningState::new(u),
            v: RunningState::new(v),
        };
        (param, Some(sn))
    }
}

// ---------------------------------------------------------------------------------

struct Run {
    losses: Vec<f32>,
    times: Vec<Duration>,
}

fn train<N: Norm2d>(mut net: Net<N>, x: &Tensor<4>, labels: &Tensor<1, Int>, steps: usize) -> Run {
    let mut optim = SgdConfig::new().init();
    let loss_fn = CrossEntropyLoss::new(None, &x.device());
    let (mut losses, mut times) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        let start = Instant::now();
        let logits = net.forward(x.clone());
        let loss = loss_fn.forward(logits, labels.clone());
        let grads = GradientsParams::from_grads(loss.backward(), &net);
        net = optim.step(0.05, net, grads);
        // Reading the loss waits for the whole step.
        losses.push(loss.into_scalar::<f32>());
        times.push(start.elapsed());
    }
    Run { losses, times }
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} takes a number"))
        })
        .unwrap_or(default)
}

fn median_ms(times: &[Duration]) -> f64 {
    // The first steps compile burn's and wgnorm's kernels: left out.
    let mut t: Vec<f64> = times
        .iter()
        .skip(times.len().min(3))
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    t.sort_by(f64::total_cmp);
    t.get(t.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (steps, batch, size) = (arg("--steps", 20), arg("--batch", 16), arg("--size", 32));
    let shared = Shared::of(&Default::default())?;
    let info = shared.ctx.info();
    println!(
        "adapter: {} ({:?}, {})",
        info.name, info.backend, info.driver
    );
    let dev = shared.burn_device().autodiff();
    dev.seed(1);

    let x = Tensor::<4>::random([batch, 3, size, size], Distribution::Normal(0.0, 1.0), &dev);
    let labels = Tensor::<1, Int>::random([batch], Distribution::Uniform(0.0, 10.0), &dev);
    let (c1, c2, c3, head) = layers(&dev);
    let bn = |n| wgnorm_burn::BatchNormConfig::new(n).init(&dev);

    let ours = Net {
        conv1: c1.clone(),
        bn1: bn(32)?,
        conv2: c2.clone(),
        bn2: bn(64)?,
        conv3: c3.clone(),
        bn3: bn(64)?,
        head: head.clone(),
    };
    let ours =
        wgnorm_burn::with_spectral_norm(ours, wgnorm::SpectralNorm::pytorch(), 1, |_, d| {
            d.len() == 4
        })?;
    let burn_bn = |n| burn::nn::BatchNormConfig::new(n).init(&dev);
    let theirs = Net {
        conv1: c1,
        bn1: burn_bn(32),
        conv2: c2,
        bn2: burn_bn(64),
        conv3: c3,
        bn3: burn_bn(64),
        head,
    }
    .apply_reparameterization(BurnSpectralNormWeights);

    let a = train(ours, &x, &labels, steps);
    let b = train(theirs, &x, &labels, steps);
    println!("step  loss (wgnorm-burn)  loss (burn ops)");
    for (i, (la, lb)) in a.losses.iter().zip(&b.losses).enumerate() {
        println!("{i:4}  {la:18.6}  {lb:15.6}");
    }
    let (ta, tb) = (median_ms(&a.times), median_ms(&b.times));
    println!(
        "time per step (median after the first 3 steps, batch {batch}, {size}x{size}): \
         wgnorm-burn {ta:.2} ms, burn ops {tb:.2} ms ({:.2}x)",
        tb / ta
    );
    Ok(())
}
