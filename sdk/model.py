"""Load and validate models with errors that name the fix; model facts (params, MACs, size)."""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from device_runtime.evaluate import EvalData, max_data_bytes
from device_runtime.session import dims_match

from .errors import EdgesmithError

TFLITE_MAGIC = b"TFL3"
MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "QLinearConv", "QLinearMatMul",
           "ConvInteger", "MatMulInteger", "LSTM", "GRU", "RNN", "DynamicQuantizeLSTM")
WEIGHT_INPUT = {"QLinearConv": 3, "QLinearMatMul": 3}   # (x, x_scale, x_zero_point, w, ...)
AS_FLOAT_OP = {"QLinearConv": "Conv", "ConvInteger": "Conv", "QLinearMatMul": "MatMul",
               "MatMulInteger": "MatMul", "DynamicQuantizeLSTM": "LSTM"}


@dataclass
class InputSpec:
    name: str
    dims: list            # as declared; None where dynamic
    shape: list[int]      # concrete shape used to measure
    dtype: str

    def as_manifest(self) -> dict:
        return {"name": self.name, "dims": self.dims, "shape": self.shape, "dtype": self.dtype}


@dataclass
class ModelFacts:
    format: str
    size_bytes: int
    params: int
    macs: int
    macs_by_op: dict[str, int]
    opset: int | None = None
    producer: str = ""
    notes: list[str] = field(default_factory=list)
    class_scores: bool = True      # the first output is a classifier's (see `class_scores`)


@dataclass
class Model:
    """A validated model: the ONNX proto (or TFLite bytes) with concrete input specs."""

    path: Path | None
    format: str
    inputs: list[InputSpec]
    outputs: list[str]
    facts: ModelFacts
    proto: object = None          # onnx.ModelProto for ONNX
    data: bytes = b""             # the file's bytes for TFLite
    sample: EvalData | None = None   # the data's first call, timed where random values would not do
    state: dict = field(default_factory=dict)   # a stream's state: output -> next call's input

    def serialized(self) -> bytes:
        return self.proto.SerializeToString() if self.format == "onnx" else self.data

    @property
    def input_shapes(self) -> dict[str, list[int]]:
        return {spec.name: spec.shape for spec in self.inputs}


def parse_input_shapes(text: str | None) -> dict[str, list[int]]:
    """`name=1x3x224x224,other=1x10` -> {name: [1, 3, 224, 224], ...}."""
    shapes: dict[str, list[int]] = {}
    for item in filter(None, (text or "").split(",")):
        name, sep, dims = item.rpartition("=")
        try:
            shape = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            shape = []
        if not sep or not name or not shape or min(shape) < 1:
            raise EdgesmithError(f"bad --input-shape {item!r}; write NAME=1x3x224x224")
        if max(shape) >= 1 << 31 or math.prod(shape) * 4 > max_data_bytes():
            raise EdgesmithError(f"--input-shape {item!r} takes over "
                                 f"{max_data_bytes() / 1e9:g} GB per sample; give the shape the "
                                 "model runs at (or raise EDGESMITH_MAX_DATA_GB)")
        shapes[name] = shape
    return shapes


