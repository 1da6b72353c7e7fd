"""Checkpoints written by PyTorch for wgnorm's state tests (tests/checkpoints.rs).

    python tests/checkpoints/pytorch_checkpoints.py make            # writes the files here
    python tests/checkpoints/pytorch_checkpoints.py check [--expected API] FILE...

`make`: two copies of one small model, one with PyTorch's old hook API
(`torch.nn.utils.spectral_norm` / `weight_norm`), one with the parametrizations PyTorch
documents today (`torch.nn.utils.parametrizations.*`): spectral norm on a conv (axis 0)
and on a deconv (axis 1), weight norm on a linear (dim 0), BatchNorm2d, all trained for
three SGD steps. Each state_dict is saved with safetensors (`<api>.safetensors`, f32;
`<api>_bf16.safetensors` and `<api>_f16.safetensors`, the floating entries cast as a
half-precision checkpoint is, num_batches_tracked int64), with the evaluation weights
and a batch-norm input and evaluation output in `<api>_expected.safetensors` (and
`<api>_<half>_expected.safetensors`: PyTorch's on the half checkpoint loaded into an
f32 model).

`make` also writes conformance cases (op `checkpoint`) for wgnorm's runner into
`cases/`: `cargo run --release --example conformance -- tests/checkpoints/cases`.

`check`: loads each FILE (a wgnorm save of the same model, under either API's names,
see tests/checkpoints.rs) into a fresh PyTorch model of that API with
`load_state_dict(strict=False)` (wgnorm saves no conv bias), and compares its evaluation
weights and batch-norm output with `<API>_expected.safetensors` (1e-6), API the file's
own or the one `--expected` names (the checkpoint wgnorm loaded before saving:
`--expected hooks` for tests/checkpoints.rs's `target/checkpoints/wgnorm_*.safetensors`).

Needs torch and safetensors (PyPI). Written with torch 2.x.
"""
import os
import sys

import torch
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
P = torch.nn.utils.parametrizations


def model(api):
    torch.manual_seed(0)
    m = torch.nn.Module()
    m.conv = torch.nn.Conv2d(4, 6, 3)
    m.deconv = torch.nn.ConvTranspose2d(6, 3, 3)
    m.fc = torch.nn.Linear(12, 5)
    m.bn = torch.nn.BatchNorm2d(6)
    if api == "hooks":
        torch.nn.utils.spectral_norm(m.conv)
        torch.nn.utils.spectral_norm(m.deconv)
        torch.nn.utils.weight_norm(m.fc, dim=0)
    else:
        P.spectral_norm(m.conv)
        P.spectral_norm(m.deconv)
        P.weight_norm(m.fc, dim=0)
    return m


def forward(m, x, z):
    h = m.bn(m.conv(x))
    y = m.deconv(torch.relu(h))
    return y.square().mean() + m.fc(z).square().mean()


def expected(m):
    m.eval()
    torch.manual_seed(7)
    x = torch.randn(3, 6, 5, 4)
    with torch.no_grad():
        # The old hook API computes `weight` in a forward pre-hook: run one in eval
        # mode (no power iteration) so that it reflects the last optimizer step.
        m.conv(torch.zeros(1, 4, 3, 3))
        m.deconv(torch.zeros(1, 6, 1, 1))
        m.fc(torch.zeros(1, 12))
        return {
            "conv.weight": m.conv.weight.detach().clone(),
            "deconv.weight": m.deconv.weight.detach().clone(),
            "fc.weight": m.fc.weight.detach().clone(),
            "bn.input": x,
            "bn.output": m.bn(x),
        }


def write_case(api, sd, want):
    """A conformance case (op `checkpoint`) for wgnorm's runner: the state dict as f32
    inputs (num_batches_tracked as a number), `bn.input`, and the expected evaluation
    weights and batch-norm output (tests/checkpoints/cases)."""
    import json
    tensors = {k: v.to(torch.float32).contiguous() for k, v in sd.items()}
    tensors["bn.input"] = want["bn.input"]
    for k in ["conv.weight", "deconv.weight", "fc.weight", "bn.output"]:
        tensors[f"expected.{k}"] = want[k]
    meta = {
        "op": "checkpoint",
        "flavor": "pytorch",
        "source": f"PyTorch {torch.__version__}, {api} API, three SGD steps "
                  "(tests/checkpoints/pytorch_checkpoints.py)",
        "params": json.dumps({"api": api}),
        "rtol": "1e-6",
        "atol": "1e-6",
    }
    os.makedirs(os.path.join(HERE, "cases"), exist_ok=True)
    save_file(tensors, os.path.join(HERE, "cases", f"checkpoint__pytorch_{api}.safetensors"), metadata=meta)


def make():
    for api in ["hooks", "parametrizations"]:
        m = model(api)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        torch.manual_seed(1)
        for _ in range(3):
            x = torch.randn(8, 4, 7, 7)
            z = torch.randn(8, 12)
            opt.zero_grad()
            forward(m, x, z).backward()
            opt.step()
        sd = {k: v.detach().contiguous() for k, v in m.state_dict().items()}
        save_file(sd, os.path.join(HERE, f"{api}.safetensors"))
        save_file(expected(m), os.path.join(HERE, f"{api}_expected.safetensors"))
        write_case(api, sd, expected(m))
        for name, dtype in [("bf16", torch.bfloat16), ("f16", torch.float16)]:
            half = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
            save_file(half, os.path.join(HERE, f"{api}_{name}.safetensors"))
            # What PyTorch makes of the half checkpoint, loaded into an f32 model.
            h = model(api)
            h.load_state_dict({k: v.to(sd[k].dtype) for k, v in half.items()})
            save_file(expected(h), os.path.join(HERE, f"{api}_{name}_expected.safetensors"))
        print(api, sorted(sd))


def check(args):
    source = None
    if args[:1] == ["--expected"]:
        source, args = args[1], args[2:]
    paths = args
    worst = 0.0
    for path in paths:
        sd = load_file(path)
        api = "parametrizations" if any("parametrizations" in k for k in sd) else "hooks"
        m = model(api)
        missing, unexpected = m.load_state_dict(sd, strict=False)
        # wgnorm's weights hold no bias; everything else must be there.
        assert all(k.endswith(".bias") and not k.startswith("bn.") for k in missing), missing
        assert not unexpected, unexpected
        got = expected(m)
        want = load_file(os.path.join(HERE, f"{source or api}_expected.safetensors"))
        for k in ["conv.weight", "deconv.weight", "fc.weight", "bn.output"]:
            d = (got[k] - want[k]).abs().max().item()
            worst = max(worst, d)
            print(f"{os.path.basename(path)} ({api}) {k}: max difference {d:.2e}")
    assert worst <= 1e-6, worst
    print(f"all loaded in PyTorch {torch.__version__}; worst difference {worst:.2e}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["make"]:
        make()
    elif sys.argv[1:2] == ["check"]:
        check(sys.argv[2:])
    else:
        sys.exit(__doc__)
