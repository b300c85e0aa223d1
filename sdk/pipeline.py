"""`optimize`: model in, the fastest variant within the accuracy budget on the device out.

A context is built once per run (device and its facts, matched target, fused model, judging set
with reference outputs, calibration feeds); then the stages run in order: fp32 baseline, int8
recipe search, pruned + distilled students (+ int8), interleaved confirmation of the fastest
contenders, and the finish (tuning, per-op profile, bundle, reports). Every candidate is measured
through `measure.measure` and appended to OUT/.edgesmith-state with its model, under a run key: a re-run
of the same job resumes, a different job starts afresh. The best so far is written after every
candidate, so an interrupted or budget-stopped run still leaves a deployable answer.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import onnx

from . import __version__
from . import bundle as bundles
from .data import eval_batch
from .devices import Job, fingerprint, get_device
from .errors import EdgesmithError, StageError
from .measure import Candidate, Spread, interleave, measure
from .model import Model, atomic_write, from_proto, load
from .outputs import claim, copy_dir_atomic, is_ours
from .passes.fuse import fuse
from .recipes import QuantData, accuracy_drop, choose_recipe, quant_data
from .report import delegation_text
from .resume import State, sha256 as _sha, source_digest
from .selection import best_tradeoff, choose
from .targets import Match, get_profile, match

REPORT_SCHEMA = 2
ORIGINAL = "original (as given)"     # the user's model, unfused: what every speedup is against
BACKENDS = ("onnxruntime", "tflite")


@dataclass(frozen=True)
class OptimizeConfig:
    """What the user asked for: budgets and how much effort each stage may spend."""

    max_accuracy_drop: float = 0.01
    latency_budget_ms: float | None = None
    budget_s: float = 600.0                      # wall clock for the whole search
    prune_ratios: tuple[float, ...] = (0.3, 0.5)
    distill_epochs: int = 10
    tune_budget_s: float = 60.0                  # device time for tuning the winner (0: skip)
    target: str | None = None                    # a profile name; else matched from facts
    contenders: int = 3                          # fastest in-budget candidates re-measured
    confirm_rounds: int = 3
    backends: tuple[str, ...] = BACKENDS         # runtimes the answer may use

    def __post_init__(self):
        if not 0.0 <= self.max_accuracy_drop <= 1.0:
            raise ValueError(f"OptimizeConfig.max_accuracy_drop must be in [0, 1], got "
                             f"{self.max_accuracy_drop}")
        if self.latency_budget_ms is not None and self.latency_budget_ms <= 0:
            raise ValueError("OptimizeConfig.latency_budget_ms must be > 0")
        if any(not 0.0 < r < 1.0 for r in self.prune_ratios):
            raise ValueError(f"OptimizeConfig.prune_ratios must be in (0, 1), got "
                             f"{self.prune_ratios}")
        for name in ("budget_s", "tune_budget_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"OptimizeConfig.{name} must be >= 0")
        if self.distill_epochs < 1:
            raise ValueError("OptimizeConfig.distill_epochs must be >= 1")
        if not self.backends or not set(self.backends) <= set(BACKENDS):
            raise ValueError(f"OptimizeConfig.backends must be some of {BACKENDS}, got "
                             f"{self.backends}")


@dataclass
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
    remeasure: dict = field(default_factory=dict)   # original vs chosen, interleaved (Spreads)
    op_profile_ms: dict = field(default_factory=dict)
    tuned_config: dict = field(default_factory=dict)
    elapsed_s: float = 0.0
    resumed: int = 0


@dataclass
class Context:
    """Everything the stages share, built once per run."""

    cfg: OptimizeConfig
    out: Path
    original: Model
    fused: Model
    device: object
    facts: dict
    target: Match
    job: Job
    judge: object                  # EvalData with reference outputs, or None (nothing to judge)
    quant: QuantData | None
    train: str | None
    state: State
    say: object
    started: float
    notes: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    cands: list[Candidate] = field(default_factory=list)

    def over_budget(self) -> bool:
        return time.monotonic() - self.started > self.cfg.budget_s

    def baseline(self) -> Candidate | None:
        return next((c for c in self.cands if c.id == "fp32"), None)

    def record(self, cand: Candidate, model: Model | None) -> Candidate:
        """Keep a measured candidate (resumable), judge its drop, write the best so far."""
        base = self.baseline()
        if cand.ok and cand.accuracy_drop is None:
            cand.accuracy_drop = 0.0 if base is None else accuracy_drop(base.accuracy,
                                                                        cand.accuracy)
        self.state.save(cand, model if cand.ok else None)
        self.cands.append(cand)
        best = choose(self.cands, self.cfg) or best_tradeoff(self.cands)
        if best is not None:
            write_model(self.out, self.state.model_path(best.model_sha256))
        return cand

    def resumed(self, cid: str) -> Candidate | None:
        """The candidate an interrupted run of this job already measured (now counted)."""
        cand = self.state.done.get(cid)
        if cand is not None:
            self.cands.append(cand)
        return cand

    def measure(self, cid: str, recipe: dict, model: Model, note: str = "") -> Candidate:
        if (cand := self.resumed(cid)) is not None:
            return cand
        self.say(f"measuring {cid} on {self.device.name}")
        bundle = bundles.build(model, eval_data=self.judge, eval_batch=eval_batch(model),
                               meta={"candidate": cid})
        result = measure(self.device, bundle, self.job)
        cand = Candidate.from_result(cid, result, model, recipe=recipe, note=note,
                                     model_sha256=_sha(model.serialized()))
        if result.delegation and result.delegation["fallback"]:
            cand.note = "; ".join(filter(None, [cand.note, delegation_text(result.delegation)]))
        return self.record(cand, model)


def write_model(out: Path, stored: Path) -> None:
    """OUT/model.onnx or OUT/model.tflite: the best so far; the other format's file, ours from
    an earlier best of this run, goes (two answers would be one too many)."""
    atomic_write(out / f"model{stored.suffix}", stored.read_bytes())
    for other in {".onnx", ".tflite"} - {stored.suffix}:
        (out / f"model{other}").unlink(missing_ok=True)


def optimize(model_path: str | os.PathLike, out_dir: str | os.PathLike, device="local",
             calib=None, eval_path=None, train=None, cfg: OptimizeConfig | None = None,
             input_shapes: dict | None = None, force: bool = False, say=None) -> OptimizeReport:
    """The main job; see the module docstring. `say(text)` receives progress lines."""
    ctx = build_context(model_path, out_dir, device, calib, eval_path, train,
                        cfg or OptimizeConfig(), input_shapes, force, say)
    resumed = len(ctx.state.done)
    if resumed:
        ctx.say(f"resuming: {resumed} candidate(s) already measured in {ctx.out}")
    base = ctx.measure("fp32", {"fuse": True}, ctx.fused)
    if not base.ok:
        raise EdgesmithError(f"the model does not run on {ctx.device.name}: {base.error}")
    int8 = int8_stage(ctx)
    pruned_stage(ctx, int8)
    tflite_stage(ctx)
    if ctx.over_budget():
        ctx.notes.append(f"stopped by --budget ({ctx.cfg.budget_s:.0f}s) after "
                         f"{len(ctx.cands)} candidate(s)")
    remeasure: dict = {}
    chosen = confirm_stage(ctx, choose(ctx.cands, ctx.cfg), remeasure)
    report = OptimizeReport(REPORT_SCHEMA, __version__, str(model_path), ctx.device.name,
                            ctx.facts, ctx.target.profile.name, ctx.target.reasons,
                            asdict(ctx.cfg), ctx.cands, ctx.skipped,
                            chosen.id if chosen else None,
                            "met" if chosen else "no candidate met the budget", "", ctx.notes,
                            remeasure, resumed=resumed)
    finish_stage(ctx, report)
    report.elapsed_s = time.monotonic() - ctx.started
    from .report_html import write_reports
    write_reports(report, ctx.out)
    return report


def build_context(model_path, out_dir, device, calib, eval_path, train, cfg: OptimizeConfig,
                  input_shapes, force: bool, say) -> Context:
    """Load and fuse the model, reach the device, match its target, read the data once."""
    started = time.monotonic()
    original = load(model_path, input_shapes, data=eval_path or calib or train)
    if original.format != "onnx":
        raise EdgesmithError("optimize takes ONNX models; profile TFLite models with "
                             "`edgesmith profile`")
    dev = get_device(device) if isinstance(device, str) or device is None else device
    try:
        facts = dev.facts()
    except StageError as exc:
        raise EdgesmithError(str(exc)) from None
    target = Match(get_profile(cfg.target), ["chosen with --target"]) if cfg.target \
        else match(facts)
    notes = list(original.facts.notes)
    if target.generic:
        notes.append(target.reasons[0])
    if facts.get("emulated"):
        notes.append(f"{dev.name} is emulated ({facts.get('cpu')}): latencies, and the choice "
                     "made by them, are not meaningful; accuracy and deployment are")
    fused_proto, _ = fuse(original.proto)
    fused = from_proto(fused_proto, original, original.path)
    quant, judge = None, None
    if calib is None and train is not None:       # training samples are never judging samples
        calib = train
        notes.append("calibrated on the --train samples (no --calib given)")
    if calib is not None or eval_path is not None:
        # eval only: calibrate on part of it, judge on the rest (never on calibration samples)
        quant = quant_data(original, calib or eval_path, eval_path if calib else None)
        notes += quant.notes
        judge = quant.eval
    else:
        notes.append("no --eval or --calib: no candidate's accuracy can be judged, so only fp32 "
                     "can meet the accuracy budget")
    out = claim(out_dir, force)
    bundle_dir = out / "bundle"
    if bundle_dir.exists() and not force and not (bundle_dir.is_dir() and is_ours(bundle_dir)):
        raise EdgesmithError(f"{bundle_dir} exists and edgesmith did not write it; move it, "
                             "choose another -o, or pass --force (files are replaced by name)")
    run_key = {"model": _sha(original.serialized()), "inputs": [asdict(s) for s in
                                                                original.inputs],
               "calib": source_digest(calib), "eval": source_digest(eval_path),
               "train": source_digest(train), "device": fingerprint(facts),
               "config": asdict(cfg), "edgesmith": __version__}
    state = State(out, run_key)
    if state.discarded:
        notes.append(f"{out} held results of a different run (model, data, device, settings or "
                     "edgesmith version changed): started afresh")
    job = replace(Job(**target.profile.measure_job_args()), evaluate=judge is not None)
    return Context(cfg, out, original, fused, dev, facts, target, job, judge, quant,
                   train, state, say or (lambda text: None), started, notes)


def int8_stage(ctx: Context) -> dict | None:
    """The device's int8 recipes, measured against the fp32 baseline; every measured recipe
    becomes a candidate as it is measured. Returns the chosen recipe's settings (for the pruned
    students), or None when fp32 stayed best. A finished search is not re-run on resume."""
    marker = ctx.state.dir / "int8.json"
    if ctx.quant is None:
        ctx.notes.append("no calibration data (--calib or --eval): int8 candidates skipped")
        return None
    try:
        done = json.loads(marker.read_text()) if marker.is_file() else None
        assert done is None or {"recipe", "skipped", "notes"} <= set(done)
    except (OSError, ValueError, AssertionError):
        done = None        # unreadable: the search runs again
    if done is not None:
        ctx.cands += [c for c in ctx.state.done.values() if c.id.startswith("int8:")]
        ctx.skipped += done["skipped"]
        ctx.notes += done["notes"]
        return done["recipe"]
    if ctx.over_budget():
        return None

    def keep(cand: Candidate, proto: onnx.ModelProto | None) -> None:
        cand = replace(cand, id=f"int8:{cand.id}", recipe={"quantize": cand.recipe})
        if proto is not None and cand.ok:
            cand.model_sha256 = _sha(proto.SerializeToString())
        ctx.cands[:] = [c for c in ctx.cands if c.id != cand.id]
        ctx.record(cand, None if proto is None else from_proto(proto, ctx.original))

    try:
        _, q_report = choose_recipe(ctx.fused, ctx.device, ctx.quant, ctx.cfg.max_accuracy_drop,
                                    ctx.job, baseline=replace(ctx.baseline()), on_step=ctx.say,
                                    on_candidate=keep, confirm_rounds=0)
    except EdgesmithError as exc:
        ctx.notes.append(f"int8 recipe search failed: {exc}")
        return None
    skipped = [{"id": f"int8:{p['recipe']}", "reason": p["reason"]} for p in q_report.pruned]
    notes = [n for n in q_report.notes if n not in ctx.notes]
    if not q_report.quantized:
        notes.append(q_report.summary)
    recipe = q_report.chosen.recipe if q_report.quantized else None
    atomic_write(marker, json.dumps({"recipe": recipe, "skipped": skipped,
                                     "notes": notes}).encode())
    ctx.skipped += skipped
    ctx.notes += notes
    return recipe


def pruned_stage(ctx: Context, int8_recipe: dict | None) -> None:
    """Structured pruning at each ratio, distilled from the original (+ the chosen int8)."""
    if ctx.train is None:
        ctx.notes.append("no training data (--train): pruning + distillation candidates skipped")
        return
    try:
        import torch  # noqa: F401
    except ImportError:
        ctx.notes.append("pruning + distillation skipped: needs the `train` extra "
                         "(pip install torch==2.13.0 'edgesmith[train]')")
        return
    from .data import load_training_set
    from .passes.distill import DistillConfig, distill, soft_targets
    from .passes.prune import PruneConfig, prune_channels
    from .passes.quantize import QuantRecipe
    from .recipes import quantize_with

    data = load_training_set(ctx.train, ctx.original)
    try:
        targets = soft_targets(ctx.original.proto, data)     # one teacher: computed once
    except EdgesmithError as exc:
        ctx.notes.append(f"pruning + distillation skipped: {exc}")
        return
    epochs = ctx.cfg.distill_epochs
    for ratio in ctx.cfg.prune_ratios:
        if ctx.over_budget():
            return
        cid = f"prune{int(ratio * 100)}+distill"
        ctx.say(f"pruning {ratio:.0%} of channels and distilling ({epochs} epochs)")
        pruned, _ = prune_channels(ctx.fused.proto, PruneConfig(
            ratio=ratio, input_shapes=ctx.original.input_shapes,
            round_to=ctx.target.profile.channel_multiple))
        try:
            student, rep = distill(pruned, DistillConfig(ctx.original.proto, data, ctx.judge,
                                                         targets, epochs=epochs))
        except EdgesmithError as exc:      # one failed student is a note, not a failed run
            ctx.notes.append(f"{cid} skipped: {exc}")
            continue
        model = from_proto(student, ctx.original)
        ctx.measure(cid, {"prune": ratio, "distill": {"epochs": epochs}}, model,
                    rep.details[-1])
        if int8_recipe and ctx.quant is not None and not ctx.over_budget():
            recipe = QuantRecipe(**{**int8_recipe, "exclude": ()})   # node names changed
            try:
                proto, _ = quantize_with(model, recipe, ctx.quant.batches)
            except EdgesmithError as exc:
                ctx.notes.append(f"{cid}+int8 failed: {exc}")
                continue
            ctx.measure(f"{cid}+int8:{recipe.name}", {"prune": ratio, "distill":
                                                      {"epochs": epochs}, "quantize": recipe.name},
                        from_proto(proto, ctx.original))


def tflite_stage(ctx: Context) -> None:
    """The fp32 model and the most accurate in-budget int8 one, converted to TFLite and measured
    under LiteRT (XNNPACK) beside the onnxruntime candidates: on ARM boards LiteRT is often the
    faster CPU path, and only the device's measurement can say."""
    if "tflite" not in ctx.cfg.backends:
        ctx.skipped.append({"id": "tflite:*", "reason": "not asked for (--backends)"})
        return
    packages = ctx.facts.get("packages") or {}
    if not any(packages.get(d) for d in ("ai-edge-litert", "tflite-runtime")):
        ctx.skipped.append({"id": "tflite:*", "reason": f"{ctx.device.name} has no TFLite "
                            "runtime (`pip install ai-edge-litert` there)"})
        return
    if "tflite" not in ctx.target.profile.backends:
        ctx.skipped.append({"id": "tflite:*", "reason": f"target {ctx.target.profile.name} "
                            "does not list the tflite backend"})
        return
    from .tflite_convert import as_model, available, to_tflite

    if (why := available()) is not None:
        ctx.skipped.append({"id": "tflite:*", "reason": why})
        return
    budget = ctx.cfg.max_accuracy_drop
    int8 = sorted((c for c in ctx.cands if c.id.startswith("int8:") and c.ok
                   and c.accuracy_drop is not None and c.accuracy_drop <= budget),
                  key=lambda c: (c.accuracy_drop, c.p50_ms))
    sources = [("tflite:fp32", "fp32", ctx.fused)]
    if int8:
        sources.append((f"tflite:{int8[0].id}", int8[0].id, ctx.state.load_model(int8[0],
                                                                                ctx.original)))
    elif ctx.quant is not None:
        ctx.skipped.append({"id": "tflite:int8", "reason": "no int8 recipe kept the accuracy "
                            "budget on onnxruntime, so none is converted"})
    sample = _conversion_sample(ctx)
    for cid, source_id, source in sources:
        if ctx.over_budget() or ctx.resumed(cid) is not None:
            continue
        ctx.say(f"converting {source_id} to TFLite")
        try:
            data, rep = to_tflite(source.proto, sample)
        except EdgesmithError as exc:
            ctx.skipped.append({"id": cid, "reason": str(exc)})
            continue
        note = (f"converted from {source_id} in {rep.seconds:.0f} s; on the host it computes "
                f"{rep.fidelity.get('sqnr_db', 0):.0f} dB SQNR against onnxruntime")
        ctx.measure(cid, {"convert": "tflite", "from": source_id}, as_model(data, source), note)


