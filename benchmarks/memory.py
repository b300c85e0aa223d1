"""Host peak memory of `edgesmith quantize --quant-effort balanced` (#39's goal: <= 2 GB on an
OCR-class model, <= 3 GB on an ImageNet MobileNetV2).

Models (not shipped): the corpus DBNet-style OCR detector at 320x640 (tests/corpus.py: 43 KB),
a DBNet-class detector of PP-OCR's size (~10 MB, `ocr_detector`) at 640x640, a
MobileNetV2 at 224x224 (benchmarks/budget.py: torchvision's architecture, seeded random
weights) and the MiniLM-size encoder of benchmarks/encoder.py; 48 seeded calibration samples
each, the local device. Each quantize runs in its own process; its peak RSS is read from the
kernel (the largest resident size it reached, children included). Needs torch.

    python benchmarks/memory.py [--only NAME]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]
PEAK = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, "
        "text=True); print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
        "p.stderr.strip().splitlines()[-1:] if p.returncode else '')")


def ocr_detector(path: Path) -> Path:
    """A DBNet-class text detector of PP-OCR's size (~10 MB of fp32 weights): a five-stage
    conv backbone to 1/32, an FPN of 1x1 laterals and upsampling adds, the four levels
    upsampled and concatenated, a conv and two ConvTransposes to a sigmoid probability map.
    Seeded random weights; exported with dynamic H/W as PaddleOCR's detector is."""
    import torch
    from torch import nn

    def cbr(i, o, s=1):
        return nn.Sequential(nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU())

    class Detector(nn.Module):
        def __init__(self, widths=(32, 64, 128, 192, 320), neck=96):
            super().__init__()
            chans = (3, *widths)
            self.stages = nn.ModuleList(
                nn.Sequential(cbr(chans[i], chans[i + 1], 2), cbr(chans[i + 1], chans[i + 1]))
                for i in range(len(widths)))
            self.lat = nn.ModuleList(nn.Conv2d(w, neck, 1) for w in widths[1:])
            self.head = nn.Sequential(
                cbr(4 * neck, neck), nn.ConvTranspose2d(neck, neck // 4, 2, 2),
                nn.BatchNorm2d(neck // 4), nn.ReLU(), nn.ConvTranspose2d(neck // 4, 1, 2, 2))

        def forward(self, x):
            feats = []
            for stage in self.stages:
                x = stage(x)
                feats.append(x)
            levels = [lat(f) for lat, f in zip(self.lat, feats[1:])]   # 1/4 .. 1/32
            for i in range(len(levels) - 2, -1, -1):
                levels[i] = levels[i] + nn.functional.interpolate(levels[i + 1], scale_factor=2)
            size = levels[0].shape[-2:]
            fused = torch.cat([levels[0]] + [nn.functional.interpolate(v, size=size)
                                             for v in levels[1:]], 1)
            return torch.sigmoid(self.head(fused))

    torch.manual_seed(0)
    model = Detector().eval()
    torch.onnx.export(model, torch.randn(1, 3, 640, 640), str(path), input_names=["input"],
                      output_names=["maps"], opset_version=17, dynamo=False,
                      dynamic_axes={"input": {2: "height", 3: "width"},
                                    "maps": {2: "height", 3: "width"}})
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    import corpus
    from budget import mobilenetv2_224
    from device_runtime import facts
    from text_encoder import export, tokens

    print(f"CPU: {facts.collect(with_providers=False).get('cpu')} ({os.cpu_count()} cores)")
    tmp = Path(tempfile.mkdtemp(prefix="edgesmith-memory-"))
    rng = np.random.default_rng(0)
    jobs = []
    if "dbnet" in args.only or not args.only:
        path = corpus.build([("dbnet", "ts17")])[("dbnet", "ts17")]
        np.savez(tmp / "dbnet.npz", input=rng.standard_normal((48, 3, 320, 640)).astype(np.float32))
        jobs.append(("dbnet 320x640", path, tmp / "dbnet.npz", 2048))
    if "ocr" in args.only or not args.only:
        np.savez(tmp / "ocr.npz", input=rng.standard_normal((48, 3, 640, 640)).astype(np.float32))
        jobs.append(("10 MB DBNet-class detector 640x640", ocr_detector(tmp / "ocr.onnx"),
                     tmp / "ocr.npz", 2048))
    if "mobilenet" in args.only or not args.only:
        np.savez(tmp / "mnv2.npz", input=rng.standard_normal((48, 3, 224, 224)).astype(np.float32))
        jobs.append(("mobilenetv2 224x224", mobilenetv2_224(tmp), tmp / "mnv2.npz", 3072))
    if "encoder" in args.only or not args.only:
        export(tmp / "encoder.onnx", 384, 12, 6, 128)
        np.savez(tmp / "encoder.npz", **tokens(48, 128, 1))
        jobs.append(("minilm-size encoder 128 tokens", tmp / "encoder.onnx", tmp / "encoder.npz",
                     2048))
    env = {**os.environ, "EDGESMITH_CACHE": str(tmp / "cache")}
    for name, model, data, goal_mb in jobs:
        size = model.stat().st_size / 1e6
        out = subprocess.run([sys.executable, "-c", PEAK, sys.executable, "-m", "edgesmith",
                              "quantize", str(model), "--calib", str(data), "--quant-effort",
                              "balanced", "-o", str(tmp / f"{model.stem}-q.onnx")],
                             capture_output=True, text=True, env=env, timeout=3600)
        status, peak_kb, err = out.stdout.split(" ", 2)
        peak = int(peak_kb) / 1024
        print(f"{name} ({size:.1f} MB): host peak RSS {peak:,.0f} MB, goal <= {goal_mb} MB: "
              f"{'met' if peak <= goal_mb else 'NOT met'}"
              + ("" if status == "0" else f" (quantize exited {status}: {err.strip()})"))


if __name__ == "__main__":
    main()
