"""Build edgesmith's kernel library (kernels/*.c) for a device's ISA, cached.

The library is C against onnxruntime's C API header only. The header comes from Debian's
libonnxruntime-dev package, fetched once by URL and checked against a pinned sha256 (never
vendored); $EDGESMITH_ORT_INCLUDE names a directory holding onnxruntime_c_api.h instead, for
machines without network. x86 devices get a host build with the device's own instruction set
(AVX-512, AVX-VNNI, AVX2 or SSE: the vector width follows it); aarch64 devices get a NEON build
from a cross compiler, or from the host compiler when the host is aarch64 too. Without a compiler or
header, `toolchain()` says why in one line, and the kernel variants are pruned with that reason.
"""
from __future__ import annotations

import functools
import hashlib
import io
import lzma
import os
import platform
import re
import shutil
import statistics
import subprocess
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .bundle import cache_dir
from .errors import EdgesmithError
from .host_runs import host_session

SOURCE = Path(__file__).resolve().parent.parent / "kernels" / "edgesmith_ops.c"
HEADER_DEB = ("http://deb.debian.org/debian/pool/main/o/onnxruntime/"
              "libonnxruntime-dev_1.21.0%2Bdfsg-1_amd64.deb",
              "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08")
HEADER = "onnxruntime_c_api.h"
LIBRARY = "libedgesmith_ops.so"
CROSS = {"aarch64": "aarch64-linux-gnu-gcc"}


def source() -> Path:
    """The main C source: next to the package in a checkout, inside it in an installed wheel;
    the library's other sources and its header are beside it (`sources`)."""
    try:
        import edgesmith_kernels
        installed = Path(edgesmith_kernels.__file__).parent / "edgesmith_ops.c"
        if installed.is_file():
            return installed
    except ImportError:
        pass
    return SOURCE


def sources() -> list[Path]:
    """Every file the library is built from: its C sources, then the header they share."""
    folder = source().parent
    return sorted(folder.glob("*.c")) + sorted(folder.glob("*.h"))


def sources_digest() -> "hashlib._Hash":
    """A sha256 over every source file's name and bytes: what a build or a tuning answer keys on."""
    digest = hashlib.sha256()
    for path in sources():
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest


@dataclass(frozen=True)
class Toolchain:
    compiler: str
    flags: tuple[str, ...]
    isa: str            # what the vector code is built for: avx512 | avx-vnni | avx2 | sse | neon


def isa_flags(facts: dict) -> tuple[str, tuple[str, ...]] | None:
    """The device's vector ISA and the -march that targets it, from its CPU flags."""
    arch, flags = facts.get("arch"), set(facts.get("cpu_flags") or [])
    if arch in ("x86_64", "AMD64"):     # only what the device's flags list, nothing -march implies
        base = "-march=x86-64"           # the baseline pinned: not the compiler's default
        if {"avx512f", "avx2", "fma"} <= flags:
            vnni = ("-mavx512bw", "-mavx512vl", "-mavx512vnni") \
                if {"avx512bw", "avx512vl", "avx512_vnni"} <= flags else ()
            return "avx512", (base, "-mavx512f", "-mavx2", "-mfma", *vnni)
        if {"avx2", "fma", "avx_vnni"} <= flags:      # VEX-encoded 256-bit vpdpbusd
            return "avx-vnni", (base, "-mavx2", "-mfma", "-mavxvnni")
        if {"avx2", "fma"} <= flags:
            return "avx2", (base, "-mavx2", "-mfma")
        return "sse", (base,)
    if arch in ("aarch64", "arm64"):       # the dot-product extension: the int8 kernel's sdot
        return "neon", ("-march=armv8.2-a+dotprod" if "asimddp" in flags else "-march=armv8-a",)
    return None


