"""edgesmith's fused inverted-residual kernels against the best onnxruntime-only variant.

    python examples/imagenet_mobilenetv2.py      # once: writes examples/models/imagenet_mnv2.onnx
    python benchmarks/kernels.py [--model M] [--rounds 7] [--threads 1]
    python benchmarks/kernels.py --int8 qdq-u8s8-cle-bc     # the int8 kernels on that recipe
    python benchmarks/kernels.py --int8 qdq-u8s8-cle-bc --build avx2   # another x86 build

--build ISA runs the kernels built for another x86 instruction set on this host (avx-vnni on
a host with AVX-512 VNNI but no AVX-VNNI: its 256-bit vpdpbusd in EVEX form, scripts/evex-cc).
onnxruntime still runs with this CPU's best kernels, so that ratio is ours-with-less against
onnxruntime-with-all, not what a host with only that instruction set would see.

With --int8 RECIPE the model is first quantized by `edgesmith quantize --recipe RECIPE` on
the example's calibration photos, and the variants run edgesmith's int8 kernel on the same
grid: the outputs must equal onnxruntime's int8 run on >= 99.9 % of elements, never more than
one quantization step apart (goal: >= 1.5x on an AVX-512 VNNI host, >= 1.3x with AVX2 only).

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
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
SETTINGS = (0, 4, 8, "0@14", "0@28", "0@56")    # 0 here: every block at the kernel's default band
BUILD_FLAGS = {"avx512": ["avx512f", "avx2", "fma", "avx512bw", "avx512vl", "avx512_vnni"],
               "avx-vnni": ["avx2", "fma", "avx_vnni"], "avx2": ["avx2", "fma"], "sse": []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "examples/models/imagenet_mnv2.onnx"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads for every variant (the goal is set at 1)")
    parser.add_argument("--int8", metavar="RECIPE",
                        help="quantize --model with this recipe first; time the int8 kernels")
    parser.add_argument("--build", choices=sorted(BUILD_FLAGS),
                        help="time the kernels built for this x86 instruction set instead")
    args = parser.parse_args()
    os.environ.setdefault("EDGESMITH_CACHE", tempfile.mkdtemp(prefix="edgesmith-kbench-"))
    if args.int8:
        args.model = quantized(args.model, args.int8)
    from edgesmith import bundle as bundles
    from edgesmith.devices import Job, get_device
    from edgesmith.own_kernels import LIBRARY, breakdown, build, int8_agreement
    from edgesmith.own_kernels import numerics_error
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
    built_for = facts
    if args.build:
        from qdq_blocks import avx_vnni_stand_in

        env = avx_vnni_stand_in(facts["cpu_flags"], os.environ.get("CC", "cc")) \
            if args.build == "avx-vnni" else {} \
            if set(BUILD_FLAGS[args.build]) <= set(facts["cpu_flags"]) else None
        if env is None:
            sys.exit(f"this CPU cannot run the {args.build} build")
        if env and not args.int8:   # the EVEX stand-in turns on AVX-512 for the float kernel
            sys.exit("--build avx-vnni on a CPU without AVX-VNNI times the int8 kernel only "
                     "(pass --int8 RECIPE)")
        os.environ.update(env)
        built_for = {**facts, "cpu_flags": BUILD_FLAGS[args.build]}
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
        rewritten, files, info = rewrite_for_device(model, *kernel_setting(setting),
                                                  built_for)
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
    goal = (1.5 if "avx512_vnni" in built_for["cpu_flags"] else 1.3) if args.int8 else 1.15
    print(f"best kernel variant {ours}: {ratio:.3f}x the best onnxruntime-only variant "
          f"(goal >= {goal}x: {'met' if ratio >= goal else 'NOT met'}); "
          f"{'within' if spreads['onnxruntime'].overlaps(spreads[ours]) else 'outside'} "
          "the rounds' spread")
    default = spreads["edgesmith 0"].median_ms
    verdict = "never slower: ok" if spreads[ours].median_ms <= default else "SLOWER"
    print(f"autotune: {ours} {spreads[ours].median_ms:.3f} ms vs the kernel's default "
          f"{default:.3f} ms ({verdict})")
    pick = ours.split(" ", 1)[1]
    inputs = {s.name: s for s in model.inputs}
    if args.int8:
        equal, steps = int8_agreement(model.proto, made[pick][0].proto, inputs,
                                      build(built_for)[0])   # the build that ran
        print(f"outputs equal to onnxruntime's int8 run: {equal:.4%} of elements, at most "
              f"{steps:g} quantization steps apart (goal >= 99.9 %, <= 1)")
    else:
        error = numerics_error(fuse(model.proto)[0], made[pick][0].proto, inputs,
                               build(built_for)[0])
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


def quantized(model: str, recipe: str) -> str:
    """`model` quantized with `recipe` by edgesmith's own CLI on the example's calibration set."""
    import subprocess

    out = Path(os.environ["EDGESMITH_CACHE"]) / f"{Path(model).stem}-{recipe}.onnx"
    calib = ROOT / "examples/models/imagenet_mnv2_calib.npz"
    done = subprocess.run([sys.executable, "-m", "edgesmith", "quantize", model, "--calib",
                           str(calib), "--recipe", recipe, "-o", str(out)],
                          capture_output=True, text=True, timeout=1800)
    if done.returncode:
        sys.exit(f"quantize --recipe {recipe} failed: {done.stderr.strip()[-500:]}")
    print(done.stdout.strip().splitlines()[-2] if done.stdout.strip() else "")
    return str(out)


if __name__ == "__main__":
    main()