def save(proto, path: str | os.PathLike) -> Path:
    """Write an ONNX model atomically (temp file, then rename): never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, proto.SerializeToString())
    return path


def atomic_write(path: Path, data: bytes) -> None:
    """Temp file in the same directory, then rename; the file gets the user's umask (mkstemp
    alone would leave it 0600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | os.PathLike, input_shapes: dict[str, list[int]] | None = None,
         data: str | os.PathLike | None = None, static: bool = True,
         state: dict[str, str] | None = None) -> Model:
    """Load an ONNX or TFLite model, check it, fix input shapes, and compute its facts.

    Dynamic dimensions take --input-shape values, else the shapes of `data` (the eval or
    calibration set, said in the model's notes); `static=False` loads without concrete shapes
    (graph rewrites that need none, like fuse). `state` ({output: input}, --state) names a
    stream's state pairs; None pairs them by name (`state_pairs`)."""
    path = Path(path)
    if not path.exists():
        raise EdgesmithError(f"model file {path} does not exist (from {Path.cwd()}); give the "
                             "path of an .onnx or .tflite file")
    if path.is_dir():
        raise EdgesmithError(f"{path} is a directory; give the .onnx or .tflite file")
    if not path.is_file():
        raise EdgesmithError(f"{path} is not a regular file (a device or a pipe?); give the "
                             ".onnx or .tflite file")
    raw = path.read_bytes()
    if not raw:
        raise EdgesmithError(f"{path} is empty (0 bytes); re-export the model")
    if raw[4:8] == TFLITE_MAGIC:
        return load_tflite(path, raw, input_shapes or {}, data)
    return _load_onnx(path, raw, input_shapes or {}, data, static, state)


def load_tflite(path: Path, data: bytes, input_shapes: dict[str, list[int]],
                source=None) -> Model:
    """TFLite models on the host: input specs and size, read through the TFLite interpreter.
    Inputs take the names `source` (the data) gives them where a signature key is their
    identifier form; a quantized (int8/uint8) input takes float data when `source` holds
    floats (the runtime quantizes them with the model's scale and zero point)."""
    from device_runtime.backends.tflite import Backend, identifier
    from device_runtime.errors import RuntimeFailure

    try:
        backend = Backend(str(path), {"xnnpack": False})
    except RuntimeFailure as exc:
        raise EdgesmithError(f"cannot read {path.name}: {exc.message}") from None
    names = list(backend.inputs)
    unknown = sorted(set(input_shapes) - set(names))
    if unknown:
        raise EdgesmithError(f"--input-shape names {unknown}, but the model's inputs are {names}")
    inputs = []
    headers = npz_headers(source) if source is not None and Path(source).is_file() else {}
    aliases = {identifier(k): k for k in headers}     # the data's `input.1` for key `input_1`
    for key, d in backend.inputs.items():
        name = key if key in headers else aliases.get(key, key)
        dims = [None if s < 0 else int(s) for s in d.get("shape_signature", d["shape"])]
        shape = input_shapes.get(name, [int(s) for s in d["shape"]])
        floats = name in headers and headers[name][1].kind == "f"
        inputs.append(InputSpec(name, dims, list(shape), "float32" if d["quantization"][0]
                                and floats else str(d["dtype"].__name__)))
    facts = ModelFacts("tflite", len(data), 0, 0, {},
                       notes=["parameters and MACs are not computed for TFLite models"])
    return Model(path, "tflite", inputs, backend.output_names, facts, data=data)


def _load_onnx(path: Path, data: bytes, input_shapes: dict[str, list[int]], source=None,
               static: bool = True, given_state: dict[str, str] | None = None) -> Model:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise EdgesmithError(f"{path} is not an ONNX model (protobuf parse failed: "
                             f"{str(exc).splitlines()[0] if str(exc) else 'truncated'}); "
                             "re-export it or check the file was fully copied") from None
    if proto.ir_version == 0 or not proto.HasField("graph") or not proto.graph.node:
        raise EdgesmithError(f"{path} is not an ONNX model (no graph or IR version); "
                             "re-export it or check the file was fully copied")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        _check_external_sizes(proto, path)
        try:
            onnx.load_external_data_for_model(proto, str(path.parent))
        except (onnx.checker.ValidationError, OSError, ValueError) as exc:   # e.g. ../../etc/passwd
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EdgesmithError(f"{path}: its external data cannot be read ({first}); keep "
                                 "the data files next to the model, inside its folder") from None
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise EdgesmithError(f"{path} fails the ONNX checker: {first}") from None
    _check_opset(path, proto)
    state = state_pairs(proto) if given_state is None else checked_state(proto, given_state)
    inputs = _input_specs(path, proto, input_shapes, source, static, set(state.values()))
    outputs = [o.name for o in proto.graph.output]
    _check_runs_in_ort(path, data)
    model = Model(path, "onnx", inputs, outputs, onnx_facts(proto, inputs, len(data)), proto=proto,
                  state=state)
    model.sample = timing_sample(model, source)
    selectors = branch_inputs(proto)
    if static and selectors and source is None:   # with data, its loader names what is missing
        names = ", ".join(map(repr, sorted(selectors)))
        raise EdgesmithError(f"input {names} of {path.name} selects a branch of an If: random "
                             "values would run the wrong branch; pass --eval/--calib data "
                             "holding it (one value for every call as 'const:NAME')")
    return model


