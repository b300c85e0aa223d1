"""edgesmith's fused inverted-residual kernels against the best onnxruntime-only variant.

    python examples/imagenet_mobilenetv2.py      # once: writes examples/models/imagenet_mnv2.onnx
    python benchmarks/kernels.py [--model M] [--rounds 7] [--threads 1]

One run on the local device: the best onnxruntime-only config (tuned: optimisation level and
spinning, at --threads), then the model on edgesmith's kernels at each `edgesmith_kernels` setting
the target profiles search (every block at a band height, the kernel's own tuning knob, 0 = its
default; or only the blocks whose output is at least S pixels a side, "0@S"), all measured
interleaved in the same rounds. Prints the CPU, each variant's median and spread, the ratio of
the best kernel variant to the best onnxruntime-only one (goal: >= 1.15x), whether the
autotuner's pick is at least as fast as the kernel's default, the outputs' largest relative
difference (goal: <= 1e-4), and the per-block profile that says where the kernels won or lost.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SETTINGS = (0, 4, 8, "0@14", "0@28", "0@56")    # 0 here: every block at the kernel's default band


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "examples/models/imagenet_mnv2.onnx"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads for every variant (the goal is set at 1)")
    args = parser.parse_args()
    os.environ.setdefault("EDGESMITH_CACHE", tempfile.mkdtemp(prefix="edgesmith-kbench-"))
    from edgesmith import bundle as bundles
    from edgesmith.devices import Job, get_device
    from edgesmith.own_kernels import LIBRARY, breakdown, host_library, numerics_error
    from edgesmith.own_kernels import rewrite_for_device
    from edgesmith.measure import interleave, measure
    from edgesmith.model import load
    from edgesmith.passes.fuse import fuse
    from edgesmith.search.tune import tune
    from edgesmith.variants import kernel_setting, space

    dev = get_device("local")
    facts = dev.facts()
    threads = args.threads
    print(f"CPU: {facts['cpu']} ({facts['arch']}; {', '.join(facts['cpu_flags'])}), "
          f"{threads} thread(s)")
    model = load(args.model)
    job = Job(runs=30, warmup=5, min_time_s=1.0, threads=threads, evaluate=False)
    ort_only = tune(model, dev, search_space=space(     # every trial at the job's threads
        {"graph_optimization_level": ["all", "extended"], "allow_spinning": [True, False]},
        facts, "onnxruntime"),
        measure_settings={"runs": 30, "warmup": 5, "min_time_s": 1.0, "threads": threads},
        fresh=True)
    best_ort = {**ort_only.best.config, "intra_op_threads": threads}
    print(f"best onnxruntime-only variant: {ort_only.best.id} ({ort_only.verdict})")
    trials = {"onnxruntime": (bundles.build(model), replace(job, config=best_ort))}
    made = {}
    for setting in SETTINGS:
        rewritten, files, info = rewrite_for_device(model, *kernel_setting(setting), facts)
        made[str(setting)] = (rewritten, info)
        config = {**best_ort, "custom_op_libraries": [LIBRARY]}
        trials[f"edgesmith {setting}"] = (bundles.build(rewritten, extra_files=files),
                                          replace(job, config=config))
        print(f"edgesmith {setting}: {len(info['blocks'])} blocks rewritten, {info['isa']} build")
    print(f"measuring {len(trials)} variants interleaved x{args.rounds}")
    spreads = interleave(dev, trials, args.rounds)
    for name, s in spreads.items():
        print(f"  {name:22s} median {s.median_ms:7.3f} ms  ({s.low_ms:.3f}-{s.high_ms:.3f})")
    ours = min((n for n in spreads if n != "onnxruntime"), key=lambda n: spreads[n].median_ms)
    ratio = spreads["onnxruntime"].median_ms / spreads[ours].median_ms
    print(f"best kernel variant {ours}: {ratio:.3f}x the best onnxruntime-only variant "
          f"(goal >= 1.15x: {'met' if ratio >= 1.15 else 'NOT met'}); "
          f"{'within' if spreads['onnxruntime'].overlaps(spreads[ours]) else 'outside'} "
          "the rounds' spread")
    default = spreads["edgesmith 0"].median_ms
    verdict = "never slower: ok" if spreads[ours].median_ms <= default else "SLOWER"
    print(f"autotune: {ours} {spreads[ours].median_ms:.3f} ms vs the kernel's default "
          f"{default:.3f} ms ({verdict})")
    pick = ours.split(" ", 1)[1]
    plain = fuse(model.proto)[0]
    error = numerics_error(plain, made[pick][0].proto, {s.name: s for s in model.inputs},
                           host_library())
    print(f"largest relative output difference: {error:.2e} (goal <= 1e-4)")
    profiles = []
    for _ in range(3):                   # interleaved rounds: where they disagree it is a tie
        profiles.append(tuple(
            measure(dev, bundle, replace(j, runs=20, min_time_s=0, profile_ops=True))
            .node_profile_ms or {} for bundle, j in (trials["onnxruntime"], trials[ours])))
    print("per block (ms per run, per-node profile less the profiler's own cost per node, "
          "median of 3 rounds):")
    for row in breakdown(made[pick][1], profiles,
                         (spreads["onnxruntime"].median_ms, spreads[ours].median_ms)):
        print(f"  {row['block'].strip('/').split('/')[1] if '/' in row['block'] else row['block']:14s}"
              f" {row['channels']:>13s} s{row['stride']} {row['output_hw']:>7s}  onnxruntime "
              f"{row['onnxruntime_ms']:.3f}  edgesmith {row['edgesmith_ms'] or 0:.3f}  "
              f"{row.get('verdict', '')}")


if __name__ == "__main__":
    main()
