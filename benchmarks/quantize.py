"""fp32 vs onnxruntime's `quantize_static` defaults vs edgesmith's chosen recipe, in one run.

    python benchmarks/quantize.py [--models digits_mnv2 digits_resnet imagenet_mnv2]

Per model: latency ratios re-measured interleaved (batch 1, 1 thread, ORT_ENABLE_ALL), accuracy
(digits: top-1 vs labels; ImageNet MobileNetV2: top-1 agreement and SQNR vs fp32 on real photos,
built by examples/imagenet_mobilenetv2.py), size, time to quantize and peak host memory.
Goals: ours <= 0.65x fp32 latency, >= 1.4x faster than ORT defaults, digits drop <= 1%,
ImageNet MobileNetV2 agreement >= 0.95 and SQNR >= 20 dB.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "examples" / "models"
sys.path.insert(0, str(ROOT))


def session(proto):
    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), o, providers=["CPUExecutionProvider"])


def interleaved(sessions: dict, x: np.ndarray, rounds: int = 15, block: int = 10) -> dict:
    feed = {"input": x[:1]}
    for s in sessions.values():
        for _ in range(3):
            s.run(None, feed)
    meds: dict[str, list] = {k: [] for k in sessions}
    names = list(sessions)
    for i in range(rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            t = []
            for _ in range(block):
                t0 = time.perf_counter()
                sessions[name].run(None, feed)
                t.append(time.perf_counter() - t0)
            meds[name].append(statistics.median(t) * 1e3)
    return {k: statistics.median(v) for k, v in meds.items()}


def quality(proto, x, y, ref):
    s = session(proto)
    out = np.concatenate([s.run(None, {"input": x[i:i + 16]})[0] for i in range(0, len(x), 16)])
    r = {"agreement": float(np.mean(out.argmax(1) == ref.argmax(1))),
         "sqnr_db": float(min(200.0, 10 * np.log10((ref ** 2).sum() /
                                                  max(((ref - out) ** 2).sum(), 1e-30))))}
    if y is not None:
        r["top1"] = float(np.mean(out.argmax(1) == y))
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*",
                        default=["digits_mnv2", "digits_resnet", "imagenet_mnv2"])
    args = parser.parse_args()
    os.environ.setdefault("EDGESMITH_CACHE", tempfile.mkdtemp(prefix="edgesmith-qbench-"))
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    from sdk.data import calibration_batches
    from sdk.devices import Job, get_device
    from sdk.model import load
    from sdk.passes.quantize import _Reader, preprocess
    from sdk.recipes import choose_recipe

    for name in args.models:
        onnx_path = MODELS / f"{name}.onnx"
        if not onnx_path.exists():
            print(f"{name}: skipped ({onnx_path} missing; run examples/imagenet_mobilenetv2.py)")
            continue
        imagenet = name.startswith("imagenet")
        calib = MODELS / (f"{name}_calib.npz" if imagenet else f"{name}_eval.npz")
        evalset = MODELS / (f"{name}_photos.npz" if imagenet else f"{name}_eval.npz")
        data = np.load(evalset)
        x, y = data["input"], (None if imagenet else data["labels"])
        model = load(onnx_path)
        pre = preprocess(model.proto, model.input_shapes)
        ref = np.concatenate([session(pre).run(None, {"input": x[i:i + 16]})[0]
                              for i in range(0, len(x), 16)])
        with tempfile.TemporaryDirectory() as tmp:   # ORT's defaults: QDQ, S8S8, per-tensor
            src, dst = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
            src.write_bytes(pre.SerializeToString())
            t0 = time.time()
            ort_quantize_static(str(src), str(dst),
                                _Reader(calibration_batches(calib, model, 16)))
            ort_time = time.time() - t0
            import onnx
            ort_default = onnx.load(str(dst))
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.time()
        chosen, report = choose_recipe(model, get_device("local"), calib, evalset,
                                       0.05 if imagenet else 0.01,
                                       job=Job(runs=30, warmup=5, threads=1, min_time_s=0.5))
        our_time = time.time() - t0
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        lat = interleaved({"fp32": session(pre), "ort": session(ort_default),
                           "ours": session(chosen.proto)}, x)
        q_ort, q_ours = quality(ort_default, x, y, ref), quality(chosen.proto, x, y, ref)
        fp = quality(pre, x, y, ref)
        size = {k: len(p.SerializeToString()) / 1e6 for k, p in
                (("fp32", pre), ("ort", ort_default), ("ours", chosen.proto))}
        print(f"\n{name}: chosen {report.chosen.recipe} ({report.summary})")
        print(f"  latency p50 ms: fp32 {lat['fp32']:.3f}  ort-default {lat['ort']:.3f}  "
              f"ours {lat['ours']:.3f}")
        print(f"  ours/fp32 {lat['ours'] / lat['fp32']:.2f}x (goal <= 0.65)  "
              f"ort-default/fp32 {lat['ort'] / lat['fp32']:.2f}x  "
              f"ours vs ort-default {lat['ort'] / lat['ours']:.2f}x faster (goal >= 1.4)")
        for label, q in (("fp32", fp), ("ort-default", q_ort), ("ours", q_ours)):
            print(f"  {label:<12} " + "  ".join(f"{k} {v:.4f}" for k, v in q.items()))
        print(f"  size MB: fp32 {size['fp32']:.2f} ort {size['ort']:.2f} ours {size['ours']:.2f}"
              f"; time to quantize: ort {ort_time:.1f}s, ours (search incl. device runs) "
              f"{our_time:.1f}s; host peak RSS {rss1:.0f} MB (+{rss1 - rss0:.0f} during search)")


if __name__ == "__main__":
    main()