# a stream's state output -> input, by how exporters name them: state/stateN (Silero), h0/hn,
# state_in/state_out, cache/new_cache; only names that say "state" (an image-to-image model's
# x_in/x_out is no stream): STATE_WORDS, or an RNN's bare h/c
STATE_NAMES = (("", "n"), ("", "_n"), ("", "_out"), ("", "_new"), ("", "_next"), ("_in", "_out"),
               ("in", "out"), ("0", "n"), ("_prev", ""))
STATE_PREFIXES = (("", "new_"), ("", "next_"), ("in_", "out_"), ("prev_", ""))
STATE_WORDS = ("state", "cache", "hidden", "memory", "h0", "c0", "past", "prev")


def graph_inputs(proto) -> dict:
    """{name: value info} of the inputs a caller feeds (old IR-3 files list weights too)."""
    initializers = {t.name for t in proto.graph.initializer}
    return {i.name: i for i in proto.graph.input if i.name not in initializers}


def state_pairs(proto) -> dict[str, str]:
    """{output: input} for outputs that a streaming model feeds back as the next call's input:
    same type and shape, a state's name (STATE_WORDS), paired by STATE_NAMES/STATE_PREFIXES
    (each input once). Other pairs are named with --state."""
    inputs = graph_inputs(proto)
    pairs: dict[str, str] = {}
    for out in proto.graph.output:
        for name, vi in inputs.items():
            low, olow = name.lower(), out.name.lower()
            if not (any(w in low for w in STATE_WORDS) or low in ("h", "c")):
                continue
            named = any(low.endswith(a) and olow == low[:len(low) - len(a)] + b
                        for a, b in STATE_NAMES) or any(
                low.startswith(a) and olow == b + low[len(a):] for a, b in STATE_PREFIXES)
            if named and name not in pairs.values() and _same_tensor_type(vi, out):
                pairs[out.name] = name
                break
    return pairs


