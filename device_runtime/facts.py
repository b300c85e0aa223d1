"""Device fingerprint: what the host needs to pick a target profile and prune variants."""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# CPU feature flags that decide which kernels can run (x86 "flags", ARM "Features")
INTERESTING_FLAGS = {"neon", "asimd", "asimddp", "asimdhp", "fphp", "i8mm", "bf16", "sve",
                     "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw",
                     "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8"}


def _cpuinfo() -> tuple[str, list[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor() or "unknown", []
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features"):
            flags.update(value.split())
    if not model:  # ARM boards often only name the core by part number
        part = re.search(r"CPU part\s*:\s*(0x[0-9a-f]+)", text)
        model = {"0xd08": "Cortex-A72", "0xd0b": "Cortex-A76", "0xd03": "Cortex-A53",
                 "0xd05": "Cortex-A55", "0xd42": "Cortex-A78AE", "0xd07": "Cortex-A57"}.get(
            part.group(1) if part else "", "unknown")
    return model, sorted(flags & INTERESTING_FLAGS)


# AT_HWCAP bits (arch/arm64/include/uapi/asm/hwcap.h); auxv is right even under qemu-user,
# where /proc/cpuinfo shows the host's CPU
ARM64_HWCAP = {1: "asimd", 9: "fphp", 10: "asimdhp", 20: "asimddp", 22: "sve"}
ARM64_HWCAP2 = {14: "i8mm", 15: "bf16"}


def _arm64_hwcaps() -> list[str]:
    import struct

    try:
        raw = Path("/proc/self/auxv").read_bytes()
    except OSError:
        return []
    words = struct.unpack(f"{len(raw) // 8}Q", raw[:len(raw) // 8 * 8])
    aux = dict(zip(words[::2], words[1::2]))
    found = {name for bit, name in ARM64_HWCAP.items() if aux.get(16, 0) >> bit & 1}
    found |= {name for bit, name in ARM64_HWCAP2.items() if aux.get(26, 0) >> bit & 1}
    if "asimd" in found:
        found.add("neon")
    return sorted(found)


def _memory_mb() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def _gpu() -> dict | None:
    tegra = Path("/etc/nv_tegra_release")
    if tegra.is_file():
        return {"kind": "jetson", "tegra_release": tegra.read_text(errors="replace").splitlines()[0]}
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return None
        if out:
            name, mem, driver = (x.strip() for x in out.splitlines()[0].split(","))
            return {"kind": "nvidia", "name": name, "memory": mem, "driver": driver}
    return None


def _emulated(cpuinfo_flags: list[str]) -> bool:
    """qemu-user runs foreign binaries (latency measured there is not the device's): an ARM
    process that sees x86 CPU flags in /proc/cpuinfo is one."""
    x86_flags = {"sse4_2", "avx", "avx2"} & set(cpuinfo_flags)
    return platform.machine() in ("aarch64", "armv7l") and bool(x86_flags)


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def backend_versions() -> dict:
    """Versions of what could run a bundle here, without importing the heavy packages."""
    found = {name: _dist_version(name) for name in
             ("numpy", "onnxruntime", "onnxruntime-gpu", "ai-edge-litert", "tflite-runtime")}
    return {k: v for k, v in found.items() if v}


def _newest_opset(ort) -> int | None:
    """The newest ai.onnx opset this onnxruntime has kernels for: the newest it can load.

    No public API says this; the kernel registry does (a semi-private call, so guarded).
    """
    try:
        kernels = ort.capi._pybind_state.get_all_opkernel_def()
        return max(k.version_range[0] for k in kernels if k.domain in ("", "ai.onnx"))
    except Exception:
        return None


def collect(with_providers: bool = True) -> dict:
    model, flags = _cpuinfo()
    emulated = _emulated(flags)
    if platform.machine() == "aarch64" and (emulated or not flags):
        flags = _arm64_hwcaps()
        model = "emulated aarch64 (qemu)" if emulated else model
    facts = {
        "arch": platform.machine(), "cpu": model, "cpu_flags": flags, "cores": os.cpu_count(),
        "memory_mb": _memory_mb(), "gpu": _gpu(), "os": f"{platform.system()} {platform.release()}",
        "hostname": platform.node(), "python": platform.python_version(),
        "packages": backend_versions(), "emulated": emulated,
    }
    if with_providers and ("onnxruntime" in facts["packages"]
                           or "onnxruntime-gpu" in facts["packages"]):
        try:
            import onnxruntime
            facts["ort_providers"] = onnxruntime.get_available_providers()
            facts["ort_opset"] = _newest_opset(onnxruntime)
        except Exception as exc:  # a broken install is a fact worth reporting, not a crash
            facts["ort_providers"] = []
            facts["ort_import_error"] = str(exc).splitlines()[0] if str(exc) else repr(exc)
    facts["runtime"] = sys.modules[__package__].__version__
    return facts
