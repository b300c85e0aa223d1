"""TFLite backend: ai-edge-litert first, tflite-runtime as the fallback for numpy-1 devices."""
from __future__ import annotations

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


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("ai-edge-litert", "tflite-runtime"):
        try:
            return {dist: version(dist)}
        except PackageNotFoundError:
            continue
    return {}


class Backend:
    name = "tflite"
    threads_key = "threads"

    def __init__(self, model_path: str, config: dict):
        interpreter, self.package = _interpreter_module()
        self.config = {**DEFAULT_CONFIG, **config}
        kwargs = {"model_path": model_path}
        if int(self.config["threads"]) > 0:
            kwargs["num_threads"] = int(self.config["threads"])
        if not self.config["xnnpack"]:
            kwargs["experimental_op_resolver_type"] = \
                interpreter.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        try:
            self.interp = interpreter.Interpreter(**kwargs)
            self.interp.allocate_tensors()
        except Exception as exc:
            raise RuntimeFailure("load", f"{self.package} cannot load the model: "
                                 f"{str(exc).strip().splitlines()[0]}") from None
        self._inputs = {d["name"]: d for d in self.interp.get_input_details()}
        self._outputs = self.interp.get_output_details()
        self.input_names = list(self._inputs)
        self.output_names = [d["name"] for d in self._outputs]

    def run(self, feed: dict) -> list:
        interp = self.interp
        for name, array in feed.items():
            detail = self._inputs[name]
            if tuple(detail["shape"]) != array.shape:
                interp.resize_tensor_input(detail["index"], array.shape)
                interp.allocate_tensors()
                self._inputs = {d["name"]: d for d in interp.get_input_details()}
                detail = self._inputs[name]
            interp.set_tensor(detail["index"], array)
        interp.invoke()
        return [interp.get_tensor(d["index"]) for d in self._outputs]

    def op_profile(self) -> dict[str, float]:
        return {}
