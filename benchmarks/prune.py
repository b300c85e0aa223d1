"""Channel pruning: MACs ratio vs measured latency ratio, and accuracy before/after distillation.

    python benchmarks/prune.py [--epochs 6]

For the MobileNetV2-style and ResNet-style digits examples at 30 % and 50 % channel pruning:
MACs ratio, onnxruntime latency ratio (1 thread, interleaved; goal: within 15 % of the MACs
ratio), top-1 before pruning, after pruning, and after distillation (needs the `train` extra).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]


def session(proto):
    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), o, providers=["CPUExecutionProvider"])


def latency_ratio(a, b, x, rounds=20, block=10) -> float:
    sa, sb, feed = session(a), session(b), {"input": x[:1]}
    ratios = []
    for i in range(rounds):
        med = {}
        for name, s in ((("a", sa), ("b", sb)) if i % 2 == 0 else (("b", sb), ("a", sa))):
            t = []
            for _ in range(block):
                t0 = time.perf_counter()
                s.run(None, feed)
                t.append(time.perf_counter() - t0)
            med[name] = statistics.median(t)
        ratios.append(med["b"] / med["a"])
    return statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    os.environ.setdefault("EDGESMITH_CACHE", tempfile.mkdtemp(prefix="edgesmith-prune-"))
    import digits
    from device_runtime.evaluate import EvalData
    from edgesmith.data import load_eval_set
    from edgesmith.model import from_proto, load
    from edgesmith.passes.distill import DistillConfig, distill, evaluate
    from edgesmith.passes.prune import PruneConfig, prune_channels

    x_train, y_train, _, _ = digits.load(96)
    train = EvalData({"input": x_train}, y_train, {}, len(y_train))
    for name in ("digits_mnv2", "digits_resnet"):
        m = load(ROOT / "examples/models" / f"{name}.onnx")
        ev = load_eval_set(ROOT / "examples/models" / f"{name}_eval.npz", m)
        base = evaluate(m.proto, ev)
        for ratio in (0.3, 0.5):
            pruned, _ = prune_channels(m.proto, PruneConfig(ratio=ratio))
            p = from_proto(pruned, m)
            mac_ratio = p.facts.macs / m.facts.macs
            lat = latency_ratio(m.proto, pruned, ev.inputs["input"])
            t0 = time.time()
            distilled, report = distill(pruned, DistillConfig(m.proto, train, ev,
                                                              epochs=args.epochs, shift=6))
            print(f"{name} prune {ratio:.0%}: MACs ratio {mac_ratio:.3f}, latency ratio "
                  f"{lat:.3f} (|lat/MACs - 1| = {abs(lat / mac_ratio - 1):.2f}, goal <= 0.15); "
                  f"top-1 {base:.4f} -> pruned {evaluate(pruned, ev):.4f} -> distilled "
                  f"{report.metrics['student_top1_after']:.4f} ({args.epochs} epochs, "
                  f"{time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
