"""Runtime variants: every knob that decides which kernels run, and which ones a device can use.

A knob turns a value into runtime-config changes for one backend and says, from the device's
facts, why a value is impossible there (no CUDA EP without a GPU, more threads than cores, ...).
Knobs live in a plain registry dict filled by a decorator that refuses duplicate names.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

CPU_EP = "CPUExecutionProvider"


@dataclass(frozen=True)
class Knob:
    name: str
    backends: tuple[str, ...]
    apply: Callable[[dict, object, str], None]        # (config, value, backend) -> mutates config
    accepts: Callable[[object], bool]
    impossible: Callable[[object, dict, str], str | None] = lambda value, facts, backend: None
    numeric: bool = False       # changes results (not just speed): accuracy must be re-checked
    # a knob that changes the model, not only the config: (model, value, facts) -> (model,
    # {bundle file: bytes}, report info) or why this value cannot apply to this model, in a line
    rewrite: Callable | None = None


KNOBS: dict[str, Knob] = {}


def knob(name: str, backends: tuple[str, ...], accepts: Callable[[object], bool],
         impossible=None, numeric: bool = False, rewrite: Callable | None = None):
    def register(apply):
        if name in KNOBS:
            raise ValueError(f"knob {name!r} is registered twice")
        KNOBS[name] = Knob(name, backends, apply, accepts,
                           impossible or (lambda value, facts, backend: None), numeric, rewrite)
        return apply
    return register


def _session_config(config: dict) -> dict:
    return config.setdefault("session_config", {})


def _providers(config: dict) -> list:
    return config.setdefault("providers", [CPU_EP])


def _has_ep(facts: dict, ep: str) -> bool:
    return ep in (facts.get("ort_providers") or [])


def _threads_impossible(value, facts, backend):
    cores = facts.get("cores") or 1
    return f"{value} threads > {cores} cores" if value > cores else None


@knob("threads", ("onnxruntime", "tflite"), lambda v: isinstance(v, int) and v >= 1,
      _threads_impossible)
def _threads(config, value, backend):
    config["intra_op_threads" if backend == "onnxruntime" else "threads"] = value


@knob("allow_spinning", ("onnxruntime",), lambda v: isinstance(v, bool))
def _spinning(config, value, backend):
    _session_config(config)["session.intra_op.allow_spinning"] = "1" if value else "0"


@knob("graph_optimization_level", ("onnxruntime",),
      lambda v: v in ("disable", "basic", "extended", "layout", "all"))
def _opt_level(config, value, backend):
    config["graph_optimization_level"] = value


@knob("execution_mode", ("onnxruntime",), lambda v: v in ("sequential", "parallel"))
def _exec_mode(config, value, backend):
    config["execution_mode"] = value


def _xnnpack_impossible(value, facts, backend):
    if value and backend == "onnxruntime" and not _has_ep(facts, "XnnpackExecutionProvider"):
        return "the device's onnxruntime has no XnnpackExecutionProvider"
    return None


@knob("xnnpack", ("onnxruntime", "tflite"), lambda v: isinstance(v, bool), _xnnpack_impossible)
def _xnnpack(config, value, backend):
    if backend == "tflite":
        config["xnnpack"] = value
    elif value:
        config["providers"] = ["XnnpackExecutionProvider", CPU_EP]


def _bf16_impossible(value, facts, backend):
    if value and not (facts.get("arch") == "aarch64" and "bf16" in facts.get("cpu_flags", [])):
        return "bf16 fast-math GEMM needs an aarch64 CPU with bf16"
    return None


@knob("gemm_fastmath_bf16", ("onnxruntime",), lambda v: isinstance(v, bool), _bf16_impossible,
      numeric=True)
def _bf16(config, value, backend):
    _session_config(config)["mlas.enable_gemm_fastmath_arm64_bfloat16"] = "1" if value else "0"


def _cuda_impossible(value, facts, backend):
    if not _has_ep(facts, "CUDAExecutionProvider"):
        gpu = facts.get("gpu")
        return ("the device has no GPU" if not gpu else
                "the device's onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    return None


@knob("cudnn_conv_algo_search", ("onnxruntime",),
      lambda v: v in ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"), _cuda_impossible)
def _cudnn(config, value, backend):
    config["providers"] = [["CUDAExecutionProvider", {"cudnn_conv_algo_search": value}], CPU_EP]


def _trt_impossible(value, facts, backend):
    if not _has_ep(facts, "TensorrtExecutionProvider"):
        return ("the device has no GPU" if not facts.get("gpu") else
                "the device's onnxruntime has no TensorrtExecutionProvider")
    return None


@knob("trt_fp16", ("onnxruntime",), lambda v: isinstance(v, bool), _trt_impossible, numeric=True)
def _trt(config, value, backend):
    config["providers"] = [["TensorrtExecutionProvider",
                            {"trt_fp16_enable": value, "trt_engine_cache_enable": True,
                             "trt_timing_cache_enable": True}],
                           "CUDAExecutionProvider", CPU_EP]


def _kernels_impossible(value, facts, backend):
    from .own_kernels import toolchain

    found = toolchain(facts) if value else None
    return found if isinstance(found, str) else None


def kernel_setting(value) -> tuple[int, int] | None:
    """An `edgesmith_kernels` value as (band rows, smallest output side), None if malformed:
    N (N > 0) is every block at N output rows a band; "R@S" the blocks whose output is at
    least S pixels a side, at R rows a band (R = 0: the kernel's default band); 0 is off."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, 0) if 0 <= value <= 64 else None
    rows, at, side = str(value).partition("@")
    if not (at and rows.isdigit() and side.isdigit()):
        return None
    return (int(rows), int(side)) if int(rows) <= 64 and 0 < int(side) <= 65536 else None


def _kernels_rewrite(model, value, facts):
    from .own_kernels import rewrite_for_device

    return rewrite_for_device(model, *kernel_setting(value), facts)


@knob("edgesmith_kernels", ("onnxruntime",), lambda v: kernel_setting(v) is not None,
      _kernels_impossible, rewrite=_kernels_rewrite)
def _kernels(config, value, backend):
    """0: onnxruntime's kernels; N or "R@S": edgesmith's fused kernels (kernel_setting): their
    band height is the kernel's own tuning knob (how much of the expanded tensor stays in
    cache), the smallest side where they are used the measured choice of where fusion pays."""
    from .own_kernels import LIBRARY

    if value:
        config["custom_op_libraries"] = [LIBRARY]


@dataclass(frozen=True)
class Variant:
    """A point in the search space: knob values (unset knobs keep the runtime's defaults)."""

    backend: str
    knobs: tuple = ()               # sorted ((name, value), ...)

    @classmethod
    def of(cls, backend: str, values: dict) -> "Variant":
        return cls(backend, tuple(sorted(values.items())))

    def config(self) -> dict:
        config: dict = {}
        for name, value in self.knobs:
            KNOBS[name].apply(config, value, self.backend)
        return config

    def key(self) -> str:
        """Identity: the effective runtime config (backend defaults filled in), so a knob set to
        its default value is the default variant, measured once."""
        import importlib

        defaults = importlib.import_module(f"device_runtime.backends.{self.backend}").DEFAULT_CONFIG
        effective = {**defaults, **self.config()}
        spin = effective.get("session_config", {}).get("session.intra_op.allow_spinning")
        if spin == "1":   # onnxruntime spins by default: "1" is the default
            effective["session_config"] = {k: v for k, v in effective["session_config"].items()
                                           if k != "session.intra_op.allow_spinning"}
        rewrites = dict(self.rewrites())   # keys of config-only variants stay as they were
        return json.dumps({"backend": self.backend, "config": effective,
                           **({"rewrites": rewrites} if rewrites else {})}, sort_keys=True)

    def rewrites(self) -> tuple:
        """The knob values that change the model itself ((name, value), ...); 0/False = none."""
        return tuple((k, v) for k, v in self.knobs if KNOBS[k].rewrite is not None and v)

    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.knobs) or "runtime defaults"

    @property
    def numeric(self) -> bool:
        return any(KNOBS[name].numeric for name, _ in self.knobs)


@dataclass
class Space:
    backend: str
    values: dict[str, list]                       # knob -> possible values, in search order
    pruned: list[tuple[str, object, str]] = field(default_factory=list)   # (knob, value, why)

    def without_numeric(self, why: str) -> "Space":
        """The same space minus knobs that change results (they need accuracy checks)."""
        numeric = [k for k in self.values if KNOBS[k].numeric]
        return Space(self.backend, {k: v for k, v in self.values.items() if k not in numeric},
                     self.pruned + [(k, v, why) for k in numeric for v in self.values[k]])


def space(search: dict, facts: dict, backend: str) -> Space:
    """The profile's search values that this backend has and this device can run."""
    values: dict[str, list] = {}
    pruned: list[tuple[str, object, str]] = []
    for name, options in search.items():
        k = KNOBS[name]
        if backend not in k.backends:
            continue
        if name == "threads" and facts.get("cores"):   # the device's own core count, always
            options = sorted(set(options) | {int(facts["cores"])})
        kept = []
        for value in options:
            why = k.impossible(value, facts, backend)
            if why:
                pruned.append((name, value, why))
            else:
                kept.append(value)
        if kept:
            values[name] = kept
    return Space(backend, values, pruned)
