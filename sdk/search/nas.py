"""NetAdapt (Yang et al., ECCV 2018): width search under a latency budget measured on the device.

From the trained model, each iteration asks for a measured latency cut (r0 * original *
decay^(i-1)); for every prunable channel group it proposes the widest width whose predicted
latency meets that cut, fine-tunes each proposal briefly by distillation from the original (in
parallel worker processes), and keeps the proposal most accurate on a search-holdout split. The
kept model is measured whole on the device every iteration: that measurement rescales the
per-kernel latency table (`latency_table`) for the report and says how far its prediction was
off, and it decides when the budget is met. Widths are chosen on the table calibrated once, on
the original's measurement, so they do not move with a fresh measurement's noise. A final,
longer distillation finishes the search; a uniform-width model at the same measured latency with
the same training is the baseline it must beat. Every iteration is kept in OUT's state, so an
interrupted search continues from its last completed iteration; OUT/model.onnx is always the
most adapted model so far. `proxy="macs"` replaces the table by multiply-accumulates: the
FLOPs-driven NetAdapt that measured latency is meant to improve on.
"""
from __future__ import annotations

import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from device_runtime.evaluate import EvalData

from .. import __version__
from .. import bundle as bundles
from ..devices import Job
from ..errors import EdgesmithError
from ..measure import Candidate, measure
from ..model import Model, from_proto, load
from ..report.nas import BUDGET_SLACK, Iteration, NasReport, write_nas_reports
from ..run import Run
from ..run.outputs import write_model
from ..run.state import State, sha256
from .latency_table import LatencyTable, kernels_of

PROXIES = ("latency", "macs")
MEASURE_ROUNDS = 3


@dataclass(frozen=True)
class NasConfig:
    """What the search aims at and how much it may spend. Give `latency_ratio` (of the
    original's measured latency) or `latency_ms`."""

    latency_ratio: float | None = 0.6
    latency_ms: float | None = None
    initial_reduction: float = 0.05   # r0: the first iteration's cut, a share of the original
    decay: float = 0.96               # each later iteration cuts r0 * decay^(i-1)
    steps: int = 200                  # fine-tuning steps per proposal (short distillation)
    final_epochs: int = 20            # the last, longer distillation of the kept model
    batch_size: int = 64
    holdout: float = 0.2              # share of --train kept out to choose between proposals
    shift: int = 0                    # augmentation: random translations of up to N pixels
    proxy: str = "latency"            # latency (table on the device) | macs (FLOPs-driven)
    max_iterations: int = 40
    min_channels: int = 4             # no group narrows below this
    round_to: int = 4                 # widths step by this in groups of 2x it or more
    uniform_baseline: bool = True
    workers: int = 0                  # parallel fine-tunes (0: one per two cores)
    threads: int | None = None        # threads the model runs with on the device
    host_device: str = "auto"         # where fine-tunes train: auto | cpu | cuda[:N]
    budget_s: float = 3600.0
    seed: int = 0

    def __post_init__(self):
        if (self.latency_ratio is None) == (self.latency_ms is None):
            raise ValueError("NasConfig needs exactly one of latency_ratio and latency_ms")
        if self.latency_ratio is not None and not 0.0 < self.latency_ratio < 1.0:
            raise ValueError("NasConfig.latency_ratio must be in (0, 1), e.g. 0.6 for 0.6x")
        if self.latency_ms is not None and self.latency_ms <= 0:
            raise ValueError("NasConfig.latency_ms must be > 0")
        if not 0.0 < self.initial_reduction < 1.0 or not 0.0 < self.decay <= 1.0:
            raise ValueError("NasConfig.initial_reduction must be in (0, 1), decay in (0, 1]")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError("NasConfig.holdout must be in (0, 1)")
        if self.proxy not in PROXIES:
            raise ValueError(f"NasConfig.proxy must be one of {PROXIES}")
        if self.host_device not in ("auto", "cpu") and not self.host_device.startswith("cuda"):
            raise ValueError(f"NasConfig.host_device must be auto, cpu or cuda[:N], got "
                             f"{self.host_device!r}")
        for name in ("steps", "final_epochs", "batch_size", "max_iterations", "min_channels",
                     "round_to"):
            if getattr(self, name) < 1:
                raise ValueError(f"NasConfig.{name} must be >= 1")


