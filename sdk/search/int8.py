"""Pick the quantization recipe per device, by measuring candidates on that device.

Candidates are the recipes the device's kernels can make fast (pruned with a reason otherwise);
each is bundled with the eval set and the original model's reference outputs, then run through
the device runtime, so accuracy is judged on the fused int8 kernels the device really runs. If the
fastest recipe misses the accuracy budget it is repaired, cheapest first: other calibration, then
cross-layer equalization + bias correction, then mixed precision (the most sensitive layers kept
in float, found by comparing activations layer by layer against fp32).
"""
from __future__ import annotations

import functools
import hashlib
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from device_runtime.evaluate import EvalData
from device_runtime.measure import peak_rss_mb

from .. import bundle as bundles
from ..data import (calibration_batches, eval_batch, load_eval_set, reference_outputs,
                    stream_feeds)
from ..devices import Job
from ..errors import EdgesmithError
from ..measure import Candidate, measure
from ..model import Model, from_proto, npz_headers
from ..passes.equalize import BiasCorrectConfig, EqualizeConfig, bias_correct, equalize
from ..passes.quantize import (DYNAMIC_OPS, ORT_CALIBRATION, PreprocessConfig, QuantizeConfig,
                              QuantRecipe, preprocess, quantize_dynamic, quantize_static, to_fp16)
from ..passes.qat import QatConfig, qat
from ..passes.ranges import RangeConfig, refine_ranges
from ..passes.reconstruct import ReconstructConfig, reconstruct
from ..run import Run, accuracy_drop, within
from .why_worse import add_times, block_sensitivity

MAX_FLOAT_BLOCKS = 8         # mixed precision stops here: more float blocks than this is no int8
QAT_BYTES = 512 << 20       # QAT's training inputs in memory (more samples are left out)
QAT_EPOCHS = 6               # ImageNet MobileNetV2, 189 crops: 2.0 dB at 3 epochs, 3.0 dB at 6


@dataclass(kw_only=True)
class QuantizeReport:
    device: str
    max_accuracy_drop: float
    judged_on: str                       # the judging set and its size, printed with the figures
    baseline: Candidate
    candidates: list[Candidate]
    chosen: Candidate
    pruned: list[dict]
    sensitivity: list[dict] = field(default_factory=list)   # blocks, worst first (why worse)
    kept_float: list[str] = field(default_factory=list)
    quantized: bool = True               # False: fp32 kept (no recipe was faster within budget)
    summary: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


BASE_RECIPES = {r.name: r for r in [
    QuantRecipe("qdq-u8s8-rr", reduce_range=True),
    QuantRecipe("qoperator-u8s8-rr", format="QOperator", reduce_range=True),
    QuantRecipe("qdq-u8s8"), QuantRecipe("qdq-s8s8", activations="S8"),
    QuantRecipe("dynamic-int8", dynamic=True), QuantRecipe("fp16", fp16=True),
    QuantRecipe("ort-default", activations="S8", per_channel=False)]}
REPAIRS = {"robustminmax": {"calibration": "robust-minmax"},
           "percentile": {"calibration": "percentile"},
           "cle-bc": {"equalize": True, "bias_correction": True},
           "mse": {"refine_ranges": True},
           "reconstruct": {"reconstruct": 200},
           "qat": {"qat": QAT_EPOCHS}}
# --quant-effort: the repairs tried when the fastest recipe misses the accuracy budget,
# cheapest first; the search stops at the first that meets it. Order and choice measured on
# ImageNet MobileNetV2, held-out photos (benchmarks/reconstruct.py): reconstruction from
# percentile ranges was best, from MSE ranges close, from min/max worse; more steps per block
# overfit (500 did worse than 200 on held-out photos), so `max` tries more starts instead, and
# its mixed precision learns again around the float blocks (+2 dB on MobileNetV2, minutes per
# try). Balanced keeps MobileNetV2 with 256 calibration images within 10 minutes on 2 cores.
REPAIR_CHAINS = {"fast": ("robustminmax", "mse", "percentile", "cle-bc"),
                 "balanced": ("robustminmax", "mse", "percentile", "cle-bc",
                              "percentile-reconstruct"),
                 "max": ("robustminmax", "mse", "percentile", "cle-bc", "percentile-reconstruct",
                         "mse-reconstruct", "cle-bc-reconstruct", "reconstruct")}


