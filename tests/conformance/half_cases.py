"""Half-precision golden cases from PyTorch on the CPU, for wgnorm's conformance runner.

    python tests/conformance/half_cases.py        # writes tests/conformance/half/*.safetensors
    cargo run --release --example conformance -- tests/conformance/half

The vendored cases (tests/conformance/cases, README's last section) hold one shape per
op in each half type. These add the layouts that take wgnorm's other paths, in
torch.float16 and torch.bfloat16: rows a multiple of 4 long, which the vec4 kernels
read in half precision themselves, and rows that are not, which run through f32
copies; batch norm with channels last (a multiple of 4 features: the channels-last
kernels) and NCHW.

Inputs are drawn in float32 by a seeded generator and cast with `.to(dtype)` (round to
nearest even), as a mixed-precision user holds them: weights, activations and
gradients in half precision; batch norm's gamma, beta and running statistics,
spectral norm's u and v and weight norm's g in float32, as PyTorch keeps them. The
expected values are PyTorch's float64 ops (`torch._weight_norm`, `F.batch_norm`,
autograd) on the exact half inputs, rounded once to the output's type: half for the
normalized output and the gradient of a half input, float32 for statistics, u, v,
sigma and the gradients of float32 parameters. Tolerances per tensor, as README's last
section gives them: half outputs rtol = the type's epsilon, atol = half an epsilon
times the largest magnitude; float32 outputs rtol = 1e-4, atol = 1e-5 times the largest
magnitude.

Needs torch and safetensors (PyPI). Written with torch 2.15.
"""
import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "half")
TYPES = {"f16": torch.float16, "bf16": torch.bfloat16}


def tolerances(expected):
    """Per-tensor `rtol.<name>` / `atol.<name>` (README's last section)."""
    meta = {}
    for name, t in expected.items():
        largest = t.abs().max().item() if t.numel() else 0.0
        if t.dtype in (torch.float16, torch.bfloat16):
            eps = torch.finfo(t.dtype).eps
            rtol, atol = eps, 0.5 * eps * largest
        else:
            rtol, atol = 1e-4, 1e-5 * largest
        meta[f"rtol.{name}"] = repr(float(rtol))
        meta[f"atol.{name}"] = repr(float(atol))
    return meta


def write(name, op, flavor, params, inputs, expected):
    tensors = {k: v.contiguous() for k, v in inputs.items()}
    tensors.update({f"expected.{k}": v.contiguous() for k, v in expected.items()})
    meta = {
        "op": op,
        "flavor": flavor,
        "params": json.dumps(params),
        "source": f"torch {torch.__version__} float64 on the exact half inputs, rounded once",
        "rtol": "0.0001",
        "atol": "0.0001",
    }
    meta.update(tolerances(expected))
    save_file(tensors, os.path.join(OUT, f"{name}.safetensors"), metadata=meta)


def randn(gen, *shape, scale=1.0, shift=0.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float32) * scale + shift


def weight_standardization(tag, dtype, shape, gen):
    eps = 1e-5
    w = randn(gen, *shape, shift=0.2).to(dtype)
    g = randn(gen, *shape).to(dtype)
    x = w.double().requires_grad_()
    rows = x.reshape(shape[0], -1)
    mean = rows.mean(dim=1, keepdim=True)
    var = rows.var(dim=1, unbiased=False, keepdim=True)
    out = ((rows - mean) / torch.sqrt(var + eps)).reshape(shape)
    out.backward(g.double())
    write(
        f"weight_standardization__torch_{tag}_{'x'.join(map(str, shape))}",
        "weight_standardization",
        "chainer",
        {"eps": eps, "variance": "biased", "dtype": tag},
        {"weight": w, "grad_output": g},
        {"output": out.detach().to(dtype), "grad_weight": x.grad.to(dtype)},
    )


def weight_norm(tag, dtype, shape, gen):
    v = randn(gen, *shape, shift=0.1).to(dtype)
    g_shape = [shape[0]] + [1] * (len(shape) - 1)
    g = randn(gen, *g_shape, scale=0.5, shift=1.0)
    grad = randn(gen, *shape).to(dtype)
    g64 = g.double().requires_grad_()
    v64 = v.double().requires_grad_()
    out = torch._weight_norm(v64, g64, 0)
    out.backward(grad.double())
    write(
        f"weight_norm__torch_{tag}_{'x'.join(map(str, shape))}_dim0",
        "weight_norm",
        "pytorch",
        {"dim": 0, "dtype": tag},
        {"g": g, "v": v, "grad_output": grad},
        {
            "output": out.detach().to(dtype),
            "grad_g": g64.grad.float(),
            "grad_v": v64.grad.to(dtype),
        },
    )