def parse_latency_budget(text: str) -> dict:
    """`0.6x` -> {"latency_ratio": 0.6}; `12ms` -> {"latency_ms": 12.0}. A bare number is
    refused: 0.6 could mean either."""
    t = text.strip().lower()
    number = t[:-1] if t.endswith("x") else t[:-2] if t.endswith("ms") else None
    try:
        value = float(number)
    except (TypeError, ValueError):
        raise ValueError(f"latency budget {text!r}: give a share of the original's latency "
                         "(0.6x) or milliseconds (12ms)") from None
    if t.endswith("x"):
        if not 0.0 < value < 1.0:
            raise ValueError(f"latency budget {text!r}: a share of the original's latency is "
                             "between 0x and 1x, e.g. 0.6x")
        return {"latency_ratio": value, "latency_ms": None}
    if value <= 0:
        raise ValueError(f"latency budget {text!r}: milliseconds must be more than 0")
    return {"latency_ratio": None, "latency_ms": value}


@dataclass(kw_only=True)
class _Search:
    """One NetAdapt search: its run (device, budget clock, state under OUT) and what it adds."""
    cfg: NasConfig
    run: Run
    original: Model
    fused: Model
    fused_kernels: list               # the original's kernels: the table's calibration
    job: Job
    table: LatencyTable | None
    train: EvalData
    holdout: EvalData
    test: EvalData | None
    targets: object                   # the teacher's soft targets on `train`
    pool: object = None               # the fine-tuning worker processes, started once

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.train.n / min(self.cfg.batch_size, self.train.n))

    def cost(self, proto: onnx.ModelProto) -> float:
        """The proxy's cost of a model: table milliseconds, or multiply-accumulates."""
        return self.kernels_cost(kernels_of(proto, self.original.input_shapes))

    def kernels_cost(self, kernels: list) -> float:
        if self.table is None:
            return float(sum(k.macs for k in kernels))
        return self.table.predict(kernels)

    def measure(self, cid: str, model: Model) -> Candidate:
        """The whole model on the device: the median p50 of MEASURE_ROUNDS measurements (a
        shared device's noise bursts move a single one by 10 %). The caller saves it with
        what it completes."""
        bundle = bundles.build(model, meta={"nas": cid})
        spread = self.run.confirm({cid: (bundle, self.job)}, MEASURE_ROUNDS).get(cid)
        if spread is None:        # no round ran: one more run says why
            result = measure(self.run.device, bundle, self.job)
            raise EdgesmithError(f"{cid} did not run on {self.run.device.name}: "
                                 f"{result.error or 'no latency measured'}")
        return Candidate(id=cid, p50_ms=spread.median_ms, confirm=asdict(spread),
                         size_bytes=model.facts.size_bytes, params=model.facts.params,
                         macs=model.facts.macs, model_sha256=sha256(model.serialized()))

    def kept(self, cid: str, what: str) -> dict | None:
        """What an interrupted run of this search already completed under `cid`."""
        cand = self.run.resumed(cid)
        if cand is None or not cand.ok or what not in cand.recipe:
            return None
        return cand.recipe[what]

    def save(self, cand: Candidate, model: Model, what: str, value: dict) -> None:
        cand.recipe = {what: value}
        self.run.state.save(cand, model)


def nas(model_path, train, out_dir, device="local", cfg: NasConfig | None = None,
        eval_path=None, input_shapes: dict | None = None, force: bool = False,
        say=None, holdout=None) -> NasReport:
    """Search MODEL's layer widths for the latency budget on `device`; see the module doc."""
    from ..passes.distill import host_device, require_torch

    cfg = cfg or NasConfig()
    host_device(cfg.host_device, require_torch())      # a GPU asked for and missing: say so now
    search = _start(model_path, train, out_dir, device, cfg, eval_path, input_shapes, force, say,
                 holdout)
    try:
        return _search(search, cfg, model_path)
    finally:
        if search.pool is not None:      # Ctrl-C included: queued fine-tunes are dropped
            search.pool.shutdown(wait=True, cancel_futures=True)


