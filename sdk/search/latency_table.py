"""A per-kernel latency table filled on the device, for searches that try many widths.

Measuring every proposed model would cost a device round trip per proposal; NetAdapt's answer
is a lookup table of each layer's latency at each shape. A kernel is one Conv or Gemm with the
activation onnxruntime fuses into it, keyed by everything that decides its time (channels,
input size, kernel, stride, pads, groups, activation, batch) under one measurement context
(backend, runtime config, threads, the device's fingerprint). Missing entries are measured
lazily: many kernels as parallel branches of one model, one bundle per round trip, timed per
node by onnxruntime's profiler on the device (median over runs). A shared device's speed drifts
between round trips (measured: 30 % on a 2-core VM, enough that a narrower layer looked slower
than the full one and a search stopped at once), so every trip also re-times a few anchor
kernels the table already holds and scales its new entries by how the anchors moved: the whole
table stays on the scale of its first trip. Layout reorders and the ops
between kernels are not in the table: a model's prediction is the table's sum times a scale
taken from the last whole-model measurement (fusion breaks additivity; nn-Meter's lesson).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..devices import Job, fingerprint
from ..errors import EdgesmithError
from ..measure import measure
from ..model import InputSpec, Model, onnx_facts
from ..onnx_utils import Graph, attr, clip_bounds, static_shapes, with_input_dims
from .cache import TuningCache
from .. import bundle as bundles

FUSED_ACTS = ("Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh")
BRANCHES_PER_BUNDLE = 48
ANCHORS = 6             # known kernels re-timed per round trip to put new entries on one scale


@dataclass(frozen=True)
class Kernel:
    """One table entry's shape; `src`/`dst` (the tensors it reads and writes) are not part of
    the key, they let a width search resize it without rebuilding the model."""
    op: str                     # Conv | Gemm
    batch: int
    cin: int
    cout: int
    hw: tuple = (1, 1)          # input height, width (Gemm: 1, 1)
    out_hw: tuple = (1, 1)
    kernel: tuple = (1, 1)
    strides: tuple = (1, 1)
    pads: tuple = (0, 0, 0, 0)
    dilations: tuple = (1, 1)
    group: int = 1
    act: str = ""               # the fused activation, e.g. Relu or Clip(0,6)
    src: str = field(default="", compare=False)
    dst: str = field(default="", compare=False)

    @property
    def depthwise(self) -> bool:
        return self.op == "Conv" and self.group > 1 and self.group == self.cin

    @property
    def key(self) -> str:
        if self.op == "Gemm":
            return f"Gemm b{self.batch} {self.cin}->{self.cout} {self.act}".strip()
        dims = lambda t: "x".join(map(str, t))   # noqa: E731
        return (f"Conv b{self.batch} {self.cin}x{dims(self.hw)}->{self.cout} "
                f"k{dims(self.kernel)} s{dims(self.strides)} p{dims(self.pads)} "
                f"d{dims(self.dilations)} g{self.group} {self.act}").strip()

    @property
    def macs(self) -> int:
        per_out = self.cin // max(1, self.group) * int(np.prod(self.kernel))
        return self.batch * self.cout * int(np.prod(self.out_hw)) * per_out

    def narrowed(self, removed: dict[str, int]) -> "Kernel":
        """This kernel after `removed[tensor]` channels leave the tensors it reads or writes."""
        cin = self.cin - removed.get(self.src, 0)
        cout = self.cout - removed.get(self.dst, 0)
        return replace(self, cin=cin, cout=cout, group=cin if self.depthwise else self.group)


def kernels_of(proto: onnx.ModelProto, input_shapes: dict) -> list[Kernel]:
    """The model's Conv/Gemm kernels at its concrete input shapes (a fused model: BatchNorm
    already folded). Ops whose shapes are unknown are left out (they count through the scale)."""
    fixed = with_input_dims(proto, input_shapes)
    shapes, graph = static_shapes(fixed), Graph(fixed.graph)
    out = []
    for node in fixed.graph.node:
        w = graph.array(node.input[1]) if len(node.input) > 1 else None
        x, y = shapes.get(node.input[0]), shapes.get(node.output[0])
        if w is None or not x or not y:
            continue
        act = _fused_act(graph, node)
        if node.op_type == "Conv" and len(x) == 4:
            pads = tuple(attr(node, "pads", [0, 0, 0, 0]))
            if attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                continue
            out.append(Kernel("Conv", x[0], x[1], y[1], tuple(x[2:]), tuple(y[2:]),
                              tuple(w.shape[2:]), tuple(attr(node, "strides", [1, 1])), pads,
                              tuple(attr(node, "dilations", [1, 1])), attr(node, "group", 1), act,
                              node.input[0], node.output[0]))
        elif node.op_type in ("Gemm", "MatMul") and len(x) == 2 and w.ndim == 2 and \
                not attr(node, "transA", 0):
            cout = w.shape[0] if attr(node, "transB", 0) else w.shape[1]
            out.append(Kernel("Gemm", x[0], x[1], cout, act=act, src=node.input[0],
                              dst=node.output[0]))
    return out


def _fused_act(graph: Graph, node) -> str:
    nxt = graph.only_consumer(node.output[0])
    if nxt is None or nxt.op_type not in FUSED_ACTS:
        return ""
    if nxt.op_type == "Clip":
        bounds = clip_bounds(graph, nxt)
        return "" if bounds is None else f"Clip({bounds[0]:g},{bounds[1]:g})"
    return nxt.op_type


def kernel_model(kernels: list[Kernel], opset: int = 17) -> onnx.ModelProto:
    """The kernels as independent branches of one model: input `lut{i}_x` -> kernel -> act ->
    `lut{i}_y`; every node and tensor of branch i is named `lut{i}_...` so the profile's nodes
    map back to their kernel (onnxruntime names its rewritten nodes after their outputs)."""
    rng = np.random.default_rng(0)
    nodes, inits, ins, outs = [], [], [], []
    for i, k in enumerate(kernels):
        p = f"lut{i}_"
        if k.op == "Conv":
            shape = [k.batch, k.cin, *k.hw]
            w = rng.standard_normal((k.cout, k.cin // k.group, *k.kernel)).astype(np.float32)
            nodes.append(helper.make_node("Conv", [p + "x", p + "w", p + "b"], [p + "c"], p + "op",
                                          kernel_shape=list(k.kernel), strides=list(k.strides),
                                          pads=list(k.pads), dilations=list(k.dilations),
                                          group=k.group))
        else:
            shape = [k.batch, k.cin]
            w = rng.standard_normal((k.cout, k.cin)).astype(np.float32)
            nodes.append(helper.make_node("Gemm", [p + "x", p + "w", p + "b"], [p + "c"], p + "op",
                                          transB=1))
        inits += [numpy_helper.from_array(w * 0.1, p + "w"),
                  numpy_helper.from_array(np.zeros(k.cout, np.float32), p + "b")]
        ins.append(helper.make_tensor_value_info(p + "x", TensorProto.FLOAT, shape))
        outs.append(helper.make_tensor_value_info(p + "y", TensorProto.FLOAT, None))
        nodes += _act_nodes(k.act, p, inits)
    graph = helper.make_graph(nodes, "latency_table", ins, outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _act_nodes(act: str, p: str, inits: list) -> list:
    if not act:
        return [helper.make_node("Identity", [p + "c"], [p + "y"], p + "out")]
    if act.startswith("Clip("):
        lo, hi = (float(v) for v in act[5:-1].split(","))
        inits += [numpy_helper.from_array(np.array(lo, np.float32), p + "lo"),
                  numpy_helper.from_array(np.array(hi, np.float32), p + "hi")]
        return [helper.make_node("Clip", [p + "c", p + "lo", p + "hi"], [p + "y"], p + "act")]
    return [helper.make_node(act, [p + "c"], [p + "y"], p + "act")]


BRANCH = re.compile(r"\blut(\d+)_")   # also "fused lut3_op"


class LatencyTable:
    """Kernel key -> device milliseconds, under one measurement context, cached by device
    fingerprint in the tuning cache (a table filled once serves every later search)."""

    def __init__(self, device, job: Job, cache: TuningCache | None = None):
        self.device, self.cache = device, cache or TuningCache()
        self.job = replace(job, profile_ops=True, evaluate=False, runs=max(job.runs, 50),
                           warmup=max(job.warmup, 10), min_time_s=0.0)   # a bounded profile
        self.fingerprint = fingerprint(device.facts())
        settings = {k: v for k, v in vars(self.job).items()     # what changes no timing: out
                    if k not in ("timeout_s", "lock_timeout_s", "wait_idle_s")}
        # "lut3": entries anchored to one scale across round trips (older ones were not)
        self.context = "lut3:" + hashlib.sha256(json.dumps(settings, sort_keys=True, default=str)
                                               .encode()).hexdigest()[:16]
        self.measured = 0           # kernels measured on the device by this table (not cached)
        self.round_trips = 0
        self.anchors: list[Kernel] = []     # the first kernels asked for: every trip's yardstick
        self.drift: list[float] = []        # each anchored trip's scale (held / measured now)

    def get(self, kernel: Kernel) -> float | None:
        hit = self.cache.get(self.context, self.fingerprint, kernel.key)
        return None if hit is None else hit["ms"]

    def fill(self, kernels: list[Kernel]) -> None:
        """Measure every kernel the table lacks, with the anchors, in bundles of
        BRANCHES_PER_BUNDLE branches (one device round trip each)."""
        if not self.anchors:
            self.anchors = list({k.key: k for k in kernels}.values())
        todo = list({k.key: k for k in kernels if self.get(k) is None}.values())
        while todo:
            anchors = sorted((k for k in self.anchors if self.get(k) is not None),
                             key=self.get, reverse=True)[:ANCHORS]
            take = BRANCHES_PER_BUNDLE - len(anchors)
            chunk, todo = todo[:take], todo[take:]
            times = self._measure(chunk + anchors)
            scale = 1.0
            if anchors:
                now = sum(times[len(chunk):])
                scale = sum(self.get(k) for k in anchors) / now if now > 0 else 1.0
                self.drift.append(scale)
            for k, ms in zip(chunk, times):
                self.cache.put(self.context, self.fingerprint, k.key, {"ms": ms * scale})
                self.measured += 1

    def _measure(self, kernels: list[Kernel]) -> list[float]:
        """Each kernel's device milliseconds, as branches of one bundle (one round trip)."""
        proto = kernel_model(kernels)
        inputs = [InputSpec(i.name, [d.dim_value for d in i.type.tensor_type.shape.dim],
                            [d.dim_value for d in i.type.tensor_type.shape.dim], "float32")
                  for i in proto.graph.input]
        data = proto.SerializeToString()
        model = Model(None, "onnx", inputs, [o.name for o in proto.graph.output],
                      onnx_facts(proto, inputs, len(data)), proto=proto)
        result = measure(self.device, bundles.build(model, meta={"latency_table": True}),
                         self.job)
        self.round_trips += 1
        if not result.ok:
            raise EdgesmithError(f"measuring the latency table on {self.device.name} "
                                 f"failed at {result.stage}: {result.error}")
        per_branch: dict[int, float] = {}
        for node, ms in (result.node_profile_ms or {}).items():
            if found := BRANCH.search(node):
                per_branch[int(found[1])] = per_branch.get(int(found[1]), 0.0) + ms
        for i, k in enumerate(kernels):
            if i not in per_branch:
                raise EdgesmithError(f"the device's profile has no time for kernel {k.key} "
                                     "(its onnxruntime names profiled nodes differently); "
                                     "please report this with `edgesmith doctor` output")
        return [per_branch[i] for i in range(len(kernels))]

    def predict(self, kernels: list[Kernel]) -> float:
        """The table's sum over `kernels` (filled first where it lacks them)."""
        self.fill(kernels)
        return float(sum(self.get(k) for k in kernels))