def parse_state(text: str | None) -> dict[str, str] | None:
    """`--state stateN=state,hn=h0` -> {output: input}; `none` -> {} (nothing carried);
    unset -> None (paired by name)."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return {}
    pairs = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        out, sep, inp = item.partition("=")
        if not sep or not out or not inp:
            raise EdgesmithError(f"bad --state {item!r}; write OUTPUT=INPUT (the output whose "
                                 "value the next call takes as INPUT), or none")
        pairs[out] = inp
    return pairs


def checked_state(proto, pairs: dict[str, str]) -> dict[str, str]:
    """--state pairs, each an output and an input of the model of one type and shape."""
    inputs = graph_inputs(proto)
    outputs = {o.name: o for o in proto.graph.output}
    for out, inp in pairs.items():
        if out not in outputs or inp not in inputs:
            raise EdgesmithError(f"--state {out}={inp}: {out!r} must be one of the outputs "
                                 f"{sorted(outputs)} and {inp!r} one of the inputs "
                                 f"{sorted(inputs)}")
        if not _same_tensor_type(outputs[out], inputs[inp]):
            raise EdgesmithError(f"--state {out}={inp}: the output and the input differ in type "
                                 "or shape, so one cannot feed the other")
    return dict(pairs)


def _same_tensor_type(a, b) -> bool:
    ta, tb = a.type.tensor_type, b.type.tensor_type
    if ta.elem_type != tb.elem_type or len(ta.shape.dim) != len(tb.shape.dim):
        return False
    return all(not (x.HasField("dim_value") and y.HasField("dim_value")) or
               x.dim_value == y.dim_value for x, y in zip(ta.shape.dim, tb.shape.dim))


def branch_inputs(proto) -> set[str]:
    """Graph inputs whose values an If's condition depends on (random values pick a branch);
    not through Shape/Size, which read only the shape (a dynamic-axes export's `if`)."""
    producer = {out: n for n in proto.graph.node for out in n.output}
    inputs = graph_inputs(proto)
    found: set[str] = set()
    todo = [n.input[0] for n in proto.graph.node if n.op_type == "If" and n.input]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in inputs:
            found.add(name)
        elif name in producer and producer[name].op_type not in ("Shape", "Size"):
            todo.extend(i for i in producer[name].input if i)
    return found


def timing_sample(model: Model, source) -> EvalData | None:
    """The data's first call when an input is not float, the model streams, or the data has
    constants: random token ids, masks, or a sample rate send an embedding lookup out of range
    or an If down the wrong branch (a MiniLM's `token_type_ids` of 7: every timing failed), and
    a stream starts from its first state, so such a model is timed on its own data. Float
    inputs time as well on random values, and their data may be large: none then."""
    if source is None or not Path(source).is_file() or (
            all(s.dtype.startswith("float") for s in model.inputs) and not model.state
            and not any(k.startswith("const:") for k in npz_headers(source))):
        return None
    from device_runtime.errors import RuntimeFailure
    from device_runtime.evaluate import load_eval

    specs = {s.name: s.as_manifest() for s in model.inputs}
    try:
        data = load_eval(Path(source), specs, state=model.state)
    except RuntimeFailure:
        return None       # the command's own loading says what is wrong, in its own words
    batch = 1 if model.state else model.inputs[0].shape[0] if model.inputs[0].shape else 1
    if data.n < batch:
        return None
    return EvalData({k: v[:batch] for k, v in data.inputs.items()}, None, {}, batch, data.consts,
                    data.state)


def default_opset(proto) -> int | None:
    """The model's ai.onnx opset (None when it imports no default domain)."""
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _check_opset(path: Path, proto) -> None:
    import onnx
    import onnxruntime

    opset = default_opset(proto)
    newest = onnx.defs.onnx_opset_version()
    if opset is not None and opset < 7:
        raise EdgesmithError(f"{path} uses opset {opset}; onnxruntime {onnxruntime.__version__} "
                             "needs opset 7 or later: upgrade it with onnx.version_converter")
    if opset is not None and opset > newest:
        raise EdgesmithError(f"{path} uses opset {opset}, newer than this onnx ({newest}) and "
                             f"onnxruntime {onnxruntime.__version__} know; re-export with "
                             f"opset <= {newest} or upgrade onnx/onnxruntime")


def _check_external_sizes(proto, path: Path) -> None:
    """Each external tensor's bytes (its `length`, else the rest of its file) must be what its
    shape and type take, checked before anything is read: a 4x4 tensor declaring 20 GB (a
    sparse file reads as zeros for minutes) is refused at once."""
    import onnx

    for t in proto.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL or t.data_type == onnx.TensorProto.STRING:
            continue
        info = {e.key: e.value for e in t.external_data}
        need = int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(
            t.data_type).itemsize
        try:
            data_file = path.parent / info.get("location", "")
            length = int(info["length"]) if "length" in info else (
                data_file.stat().st_size - int(info.get("offset", 0)))
        except (OSError, ValueError):
            continue                   # the loader below names a missing or escaping file
        if length != need:
            raise EdgesmithError(f"{path}: tensor {t.name!r} ({list(t.dims)}) takes {need} bytes "
                                 f"but its external data declares {length}; re-export the model")


def _check_runs_in_ort(path: Path, data: bytes) -> None:
    """ORT is the judge of what it can load (ops, opset, IR version): ask it, explain the no."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    try:
        ort.InferenceSession(data if len(data) < (1 << 30) else str(path), opts,
                             providers=["CPUExecutionProvider"])
    except Exception as exc:  # pybind exception classes; one line is what the user needs
        first = str(exc).strip().splitlines()[0]
        raise EdgesmithError(f"onnxruntime {ort.__version__} cannot load {path.name}: "
                             f"{first}") from None


def _elem_dtype(elem_type: int) -> str:
    import onnx

    return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def _input_specs(path: Path, proto, given: dict[str, list[int]], data=None,
                 static: bool = True, carried: set[str] = frozenset()) -> list[InputSpec]:
    """Concrete input shapes: --input-shape first, then the shapes of the user's data (batch 1;
    a `const:` array's own shape), a dynamic batch alone measured at 1, as are a stream's state
    inputs (`carried`: their batch may sit on another axis). `static=False` (fuse) needs no
    concrete shape."""
    inputs = list(graph_inputs(proto).values())
    names = [i.name for i in inputs]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise EdgesmithError(f"--input-shape names {unknown}, but the model's inputs are {names}")
    from_data = data_shapes(data) if data is not None else {}
    if "*" in from_data and len(inputs) == 1:
        from_data = {inputs[0].name: from_data["*"]}
    specs = []
    for vi in inputs:
        ttype = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                for d in ttype.shape.dim]          # -1 and 0 are how some exporters say dynamic
        want = "x".join("?" if d is None else str(d) for d in dims)
        if vi.name in given:
            shape = given[vi.name]
            if not dims_match(dims, shape):
                raise EdgesmithError(f"--input-shape {vi.name}={'x'.join(map(str, shape))} "
                                     f"does not fit the model's {want}")
        elif f"const:{vi.name}" in from_data:
            shape = list(from_data[f"const:{vi.name}"])
            if not dims_match(dims, shape):
                raise EdgesmithError(f"{Path(data).name}: 'const:{vi.name}' is "
                                     f"{'x'.join(map(str, shape)) or 'a scalar'}, the model's "
                                     f"input is {want or 'a scalar'}")
        elif vi.name in carried:
            if vi.name in from_data:
                raise EdgesmithError(f"{Path(data).name}: {vi.name!r} is a state input, carried "
                                     "from the previous call's output; give its first value as "
                                     f"'const:{vi.name}' (zeros without it), not one per sample")
            shape = [d if d is not None else 1 for d in dims]
        elif any(d is None for d in dims[1:]) and vi.name in from_data:
            sample = list(from_data[vi.name][1:])
            shape = [dims[0] or 1] + sample
            if not dims_match(dims, shape):
                raise EdgesmithError(f"{Path(data).name}: input {vi.name!r} is "
                                     f"{'x'.join(map(str, from_data[vi.name]))}: samples on axis "
                                     f"0 take the batch's place, so each sample is "
                                     f"{'x'.join(map(str, shape))}, and the model's input is "
                                     f"{want}")
        elif any(d is None for d in dims[1:]) and static and from_data and "*" not in from_data:
            arrays = sorted(k for k in from_data if k != "labels")
            twin = next((o.name for o in proto.graph.output if vi.name.lower() in o.name.lower()
                         and _same_tensor_type(o, vi)), None)
            hint = (f"; or, if the model returns it as {twin!r} for its next call, pass "
                    f"--state {twin}={vi.name}") if twin else ""
            raise EdgesmithError(f"{Path(data).name} has no array named {vi.name!r} (it has "
                                 f"{arrays}), so the dynamic dimensions of {vi.name!r} ({want}) "
                                 f"cannot be read from it: name the arrays after the model's "
                                 f"inputs {names} (labels as 'labels'){hint}")
        elif any(d is None for d in dims[1:]) and static:
            hint = "x".join(str(d) if d else ("1" if i == 0 else f"<{dim.dim_param or 'size'}>")
                            for i, (d, dim) in enumerate(zip(dims, ttype.shape.dim)))
            raise EdgesmithError(f"input {vi.name!r} has dynamic dimensions ({want}); give the "
                                 f"size you deploy at with --input-shape {vi.name}={hint}, or "
                                 "pass --eval/--calib data and it is read from the samples")
        else:  # only the batch may be dynamic: measure batch 1, like Polygraphy's default
            shape = [d if d is not None else 1 for d in dims]
        specs.append(InputSpec(vi.name, dims, list(shape), _elem_dtype(ttype.elem_type)))
    return specs


def data_shapes(source) -> dict[str, tuple]:
    """Array shapes in an .npz (headers only) or, for an image folder, its first image as
    1x{C}xHxW under the name `*`: what fills a model's dynamic dimensions when none are given."""
    source = Path(source)
    if source.is_dir():
        from PIL import Image

        first = next((p for p in sorted(source.rglob("*")) if p.suffix.lower() in
                      {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm"}), None)
        if first is None:
            return {}
        with Image.open(first) as img:
            return {"*": (1, len(img.getbands()), img.height, img.width)}
    return {name: shape for name, (shape, _) in npz_headers(source).items()}


def npz_headers(source) -> dict[str, tuple[tuple, np.dtype]]:
    """Each array's shape and dtype in an .npz, read from the headers only ({} if unreadable:
    the data loader says what is wrong with the file, in its own words)."""
    from device_runtime.errors import RuntimeFailure
    from device_runtime.evaluate import npz_members

    try:
        return npz_members(Path(source))
    except RuntimeFailure:
        return {}


def static_shapes(proto, inputs: list[InputSpec]) -> dict[str, list[int]]:
    """Static shapes of every value once the inputs take their concrete shapes; through Shape
    ops where onnx can follow them (a transformer's heads are reshaped by computed shapes:
    without, 7/8 of a MiniLM's MatMul MACs were unknown and dynamic int8 was "not worth it")."""
    from .onnx_utils import static_shapes as inferred, with_input_dims

    fixed = with_input_dims(proto, {s.name: s.shape for s in inputs})
    return inferred(fixed, data_prop=True) or inferred(fixed, data_prop=False)


def node_macs(node, shapes: dict[str, list[int]]) -> int:
    """Multiply-accumulates of one Conv/Gemm/MatMul node, float or int8 (0 if shapes unknown)."""
    w_index = WEIGHT_INPUT.get(node.op_type, 1)
    ins = [shapes.get(node.input[0]), shapes.get(node.input[w_index])
           if len(node.input) > w_index else None]
    out = shapes.get(node.output[0])
    op = AS_FLOAT_OP.get(node.op_type, node.op_type)
    if op in ("LSTM", "GRU", "RNN") and None not in ins and node.input[2] in shapes:
        # X [seq, batch, in] (layout 0), W [dirs, gates*hidden, in], R [dirs, gates*hidden,
        # hidden]; the sequence output Y is often not asked for, so no output shape is needed
        steps = ins[0][0] * ins[0][1]          # seq * batch, in either layout
        return int(steps * (np.prod(ins[1]) + np.prod(shapes[node.input[2]])))
    if None in ins or out is None:
        return 0
    if op == "Conv":
        w = ins[1]   # [Cout, Cin/groups, k...]: every output element does Cin/groups*k MACs
        return int(np.prod(out) * np.prod(w[1:]))
    if op == "ConvTranspose":
        w = ins[1]   # [Cin, Cout/groups, k...]: every input element scatters to Cout/groups*k
        return int(np.prod(ins[0]) * np.prod(w[1:]))
    if op == "Gemm":
        trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
        k = ins[0][0] if trans_a else ins[0][-1]
        return int(np.prod(out) * k)
    if op == "MatMul":
        return int(np.prod(out) * ins[0][-1])
    return 0


# inputs that hold quantization parameters (scales, zero points), not weights
_QUANT_PARAMS = {"QuantizeLinear": (1, 2), "DequantizeLinear": (1, 2),
                 "QLinearConv": (1, 2, 4, 5, 6, 7), "QLinearMatMul": (1, 2, 4, 5, 6, 7),
                 "ConvInteger": (2, 3), "MatMulInteger": (2, 3)}


def _param_count(proto) -> int:
    """Weights and biases, float or quantized (int8/uint8 weights, int32 biases): an int8
    model has as many parameters as its float original, not none."""
    meta = {n.input[i] for n in proto.graph.node for i in _QUANT_PARAMS.get(n.op_type, ())
            if i < len(n.input)}
    count = 0
    for t in proto.graph.initializer:
        dtype = np.dtype(_elem_dtype(t.data_type))
        if t.name not in meta and (dtype.kind == "f" or dtype in (np.int8, np.uint8, np.int32)):
            count += int(np.prod(t.dims))
    return count


SCORE_HEADS = {"Gemm", "MatMul", "Softmax", "LogSoftmax"}
SHAPE_ONLY = {"Identity", "Reshape", "Flatten", "Squeeze", "Cast", "Add", "DequantizeLinear",
              "QuantizeLinear"}


def class_scores(graph) -> bool:
    """Whether the first output comes from a classifier head (Gemm/MatMul, Softmax, a Sigmoid's
    yes/no), so top-1 (or decision) agreement with fp32 judges it. Pooled features and embeddings (GlobalAveragePool, Tanh, a
    normalisation) are 2-D too, but their arg-max means nothing: SQNR judges them."""
    producer = {out: n for n in graph.node for out in n.output}
    name = graph.output[0].name if graph.output else ""
    dims = graph.output[0].type.tensor_type.shape.dim if graph.output else []
    one_score = len(dims) >= 1 and dims[-1].dim_value == 1     # a yes/no (a multi-label
    for _ in range(len(graph.node) + 1):                       # sigmoid stays SQNR-judged)
        node = producer.get(name)
        if node is None or node.op_type in SCORE_HEADS or (node.op_type == "Sigmoid"
                                                            and one_score):
            return True
        if node.op_type not in SHAPE_ONLY or not node.input:
            return False
        name = node.input[0]
    return True


def onnx_facts(proto, inputs: list[InputSpec], size_bytes: int) -> ModelFacts:
    params = _param_count(proto)
    shapes = static_shapes(proto, inputs)
    macs_by_op: dict[str, int] = {}
    for node in proto.graph.node:
        if node.op_type in MAC_OPS:
            op = AS_FLOAT_OP.get(node.op_type, node.op_type)
            macs_by_op[op] = macs_by_op.get(op, 0) + node_macs(node, shapes)
    notes = [f"input {s.name!r}: dynamic batch measured as {s.shape[0]} (set --input-shape)"
             for s in inputs if s.dims and s.dims[0] is None]
    notes += [f"input {s.name!r}: dynamic dimensions "
              f"{'x'.join('?' if d is None else str(d) for d in s.dims)} measured at "
              f"{'x'.join(map(str, s.shape))} (--input-shape, else the data's sample shape)"
              for s in inputs if any(d is None for d in s.dims[1:])]
    opset = default_opset(proto)
    return ModelFacts("onnx", size_bytes, params, sum(macs_by_op.values()), macs_by_op, opset,
                      f"{proto.producer_name} {proto.producer_version}".strip(), notes,
                      class_scores(proto.graph))


def from_proto(proto, like: Model, path: Path | None = None) -> Model:
    """Wrap a rewritten ONNX model (same inputs/outputs as `like`) with fresh facts."""
    data = proto.SerializeToString()
    return Model(path, "onnx", like.inputs, [o.name for o in proto.graph.output],
                 onnx_facts(proto, like.inputs, len(data)), proto=proto, sample=like.sample,
                 state=like.state)