def _search(search: _Search, cfg: NasConfig, model_path) -> NasReport:
    from ..passes.distill import evaluate

    if (base := search.run.state.done.get("nas:0")) is None or not base.ok:
        base = search.measure("nas:0", search.fused)
        search.save(base, search.fused, "original", {})
    target_ms = cfg.latency_ms or base.p50_ms * cfg.latency_ratio
    report = NasReport(edgesmith=__version__, model=str(model_path),
                       device=search.run.device.name,
                       device_fingerprint=search.run.fingerprint, proxy=cfg.proxy,
                       config=asdict(cfg), target_ms=target_ms, original_ms=base.p50_ms,
                       original_test_top1=evaluate(search.fused.proto, search.test)
                       if search.test else None, notes=search.run.notes)
    report.widths_before = _widths(search.fused.proto, search.original)
    current, current_ms, current_sha = search.fused, base.p50_ms, base.model_sha256
    for cand in _completed(search.run.state):
        if current_ms <= target_ms:
            break           # a looser budget than the run that measured these: stop where it is met
        it = Iteration(**cand.recipe["iteration"])
        report.iterations.append(it)
        current = search.run.state.load_model(cand, search.original)
        current_ms, current_sha = _for_budget(it, cand.p50_ms, target_ms), cand.model_sha256
    report.resumed = len(report.iterations)
    if report.resumed:
        search.run.say(f"resuming after iteration {report.resumed} ({current_ms:.3f} ms)")
    write_model(search.run.out, search.run.state.model_path(current_sha))
    while True:
        if current_ms <= target_ms:
            last = report.iterations[-1] if report.iterations else None
            if last is None or last.checked_ms is not None:
                break
            current_ms = _check_stop(search, last, current, base.p50_ms, target_ms)
            continue
        index = len(report.iterations) + 1
        if index > cfg.max_iterations or search.run.over_budget():
            report.stopped = "max_iterations" if index > cfg.max_iterations else "budget"
            break
        step = _iteration(search, index, current, current_ms, base.p50_ms, target_ms)
        if step is None:
            report.stopped = "budget" if search.run.over_budget() else \
                "no narrower width is predicted to meet the next step"
            break
        it, current, cand = step
        current_ms = cand.p50_ms
        report.iterations.append(it)
        write_model(search.run.out, search.run.state.model_path(cand.model_sha256))
        search.run.say(it.line())
    if report.stopped != "budget" and not search.run.over_budget():
        current = _finish(search, report, current)
    else:
        search.run.notes.append(f"stopped by --budget ({cfg.budget_s:.0f}s) after "
                         f"{len(report.iterations)} iteration(s); run the same command to continue")
    report.widths_after = _widths(current.proto, search.original)
    if search.table is not None:
        drift = search.table.drift
        report.lut = {"entries_measured": search.table.measured,
                      "round_trips": search.table.round_trips, "context": search.table.context,
                      "anchor_scale_range": [min(drift), max(drift)] if drift else None}
    report.elapsed_s = time.monotonic() - search.run.started
    write_nas_reports(report, search.run.out)
    return report