def _conversion_sample(ctx: Context) -> dict:
    """One sample (batch 1) of real inputs: the judging set's, else calibration's, else
    random values at the model's shapes."""
    import numpy as np

    if ctx.judge is not None:
        return {k: v[:1] for k, v in ctx.judge.inputs.items()}
    rng = np.random.default_rng(0)
    return {s.name: rng.standard_normal([1] + s.shape[1:]).astype(s.dtype)
            for s in ctx.original.inputs}


def _timing_job() -> Job:
    return Job(runs=50, warmup=5, min_time_s=0.5, evaluate=False)


def confirm_stage(ctx: Context, chosen: Candidate | None, report_remeasure: dict
                  ) -> Candidate | None:
    """Single measurements flip on a busy device: re-measure the original and the fastest
    in-budget candidates interleaved, in the same rounds, and choose by the median. Every
    speedup the reports print comes from these rounds (one basis, with its spread)."""
    top = sorted((c for c in ctx.cands if c.within_budget), key=lambda c: c.p50_ms)
    top = top[:ctx.cfg.contenders]
    if not top or chosen is None:
        return chosen
    ctx.say(f"re-measuring the original and the {len(top)} fastest candidate(s) interleaved")
    trials = {c.id: (bundles.build(ctx.state.load_model(c, ctx.original)), _timing_job())
              for c in top}
    trials[ORIGINAL] = (bundles.build(ctx.original), _timing_job())
    spreads = interleave(ctx.device, trials, ctx.cfg.confirm_rounds)
    for c in top:
        if c.id in spreads:
            c.confirm = asdict(spreads[c.id])
    if ORIGINAL in spreads:
        report_remeasure["original"] = asdict(spreads[ORIGINAL])
    return choose(ctx.cands, ctx.cfg) or chosen


