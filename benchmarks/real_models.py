"""Real model kinds: int8 and 30 % structured pruning on the YOLOv8-style detector at 320x320.

Ratios measured in one run, 1 thread, interleaved (rotating order, median of rounds):
int8 latency vs fp32 and its output SQNR on held-out inputs (goal <= 0.70x at >= 25 dB); 30 %
structured pruning: MACs ratio (goal <= 0.75x) and latency ratio (goal within 1.25x of the MACs
ratio), for kept channel counts in multiples of 8 and 16 (the matched target profile's
`channel_multiple` is the one `prune` and `optimize` use; this measures that choice). The detector comes from tests/corpus.py (seeded random weights: fidelity is judged
against its own fp32 outputs). Needs the `train` extra (torch) to build the corpus.

    python benchmarks/real_models.py [--size 320] [--rounds 7]
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    noise = float(((ref - out) ** 2).sum())
    return 200.0 if noise == 0 else 10 * np.log10(float((ref ** 2).sum()) / noise)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    import corpus
    from quantize import interleaved, session       # the same timing as the quantize benchmark
    from edgesmith.devices import get_device
    from edgesmith.model import from_proto, load
    from edgesmith.passes.fuse import fuse
    from edgesmith.passes.prune import PruneConfig, prune_channels
    from edgesmith.data import reference_outputs
    from edgesmith.search.int8 import QuantData, choose_recipe
    from edgesmith.targets import match

    print(f"CPU: {cpu_name()}; 1 thread; YOLOv8-style detector at {args.size}x{args.size}")
    path = corpus.build([("yolo", "ts17")])[("yolo", "ts17")]
    shape = [1, 3, args.size, args.size]
    model = load(path, {"input": shape})
    fused = from_proto(fuse(model.proto)[0], model)
    rng = np.random.default_rng(0)
    calib = [{"input": rng.standard_normal(shape).astype(np.float32)} for _ in range(16)]
    held = rng.standard_normal((8, *shape[1:])).astype(np.float32)
    from device_runtime.evaluate import EvalData
    judge = EvalData({"input": held}, None, {}, len(held))
    judge.refs = reference_outputs(model, judge, 1)
    t0 = time.time()
    q_model, report = choose_recipe(fused, get_device("local"), QuantData(batches=calib, eval=judge, batch=1,
                                                                  judged_on=f"{len(held)} random inputs"),
                                    max_accuracy_drop=0.0)
    print(f"int8 search: {report.summary} ({time.time() - t0:.0f} s)")
    device = get_device("local")
    profile = match(device.facts()).profile
    multiples = sorted({8, 16, profile.channel_multiple})
    pruned, prep = {}, {}
    for k in multiples:          # the target's channel multiple, measured against the others
        proto, prep[k] = prune_channels(fused.proto, PruneConfig(
            ratio=0.3, input_shapes=model.input_shapes, round_to=k))
        pruned[k] = from_proto(proto, model)
    sessions = {"fp32": session(fused.proto), "int8": session(q_model.proto),
                **{f"pruned30/{k}": session(pruned[k].proto) for k in multiples}}
    lat = interleaved(sessions, held[:1], args.rounds, block=20)
    ref = np.concatenate([sessions["fp32"].run(None, {"input": held[i:i + 1]})[0]
                          for i in range(len(held))])
    out = np.concatenate([sessions["int8"].run(None, {"input": held[i:i + 1]})[0]
                          for i in range(len(held))])
    print("latency p50 ms: " + "  ".join(f"{k} {v:.2f}" for k, v in lat.items()))
    print(f"int8: {lat['int8'] / lat['fp32']:.2f}x fp32 latency (goal <= 0.70) at "
          f"{sqnr(ref, out):.1f} dB output SQNR on held-out inputs (goal >= 25)")
    for k in multiples:
        macs = pruned[k].facts.macs / fused.facts.macs
        ratio = lat[f"pruned30/{k}"] / lat["fp32"]
        mark = f" <- target {profile.name}'s multiple" if k == profile.channel_multiple else ""
        print(f"prune 30%, channels in multiples of {k}: MACs {macs:.2f}x (goal <= 0.75), "
              f"latency {ratio:.2f}x = {ratio / macs:.2f} x the MACs ratio (goal <= 1.25); "
              f"{len(prep[k].metrics.get('skipped', {}))} producer(s) frozen{mark}")


if __name__ == "__main__":
    main()
