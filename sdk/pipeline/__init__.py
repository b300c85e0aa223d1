"""`optimize`, the main job: model in, the fastest variant within the accuracy budget on the
device out. Its config and the stages' Context are in `config`, its candidate families in
`stages`; this module runs them over one run object (`edgesmith.run.Run`).

A context (`config.Context`: the run object, the fused model, the judging set with reference
outputs, the calibration feeds) is built once per run; then the stages run in order: fp32
baseline, the candidate families of `stages` (int8 recipes, pruned + distilled students (+ int8),
TFLite conversions under LiteRT), interleaved confirmation of the fastest contenders, and the
finish (tuning, per-op profile, bundle, reports). Every candidate is measured
through `measure.measure` and appended to OUT/.edgesmith-state with its model, under a run key: a re-run
of the same job resumes, a different job starts afresh. The best so far is written after every
candidate, so an interrupted or budget-stopped run still leaves a deployable answer.
"""
from __future__ import annotations

import json
import math
import re
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import onnx

from .. import __version__
from .. import bundle as bundles
from ..data import eval_batch, input_stats
from ..devices import Job
from ..errors import EdgesmithError
from ..measure import Candidate, Spread, busy_note, measure, ms_digits, paired_ratios, pinned
from ..model import Model, atomic_write, from_proto, load
from ..passes.fuse import fuse
from ..run import Run
from ..run.outputs import copy_dir_atomic, is_ours, write_model
from ..run.state import sha256
from ..search.int8 import quant_data
from ..search.select import best_tradeoff, choose, within_noise_of
from .config import ORIGINAL, Context, OptimizeConfig
from .stages import (KERNELS, int8_stage, kernels_stage, nas_stage, pruned_stage, tflite_stage,
                     tflite_unavailable)

REPORT_SCHEMA = 2
AT_DEFAULTS = "model.onnx at the runtime defaults"   # the model gain, apart from the config's
SHIPPED = "the shipped bundle"
MAX_GAIN_ROUNDS = 9          # the shipped bundle's re-measurement against the original, at most


@dataclass(kw_only=True)
class OptimizeReport:
    schema: int
    edgesmith: str
    model: str
    device: str
    device_facts: dict
    target: str
    target_reasons: list[str]
    config: dict
    candidates: list[Candidate]
    skipped: list[dict]                # variants not tried, each with the reason
    chosen: str | None
    outcome: str                       # "met" | "no candidate met the budget"
    summary: str
    notes: list[str] = field(default_factory=list)
    judged_on: str = ""                            # the judging set and its size ("": none)
    remeasure: dict = field(default_factory=dict)   # original vs chosen, interleaved (Spreads)
    op_profile_ms: dict = field(default_factory=dict)
    tuned_config: dict = field(default_factory=dict)
    tuning: dict = field(default_factory=dict)     # the config search on the chosen model
    elapsed_s: float = 0.0
    overshoot_s: float = 0.0                       # past --budget (at most one candidate's time)
    latency: dict = field(default_factory=dict)    # the one figure per candidate every view
    #                                                shows, and how it was measured
    step_costs_s: dict = field(default_factory=dict)   # slowest step of each kind: what the
    #                                                    stages were sized from
    resumed: int = 0
    model_file: str = "model.onnx"                 # OUT/model.onnx or OUT/model.tflite
    finished_at: float = 0.0                       # time.time() the result was written
    already_finished: bool = False                 # answered from OUT: nothing measured now