def finish_stage(ctx: Context, report: OptimizeReport) -> None:
    """Tune the winner, write its bundle, profile its ops; a tuned config is re-measured
    against the original (interleaved) so the summary speaks of what ships."""
    pick = next((c for c in ctx.cands if c.id == report.chosen), None) or \
        best_tradeoff(ctx.cands)
    if pick is None:
        report.summary = "no candidate ran on the device"
        return
    model = ctx.state.load_model(pick, ctx.original)
    report.tuned_config = pick.config = _tuned_config(ctx, model, pick.id)
    final = bundles.build(model, config=pick.config, eval_data=ctx.judge,
                          eval_batch=eval_batch(model),
                          meta={"candidate": pick.id, "edgesmith": __version__})
    copy_dir_atomic(final.path, ctx.out / "bundle", force=True)   # ownership checked at start
    write_model(ctx.out, ctx.state.model_path(pick.model_sha256))
    ctx.say("profiling the chosen model's ops")
    prof = measure(ctx.device, final, Job(runs=20, warmup=3, evaluate=False, profile_ops=True))
    report.op_profile_ms = prof.op_profile_ms or {}
    rem = report.remeasure
    if report.chosen and (pick.config or not pick.confirm or "original" not in rem):
        ctx.say("re-measuring the shipped bundle against the original")
        spreads = interleave(ctx.device, {
            ORIGINAL: (bundles.build(ctx.original), _timing_job()),
            pick.id: (final, _timing_job())}, ctx.cfg.confirm_rounds)
        if len(spreads) == 2:   # the selection rounds stay in pick.confirm; these are what ships
            if "original" in rem:
                rem["selection_original"] = rem["original"]
            rem.update(original=asdict(spreads[ORIGINAL]), chosen=asdict(spreads[pick.id]))
    elif report.chosen and pick.confirm:
        rem["chosen"] = pick.confirm
    if report.chosen and "chosen" in rem and "original" in rem:
        o, c = Spread(**rem["original"]), Spread(**rem["chosen"])
        rem.update(speedup=o.median_ms / c.median_ms, within_noise=o.overlaps(c))
    elif report.chosen:
        report.notes.append("re-measurement against the original failed on the device")
    report.summary = _summary(report, pick)
    if not report.chosen:
        _save_tradeoffs(ctx)


