"""Pick the quantization recipe per device, by measuring candidates on that device.

Candidates are the recipes the device's kernels can make fast (pruned with a reason otherwise);
each is bundled with the eval set and the original model's reference outputs, then run through
the device runtime, so accuracy is judged on the fused int8 kernels the device really runs. If the
fastest recipe misses the accuracy budget it is repaired, cheapest first: other calibration, then
cross-layer equalization + bias correction, then mixed precision (the most sensitive layers kept
in float, found by comparing activations layer by layer against fp32).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from device_runtime.evaluate import EvalData
from device_runtime.result import Result

from . import bundle as bundles
from .data import calibration_batches, eval_batch, load_eval_set, reference_outputs
from .devices import Job
from .errors import EdgesmithError, StageError
from .model import Model, from_proto
from .passes.quantize import QuantRecipe, preprocess, quantize_dynamic, quantize_static, to_fp16

MAX_FLOAT_LAYERS = 16        # mixed precision stops here: more float layers than this is no int8


@dataclass
class Candidate:
    recipe: str
    p50_ms: float | None = None
    accuracy: dict | None = None
    accuracy_drop: float | None = None
    size_bytes: int = 0
    error: str | None = None
    note: str = ""
    settings: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and self.p50_ms is not None


@dataclass
class QuantizeReport:
    device: str
    max_accuracy_drop: float
    baseline: Candidate
    candidates: list[Candidate]
    chosen: Candidate
    pruned: list[dict]
    sensitivity: list[dict] = field(default_factory=list)   # worst layers first
    kept_float: list[str] = field(default_factory=list)
    quantized: bool = True               # False: fp32 kept (no recipe was faster within budget)
    summary: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def x86_vnni(flags: set) -> bool:
    return bool(flags & {"avx512_vnni", "avx_vnni"})


def candidate_recipes(facts: dict, model: Model) -> tuple[list[QuantRecipe], list[dict]]:
    """Recipes worth measuring on this device, and the ones pruned with the reason."""
    flags, arch = set(facts.get("cpu_flags", [])), facts.get("arch")
    recipes, pruned = [], []

    def keep(recipe: QuantRecipe, why_not: str | None = None):
        if why_not:
            pruned.append({"recipe": recipe.name, "reason": why_not})
        else:
            recipes.append(recipe)

    x86 = arch == "x86_64"
    keep(QuantRecipe("qdq-u8s8-rr", reduce_range=True),
         None if x86 and not x86_vnni(flags) else
         "reduce_range only helps x86 without VNNI (it costs a bit of weight precision)")
    keep(QuantRecipe("qoperator-u8s8-rr", format="QOperator", reduce_range=True),
         None if x86 and not x86_vnni(flags) else
         "reduce_range only helps x86 without VNNI")
    keep(QuantRecipe("qdq-u8s8"),
         "8-bit weights saturate the int16 accumulation of AVX2 u8s8 kernels without VNNI "
         "(accuracy loss); reduce_range is used instead" if x86 and not x86_vnni(flags) else None)
    keep(QuantRecipe("qdq-s8s8", activations="S8"),
         "onnxruntime has no fast s8s8 conv kernels on AVX2 without VNNI"
         if x86 and not x86_vnni(flags) else None)
    macs = model.facts.macs_by_op
    dense = macs.get("MatMul", 0) + macs.get("Gemm", 0)
    keep(QuantRecipe("dynamic-int8", dynamic=True),
         None if model.facts.macs and dense >= 0.5 * model.facts.macs else
         f"dynamic quantization only covers MatMul/Gemm ({100 * dense / max(1, model.facts.macs):.0f}% "
         "of this model's MACs); convs would need ConvInteger, which onnxruntime runs slower "
         "than float convs")
    gpu = facts.get("gpu")
    keep(QuantRecipe("fp16", fp16=True),
         None if gpu else "fp16 pays off on GPUs (Jetson); this device has none")
    return recipes, pruned


class RecipeSearch:
    """State shared by the candidates: the prepared float model, calibration cache, eval set."""

    def __init__(self, model: Model, device, calib: str | os.PathLike,
                 eval_path: str | os.PathLike | None, job: Job, workdir: Path,
                 calib_limit: int = 512):
        self.model, self.device, self.job, self.workdir = model, device, job, workdir
        self.calib = calib
        self.calib_limit = calib_limit
        self.prepared = preprocess(model.proto, model.input_shapes)
        self.batch = eval_batch(model)
        if eval_path is not None:
            self.eval = load_eval_set(eval_path, model)
        else:   # no eval set: fidelity to the original model on calibration samples, never none
            self.eval = _fidelity_set(calibration_batches(calib, model, 16, 256))
        self.eval.refs = reference_outputs(model, self.eval, self.batch)
        self._batches: list[dict] | None = None

    def batches(self) -> list[dict]:
        """Calibration batches, read once: CLE, bias correction and sensitivity all reuse them."""
        if self._batches is None:
            self._batches = list(calibration_batches(self.calib, self.model, 16,
                                                     self.calib_limit))
        return self._batches

    def build(self, recipe: QuantRecipe) -> tuple[onnx.ModelProto, list]:
        """The quantized (or fp16) model for `recipe`, from the prepared float model."""
        if recipe.fp16:
            proto, report = to_fp16(self.prepared)
            return proto, [report]
        if recipe.dynamic:
            proto, report = quantize_dynamic(self.prepared, recipe)
            return proto, [report]
        from .passes.equalize import bias_correct, equalize

        float_model, reports = self.prepared, []
        if recipe.equalize:
            float_model, rep = equalize(float_model, self.batches())
            reports.append(rep)
        key = f"{recipe.calibration}-{recipe.percentile}-{recipe.symmetric_activations}-" \
              f"{'cle' if recipe.equalize else 'plain'}"
        cache = self.workdir / f"calib-{key}.json"
        batches = None if cache.is_file() else self.batches()
        if recipe.bias_correction:
            float_model, rep = bias_correct(float_model, recipe, batches or self.batches())
            reports.append(rep)
        proto, rep = quantize_static(float_model, recipe, cache, batches)
        return proto, reports + [rep]

    def measure(self, label: str, proto: onnx.ModelProto, settings: dict | None = None
                ) -> Candidate:
        model = from_proto(proto, self.model)
        bundle = bundles.build(model, eval_data=self.eval, eval_batch=self.batch,
                               meta={"recipe": label})
        try:
            result = self.device.run(self.device.push(bundle), self.job)
        except StageError as exc:
            result = Result.failure(exc.stage, exc.message)
        lat = result.latency_ms or {}
        return Candidate(label, lat.get("p50"), result.accuracy, None, model.facts.size_bytes,
                         None if result.ok else f"{result.stage}: {result.error}",
                         settings=settings or {})


def _fidelity_set(batches) -> EvalData:
    chunks: dict[str, list] = {}
    for feed in batches:
        for name, arr in feed.items():
            chunks.setdefault(name, []).append(arr)
    if not chunks:
        raise EdgesmithError("calibration data is empty")
    inputs = {name: np.concatenate(arrs) for name, arrs in chunks.items()}
    return EvalData(inputs, None, {}, len(next(iter(inputs.values()))))


def accuracy_drop(base: dict | None, cand: dict | None) -> float | None:
    """Top-1 drop vs labels when there are labels, else 1 - top-1 agreement with fp32."""
    if not base or not cand:
        return None
    if "top1" in base and "top1" in cand:
        return base["top1"] - cand["top1"]
    if "agreement" in cand:
        return 1.0 - cand["agreement"]
    return None


def _upstream(graph_nodes: list, producer: dict, tensor: str, quantized: set) -> set[str]:
    """Outputs of the nearest Conv/Gemm/MatMul nodes feeding `tensor` (through any other op)."""
    found, todo, seen = set(), [tensor], set()
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        node = producer.get(t)
        if node is None:
            continue
        if node.name in quantized and t != node.input[0]:
            found.add(t)
        else:
            todo.extend(i for i in node.input if i)
    return found


def layer_sensitivity(float_proto: onnx.ModelProto, quant_proto: onnx.ModelProto,
                      batches: list[dict]) -> list[dict]:
    """How much each Conv/Gemm/MatMul degrades the signal, float vs quantized, compared layer
    by layer like ORT's qdq_loss_debug: the noise-to-signal ratio of its output minus that of
    the nearest quantized layers upstream (worst first). Only compute-node outputs are compared: ORT's QDQ rewrite keeps
    their names, while activations in between are folded into quantization ranges."""
    import onnxruntime as ort

    nodes = [n for n in float_proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")
             and n.name]
    names = {n.name for n in nodes}
    producer = {o: n for n in float_proto.graph.node for o in n.output}
    users: dict[str, list] = {}
    for n in float_proto.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    quant_outputs = {o for n in quant_proto.graph.node for o in n.output}

    def observed(n) -> str:
        """The layer's value as its consumers see it: after a fused ReLU/ReLU6, if any."""
        after = users.get(n.output[0], [])
        if len(after) == 1 and after[0].op_type in ("Relu", "Clip"):
            return after[0].output[0]
        return n.output[0]

    def in_quant(t: str) -> str | None:   # ORT names what consumers read <t>_DequantizeLinear_Output
        for name in (f"{t}_DequantizeLinear_Output", t):
            if name in quant_outputs:
                return name
        return None

    layer_out = {n.name: observed(n) for n in nodes}
    producer.update({layer_out[n.name]: n for n in nodes})
    tensors = sorted(set(layer_out.values()))

    def session(proto, wanted):
        m = onnx.ModelProto()
        m.CopyFrom(proto)
        have = {o.name for o in m.graph.output}
        m.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                              for t in wanted if t not in have)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(m.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])

    common = [t for t in tensors if in_quant(t)]
    qnames = [in_quant(t) for t in common]
    fs, qs = session(float_proto, common), session(quant_proto, qnames)
    signal = dict.fromkeys(common, 0.0)
    noise = dict.fromkeys(common, 0.0)
    for feed in batches[:4]:
        for t, a, b in zip(common, fs.run(common, feed), qs.run(qnames, feed)):
            a, b = a.astype(np.float64), b.astype(np.float64)
            signal[t] += float(np.sum(a * a))
            noise[t] += float(np.sum((a - b) ** 2))

    def sqnr(t: str) -> float:
        if t not in signal:
            return 200.0
        return float(min(200.0, 10 * np.log10(max(signal[t], 1e-30) / max(noise[t], 1e-30))))

    rows = []
    for n in nodes:
        ups = _upstream(nodes, producer, n.input[0], names)
        inp = min((sqnr(t) for t in ups), default=200.0)
        out = sqnr(layer_out[n.name])
        # rank by the noise power the layer adds (linear): a dB drop from an exact input
        # (200 dB -> 45 dB) is huge in dB and negligible in noise
        added = 10 ** (-out / 10) - 10 ** (-inp / 10)
        rows.append({"node": n.name, "op": n.op_type, "input_sqnr_db": inp,
                     "output_sqnr_db": out, "drop_db": inp - out, "added_nsr": added})
    return sorted(rows, key=lambda r: -r["added_nsr"])


