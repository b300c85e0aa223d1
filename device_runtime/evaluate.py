"""Accuracy against labels and fidelity against reference outputs, on the bundle's eval set.

Eval files are `.npz` read with `allow_pickle=False`: one array per model input (by input name,
samples on axis 0), optional integer `labels`, optional `ref:<output name>` reference outputs,
and `const:<input name>` for an input fed as-is on every call (a scalar sample rate, the first
state of a stream). A streaming model's `state` pairs (output -> input) carry each call's state
output into the next call's input: its samples are consecutive chunks of one stream, run one
call each and judged as a whole sequence.
"""
from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass, field
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
    consts: dict = field(default_factory=dict)   # input -> the value fed on every call
    state: dict = field(default_factory=dict)    # output -> the input it feeds on the next call

    def feed(self, start: int, stop: int, specs: dict) -> dict:
        """Samples start..stop, the constants, and a stream's first state (zeros unless given)."""
        import numpy as np

        first = {i: np.zeros(specs[i]["shape"], specs[i]["dtype"]) for i in self.state.values()}
        return {**first, **self.consts, **{k: v[start:stop] for k, v in self.inputs.items()}}


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


def load_eval(path: str | Path, input_specs: dict, stage: str = "eval",
              state: dict | None = None) -> EvalData:
    """Load and check an eval set against the model's inputs (`state`: a streaming model's
    output -> input pairs, whose inputs the data need not hold); every problem is one line."""
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
    consts = {k[6:]: arrays.pop(k) for k in [k for k in arrays if k.startswith("const:")]}
    carried = set((state or {}).values())
    unknown = sorted(set(arrays) - set(input_specs)) + [f"const:{k}" for k in sorted(
        set(consts) - set(input_specs))]
    missing = sorted(set(input_specs) - set(arrays) - set(consts) - carried)
    if unknown or missing:
        raise RuntimeFailure(stage, f"{path.name} has arrays {unknown} that are not model inputs "
                             f"and lacks {missing}; name arrays after the inputs "
                             f"{sorted(input_specs)} (plus optional 'labels'; 'const:NAME' for "
                             "a value fed on every call)")
    if given := sorted(carried & set(arrays)):
        raise RuntimeFailure(stage, f"{path.name}: {given[0]!r} is a state input, carried from "
                             "the previous call's output; give its first value as 'const:"
                             f"{given[0]}' (zeros without it), not one per sample")
    for name, arr in consts.items():
        _check_array(path, name, arr, input_specs[name], f"const:{name}", arr.shape, stage)
    if not arrays:
        raise RuntimeFailure(stage, f"{path.name} holds no per-sample input (only constants); "
                             "give at least one input's samples on axis 0")
    sizes = {name: arr.shape[0] if arr.ndim else 0 for name, arr in arrays.items()}
    n = next(iter(sizes.values()))
    if len(set(sizes.values())) != 1 or n == 0:
        raise RuntimeFailure(stage, f"{path.name}: inputs need the same, non-zero number of "
                             f"samples on axis 0, got {sizes}")
    for name, arr in arrays.items():
        dims = input_specs[name]["dims"]
        if not dims:
            raise RuntimeFailure(stage, f"{path.name}: input {name!r} is a scalar, which has no "
                                 f"sample axis; give its one value as 'const:{name}'")
        _check_array(path, name, arr, input_specs[name], name, (None, *arr.shape[1:]), stage)
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
    return EvalData(arrays, labels, refs, n, consts, dict(state or {}))


def _check_array(path: Path, name: str, arr, spec: dict, key: str, shape: tuple,
                 stage: str) -> None:
    """dtype, shape (`shape`: the array's, None where samples stand) and finite values."""
    import numpy as np

    if arr.dtype != np.dtype(spec["dtype"]):
        raise RuntimeFailure(stage, f"{path.name}: {key!r} is {arr.dtype}, the model's input "
                             f"{name!r} takes {spec['dtype']}; convert it with .astype()")
    dims = spec["dims"]
    if len(shape) != len(dims) or any(None not in (d, s) and d != s for d, s in zip(dims, shape)):
        per_sample = key == name
        want = "x".join("N" if per_sample and i == 0 else "?" if d is None else str(d)
                        for i, d in enumerate(dims)) or "a scalar"
        how = "samples on axis 0" if per_sample else "fed as-is on every call"
        raise RuntimeFailure(stage, f"{path.name}: {key!r} has shape {list(arr.shape)}, "
                             f"expected {want} ({how}) for the model's input {name!r}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise RuntimeFailure(stage, f"{path.name}: {key!r} contains NaN or infinity; clean "
                             "the data first")