def _start(model_path, train, out_dir, device, cfg, eval_path, input_shapes, force, say,
           holdout_path) -> _Search:
    from ..data import load_eval_set, load_training_set
    from ..passes.distill import soft_targets
    from ..passes.fuse import fuse

    started = time.monotonic()
    original = load(model_path, input_shapes, data=train)
    if original.format != "onnx":
        raise EdgesmithError("nas takes ONNX models")
    run = Run.open(device, budget_s=cfg.budget_s, say=say, started=started)
    if "onnxruntime" not in (run.facts.get("backends") or ["onnxruntime"]):
        raise EdgesmithError(f"{run.device.name} has no onnxruntime: the latency table is "
                             "measured with it (`edgesmith device setup`)")
    fused = from_proto(fuse(original.proto)[0], original, original.path)
    from ..passes.prune import channel_groups

    fused_kernels = kernels_of(fused.proto, original.input_shapes)
    if not fused_kernels:
        raise EdgesmithError("nas narrows Conv and Gemm layers, and this model has none with "
                             "known shapes (give --input-shape for dynamic dimensions)")
    if not any(g.key for g in channel_groups(fused.proto, original.input_shapes)):
        raise EdgesmithError("no channel group of this model can be narrowed (`edgesmith prune "
                             "--ratio 0.5` names the frozen groups and why)")
    data = load_training_set(train, original)
    if data.n < 10:
        raise EdgesmithError(f"--train has {data.n} samples; NetAdapt fine-tunes on them and "
                             "chooses on a held-out part: give at least a few hundred")
    if holdout_path is not None:
        train_part, holdout = data, load_training_set(holdout_path, original)
    else:      # samples are assumed independent; pass --holdout when they are not
        order = np.random.default_rng(cfg.seed).permutation(data.n)
        cut = max(1, int(round(data.n * cfg.holdout)))
        train_part, holdout = _subset(data, order[cut:]), _subset(data, order[:cut])
    test = load_eval_set(eval_path, original) if eval_path else None
    # the budget, the targets and how many workers may change: the same search continues
    config = {k: v for k, v in asdict(cfg).items()
              if k not in ("budget_s", "max_iterations", "workers", "latency_ratio",
                           "latency_ms", "uniform_baseline", "host_device")}
    run.resume_in(out_dir, run.key(original, config, train=train, holdout=holdout_path,
                                   eval=eval_path),
                  force=force, what="nas output directory")     # after the inputs are read
    if test is None:
        run.notes.append("no --eval: accuracy is reported on the search-holdout part of --train "
                         "only, which chose between proposals (give a test set for an unbiased "
                         "one)")
    job = Job(runs=50, warmup=10, min_time_s=0.3, threads=cfg.threads, evaluate=False)
    table = LatencyTable(run.device, job) if cfg.proxy == "latency" else None
    return _Search(cfg=cfg, run=run, original=original, fused=fused,
                   fused_kernels=fused_kernels, job=job, table=table, train=train_part,
                   holdout=holdout, test=test, targets=soft_targets(original.proto, train_part))


def _subset(data: EvalData, idx) -> EvalData:
    idx = np.sort(idx)
    return EvalData({k: v[idx] for k, v in data.inputs.items()},
                    None if data.labels is None else data.labels[idx], {}, len(idx))


def _check_stop(search: _Search, it: Iteration, model: Model, original_ms: float,
                target_ms: float) -> float:
    """The iteration that meets the budget by its own measurement is measured again,
    interleaved with the original, before the search stops: on a 0.1 ms model one
    measurement's noise made a search stop at 0.60x that the final interleaved comparison put
    at 0.64x. Its latency on the original's scale is kept with the iteration, so a resumed
    search decides as the uninterrupted one did."""
    spreads = search.run.confirm({"original": (bundles.build(search.fused), search.job),
                                      "kept": (bundles.build(model), search.job)},
                         rounds=MEASURE_ROUNDS)
    if len(spreads) < 2:
        raise EdgesmithError(f"the stop check of iteration {it.index} did not run on "
                             f"{search.run.device.name}; run the same command to continue")
    it.checked_ms = spreads["kept"].median_ms / spreads["original"].median_ms * original_ms
    cand = search.run.state.done[f"nas:{it.index}"]
    search.save(cand, model, "iteration", asdict(it))
    if it.checked_ms > target_ms * BUDGET_SLACK:
        search.run.say(f"iteration {it.index} measured {it.checked_ms:.3f} ms interleaved with the "
                f"original, over the budget's {target_ms:.3f} ms: going on")
    return _for_budget(it, cand.p50_ms, target_ms)


def _for_budget(it: Iteration, measured_ms: float, target_ms: float) -> float:
    """The latency the search compares with the budget: the interleaved check where one was
    made (within BUDGET_SLACK of the budget, it meets it), else the iteration's measurement."""
    if it.checked_ms is None:
        return measured_ms
    return it.checked_ms if it.checked_ms > target_ms * BUDGET_SLACK else \
        min(it.checked_ms, target_ms)


def _completed(state: State) -> list[Candidate]:
    """Iterations an interrupted run of this search finished, in order, up to the first gap."""
    done = []
    while (cand := state.done.get(f"nas:{len(done) + 1}")) is not None and cand.ok and \
            "iteration" in cand.recipe and state.model_path(cand.model_sha256).is_file():
        done.append(cand)
    return done


