"""Eval data on the host: the runtime's own loader and checks, plus reference outputs."""
from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np

from device_runtime.errors import RuntimeFailure
from device_runtime.evaluate import EvalData, load_eval

from .errors import EdgesmithError
from .model import Model


def load_eval_set(path: str | os.PathLike, model: Model) -> EvalData:
    """Read an `.npz` eval set (inputs by name, optional labels) and check it fits `model`."""
    specs = {s.name: s.as_manifest() for s in model.inputs}
    try:
        return load_eval(Path(path), specs)
    except RuntimeFailure as exc:
        raise EdgesmithError(exc.message) from None


def reference_outputs(model: Model, data: EvalData, batch: int) -> dict[str, np.ndarray]:
    """Outputs of the original model on the host: what every optimised variant is compared to."""
    from device_runtime.evaluate import predict

    return predict(_HostSession(model), data, batch)


class _HostSession:
    """The slice of device_runtime.Session that `predict` needs, over the in-memory model."""

    def __init__(self, model: Model):
        if model.format == "onnx":
            import onnxruntime as ort

            session = ort.InferenceSession(model.serialized(), providers=["CPUExecutionProvider"])
            self.output_names = [o.name for o in session.get_outputs()]
            self._run = lambda feed: session.run(self.output_names, feed)
        else:
            from device_runtime.backends.tflite import Backend

            backend = Backend(str(model.path), {})
            self.output_names, self._run = backend.output_names, backend.run
        self.inputs = {s.name: s.as_manifest() for s in model.inputs}

    def run(self, feed: dict) -> dict:
        return dict(zip(self.output_names, self._run(feed)))


def eval_batch(model: Model, preferred: int = 32) -> int:
    """A fixed batch dimension must be respected; a dynamic one lets eval run in chunks."""
    first = model.inputs[0].dims[:1] if model.inputs else []
    return first[0] if first and first[0] is not None else preferred


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An `.npz` with fixed timestamps, so equal data gives equal bytes (and bundle hashes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()
