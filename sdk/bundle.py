"""Write bundles: a directory named by its content hash, written to a temp name then renamed."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from device_runtime.bundle import MANIFEST, Manifest, verify
from device_runtime.errors import RuntimeFailure
from device_runtime.evaluate import EvalData

from .data import npz_bytes
from .errors import EdgesmithError
from .model import Model

DEFAULT_BACKEND = {"onnx": "onnxruntime", "tflite": "tflite"}


@dataclass
class Bundle:
    path: Path
    id: str                 # sha256 of manifest.json, which lists every file's sha256
    manifest: Manifest


def cache_dir() -> Path:
    """Where bundles and caches live: $EDGESMITH_CACHE, else the XDG cache dir."""
    if os.environ.get("EDGESMITH_CACHE"):
        return Path(os.environ["EDGESMITH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgesmith"


def cached(path: str | os.PathLike) -> Bundle | None:
    """A bundle built earlier, when it is still there whole (its name is its manifest's hash
    and every file checks out); None otherwise, so the caller builds it again."""
    path = Path(path)
    try:
        manifest, bundle_id = verify(path)
    except (OSError, RuntimeFailure):
        return None
    return Bundle(path, bundle_id, manifest) if bundle_id == path.name else None


def build(model: Model, config: dict | None = None, eval_data: EvalData | None = None,
          eval_batch: int = 1, backend: str | None = None, meta: dict | None = None,
          root: Path | None = None, extra_files: dict[str, bytes] | None = None) -> Bundle:
    """Bundle `model` with its runtime config and optional eval set (inputs, labels, refs);
    `extra_files` (name -> bytes) ship beside it, listed and hashed like every file."""
    files: dict[str, bytes] = {f"model.{model.format}": model.serialized(), **(extra_files or {})}
    if eval_data is None and model.sample is not None:     # the runtime times on it
        eval_data = model.sample
    if eval_data is not None:
        arrays = dict(eval_data.inputs)
        if eval_data.labels is not None:
            arrays["labels"] = eval_data.labels
        arrays.update({f"ref:{name}": ref for name, ref in eval_data.refs.items()})
        arrays.update({f"const:{name}": value for name, value in eval_data.consts.items()})
        files["eval.npz"] = npz_bytes(arrays)
    manifest = Manifest(
        model=f"model.{model.format}", format=model.format,
        backend=backend or DEFAULT_BACKEND[model.format],
        inputs=[spec.as_manifest() for spec in model.inputs], outputs=list(model.outputs),
        files={name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
               for name, data in files.items()},
        config=dict(config or {}), eval="eval.npz" if eval_data is not None else None,
        eval_batch=eval_batch, state=dict(model.state), meta={**({"opset": model.facts.opset} if model.facts.opset else {}),
                                     **(meta or {})})
    raw = manifest.to_json()
    bundle_id = hashlib.sha256(raw).hexdigest()
    bundles = (root or cache_dir()) / "bundles"
    target = bundles / bundle_id
    if (target / MANIFEST).is_file():
        try:
            verify(target)
            return Bundle(target, bundle_id, manifest)
        except RuntimeFailure:  # a damaged cached copy is rebuilt, never used
            shutil.rmtree(target, ignore_errors=True)
    bundles.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=bundles, prefix=".tmp-"))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        (tmp / MANIFEST).write_bytes(raw)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished the same bundle first: theirs is identical
            if not (target / MANIFEST).is_file():
                raise
    except OSError as exc:
        raise EdgesmithError(f"cannot write bundle under {bundles}: {exc.strerror}; set "
                             "EDGESMITH_CACHE to a writable directory") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Bundle(target, bundle_id, manifest)
