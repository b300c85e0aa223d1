"""optimize's candidate families, each measured through the run's Context as it is made:
int8 recipes on onnxruntime, pruned + distilled students (+ int8), and TFLite conversions under
LiteRT. A family that cannot run here (no data, no torch, no TFLite runtime) says why in the
report and the others go on. Each stage returns what it adds to the report (`Added`); its
candidates are recorded as they are measured (`Context.record`: resumable, best so far written)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace

import onnx

from .config import ORIGINAL, Context
from ..errors import EdgesmithError
from ..measure import Candidate
from ..model import atomic_write, from_proto
from ..search.int8 import choose_recipe
from ..run.budget import within
from ..run.state import sha256 as _sha
from ..targets import device_backends


@dataclass(kw_only=True)
class Added:
    """What a stage adds to the report besides its candidates: notes, variants not tried (each
    with the reason) and, for the int8 stage, the recipe the students are quantized with."""

    notes: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    int8_recipe: dict | None = None


def int8_stage(ctx: Context) -> Added:
    """The device's int8 recipes, measured against the fp32 baseline; every measured recipe
    becomes a candidate as it is measured. `int8_recipe`: the chosen recipe's settings (for the
    pruned students), None when fp32 stayed best. A finished search is not re-run on resume."""
    marker = ctx.run.state.dir / "int8.json"
    if ctx.quant is None:
        return Added(notes=["no calibration data (--calib or --eval): int8 candidates skipped"])
    try:
        done = json.loads(marker.read_text()) if marker.is_file() else None
        assert done is None or {"recipe", "skipped", "notes"} <= set(done)
    except (OSError, ValueError, AssertionError):
        done = None        # unreadable: the search runs again
    if done is not None:      # its own candidates only (not their `+kernels` runs, a later stage's)
        ctx.cands += [c for c in ctx.run.state.done.values()
                      if c.id.startswith("int8:") and KERNELS not in c.recipe]
        return Added(notes=done["notes"], skipped=done["skipped"], int8_recipe=done["recipe"])
    if (why := ctx.run.fits("int8")) is not None:
        return Added(skipped=[{"id": "int8:*", "reason": why}])

    def keep(cand: Candidate, proto: onnx.ModelProto | None) -> None:
        cand = replace(cand, id=f"int8:{cand.id}", recipe={"quantize": cand.recipe})
        if proto is not None and cand.ok:
            cand.model_sha256 = _sha(proto.SerializeToString())
        ctx.cands[:] = [c for c in ctx.cands if c.id != cand.id]
        ctx.record(cand, None if proto is None else from_proto(proto, ctx.original))

    try:
        _, q_report = choose_recipe(ctx.fused, ctx.run, ctx.quant, ctx.cfg.max_accuracy_drop,
                                    ctx.job, baseline=replace(ctx.baseline()), on_step=ctx.run.say,
                                    on_candidate=keep, confirm_rounds=0,
                                    effort=ctx.cfg.quant_effort, host_device=ctx.cfg.host_device,
                                    explain=False)
    except EdgesmithError as exc:
        return Added(notes=[f"int8 recipe search failed: {exc}"])
    skipped = [{"id": f"int8:{p['recipe']}", "reason": p["reason"]} for p in q_report.pruned]
    notes = [n for n in q_report.notes if n not in ctx.run.notes]
    if not q_report.quantized:
        notes.append(q_report.summary)
    recipe = q_report.chosen.recipe if q_report.quantized else None
    if not any("--budget" in s["reason"] for s in skipped):   # a cut search continues on resume
        atomic_write(marker, json.dumps({"recipe": recipe, "skipped": skipped,
                                         "notes": notes}).encode())
    return Added(notes=notes, skipped=skipped, int8_recipe=recipe)


def _training(ctx: Context, family: str) -> str | None:
    """Why the training families cannot run (a note for the report), or None."""
    if ctx.train is None:
        return f"no training data (--train): {family} candidates skipped"
    try:
        import torch  # noqa: F401
    except ImportError:
        return (f"{family} skipped: needs the `train` extra "
                "(pip install torch==2.13.0 'edgesmith[train]')")
    return None


def _with_int8(ctx: Context, cid: str, recipe: dict, model, int8_recipe: dict | None,
               note: str = "") -> list[str]:
    """The student measured, then quantized with the recipe the int8 search chose; the notes
    of what failed."""
    from ..passes.quantize import QuantRecipe
    from ..search.int8 import quantize_with

    ctx.measure(cid, recipe, model, note)
    if not int8_recipe or ctx.quant is None:
        return []
    q = QuantRecipe(**{**int8_recipe, "exclude": ()})   # node names changed
    learns = bool(q.reconstruct or q.qat)
    if (why := ctx.run.fits("int8 reconstruct" if learns else "measure")) is not None:
        return [f"{cid}+int8 not tried: {why}"]
    try:
        proto, _ = quantize_with(model, q, ctx.quant.batches, ctx.cfg.host_device,
                                 ctx.quant.train() if q.qat and ctx.quant.train else None,
                                 deadline=ctx.run.deadline())
    except EdgesmithError as exc:
        return [f"{cid}+int8 failed: {exc}"]
    ctx.measure(f"{cid}+int8:{q.name}", {**recipe, "quantize": q.name},
                from_proto(proto, ctx.original))
    return []


def pruned_stage(ctx: Context, int8_recipe: dict | None) -> Added:
    """Structured pruning at each ratio, distilled from the original (+ the chosen int8)."""
    if (why := _training(ctx, "pruning + distillation")) is not None:
        return Added(notes=[why])
    from ..data import load_training_set
    from ..passes.distill import DistillConfig, distill, soft_targets
    from ..passes.prune import PruneConfig, prune_channels

    data = load_training_set(ctx.train, ctx.original)
    try:
        targets = soft_targets(ctx.original.proto, data)     # one teacher: computed once
    except EdgesmithError as exc:
        return Added(notes=[f"pruning + distillation skipped: {exc}"])
    added, epochs = Added(), ctx.cfg.distill_epochs
    for ratio in ctx.cfg.prune_ratios:
        cid = f"prune{int(ratio * 100)}+distill"
        if (why := ctx.run.fits("distill")) is not None:
            added.skipped.append({"id": cid, "reason": why})
            continue
        ctx.run.say(f"pruning {ratio:.0%} of channels and distilling ({epochs} epochs)")
        t0 = time.monotonic()
        pruned, _ = prune_channels(ctx.fused.proto, PruneConfig(
            ratio=ratio, input_shapes=ctx.original.input_shapes,
            round_to=ctx.run.target.profile.channel_multiple))
        try:
            student, rep = distill(pruned, DistillConfig(
                ctx.original.proto, data, ctx.judge, targets, epochs=epochs,
                host_device=ctx.cfg.host_device, deadline=ctx.run.deadline()))
        except EdgesmithError as exc:      # one failed student is a note, not a failed run
            added.notes.append(f"{cid} skipped: {exc}")
            continue
        added.notes += _with_int8(ctx, cid, {"prune": ratio, "distill": {"epochs": epochs}},
                                  from_proto(student, ctx.original), int8_recipe,
                                  rep.details[-1] + "".join(f"; {d}" for d in rep.details
                                                            if "time limit" in d))
        ctx.run.spent("distill", time.monotonic() - t0)
    return added


def nas_stage(ctx: Context, int8_recipe: dict | None) -> Added:
    """NetAdapt toward each latency ratio, measured on this run's device; one search continues
    into the next ratio (its iterations are kept under OUT's state, so a re-run resumes). Each
    search may spend half the run's remaining budget: the families after it still get time."""
    if not ctx.cfg.nas_ratios:
        return Added()
    if (why := _training(ctx, "NetAdapt (nas)")) is not None:
        return Added(notes=[why])
    from ..search.nas import NasConfig, nas

    added = Added()
    for ratio in sorted(ctx.cfg.nas_ratios, reverse=True):
        remaining = ctx.run.remaining_s()
        cid = f"nas{int(ratio * 100)}+distill"
        if (why := ctx.run.fits("nas")) is not None:
            added.skipped.append({"id": cid, "reason": why})
            continue
        ctx.run.say(f"NetAdapt search toward {ratio}x of fp32's latency")
        t0 = time.monotonic()
        try:
            report = nas(ctx.original.path, ctx.train, ctx.run.state.dir / "nas", ctx.run.device,
                         NasConfig(latency_ratio=ratio, steps=100, uniform_baseline=False,
                                   final_epochs=ctx.cfg.distill_epochs, budget_s=remaining / 2,
                                   threads=ctx.job.threads, host_device=ctx.cfg.host_device,
                                   round_to=ctx.run.target.profile.channel_multiple),
                         input_shapes=ctx.original.input_shapes,
                         say=lambda text: ctx.run.say(f"nas: {text}"))
        except EdgesmithError as exc:
            added.notes.append(f"{cid} skipped: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 - a failed family is a note, the run goes on
            added.notes.append(f"{cid} failed ({type(exc).__name__}: {exc}); the other "
                               "candidates stand; please report this with the model")
            continue
        if report.final is None:
            added.notes.append(f"{cid}: the search stopped before its final distillation "
                               f"({report.stopped or 'budget'}; "
                               f"{len(report.iterations)} iteration(s)); re-run to continue")
            continue
        model = from_proto(onnx.load(str(ctx.run.state.dir / "nas" / "model.onnx")),
                           ctx.original)
        added.notes += _with_int8(ctx, cid, {"nas": {"ratio": ratio,
                                                     "iterations": len(report.iterations),
                                                     "widths": report.widths_after}},
                                  model, int8_recipe)
        ctx.run.spent("nas", time.monotonic() - t0)
    return added


def tflite_stage(ctx: Context) -> Added:
    """The fp32 model and the most accurate in-budget int8 one, converted to TFLite and measured
    under LiteRT (XNNPACK) beside the onnxruntime candidates: on ARM boards LiteRT is often the
    faster CPU path, and only the device's measurement can say."""
    if (why := tflite_unavailable(ctx.cfg, ctx.run.facts, ctx.run.device.name,
                                  ctx.run.target.profile)) is not None:
        return Added(skipped=[{"id": "tflite:*", "reason": why}])
    from ..convert.tflite import (as_model, conversion_sample, random_inputs, to_tflite,
                                  unconvertible)

    if (why := unconvertible(ctx.original, ctx.judge)) is not None:
        return Added(skipped=[{"id": "tflite:*", "reason": why}])

    added = Added()
    int8 = sorted((c for c in ctx.cands if c.id.startswith("int8:") and KERNELS not in c.recipe
                   and within(c, ctx.cfg.max_accuracy_drop)),
                  key=lambda c: (c.accuracy_drop, c.p50_ms))
    sources = [("tflite:fp32", "fp32", ctx.fused)]
    if int8:
        sources.append((f"tflite:{int8[0].id}", int8[0].id,
                        ctx.run.state.load_model(int8[0], ctx.original)))
    elif ctx.quant is not None:
        added.skipped.append({"id": "tflite:int8", "reason": "no int8 recipe kept the accuracy "
                              "budget on onnxruntime, so none is converted"})
    sample = conversion_sample(ctx.original, ctx.judge.inputs if ctx.judge is not None
                               else random_inputs(ctx.original))
    for cid, source_id, source in sources:
        if ctx.resumed(cid) is not None:
            continue
        if (why := ctx.run.fits("tflite")) is not None:
            added.skipped.append({"id": cid, "reason": why})
            continue
        ctx.run.say(f"converting {source_id} to TFLite")
        t0 = time.monotonic()
        try:
            data, rep = to_tflite(source.proto, sample)
        except EdgesmithError as exc:
            added.skipped.append({"id": cid, "reason": str(exc)})
            continue
        ctx.measure(cid, {"convert": "tflite", "from": source_id}, as_model(data, source),
                    f"converted from {source_id} in {rep.seconds:.0f} s")
        ctx.run.spent("tflite", time.monotonic() - t0)
    return added


KERNELS = "edgesmith_kernels"
ALL_BLOCKS = "0@1"        # every block the pass takes, at the kernel's default band


def kernels_stage(ctx: Context) -> Added:
    """edgesmith's own kernels as a family: the fastest in-budget onnxruntime candidates whose
    blocks the kernel passes take run on them, measured and judged on the device as candidates
    of their own (`<id>+kernels`: the same model file, a bundle that runs the kernels), so the
    choice weighs, say, int8 on the kernels against fp32. The int8 kernel computes on the QDQ
    model's grid (its accuracy is its parent's by construction; the device judges it anyway);
    the tuning of the winner then sets the band and where the kernels pay."""
    from ..variants import KNOBS

    if KERNELS not in ctx.run.target.profile.search or "onnxruntime" not in ctx.cfg.backends:
        return Added()
    knob = KNOBS[KERNELS]
    if (why := knob.impossible(ALL_BLOCKS, ctx.run.facts, "onnxruntime")) is not None:
        return Added(skipped=[{"id": "*+kernels", "reason": why}])
    parents = sorted((c for c in ctx.cands if c.ok and c.model_sha256 and c.backend == "onnxruntime"
                      and KERNELS not in c.recipe and c.id != ORIGINAL
                      and within(c, ctx.cfg.max_accuracy_drop, ctx.cfg.latency_budget_ms)),
                     key=lambda c: c.p50_ms)[:ctx.cfg.contenders]
    added = Added()
    for parent in parents:
        cid = f"{parent.id}+kernels"
        if ctx.resumed(cid) is not None:
            continue
        if (why := ctx.run.fits("measure")) is not None:
            added.skipped.append({"id": cid, "reason": why})
            continue
        t0 = time.monotonic()
        model = ctx.run.state.load_model(parent, ctx.original)
        ships = ctx.kernel_parts(model, ALL_BLOCKS)
        if isinstance(ships, str):
            added.skipped.append({"id": cid, "reason": ships})
            continue
        ctx.measure(cid, {**parent.recipe, KERNELS: ALL_BLOCKS}, model,
                    f"{parent.id} on edgesmith's kernels ({ships[3]}); model.{model.format} "
                    "stays the portable model", ships=ships[:3])
        ctx.run.spent("measure", time.monotonic() - t0)     # the rewrite and its check too
    return added


def tflite_unavailable(cfg, facts: dict, device: str, profile) -> str | None:
    """Why TFLite candidates cannot be made and measured in this run, or None."""
    if "tflite" not in cfg.backends:
        return "not asked for (--backends)"
    if "tflite" not in device_backends(facts):
        return f"{device} has no TFLite runtime (`pip install ai-edge-litert` there)"
    if "tflite" not in profile.backends:
        return f"target {profile.name} does not list the tflite backend"
    from ..convert.tflite import available

    return available()