def toolchain(facts: dict) -> Toolchain | str:
    """A compiler for the device, or why there is none (one line, naming the fix)."""
    found = isa_flags(facts)
    if found is None:
        return f"no edgesmith kernels for {facts.get('arch')} CPUs (x86_64 and aarch64 only)"
    isa, flags = found
    host = platform.machine()
    same = host == facts.get("arch") or {host, facts.get("arch")} <= {"x86_64", "AMD64"}
    compiler = os.environ.get("CC", "cc") if same else CROSS.get(facts["arch"], "")
    if not shutil.which(compiler):
        fix = "install gcc" if same else f"apt-get install gcc-{facts['arch']}-linux-gnu"
        return f"no C compiler for {facts['arch']} ({compiler or 'cc'} not found): {fix}"
    if isa == "avx-vnni" and not _accepts(compiler, "-mavxvnni"):    # before GCC 11, clang 12
        isa, flags = isa_flags({**facts, "cpu_flags": [f for f in facts.get("cpu_flags") or []
                                                       if f != "avx_vnni"]})
    return Toolchain(compiler, flags, isa)


@functools.lru_cache(maxsize=None)
def _accepts(compiler: str, flag: str) -> bool:
    """Whether `compiler` knows `flag` (asked once per process)."""
    try:
        return subprocess.run([compiler, flag, "-x", "c", "-E", "-"], input="",
                              capture_output=True, text=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def header_dir(fetch: bool = True) -> Path | None:
    """A directory holding onnxruntime_c_api.h: $EDGESMITH_ORT_INCLUDE, else the cached copy
    of Debian's (downloaded and sha256-checked on first use)."""
    if os.environ.get("EDGESMITH_ORT_INCLUDE"):
        given = Path(os.environ["EDGESMITH_ORT_INCLUDE"])
        return given if (given / HEADER).is_file() else None
    url, digest = HEADER_DEB
    target = cache_dir() / "kernels" / f"include-{digest[:12]}"
    if (target / HEADER).is_file() or not fetch:
        return target if (target / HEADER).is_file() else None
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read(16 << 20)
    except OSError as exc:
        raise EdgesmithError(f"cannot download onnxruntime's C API header ({url}): {exc}; "
                             "set EDGESMITH_ORT_INCLUDE to a directory holding "
                             f"{HEADER}") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise EdgesmithError(f"{url} does not match its pinned sha256; refusing it")
    header = _member(_ar_member(data, "data.tar.xz"), f"usr/include/onnxruntime/{HEADER}")
    target.mkdir(parents=True, exist_ok=True)
    _write_atomic(target / HEADER, header)
    return target


def _ar_member(data: bytes, name: str) -> bytes:
    """One member of a Debian package (an `ar` archive: 60-byte headers, 2-byte alignment)."""
    pos = 8
    while pos + 60 <= len(data):
        ident, size = data[pos:pos + 16].decode().strip().rstrip("/"), int(data[pos + 48:pos + 58])
        if size < 0:
            break
        if ident == name:
            return data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
    raise EdgesmithError(f"the onnxruntime header package has no {name}")


def _member(tar_xz: bytes, path: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(tar_xz))) as tar:
        for info in tar:
            if info.isfile() and info.name.lstrip("./") == path:
                return tar.extractfile(info).read()
    raise EdgesmithError(f"the onnxruntime header package has no {path}")


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@functools.lru_cache(maxsize=None)
def _compiler_version(compiler: str) -> list[str]:
    """Part of the build's cache key; asked once per process, not once per build."""
    return subprocess.run([compiler, "--version"], capture_output=True, text=True,
                          timeout=60).stdout.splitlines()[:1]


def build(facts: dict) -> tuple[Path, Toolchain]:
    """The library for this device, built once per source, header, compiler and flags."""
    tc = toolchain(facts)
    if isinstance(tc, str):
        raise EdgesmithError(tc)
    include = header_dir()
    if include is None:
        raise EdgesmithError(f"EDGESMITH_ORT_INCLUDE has no {HEADER}")
    cmd = [tc.compiler, "-O3", *tc.flags, "-ffp-contract=fast", "-std=gnu11", "-fPIC", "-shared",
           "-fvisibility=hidden", "-static-libgcc", "-pthread", "-Wall", "-Werror", f"-I{include}"]
    tmp = ""
    try:
        version = _compiler_version(tc.compiler)
        digest = sources_digest()
        digest.update((include / HEADER).read_bytes() + repr((cmd, version)).encode())
        key = digest.hexdigest()[:16]
        out = cache_dir() / "kernels" / f"{tc.isa}-{key}" / LIBRARY
        if out.is_file():
            return out, tc
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".tmp-", suffix=".so")
        os.close(fd)
        c_files = [str(p) for p in sources() if p.suffix == ".c"]
        done = subprocess.run(cmd + c_files + ["-o", tmp, "-lm"], capture_output=True,
                              text=True, timeout=300)
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["(no output)"])[0]
            raise EdgesmithError(f"building the edgesmith kernels for {tc.isa} failed: {first}")
        os.replace(tmp, out)
        return out, tc
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EdgesmithError(f"building the edgesmith kernels for {tc.isa} failed: {exc}") from None
    finally:
        if tmp:
            Path(tmp).unlink(missing_ok=True)


