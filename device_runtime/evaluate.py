"""Accuracy against labels and fidelity against reference outputs, on the bundle's eval set.

Eval files are `.npz` read with `allow_pickle=False`: one array per model input (by input name,
samples on axis 0), optional integer `labels`, optional `ref:<output name>` reference outputs.
"""
from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import RuntimeFailure

SQNR_CAP_DB = 200.0  # identical outputs would be +inf, which JSON cannot carry
FIDELITY_SQNR_DB = 25.0    # outputs that are not class scores (boxes, maps, sequences)


def accuracy_drop(base: dict | None, cand: dict | None, scores: bool = True) -> float | None:
    """The one accuracy-drop rule, here so the device judges a deployment as the host chose it:
    top-1 drop vs labels when there are labels, else 1 - top-1 agreement with the float model
    for class scores (`scores`), else 0 when the SQNR against it reaches FIDELITY_SQNR_DB and 1
    below (a detector's boxes, an OCR map, pooled features). None: not judged."""
    if not base or not cand:
        return None
    if "top1" in base and "top1" in cand:
        return base["top1"] - cand["top1"]
    if "agreement" in cand and scores:
        return 1.0 - cand["agreement"]
    if "sqnr_db" in cand:
        return 0.0 if cand["sqnr_db"] >= FIDELITY_SQNR_DB else 1.0
    return None


@dataclass
class EvalData:
    inputs: dict
    labels: object | None
    refs: dict
    n: int


def max_data_bytes() -> int:
    """What an .npz may expand to in memory: 2 GB, or EDGESMITH_MAX_DATA_GB (a small file can
    declare terabytes: the headers are checked before anything is allocated)."""
    import os

    try:
        return int(float(os.environ.get("EDGESMITH_MAX_DATA_GB", "2")) * 1e9)
    except ValueError:
        return int(2e9)


