"""`--budget` kept: `edgesmith optimize --budget 60s` on models the project does not ship.

    python benchmarks/budget.py [--budget 60]

Models: a MobileNetV2 at 224x224 (torchvision's architecture from examples/imagenet_mobilenetv2.py,
seeded random weights: the time a search takes does not depend on what the weights learned), the
corpus YOLOv8-style detector at 320x320 and the corpus DBNet-style OCR detector at 320x640
(tests/corpus.py). Each gets calibration and training data (48 seeded random samples), so every
family wants more than the budget. Goal: each run ends within the budget plus its slowest single
step (report.json `step_costs_s`). Needs the `train` extra (torch).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "examples")]


def mobilenetv2_224(folder: Path) -> Path:
    import torch
    from imagenet_mobilenetv2 import MobileNetV2

    torch.manual_seed(0)
    path = folder / "mobilenetv2_224.onnx"
    torch.onnx.export(MobileNetV2().eval(), (torch.randn(1, 3, 224, 224),), str(path),
                      dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["logits"])
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=60.0, help="seconds")
    args = parser.parse_args()
    import corpus
    from device_runtime import facts

    print(f"CPU: {facts.collect(with_providers=False).get('cpu')} ({os.cpu_count()} cores)")
    tmp = Path(tempfile.mkdtemp(prefix="edgesmith-budget-"))
    built = corpus.build([("yolo", "ts17"), ("dbnet", "ts17")])
    models = [("mobilenetv2 224x224", mobilenetv2_224(tmp), (1, 3, 224, 224)),
              ("yolo 320x320", built[("yolo", "ts17")], (1, 3, 320, 320)),
              ("dbnet 320x640", built[("dbnet", "ts17")], (1, 3, 320, 640))]
    env = {**os.environ, "EDGESMITH_CACHE": str(tmp / "cache")}
    worst = 0.0
    for name, path, shape in models:
        data = tmp / f"{path.stem}.npz"
        rng = np.random.default_rng(0)
        np.savez(data, input=rng.standard_normal((48, *shape[1:])).astype(np.float32))
        out = tmp / f"out-{path.stem}"
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "edgesmith", "optimize", str(path),
                               "--calib", str(data), "--train", str(data), "-o", str(out),
                               "--budget", f"{args.budget:g}s", "--input-shape",
                               "input=" + "x".join(map(str, shape))],
                              capture_output=True, text=True, env=env, timeout=args.budget * 10)
        wall = time.monotonic() - t0
        if proc.returncode not in (0, 1):
            print(f"{name}: failed: {proc.stderr.strip().splitlines()[-1:]}")
            continue
        report = json.loads((out / "report.json").read_text())
        slowest = max(report["step_costs_s"].values())
        cut = sum("--budget" in s["reason"] for s in report["skipped"])
        worst = max(worst, report["overshoot_s"] - slowest)
        print(f"{name}: {report['elapsed_s']:.1f} s in the run ({wall:.1f} s wall, the "
              f"interpreter's start included) of --budget {args.budget:g}s; overshoot "
              f"{report['overshoot_s']:.1f} s, slowest step {slowest:.1f} s "
              f"({', '.join(f'{k} {v:.1f}' for k, v in report['step_costs_s'].items())}); "
              f"{len(report['candidates'])} candidate(s), {cut} left out for the budget; "
              f"chose {report['chosen']}")
    print(f"goal: overshoot <= the slowest step on every model: "
          f"{'met' if worst <= 0 else f'NOT met (by {worst:.1f} s)'}")


if __name__ == "__main__":
    main()
