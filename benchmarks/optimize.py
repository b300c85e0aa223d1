"""The main job on the trained 96x96 examples: chosen variant vs the original under ORT defaults.

    python benchmarks/optimize.py [--epochs 10] [--budget 1500]

For the MobileNetV2-style and ResNet-style digits models: `optimize` with calibration data
(training images), the eval set and training data for pruning + distillation, on the local
device. Then the original (onnxruntime defaults) and the chosen bundle (its tuned config) are
re-measured interleaved. Goal: >= 3x faster at <= 1% accuracy drop. Prints the run's time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--budget", type=float, default=1500.0)
    parser.add_argument("--models", nargs="*", default=["digits_mnv2", "digits_resnet"])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgesmith-optbench-"))
    os.environ.setdefault("EDGESMITH_CACHE", str(work / "cache"))
    import digits
    import onnxruntime as ort

    import device_runtime
    from edgesmith.pipeline import OptimizeConfig, optimize

    x_train, y_train, _, _ = digits.load(96)
    train = work / "train.npz"
    np.savez(train, input=x_train, labels=y_train)
    calib = work / "calib.npz"
    np.savez(calib, input=x_train[:256])
    for name in args.models:
        onnx_path = ROOT / "examples/models" / f"{name}.onnx"
        eval_path = ROOT / "examples/models" / f"{name}_eval.npz"
        t0 = time.time()
        report = optimize(onnx_path, work / name, "local", calib=calib, eval_path=eval_path,
                          train=train, cfg=OptimizeConfig(distill_epochs=args.epochs,
                                                          budget_s=args.budget),
                          say=lambda text: print(f"  {text}", file=sys.stderr, flush=True))
        took = time.time() - t0
        chosen = next((c for c in report.candidates if c.id == report.chosen), None)
        original = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        tuned = device_runtime.load(work / name / "bundle")
        x = np.load(eval_path)["input"][:1]
        sides = {"original": lambda: original.run(None, {"input": x}),
                 "chosen": lambda: tuned.run({"input": x})}
        ratios = []
        for i in range(30):
            med = {}
            for label in (("original", "chosen") if i % 2 == 0 else ("chosen", "original")):
                t = []
                for _ in range(20):
                    s = time.perf_counter()
                    sides[label]()
                    t.append(time.perf_counter() - s)
                med[label] = statistics.median(t)
            ratios.append(med["original"] / med["chosen"])
        print(f"{name}: {report.outcome}; chosen {report.chosen} "
              f"(accuracy drop {chosen.accuracy_drop if chosen else float('nan'):.4f}); "
              f"speedup vs original under ORT defaults {statistics.median(ratios):.2f}x "
              f"(goal >= 3x at <= 1% drop); optimize took {took:.0f}s")
        for c in sorted(report.candidates, key=lambda c: c.latency_ms or 1e9):
            acc = (c.accuracy or {}).get("top1")
            print(f"    {c.id:<42} p50 {c.latency_ms or float('nan'):.3f} ms  top-1 "
                  f"{acc if acc is not None else float('nan'):.4f}  drop "
                  f"{c.accuracy_drop if c.accuracy_drop is not None else float('nan'):.4f}")


if __name__ == "__main__":
    main()