def _widths(proto: onnx.ModelProto, original: Model) -> dict[str, int]:
    from ..passes.prune import channel_groups

    return {" + ".join(g.owners): g.channels for g in channel_groups(proto,
                                                                     original.input_shapes)}


def _iteration(search: _Search, index: int, current: Model, current_ms: float, original_ms: float,
               target_ms: float):
    """One NetAdapt iteration: (Iteration, kept model, its measurement) or None."""
    from ..passes.prune import channel_groups

    cfg = search.cfg
    cut = cfg.initial_reduction * original_ms * cfg.decay ** (index - 1)
    kernels = kernels_of(current.proto, search.original.input_shapes)
    # Decisions use the table calibrated once, on the original's saved measurement: cuts are
    # then fixed shares of the table's cost, so a resumed search decides exactly as the
    # uninterrupted one. Rescaled by each new measurement instead, 0.7 % of noise in it moved
    # a width by a step (measured). The rescaled table is what the report states.
    plan, cost = original_ms / search.kernels_cost(search.fused_kernels), search.kernels_cost(kernels)
    current_plan, scale = plan * cost, current_ms / cost
    groups = [g for g in channel_groups(current.proto, search.original.input_shapes) if g.key]
    proposals = []
    for _ in range(3):      # no single group reaches the cut: a smaller one, as NetAdapt allows
        goal = current_plan - cut
        if goal < target_ms < current_plan:
            goal = target_ms        # no further than the budget
        search.run.say(f"iteration {index}: {len(groups)} groups, aiming at {goal:.3f} ms")
        proposals = _proposals(search, current, kernels, groups, goal, plan, scale)
        if proposals or search.run.over_budget():
            break
        cut /= 2
    if not proposals:
        return None
    t0 = time.monotonic()
    tuned = _finetune_all(search, [p[2] for p in proposals])
    scored = [(metrics_score(m), -pred, g, proto, pred, m)
              for (g, _, _, pred), (proto, m) in zip(proposals, tuned)]
    best = max(scored, key=lambda s: s[:2])
    _, _, g, proto, predicted, metrics = best
    model = from_proto(proto, search.original)
    widths = _widths(proto, search.original)
    group = " + ".join(g.owners)
    it = Iteration(index=index, group=group, width_before=g.channels,
                   width_after=widths.get(group, 0), predicted_ms=predicted, measured_ms=0.0,
                   holdout_top1=metrics.get("student_top1_after"),
                   holdout_sqnr_db=metrics.get("sqnr_db_after"), test_top1=None, widths=widths,
                   proposals=[{"group": " + ".join(pg.owners), "width": w, "predicted_ms": pp,
                               "holdout_top1": pm.get("student_top1_after"),
                               "holdout_sqnr_db": pm.get("sqnr_db_after")}
                              for (pg, w, _, pp), (_, pm) in zip(proposals, tuned)],
                   finetune_s=time.monotonic() - t0)
    if search.test is not None:
        from ..passes.distill import evaluate
        it.test_top1 = evaluate(proto, search.test)
    cand = search.measure(f"nas:{index}", model)
    it.measured_ms = cand.p50_ms
    search.save(cand, model, "iteration", asdict(it))
    return it, model, cand


def metrics_score(m: dict) -> tuple:
    return (m.get("student_top1_after") or 0.0, m.get("sqnr_db_after") or 0.0)


def _widths_to_try(g, cfg: NasConfig) -> list[int]:
    step = cfg.round_to if g.channels >= 2 * cfg.round_to else 1
    top = (g.channels - 1) // step * step if step > 1 else g.channels - 1
    return list(range(top, min(cfg.min_channels, g.channels) - 1, -step))


WIDTHS_PER_TRIP = 6     # widths tried per group per device round trip of the table