def host_library() -> Path:
    """The library built for this machine: what host-side numerics checks load."""
    from device_runtime.facts import collect

    return build(collect(with_providers=False))[0]


MAX_RELATIVE_ERROR = 1e-4     # of the largest output magnitude, against onnxruntime's own kernels
MIN_INT8_EQUAL = 0.999        # int8: the share of output elements equal to onnxruntime's, bit for bit


def rewrite_for_device(model, tile_rows: int, min_side: int, facts: dict):
    """`model` with its inverted-residual blocks on edgesmith's kernels for this device (those
    whose output is at least `min_side` pixels a side, where the shapes are known), the library
    to ship beside it and what a per-block breakdown needs: (Model, {file name: bytes},
    {"blocks", "isa", "shapes"}); or why not, in one line. The rewrite is checked on this
    machine (its own build of the same source) against onnxruntime."""
    from .model import from_proto, static_shapes
    from .passes.fuse import fuse
    from .passes.int8_kernels import fuse_int8_inverted_residual
    from .passes.kernels import KernelConfig, fuse_inverted_residual

    if model.format != "onnx":
        return "edgesmith kernels run in onnxruntime: ONNX models only"
    quantized = any(n.op_type in ("QuantizeLinear", "DequantizeLinear")
                    for n in model.proto.graph.node)
    plain = model.proto if quantized else fuse(model.proto)[0]   # a QDQ graph runs as given
    shapes = static_shapes(plain, model.inputs)
    cfg = KernelConfig(tile_rows=tile_rows, min_side=min_side, shapes=shapes)
    rewritten, report = (fuse_int8_inverted_residual if quantized
                         else fuse_inverted_residual)(plain, cfg)
    if not report.changed:
        reasons = [line.removeprefix("not taken: ") for line in report.details]
        pattern = ("QDQ 1x1 Conv or a stem's 3x3 Conv, 3x3 depthwise Conv, 1x1 Conv on uint8 "
                   "activations and int8 weights" if quantized else "1x1 Conv or a stem's 3x3 "
                   "Conv, ReLU/ReLU6, 3x3 depthwise Conv, ReLU/ReLU6, 1x1 Conv")
        return (f"no {'int8 ' if quantized else ''}inverted-residual block ({pattern}) in this "
                "model"
                + (f" with an output at least {min_side} pixels a side" if min_side > 1 else "")
                + (f" ({reasons[0]}{f'; and {len(reasons) - 1} more' if len(reasons) > 1 else ''})"
                   if reasons else ""))
    try:
        library, tc = build(facts)
        if quantized:
            equal, steps = int8_agreement(plain, rewritten, {s.name: s for s in model.inputs},
                                          host_library(), report.metrics["blocks"])
        else:
            error = numerics_error(plain, rewritten, {s.name: s for s in model.inputs},
                                   host_library())
    except EdgesmithError as exc:
        return str(exc)
    except Exception as exc:    # noqa: BLE001 - onnxruntime refusing the rewrite: a reason
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"the rewritten model does not run on this host: {first[:300]}"
    if quantized and (equal < MIN_INT8_EQUAL or steps > 1):
        return (f"the int8 kernel's outputs equal onnxruntime's on {equal:.2%} of elements of "
                f"its worst block, at most {steps:g} steps apart (need >= {MIN_INT8_EQUAL:.1%}, "
                "<= 1): not used")
    if not quantized and error > MAX_RELATIVE_ERROR:
        return (f"the kernels' outputs differ from onnxruntime's by {error:.1e} of their range "
                f"(> {MAX_RELATIVE_ERROR:.0e}): not used")
    return (from_proto(rewritten, model), {LIBRARY: library.read_bytes()},
            {"blocks": report.metrics["blocks"], "isa": tc.isa, "shapes": shapes,
             "int8": quantized})