def spectral_norm(tag, dtype, shape, gen):
    eps = 1e-12
    w = randn(gen, *shape).to(dtype)
    grad = randn(gen, *shape).to(dtype)
    rows = shape[0]
    cols = w.numel() // rows
    u = F.normalize(randn(gen, rows), dim=0, eps=eps)
    v = F.normalize(randn(gen, cols), dim=0, eps=eps)
    m = w.double().reshape(rows, cols)
    # PyTorch's power iteration, one step in training: u = normalize(M v), v = normalize(M^T u).
    u64 = F.normalize(m @ v.double(), dim=0, eps=eps)
    v64 = F.normalize(m.t() @ u64, dim=0, eps=eps)
    x = w.double().requires_grad_()
    sigma = torch.dot(u64, x.reshape(rows, cols) @ v64)
    out = x / sigma
    out.backward(grad.double())
    write(
        f"spectral_norm__torch_{tag}_{'x'.join(map(str, shape))}_ax0",
        "spectral_norm",
        "pytorch",
        {"axis": 0, "eps": eps, "n_power_iterations": 1, "training": True, "dtype": tag},
        {"weight": w, "u": u, "v": v, "grad_output": grad},
        {
            "output": out.detach().to(dtype),
            "u": u64.float(),
            "v": v64.float(),
            "sigma": sigma.detach().float().reshape(1),
            "grad_weight": x.grad.to(dtype),
        },
    )


def batch_norm(tag, dtype, shape, axis, training, gen):
    eps, momentum = 1e-5, 0.1
    features = shape[axis]
    x = randn(gen, *shape, scale=2.0, shift=0.5).to(dtype)
    dy = randn(gen, *shape).to(dtype)
    gamma = randn(gen, features, scale=0.3, shift=1.0)
    beta = randn(gen, features, scale=0.5)
    rm = randn(gen, features, shift=0.5)
    rv = torch.rand(features, generator=gen) + 1.0
    # F.batch_norm wants the features on axis 1.
    order = [0, axis] + [d for d in range(1, len(shape)) if d != axis]
    back = [order.index(d) for d in range(len(shape))]
    x64 = x.double().permute(order).contiguous().requires_grad_()
    g64 = gamma.double().requires_grad_()
    b64 = beta.double().requires_grad_()
    rm64, rv64 = rm.double().clone(), rv.double().clone()
    out = F.batch_norm(x64, rm64, rv64, g64, b64, training=training, momentum=momentum, eps=eps)
    out.backward(dy.double().permute(order))
    mode = "train" if training else "eval"
    write(
        f"batch_norm__torch_{tag}_{'x'.join(map(str, shape))}_ax{axis}_{mode}",
        "batch_norm",
        "pytorch",
        {
            "eps": eps,
            "feature_axis": axis,
            "momentum": momentum,
            "momentum_weights": "batch",
            "running_var": "unbiased",
            "training": training,
            "dtype": tag,
        },
        {
            "input": x,
            "gamma": gamma,
            "beta": beta,
            "running_mean": rm,
            "running_var": rv,
            "grad_output": dy,
        },
        {
            "output": out.detach().permute(back).to(dtype),
            "running_mean": rm64.float(),
            "running_var": rv64.float(),
            "grad_input": x64.grad.permute(back).to(dtype),
            "grad_gamma": g64.grad.float(),
            "grad_beta": b64.grad.float(),
        },
    )


def main():
    os.makedirs(OUT, exist_ok=True)
    for tag, dtype in TYPES.items():
        gen = torch.Generator().manual_seed(20261122)
        # Rows a multiple of 4 long (vec4 kernels on half data), then not (f32 copies).
        weight_standardization(tag, dtype, [16, 8, 3, 3], gen)
        weight_standardization(tag, dtype, [12, 5, 3, 3], gen)
        weight_norm(tag, dtype, [24, 36], gen)
        weight_norm(tag, dtype, [10, 7, 3], gen)
        spectral_norm(tag, dtype, [16, 24], gen)
        spectral_norm(tag, dtype, [9, 7, 3, 3], gen)
        # Channels last with 16 features (channels-last kernels), NCHW with rows of 16.
        batch_norm(tag, dtype, [4, 5, 6, 16], 3, True, gen)
        batch_norm(tag, dtype, [4, 5, 6, 16], 3, False, gen)
        batch_norm(tag, dtype, [4, 8, 4, 4], 1, True, gen)
    print(f"wrote {len(os.listdir(OUT))} cases to {OUT}")


if __name__ == "__main__":
    main()
