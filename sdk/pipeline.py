"""`optimize`: model in, the fastest variant within the accuracy budget on the device out.

Candidates are measured cheapest first (fp32 fused, int8 recipes, pruned+distilled, pruned+int8),
each as a bundle run by the device runtime; a failing candidate is an error row. Measured
candidates are appended to OUTDIR/.state (with their models), so a re-run resumes, and the best
so far is written after every candidate: an interrupted or budget-stopped run still leaves a
deployable answer. The winner gets its runtime config from the tuner and a per-op profile.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import onnx

from . import __version__
from . import bundle as bundles
from .data import eval_batch, load_eval_set, reference_outputs
from .devices import Job, get_device
from .errors import EdgesmithError, StageError
from .model import Model, atomic_write, from_proto, load
from .passes.fuse import fuse
from .targets import Match, get_profile, match

REPORT_SCHEMA = 1


@dataclass
class OptCandidate:
    id: str
    recipe: dict
    model_sha256: str = ""
    config: dict = field(default_factory=dict)
    p50_ms: float | None = None
    p90_ms: float | None = None
    peak_rss_mb: float | None = None
    accuracy: dict | None = None
    accuracy_drop: float | None = None
    size_bytes: int = 0
    params: int = 0
    macs: int = 0
    error: str | None = None
    within_budget: bool = False
    pareto: bool = False
    note: str = ""
    confirm_p50_ms: float | None = None    # median of interleaved re-measurements, if a contender

    @property
    def ok(self) -> bool:
        return self.error is None and self.p50_ms is not None


@dataclass
class OptimizeReport:
    schema: int
    edgesmith: str
    model: str
    device: str
    device_facts: dict
    target: str
    target_reasons: list[str]
    max_accuracy_drop: float
    latency_budget_ms: float | None
    candidates: list[OptCandidate]
    chosen: str | None
    outcome: str                       # "met" | "no candidate met the budget"
    summary: str
    notes: list[str] = field(default_factory=list)
    remeasure: dict = field(default_factory=dict)
    op_profile_ms: dict = field(default_factory=dict)
    tuned_config: dict = field(default_factory=dict)
    elapsed_s: float = 0.0
    resumed: int = 0


def _sha(proto: onnx.ModelProto) -> str:
    return hashlib.sha256(proto.SerializeToString()).hexdigest()


class _State:
    """OUTDIR/.state: measured candidates (JSON lines) and their models, for resuming."""

    def __init__(self, out_dir: Path):
        self.dir = out_dir / ".state"
        (self.dir / "models").mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "candidates.jsonl"
        self.done: dict[str, OptCandidate] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    c = OptCandidate(**json.loads(line))
                except (ValueError, TypeError):
                    continue   # a torn line from an interrupted run
                if not c.model_sha256 or self.model_path(c.model_sha256).is_file() or c.error:
                    self.done[c.id] = c

    def model_path(self, sha: str) -> Path:
        return self.dir / "models" / f"{sha}.onnx"

    def save(self, cand: OptCandidate, proto: onnx.ModelProto | None) -> None:
        if proto is not None and not self.model_path(cand.model_sha256).is_file():
            atomic_write(self.model_path(cand.model_sha256), proto.SerializeToString())
        with open(self.path, "a") as fh:
            fh.write(json.dumps(asdict(cand)) + "\n")
        self.done[cand.id] = cand

    def load_model(self, cand: OptCandidate) -> onnx.ModelProto:
        return onnx.load(str(self.model_path(cand.model_sha256)))


def pareto_front(cands: list[OptCandidate]) -> list[OptCandidate]:
    """Candidates no other candidate beats on both latency and accuracy drop."""
    ok = [c for c in cands if c.ok and c.accuracy_drop is not None]
    return [c for c in ok if not any(
        o is not c and o.p50_ms <= c.p50_ms and o.accuracy_drop <= c.accuracy_drop
        and (o.p50_ms < c.p50_ms or o.accuracy_drop < c.accuracy_drop) for o in ok)]


def optimize(model_path: str | os.PathLike, out_dir: str | os.PathLike, device="local",
             target: str | None = None, calib=None, eval_path=None, train=None,
             max_accuracy_drop: float = 0.01, latency_budget_ms: float | None = None,
             budget_s: float = 600.0, prune_ratios: tuple[float, ...] = (0.3, 0.5),
             distill_epochs: int = 10, tune_budget_s: float = 60.0, input_shapes=None,
             say=None) -> OptimizeReport:
    """The main job; see the module docstring. `say(text)` receives progress lines."""
    started = time.monotonic()
    say = say or (lambda text: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    original = load(model_path, input_shapes)
    if original.format != "onnx":
        raise EdgesmithError("optimize takes ONNX models; profile TFLite models with "
                             "`edgesmith profile`")
    dev = get_device(device) if isinstance(device, str) or device is None else device
    try:
        facts = dev.facts()
    except StageError as exc:
        raise EdgesmithError(str(exc)) from None
    chosen_target = Match(get_profile(target), ["chosen with --target"]) if target else match(facts)
    notes: list[str] = list(original.facts.notes)
    if chosen_target.generic:
        notes.append(chosen_target.reasons[0])
    if facts.get("emulated"):
        notes.append(f"{dev.name} is emulated ({facts.get('cpu')}): latencies, and the choice "
                     "made by them, are not meaningful; accuracy and deployment are")
    if calib is None and eval_path is not None:
        calib = eval_path
        notes.append("calibrated on the eval set (no --calib given): accuracy of int8 "
                     "candidates is slightly optimistic; pass --calib for an unbiased figure")
    state = _State(out)
    resumed = len(state.done)
    if resumed:
        say(f"resuming: {resumed} candidate(s) already measured in {out}")
    fused_proto, _ = fuse(original.proto)
    fused = from_proto(fused_proto, original, original.path)
    batch = eval_batch(original)
    data = None
    if eval_path is not None:
        data = load_eval_set(eval_path, original)
        data.refs = reference_outputs(original, data, batch)
    profile = chosen_target.profile
    job = replace(Job(**profile.measure_job_args()), evaluate=data is not None)
    cands: list[OptCandidate] = []
    baseline: list[OptCandidate] = []

    def over_budget() -> bool:
        return time.monotonic() - started > budget_s

    def measure(cid: str, recipe: dict, model: Model, note: str = "") -> OptCandidate:
        if cid in state.done:
            cand = state.done[cid]
            cands.append(cand)
            return cand
        say(f"measuring {cid} on {dev.name}")
        sha = _sha(model.proto)
        bundle = bundles.build(model, eval_data=data, eval_batch=batch, meta={"candidate": cid})
        try:
            result = dev.run(dev.push(bundle), job)
        except StageError as exc:
            from device_runtime.result import Result
            result = Result.failure(exc.stage, exc.message)
        lat = result.latency_ms or {}
        cand = OptCandidate(cid, recipe, sha, {}, lat.get("p50"), lat.get("p90"),
                            result.peak_rss_mb, result.accuracy, None, model.facts.size_bytes,
                            model.facts.params, model.facts.macs,
                            None if result.ok else f"{result.stage}: {result.error}", note=note)
        if baseline and cand.ok:
            cand.accuracy_drop = _drop(baseline[0].accuracy, cand.accuracy)
        elif not baseline:
            cand.accuracy_drop = 0.0 if cand.ok else None
        state.save(cand, model.proto if cand.ok else None)
        cands.append(cand)
        write_outputs()
        return cand

    def write_outputs() -> None:
        """Best so far, after every candidate: never a run that ends with nothing saved."""
        best_id = _choose(cands, max_accuracy_drop, latency_budget_ms) or _best_tradeoff(cands)
        best = next((c for c in cands if c.id == best_id), None)
        if best is not None and best.ok:
            atomic_write(out / "model.onnx", state.model_path(best.model_sha256).read_bytes())

    base = measure("fp32", {"fuse": True}, fused)
    if not base.ok:
        raise EdgesmithError(f"the model does not run on {dev.name}: {base.error}")
    baseline.append(base)
    int8_recipe = None
    if calib is None:
        notes.append("no calibration data (--calib or --eval): int8 candidates skipped")
    elif not over_budget():
        from .recipes import choose_recipe
        try:
            q_model, q_report = choose_recipe(fused, dev, calib, eval_path, max_accuracy_drop,
                                              job=replace(job, evaluate=True), on_step=say)
        except EdgesmithError as exc:
            notes.append(f"int8 recipe search failed: {exc}")
        else:
            for p in q_report.pruned:
                notes.append(f"int8 recipe {p['recipe']} not tried: {p['reason']}")
            if q_report.quantized:   # measured by the recipe search already: record it
                int8_recipe = q_report.chosen.recipe
                qc = q_report.chosen
                cid = f"int8:{int8_recipe}"
                if cid not in state.done:
                    cand = OptCandidate(cid, {"quantize": qc.settings}, _sha(q_model.proto), {},
                                        qc.p50_ms, None, None, qc.accuracy,
                                        _drop(base.accuracy, qc.accuracy),
                                        q_model.facts.size_bytes, q_model.facts.params,
                                        q_model.facts.macs)
                    state.save(cand, q_model.proto)
                cands.append(state.done[cid])
                write_outputs()
            else:
                notes.append(q_report.summary)
    if train is None:
        notes.append("no training data (--train): pruning + distillation candidates skipped")
    else:
        _pruned_candidates(original, fused, train, eval_path, prune_ratios, distill_epochs,
                           int8_recipe, calib, measure, over_budget, notes, say)
    if over_budget():
        notes.append(f"stopped by --budget ({budget_s:.0f}s) after {len(cands)} candidate(s)")
    chosen_id = _choose(cands, max_accuracy_drop, latency_budget_ms)
    chosen_id = _confirm_fastest(cands, chosen_id, state, original, dev, batch, say) or chosen_id
    report = OptimizeReport(REPORT_SCHEMA, __version__, str(model_path), dev.name, facts,
                            profile.name, chosen_target.reasons, max_accuracy_drop,
                            latency_budget_ms, cands, chosen_id,
                            "met" if chosen_id else "no candidate met the budget", "", notes,
                            resumed=resumed)
    _finish(report, state, original, fused, dev, out, data, batch, tune_budget_s, say)
    report.elapsed_s = time.monotonic() - started
    from .report_html import write_reports
    write_reports(report, out)
    return report


def _drop(base: dict | None, cand: dict | None) -> float | None:
    from .recipes import accuracy_drop
    return accuracy_drop(base, cand)


def _choose(cands: list[OptCandidate], max_drop: float, latency_ms: float | None) -> str | None:
    """Mark budget and Pareto flags; the fastest candidate within the budgets, or None."""
    front = {c.id for c in pareto_front(cands)}
    for c in cands:
        c.pareto = c.id in front
        c.within_budget = bool(c.ok and c.accuracy_drop is not None and
                               c.accuracy_drop <= max_drop and
                               (latency_ms is None or c.p50_ms <= latency_ms))
    ok = [c for c in cands if c.within_budget]
    return min(ok, key=lambda c: c.p50_ms).id if ok else None


def _best_tradeoff(cands: list[OptCandidate]) -> str | None:
    """When nothing meets the budget, model.onnx holds the most accurate Pareto candidate."""
    front = [c for c in cands if c.pareto]
    return min(front, key=lambda c: c.accuracy_drop).id if front else None


def _confirm_fastest(cands: list[OptCandidate], chosen_id: str | None, state: _State,
                     original: Model, dev, batch: int, say, contenders: int = 3,
                     rounds: int = 3) -> str | None:
    """One measurement per candidate is noise-prone on a busy device: re-measure the fastest
    in-budget candidates interleaved (rotating order) and choose by the median."""
    top = sorted((c for c in cands if c.within_budget), key=lambda c: c.p50_ms)[:contenders]
    if len(top) < 2 or chosen_id is None:
        return chosen_id
    say(f"re-measuring the {len(top)} fastest candidates interleaved")
    remote = {}
    for c in top:
        model = from_proto(state.load_model(c), original)
        remote[c.id] = dev.push(bundles.build(model, eval_data=None, eval_batch=batch))
    samples: dict[str, list[float]] = {c.id: [] for c in top}
    for i in range(rounds):
        for c in top[i % len(top):] + top[:i % len(top)]:
            r = dev.run(remote[c.id], Job(runs=50, warmup=5, min_time_s=0.5, evaluate=False))
            if r.ok:
                samples[c.id].append(r.latency_ms["p50"])
    for c in top:
        if samples[c.id]:
            c.confirm_p50_ms = sorted(samples[c.id])[len(samples[c.id]) // 2]
    confirmed = [c for c in top if c.confirm_p50_ms is not None]
    return min(confirmed, key=lambda c: c.confirm_p50_ms).id if confirmed else chosen_id


def _pruned_candidates(original, fused, train, eval_path, ratios, epochs, int8_recipe, calib,
                       measure, over_budget, notes, say) -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        notes.append("pruning + distillation skipped: needs the `train` extra (torch)")
        return
    from .data import load_eval_set, load_training_set
    from .passes.distill import DistillConfig, distill
    from .passes.prune import PruneConfig, prune_channels

    train_data = load_training_set(train, original)
    ev = load_eval_set(eval_path, original) if eval_path else None
    for ratio in ratios:
        if over_budget():
            return
        cid = f"prune{int(ratio * 100)}+distill"
        say(f"pruning {ratio:.0%} of channels and distilling ({epochs} epochs)")
        pruned, _ = prune_channels(fused.proto, PruneConfig(ratio=ratio))
        student, rep = distill(original.proto, pruned, train_data, DistillConfig(epochs=epochs),
                               ev)
        model = from_proto(student, original)
        measure(cid, {"prune": ratio, "distill": {"epochs": epochs}}, model,
                f"{rep.details[-1]}")
        if int8_recipe and not over_budget():
            from .recipes import quantize_with
            try:
                proto, _ = quantize_with(model, int8_recipe, calib)
            except EdgesmithError as exc:
                notes.append(f"{cid}+int8 failed: {exc}")
                continue
            measure(f"{cid}+int8:{int8_recipe}", {"prune": ratio, "distill": {"epochs": epochs},
                                                  "quantize": int8_recipe},
                    from_proto(proto, original))


def _finish(report: OptimizeReport, state: _State, original: Model, fused: Model, dev,
            out: Path, data, batch: int, tune_budget_s: float, say) -> None:
    """Tune the winner, profile its ops, re-measure it against the original, write the bundle."""
    pick = report.chosen or _best_tradeoff(report.candidates)
    if pick is None:
        report.summary = "no candidate ran on the device"
        return
    cand = next(c for c in report.candidates if c.id == pick)
    model = from_proto(state.load_model(cand), original)
    config: dict = {}
    if tune_budget_s > 0:
        from .tune import tune
        say(f"tuning the runtime config of {pick}")
        try:
            tuned = tune(model, dev, target=report.target, budget_s=tune_budget_s,
                         max_trials=12, confirm_rounds=2)
            config = tuned.best.config
        except EdgesmithError as exc:
            report.notes.append(f"tuning skipped: {exc}")
    report.tuned_config = config
    cand.config = config
    final = bundles.build(model, config=config, eval_data=data, eval_batch=batch,
                          meta={"candidate": pick, "edgesmith": __version__})
    from .report import copy_dir_atomic
    copy_dir_atomic(final.path, out / "bundle")
    atomic_write(out / "model.onnx", model.proto.SerializeToString())
    say("profiling ops and re-measuring against the original")
    orig_bundle = bundles.build(original, eval_data=None, eval_batch=batch)
    try:
        remote_final, remote_orig = dev.push(final), dev.push(orig_bundle)
        prof = dev.run(remote_final, Job(runs=20, warmup=3, evaluate=False, profile_ops=True))
        report.op_profile_ms = prof.op_profile_ms or {}
        rounds: dict[str, list[float]] = {"original": [], "chosen": []}
        order = [("original", remote_orig), ("chosen", remote_final)]
        for i in range(2):   # ABBA: neither side always runs first
            for name, remote in (order if i % 2 == 0 else order[::-1]):
                r = dev.run(remote, Job(runs=50, warmup=5, min_time_s=0.5, evaluate=False))
                if r.ok:
                    rounds[name].append(r.latency_ms["p50"])
        if rounds["original"] and rounds["chosen"]:
            o, c = min(rounds["original"]), min(rounds["chosen"])
            report.remeasure = {"original_p50_ms": o, "chosen_p50_ms": c, "speedup": o / c}
    except StageError as exc:
        report.notes.append(f"re-measurement failed: {exc}")
    speed = report.remeasure.get("speedup")
    if report.chosen:
        report.summary = (f"chose {pick}: {cand.p50_ms:.3f} ms p50, accuracy drop "
                          f"{cand.accuracy_drop:.4f}" + (f", {speed:.2f}x faster than the "
                                                         f"original on re-measurement"
                                                         if speed else ""))
        if speed is not None and speed < 1.0:
            report.notes.append("the chosen model was not faster than the original on "
                                "re-measurement: the device is noisy or nothing beat fp32")
    else:
        report.summary = (f"no candidate met the budget (accuracy drop <= "
                          f"{report.max_accuracy_drop}"
                          + (f", p50 <= {report.latency_budget_ms} ms"
                             if report.latency_budget_ms else "") +
                          f"); saved the most accurate trade-off ({pick}) and the Pareto front")
        trade = out / "tradeoffs"
        trade.mkdir(exist_ok=True)
        for c in report.candidates:
            if c.pareto and c.model_sha256:
                atomic_write(trade / f"{c.id.replace(':', '_').replace('+', '_')}.onnx",
                             state.model_path(c.model_sha256).read_bytes())
