"""device_runtime's per-inference latency vs a bare onnxruntime session, interleaved.

    python benchmarks/runtime_overhead.py [--model examples/models/digits_mnv2.onnx]

Both sides use the same model, threads and optimisation level; blocks alternate so machine noise
hits both alike. Also prints `import device_runtime` time (python -X importtime). Goals: latency
ratio <= 1.02, import <= 50 ms.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed_block(run, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        run()
        out.append((time.perf_counter_ns() - t0) / 1e6)
    return out


def import_ms() -> float:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import device_runtime"],
                          capture_output=True, text=True, cwd=ROOT)
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| device_runtime$", line)
        if m:
            return int(m.group(1)) / 1000
    raise RuntimeError(proc.stderr[-500:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "examples/models/digits_mnv2.onnx"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--block", type=int, default=50)
    args = parser.parse_args()

    import os
    os.environ.setdefault("EDGESMITH_CACHE", tempfile.mkdtemp())
    import device_runtime
    from edgesmith.model import load
    from edgesmith.profiling import prepare

    model = load(args.model)
    bundle = prepare(model, None)
    ours = device_runtime.load(bundle.path, threads=args.threads)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    bare = ort.InferenceSession(args.model, opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal(model.inputs[0].shape).astype(np.float32)
    feed = {model.inputs[0].name: x}
    out_names = [o.name for o in bare.get_outputs()]
    bare2 = ort.InferenceSession(args.model, opts, providers=["CPUExecutionProvider"])
    sides = {
        "device_runtime.load().run (embedding API, checks)": lambda: ours.run(feed),
        "backend.run (what `run --json` times)": lambda: ours.backend.run(feed),
        "second bare session (noise floor)": lambda: bare2.run(out_names, feed),
        "bare InferenceSession.run": lambda: bare.run(out_names, feed),
    }
    samples: dict[str, list[float]] = {k: [] for k in sides}
    ratios: dict[str, list[float]] = {k: [] for k in sides}
    names = list(sides)
    for i in range(args.rounds):   # rotate the order: no side always runs first
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            samples[name] += timed_block(sides[name], args.block)
        base = statistics.median(samples[names[-1]][-args.block:])
        for name in names:
            ratios[name].append(statistics.median(samples[name][-args.block:]) / base)
    print(f"model {Path(args.model).name}, threads {args.threads}, {args.rounds * args.block} "
          f"runs each, interleaved in rotating blocks of {args.block}")
    for name in names:
        print(f"{name:<52} p50 {statistics.median(samples[name]):.4f} ms  ratio "
              f"{statistics.median(ratios[name]):.4f}")
    print("goal: ratio <= 1.02 (ratio = median of per-round ratios to the bare session)")
    imports = sorted(import_ms() for _ in range(5))
    print(f"import device_runtime       {imports[2]:.1f} ms (median of 5)   goal <= 50 ms")


if __name__ == "__main__":
    main()
