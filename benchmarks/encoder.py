"""A MiniLM-L6-size sentence encoder (width 384, 12 heads, 6 layers, 128 tokens; seeded random
weights, tests/text_encoder.py) through `edgesmith quantize` on the local device.

Goal (#36): int8 at cosine similarity >= 0.99 with fp32's embeddings on held-out sentences and
<= 0.7x fp32's latency. Latency: the interleaved confirmation's medians (fp32 and the chosen
recipe in the same rounds, onnxruntime's default threads); fidelity: every held-out sentence
run on the host with onnxruntime, the model written against the original (never seen by the
search: calibration and judging use other sentences). Also prints the quantize process's
host peak memory. Needs torch (the `train` extra) to export the model.

    python benchmarks/encoder.py [--seq 128] [--layers 6]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]


def main() -> None:
    import onnxruntime as ort

    from real_models import cpu_name
    from text_encoder import export, tokens

    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--layers", type=int, default=6)
    a = ap.parse_args()
    print(f"cpu: {cpu_name()}")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        export(d / "encoder.onnx", 384, 12, a.layers, a.seq)
        for name, seed in (("calib", 1), ("judge", 2)):
            np.savez(d / f"{name}.npz", **tokens(64, a.seq, seed))
        final = tokens(128, a.seq, 3)               # looked at once, after the choice
        proc = subprocess.run([sys.executable, "-m", "edgesmith", "quantize", d / "encoder.onnx",
                               "--calib", d / "calib.npz", "--eval", d / "judge.npz",
                               "-o", d / "q.onnx", "--json", d / "q.json"],
                              capture_output=True, text=True, timeout=1800)
        if proc.returncode:
            sys.exit(proc.stderr)
        report = json.loads((d / "q.json").read_text())
        base, chosen = report["baseline"], report["chosen"]
        sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
                    for p in (d / "encoder.onnx", d / "q.onnx")]
        ref, out = (np.concatenate([s.run(None, {k: v[i:i + 1] for k, v in final.items()})[0]
                                    for i in range(len(final["input_ids"]))]) for s in sessions)
        cos = (ref * out).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(out, axis=1)
        print(f"chosen: {chosen['id']}  ({report['summary']})")
        if chosen["id"] != base["id"] and chosen.get("confirm") and base.get("confirm"):
            ratio = chosen["confirm"]["median_ms"] / base["confirm"]["median_ms"]
            print(f"latency: {chosen['confirm']['median_ms']:.2f} ms vs fp32 "
                  f"{base['confirm']['median_ms']:.2f} ms interleaved = {ratio:.2f}x "
                  f"(goal <= 0.70x: {'met' if ratio <= 0.7 else 'NOT met'})")
        print(f"held-out cosine vs fp32: min {cos.min():.5f}, mean {cos.mean():.5f} over "
              f"{len(cos)} sentences (goal >= 0.99: {'met' if cos.min() >= 0.99 else 'NOT met'})")
        peak = max(c.get("host_peak_rss_mb") or 0 for c in report["candidates"])
        print(f"quantize host peak RSS: {peak:.0f} MB (goal <= 2048 MB: "
              f"{'met' if peak <= 2048 else 'NOT met'})")


if __name__ == "__main__":
    main()