def x86_vnni(flags: set) -> bool:
    return bool(flags & {"avx512_vnni", "avx_vnni"})


def why_not(recipe: QuantRecipe, facts: dict, model: Model) -> str | None:
    """Why a recipe cannot be fast (or right) on this device; None when it is worth measuring."""
    flags, x86 = set(facts.get("cpu_flags", [])), facts.get("arch") == "x86_64"
    old_x86 = x86 and not x86_vnni(flags)
    if recipe.name == "ort-default":
        return "per-tensor weights (onnxruntime's defaults): as fast as per-channel, less accurate"
    if recipe.fp16:
        gpu_eps = {"CUDAExecutionProvider", "TensorrtExecutionProvider"}
        if not gpu_eps & set(facts.get("ort_providers") or []):
            return ("fp16 pays off only on a GPU execution provider (CUDA/TensorRT); this "
                    "device's onnxruntime has " + ", ".join(facts.get("ort_providers") or ["none"]))
        return None
    if recipe.dynamic:
        macs = model.facts.macs_by_op
        dense = sum(macs.get(op, 0) for op in DYNAMIC_OPS)
        if model.facts.macs and dense >= 0.5 * model.facts.macs:
            return None
        return (f"dynamic quantization only covers MatMul/Gemm/LSTM ({100 * dense / max(1, model.facts.macs):.0f}% "
                "of this model's MACs); convs would need ConvInteger, which onnxruntime runs "
                "slower than float convs")
    if recipe.reduce_range and not old_x86:
        return "reduce_range only helps x86 without VNNI (it costs a bit of weight precision)"
    if not recipe.reduce_range and old_x86:
        return ("onnxruntime has no fast s8s8 conv kernels on AVX2 without VNNI"
                if recipe.activations == "S8" else
                "8-bit weights saturate the int16 accumulation of AVX2 u8s8 kernels without VNNI "
                "(accuracy loss); reduce_range is used instead")
    return None


def candidate_recipes(facts: dict, model: Model) -> tuple[list[QuantRecipe], list[dict]]:
    """Recipes worth measuring on this device, and the ones pruned with the reason."""
    recipes, pruned = [], []
    for recipe in BASE_RECIPES.values():
        reason = why_not(recipe, facts, model)
        if reason:
            pruned.append({"recipe": recipe.name, "reason": reason})
        else:
            recipes.append(recipe)
    return recipes, pruned


def recipe_by_name(name: str) -> QuantRecipe:
    """A base recipe, optionally with repairs appended in any combination: `qdq-u8s8-mse`,
    `qdq-u8s8-percentile-reconstruct`, `...-cle-bc`, `...-qat` (needs training data;
    `-adaround`, reconstruct's former name, still works)."""
    name = name.replace("-adaround", "-reconstruct")
    for base_name, base in BASE_RECIPES.items():
        if name == base_name or name.startswith(base_name + "-"):
            rest, changes = name[len(base_name):], {}
            for suffix, fields in REPAIRS.items():
                if f"-{suffix}" in rest:
                    rest = rest.replace(f"-{suffix}", "")
                    changes.update(fields)
            if not rest:
                return replace(base, name=name, **changes)
    raise EdgesmithError(f"unknown recipe {name!r}: name a base recipe {sorted(BASE_RECIPES)}, "
                         f"optionally followed by any of {[f'-{r}' for r in REPAIRS]} "
                         "(e.g. qdq-u8s8-percentile-reconstruct)")


