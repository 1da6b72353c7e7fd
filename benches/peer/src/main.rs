//! wgnorm against burn's wgpu backend on the same adapter, in the same run: the report
//! of `examples/report.rs` with a column for burn.
//!
//! Burn runs batch norm as its users do (`burn::nn::BatchNorm`; training forward on an
//! autodiff device, evaluation forward on a plain one; NHWC permuted to NCHW and back,
//! as burn's layer wants channels on axis 1), and spectral and weight normalization
//! composed from burn tensor ops. Times are end to end against wgnorm's end to end:
//! the op on every tensor of the workload, then `device.sync()`.
//!
//! ```text
//! cargo run --release --manifest-path benches/peer/Cargo.toml                # short
//! cargo run --release --manifest-path benches/peer/Cargo.toml -- --out benches/plots
//! cargo run --release --manifest-path benches/peer/Cargo.toml -- --only bn_  # one family
//! ```
//!
//! Burn picks its adapter with wgpu's default heuristics (`CUBECL_WGPU_DEFAULT_DEVICE`
//! overrides): on a machine with one adapter (lavapipe on CI-like machines, one GPU on
//! the device machines) it is the one wgnorm's `Context::headless` picks.

use std::time::Instant;

use burn::nn::{BatchNorm, BatchNormConfig};
use burn::prelude::*;
use wgnorm::bench::{self, Case, Peer};

/// Chainer's eps, as wgnorm's Spectral Normalization default.
const SN_EPS: f32 = 1e-6;

struct Burn {
    plain: Device,
    autodiff: Device,
}

/// The rows x cols matrix of a weight (rows = the first axis), as burn users write it.
fn matrix(shape: &[usize]) -> [usize; 2] {
    [shape[0], shape[1..].iter().product()]
}

fn upload2(data: &[f32], shape: [usize; 2], device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(data.to_vec(), shape), device)
}

/// x / (||x|| + eps), Chainer's normalization.
fn l2normalize(x: Tensor<2>) -> Tensor<2> {
    let norm = x.clone().square().sum().sqrt().add_scalar(SN_EPS);
    x.div(norm.unsqueeze::<2>())
}

impl Burn {
    fn new() -> Self {
        let plain = Device::wgpu(DeviceKind::DefaultDevice);
        Burn {
            autodiff: plain.clone().autodiff(),
            plain,
        }
    }

    /// Median seconds of `samples` runs of `f` (after two warm-ups: burn autotunes its
    /// kernels on first use), each followed by `device.sync()`.
    fn time(&self, device: &Device, samples: usize, mut f: impl FnMut()) -> f64 {
        let mut times = Vec::new();
        for i in 0..samples + 2 {
            let start = Instant::now();
            f();
            device.sync().expect("burn sync");
            if i >= 2 {
                times.push(start.elapsed().as_secs_f64());
            }
        }
        bench::median(&times)
    }
}

impl Peer for Burn {
    fn name(&self) -> String {
        "burn 0.22 (wgpu)".into()
    }

    fn seconds(&mut self, case: &Case, samples: usize) -> Option<f64> {
        let shapes = &case.workload.shapes;
        let hosts: Vec<_> = (0..shapes.len()).map(|i| case.workload.input(i)).collect();
        let flat = |i: usize| hosts[i].as_slice().expect("standard layout");
        // The suite's ops by name (`wgnorm::bench::Op::all`); the others have no burn
        // version here.
        let op = case.op.name();
        match op {
            "bn_forward_train" | "bn_forward_eval" => {
                let device = if op == "bn_forward_train" {
                    &self.autodiff
                } else {
                    &self.plain
                };
                let nhwc = case.workload.feature_axis == 3;
                let s = &shapes[0];
                let x: Tensor<4> = Tensor::from_data(
                    TensorData::new(flat(0).to_vec(), [s[0], s[1], s[2], s[3]]),
                    device,
                );
                let bn: BatchNorm =
                    BatchNormConfig::new(s[case.workload.feature_axis]).init(device);
                Some(self.time(device, samples, || {
                    let y = if nhwc {
                        bn.forward(x.clone().permute([0, 3, 1, 2]))
                            .permute([0, 2, 3, 1])
                    } else {
                        bn.forward(x.clone())
                    };
                    drop(y);
                }))
            }
            "sn_forward_train" | "sn_forward_eval" => {
                let device = &self.plain;
                let ws: Vec<Tensor<2>> = (0..shapes.len())
                    .map(|i| upload2(flat(i), matrix(&shapes[i]), device))
                    .collect();
                let mut us: Vec<Tensor<2>> = ws
                    .iter()
                    .map(|w| l2normalize(Tensor::ones([1, w.dims()[0]], device)))
                    .collect();
                let mut vs: Vec<Tensor<2>> = ws
                    .iter()
                    .map(|w| l2normalize(Tensor::ones([1, w.dims()[1]], device)))
                    .collect();
                let train = op == "sn_forward_train";
                Some(self.time(device, samples, || {
                    for ((w, u), v) in ws.iter().zip(us.iter_mut()).zip(vs.iter_mut()) {
                        if train {
                            // One power iteration, Chainer's order: v from u, then u.
                            *v = l2normalize(u.clone().matmul(w.clone()));
                            *u = l2normalize(v.clone().matmul(w.clone().transpose()));
                        }
                        // sigma = u^T W v
                        let sigma = u.clone().matmul(w.clone()).mul(v.clone()).sum();
                        drop(w.clone().div(sigma.unsqueeze::<2>()));
                    }
                }))
            }
            "wn_forward" => {
                let device = &self.plain;
                let vs: Vec<Tensor<2>> = (0..shapes.len())
                    .map(|i| upload2(flat(i), matrix(&shapes[i]), device))
                    .collect();
                let gs: Vec<Tensor<2>> = vs
                    .iter()
                    .map(|v| Tensor::ones([v.dims()[0], 1], device))
                    .collect();
                Some(self.time(device, samples, || {
                    for (g, v) in gs.iter().zip(&vs) {
                        // PyTorch's weight_norm(dim=0): g * v / ||v|| over every other axis.
                        let norm = v.clone().square().sum_dim(1).sqrt();
                        drop(v.clone().mul(g.clone().div(norm)));
                    }
                }))
            }
            _ => None,
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    bench::report_main(Some(&mut Burn::new()))
}