def choose_recipe(model: Model, device, calib, eval_path=None, max_accuracy_drop: float = 0.01,
                  job: Job | None = None, on_step=None) -> tuple[Model, QuantizeReport]:
    """Measure the device's candidate recipes; return the fastest model within the budget."""
    facts = device.facts()
    recipes, pruned = candidate_recipes(facts, model)
    job = replace(job or Job(runs=50, warmup=5, min_time_s=0.5), evaluate=True)
    say = on_step or (lambda text: None)
    with tempfile.TemporaryDirectory(prefix="edgesmith-quant-") as tmp:
        search = RecipeSearch(model, device, calib, eval_path, job, Path(tmp))
        say("measuring fp32 baseline")
        baseline = search.measure("fp32", search.prepared)
        if not baseline.ok:
            raise EdgesmithError(f"the float model does not run on {device.name}: "
                                 f"{baseline.error}")
        baseline.accuracy_drop = 0.0
        built: dict[str, onnx.ModelProto] = {}
        candidates: list[Candidate] = []

        def trial(recipe: QuantRecipe, note: str = "") -> Candidate:
            say(f"measuring {recipe.name}")
            try:
                proto, _ = search.build(recipe)
            except EdgesmithError as exc:
                cand = Candidate(recipe.name, error=f"quantize: {exc}", note=note)
            else:
                built[recipe.name] = proto
                cand = search.measure(recipe.name, proto, asdict(recipe))
                cand.note = note
                cand.accuracy_drop = accuracy_drop(baseline.accuracy, cand.accuracy)
            candidates.append(cand)
            return cand

        def within(c: Candidate) -> bool:
            return c.ok and (c.accuracy_drop is None or c.accuracy_drop <= max_accuracy_drop)

        by_name = {r.name: r for r in recipes}
        for recipe in recipes:
            trial(recipe)
        sensitivity: list[dict] = []
        fast = sorted((c for c in candidates if c.ok and c.p50_ms < baseline.p50_ms),
                      key=lambda c: c.p50_ms)
        if fast and not any(within(c) for c in fast) and fast[0].recipe in by_name:
            base_recipe = by_name[fast[0].recipe]
            repairs = [replace(base_recipe, name=f"{base_recipe.name}-percentile",
                               calibration="percentile"),
                       replace(base_recipe, name=f"{base_recipe.name}-cle-bc", equalize=True,
                               bias_correction=True)]
            for repair in repairs:
                if within(trial(repair, "accuracy repair")):
                    break
            else:
                worst = layer_sensitivity(search.prepared, built[base_recipe.name],
                                          search.batches())
                sensitivity = worst
                k = 1
                while k <= min(MAX_FLOAT_LAYERS, len(worst)):
                    names = [r["node"] for r in worst[:k]]
                    cand = trial(replace(base_recipe.with_exclusions(names),
                                         name=f"{base_recipe.name}-float{k}"),
                                 f"{k} layer(s) kept in float")
                    if within(cand):
                        break
                    k *= 2
        ok = [c for c in candidates if within(c) and c.p50_ms < baseline.p50_ms]
        chosen = min(ok, key=lambda c: c.p50_ms) if ok else baseline
        proto = built.get(chosen.recipe, search.prepared)
        if chosen is baseline:
            reason = ("no int8 recipe was faster than fp32 within the accuracy budget "
                      f"({max_accuracy_drop:.3f}) on {device.name}; keeping fp32")
        else:
            drop = "n/a" if chosen.accuracy_drop is None else f"{chosen.accuracy_drop:.4f}"
            reason = (f"{chosen.recipe}: {baseline.p50_ms / chosen.p50_ms:.2f}x faster than "
                      f"fp32, accuracy drop {drop}")
        report = QuantizeReport(device.name, max_accuracy_drop, baseline, candidates, chosen,
                                pruned, sensitivity[:20], list(chosen.settings.get("exclude", ())),
                                chosen is not baseline, reason)
        return from_proto(proto, model), report


RECIPES = {r.name: r for r in [
    QuantRecipe("qdq-u8s8-rr", reduce_range=True),
    QuantRecipe("qoperator-u8s8-rr", format="QOperator", reduce_range=True),
    QuantRecipe("qdq-u8s8"), QuantRecipe("qdq-s8s8", activations="S8"),
    QuantRecipe("ort-default", activations="S8", per_channel=False),
    QuantRecipe("qdq-u8s8-rr-cle-bc", reduce_range=True, equalize=True, bias_correction=True),
    QuantRecipe("qdq-u8s8-cle-bc", equalize=True, bias_correction=True),
    QuantRecipe("qdq-s8s8-cle-bc", activations="S8", equalize=True, bias_correction=True),
    QuantRecipe("dynamic-int8", dynamic=True), QuantRecipe("fp16", fp16=True)]}


def quantize_with(model: Model, name: str, calib) -> tuple[onnx.ModelProto, list]:
    """One named recipe, no search: for scripts that already know what they want."""
    if name not in RECIPES:
        raise EdgesmithError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
    with tempfile.TemporaryDirectory(prefix="edgesmith-quant-") as tmp:
        search = RecipeSearch(model, None, calib, None, Job(), Path(tmp))
        return search.build(RECIPES[name])
