"""Tuned runtime config vs onnxruntime's default config, re-measured interleaved in one run.

    python benchmarks/tune.py [--budget 90]

For each example model: `edgesmith tune` on the local device (fresh, its own cache), then the
default config and the tuned config are timed in alternating blocks (rotating order), and the
median of per-round ratios is printed. Goal: >= 1.1x on at least one model, never < 1.0x.
Then the same tune again, as a user re-running the command: goal <= 1/3 of the first's time
(the answer comes from the cache).
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
sys.path.insert(0, str(ROOT))
MODELS = ["digits_mnv2.onnx", "digits_resnet.onnx"]


def block(run, n: int) -> float:
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        run()
        out.append((time.perf_counter_ns() - t0) / 1e6)
    return statistics.median(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=90.0, help="device seconds per model")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--block", type=int, default=30)
    args = parser.parse_args()
    os.environ.setdefault("EDGESMITH_CACHE", tempfile.mkdtemp(prefix="edgesmith-tune-"))
    import device_runtime
    from device_runtime import facts
    from edgesmith.model import load
    from edgesmith.profiling import prepare
    from edgesmith.search.tune import tune

    print(f"CPU: {facts.collect(with_providers=False).get('cpu')} ({os.cpu_count()} cores)")
    for name in MODELS:
        model = load(ROOT / "examples" / "models" / name)
        t0 = time.time()
        report = tune(model, "local", budget_s=args.budget, fresh=True)
        took = time.time() - t0
        default = device_runtime.load(prepare(model, None).path)
        tuned = device_runtime.load(report.bundle)
        x = np.random.default_rng(0).standard_normal(model.inputs[0].shape).astype(np.float32)
        feed = {model.inputs[0].name: x}
        sides = [("default", lambda: default.run(feed)), ("tuned", lambda: tuned.run(feed))]
        for _, run in sides:
            block(run, 20)
        ratios = []
        for i in range(args.rounds):
            order = sides if i % 2 == 0 else sides[::-1]
            med = {label: block(run, args.block) for label, run in order}
            ratios.append(med["default"] / med["tuned"])
        t0 = time.time()
        again = tune(model, "local", budget_s=args.budget)
        took_again = time.time() - t0
        print(f"{name}: tuned [{report.best.id}] in {took:.0f} s "
              f"({report.measured} trials); speedup vs default config "
              f"{statistics.median(ratios):.3f}x (median of {len(ratios)} rounds; "
              f"min {min(ratios):.2f}, max {max(ratios):.2f}); the same tune again "
              f"{took_again:.1f} s = {took_again / took:.2f} of the first "
              f"({again.measured} measured)")
    print("goal: >= 1.1x on at least one model, never < 1.0x; again <= 0.33 of the first")


if __name__ == "__main__":
    main()
