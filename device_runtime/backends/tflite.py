"""TFLite backend: ai-edge-litert first, tflite-runtime as the fallback for numpy-1 devices.

Inputs and outputs are named by the model's signature when it has one (what LiteRT documents as
a model's interface; converters' tensor names are internal), else by tensor name. A fully int8
model takes and returns int8 tensors: float feeds are quantized, and its outputs dequantized, with
the model's own scale and zero point, so eval sets and references are the float model's.
"""
from __future__ import annotations

import keyword
import os
import re
from collections import Counter

from ..errors import RuntimeFailure

DEFAULT_CONFIG = {"threads": 0, "xnnpack": True}


def _interpreter_module():
    try:
        from ai_edge_litert import interpreter
        return interpreter, "ai-edge-litert"
    except ImportError:
        pass
    try:
        from tflite_runtime import interpreter
    except ImportError:
        raise RuntimeFailure("load", "no TFLite runtime on this device; `pip install "
                             "ai-edge-litert` (or tflite-runtime with numpy<2)") from None
    import numpy

    if int(numpy.__version__.split(".")[0]) >= 2:
        raise RuntimeFailure("load", f"tflite-runtime cannot run with numpy {numpy.__version__} "
                             "(it was built for numpy 1); `pip install ai-edge-litert` or "
                             "`pip install 'numpy<2'`")
    return interpreter, "tflite-runtime"


def identifier(name: str) -> str:
    """A tensor name as a TFLite signature key (`input.1` -> `input_1`): converters write keys
    that are identifiers, so a feed may use either."""
    key = re.sub(r"\W", "_", name)
    return key if key.isidentifier() and not keyword.iskeyword(key) else f"_{key}"


def versions() -> dict:
    from importlib.metadata import version

    package = _interpreter_module()[1]
    return {package: version(package)}


class Backend:
    name = "tflite"
    threads_key = "threads"

    def __init__(self, model_path: str, config: dict):
        interpreter, self.package = _interpreter_module()
        self.config = {**DEFAULT_CONFIG, **config}
        # threads 0 is every core, as onnxruntime's default (LiteRT's own default is one
        # thread, which would lose every comparison with onnxruntime on a multi-core board)
        kwargs = {"model_path": model_path,
                  "num_threads": int(self.config["threads"]) or os.cpu_count() or 1}
        if not self.config["xnnpack"]:
            kwargs["experimental_op_resolver_type"] = \
                interpreter.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        try:
            self.interp = interpreter.Interpreter(**kwargs)
            self.interp.allocate_tensors()
        except Exception as exc:
            raise RuntimeFailure("load", f"{self.package} cannot load the model: "
                                 f"{str(exc).strip().splitlines()[0]}") from None
        self._read_details()
        self.input_names = list(self.inputs)
        self.output_names = list(self.outputs)

    def _read_details(self) -> None:
        """{name: tensor detail} for inputs and outputs, by signature key where there is one."""
        interp, signatures = self.interp, self.interp.get_signature_list()
        runner = interp.get_signature_runner(next(iter(signatures))) \
            if len(signatures) == 1 else None
        main = {d["index"] for d in interp.get_input_details()}   # the subgraph invoke() runs
        if runner and {d["index"] for d in runner.get_input_details().values()} == main:
            self.inputs, self.outputs = runner.get_input_details(), runner.get_output_details()
        else:
            self.inputs = {d["name"]: d for d in interp.get_input_details()}
            self.outputs = {d["name"]: d for d in interp.get_output_details()}

    def run(self, feed: dict) -> list:
        import numpy as np

        interp = self.interp
        for name, array in feed.items():
            name = name if name in self.inputs else identifier(name)
            detail = self.inputs[name]
            if tuple(detail["shape"]) != array.shape:
                interp.resize_tensor_input(detail["index"], array.shape)
                interp.allocate_tensors()
                self._read_details()
                detail = self.inputs[name]
            scale, zero = detail["quantization"]
            if scale and array.dtype.kind == "f" and detail["dtype"] != array.dtype:
                info = np.iinfo(detail["dtype"])
                array = np.clip(np.round(array / scale) + zero, info.min, info.max) \
                    .astype(detail["dtype"])
            interp.set_tensor(detail["index"], array)
        interp.invoke()
        outputs = [(interp.get_tensor(d["index"]), *d["quantization"])
                   for d in self.outputs.values()]
        return [(y.astype(np.float32) - zero) * np.float32(scale)
                if scale and y.dtype.kind in "iu" else y for y, scale, zero in outputs]

    def delegation(self) -> dict | None:
        """How much of the graph XNNPACK runs: ops it replaced, and the ops left to TFLite's
        reference kernels (XNNPACK has no kernel for their op or type), by op name. `applied`
        is False when XNNPACK replaced nothing (it did not start, e.g. no CPU information under
        emulation, or it supports none of the ops)."""
        if not self.config["xnnpack"] or not hasattr(self.interp, "_get_ops_details"):
            return None
        ops = self.interp._get_ops_details()
        model_ops = [op for op in ops if op["op_name"] != "DELEGATE"]
        produced = {t: op for op in model_ops for t in op["outputs"]}
        taken: set = set()
        for d in (op for op in ops if op["op_name"] == "DELEGATE"):
            stop, todo = set(d["inputs"]), list(d["outputs"])
            while todo:           # a partition: every op between its inputs and its outputs
                op = produced.get(todo.pop())
                if op is None or op["index"] in taken:
                    continue
                taken.add(op["index"])
                todo += [t for t in op["inputs"] if t not in stop]
        fallback = Counter(op["op_name"] for op in model_ops if op["index"] not in taken)
        return {"delegate": "XNNPACK", "ops": len(model_ops), "delegated": len(taken),
                "fallback": dict(fallback), "applied": len(model_ops) < len(ops)}

    def op_profile(self) -> tuple[dict, dict]:
        return {}, {}
