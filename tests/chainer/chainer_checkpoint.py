"""A checkpoint written by Chainer's `serializers.save_npz`, for tests/checkpoints.rs.

    python tests/chainer/chainer_checkpoint.py make           # writes chainer.npz and chainer_expected.npz here
    python tests/chainer/chainer_checkpoint.py check FILE     # a wgnorm save, loaded in Chainer

`make`: a chain with `SpectralNormalization` on a conv (use_gamma) and on a deconv
(Chainer picks axis 1), `WeightStandardization` on a linear, and
`BatchNormalization(6)`, trained for three SGD steps, saved with `save_npz` (Chainer's
names: `conv/W`, `conv/W_u`, `conv/gamma`, `bn/gamma`, `bn/beta`, `bn/avg_mean`,
`bn/avg_var`, `bn/N`; Chainer does not persist spectral norm's `v`). Its evaluation
weights (the hooks' normalized weights with `train` off, which for spectral norm still
runs one power iteration from the stored `u`) and a batch-norm evaluation output go to
`chainer_expected.npz`.

`check`: loads FILE into a fresh chain with `load_npz` and compares the same (1e-6).

Needs chainer 7.8.1 (PyPI; numpy < 2).
"""
import os
import sys

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
from chainer.link_hooks import SpectralNormalization, WeightStandardization

HERE = os.path.dirname(os.path.abspath(__file__))


class Net(chainer.Chain):
    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.conv = L.Convolution2D(4, 6, 3)
            self.deconv = L.Deconvolution2D(6, 3, 3)
            self.fc = L.Linear(12, 5)
            self.bn = L.BatchNormalization(6)
        self.sn_conv = SpectralNormalization(use_gamma=True)
        self.sn_deconv = SpectralNormalization()
        self.ws_fc = WeightStandardization()
        self.conv.add_hook(self.sn_conv)
        self.deconv.add_hook(self.sn_deconv)
        self.fc.add_hook(self.ws_fc)

    def forward(self, x, z):
        h = self.bn(self.conv(x))
        y = self.deconv(F.relu(h))
        return F.mean(y ** 2) + F.mean(self.fc(z) ** 2)


def net():
    np.random.seed(0)
    return Net()


def expected(m):
    rng = np.random.RandomState(7)
    x = rng.standard_normal((3, 6, 5, 4)).astype(np.float32)
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        return {
            "conv.weight": m.sn_conv.normalize_weight(m.conv).array,
            "deconv.weight": m.sn_deconv.normalize_weight(m.deconv).array,
            # WS keeps no method for it: the linear on the identity is W^T + b.
            "fc.weight": (m.fc(np.eye(12, dtype=np.float32)).array - m.fc.b.array).T.copy(),
            "bn.input": x,
            "bn.output": m.bn(x).array,
        }


def make():
    m = net()
    opt = chainer.optimizers.SGD(lr=0.1)
    opt.setup(m)
    rng = np.random.RandomState(1)
    for _ in range(3):
        x = rng.standard_normal((8, 4, 7, 7)).astype(np.float32)
        z = rng.standard_normal((8, 12)).astype(np.float32)
        m.cleargrads()
        loss = m(x, z)
        loss.backward()
        opt.update()
    chainer.serializers.save_npz(os.path.join(HERE, "chainer.npz"), m)
    np.savez(os.path.join(HERE, "chainer_expected.npz"), **expected(m))
    print(sorted(np.load(os.path.join(HERE, "chainer.npz")).files))


def check(path):
    m = net()
    # Initialise u and gamma (the hooks' own parameters) before loading into them.
    m(np.zeros((1, 4, 7, 7), np.float32), np.zeros((1, 12), np.float32))
    chainer.serializers.load_npz(path, m, strict=False)
    got = expected(m)
    want = np.load(os.path.join(HERE, "chainer_expected.npz"))
    worst = 0.0
    for k in ["conv.weight", "deconv.weight", "fc.weight", "bn.output"]:
        d = float(np.abs(got[k] - want[k]).max())
        worst = max(worst, d)
        print(f"{os.path.basename(path)} {k}: max difference {d:.2e}")
    assert worst <= 1e-6, worst
    print(f"loaded in Chainer {chainer.__version__}; worst difference {worst:.2e}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["make"]:
        make()
    elif sys.argv[1:2] == ["check"]:
        check(sys.argv[2])
    else:
        sys.exit(__doc__)
