"""The int8 accuracy repairs (MSE ranges, percentile, CLE + bias correction, block
reconstruction) against rounding to nearest and onnxruntime's defaults, in one run.

    python benchmarks/reconstruct.py [--models imagenet_mnv2 resnet50_features digits_resnet]
                                     [--nncf-python /tmp/nncf/bin/python]

Judged on held-out data only. The ImageNet MobileNetV2 (examples/imagenet_mobilenetv2.py: real
torchvision weights, real photos) and the ResNet-50 (examples/resnet50_features.py: real trained
weights; its pooled features, so no top-1 agreement) calibrate on crops of the first 7 photos.
They are judged on crops of the other 4, which are unlike any calibration photo (a logo and a
colour chart among them), and, in the column "natural", on crops of 8 natural photos of the
calibration photos' kind. The digits models calibrate on 3/4 of their eval set and are judged
on the rest. Each reconstruction method also runs as mixed precision (`--float-blocks K`,
default 2): the K blocks with the largest share of its error on calibration inputs kept in
float, the rest learned again (the repair search ranks blocks per millisecond saved on the
device instead, and doubles K until the budget holds). Per method: held-out output SQNR and
top-1 agreement with fp32, latency vs fp32 (interleaved, batch 1, 1 thread) and the time to
quantize on the host. `--also LABEL=MODEL.onnx` judges int8 models made elsewhere beside them
(the recipe search's pick for an --eval set: `edgesmith quantize ... -o MODEL.onnx`). Goals
(issue 18, for the ImageNet MobileNetV2): SQNR >= 18 dB and agreement >= 0.85 at <= 0.75x fp32
latency; a ResNet-class model >= 25 dB.
Anchors in the same run: onnxruntime's `quantize_static` defaults, and OpenVINO NNCF's
`nncf.quantize` defaults when `--nncf-python` names a Python with NNCF installed (its own venv:
see benchmarks/nncf_anchor.py), both calibrated on the same samples.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "examples" / "models"
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "examples")]

PHOTO_MODELS = {"imagenet_mnv2": "imagenet_mobilenetv2.py",
                "resnet50_features": "resnet50_features.py"}
NO_CLASSES = {"resnet50_features"}      # features, no classes: fidelity only
METHODS = ["qdq-u8s8", "qdq-u8s8-mse", "qdq-u8s8-percentile", "qdq-u8s8-cle-bc",
           "qdq-u8s8-reconstruct", "qdq-u8s8-percentile-reconstruct"]


def data(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(calibration inputs, held-out inputs that share no source with them, and for the photo
    models held-out natural photos: the first held-out set is 4 images unlike the calibration
    photos, a logo and a colour chart among them, which no calibrated range covers)."""
    if name in PHOTO_MODELS:
        from imagenet_mobilenetv2 import held_out_split
        return held_out_split()
    x = np.load(MODELS / f"{name}_eval.npz")["input"]
    cut = len(x) * 3 // 4
    return x[:cut], x[cut:], None


def outputs(session, x: np.ndarray) -> np.ndarray:
    """The session's outputs at batch 1 (the latency's batch)."""
    return np.concatenate([session.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])


def ort_defaults(path: Path, calib: np.ndarray):
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"input": calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q.onnx"
        quantize_static(str(path), str(out), Reader())
        return onnx.load(str(out))


