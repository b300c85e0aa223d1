"""A streaming VAD-class model through `edgesmith quantize`: judged over whole held-out streams
with the state carried, the decisions of the int8 choice against fp32's, and the latency of one
call, plain onnxruntime at 1 thread, interleaved.

    python benchmarks/streaming.py [--hidden 64,256] [--rounds 15]

Model: tests/streaming_vad.py (LSTM over a 512-sample chunk's frames, a scalar `sr` picking a
branch of an If, state 2x1xH carried; seeded weights, the head fitted to loudness). Data:
synthetic talk spurts and silence, 300 chunks to calibrate, 200 to judge (given to quantize as
--eval), and 3 more streams of 200 chunks never shown to edgesmith (the folds reported).
Goals (#36): judged over >= 100 consecutive chunks with state carried; int8 (where it pays)
within 1 % of fp32's speech/no-speech decisions; host peak memory of quantize <= 2 GB.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests")]


def decisions(path: Path, audio: np.ndarray, hidden: int) -> np.ndarray:
    import streaming_vad as vad

    return vad.run(path, audio, hidden, threads=1)[0] > 0.5


def call_ms(paths: list[Path], hidden: int, rounds: int) -> list[float]:
    """Median per-round ms of one call from a carried state, interleaved in rotating order."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sessions = [ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
                for p in paths]
    feed = {"input": np.random.default_rng(0).standard_normal((1, 512)).astype(np.float32),
            "state": np.zeros((2, 1, hidden), np.float32), "sr": np.array(16000, np.int64)}
    per = [[] for _ in paths]
    for r in range(rounds):
        for i in (range(len(paths)) if r % 2 == 0 else reversed(range(len(paths)))):
            times = []
            for _ in range(300):
                t0 = time.perf_counter()
                sessions[i].run(None, feed)
                times.append(time.perf_counter() - t0)
            per[i].append(statistics.median(times) * 1e3)
    return [statistics.median(p) for p in per]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", default="64,256")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    import streaming_vad as vad
    from device_runtime import facts

    print(f"CPU: {facts.collect(with_providers=False).get('cpu')} ({os.cpu_count()} cores)")
    tmp = Path(tempfile.mkdtemp(prefix="edgesmith-stream-"))
    for hidden in (int(h) for h in args.hidden.split(",")):
        model = vad.build(tmp / f"vad{hidden}.onnx", hidden=hidden)
        vad.save_data(tmp / "calib.npz", 300, seed=1)
        vad.save_data(tmp / "eval.npz", 200, seed=2)
        out = tmp / f"vad{hidden}_q.onnx"
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        proc = subprocess.run([sys.executable, "-m", "edgesmith", "quantize", str(model),
                               "--calib", str(tmp / "calib.npz"), "--eval", str(tmp / "eval.npz"),
                               "-o", str(out), "--json", str(tmp / "q.json")],
                              capture_output=True, text=True, timeout=1800)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if proc.returncode != 0:
            print(f"hidden {hidden}: quantize failed: {proc.stderr.strip()[-300:]}")
            continue
        report = json.loads((tmp / "q.json").read_text())
        judged = report["baseline"]["accuracy"]["n"]
        rows = {c["id"]: c for c in report["candidates"] if c.get("accuracy")}
        dyn = tmp / f"vad{hidden}_dyn.onnx"
        subprocess.run([sys.executable, "-m", "edgesmith", "quantize", str(model), "--calib",
                        str(tmp / "calib.npz"), "--eval", str(tmp / "eval.npz"), "--recipe",
                        "dynamic-int8", "-o", str(dyn)], capture_output=True, timeout=1800)
        folds = []
        for seed in (11, 12, 13):             # never shown to edgesmith
            audio, _ = vad.stream(200, seed)
            fp32 = decisions(model, audio, hidden)
            folds.append([float(np.mean(decisions(p, audio, hidden) == fp32))
                          for p in (out, dyn) if p.is_file()])
        ms = call_ms([model, dyn], hidden, args.rounds)
        print(f"hidden {hidden}: chose {report['chosen']['id']} (judged on {judged} consecutive calls, "
              f"state carried); candidates' decision agreement on --eval: "
              + ", ".join(f"{k} {v['accuracy'].get('agreement', float('nan')):.3f}"
                          for k, v in rows.items()))
        print(f"  held-out folds (3 streams x 200 chunks): chosen model's decisions = fp32's on "
              f"{', '.join(f'{f[0]:.3f}' for f in folds)}; dynamic int8's on "
              f"{', '.join(f'{f[-1]:.3f}' for f in folds)}")
        print(f"  one call, 1 thread, interleaved: fp32 {ms[0]:.4f} ms, dynamic int8 "
              f"{ms[1]:.4f} ms ({ms[1] / ms[0]:.2f}x); quantize host peak RSS "
              f"{max(peak, before) / 1024:.0f} MB")


if __name__ == "__main__":
    main()
