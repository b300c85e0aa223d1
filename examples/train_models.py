"""Train the example models on scikit-learn's digits and export them to ONNX (needs `[train]`).

    python examples/train_models.py            # writes examples/models/*.onnx and *_eval.npz

The exported models and eval sets are committed, so tests and the demo never need torch.
Models: `digits_cnn` (8x8, fast demo), `digits_mnv2` (MobileNetV2-style, 96x96) and
`digits_resnet` (ResNet-style, 96x96), all 1-channel inputs named `input`, logits `logits`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import digits  # noqa: E402


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class DigitsCNN(nn.Module):
    """Three convs, a flatten into a two-layer head: small enough for a sub-second demo."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv_bn(1, 16), conv_bn(16, 32), nn.MaxPool2d(2),
                                      conv_bn(32, 64))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 64), nn.ReLU(),
                                  nn.Dropout(0.2), nn.Linear(64, 10))

    def forward(self, x):
        return self.head(self.features(x))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn(cin, hidden, 1)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden),
                   conv_bn(hidden, cout, 1, act=False)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class DigitsMobileNetV2(nn.Module):
    """MobileNetV2 at width 0.5 (torchvision's block table), 1-channel 96x96 input."""

    def __init__(self, width: float = 0.5, last: int = 640):
        super().__init__()
        table = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                 (6, 160, 3, 2), (6, 320, 1, 1)]
        cin = int(32 * width)
        layers = [conv_bn(1, cin, 3, 2)]
        for t, c, n, s in table:
            cout = max(8, int(c * width) // 8 * 8)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(conv_bn(cin, last, 1))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
                                  nn.Linear(last, 10))

    def forward(self, x):
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 3, stride), conv_bn(cout, cout, act=False))
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout
                         else conv_bn(cin, cout, 1, stride, act=False))
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.body(x) + self.shortcut(x))


class DigitsResNet(nn.Module):
    """ResNet-style: a strided stem and three stages of two basic blocks, 96x96 input."""

    def __init__(self, widths=(32, 64, 128)):
        super().__init__()
        layers = [conv_bn(1, widths[0], 3, 2)]
        cin = widths[0]
        for i, w in enumerate(widths):
            layers += [BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)]
            cin = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10))

    def forward(self, x):
        return self.head(self.features(x))


MODELS = {"digits_cnn": (DigitsCNN, 8, 30), "digits_mnv2": (DigitsMobileNetV2, 96, 12),
          "digits_resnet": (DigitsResNet, 96, 8)}


def shift_augment(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Random translations: digits has 1.4k training images, enough only with augmentation."""
    if max_shift == 0:
        return x
    dx, dy = np.random.randint(-max_shift, max_shift + 1, size=2)
    return torch.roll(x, shifts=(int(dy), int(dx)), dims=(2, 3))


def train(name: str, out_dir: Path, seed: int = 0) -> None:
    cls, size, epochs = MODELS[name]
    torch.manual_seed(seed)
    np.random.seed(seed)
    x_train, y_train, x_test, y_test = digits.load(size)
    model = cls()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * int(np.ceil(len(x_train) / 64))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    start = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(model(shift_augment(xt[idx], size // 16)), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean()
        print(f"{name} epoch {epoch + 1}/{epochs} loss {loss.item():.3f} test top-1 {acc:.4f} "
              f"({time.time() - start:.0f}s)", file=sys.stderr)
    onnx_path = out_dir / f"{name}.onnx"
    torch.onnx.export(model, torch.from_numpy(x_test[:1]), str(onnx_path), dynamo=False,
                      input_names=["input"], output_names=["logits"], opset_version=17,
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    digits.save_eval(str(out_dir / f"{name}_eval.npz"), "input", x_test, y_test)
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size / 1e6:.2f} MB), test top-1 {acc:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("-o", "--out", type=Path, default=HERE / "models")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    for name in args.models:
        train(name, args.out)


if __name__ == "__main__":
    main()
