"""Bundle manifest schema and verification: nothing is loaded before every byte is checked.

A bundle is a directory holding `manifest.json` plus the files it lists with their sha256 and
size. Its id is the sha256 of `manifest.json`, so the id covers every file. The sdk writes
bundles with this module's helpers; this module never imports the sdk.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .errors import RuntimeFailure

MANIFEST = "manifest.json"
MANIFEST_SCHEMA = 1


def sha256_file(path: str | os.PathLike) -> str:
    """Streamed in 1 MiB chunks: a model bigger than the device's free memory still verifies."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


FIELD_TYPES = {"model": str, "format": str, "backend": str, "inputs": list, "outputs": list,
               "files": dict, "config": dict, "eval": (str, type(None)), "eval_batch": int,
               "meta": dict, "state": dict}


@dataclass
class Manifest:
    """What the device needs to run a bundle: model, backend, runtime config, input specs."""

    model: str
    format: str                      # "onnx" | "tflite"
    backend: str                     # key of device_runtime.backends
    inputs: list[dict]               # [{"name", "shape", "dtype"}] — concrete shapes
    outputs: list[str]
    files: dict[str, dict]           # relative path -> {"sha256", "size"}
    config: dict = field(default_factory=dict)   # backend runtime config
    eval: str | None = None          # eval.npz: inputs by name, "labels", "ref:<output>"
    eval_batch: int = 1
    meta: dict = field(default_factory=dict)     # free-form: source model hash, recipe, ...
    state: dict = field(default_factory=dict)    # a stream's state: output -> next call's input
    schema: int = MANIFEST_SCHEMA

    def to_json(self) -> bytes:
        """Canonical bytes, so equal bundles hash equally."""
        fields = {k: v for k, v in self.__dict__.items() if k != "state" or v}  # ids unchanged
        return json.dumps(fields, sort_keys=True, indent=1).encode()            # without one

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        if not isinstance(data, dict):
            raise ValueError(f"it is a JSON {type(data).__name__}, not an object")
        if data.get("schema") != MANIFEST_SCHEMA:
            raise ValueError(f"unsupported manifest schema {data.get('schema')!r} "
                             f"(this runtime reads schema {MANIFEST_SCHEMA}; update the runtime)")
        for key, kind in FIELD_TYPES.items():       # every field a run reads, before it runs
            if key in data and not isinstance(data[key], kind):
                raise ValueError(f"{key!r} is a {type(data[key]).__name__}")
        if not all(isinstance(e, dict) and isinstance(e.get("sha256"), str) and
                   isinstance(e.get("size"), int) for e in data.get("files", {}).values()):
            raise ValueError("every 'files' entry needs a sha256 string and a size")
        if not all(isinstance(s, dict) and isinstance(s.get("name"), str) and
                   isinstance(s.get("dtype"), str) and isinstance(s.get("shape"), list) and
                   isinstance(s.get("dims"), list) for s in data.get("inputs", [])):
            raise ValueError("every 'inputs' entry needs a name, dtype, shape and dims")
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def safe_relpath(rel: str) -> str:
    """Refuse absolute paths, `..`, and anything that is not a plain path inside the bundle."""
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or "\\" in rel or any(part in ("..", "") for part in p.parts) \
            or rel != str(p):
        raise RuntimeFailure("verify", f"path {rel!r} leaves the bundle; the bundle was "
                             "tampered with or built by a broken tool — rebuild it")
    return rel


BACKEND_FORMATS = {"onnxruntime": "onnx", "tflite": "tflite"}
KINDS = {"onnx": "an ONNX", "tflite": "a TFLite"}


def model_format(path: Path) -> str:
    """From the file's content, never the manifest's word: a TFLite flatbuffer carries "TFL3"
    at bytes 4..8; anything else is read as ONNX protobuf (and so walked for external data)."""
    with open(path, "rb") as fh:
        return "tflite" if fh.read(8)[4:8] == b"TFL3" else "onnx"


