"""OpenVINO NNCF's post-training quantization of an ONNX model, as an anchor for
benchmarks/reconstruct.py. Runs in its own venv (NNCF pins its own dependencies; edgesmith is
not imported here):

    python -m venv /tmp/nncf && /tmp/nncf/bin/pip install nncf==3.4.0 onnx onnxruntime==<yours>
    /tmp/nncf/bin/python benchmarks/nncf_anchor.py MODEL.onnx CALIB.npz OUT.onnx

CALIB.npz holds one array, `input` (N, ...), fed one sample at a time; NNCF's defaults
(mixed preset, fast bias correction) are used, as a user calling `nncf.quantize` gets them.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import onnx


def main(model_path: str, calib_path: str, out_path: str) -> None:
    import nncf

    model = onnx.load(model_path)
    name = model.graph.input[0].name
    with np.load(calib_path, allow_pickle=False) as f:
        calib = f["input"]
    dataset = nncf.Dataset([calib[i:i + 1] for i in range(len(calib))], lambda x: {name: x})
    quantized = nncf.quantize(model, dataset, subset_size=len(calib))
    tmp = out_path + ".part"
    onnx.save(quantized, tmp)
    os.replace(tmp, out_path)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
