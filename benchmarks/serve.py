"""Deploy and operate on the local device, measured in one run (#35's goals).

    python benchmarks/serve.py [--model examples/models/digits_mnv2.onnx] [--calls 12000]

1. Updating a running app: an application process calls `device_runtime.serve(NAME)` in a loop
   while the host deploys 5 versions and rolls back once. Goals: 0 failed calls over >= 10,000
   calls; the slowest call within a second of a swap <= 2x the p99 of the calls away from swaps.
2. Telemetry overhead: the same version served with and without telemetry, in interleaved
   blocks. Goal: <= 2 %.
3. Rollback: from `rollback()` until the app answers with the previous version. Goal: <= 1 s.

Versions are the model with its last bias shifted (same predictions, other bytes). Prints the
CPU it ran on and whether the machine was busy.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

APP = textwrap.dedent("""
    import json, os, sys, time
    import numpy as np
    import device_runtime
    name, store, stop, samples, calls = sys.argv[1:6]
    x = np.load(samples)["input"][:1]
    served = device_runtime.serve(name, store)
    log, failures = [], 0
    while not (os.path.exists(stop) and len(log) >= int(calls)):
        t0 = time.perf_counter()
        try:
            served.run({"input": x})
        except Exception:
            failures += 1
            continue
        log.append((time.time(), (time.perf_counter() - t0) * 1e3, served.last_version))
    served.close()
    print(json.dumps({"failures": failures, "log": log}))
""")


def shifted(model_path: Path, k: int, out: Path) -> Path:
    proto = onnx.load(str(model_path))
    last = [n for n in proto.graph.node if n.op_type in ("Gemm", "Conv", "MatMul")][-1]
    for init in proto.graph.initializer:
        if len(last.input) > 2 and init.name == last.input[2]:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + np.float32(
                k / 1000), init.name))
    path = out / f"v{k}.onnx"
    onnx.save(proto, str(path))
    return path


def busy_share(seconds: float = 1.0) -> float:
    """Other processes' share of the CPUs over `seconds` (from /proc/stat)."""
    def ticks():
        fields = [int(v) for v in open("/proc/stat").readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]
    (t0, i0), _ = ticks(), time.sleep(seconds)
    t1, i1 = ticks()
    return 1 - (i1 - i0) / max(1, t1 - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(ROOT / "examples/models/digits_mnv2.onnx"))
    parser.add_argument("--calls", type=int, default=12000)
    args = parser.parse_args()
    from device_runtime import facts

    from edgesmith.deploy import deploy, rollback
    from edgesmith.devices import get_device
    from edgesmith.model import load
    from edgesmith.profiling import prepare

    print(f"CPU: {facts.collect(with_providers=False).get('cpu')}; busy before: "
          f"{busy_share():.0%} of the cores")
    model = Path(args.model)
    samples = model.with_name(model.stem + "_eval.npz")
    work = Path(tempfile.mkdtemp(prefix="edgesmith-serve-bench-"))
    store, local = work / "store", get_device("local")
    bundles = [prepare(load(shifted(model, k, work)), samples) for k in range(6)]
    assert deploy(bundles[0].path, "bench", [local], store=str(store))[0].activated

    # 1. swaps under a running app
    stop = work / "stop"
    (work / "app.py").write_text(APP)
    app = subprocess.Popen([sys.executable, str(work / "app.py"), "bench", str(store), str(stop),
                            str(samples), str(args.calls)], stdout=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    time.sleep(2.0)
    swaps = []
    for k in range(1, 6):
        swaps.append(time.time())
        row = deploy(bundles[k].path, "bench", [local], store=str(store))[0]
        assert row.activated, row
        time.sleep(1.0)
    swaps.append(time.time())
    assert rollback("bench", [local], store=str(store))[0].ok
    time.sleep(1.5)         # a second after the last swap; the app stops at --calls calls
    stop.write_text("")
    out = json.loads(app.communicate(timeout=120)[0])
    log = out["log"]
    near = [ms for t, ms, _ in log if any(0 <= t - s <= 1.0 for s in swaps)]
    away = sorted(ms for t, ms, _ in log if all(not 0 <= t - s <= 1.0 for s in swaps))
    p99 = away[int(0.99 * len(away))]
    versions = []
    for _, _, v in log:
        if not versions or versions[-1] != v:
            versions.append(v)
    print(f"1. {len(log)} calls, {out['failures']} failed, versions served in order {versions}; "
          f"slowest call within 1 s of a swap {max(near):.3f} ms = {max(near) / p99:.2f}x the "
          f"p99 away from swaps ({p99:.3f} ms)   goal: 0 failed, >= 10,000 calls, <= 2x")

    # 2. telemetry overhead, interleaved blocks on the active version
    import device_runtime
    x = np.load(samples)["input"][:1]
    on = device_runtime.serve("bench", store, flush_s=3600)
    off = device_runtime.serve("bench", store, telemetry=False)
    blocks = {True: [], False: []}
    for i in range(14):
        for flag, served in ((True, on), (False, off))[::1 if i % 2 else -1]:
            t0 = time.perf_counter()
            for _ in range(300):
                served.run({"input": x})
            blocks[flag].append((time.perf_counter() - t0) / 300 * 1e3)
    ratio = statistics.median(blocks[True]) / statistics.median(blocks[False])
    print(f"2. telemetry on {statistics.median(blocks[True]):.4f} ms vs off "
          f"{statistics.median(blocks[False]):.4f} ms per call: {100 * (ratio - 1):+.1f} %   "
          "goal: <= 2 %")

    # 3. rollback until the app answers with the previous version
    served = device_runtime.serve("bench", store, telemetry=False)
    running, seen_at = True, {}

    def loop():
        while running:
            served.run({"input": x})
            seen_at.setdefault(served.last_version, time.perf_counter())
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    time.sleep(0.5)
    before = served.last_version
    t0 = time.perf_counter()
    back = rollback("bench", [local], store=str(store))[0]
    while back.active not in seen_at and time.perf_counter() - t0 < 10:
        time.sleep(0.005)
    running = False
    thread.join()
    took = seen_at.get(back.active, float("inf")) - t0
    print(f"3. rollback {before} -> {back.active}: served after {took:.3f} s   goal: <= 1 s")
    print(f"busy after: {busy_share():.0%} of the cores")


if __name__ == "__main__":
    main()