LANES = {"avx512": 16, "avx-vnni": 8, "avx2": 8, "sse": 4, "neon": 4}


def profile_cost(nodes: dict[str, float], run_ms: float | None) -> float:
    """What onnxruntime's profiler adds to each node's time (ms): the profiled nodes' sum over
    the same model's unprofiled run, per node. About 14 us a node on a Xeon: a block onnxruntime
    runs as three nodes gains 30 us over one fused node, more than many blocks take."""
    if not nodes or not run_ms:
        return 0.0
    return max(0.0, (sum(nodes.values()) - run_ms) / len(nodes))


def breakdown(info: dict, profiles: list[tuple[dict[str, float], dict[str, float]]],
              run_ms: tuple[float | None, float | None] = (None, None)) -> list[dict]:
    """Per fused block: onnxruntime's time for the nodes it replaces against the kernel's, from
    per-node profiles of the same device taken in interleaved rounds (onnxruntime's, ours),
    each node less the profiler's own cost (profile_cost, from each model's unprofiled run_ms),
    the median over the rounds, and the two facts that explain most of the gap: the expanded
    tensor the fusion keeps out of memory, and the vector lanes a channel count's tail leaves
    idle (the kernel vectorises along channels). Rounds that disagree on who won make a tie:
    one profile's verdict on a shared machine flips from run to run."""
    rounds = [_block_times(info, ort_nodes, our_nodes, run_ms)
              for ort_nodes, our_nodes in profiles]
    rows = []
    for per_round in zip(*rounds):
        row = dict(per_round[0])
        theirs = statistics.median(r["onnxruntime_ms"] for r in per_round)
        ours_all = [r["edgesmith_ms"] for r in per_round if r["edgesmith_ms"] is not None]
        ours = statistics.median(ours_all) if ours_all else None
        row.update(onnxruntime_ms=theirs, edgesmith_ms=ours)
        ratios = [r["onnxruntime_ms"] / r["edgesmith_ms"] for r in per_round
                  if r["edgesmith_ms"] and r["onnxruntime_ms"] > 0]
        spread = (min(ratios), max(ratios)) if len(profiles) > 1 and ratios else None
        row["speed_range"] = list(spread) if spread else None
        if ours is not None:
            speed = statistics.median(ratios) if ratios else None   # within its own range
            row["verdict"] = _verdict(row, speed, spread, len(profiles))
        rows.append(row)
    return rows