def optimize(model_path: str | os.PathLike, out_dir: str | os.PathLike, device="local",
             calib=None, eval_path=None, train=None, cfg: OptimizeConfig | None = None,
             input_shapes: dict | None = None, force: bool = False, say=None) -> OptimizeReport:
    """The main job; see the module docstring. `say(text)` receives progress lines."""
    ctx = build_context(model_path, out_dir, device, calib, eval_path, train,
                        cfg or OptimizeConfig(), input_shapes, force, say)
    if (finished := finished_report(ctx.run)) is not None:
        return finished
    resumed = len(ctx.run.state.done)
    if resumed:
        ctx.run.say(f"resuming: {resumed} candidate(s) already measured in {ctx.run.out}")
    base = ctx.measure("fp32", {"fuse": True}, ctx.fused)
    if base.device_s:             # resumed: what it cost when it was measured
        ctx.run.spent("measure", base.device_s)
    if not base.ok:
        raise EdgesmithError(f"the model does not run on {ctx.run.device.name}: {base.error}")
    ctx.measure(ORIGINAL, {}, ctx.original, "the model as given: a variant must beat it")
    ctx.run.reserve_s = closing_reserve(ctx)
    int8 = int8_stage(ctx)
    added = [int8, pruned_stage(ctx, int8.int8_recipe), nas_stage(ctx, int8.int8_recipe),
             tflite_stage(ctx)]
    added.append(kernels_stage(ctx))      # on the fastest of all the others
    notes = ctx.run.notes + [note for a in added for note in a.notes]
    cut = any("--budget" in s["reason"] for a in added for s in a.skipped) or \
        any("--budget" in n or "re-run to continue" in n for n in notes)
    if cut:
        notes.append(f"stopped by --budget ({ctx.cfg.budget_s:.0f}s) after "
                     f"{len(ctx.cands)} candidate(s); the same command continues the search")
    ctx.run.reserve_s = 0.0            # the closing stages spend what was held back for them
    remeasure: dict = {}
    chosen = confirm_stage(ctx, choose(ctx.cands, ctx.cfg), remeasure, notes)
    report = OptimizeReport(schema=REPORT_SCHEMA, edgesmith=__version__, model=str(model_path),
                            device=ctx.run.device.name, device_facts=ctx.run.facts,
                            target=ctx.run.target.profile.name,
                            target_reasons=ctx.run.target.reasons, config=asdict(ctx.cfg),
                            candidates=ctx.cands,
                            skipped=[s for a in added for s in a.skipped],
                            chosen=chosen.id if chosen else None,
                            outcome="met" if chosen else "no candidate met the budget",
                            summary="", notes=notes, remeasure=remeasure, resumed=resumed,
                            judged_on=ctx.quant.judged_on if ctx.quant else "")
    finish_stage(ctx, report)
    report.elapsed_s = time.monotonic() - ctx.run.started
    report.overshoot_s = max(0.0, report.elapsed_s - ctx.cfg.budget_s)
    report.finished_at = time.time()
    report.step_costs_s = dict(ctx.run.costs)
    from ..report.text import latency_scale
    report.latency = latency_scale(report)
    from ..report.html import write_reports
    write_reports(report, ctx.run.out)
    if not cut:          # a search --budget cut short is continued by the same command
        ctx.run.state.finish()
    return report