def _proposals(search: _Search, current: Model, kernels: list, groups: list, goal: float,
               plan: float, scale: float) -> list[tuple]:
    """(group, width, pruned proto, predicted ms) for each group whose widest width meets
    `goal` as the table scaled by `plan` predicts it. Widths are tried from the widest down,
    WIDTHS_PER_TRIP of every undecided group per table fill (one device round trip), so the
    table measures the kernels a decision needs and few more. The prediction kept is the
    pruned model's own, on the table rescaled by `scale` (the last measurement)."""
    from ..passes.prune import PruneConfig, prune_channels

    chosen, pending, start = {}, list(groups), 0
    while pending and not search.run.over_budget():
        chunk = {g: _widths_to_try(g, search.cfg)[start:start + WIDTHS_PER_TRIP] for g in pending}
        if search.table is not None:
            search.table.fill([k.narrowed(g.removed(w)) for g, ws in chunk.items() for w in ws
                            for k in kernels])
        pending = []
        for g, widths in chunk.items():
            hit = next((w for w in widths if plan * search.kernels_cost(
                [k.narrowed(g.removed(w)) for k in kernels]) <= goal), None)
            if hit is not None:
                chosen[g] = hit
            elif len(widths) == WIDTHS_PER_TRIP:
                pending.append(g)        # narrower widths remain: the next trip tries them
        start += WIDTHS_PER_TRIP
    out = []
    for g, width in chosen.items():
        proto, _ = prune_channels(current.proto, PruneConfig(
            ratio=0.0, layer_ratios={g.key: 1 - width / g.channels}, round_to=1,
            min_channels=1, input_shapes=search.original.input_shapes))
        out.append((g, width, proto, scale * search.cost(proto)))
    return out