def verify(bundle_dir: str | os.PathLike) -> tuple[Manifest, str]:
    """Check every listed file's size and sha256 and every path; return (manifest, bundle id)."""
    root = Path(bundle_dir)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise RuntimeFailure("verify", f"{root} is not a bundle (no {MANIFEST}); build one "
                             "with the edgesmith sdk")
    raw = mpath.read_bytes()
    bundle_id = hashlib.sha256(raw).hexdigest()
    if len(root.resolve().name) == 64 and root.resolve().name != bundle_id:
        raise RuntimeFailure("verify", f"manifest hash {bundle_id[:12]} does not match the "
                             f"bundle name {root.resolve().name[:12]}; the bundle was modified")
    try:
        manifest = Manifest.from_dict(json.loads(raw))
    except (ValueError, TypeError) as exc:
        raise RuntimeFailure("verify", f"bad {MANIFEST}: {exc}") from None
    real_root = root.resolve()
    for rel, entry in manifest.files.items():
        path = root / safe_relpath(rel)
        if real_root not in path.resolve().parents:
            raise RuntimeFailure("verify", f"{rel!r} links outside the bundle; refusing it")
        if not path.is_file():
            raise RuntimeFailure("verify", f"listed file {rel!r} is missing; push the bundle again")
        if path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            raise RuntimeFailure("verify", f"file {rel!r} does not match its sha256 in the "
                                 "manifest (corrupt or tampered); push the bundle again")
    for rel in [manifest.model] + ([manifest.eval] if manifest.eval else []):
        if rel not in manifest.files:
            raise RuntimeFailure("verify", f"{rel!r} is used but not listed in the manifest")
    content = model_format(root / manifest.model)
    if content != manifest.format or content != BACKEND_FORMATS.get(manifest.backend, content):
        raise RuntimeFailure("verify", f"{manifest.model!r} holds {KINDS[content]} model but the "
                             f"manifest says format {manifest.format!r}, backend "
                             f"{manifest.backend!r}; the bundle was tampered with or built by a "
                             "broken tool — rebuild it")
    if content == "onnx":   # onnxruntime reads `location` next to the model file
        for location in onnx_external_locations(root / manifest.model):
            rel = posixpath.normpath(posixpath.join(posixpath.dirname(manifest.model), location))
            if rel not in manifest.files:   # listed paths are plain, inside, and verified
                raise RuntimeFailure("verify", f"model external data {location!r} (read as "
                                     f"{rel!r}) is not a listed file of the bundle; refusing it")
    return manifest, bundle_id


# --- ONNX external data, without importing onnx: a minimal protobuf walk --------------------
# field numbers from onnx.proto3: ModelProto.graph=7, .functions=25; FunctionProto.node=7;
# GraphProto.node=1, .initializer=5, .sparse_initializer=15; SparseTensorProto.values=1,
# .indices=2; NodeProto.attribute=5; AttributeProto.t=5, .g=6, .tensors=10, .graphs=11,
# .sparse_tensor=22, .sparse_tensors=23; TensorProto.external_data=13; entry key=1, value=2.
_MODEL, _FUNCTION, _GRAPH, _SPARSE, _NODE, _ATTR, _TENSOR, _ENTRY = range(8)
_CHILDREN = {_MODEL: {7: _GRAPH, 25: _FUNCTION}, _FUNCTION: {7: _NODE}, _NODE: {5: _ATTR},
             _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE}, _SPARSE: {1: _TENSOR, 2: _TENSOR},
             _ATTR: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
             _TENSOR: {13: _ENTRY}}


def _varint(buf, pos: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 64, 7):   # a varint has at most 10 bytes
        if pos >= len(buf):
            break
        byte, pos = buf[pos], pos + 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
    raise RuntimeFailure("verify", "model file is not valid protobuf (truncated?)")


def _fields(buf, start: int, end: int):
    """Yield (field number, wire type, value-or-(start, end)) of one message."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > end:
                raise RuntimeFailure("verify", "model file is not valid protobuf (truncated?)")
            yield number, wire, (pos, pos + size)
            pos += size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise RuntimeFailure("verify", "model file is not valid protobuf")


def onnx_external_locations(model_path: Path) -> set[str]:
    """Every `location` an ONNX model's tensors point to, at any depth (subgraphs included)."""
    locations: set[str] = set()
    with open(model_path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            return locations
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            stack = [(_MODEL, 0, len(buf))]
            while stack:
                kind, start, end = stack.pop()
                if kind == _ENTRY:
                    entry = {n: bytes(buf[s:e]).decode("utf-8", "replace")
                             for n, w, (s, e) in ((n, w, v) for n, w, v in _fields(buf, start, end)
                                                  if w == 2)}
                    if entry.get(1) == "location":
                        locations.add(entry.get(2, ""))
                    continue
                children = _CHILDREN[kind]
                for number, wire, value in _fields(buf, start, end):
                    if wire == 2 and number in children:
                        stack.append((children[number], *value))
    return locations
