"""Eval data on the host: the runtime's own loader and checks, plus reference outputs."""
from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np

from device_runtime.errors import RuntimeFailure
from device_runtime.evaluate import EvalData, load_eval, stream_calls

from .errors import EdgesmithError
from .host_runs import host_session
from .model import Model


def load_eval_set(path: str | os.PathLike, model: Model) -> EvalData:
    """Read an `.npz` eval set (inputs by name, optional labels) and check it fits `model`."""
    specs = {s.name: s.as_manifest() for s in model.inputs}
    try:
        return load_eval(Path(path), specs, state=model.state)
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
            session = host_session(model.serialized())
            self.output_names = [o.name for o in session.get_outputs()]
            self._run = lambda feed: session.run(self.output_names, feed)
        else:
            from device_runtime.backends.tflite import Backend

            backend = Backend(str(model.path), {})
            self.output_names, self._run = backend.output_names, backend.run
        self.inputs = {s.name: s.as_manifest() for s in model.inputs}

    def run(self, feed: dict) -> dict:
        return dict(zip(self.output_names, self._run(feed)))


def input_stats(batches: list[dict]) -> dict:
    """Per numeric input: mean, std, min, max over every sample: what a deployed version's
    field inputs are compared with (drift)."""
    stats = {}
    for name in batches[0] if batches else ():
        x = np.concatenate([np.asarray(b[name]).reshape(-1) for b in batches]).astype(np.float64)
        if x.size and np.asarray(batches[0][name]).dtype.kind in "fiu":
            stats[name] = {"mean": float(x.mean()), "std": float(x.std()),
                           "min": float(x.min()), "max": float(x.max())}
    return stats


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
                np.lib.format.write_array(fh, np.asarray(array, order="C"), allow_pickle=False)
    return buf.getvalue()


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm"}


def calibration_batches(source: str | os.PathLike, model: Model, batch: int = 16,
                        limit: int | None = None):
    """Yield `{input name: array}` batches from an `.npz` or an image folder, a batch at a time.

    Image folders (Pillow) feed single-input NCHW models: resized to the input's H x W, gray or
    RGB by its channel count, scaled to [0, 1] (the examples' and many models' convention).
    """
    source = Path(source)
    fixed = model.inputs[0].dims[0] if model.inputs and model.inputs[0].dims else None
    batch = fixed or batch
    if source.is_dir():
        yield from _image_batches(source, model, batch, limit)
        return
    data = load_eval_set(source, model)
    if data.state or data.consts:
        yield from stream_feeds(model, data, limit)
        return
    n = data.n if limit is None else min(limit, data.n)
    for start in range(0, n - (n % batch if fixed else 0), batch):
        yield {name: arr[start:min(start + batch, n)] for name, arr in data.inputs.items()}


def stream_feeds(model: Model, data: EvalData, limit: int | None = None) -> list[dict]:
    """The feeds of each call, as the float model sees them: a stream's state inputs take the
    float model's state outputs of the call before (calibrating on zeros, or judging chunks out
    of order, would see states the deployed model never meets); constants as given."""
    if data.state:
        return [feed for feed, _ in stream_calls(_HostSession(model), data, limit)]
    specs = {s.name: s.as_manifest() for s in model.inputs}
    return [data.feed(i, i + 1, specs) for i in range(data.n if limit is None else
                                                       min(limit, data.n))]


def _image_batches(folder: Path, model: Model, batch: int, limit: int | None):
    from PIL import Image

    if len(model.inputs) != 1 or len(model.inputs[0].shape) != 4:
        raise EdgesmithError("image folders feed models with one NCHW input; give an .npz")
    spec = model.inputs[0]
    _, channels, height, width = spec.shape
    if channels not in (1, 3):
        raise EdgesmithError(f"input {spec.name!r} has {channels} channels; images give 1 or 3")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise EdgesmithError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    files = files[:limit] if limit else files
    for start in range(0, len(files), batch):
        arrays = []
        for path in files[start:start + batch]:
            try:
                with Image.open(path) as img:
                    img = img.convert("L" if channels == 1 else "RGB").resize((width, height))
                    arr = np.asarray(img, dtype=np.float32) / 255.0
            except OSError as exc:
                raise EdgesmithError(f"cannot read image {path}: {exc}") from None
            arrays.append(arr[None] if channels == 1 else arr.transpose(2, 0, 1))
        stacked = np.stack(arrays).astype(spec.dtype)
        if spec.dims[0] is not None and len(stacked) < spec.dims[0]:
            continue   # a fixed batch cannot take a short last batch
        yield {spec.name: stacked}


def load_training_set(source: str | os.PathLike, model: Model) -> EvalData:
    """Training data for distillation: an `.npz` (inputs by name, optional labels) or an image
    folder (no labels: the teacher's soft targets alone supervise)."""
    source = Path(source)
    if source.is_dir():
        chunks = [b[model.inputs[0].name] for b in _image_batches(source, model, 64, None)]
        x = np.concatenate(chunks)
        return EvalData({model.inputs[0].name: x}, None, {}, len(x))
    return load_eval_set(source, model)