def _finetune_all(search: _Search, protos: list, epochs: int | None = None
                  ) -> list[tuple[onnx.ModelProto, dict]]:
    """Each model distilled from the original (for `steps` steps unless `epochs` is given),
    in spawned worker processes (torch is not fork-safe), in parallel when there are cores;
    one path for one fine-tune or many, and the memory training took is returned on exit."""
    import multiprocessing

    cfg = search.cfg
    epochs = epochs or max(1, round(cfg.steps / search.steps_per_epoch))
    cores = os.cpu_count() or 2
    workers = cfg.workers or max(1, cores // 2)
    jobs = [(p.SerializeToString(), search.original.serialized(), search.train, search.targets,
             search.holdout, epochs, cfg, max(1, cores // workers)) for p in protos]
    from concurrent.futures.process import BrokenProcessPool

    if search.pool is None:      # kept for the whole search: spawning imports torch again
        search.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        done = list(search.pool.map(finetune, jobs))
    except BrokenProcessPool:
        raise EdgesmithError("a fine-tuning worker process died (out of memory?); try "
                             "--workers 1") from None
    return [(onnx.load_from_string(b), m) for b, m in done]


def finetune(job: tuple) -> tuple[bytes, dict]:
    """One short distillation (a worker process's whole task; importable for spawn)."""
    from ..passes.distill import DistillConfig, distill

    student, teacher, train, targets, holdout, epochs, cfg, threads = job
    import torch
    torch.set_num_threads(threads)
    model, rep = distill(onnx.load_from_string(student), DistillConfig(
        onnx.load_from_string(teacher), train, holdout, targets, epochs=epochs,
        batch_size=cfg.batch_size, seed=cfg.seed, shift=cfg.shift, host_device=cfg.host_device))
    return model.SerializeToString(), rep.metrics


def _finish(search: _Search, report: NasReport, current: Model) -> Model:
    """The longer distillation of the kept model, then the uniform-width baseline at the same
    measured latency and the same training steps. Returns the final model."""
    cfg = search.cfg
    after = len(report.iterations)    # a search continued later finishes its own model
    final_id, uniform_id = f"nas:final@{after}", f"nas:uniform@{after}"
    if (row := search.kept(final_id, "row")) is None:
        search.run.say(f"final distillation ({cfg.final_epochs} epoch{'s' * (cfg.final_epochs != 1)})")
        (proto, metrics), = _finetune_all(search, [current.proto], cfg.final_epochs)
        model = from_proto(proto, search.original)
        cand = search.measure(final_id, model)
        row = _row(search, "netadapt", cand, proto, metrics)
        search.save(cand, model, "row", row)
    report.final = row
    final = search.run.state.load_model(search.run.state.done[final_id], search.original)
    write_model(search.run.out, search.run.state.model_path(search.run.state.done[final_id].model_sha256))
    if not cfg.uniform_baseline or search.run.over_budget():
        _confirm(search, report, final)
        return final
    if (row := search.kept(uniform_id, "row")) is None:
        search.run.say("uniform-width baseline at the same latency")
        uniform, ratio = _uniform_at(search, report.final["measured_ms"])
        spent = after * cfg.steps / search.steps_per_epoch      # the search's steps too
        (proto, metrics), = _finetune_all(search, [uniform], cfg.final_epochs + round(spent))
        model = from_proto(proto, search.original)
        cand = search.measure(uniform_id, model)
        row = _row(search, f"uniform width x{1 - ratio:.2f}", cand, proto, metrics)
        search.save(cand, model, "row", row)
    report.uniform = row
    target = report.final["measured_ms"]
    if abs(row["measured_ms"] / target - 1) > 0.05:       # said again when resumed
        search.run.notes.append(f"the uniform baseline measured {row['measured_ms']:.3f} ms, the "
                         f"nearest any uniform width came to {target:.3f} ms (latency jumps "
                         "between neighbouring widths here)")
    _confirm(search, report, final)
    return final


def _confirm(search: _Search, report: NasReport, final: Model) -> None:
    """The original, the final model and the uniform baseline re-measured interleaved, in the
    same rounds: the comparison the report states is between these medians."""
    trials = {"original": search.fused, "netadapt": final}
    if report.uniform is not None:
        trials["uniform"] = search.run.state.load_model(
            search.run.state.done[f"nas:uniform@{len(report.iterations)}"], search.original)
    search.run.say("re-measuring the original, the final model and the baseline interleaved")
    spreads = search.run.confirm({k: (bundles.build(m), search.job) for k, m in trials.items()},
                                 rounds=MEASURE_ROUNDS)
    report.confirm = {k: asdict(v) for k, v in spreads.items()}


def _row(search: _Search, name: str, cand: Candidate, proto, metrics: dict) -> dict:
    from ..passes.distill import evaluate

    return {"name": name, "measured_ms": cand.p50_ms, "holdout_top1": metrics.get(
        "student_top1_after"), "holdout_sqnr_db": metrics.get("sqnr_db_after"),
        "test_top1": evaluate(proto, search.test) if search.test else None, "macs": cand.macs,
        "params": cand.params}


def _uniform_at(search: _Search, target_ms: float) -> tuple[onnx.ModelProto, float]:
    """The uniformly narrowed model (and its pruning ratio) whose measured latency is nearest
    `target_ms`, over width multipliers x0.1 to x0.9, each rounded both to the search's step
    and to the device's channel multiple (what `edgesmith prune` rounds to); every candidate
    is measured on the device. Not bisection: latency is not monotone in width, since widths
    off the NCHWc block cost reorders (measured: 0.44 -> 0.28 ms between x0.64 and x0.58 of
    a 32x32 CNN). On Fashion-MNIST's CNN bisection's nearest was 22 % above a 0.358 ms target,
    the grid's 16 % below it."""
    from ..passes.prune import PruneConfig, prune_channels
    roundings = sorted({search.cfg.round_to, search.run.target.profile.channel_multiple})
    seen, best = set(), None
    for ratio in np.arange(0.1, 0.91, 0.1):      # 10 % steps: each probe is a round trip
        for round_to in roundings:
            proto = prune_channels(search.fused.proto, PruneConfig(
                ratio=float(ratio), round_to=round_to, min_channels=search.cfg.min_channels,
                input_shapes=search.original.input_shapes))[0]
            widths = tuple(_widths(proto, search.original).values())
            if widths in seen:
                continue
            seen.add(widths)
            probe = measure(search.run.device, bundles.build(from_proto(proto, search.original)), search.job)
            if not probe.ok:
                raise EdgesmithError(f"a uniform-width model did not run on {search.run.device.name}: "
                                     f"{probe.error}")
            measured = probe.latency_ms["p50"]
            if best is None or abs(measured - target_ms) < abs(best[2] - target_ms):
                best = (proto, float(ratio), measured)
    return best[0], best[1]
