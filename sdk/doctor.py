"""`edgesmith doctor`: which optional parts are present, what each enables, how to add it.

A missing optional part never breaks a command silently: the command that needs it names the
extra; doctor lists them all at once, for the host and (over SSH) for a device.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util

# (module, distribution, what it enables, how to add it)
HOST_PARTS = [
    ("onnxruntime", "onnxruntime", "running and quantizing ONNX models", "pip install onnxruntime"),
    ("sympy", "sympy", "int8 quantization pre-processing (symbolic shapes)",
     "pip install sympy (a core dependency: reinstall edgesmith)"),
    ("PIL", "pillow", "image folders as --calib / --data",
     "pip install pillow (a core dependency: reinstall edgesmith)"),
    ("torch", "torch", "pruning + distillation and NetAdapt candidates (optimize --train, "
     "distill, nas)",
     "pip install torch==2.13.0 'edgesmith[train]'"),
    ("ai_edge_litert", "ai-edge-litert", "running .tflite models on this machine",
     "pip install 'edgesmith[tflite]'"),
    ("litert_torch", "litert-torch", "converting to TFLite (convert, optimize's TFLite "
     "candidates)", "pip install torch==2.13.0 'edgesmith[tflite-convert]'"),
]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_host() -> list[dict]:
    rows = []
    for module, dist, enables, fix in HOST_PARTS:
        found = importlib.util.find_spec(module) is not None
        rows.append({"where": "host", "what": dist, "ok": found,
                     "detail": _version(dist) or ("installed" if found else "missing"),
                     "enables": enables, "fix": fix})
    try:
        import onnxruntime
        providers = onnxruntime.get_available_providers()
    except ImportError:
        providers = []
    gpu = {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(providers)
    rows.append({"where": "host", "what": "onnxruntime providers", "ok": True,
                 "detail": ", ".join(providers) or "none",
                 "enables": "fp16 and TensorRT variants need a GPU provider" if not gpu else
                 "GPU variants", "fix": ""})
    from device_runtime.facts import collect
    rows.append(kernel_toolchain_row("host", collect(with_providers=False)))
    return rows


def kernel_toolchain_row(where: str, facts: dict) -> dict:
    """Whether edgesmith's own kernels can be built for these facts' CPU, and with what."""
    from .own_kernels import header_dir, toolchain

    tc = toolchain(facts)
    ok = not isinstance(tc, str)
    detail = (f"{tc.compiler}, {tc.isa}; onnxruntime header "
              f"{'cached' if header_dir(fetch=False) else 'fetched on first build'}"
              if ok else tc)
    return {"where": where, "what": "kernel toolchain", "ok": ok, "detail": detail,
            "enables": "edgesmith's own fused kernels (the edgesmith_kernels tuning variants)",
            "fix": "" if ok else detail.rsplit(": ", 1)[-1]}


def check_device(device) -> list[dict]:
    """Reach the device, then read its facts: Python, numpy, backends, providers."""
    from .errors import StageError

    try:
        facts = device.facts()
    except StageError as exc:
        return [{"where": "device", "what": "reachable", "ok": False, "detail": str(exc),
                 "enables": "everything on the device", "fix": "see the error above"}]
    packages = facts.get("packages", {})
    rows = [{"where": "device", "what": "reachable", "ok": True,
             "detail": f"{facts.get('arch')}, {facts.get('cpu')}, Python {facts.get('python')}",
             "enables": "", "fix": ""}]
    for dist, enables in (("numpy", "the device runtime"), ("onnxruntime", "ONNX models"),
                          ("ai-edge-litert", "TFLite models (numpy 2)"),
                          ("tflite-runtime", "TFLite models (numpy 1 devices)")):
        rows.append({"where": "device", "what": dist, "ok": dist in packages,
                     "detail": packages.get(dist, "missing"), "enables": enables,
                     "fix": f"edgesmith device setup {device.name}"
                            + (" --tflite" if "tflite" in dist or "litert" in dist else "")})
    rows.append({"where": "device", "what": "onnxruntime providers", "ok": True,
                 "detail": ", ".join(facts.get("ort_providers") or []) or "none",
                 "enables": "", "fix": ""})
    rows.append(kernel_toolchain_row("device", facts))
    return rows
