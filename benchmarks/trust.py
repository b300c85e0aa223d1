"""Numbers a user can trust: optimize's model gain against an independent measurement, and the
same choice on the same job.

    python benchmarks/trust.py [--repeats 5] [--budget 60] [--rounds 15]

Models (not shipped): a MobileNetV2 at 224x224 (torchvision's architecture from
examples/imagenet_mobilenetv2.py, seeded random weights), the corpus YOLOv8-style detector at
320x320 and the corpus DBNet-style OCR detector at 320x640 (tests/corpus.py), each with 48
seeded calibration samples. For each: `edgesmith optimize` `--repeats` times into fresh
folders (same job, same cache), then OUT/model.onnx and the original are timed by plain
onnxruntime at the same (default) session options, interleaved in rotating order, `--rounds`
rounds of 30 runs; the median of per-round ratios is the independent model gain.
Goals: every run's reported model gain within +-10 % of the independent one (of its own
model.onnx); every repeat chooses the same candidate.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]


def plain_gain(original: Path, chosen: Path, feed: dict, rounds: int) -> tuple[float, float, float]:
    """(median, low, high) over rounds of original ms / chosen ms, plain onnxruntime, defaults."""
    import onnxruntime as ort

    sessions = {"original": ort.InferenceSession(str(original)),
                "chosen": ort.InferenceSession(str(chosen))}
    for s in sessions.values():
        for _ in range(5):
            s.run(None, feed)
    ratios = []
    for i in range(rounds):
        med = {}
        for name in (("original", "chosen") if i % 2 == 0 else ("chosen", "original")):
            times = []
            for _ in range(30):
                t0 = time.perf_counter()
                sessions[name].run(None, feed)
                times.append(time.perf_counter() - t0)
            med[name] = statistics.median(times)
        ratios.append(med["original"] / med["chosen"])
    return statistics.median(ratios), min(ratios), max(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per optimize run")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--only", default="", help="models whose name contains this")
    args = parser.parse_args()
    import corpus
    from budget import mobilenetv2_224
    from device_runtime import facts

    print(f"CPU: {facts.collect(with_providers=False).get('cpu')} ({os.cpu_count()} cores)")
    tmp = Path(tempfile.mkdtemp(prefix="edgesmith-trust-"))
    built = corpus.build([("yolo", "ts17"), ("dbnet", "ts17")])
    models = [("mobilenetv2 224x224", mobilenetv2_224(tmp), (1, 3, 224, 224)),
              ("yolo 320x320", built[("yolo", "ts17")], (1, 3, 320, 320)),
              ("dbnet 320x640", built[("dbnet", "ts17")], (1, 3, 320, 640))]
    env = {**os.environ, "EDGESMITH_CACHE": str(tmp / "cache")}
    gains_ok, stable_ok = True, True
    for name, path, shape in (m for m in models if args.only in m[0]):
        rng = np.random.default_rng(0)
        data = tmp / f"{path.stem}.npz"
        np.savez(data, input=rng.standard_normal((48, *shape[1:])).astype(np.float32))
        chosen, reports = [], []
        for i in range(args.repeats):
            out = tmp / f"out-{path.stem}-{i}"
            proc = subprocess.run([sys.executable, "-m", "edgesmith", "optimize", str(path),
                                   "--calib", str(data), "-o", str(out), "--budget",
                                   f"{args.budget:g}s", "--backends", "onnxruntime",
                                   "--input-shape", "input=" + "x".join(map(str, shape))],
                                  capture_output=True, text=True, env=env,
                                  timeout=args.budget * 10)
            if proc.returncode not in (0, 1):
                print(f"{name}: run {i} failed: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            report = json.loads((out / "report.json").read_text())
            chosen.append(report["chosen"])
            reports.append((out, report))
        counts = collections.Counter(chosen)
        stable_ok &= len(counts) == 1
        feed = {"input": rng.standard_normal(shape).astype(np.float32)}
        plain: dict[str, tuple] = {}       # per chosen candidate: its model.onnx, timed once
        offs = []
        for i, (out, report) in enumerate(reports):
            rem = report["remeasure"]
            if report["chosen"] not in plain:
                plain[report["chosen"]] = plain_gain(path, out / "model.onnx", feed, args.rounds)
            gain, low, high = plain[report["chosen"]]
            reported = rem.get("model_gain")
            off = None if reported is None else reported / gain - 1
            offs.append(off)
            print(f"{name} run {i}: chose {report['chosen']}; reported model gain "
                  f"{reported if reported is None else f'{reported:.3f}x'} over "
                  f"{rem.get('original', {}).get('rounds')} rounds, plain onnxruntime "
                  f"{gain:.3f}x ({low:.2f}-{high:.2f} over {args.rounds} rounds): "
                  f"{'n/a' if off is None else f'{off:+.1%}'}; speedup {rem.get('speedup')}, "
                  f"config gain {rem.get('config_gain')}")
        gains_ok &= bool(offs) and all(o is not None and abs(o) <= 0.10 for o in offs)
        print(f"{name}: chose {dict(counts)} over {len(chosen)} run(s); worst model gain off "
              f"by {max((abs(o) for o in offs if o is not None), default=float('nan')):.1%}")
    print(f"goals: model gain within +-10 %: {'met' if gains_ok else 'NOT met'}; the same "
          f"choice every time: {'met' if stable_ok else 'NOT met'}")


if __name__ == "__main__":
    main()