def build_context(model_path, out_dir, device, calib, eval_path, train, cfg: OptimizeConfig,
                  input_shapes, force: bool, say) -> Context:
    """Load and fuse the model, reach the device, match its target, read the data once, then
    claim OUT under the run key (bad data is refused before anything is written)."""
    started = time.monotonic()
    original = load(model_path, input_shapes, data=eval_path or calib or train, state=cfg.state)
    if original.format != "onnx":
        raise EdgesmithError("optimize takes ONNX models; profile TFLite models with "
                             "`edgesmith profile`")
    run = Run.open(device, target=cfg.target, budget_s=cfg.budget_s, say=say, started=started)
    if "onnxruntime" not in cfg.backends and \
            (why := tflite_unavailable(cfg, run.facts, run.device.name, run.target.profile)):
        raise EdgesmithError(f"--backends tflite, but no TFLite candidate can be made: {why}")
    notes = run.notes
    notes[:0] = original.facts.notes
    fused_proto, _ = fuse(original.proto)
    fused = from_proto(fused_proto, original, original.path)
    quant, judge = None, None
    if calib is None and train is not None:       # training samples are never judging samples
        calib = train
        notes.append("calibrated on the --train samples (no --calib given)")
    if calib is not None or eval_path is not None:
        # eval only: calibrate on part of it, judge on the rest (never on calibration samples)
        quant = quant_data(original, calib or eval_path, eval_path if calib else None,
                           train=train if train is not None and len(original.inputs) == 1
                           and not original.state else None)
        notes += quant.notes
        judge = quant.eval
    else:
        notes.append("no --eval or --calib: no candidate's accuracy can be judged, so only fp32 "
                     "can meet the accuracy budget")
    bundle_dir = Path(out_dir) / "bundle"
    if bundle_dir.exists() and not force and not (bundle_dir.is_dir() and is_ours(bundle_dir)):
        raise EdgesmithError(f"{bundle_dir} exists and edgesmith did not write it; move it, "
                             "choose another -o, or pass --force (files are replaced by name)")
    settings = {k: v for k, v in asdict(cfg).items() if k != "wait_idle_s"}  # not a result's
    run.resume_in(out_dir, run.key(original, settings, calib=calib, eval=eval_path,
                                   train=train), force=force)
    job = replace(Job(**run.target.profile.measure_job_args()), evaluate=judge is not None,
                  wait_idle_s=cfg.wait_idle_s)
    job = replace(job, timeout_s=job.timeout_s + cfg.wait_idle_s)
    return Context(cfg=cfg, run=run, original=original, fused=fused, job=job, judge=judge,
                   quant=quant, train=train)


def finished_report(run: Run) -> OptimizeReport | None:
    """This job's finished result when OUT holds it whole (its report.json as written, the
    bundle intact): answered as it is, never measured again and replaced (a user who wants
    new figures removes OUT or chooses another -o)."""
    from device_runtime.bundle import verify
    from device_runtime.errors import RuntimeFailure

    raw = run.state.finished()
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        data["candidates"] = [Candidate(**c) for c in data["candidates"]]
        report = OptimizeReport(**data)
        verify(run.out / "bundle")
        shipped = next((c.model_sha256 for c in report.candidates if c.id == report.chosen), "")
        if shipped and sha256((run.out / report.model_file).read_bytes()) != shipped:
            return None
    except (ValueError, TypeError, KeyError, OSError, RuntimeFailure):
        return None         # not whole: the job resumes and writes it again
    report.already_finished = True
    return report


def _timing_job(ctx: Context) -> Job:
    return Job(runs=50, warmup=5, min_time_s=0.5, evaluate=False, wait_idle_s=ctx.job.wait_idle_s,
               timeout_s=Job.timeout_s + ctx.job.wait_idle_s)


TUNE_MEASUREMENTS = 12      # a tuning's measurements besides its trials (confirmation, profile)
REPORT_S = 2.0              # writing the bundle and the reports


def closing_reserve(ctx: Context) -> float:
    """What the closing stages cost at their full settings, from the cost of one measurement
    (the fp32 baseline's): the interleaved rounds, the op profile, tuning and its re-measurement.
    At most half the time left, so the searches keep time; the closing stages fit what is left
    when they start (`_rounds_that_fit`)."""
    c, cfg, half = _measurement_s(ctx), ctx.cfg, max(ctx.run.remaining_s(), 0) / 2
    cost = (cfg.confirm_rounds * (cfg.contenders + 1) + 1) * c + REPORT_S
    tuning = cfg.tune_budget_s + (TUNE_MEASUREMENTS + 3 * cfg.confirm_rounds) * c
    if cfg.tune_budget_s and cost + tuning <= half:     # else tuning will not fit: no time kept
        cost += tuning
    return min(cost, half)


def _measurement_s(ctx: Context) -> float:
    """What one more measurement may cost: the slowest so far, plus the wait for an idle
    device it is allowed (--wait-idle)."""
    return ctx.run.costs.get("measure", 1.0) + ctx.job.wait_idle_s