def _tuned_config(ctx: Context, model: Model, pick: str) -> dict:
    if ctx.cfg.tune_budget_s <= 0:
        return {}
    from .tune import tune
    ctx.say(f"tuning the runtime config of {pick}")
    try:
        tuned = tune(model, ctx.device, target=ctx.target, budget_s=ctx.cfg.tune_budget_s,
                     max_trials=12, confirm_rounds=2)
    except EdgesmithError as exc:
        ctx.notes.append(f"tuning skipped: {exc}")
        return {}
    return tuned.best.config


def _summary(report: OptimizeReport, pick: Candidate) -> str:
    if not report.chosen:
        return (f"no candidate met the budget (accuracy drop <= "
                f"{report.config['max_accuracy_drop']}"
                + (f", p50 <= {report.config['latency_budget_ms']} ms"
                   if report.config["latency_budget_ms"] else "") +
                f"); saved the most accurate trade-off ({pick.id}) and the Pareto front")
    text = f"chose {pick.id}: accuracy drop {pick.accuracy_drop:.4f}"
    rem = report.remeasure
    if "speedup" in rem:
        o, c = Spread(**rem["original"]), Spread(**rem["chosen"])
        text += (f", {c.median_ms:.3f} ms vs the original's {o.median_ms:.3f} ms "
                 f"(median of {c.rounds} interleaved rounds; chosen {c.low_ms:.3f}-"
                 f"{c.high_ms:.3f}, original {o.low_ms:.3f}-{o.high_ms:.3f}): ")
        text += ("within noise, not a measurable speedup" if rem["within_noise"]
                 else f"{rem['speedup']:.2f}x " + ("faster" if rem["speedup"] > 1 else "slower"))
    return text


def _save_tradeoffs(ctx: Context) -> None:
    trade = ctx.out / "tradeoffs"
    trade.mkdir(exist_ok=True)
    for c in ctx.cands:
        if c.pareto and c.model_sha256:
            stored = ctx.state.model_path(c.model_sha256)
            atomic_write(trade / f"{c.id.replace(':', '_').replace('+', '_')}{stored.suffix}",
                         stored.read_bytes())
