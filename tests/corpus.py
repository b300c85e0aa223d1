"""A corpus of real model kinds, built from torch definitions and exported the ways users export.

Kinds: ResNet-class; MobileNetV2 (ReLU6 as Clip); MobileNetV3 (HardSwish, squeeze-excite); a
YOLOv8-style detector (C2f with Split, SiLU as x*Sigmoid, SPPF MaxPool, Resize upsampling,
Concat, a DFL box head; dynamic H/W); a DBNet/CRNN-style OCR pair (dynamic width, a GRU); a small
transformer encoder (LayerNorm, GELU, Softmax; dynamic sequence length). Weights are seeded
random (no hub downloads): the corpus tests that every command copes with the graphs real
exporters write, and fidelity is judged against each model's own fp32 outputs.

Exports: torch's TorchScript exporter at opsets 13 and 17, an old model-zoo style (opset 9,
IR 3, every initializer also a graph input) for the convnets, and the dynamo exporter at opset
18 and at the newest opset this onnx writes, where it works.
Models are cached under $EDGESMITH_CORPUS (default /var/cache/edgesmith/corpus) by a hash of
this file and the torch/onnx versions, with a small .npz of inputs per model.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()


@dataclass(frozen=True)
class Kind:
    name: str
    shape: tuple[int, ...]             # the example input (batch first)
    dynamic: dict                      # input axis -> symbolic name
    task: str                          # "classify" | "detect" | "ocr-det" | "ocr-rec" | "encode"


KINDS = [
    Kind("resnet", (1, 3, 64, 64), {0: "batch"}, "classify"),
    Kind("mobilenetv2", (1, 3, 64, 64), {0: "batch"}, "classify"),
    Kind("mobilenetv3", (1, 3, 64, 64), {0: "batch"}, "classify"),
    Kind("yolo", (1, 3, 128, 128), {0: "batch", 2: "height", 3: "width"}, "detect"),
    Kind("dbnet", (1, 3, 64, 128), {0: "batch", 2: "height", 3: "width"}, "ocr-det"),
    Kind("crnn", (1, 3, 32, 128), {0: "batch", 3: "width"}, "ocr-rec"),
    Kind("transformer", (1, 16, 64), {0: "batch", 1: "sequence"}, "encode"),
]


def _torch_models():
    """Module definitions (imported lazily: torch is the `train` extra)."""
    import torch
    from torch import nn

    def cbr(cin, cout, k=3, s=1, act=nn.ReLU):
        return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, bias=False),
                             nn.BatchNorm2d(cout), act())

    class Basic(nn.Module):
        def __init__(self, cin, cout, s):
            super().__init__()
            self.a, self.b = cbr(cin, cout, s=s), nn.Sequential(
                nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
            self.skip = nn.Sequential() if s == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, s, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            return torch.relu(self.b(self.a(x)) + self.skip(x))

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(cbr(3, 16), Basic(16, 16, 1), Basic(16, 32, 2),
                                      Basic(32, 64, 2))
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(self.body(x).mean((2, 3)))

    class SE(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.a, self.b = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

        def forward(self, x):
            s = x.mean((2, 3), keepdim=True)
            return x * nn.functional.hardsigmoid(self.b(torch.relu(self.a(s))))

    class Inverted(nn.Module):
        def __init__(self, cin, cout, s, t, act, se=False):
            super().__init__()
            mid = cin * t
            layers = [cbr(cin, mid, 1, act=act),
                      nn.Sequential(nn.Conv2d(mid, mid, 3, s, 1, groups=mid, bias=False),
                                    nn.BatchNorm2d(mid), act())]
            if se:
                layers.append(SE(mid))
            layers += [nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.f = nn.Sequential(*layers)
            self.res = s == 1 and cin == cout

        def forward(self, x):
            return x + self.f(x) if self.res else self.f(x)

    class MobileNet(nn.Module):
        def __init__(self, v3: bool):
            super().__init__()
            act = nn.Hardswish if v3 else nn.ReLU6
            self.body = nn.Sequential(
                cbr(3, 16, s=2, act=act), Inverted(16, 16, 1, 1, act, v3),
                Inverted(16, 24, 2, 4, act, v3), Inverted(24, 24, 1, 4, act, v3),
                Inverted(24, 40, 2, 4, act, v3), Inverted(40, 40, 1, 4, act, v3),
                cbr(40, 128, 1, act=act))
            self.fc = nn.Linear(128, 10)

        def forward(self, x):
            return self.fc(self.body(x).mean((2, 3)))

    class SiLU(nn.Module):      # written out, as YOLO exports show it: x * sigmoid(x)
        def forward(self, x):
            return x * torch.sigmoid(x)

    def conv(cin, cout, k=3, s=1):
        return cbr(cin, cout, k, s, act=SiLU)

    class Bottleneck(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.a, self.b = conv(c, c), conv(c, c)

        def forward(self, x):
            return x + self.b(self.a(x))

    class C2f(nn.Module):
        def __init__(self, cin, cout, n=1):
            super().__init__()
            self.c = cout // 2
            self.cv1, self.cv2 = conv(cin, 2 * self.c, 1), conv((2 + n) * self.c, cout, 1)
            self.m = nn.ModuleList(Bottleneck(self.c) for _ in range(n))

        def forward(self, x):
            y = list(self.cv1(x).split((self.c, self.c), 1))
            y.extend(m(y[-1]) for m in self.m)
            return self.cv2(torch.cat(y, 1))

    class SPPF(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.cv1, self.cv2 = conv(c, c // 2, 1), conv(c * 2, c, 1)
            self.pool = nn.MaxPool2d(5, 1, 2)

        def forward(self, x):
            x = self.cv1(x)
            y1 = self.pool(x)
            y2 = self.pool(y1)
            return self.cv2(torch.cat((x, y1, y2, self.pool(y2)), 1))

    class Detect(nn.Module):
        """Per level: a box branch (4 x 16 DFL bins) and a class branch; DFL decodes the bins
        with a softmax and a fixed 1x1 conv holding 0..15."""

        def __init__(self, chans, nc=4, reg=16):
            super().__init__()
            self.nc, self.reg = nc, reg
            c2, c3 = max(16, chans[0] // 4, 4 * reg), max(chans[0], nc)    # YOLOv8's widths
            self.box = nn.ModuleList(nn.Sequential(conv(c, c2), conv(c2, c2),
                                                   nn.Conv2d(c2, 4 * reg, 1)) for c in chans)
            self.cls = nn.ModuleList(nn.Sequential(conv(c, c3), conv(c3, c3),
                                                   nn.Conv2d(c3, nc, 1)) for c in chans)
            self.dfl = nn.Conv2d(reg, 1, 1, bias=False).requires_grad_(False)
            self.dfl.weight.data[:] = torch.arange(reg, dtype=torch.float).view(1, reg, 1, 1)

        def forward(self, feats):
            outs = []
            for f, box, cls in zip(feats, self.box, self.cls):
                b, c = box(f), cls(f)
                n = b.shape[0]
                b = b.view(n, 4, self.reg, -1).transpose(2, 1).softmax(1)
                b = self.dfl(b).view(n, 4, -1)
                outs.append(torch.cat((b, c.view(n, self.nc, -1).sigmoid()), 1))
            return torch.cat(outs, 2)

    class Yolo(nn.Module):
        """YOLOv8n's layout and widths: backbone to P5 with SPPF, a PAN neck, three levels."""

        def __init__(self):
            super().__init__()
            self.p2 = nn.Sequential(conv(3, 16, s=2), conv(16, 32, s=2), C2f(32, 32))
            self.p3 = nn.Sequential(conv(32, 64, s=2), C2f(64, 64, 2))
            self.p4 = nn.Sequential(conv(64, 128, s=2), C2f(128, 128, 2))
            self.p5 = nn.Sequential(conv(128, 256, s=2), C2f(256, 256), SPPF(256))
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.n4, self.n3 = C2f(384, 128), C2f(192, 64)
            self.d3, self.o4 = conv(64, 64, s=2), C2f(192, 128)
            self.d4, self.o5 = conv(128, 128, s=2), C2f(384, 256)
            self.head = Detect((64, 128, 256))

        def forward(self, x):
            p3 = self.p3(self.p2(x))
            p4 = self.p4(p3)
            p5 = self.p5(p4)
            n4 = self.n4(torch.cat((self.up(p5), p4), 1))
            n3 = self.n3(torch.cat((self.up(n4), p3), 1))
            o4 = self.o4(torch.cat((self.d3(n3), n4), 1))
            o5 = self.o5(torch.cat((self.d4(o4), p5), 1))
            return self.head([n3, o4, o5])

    class DBNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.s1, self.s2 = cbr(3, 16, s=2), cbr(16, 32, s=2)
            self.lat = nn.Conv2d(32, 16, 1)
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.prob = nn.Sequential(cbr(32, 16), nn.ConvTranspose2d(16, 1, 2, 2))

        def forward(self, x):
            a = self.s1(x)
            b = self.s2(a)
            return torch.sigmoid(self.prob(torch.cat((a, self.up(self.lat(b))), 1)))

    class CRNN(nn.Module):
        def __init__(self, classes=37):
            super().__init__()
            self.cnn = nn.Sequential(cbr(3, 32), nn.MaxPool2d(2), cbr(32, 64), nn.MaxPool2d(2),
                                     cbr(64, 96), nn.MaxPool2d((2, 1)), cbr(96, 96),
                                     nn.MaxPool2d((4, 1)))
            self.rnn = nn.GRU(96, 48, bidirectional=True, batch_first=True)
            self.fc = nn.Linear(96, classes)

        def forward(self, x):
            f = self.cnn(x).squeeze(2).permute(0, 2, 1)       # [N, W/4, C]
            return self.fc(self.rnn(f)[0]).log_softmax(-1)

    class Encoder(nn.Module):
        def __init__(self, d=64, heads=4, layers=2):
            super().__init__()
            self.heads = heads
            self.layers = nn.ModuleList(nn.ModuleDict({
                "n1": nn.LayerNorm(d), "qkv": nn.Linear(d, 3 * d), "o": nn.Linear(d, d),
                "n2": nn.LayerNorm(d), "f1": nn.Linear(d, 4 * d), "f2": nn.Linear(4 * d, d)})
                for _ in range(layers))
            self.out = nn.Linear(d, 8)

        def forward(self, x):
            n, s, d = x.shape
            h = self.heads
            for L in self.layers:
                q, k, v = L["qkv"](L["n1"](x)).chunk(3, -1)
                q, k, v = (t.reshape(n, s, h, d // h).transpose(1, 2) for t in (q, k, v))
                att = (q @ k.transpose(-1, -2) / (d // h) ** 0.5).softmax(-1)
                x = x + L["o"]((att @ v).transpose(1, 2).reshape(n, s, d))
                x = x + L["f2"](nn.functional.gelu(L["f1"](L["n2"](x))))
            return self.out(x.mean(1))

    return {"resnet": ResNet, "mobilenetv2": lambda: MobileNet(False),
            "mobilenetv3": lambda: MobileNet(True), "yolo": Yolo, "dbnet": DBNet, "crnn": CRNN,
            "transformer": Encoder}


# export name -> (exporter, opset, old zoo style); "newest" is the newest opset this onnx
# writes (the dynamo exporter converts to it), as a user on the latest toolchain gets
EXPORTS = {"ts13": ("torchscript", 13, False), "ts17": ("torchscript", 17, False),
           "zoo9": ("torchscript", 9, True), "dynamo": ("dynamo", 18, False),
           "newest": ("dynamo", None, False)}
ZOO_KINDS = ("resnet", "mobilenetv2", "mobilenetv3")      # old zoo graphs were convnets


# what an exporter cannot do (`python tests/corpus.py` still tries; failed.json records why)
UNEXPORTABLE = {("crnn", "dynamo"): "torch.export cannot decompose nn.GRU for ONNX",
                ("crnn", "newest"): "torch.export cannot decompose nn.GRU for ONNX"}


def variants() -> list[tuple[str, str]]:
    """(kind, export) pairs in the corpus."""
    return [(k.name, e) for k in KINDS for e in EXPORTS
            if (e != "zoo9" or k.name in ZOO_KINDS) and (k.name, e) not in UNEXPORTABLE]


def cache_root() -> Path:
    import onnx
    import torch

    key = hashlib.sha256(HERE.read_bytes() + torch.__version__.encode() +
                         onnx.__version__.encode()).hexdigest()[:16]
    if os.environ.get("EDGESMITH_CORPUS"):
        base = Path(os.environ["EDGESMITH_CORPUS"])
    elif os.access("/var/cache", os.W_OK):          # root, CI: shared between runs
        base = Path("/var/cache/edgesmith/corpus")
    else:
        base = Path.home() / ".cache" / "edgesmith" / "corpus"
    return base / key


def _export(module, kind: Kind, exporter: str, opset: int, zoo: bool, path: Path) -> None:
    import torch

    import onnx

    x = torch.from_numpy(example(kind, 0))
    opset = opset or onnx.defs.onnx_opset_version()
    names = {"input_names": ["input"], "output_names": ["output"]}
    if exporter == "dynamo":
        dims = {i: torch.export.Dim(n, min=2 if i else 1, max=4096)
                for i, n in kind.dynamic.items() if i}      # batch 1 in the example: static
        program = torch.onnx.export(module, (x,), dynamo=True, opset_version=opset,
                                    dynamic_shapes=({**dims},) if dims else None, **names)
        program.save(str(path))
        return
    torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=opset,
                      dynamic_axes={"input": kind.dynamic}, do_constant_folding=not zoo,
                      keep_initializers_as_inputs=zoo, **names)
    if zoo:          # model-zoo files of that age carry an old IR version
        import onnx
        model = onnx.load(str(path))
        model.ir_version = 3
        onnx.save(model, str(path))


def example(kind: Kind, seed: int, n: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *kind.shape[1:])).astype(np.float32)


def build(names: list[tuple[str, str]] | None = None) -> dict[tuple[str, str], Path]:
    """Export what is missing from the cache (atomically, one file at a time); return
    {(kind, export): model path}. An export the exporter cannot do is recorded and left out."""
    import torch

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    failed_path = root / "failed.json"
    failed = json.loads(failed_path.read_text()) if failed_path.is_file() else {}
    kinds = {k.name: k for k in KINDS}
    makers = None
    out = {}
    for name, export in names or variants():
        path = root / f"{name}-{export}.onnx"
        if f"{name}-{export}" in failed:
            continue
        if not path.is_file():
            makers = makers or _torch_models()
            torch.manual_seed(0)
            module = makers[name]().eval()
            exporter, opset, zoo = EXPORTS[export]
            fd, tmp = tempfile.mkstemp(dir=root, suffix=".onnx")
            os.close(fd)
            try:
                _export(module, kinds[name], exporter, opset, zoo, Path(tmp))
                os.replace(tmp, path)
            except Exception as exc:   # noqa: BLE001 - an exporter limit, recorded per model
                failed[f"{name}-{export}"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                failed_path.write_text(json.dumps(failed, indent=1))
                Path(tmp).unlink(missing_ok=True)
                continue
        data = root / f"{name}.npz"
        if not data.is_file():
            kind = kinds[name]
            fd, tmp = tempfile.mkstemp(dir=root, suffix=".npz")
            os.close(fd)
            np.savez(tmp, input=example(kind, 1, 48))
            os.replace(tmp, data)
        out[(name, export)] = path
    return out


def data_path(name: str) -> Path:
    return cache_root() / f"{name}.npz"


if __name__ == "__main__":       # python tests/corpus.py: build and list
    for key, p in build(variants() + list(UNEXPORTABLE)).items():
        print(*key, p)
