"""ONNX Runtime backend: every session knob comes from the bundle's runtime config."""
from __future__ import annotations

import os
import re

from ..errors import RuntimeFailure

OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
              "extended": "ORT_ENABLE_EXTENDED", "layout": "ORT_ENABLE_LAYOUT",
              "all": "ORT_ENABLE_ALL"}
DEFAULT_CONFIG = {"providers": ["CPUExecutionProvider"], "intra_op_threads": 0,
                  "inter_op_threads": 0, "graph_optimization_level": "all",
                  "execution_mode": "sequential", "session_config": {}, "profile_ops": False}
# a model saved by a newer onnx than this device's onnxruntime reads: the usual host/device skew
TOO_NEW = ((r"Unsupported model IR version: (\d+), max supported IR version: (\d+)", "ir_version"),
           (r"Opset (\d+) is under development.*is till opset (\d+)", "opset"))


def _import():
    try:
        import onnxruntime
    except ImportError as exc:
        raise RuntimeFailure("load", f"onnxruntime is not importable on this device ({exc}); "
                             "run `edgesmith device setup` or `pip install onnxruntime`") from None
    return onnxruntime


def versions() -> dict:
    ort = _import()
    return {"onnxruntime": ort.__version__, "providers": ort.get_available_providers()}


class Backend:
    name = "onnxruntime"
    threads_key = "intra_op_threads"

    def __init__(self, model_path: str, config: dict):
        ort = _import()
        self.config = {**DEFAULT_CONFIG, **config}
        cfg = self.config
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(cfg["intra_op_threads"])
        opts.inter_op_num_threads = int(cfg["inter_op_threads"])
        level = OPT_LEVELS.get(cfg["graph_optimization_level"])
        if level is None or not hasattr(ort.GraphOptimizationLevel, level):
            raise RuntimeFailure("load", f"graph_optimization_level "
                                 f"{cfg['graph_optimization_level']!r} is not supported by "
                                 f"onnxruntime {ort.__version__}; use one of {list(OPT_LEVELS)}")
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        opts.execution_mode = (ort.ExecutionMode.ORT_PARALLEL if cfg["execution_mode"] == "parallel"
                               else ort.ExecutionMode.ORT_SEQUENTIAL)
        for key, value in cfg["session_config"].items():
            opts.add_session_config_entry(str(key), str(value))
        if cfg["profile_ops"]:   # into a temp folder that goes with the backend: a failed
            import shutil            # run leaves no profile in the user's directory
            import tempfile
            import weakref

            folder = tempfile.mkdtemp(prefix="edgesmith-profile-")
            weakref.finalize(self, shutil.rmtree, folder, True)
            opts.enable_profiling = True
            opts.profile_file_prefix = os.path.join(folder, "ort")
        for lib in cfg.get("custom_op_libraries") or []:   # absolute, verified by the session
            try:
                opts.register_custom_ops_library(lib)
            except Exception as exc:
                raise RuntimeFailure("load", f"cannot load kernel library {os.path.basename(lib)}"
                                     f" ({str(exc).strip().splitlines()[-1][:200]}); it was built "
                                     "for another CPU or onnxruntime: rebuild the bundle for "
                                     "this device") from None
        available = ort.get_available_providers()
        providers = [p if isinstance(p, str) else tuple(p) for p in cfg["providers"]]
        for p in providers:
            name = p if isinstance(p, str) else p[0]
            if name not in available:
                raise RuntimeFailure("load", f"execution provider {name} is not available in "
                                     f"onnxruntime {ort.__version__} here (has {available})")
        try:
            self.session = ort.InferenceSession(model_path, opts, providers=providers)
        except Exception as exc:  # ORT raises its own pybind classes; translate to one line
            for pattern, kind in TOO_NEW:
                if found := re.search(pattern, str(exc), re.S):
                    skew = {"kind": kind, "model": int(found[1]), "device_max": int(found[2]),
                            "onnxruntime": ort.__version__}
                    what = kind.replace("_", " ").replace("ir", "IR")
                    raise RuntimeFailure("load", f"the model's ONNX {what} {found[1]} is newer "
                                         f"than onnxruntime {ort.__version__} reads (up to "
                                         f"{found[2]})", skew) from None
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RuntimeFailure("load", f"onnxruntime {ort.__version__} cannot load the model: "
                                 f"{first}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feed: dict) -> list:
        try:
            return self.session.run(self.output_names, feed)
        except Exception as exc:   # noqa: BLE001 - pybind's Fail/InvalidArgument/...: one line
            text = str(exc).split("Status Message:")[-1].strip().splitlines() or [repr(exc)]
            raise RuntimeFailure("run", f"the model failed on this input: {text[0]}") from None

    def op_profile(self) -> tuple[dict[str, float], dict[str, float]]:
        """Milliseconds per run per op type (the profile's sum over its runs / their number),
        and per node of onnxruntime's optimised graph: the mean over runs of the middle 80 %
        (warm-ups skew a plain mean; the profile counts whole microseconds, so a median cannot
        tell a 2.4 us kernel from a 2.0 us one, and small kernels need that resolution)."""
        import json
        import statistics

        if not self.config["profile_ops"]:
            return {}, {}
        path = self.session.end_profiling()
        try:
            with open(path) as fh:
                events = json.load(fh)
        finally:
            os.remove(path)
        per_op: dict[str, float] = {}
        per_node: dict[str, list] = {}
        runs = sum(ev.get("name") == "model_run" for ev in events) or 1
        for ev in events:
            op, name, ms = ev.get("args", {}).get("op_name"), ev.get("name", ""), \
                ev.get("dur", 0) / 1000.0
            if ev.get("cat") == "Node" and op and name.endswith("_kernel_time"):
                per_op[op] = per_op.get(op, 0.0) + ms / runs
                per_node.setdefault(name[:-len("_kernel_time")], []).append(ms)
        return per_op, {k: statistics.fmean(sorted(v)[len(v) // 10:len(v) - len(v) // 10])
                        for k, v in per_node.items()}