def _block_times(info: dict, ort_nodes: dict[str, float], our_nodes: dict[str, float],
                 run_ms: tuple[float | None, float | None]) -> list[dict]:
    """One round of breakdown: each block's row with both sides' times (ours None when the
    profile lacks the fused node)."""
    from .passes.kernels import block_sides

    rows, lanes, shapes = [], LANES.get(info["isa"], 4), info["shapes"]
    cost = (profile_cost(ort_nodes, run_ms[0]), profile_cost(our_nodes, run_ms[1]))
    for block in info["blocks"]:
        names = set(block["replaces"])
        theirs = sum(max(0.0, ms - cost[0]) for node, ms in ort_nodes.items()
                     if _graph_node(node) in names)
        ours = our_nodes.get(block["node"])
        ours = max(0.0, ours - cost[1]) if ours is not None else None
        h, w = (shapes.get(block["input"]) or [0, 0, 0, 0])[2:4]
        (h, oh), (w, ow) = (block_sides(block, h), block_sides(block, w)) if h else ((0, 0),) * 2
        e = block["channels"][1]
        rows.append({"block": block["node"], "channels": "->".join(map(str, block["channels"])),
                     "stride": block["stride"] * block.get("expand_stride", 1),  # in to out
                     "output_hw": f"{oh}x{ow}", "onnxruntime_ms": theirs, "edgesmith_ms": ours,
                     "expanded_kb": round(e * h * w * (1 if info.get("int8") else 4) / 1024),
                     "idle_lanes": round(1 - e / (-(-e // lanes) * lanes), 3)})
    return rows


def _graph_node(profiled: str) -> str:
    """The model's node behind a profiled one: onnxruntime renames what its layout pass
    rewrites (`_nchwc`) and the QDQ nodes it fuses into QLinearConv (`_token_N`)."""
    return re.sub(r"_token_\d+$", "", profiled.removesuffix("_nchwc"))


def _verdict(row: dict, ratio: float | None, spread: tuple[float, float] | None,
             rounds: int) -> str:
    """Won, lost or tie from the median of the rounds' speed ratios (onnxruntime's time over
    ours), so the figure lies within the range printed beside it."""
    if not ratio:
        return "too small to compare beside the profiler's own cost per node"
    kept = f"{row['expanded_kb']} KB of expansion kept out of memory"
    speed = f"{ratio:.2f}x the speed"
    if spread:
        speed += f"; {spread[0]:.2f}-{spread[1]:.2f}x over {rounds} rounds"
    if spread and spread[0] < 1 < spread[1]:
        text = f"tie ({speed}): {kept}"
    elif ratio > 1:
        text = f"won ({speed}): {kept}"
    else:
        text = f"lost ({speed}), although {kept}"
    idle, e = row["idle_lanes"], row["channels"].split("->")[1]
    return text + (f"; {idle:.0%} of lanes idle on {e} channels" if idle else "")


def numerics_error(reference, rewritten, inputs: dict, library: Path) -> float:
    """Largest |difference| over largest |reference| across outputs, on one seeded random feed."""
    import numpy as np
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    feed = {name: rng.standard_normal(spec.shape).astype(spec.dtype)
            for name, spec in inputs.items()}
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(str(library))
    got = host_session(rewritten.SerializeToString(), opts).run(None, feed)
    want = host_session(reference.SerializeToString()).run(None, feed)
    return max(float(np.abs(g - w).max() / max(np.abs(w).max(), 1e-30))
               for g, w in zip(got, want))


def int8_agreement(reference, rewritten, inputs: dict, library: Path, blocks=(),
                   feed: dict | None = None) -> tuple[float, float]:
    """A QDQ model against its rewrite on the int8 kernels, on `feed` (else one seeded random
    feed): the smallest share of elements exactly equal, and the largest difference in
    quantization steps, over each rewritten block's uint8 output (`blocks`: the pass's
    metrics, each block's NCHW tensor and the kernel's NHWC one) and the model's outputs
    (steps of an output's DequantizeLinear scale; any difference is a step when an output is
    not dequantized from a grid)."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from .onnx_utils import Graph

    rng = np.random.default_rng(0)
    feed = feed or {name: rng.standard_normal(spec.shape).astype(spec.dtype)
                    for name, spec in inputs.items()}
    reference, rewritten = (onnx.ModelProto.FromString(m.SerializeToString())
                            for m in (reference, rewritten))
    outputs = [o.name for o in reference.graph.output]
    for model, key in ((reference, "output"), (rewritten, "output_nhwc")):
        model.graph.output.extend(onnx.helper.make_tensor_value_info(
            b[key], onnx.TensorProto.UINT8, None) for b in blocks)
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(str(library))
    got = host_session(rewritten.SerializeToString(), opts).run(None, feed)
    want = host_session(reference.SerializeToString()).run(None, feed)
    graph = Graph(reference.graph)
    equal, steps = 1.0, 0.0
    for i, (g, w) in enumerate(zip(got, want)):
        if i < len(outputs):
            producer = graph.producer.get(outputs[i])
            scale = graph.array(producer.input[1]) if producer is not None \
                and producer.op_type == "DequantizeLinear" else None
            step = float(np.min(scale)) if scale is not None and scale.size else 0.0
        else:
            g, step = g.transpose(0, 3, 1, 2), 1.0         # the kernel's NHWC, uint8 steps
        diff = np.abs(g.astype(np.float64) - w.astype(np.float64))
        if diff.size:
            equal = min(equal, float((diff == 0).mean()))
            if diff.max() > 0:
                steps = max(steps, float(diff.max() / step) if step else float("inf"))
    return equal, steps