@dataclass(kw_only=True)
class QuantData:
    """What a recipe search reads, built once per run: calibration feeds and a judging set that
    shares no sample with them (with the float model's reference outputs)."""

    batches: list[dict]
    eval: EvalData
    batch: int
    judged_on: str                        # "48 samples of photos.npz, held out from calibration"
    notes: list[str] = field(default_factory=list)
    train: Callable[[], list[dict]] | None = None   # QAT's unlabelled feeds (--train), loaded
    #                                                 when QAT runs


def _split(batches: list[dict], holdout: float, labels: np.ndarray | None = None,
           seed: int = 0) -> tuple[dict, dict, np.ndarray | None]:
    """A random `holdout` share of the samples (and their labels, when the data has them)."""
    inputs = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    n = len(next(iter(inputs.values())))
    order = np.random.default_rng(seed).permutation(n)
    cut = n - max(1, int(round(n * holdout)))
    held_labels = labels[:n][order[cut:]] if labels is not None and len(labels) >= n else None
    return ({k: v[order[:cut]] for k, v in inputs.items()},
            {k: v[order[cut:]] for k, v in inputs.items()}, held_labels)


def _batched(inputs: dict, batch: int, fixed: bool) -> list[dict]:
    n = len(next(iter(inputs.values())))
    stop = n - (n % batch if fixed else 0)
    return [{k: v[i:i + batch] for k, v in inputs.items()} for i in range(0, stop, batch)]