def _rounds_that_fit(ctx: Context, trials: int, keep_s: float = 0.0) -> int:
    """Interleaved rounds of `trials` measurements that fit in the time left, less `keep_s`
    for what must still follow; at most the configured rounds."""
    left = ctx.run.remaining_s() - keep_s - REPORT_S
    if not math.isfinite(left):
        return ctx.cfg.confirm_rounds
    return int(max(0, min(ctx.cfg.confirm_rounds, left // (trials * _measurement_s(ctx)))))


def confirm_stage(ctx: Context, chosen: Candidate | None, report_remeasure: dict,
                  notes: list[str]) -> Candidate | None:
    """Single measurements flip on a busy device: re-measure the original and the fastest
    in-budget candidates interleaved, in the same rounds, and choose by the median. Every
    speedup the reports print comes from these rounds (one basis, with its spread). Rounds
    are cut to the budget left (one measurement kept for the op profile)."""
    top = sorted((c for c in ctx.cands if c.within_budget), key=lambda c: c.p50_ms)
    top = top[:ctx.cfg.contenders]
    if not top or chosen is None:
        return chosen
    keep = _measurement_s(ctx)

    def trials_of(top: list) -> int:             # the original is always one of the trials
        return len({c.id for c in top} | {ORIGINAL})

    while len(top) > 1 and _rounds_that_fit(ctx, trials_of(top), keep) < ctx.cfg.confirm_rounds:
        top.pop()          # fewer contenders before fewer rounds: a median needs its rounds
    rounds = _rounds_that_fit(ctx, trials_of(top), keep)
    if rounds < 1:
        notes.append(f"not re-measured interleaved: --budget ({ctx.cfg.budget_s:.0f}s) had no "
                     "time left for it; the choice rests on single measurements")
        return chosen
    ctx.run.say(f"re-measuring the original and the {len(top)} fastest candidate(s) interleaved")
    trials = {}
    for c in top:
        if isinstance(bundle := timing_bundle(ctx, c), str):
            notes.append(bundle)
        else:
            trials[c.id] = (bundle, _timing_job(ctx))
    trials[ORIGINAL] = (bundles.build(ctx.original), _timing_job(ctx))
    spreads = ctx.run.confirm(trials, rounds)
    for c in ctx.cands:          # the contenders, and the original when it is a candidate
        if c.id in spreads:
            c.confirm = asdict(spreads[c.id])
    if ORIGINAL in spreads:
        report_remeasure["original"] = asdict(spreads[ORIGINAL])
    return choose(ctx.cands, ctx.cfg) or chosen


def timing_bundle(ctx: Context, c: Candidate) -> bundles.Bundle | str:
    """What times a candidate: its model, on edgesmith's kernels when it is a `+kernels` one
    (or why that can no longer be built, e.g. on a resumed run without the compiler)."""
    model = ctx.run.state.load_model(c, ctx.original)
    if KERNELS not in c.recipe:
        return bundles.build(model)
    ships = ctx.kernel_parts(model, c.recipe[KERNELS])
    if isinstance(ships, str):
        return f"{c.id} was not re-measured: edgesmith's kernels no longer build ({ships})"
    rewritten, files, config, _ = ships
    return bundles.build(rewritten, config=config, extra_files=files)


def finish_stage(ctx: Context, report: OptimizeReport) -> None:
    """Tune the winner, write its bundle, profile its ops; a tuned config is re-measured
    against the original (interleaved) so the summary speaks of what ships."""
    pick = next((c for c in ctx.cands if c.id == report.chosen), None) or \
        best_tradeoff(ctx.cands)
    if pick is None:
        report.summary = "no candidate ran on the device"
        return
    model = ctx.run.state.load_model(pick, ctx.original)
    report.model_file = f"model.{model.format}"
    batch = model.inputs[0].dims[:1] if model.inputs else []     # a scalar input has none
    if model.format == "tflite" and batch and ctx.original.inputs[0].dims[:1] != batch:
        report.notes.append(f"the chosen .tflite was converted at fixed shapes: it takes a "
                            f"batch of {batch[0]} where the original takes any batch (run "
                            "batches as a loop, or pass --backends onnxruntime)")
    tuned = _tune(ctx, model, pick.id, report.notes)
    report.tuned_config = pick.config = tuned.best.config if tuned else {}
    report.tuning = tuning_summary(tuned) if tuned else {}
    files: dict[str, bytes] = {}
    ships = ctx.kernel_parts(model, pick.recipe[KERNELS]) if tuned is None and \
        KERNELS in pick.recipe else None
    if isinstance(ships, str):
        report.notes.append(f"the bundle runs onnxruntime's own kernels: edgesmith's, which "
                            f"{pick.id} was measured on, no longer build ({ships})")
    elif ships is not None:         # not tuned: ships as it was measured
        model, files, pick.config, _ = ships
        report.notes.append("the bundle runs edgesmith's own kernels, as they were measured; "
                            f"{report.model_file} stays the portable model")
    elif tuned is not None and KERNELS in pick.recipe and not pick.config.get(
            "custom_op_libraries"):
        report.notes.append(f"{pick.id} was chosen on edgesmith's kernels, but tuning measured "
                            "onnxruntime's own kernels at least as fast: the bundle runs those")
    if tuned is not None and (libraries := pick.config.get("custom_op_libraries")):
        tuned_dir = Path(tuned.bundle)
        model = from_proto(onnx.load(str(tuned_dir / "model.onnx")), model)
        files = {name: (tuned_dir / name).read_bytes() for name in libraries}
        report.notes.append("the bundle runs edgesmith's own kernels (the tuning measured them "
                            f"faster); {report.model_file} stays the portable model")
    final = bundles.build(model, config=pick.config, eval_data=ctx.judge,
                          eval_batch=eval_batch(model), extra_files=files,
                          meta={"candidate": pick.id, "edgesmith": __version__,
                                "accept": acceptance(ctx, pick, tuned)})
    copy_dir_atomic(final.path, ctx.run.out / "bundle", force=True)   # ownership checked at start
    write_model(ctx.run.out, ctx.run.state.model_path(pick.model_sha256))
    rem = report.remeasure
    trials = 3 if pick.config else 2
    rounds = _rounds_that_fit(ctx, trials, keep_s=_measurement_s(ctx))
    if ctx.run.fits("measure") is None:
        ctx.run.say("profiling the chosen model's ops")
        prof = measure(ctx.run.device, final, Job(runs=20, warmup=3, evaluate=False,
                                                  profile_ops=True))
        report.op_profile_ms = prof.op_profile_ms or {}
    else:
        report.notes.append(f"the op profile was not taken: --budget "
                            f"({ctx.cfg.budget_s:.0f}s) had no time left for it")
    remeasure = report.chosen and (pick.config or not pick.confirm or "original" not in rem)
    cut = bool(remeasure) and rounds < 1
    if cut:
        report.notes.append(f"the shipped bundle was not re-measured against the original: "
                            f"--budget ({ctx.cfg.budget_s:.0f}s) had no time left for it")
    elif remeasure:
        ctx.run.say("re-measuring the shipped bundle against the original"
                    + (" and its model at the runtime defaults" if pick.config else ""))
        trials = {ORIGINAL: (bundles.build(ctx.original), _timing_job(ctx)),
                  SHIPPED: (final, _timing_job(ctx))}
        if pick.config:     # model.onnx alone, as a user's own runtime would run it
            trials[AT_DEFAULTS] = (bundles.build(ctx.run.state.load_model(pick, ctx.original)),
                                   _timing_job(ctx))
        spreads = _until_pinned(ctx, trials, ctx.run.confirm(trials, rounds))
        if len(spreads) == len(trials):  # the selection rounds stay in pick.confirm
            if "original" in rem:
                rem["selection_original"] = rem["original"]
            rem.update(original=asdict(spreads[ORIGINAL]), chosen=asdict(spreads[SHIPPED]))
            if AT_DEFAULTS in spreads:
                rem["model_at_defaults"] = asdict(spreads[AT_DEFAULTS])
    if report.chosen and pick.confirm and "chosen" not in rem and not pick.config:
        rem["chosen"] = pick.confirm     # the selection's rounds were of what ships
    if report.chosen and "chosen" in rem and "original" in rem:
        o, c = Spread(**rem["original"]), Spread(**rem["chosen"])
        m = Spread(**rem.get("model_at_defaults", rem["chosen"]))
        speed, model = paired_ratios(o, c), paired_ratios(o, m)
        # faster when the rounds' ranges part, or, paired over 6 rounds or more, when every
        # round says so (by chance 2 x 0.5^6 = 3 %; over 3 rounds 25 %, so ranges decide)
        agree = len(speed) >= 6 and (min(speed) > 1.0 or max(speed) < 1.0)
        noise = o.overlaps(c) and not agree
        rem.update(speedup=statistics.median(speed), within_noise=noise,
                   speedup_range=[min(speed), max(speed)], model_gain=statistics.median(model),
                   model_gain_range=[min(model), max(model)])
        rem["config_gain"] = rem["speedup"] / rem["model_gain"]
        if busy := busy_note([o, c, m]):
            report.notes.append(busy)
    elif report.chosen and not cut:
        report.notes.append("re-measurement against the original failed on the device")
    report.summary = _summary(report, pick)
    if not report.chosen:
        _save_tradeoffs(ctx)


def _until_pinned(ctx: Context, trials: dict, spreads: dict) -> dict:
    """More interleaved rounds, three at a time, while the model's gain over the original is
    not pinned (the middle half of its per-round ratios within +-5 % of their median): a
    noisy device gets more rounds, up to MAX_GAIN_ROUNDS and what --budget leaves."""
    model = AT_DEFAULTS if AT_DEFAULTS in trials else SHIPPED
    while len(spreads) == len(trials) and spreads[ORIGINAL].rounds < MAX_GAIN_ROUNDS and \
            not pinned(paired_ratios(spreads[ORIGINAL], spreads[model])):
        more = min(3, MAX_GAIN_ROUNDS - spreads[ORIGINAL].rounds,
                   _rounds_that_fit(ctx, len(trials)))
        extra = ctx.run.confirm(trials, more) if more > 0 else {}
        if len(extra) != len(trials):
            break
        spreads = {name: spreads[name].then(extra[name]) for name in spreads}
    return spreads


def acceptance(ctx: Context, pick: Candidate, tuned) -> dict:
    """What `edgesmith deploy` checks the bundle against on a device: the budget it was chosen
    under (with the float model's accuracy on the same samples), the latency it measured here
    (with its runtime config) and on which CPU, and the calibration inputs' statistics."""
    shipped = tuned.best if tuned is not None and tuned.best.ok else pick
    base = ctx.baseline()
    accept = {"latency_ms": shipped.latency_ms, "cpu": ctx.run.facts.get("cpu")}
    if ctx.judge is not None and base is not None:
        accept.update(max_accuracy_drop=ctx.cfg.max_accuracy_drop, baseline=base.accuracy,
                      class_scores=ctx.original.facts.class_scores)
    if ctx.quant is not None:
        accept["input_stats"] = input_stats(ctx.quant.batches)
    return accept


def _tune(ctx: Context, model: Model, pick: str, notes: list[str]):
    """The runtime config (edgesmith's kernels included) of the chosen model, searched on the
    device; None when tuning is off or could not run (the reason goes to `notes`)."""
    if ctx.cfg.tune_budget_s <= 0:
        return None
    from ..search.tune import tune
    c = _measurement_s(ctx)
    after = (1 + 3 * ctx.cfg.confirm_rounds) * c + REPORT_S   # op profile, re-measurement
    budget = min(ctx.cfg.tune_budget_s, ctx.run.remaining_s() - after - TUNE_MEASUREMENTS * c)
    if budget < 3 * c:
        notes.append(f"tuning skipped: --budget ({ctx.cfg.budget_s:.0f}s) had "
                     f"{max(0, ctx.run.remaining_s()):.0f} s left, tuning needs about "
                     f"{(3 + TUNE_MEASUREMENTS) * c + after:.0f} s")
        return None
    ctx.run.say(f"tuning the runtime config of {pick}")
    try:
        tuned = tune(model, ctx.run, budget_s=budget, max_trials=12, confirm_rounds=2,
                     measure_settings={"wait_idle_s": ctx.job.wait_idle_s})
    except EdgesmithError as exc:
        notes.append(f"tuning skipped: {exc}")
        return None
    ctx.run.say(f"tuning: {tuned.verdict}")
    return tuned


def tuning_summary(tuned) -> dict:
    """What the reports keep of a config search: every variant's figure or error, what was not
    tried and why (edgesmith's kernels included), what was kept, and the per-block table."""
    base = tuned.default.p50_ms
    return {"kept": tuned.best.id, "verdict": tuned.verdict,
            "trials": [{"variant": t.id, "p50_ms": t.p50_ms if t.ok else None,
                        "vs_default": base / t.p50_ms if t.ok and base and t.p50_ms else None,
                        "error": None if t.ok else f"{t.stage}: {t.error}"}
                       for t in tuned.trials],
            "not_tried": [{"variant": f"{p['knob']}={p['value']}", "reason": p["reason"]}
                          for p in tuned.pruned],
            "kernels": tuned.kernels}


def _summary(report: OptimizeReport, pick: Candidate) -> str:
    if not report.chosen:
        return (f"no candidate met the budget (accuracy drop <= "
                f"{report.config['max_accuracy_drop']}"
                + (f", p50 <= {report.config['latency_budget_ms']} ms"
                   if report.config["latency_budget_ms"] else "") +
                f"); saved the most accurate trade-off ({pick.id}) and the Pareto front")
    from ..report.text import judged_drop

    text = f"chose {pick.id}: accuracy drop {judged_drop(pick)}"
    rem = report.remeasure
    if "speedup" in rem:
        o, c = Spread(**rem["original"]), Spread(**rem["chosen"])
        d = ms_digits(c.low_ms, o.low_ms)
        text += (f", {c.median_ms:.{d}f} ms vs the original's {o.median_ms:.{d}f} ms "
                 f"(median of {c.rounds} interleaved rounds; chosen {c.low_ms:.{d}f}-"
                 f"{c.high_ms:.{d}f}, original {o.low_ms:.{d}f}-{o.high_ms:.{d}f}): ")
        text += ("within noise, not a measurable speedup" if rem["within_noise"]
                 else f"{rem['speedup']:.2f}x " + ("faster" if rem["speedup"] > 1 else "slower"))
        if not rem["within_noise"] and "speedup_range" in rem:
            text += " (the median of the rounds' ratios, {:.2f}-{:.2f}x)".format(
                *rem["speedup_range"])
        if not rem["within_noise"]:      # a speedup was claimed: which part needs the bundle
            text += (f" = the model {rem['model_gain']:.2f}x ({report.model_file} alone, both "
                     f"at the runtime defaults) x the runtime config {rem['config_gain']:.2f}x "
                     "(the bundle's)")
    if "speedup" in rem and busy_note([Spread(**rem[k]) for k in ("original", "chosen")]):
        text += " (the device was busy: see the notes)"
    ties = within_noise_of(pick, [c for c in report.candidates if c.within_budget])
    if ties:
        text += (f"; {', '.join(c.id for c in ties)} within noise of it (a tie goes to the more "
                 "accurate, then the smaller, then the simpler)")
    return text


def _save_tradeoffs(ctx: Context) -> None:
    trade = ctx.run.out / "tradeoffs"
    trade.mkdir(exist_ok=True)
    for c in ctx.cands:
        if c.pareto and c.model_sha256 and KERNELS not in c.recipe:   # those: their parent's
            stored = ctx.run.state.model_path(c.model_sha256)
            atomic_write(trade / f"{re.sub(r'[^A-Za-z0-9.-]+', '_', c.id)}{stored.suffix}",
                         stored.read_bytes())