def predict(session, data: EvalData, batch: int) -> dict:
    """Run the whole eval set in chunks of `batch` (padding the last chunk of a fixed batch)."""
    import numpy as np

    if data.state:
        return _predict_stream(session, data)
    fixed = all(spec["dims"][:1] != [None] for spec in session.inputs.values())
    collected: dict[str, list] = {name: [] for name in session.output_names}
    for start in range(0, data.n, batch):
        feed = {name: arr[start:start + batch] for name, arr in data.inputs.items()}
        real = next(iter(feed.values())).shape[0]
        if fixed and real < batch:
            feed = {k: np.concatenate([v, np.repeat(v[-1:], batch - real, axis=0)])
                    for k, v in feed.items()}
        for name, out in session.run({**data.consts, **feed}).items():
            collected[name].append(np.asarray(out)[:real])
    return {name: np.concatenate(chunks) for name, chunks in collected.items()}


def _predict_stream(session, data: EvalData) -> dict:
    """One call per chunk, in order, each call's state outputs fed to the next: the outputs of
    the whole sequence, joined on axis 0 where each call's is 1 there (a score [1, C]), else
    stacked on a new axis 0 (a state's batch need not be on axis 0)."""
    import numpy as np

    collected: dict[str, list] = {name: [] for name in session.output_names}
    for _, outputs in stream_calls(session, data):
        for name, out in outputs.items():
            collected[name].append(np.asarray(out))
    return {name: np.concatenate(c) if all(x.shape[:1] == (1,) for x in c) else np.stack(c)
            for name, c in collected.items()}


def stream_calls(session, data: EvalData, limit: int | None = None):
    """A stream's calls in order, each (its feed, its outputs): every call's state outputs
    are the next call's state inputs."""
    feed = data.feed(0, 1, session.inputs)
    for i in range(data.n if limit is None else min(limit, data.n)):
        feed = {**feed, **{name: arr[i:i + 1] for name, arr in data.inputs.items()}}
        outputs = session.run(feed)
        yield feed, outputs
        feed = {**feed, **{data.state[o]: outputs[o] for o in data.state}}


def decision_cut(scores) -> float:
    """Where a one-score output says yes: 0.5 for a probability, 0 for a logit."""
    return 0.5 if 0 <= scores.min() and scores.max() <= 1 else 0.0


def metrics(outputs: dict, data: EvalData) -> dict:
    """top1 vs labels; agreement, SQNR (dB) and max abs error vs the reference outputs."""
    import numpy as np

    name = next((n for n in outputs if n in data.refs), next(iter(outputs)))
    out = outputs[name].reshape(data.n, -1).astype(np.float64)
    result: dict = {"n": data.n, "output": name}
    if data.labels is not None and out.shape[1] == 1 and data.labels.max(initial=0) <= 1:
        result["top1"] = float(np.mean((out[:, 0] > decision_cut(out)) == (data.labels == 1)))
    elif data.labels is not None:
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
        if ref.shape[1] == 1:   # one score per sample (a VAD's speech probability): its decision
            cut = decision_cut(ref)
            result["agreement"] = float(np.mean((out > cut) == (ref > cut)))
        elif outputs[name].ndim == 2:   # [N, classes]: top-1 agreement means something
            result["agreement"] = float(np.mean(out.argmax(axis=1) == ref.argmax(axis=1)))
        result["sqnr_db"] = min(sqnr, SQNR_CAP_DB)
        result["max_abs_err"] = float(np.max(np.abs(ref - out)))
    return result