def quant_data(model: Model, calib, eval_path=None, holdout: float = 0.25,
               limit: int = 512, train=None) -> QuantData:
    """Calibration feeds and a judging set. With `eval_path` the eval set judges; with only
    `calib`, a random `holdout` share of it is set aside to judge fidelity to the float model
    (calibrating and judging on the same samples flatters every recipe). `train`: unlabelled
    inputs QAT learns from, never the judging samples (the calibration share when it is
    `calib` itself)."""
    data = _quant_data(model, calib, eval_path, holdout, limit)
    if train is None:
        return data
    same = lambda a, b: b is not None and Path(a).resolve() == Path(b).resolve()  # noqa: E731
    if same(train, eval_path):
        raise EdgesmithError(f"--train and --eval both name {Path(train).name}: training on "
                             "the judging samples flatters the int8 model; give other samples")
    if data.eval.state or data.eval.consts or len(model.inputs) != 1:
        raise EdgesmithError("quantization-aware training (--train) takes models with one "
                             "input and no state; leave --train out for this model")
    if same(train, calib):
        if data.judged_on.endswith("(optimistic)"):
            raise EdgesmithError(f"--train and --calib both name {Path(train).name}, which is "
                                 "too small to hold judging samples out of: give --eval")
        data.train = lambda: data.batches
        data.notes.append(f"QAT trains on the calibration share of {Path(train).name} (the "
                          "judging samples held out)")
        return data
    per_sample = 4 * math.prod(d or 1 for d in model.inputs[0].dims[1:])
    cap = max(1, min(4 * limit, QAT_BYTES // max(1, per_sample)))

    @functools.cache
    def load(limit: int = cap) -> list[dict]:
        feeds = list(calibration_batches(train, model, data.batch, limit))
        if not feeds:
            raise EdgesmithError(f"training data {train} is empty (or shorter than the model's "
                                 "fixed batch)")
        return feeds

    load(data.batch)          # a wrong file fails now, not minutes into the search
    data.train = load
    return data


def _quant_data(model: Model, calib, eval_path, holdout: float, limit: int) -> QuantData:
    if model.state or not Path(calib).is_dir() and any(
            k.startswith("const:") for k in npz_headers(calib)):
        return _stream_quant_data(model, calib, eval_path, holdout, limit)
    batch = eval_batch(model, 16)
    fixed = bool(model.inputs and model.inputs[0].dims and model.inputs[0].dims[0])
    feeds = list(calibration_batches(calib, model, batch, limit + int(limit * holdout)))
    if not feeds:
        raise EdgesmithError(f"calibration data {calib} is empty (or shorter than the model's "
                             "fixed batch)")
    notes = []
    if eval_path is not None:
        judge = load_eval_set(eval_path, model)
        judged_on = f"{judge.n} samples of {Path(eval_path).name} (--eval)"
    else:
        labels = None
        if not Path(calib).is_dir():          # an .npz may carry labels: judge top-1 with them
            labels = load_eval_set(calib, model).labels
        calib_inputs, held, held_labels = _split(feeds, holdout, labels)
        n_held = len(next(iter(held.values())))
        if len(_batched(calib_inputs, batch, fixed)) and n_held >= (batch if fixed else 1):
            feeds = _batched(calib_inputs, batch, fixed)
            judge = EvalData(held, held_labels, {}, n_held)
            judged_on = f"{n_held} samples of {Path(calib).name}, held out from calibration"
            notes.append(f"judged on {judged_on} (no separate judging set was given)")
        else:
            judge = EvalData({k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]},
                             None, {}, sum(len(next(iter(f.values()))) for f in feeds))
            judged_on = f"the {judge.n} calibration samples of {Path(calib).name} (optimistic)"
            notes.append("too few calibration samples to hold any out: fidelity is judged on "
                         "the calibration samples themselves (optimistic); pass --eval")
    judge.refs = reference_outputs(model, judge, batch)
    return QuantData(batches=feeds[:max(1, -(-limit // batch))], eval=judge, batch=batch,
                     judged_on=judged_on, notes=notes)


def _stream_quant_data(model: Model, calib, eval_path, holdout: float, limit: int) -> QuantData:
    """A stream (state carried between calls) or a model fed constants: calibrated on each call
    as the float model sees it, judged one call at a time over a whole sequence. Without an
    eval set the stream's last `holdout` share judges: cut in order, never at random."""
    whole = load_eval_set(calib, model)
    notes = []
    if eval_path is not None:
        judge, head = load_eval_set(eval_path, model), whole
        judged_on = f"{judge.n} calls of {Path(eval_path).name} (--eval)"
    else:
        cut = whole.n - max(1, int(round(whole.n * holdout)))
        if cut < 1:
            raise EdgesmithError(f"{Path(calib).name} holds {whole.n} call(s): too few to "
                                 "calibrate and judge on; pass --eval or more chunks")
        part = lambda lo, hi: EvalData(  # noqa: E731
            {k: v[lo:hi] for k, v in whole.inputs.items()},
            None if whole.labels is None else whole.labels[lo:hi], {}, hi - lo, whole.consts,
            whole.state)
        judge, head = part(cut, whole.n), part(0, cut)
        judged_on = f"the last {whole.n - cut} calls of {Path(calib).name}, held out"
        notes.append(f"judged on the last {whole.n - cut} calls of {Path(calib).name}, held out "
                     "from calibration (a stream is cut in order; no separate judging set "
                     "was given)")
    if judge.state:
        notes.append(f"judged over {judge.n} consecutive calls with the state carried")
    judge.refs = reference_outputs(model, judge, 1)
    return QuantData(batches=stream_feeds(model, head, limit), eval=judge, batch=1,
                     judged_on=judged_on, notes=notes)


def build_recipe(prepared: onnx.ModelProto, recipe: QuantRecipe, batches: list[dict],
                 calibration_cache: Path | None = None, host_device: str = "auto",
                 deadline: float = math.inf, train: list[dict] | None = None
                 ) -> tuple[onnx.ModelProto, list, onnx.ModelProto]:
    """The quantized (or fp16) model for `recipe` from a pre-processed float model, the passes'
    reports, and the float graph whose weights the int8 ones round (CLE rescales them: judging
    an equalized block against the unequalized graph put every block at -5 dB, and mixed
    precision kept random blocks in float). The passes run in order (CLE, bias correction,
    quantization, ranges, reconstruction, QAT on the `train` feeds); learning stops at
    `deadline` (time.monotonic())."""
    if recipe.fp16:
        proto, report = to_fp16(prepared, recipe)
        return proto, [report], prepared
    if recipe.dynamic:
        proto, report = quantize_dynamic(prepared, recipe)
        return proto, [report], prepared
    float_model, reports = prepared, []
    if recipe.equalize:
        float_model, rep = equalize(float_model, EqualizeConfig(batches))
        reports.append(rep)
    twin = float_model
    if recipe.bias_correction:
        float_model, rep = bias_correct(float_model, BiasCorrectConfig(recipe, batches))
        reports.append(rep)
    proto, rep = quantize_static(float_model, QuantizeConfig(recipe, batches, calibration_cache))
    reports.append(rep)
    if recipe.refine_ranges:
        proto, rep = refine_ranges(proto, RangeConfig(float_model, batches))
        reports.append(rep)
    if recipe.reconstruct:
        proto, rep = reconstruct(proto, ReconstructConfig(
            float_model, batches, recipe.weight_range, iters=recipe.reconstruct,
            host_device=host_device, deadline=deadline))
        reports.append(rep)
    if recipe.qat:
        if not train:
            raise EdgesmithError(f"{recipe.name} trains the int8 model: give unlabelled training "
                                 "inputs (--train)")
        proto, rep = qat(proto, QatConfig(
            float_model=float_model, teacher=prepared, batches=train,
            weight_range=recipe.weight_range, epochs=recipe.qat, host_device=host_device,
            deadline=deadline))
        reports.append(rep)
    return proto, reports, twin


class RecipeSearch:
    """State shared by the candidates: the prepared float model, its calibration caches (one per
    calibration method and float graph), the judging set and the device."""

    def __init__(self, model: Model, run: Run, data: QuantData, job: Job, workdir: Path,
                 host_device: str = "auto"):
        self.model, self.run, self.data, self.job, self.workdir = model, run, data, job, workdir
        self.device = run.device
        self.host_device = host_device
        self.prepared, self.prep_report = preprocess(model.proto, PreprocessConfig(input_shapes=model.input_shapes))

    def build(self, recipe: QuantRecipe) -> tuple[onnx.ModelProto, list, onnx.ModelProto]:
        key = f"{ORT_CALIBRATION[recipe.calibration]}-{recipe.percentile}-" \
              f"{recipe.symmetric_activations}-{'cle' if recipe.equalize else 'plain'}-" \
              f"{'bc' if recipe.bias_correction else ''}"       # robust-minmax shares min/max's
        if recipe.bias_correction and recipe.exclude:     # float layers keep their biases
            key += "-" + hashlib.sha256("\0".join(recipe.exclude).encode()).hexdigest()[:12]
        return build_recipe(self.prepared, recipe, self.data.batches,
                            self.workdir / f"calib-{key}.json", self.host_device,
                            self.run.deadline(),
                            self.data.train() if recipe.qat and self.data.train else None)

    def profile(self, proto: onnx.ModelProto) -> dict[str, float]:
        """Milliseconds per run of each node of onnxruntime's optimised graph, on the device."""
        bundle = bundles.build(from_proto(proto, self.model), meta={"profile": True})
        result = measure(self.device, bundle, replace(self.job, runs=10, warmup=2,
                                                      evaluate=False, profile_ops=True))
        return result.node_profile_ms or {}

    def judging_feeds(self, limit: int = 32) -> list[dict]:
        """Held-out inputs in feeds (the calibration feeds if there are none)."""
        if self.data.eval.state or self.data.eval.consts:
            return stream_feeds(self.model, self.data.eval, limit)
        inputs = {k: v[:limit] for k, v in self.data.eval.inputs.items()}
        fixed = bool(self.model.inputs and self.model.inputs[0].dims
                     and self.model.inputs[0].dims[0])
        return _batched(inputs, self.data.batch, fixed) or self.data.batches

    def measure(self, label: str, proto: onnx.ModelProto, settings: dict | None = None
                ) -> Candidate:
        model = from_proto(proto, self.model)
        bundle = bundles.build(model, eval_data=self.data.eval, eval_batch=self.data.batch,
                               meta={"recipe": label})
        result = measure(self.device, bundle, self.job)
        return Candidate.from_result(label, result, model, recipe=settings or {},
                                     model_sha256=bundle.manifest.files[bundle.manifest.model]
                                     ["sha256"])


def choose_recipe(model: Model, device: Run | str, data: QuantData,
                  max_accuracy_drop: float = 0.01,
                  job: Job | None = None, baseline: Candidate | None = None,
                  on_step=None, on_candidate=None, confirm_rounds: int = 3,
                  effort: str = "balanced", host_device: str = "auto", explain: bool = True
                  ) -> tuple[Model, QuantizeReport]:
    """Measure the device's candidate recipes; return the fastest model within the budget.

    `device`: a Run (optimize's), or a device or its name (a run is opened on it).
    `baseline`: the float model already measured on this device with the same judging set
    (optimize passes its fp32 candidate); measured here otherwise. `on_candidate(cand, proto)`
    sees every measured recipe as it is measured (optimize records each one). The fastest
    in-budget recipes are re-measured against fp32 interleaved (`confirm_rounds`; optimize
    confirms across all its candidates instead): a recipe is chosen only when it is faster
    than fp32 beyond the rounds' spread. `effort` (REPAIR_CHAINS) says how far the accuracy
    repairs go; `host_device` where reconstruction learns. `explain`: the why-worse table of the
    chosen int8 model (per block: error share, float and int8 ms on the device) is in the
    report even when no repair needed it."""
    if effort not in REPAIR_CHAINS:
        raise EdgesmithError(f"unknown quantization effort {effort!r}: use one of "
                             f"{list(REPAIR_CHAINS)}")
    run = Run.open(device)
    device = run.device
    recipes, pruned = candidate_recipes(run.facts, model)
    job = replace(job or Job(runs=50, warmup=5, min_time_s=0.5), evaluate=True)
    say = on_step or (lambda text: None)
    with tempfile.TemporaryDirectory(prefix="edgesmith-quant-") as tmp:
        search = RecipeSearch(model, run, data, job, Path(tmp), host_device)
        if baseline is None:
            say("measuring fp32 baseline")
            baseline = search.measure("fp32", search.prepared)
        if not baseline.ok:
            raise EdgesmithError(f"the float model does not run on {device.name}: "
                                 f"{baseline.error}")
        baseline.accuracy_drop = 0.0
        built: dict[str, onnx.ModelProto] = {}
        twins: dict[str, onnx.ModelProto] = {}    # the float graph each int8 model rounds
        candidates: list[Candidate] = []
        warned: dict[str, None] = {}          # the quantizer's own warnings, once each

        def trial(recipe: QuantRecipe, note: str = "") -> Candidate:
            kind = "int8 reconstruct" if recipe.reconstruct or recipe.qat else "int8"
            if (why := run.fits(kind)) is not None:      # a budgeted run (optimize's)
                raise _OutOfTime(why)
            say(f"measuring {recipe.name}")
            t0 = time.perf_counter()
            try:
                proto, reports, twins[recipe.name] = search.build(recipe)
                host_s = time.perf_counter() - t0
                warned.update(dict.fromkeys(line for r in reports
                                            for line in r.metrics.get("warnings", ())))
            except Exception as exc:   # noqa: BLE001 - a failed trial is a row, not a crash
                text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                cand = Candidate(id=recipe.name, recipe=asdict(recipe), stage="quantize",
                                 note=note,
                                 error=text if isinstance(exc, EdgesmithError) else
                                 f"onnxruntime's quantizer failed: {type(exc).__name__}: {text}")
            else:
                built[recipe.name] = proto
                cand = search.measure(recipe.name, proto, asdict(recipe))
                cand.note = note
                cand.accuracy_drop = accuracy_drop(baseline.accuracy, cand.accuracy,
                                                   model.facts.class_scores)
                cand.host_s, cand.host_peak_rss_mb = host_s, peak_rss_mb()
            run.spent(kind, time.perf_counter() - t0)
            candidates.append(cand)
            if on_candidate is not None:
                on_candidate(cand, built.get(recipe.name))
            return cand

        sensitivity = []
        try:
            for i, recipe in enumerate(recipes):
                trial(recipe)
            sensitivity = _repair(search, trial, candidates, baseline, built, twins,
                                  max_accuracy_drop, effort)
        except _OutOfTime as stop:
            why = f"not tried: {stop}"
            pruned += [{"recipe": r.name, "reason": why} for r in recipes[i:]
                       if r.name not in {c.id for c in candidates}] or \
                [{"recipe": "accuracy repairs", "reason": why}]
        ok = [c for c in candidates if within(c, max_accuracy_drop) and
              c.p50_ms < baseline.p50_ms]
        if ok and confirm_rounds > 0:
            say("re-measuring fp32 and the fastest recipes interleaved")
            ok = _confirm(search, baseline, sorted(ok, key=lambda c: c.p50_ms)[:3], built,
                          confirm_rounds)
        chosen = min(ok, key=lambda c: c.latency_ms) if ok else baseline
        proto = built.get(chosen.id, search.prepared)
        if explain and chosen is not baseline and not sensitivity and chosen.id in built:
            say("explaining the int8 error per block")
            sensitivity = why_worse(search, proto, twins[chosen.id])
        if chosen is baseline:
            reason = ("no int8 recipe was faster than fp32 (beyond the measured noise) within "
                      f"the accuracy budget ({max_accuracy_drop:.3f}) on {device.name}; "
                      "keeping fp32")
        else:
            drop = "n/a" if chosen.accuracy_drop is None else f"{chosen.accuracy_drop:.4f}"
            basis = (f" (medians of {chosen.confirm['rounds']} interleaved rounds; the table's "
                     "p50s are single runs)" if chosen.confirm and baseline.confirm else "")
            reason = (f"{chosen.id}: {baseline.latency_ms / chosen.latency_ms:.2f}x faster "
                      f"than fp32{basis}, accuracy drop {drop}")
        notes = list(data.notes) + search.prep_report.details + list(warned)
        report = QuantizeReport(device=device.name, max_accuracy_drop=max_accuracy_drop,
                                judged_on=data.judged_on, baseline=baseline,
                                candidates=candidates, chosen=chosen,
                                pruned=pruned, sensitivity=sensitivity[:20],
                                kept_float=list(chosen.recipe.get("exclude", ())),
                                quantized=chosen is not baseline, summary=reason, notes=notes)
        return from_proto(proto, model), report


class _OutOfTime(Exception):
    """The run's budget has no time left for the next recipe (the reason is the message)."""


def _confirm(search: RecipeSearch, baseline: Candidate, top: list[Candidate], built: dict,
             rounds: int) -> list[Candidate]:
    """fp32 and the contenders in the same interleaved rounds; those faster than fp32 beyond
    the spread (their `confirm` and fp32's hold the medians and ranges)."""
    job = replace(search.job, evaluate=False)
    trials = {c.id: (bundles.build(from_proto(built[c.id], search.model),
                                   eval_batch=search.data.batch), job) for c in top}
    trials[baseline.id] = (bundles.build(from_proto(search.prepared, search.model),
                                         eval_batch=search.data.batch), job)
    spreads = search.run.confirm(trials, rounds)
    if baseline.id not in spreads:
        return []
    base = spreads[baseline.id]
    baseline.confirm = asdict(base)
    for c in top:
        if c.id in spreads:
            c.confirm = asdict(spreads[c.id])
    return [c for c in top if c.id in spreads and spreads[c.id].beats(base)]


def why_worse(search: RecipeSearch, proto: onnx.ModelProto, twin: onnx.ModelProto
              ) -> list[dict]:
    """Per block of the int8 `proto` (rounding the float graph `twin`): its share of the error
    on held-out inputs, and its float and int8 milliseconds on the device; costliest per
    millisecond saved first."""
    return add_times(block_sensitivity(twin, proto, search.judging_feeds()),
                     search.profile(search.prepared), search.profile(proto))


def _repair(search: RecipeSearch, trial, candidates: list[Candidate], baseline: Candidate,
            built: dict, twins: dict, max_drop: float, effort: str) -> list[dict]:
    """The fastest recipe missed the budget: the effort's repair chain (ranges, calibration,
    CLE + bias correction, block reconstruction), then mixed precision on the most accurate of
    them, from its why-worse table: the blocks that cost the most accuracy per millisecond int8
    saves on the device are kept in float (doubling their number). Starting from a
    reconstruction (effort max only: minutes per try) the int8 blocks learn again, since what
    they learned compensated the float blocks' int8 error too (kept as learned, the digits
    ResNet lost 8 dB instead of gaining 1.4). With training inputs (--train), the most
    faithful repair is fine-tuned by QAT before any block is kept in float (a QAT start for
    mixed precision, effort max only, trains again around them). Ties are broken by SQNR.
    Returns the why-worse table when it was computed. Dynamic int8 is passed over: it quantizes weights alone, which no calibration, range or
    CLE changes (a stream's five "repairs" of it measured five copies of one model)."""
    fast = sorted((c for c in candidates if c.ok and c.p50_ms < baseline.p50_ms),
                  key=lambda c: c.p50_ms)
    if any(within(c, max_drop) for c in fast):
        return []
    fast = [c for c in fast if c.id not in BASE_RECIPES or not BASE_RECIPES[c.id].dynamic]
    if not fast or fast[0].id not in BASE_RECIPES:
        return []
    base = BASE_RECIPES[fast[0].id]
    tried, no_histogram, repaired = set(), False, [fast[0]]
    for suffix in REPAIR_CHAINS[effort]:
        if no_histogram:      # percentile calibration failed on this model: MSE ranges instead
            suffix = suffix.replace("percentile", "mse")
        if suffix in tried:
            continue
        tried.add(suffix)
        cand = trial(recipe_by_name(f"{base.name}-{suffix}"), "accuracy repair")
        if within(cand, max_drop):
            return []
        no_histogram |= suffix == "percentile" and not cand.ok
        repaired.append(cand)

    def faithful(c: Candidate) -> tuple[float, float]:
        return (float("inf") if c.accuracy_drop is None else c.accuracy_drop,
                -(c.accuracy or {}).get("sqnr_db", 0.0))

    most = min((c for c in repaired if c.ok and c.id in built), key=faithful, default=None)
    if search.data.train and most is not None and most.recipe.get("format") == "QDQ":
        cand = trial(recipe_by_name(f"{most.id}-qat"), "quantization-aware training")
        if within(cand, max_drop):
            return []
        repaired.append(cand)
    best = min((c for c in repaired if c.ok and c.id in built and (
        effort == "max" or not (c.recipe.get("reconstruct") or c.recipe.get("qat")))),
        key=faithful)
    start = recipe_by_name(best.id)
    worst = why_worse(search, built[best.id], twins[best.id])
    k = 1
    while k <= min(MAX_FLOAT_BLOCKS, len(worst)):
        names = [n for r in worst[:k] for n in r["nodes"]]
        cand = trial(replace(start.with_exclusions(names), name=f"{best.id}-float{k}"),
                     f"{k} block(s) kept in float")
        if within(cand, max_drop):
            break
        k *= 2
    return worst


def quantize_with(model: Model, recipe: QuantRecipe | str, batches: list[dict],
                  host_device: str = "auto", train: list[dict] | None = None,
                  deadline: float = math.inf) -> tuple[onnx.ModelProto, list]:
    """One recipe (or its name), no search: for scripts (and optimize's pruned students) that
    already know which recipe the device chose."""
    prepared, prep = preprocess(model.proto, PreprocessConfig(input_shapes=model.input_shapes))
    recipe = recipe_by_name(recipe) if isinstance(recipe, str) else recipe
    proto, reports, _ = build_recipe(prepared, recipe, batches, host_device=host_device,
                                     deadline=deadline, train=train)
    return proto, [prep] + reports
