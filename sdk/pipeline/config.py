"""What one `optimize` run shares across its stages: what the user asked for
(`OptimizeConfig`), and the `Context` every candidate is measured, judged, recorded (resumably)
and written through."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from .. import bundle as bundles
from ..data import eval_batch
from ..devices import Job
from ..measure import Candidate, measure
from ..model import Model
from ..report.text import delegation_text
from ..run import Run, accuracy_drop
from ..run.outputs import write_model
from ..run.state import sha256 as _sha
from ..search.int8 import QuantData
from ..search.select import best_tradeoff, choose

BACKENDS = ("onnxruntime", "tflite")
ORIGINAL = "original (as given)"     # the user's model, unfused: what every speedup is against


@dataclass(frozen=True, kw_only=True)
class OptimizeConfig:
    """What the user asked for: budgets and how much effort each stage may spend."""

    max_accuracy_drop: float = 0.01
    latency_budget_ms: float | None = None
    budget_s: float = 600.0                      # wall clock for the whole search
    prune_ratios: tuple[float, ...] = (0.3, 0.5)
    nas_ratios: tuple[float, ...] = (0.6,)       # NetAdapt targets, shares of fp32's latency
    distill_epochs: int = 10
    host_device: str = "auto"                    # where torch trains (distillation, NAS, int8)
    quant_effort: str = "balanced"               # how far int8 repairs go (REPAIR_CHAINS)
    tune_budget_s: float = 60.0                  # device time for tuning the winner (0: skip)
    target: str | None = None                    # a profile name; else matched from facts
    contenders: int = 3                          # fastest in-budget candidates re-measured
    confirm_rounds: int = 3
    backends: tuple[str, ...] = BACKENDS         # runtimes the answer may use
    wait_idle_s: float = 0.0                     # before each timing: wait for a quiet device
    state: dict | None = None                    # a stream's output -> input (None: by name)

    def __post_init__(self):
        if not 0.0 <= self.max_accuracy_drop <= 1.0:
            raise ValueError(f"OptimizeConfig.max_accuracy_drop must be in [0, 1], got "
                             f"{self.max_accuracy_drop}")
        if self.latency_budget_ms is not None and self.latency_budget_ms <= 0:
            raise ValueError("OptimizeConfig.latency_budget_ms must be > 0")
        for name in ("prune_ratios", "nas_ratios"):
            if any(not 0.0 < r < 1.0 for r in getattr(self, name)):
                raise ValueError(f"OptimizeConfig.{name} must be in (0, 1), got "
                                 f"{getattr(self, name)}")
        if self.confirm_rounds < 1 or self.contenders < 1:
            raise ValueError("OptimizeConfig.confirm_rounds and .contenders must be >= 1")
        for name in ("budget_s", "tune_budget_s", "wait_idle_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"OptimizeConfig.{name} must be >= 0")
        if self.quant_effort not in ("fast", "balanced", "max"):
            raise ValueError(f"OptimizeConfig.quant_effort must be fast, balanced or max, got "
                             f"{self.quant_effort!r}")
        if self.distill_epochs < 1:
            raise ValueError("OptimizeConfig.distill_epochs must be >= 1")
        if not self.backends or not set(self.backends) <= set(BACKENDS):
            raise ValueError(f"OptimizeConfig.backends must be some of {BACKENDS}, got "
                             f"{self.backends}")


@dataclass(kw_only=True)
class Context:
    """What optimize's stages share, built once per run: the run (device, facts, target, budget
    clock, state under OUT), the user's config, the models and the data; and the ledger of
    measured candidates, recorded resumably as they are measured."""

    cfg: OptimizeConfig
    run: Run
    original: Model
    fused: Model
    job: Job
    judge: object                  # EvalData with reference outputs, or None (nothing to judge)
    quant: QuantData | None
    train: str | None
    cands: list[Candidate] = field(default_factory=list)
    kernel_bundles: dict = field(default_factory=dict)   # (model sha256, setting) -> parts

    def baseline(self) -> Candidate | None:
        return next((c for c in self.cands if c.id == "fp32"), None)

    def record(self, cand: Candidate, model: Model | None) -> Candidate:
        """Keep a measured candidate (resumable), judge its drop, write the best so far."""
        base = self.baseline()
        if cand.ok and cand.accuracy_drop is None:
            cand.accuracy_drop = 0.0 if base is None else accuracy_drop(
                base.accuracy, cand.accuracy, self.original.facts.class_scores)
        self.run.state.save(cand, model if cand.ok else None)
        self.cands.append(cand)
        best = choose(self.cands, self.cfg) or best_tradeoff(self.cands)
        if best is not None:
            write_model(self.run.out, self.run.state.model_path(best.model_sha256))
        return cand

    def resumed(self, cid: str) -> Candidate | None:
        """The candidate an interrupted run of this job already measured (now counted)."""
        if (known := next((c for c in self.cands if c.id == cid), None)) is not None:
            return known
        cand = self.run.resumed(cid)
        if cand is not None:
            self.cands.append(cand)
        return cand

    def kernel_parts(self, model: Model, setting):
        """What a bundle running `model` on edgesmith's kernels at `setting` holds: (the
        rewritten model, {library file: bytes}, runtime config, a few words on what was
        taken), or why not in one line; rewritten and checked once per run."""
        key = (_sha(model.serialized()), str(setting))
        if key not in self.kernel_bundles:
            from ..variants import KNOBS

            knob = KNOBS["edgesmith_kernels"]
            got = knob.rewrite(model, setting, self.run.facts)
            if not isinstance(got, str):
                rewritten, files, info = got
                config: dict = {}
                knob.apply(config, setting, "onnxruntime")
                got = (rewritten, files, config, f"{len(info['blocks'])} "
                       f"{'int8 ' if info.get('int8') else ''}blocks, {info['isa']} build")
            self.kernel_bundles[key] = got
        return self.kernel_bundles[key]

    def measure(self, cid: str, recipe: dict, model: Model, note: str = "",
                ships: tuple | None = None) -> Candidate:
        """Measure and judge `model` on the device and record it as candidate `cid`. `ships`
        (the model that runs, extra files, runtime config): what the bundle runs instead of
        `model`, which stays the candidate's portable model file (edgesmith's kernels)."""
        if (cand := self.resumed(cid)) is not None:
            return cand
        self.run.say(f"measuring {cid} on {self.run.device.name}")
        t0 = time.monotonic()
        runs, files, config = ships or (model, None, None)
        bundle = bundles.build(runs, config=config, eval_data=self.judge,
                               eval_batch=eval_batch(model), extra_files=files,
                               meta={"candidate": cid})
        result = measure(self.run.device, bundle, self.job)
        seconds = time.monotonic() - t0
        self.run.spent("measure", seconds)
        cand = Candidate.from_result(cid, result, model, recipe=recipe, note=note,
                                     config=config or {}, model_sha256=_sha(model.serialized()),
                                     device_s=seconds)
        if result.delegation:
            cand.note = "; ".join(filter(None, [cand.note, delegation_text(result.delegation)]))
        return self.record(cand, model)
