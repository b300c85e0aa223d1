"""LiteRT (XNNPACK) against onnxruntime on the same models, fp32 and int8, 1 thread, interleaved.

ImageNet MobileNetV2 (examples/imagenet_mobilenetv2.py: real torchvision weights, real photos):
fp32 under onnxruntime vs its .tflite under LiteRT; int8 (qdq-u8s8 calibrated on crops of 7
photos) under onnxruntime vs the int8 .tflite converted from that same model. Fidelity on crops
of the 4 other photos: the fp32 .tflite against the ONNX model, the int8 .tflite against our int8
ONNX model (top-1 agreement, SQNR), and each int8 model against fp32. Then XNNPACK's share of
every kind of the real-model corpus (one export per kind). Ratios come from one run, in rotating
order, medians of rounds. Needs the `tflite-convert` extra.

    python benchmarks/tflite.py [--rounds 9] [--no-corpus]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks"), str(ROOT / "examples")]
MODEL = ROOT / "examples" / "models" / "imagenet_mnv2.onnx"


class LiteRT:
    """A .tflite under the device runtime's backend, timed like an onnxruntime session."""

    def __init__(self, data: bytes):
        from device_runtime.backends.tflite import Backend

        with tempfile.NamedTemporaryFile(suffix=".tflite") as fh:
            fh.write(data)
            fh.flush()
            self.backend = Backend(fh.name, {"threads": 1})

    def run(self, _, feed):
        return self.backend.run(feed)


def outputs(runner, x: np.ndarray) -> np.ndarray:
    return np.concatenate([runner.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])


def fidelity(out: np.ndarray, ref: np.ndarray) -> str:
    from real_models import sqnr

    agree = float(np.mean(out.argmax(1) == ref.argmax(1)))
    return f"top-1 agreement {agree:.3f}, SQNR {sqnr(ref, out):.1f} dB"


def imagenet(rounds: int) -> None:
    import onnx

    import imagenet_mobilenetv2 as photos
    from quantize import interleaved, session
    from edgesmith.model import from_proto, load
    from edgesmith.search.int8 import quantize_with
    from edgesmith.convert.tflite import to_tflite

    if not MODEL.is_file():
        sys.exit(f"{MODEL} is missing: python examples/imagenet_mobilenetv2.py builds it")
    per = 8
    x = photos.photos(crops_per_photo=per)
    calib, held = x[:7 * per], x[7 * per:]
    model = load(MODEL)
    fused = from_proto(onnx.load(str(MODEL)), model)
    int8, _ = quantize_with(fused, "qdq-u8s8", [{"input": calib[i:i + 8]}
                                                for i in range(0, len(calib), 8)])
    one = {"input": held[:1]}
    tfl32, rep32 = to_tflite(fused.proto, one)
    tfl8, rep8 = to_tflite(int8, one)
    runners = {"onnxruntime fp32": session(fused.proto), "LiteRT fp32": LiteRT(tfl32),
               "onnxruntime int8": session(int8), "LiteRT int8": LiteRT(tfl8)}
    ms = interleaved(runners, held, rounds=rounds)
    outs = {k: outputs(r, held) for k, r in runners.items()}
    print(f"\nImageNet MobileNetV2, 224x224, {len(held)} held-out crops of 4 photos; "
          f"conversion {rep32.seconds:.0f} s (fp32), {rep8.seconds:.0f} s (int8)")
    print(f"{'':18} {'ms':>8}  {'vs ORT fp32':>11}  {'XNNPACK':>9}  fidelity")
    for name, t in ms.items():
        rep = rep32 if name == "LiteRT fp32" else rep8 if name == "LiteRT int8" else None
        d = rep.delegation if rep else None
        share = f"{d['delegated']}/{d['ops']}" if d else "-"
        ref = outs["onnxruntime fp32"]
        text = "" if name == "onnxruntime fp32" else f"vs ORT fp32: {fidelity(outs[name], ref)}"
        if name == "LiteRT int8":
            text += f"; vs our int8 ONNX: {fidelity(outs[name], outs['onnxruntime int8'])}"
        print(f"{name:18} {t:8.3f}  {ms['onnxruntime fp32'] / t:10.2f}x  {share:>9}  {text}")
    print(f"LiteRT vs onnxruntime, same precision: fp32 "
          f"{ms['onnxruntime fp32'] / ms['LiteRT fp32']:.2f}x, int8 "
          f"{ms['onnxruntime int8'] / ms['LiteRT int8']:.2f}x faster (>1: LiteRT faster)")


def corpus_delegation() -> None:
    import corpus
    from edgesmith.model import load
    from edgesmith.convert.tflite import to_tflite

    wanted = [(k.name, "ts13") for k in corpus.KINDS]
    built = corpus.build(wanted)
    print("\nXNNPACK's share of the real-model corpus (TorchScript opset-13 exports, fp32)")
    for kind, export in wanted:
        path = built[(kind, export)]
        model = load(path, data=corpus.data_path(kind))
        x = np.load(corpus.data_path(kind))["input"][:1]
        _, rep = to_tflite(model.proto, {model.inputs[0].name: x})
        d = rep.delegation
        left = ", ".join(f"{k} x{v}" for k, v in d["fallback"].items()) or "-"
        print(f"  {kind:12} {d['delegated']:5d}/{d['ops']:<5d} "
              f"({100 * d['delegated'] / d['ops']:5.1f} %)  max rel err vs ORT "
              f"{rep.max_rel_err:.1e}  TRANSPOSE x{rep.ops.get('TRANSPOSE', 0)}  left: {left}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--no-corpus", action="store_true")
    args = parser.parse_args()
    from real_models import cpu_name

    print(f"CPU: {cpu_name()}; 1 thread")
    imagenet(args.rounds)
    if not args.no_corpus:
        corpus_delegation()


if __name__ == "__main__":
    main()