def nncf_anchor(python: str, model_proto, calib: np.ndarray):
    """NNCF's quantized model, made by benchmarks/nncf_anchor.py in NNCF's own venv."""
    import subprocess
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        model, data, out = (Path(tmp) / n for n in ("model.onnx", "calib.npz", "q.onnx"))
        onnx.save(model_proto, str(model))
        np.savez(data, input=calib)
        subprocess.run([python, str(ROOT / "benchmarks" / "nncf_anchor.py"), str(model),
                        str(data), str(out)], check=True, timeout=3600)
        return onnx.load(str(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["imagenet_mnv2", "digits_resnet"])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--float-blocks", type=int, default=2)
    parser.add_argument("--nncf-python", help="a Python with nncf installed: NNCF's anchor")
    parser.add_argument("--also", nargs="+", default=[], metavar="LABEL=MODEL.onnx",
                        help="int8 models made elsewhere (e.g. `edgesmith quantize`'s pick for "
                             "an --eval set), judged in the same run; with one --models only")
    args = parser.parse_args()
    also = dict(item.split("=", 1) for item in args.also)
    if also and len(args.models) != 1:
        parser.error("--also judges models of one --models entry")
    import onnx
    from quantize import interleaved, session
    from real_models import cpu_name, sqnr
    from edgesmith.model import load
    from edgesmith.passes.quantize import PreprocessConfig, preprocess
    from edgesmith.search.int8 import build_recipe, recipe_by_name
    from edgesmith.search.why_worse import block_sensitivity

    print(f"CPU: {cpu_name()}; 1 thread; held-out judging")
    for name in args.models:
        path = MODELS / f"{name}.onnx"
        if not path.is_file():
            print(f"{name}: {path} missing (python examples/{PHOTO_MODELS.get(name, 'train_models.py')})")
            continue
        calib, held, natural = data(name)
        model = load(path, {"input": [1, *calib.shape[1:]]})
        prepared, _ = preprocess(model.proto, PreprocessConfig(input_shapes=model.input_shapes))
        batches = [{"input": calib[i:i + 8]} for i in range(0, len(calib), 8)]
        built, seconds = {"fp32": prepared}, {}
        t0 = time.time()
        built["ort-defaults"] = ort_defaults(path, calib)
        seconds["ort-defaults"] = time.time() - t0
        if args.nncf_python:
            t0 = time.time()
            built["nncf-defaults"] = nncf_anchor(args.nncf_python, model.proto, calib)
            seconds["nncf-defaults"] = time.time() - t0
        else:
            print("NNCF anchor skipped: pass --nncf-python (benchmarks/nncf_anchor.py says how)")
        for method in args.methods:
            t0 = time.time()
            built[method], _, twin = build_recipe(prepared, recipe_by_name(method), batches)
            seconds[method] = time.time() - t0
            if "reconstruct" in method and args.float_blocks > 0:
                t0 = time.time()
                rows = block_sensitivity(twin, built[method], batches[:4])
                keep = [n for r in rows[:args.float_blocks] for n in r["nodes"]]
                mixed = f"{method}-float{args.float_blocks}"
                built[mixed], _, _ = build_recipe(
                    prepared, recipe_by_name(method).with_exclusions(keep), batches)
                seconds[mixed] = time.time() - t0
        built.update({label: onnx.load(path) for label, path in also.items()})
        sessions = {k: session(v) for k, v in built.items()}
        lat = interleaved(sessions, held[:1], args.rounds, block=10)
        ref = outputs(sessions["fp32"], held)
        ref_natural = None if natural is None else outputs(sessions["fp32"], natural)
        print(f"\n{name}: calibrated on {len(calib)}, judged on {len(held)} held-out inputs"
              + ("" if natural is None else f" (natural: {len(natural)} crops of 8 other photos)"))
        print(f"{'method':36s} {'SQNR dB':>8s} {'agree':>6s} {'natural':>8s} {'vs fp32':>8s} "
              f"{'quantize s':>10s}")
        for k, s in sessions.items():
            out = outputs(s, held)
            agree = "-" if name in NO_CLASSES else f"{np.mean(out.argmax(1) == ref.argmax(1)):.3f}"
            nat = "-" if natural is None else f"{sqnr(ref_natural, outputs(s, natural)):.1f}"
            print(f"{k:36s} {sqnr(ref, out):8.1f} {agree:>6s} {nat:>8s} "
                  f"{lat[k] / lat['fp32']:7.2f}x {seconds.get(k, 0):10.0f}")


if __name__ == "__main__":
    main()