def npz_members(path: Path, stage: str = "eval") -> dict:
    """{array name: (shape, dtype)} of an .npz from its headers alone, refusing what is not a
    regular file, not an .npz, pickled, declaring more bytes than it stores, or expanding past
    `max_data_bytes()`; each in one line."""
    import numpy as np

    if not path.exists():
        raise RuntimeFailure(stage, f"eval file {path} does not exist")
    if not path.is_file():
        raise RuntimeFailure(stage, f"{path} is not a regular file (a device or a pipe?); give "
                             "an .npz file")
    members, total = {}, 0
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                with zf.open(info) as fh:
                    major, _ = np.lib.format.read_magic(fh)
                    read = (np.lib.format.read_array_header_1_0 if major == 1 else
                            np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read(fh)
                    stored = info.file_size - fh.tell()
                if dtype.hasobject:
                    raise RuntimeFailure(stage, f"{path.name} holds pickled objects, which "
                                         "edgesmith never loads; save plain numeric arrays with "
                                         "numpy.savez")
                declared = math.prod(shape) * dtype.itemsize
                if declared > stored:
                    raise RuntimeFailure(stage, f"{path.name} is truncated or corrupt: "
                                         f"{info.filename} declares {declared} bytes and holds "
                                         f"{stored}; save it again with numpy.savez")
                total += declared
                members[info.filename.removesuffix(".npy")] = (shape, dtype)
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as exc:
        raise RuntimeFailure(stage, f"{path.name} is not a readable .npz file ({exc}); "
                             "numpy.savez writes one array per model input, plus optional "
                             "labels") from None
    if total > max_data_bytes():
        raise RuntimeFailure(stage, f"{path.name} expands to {total / 1e6:,.0f} MB of arrays, "
                             f"over the {max_data_bytes() / 1e6:,.0f} MB limit for data; use "
                             "fewer samples or raise EDGESMITH_MAX_DATA_GB")
    return members


def load_eval(path: str | Path, input_specs: dict, stage: str = "eval") -> EvalData:
    """Load and check an eval set against the model's inputs; every problem is one line."""
    import numpy as np

    path = Path(path)
    npz_members(path, stage)         # every header checked before any array is read
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise RuntimeFailure(stage, f"{path.name} is truncated or corrupt ({exc}); save it "
                             "again with numpy.savez") from None
    labels = arrays.pop("labels", None)
    refs = {k[4:]: arrays.pop(k) for k in [k for k in arrays if k.startswith("ref:")]}
    unknown = sorted(set(arrays) - set(input_specs))
    missing = sorted(set(input_specs) - set(arrays))
    if unknown or missing:
        raise RuntimeFailure(stage, f"{path.name} has arrays {unknown} that are not model inputs "
                             f"and lacks {missing}; name arrays after the inputs "
                             f"{sorted(input_specs)} (plus optional 'labels')")
    sizes = {name: arr.shape[0] if arr.ndim else 0 for name, arr in arrays.items()}
    n = next(iter(sizes.values()))
    if len(set(sizes.values())) != 1 or n == 0:
        raise RuntimeFailure(stage, f"{path.name}: inputs need the same, non-zero number of "
                             f"samples on axis 0, got {sizes}")
    for name, arr in arrays.items():
        spec = input_specs[name]
        if arr.dtype != np.dtype(spec["dtype"]):
            raise RuntimeFailure(stage, f"{path.name}: input {name!r} is {arr.dtype}, the model "
                                 f"takes {spec['dtype']}; convert it with .astype()")
        dims = spec["dims"]
        if arr.ndim != len(dims) or any(d is not None and d != s
                                        for d, s in zip(dims[1:], arr.shape[1:])):
            want = "x".join("?" if d is None else str(d) for d in ["N"] + list(dims[1:]))
            raise RuntimeFailure(stage, f"{path.name}: input {name!r} has shape "
                                 f"{list(arr.shape)}, expected {want} (samples on axis 0)")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise RuntimeFailure(stage, f"{path.name}: input {name!r} contains NaN or infinity; "
                                 "clean the data first")
    if labels is not None:
        if labels.ndim != 1 or labels.shape[0] != n or labels.dtype.kind not in "iu" or (
                labels.size and labels.min() < 0):
            raise RuntimeFailure(stage, f"{path.name}: 'labels' must be {n} class indices >= 0 "
                                 f"(one per sample), got {labels.dtype} {list(labels.shape)}"
                                 f"{f' from {labels.min()}' if labels.size else ''}")
    for name, ref in refs.items():
        if ref.shape[:1] != (n,):
            raise RuntimeFailure(stage, f"{path.name}: 'ref:{name}' has {ref.shape[:1]} samples, "
                                 f"inputs have {n}")
    return EvalData(arrays, labels, refs, n)


def predict(session, data: EvalData, batch: int) -> dict:
    """Run the whole eval set in chunks of `batch` (padding the last chunk of a fixed batch)."""
    import numpy as np

    fixed = all(spec["dims"][:1] != [None] for spec in session.inputs.values())
    collected: dict[str, list] = {name: [] for name in session.output_names}
    for start in range(0, data.n, batch):
        feed = {name: arr[start:start + batch] for name, arr in data.inputs.items()}
        real = next(iter(feed.values())).shape[0]
        if fixed and real < batch:
            feed = {k: np.concatenate([v, np.repeat(v[-1:], batch - real, axis=0)])
                    for k, v in feed.items()}
        for name, out in session.run(feed).items():
            collected[name].append(np.asarray(out)[:real])
    return {name: np.concatenate(chunks) for name, chunks in collected.items()}


def metrics(outputs: dict, data: EvalData) -> dict:
    """top1 vs labels; agreement, SQNR (dB) and max abs error vs the reference outputs."""
    import numpy as np

    name = next((n for n in outputs if n in data.refs), next(iter(outputs)))
    out = outputs[name].reshape(data.n, -1).astype(np.float64)
    result: dict = {"n": data.n, "output": name}
    if data.labels is not None:
        if data.labels.size and data.labels.max() >= out.shape[1]:
            raise RuntimeFailure("eval", f"labels go up to {data.labels.max()} but output "
                                 f"{name!r} has {out.shape[1]} class score(s): labels of another "
                                 "model, counted from 1 (they count from 0), or an output "
                                 "without one score per class")
        result["top1"] = float(np.mean(out.argmax(axis=1) == data.labels))
    if name in data.refs:
        ref = data.refs[name].reshape(data.n, -1).astype(np.float64)
        noise = float(np.sum((ref - out) ** 2))
        signal = float(np.sum(ref ** 2))
        sqnr = SQNR_CAP_DB if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)
        if outputs[name].ndim == 2:   # [N, classes]: top-1 agreement means something
            result["agreement"] = float(np.mean(out.argmax(axis=1) == ref.argmax(axis=1)))
        result["sqnr_db"] = min(sqnr, SQNR_CAP_DB)
        result["max_abs_err"] = float(np.max(np.abs(ref - out)))
    return result
