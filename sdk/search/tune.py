"""Autotune the runtime config of a model on a device, measured there, with a tuning cache.

Search: the default config first (so the answer is never worse than it), then coordinate
descent over the profile's knobs (each knob's values with the others at their best so far).
Every trial is the bundle run through `measure.measure` with a config override; a failing
variant is an error row. Trials go to a JSON-lines cache keyed by everything that decides a
timing: model bytes, input specs, measurement settings, the device's fingerprint (hardware and
runtime versions) and the variant. The winner is re-measured against the default, interleaved,
and kept only when it is faster beyond the rounds' spread.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field, replace

from ..bundle import DEFAULT_BACKEND
from ..data import eval_batch
from ..devices import Job
from ..errors import EdgesmithError
from ..measure import BUSY_SHARE, Candidate, measure
from ..model import Model, load
from ..run import Run, accuracy_drop, within
from ..targets import Match
from .cache import TuningCache, context_key
from ..variants import KNOBS, Space, Variant, space
from .. import bundle as bundles


@dataclass(kw_only=True)
class TuneReport:
    model: str
    model_sha256: str
    device: str
    device_fingerprint: str
    target: str
    target_reasons: list[str]
    trials: list[Candidate]                  # ranked: fastest first, errors last
    pruned: list[dict]
    default: Candidate
    best: Candidate
    confirm: dict = field(default_factory=dict)
    verdict: str = ""                        # why the kept variant was kept, in one line
    stopped: str | None = None               # "budget" | "max_trials" when the search was cut
    measured: int = 0
    from_cache: int = 0
    device_s: float = 0.0
    bundle: str = ""                         # tuned bundle: best config in its manifest
    kernels: list[dict] = field(default_factory=list)   # per fused block: who won, by how much
    budget_s: float = 0.0
    max_trials: int = 0
    answered_at: float = 0.0                 # when this answer was measured (time.time())

    def to_dict(self) -> dict:
        return asdict(self)


class _Stop(Exception):
    pass


def tune(model: str | os.PathLike | Model, device: Run | str = "local",
         target: str | Match | None = None,
         budget_s: float = 120.0, max_trials: int = 40, fresh: bool = False,
         search_space: Space | None = None, cache: TuningCache | None = None,
         confirm_rounds: int = 3, measure_settings: dict | None = None, on_trial=None,
         eval_data=None, max_accuracy_drop: float = 0.01, on_stage=None) -> TuneReport:
    """Find the fastest runtime config for `model` on `device`; never slower than the default.

    Knobs that change numerics (TensorRT fp16, bf16 fast-math) are tried only with `eval_data`
    (reference outputs of the model), and kept only within `max_accuracy_drop`. `on_trial` hears
    of each measured config, `on_stage` (a line) of the steps between them."""
    stage = on_stage or (lambda line: None)
    if not isinstance(model, Model):
        model = load(model)
    run = Run.open(device, target=target)
    dev, facts, chosen = run.device, run.facts, run.target
    cache = cache or TuningCache()
    profile, backend = chosen.profile, DEFAULT_BACKEND[model.format]
    if backend not in profile.backends:
        raise EdgesmithError(f"target {profile.name} does not list backend {backend}")
    sp = search_space or space(profile.search, facts, backend)
    if eval_data is None:
        sp = sp.without_numeric("changes numerics; tuned only with an eval set to check them")
    job = replace(Job(**{**profile.measure_job_args(), **(measure_settings or {})}),
                  evaluate=False, backend=backend)
    ctx_key, device_key = context_key(model, job), run.fingerprint
    answer_key = _answer_key(sp, profile.name, eval_data, max_accuracy_drop, confirm_rounds)
    if not fresh and (known := _known_answer(cache, ctx_key, device_key, answer_key, budget_s,
                                             max_trials)):
        return known
    if any(KNOBS[name].rewrite for name in sp.values):
        stage("rewriting the model for edgesmith's kernels, each rewrite checked against "
              "onnxruntime")
    models = _rewritten_models(model, sp, facts)
    batch = eval_batch(model)
    built: dict[tuple, tuple] = {}
    scales: dict[tuple, float] = {}       # largest |reference output| of each judged bundle

    def bundles_of(variant: Variant):
        """(plain, judged) bundles of the model this variant runs: rewritten ones ship files,
        and are always judged on the device (`eval_data`, else a seeded check set)."""
        sig = variant.rewrites()
        if sig not in built:
            m, files = models.get(sig, (model, {}))[:2]
            judge = eval_data if eval_data or not sig else _check_set(model, batch)
            built[sig] = (bundles.build(m, eval_batch=batch, meta={"source": str(model.path)},
                                        extra_files=files),
                          bundles.build(m, eval_data=judge, eval_batch=batch,
                                        extra_files=files) if judge else None)
            scales[sig] = _output_scale(judge)
        return built[sig]

    done: dict[str, Candidate] = {}
    tried: dict[str, Variant] = {}
    spent = {"device_s": 0.0, "measured": 0, "cached": 0}

    def trial(variant: Variant) -> Candidate:
        key = variant.key()
        if key in done:
            return done[key]
        tried[key] = variant
        plain, judged = bundles_of(variant)
        # a rewritten model's timing depends on its bytes (and the library's): part of the key
        cache_key = key + (f"|{plain.id}" if variant.rewrites() else "")
        record = None if fresh else cache.get(ctx_key, device_key, cache_key)
        if record is not None:
            result = Candidate(**{**record, "id": variant.label(), "cached": True})
            spent["cached"] += 1
        else:
            result = _measure_variant(dev, variant, plain, judged, job, spent, budget_s,
                                      max_trials)
            if variant.rewrites():
                _judge_rewrite(result, scales[variant.rewrites()])
            if variant.numeric:
                _judge_numerics(result, done, max_accuracy_drop, model.facts.class_scores)
            cache.put(ctx_key, device_key, cache_key, {**asdict(result), "cached": False})
        done[key] = result
        if on_trial:
            on_trial(result)
        return result

    default = trial(Variant.of(sp.backend, {}))
    stopped = _coordinate_descent(sp, trial)
    ranked = sorted(done.values(), key=lambda t: (not t.ok, t.p50_ms or float("inf")))
    best = ranked[0] if ranked[0].ok else default
    confirm, verdict = {}, "the runtime defaults were fastest"
    best_variant = tried.get(best.key, Variant.of(sp.backend, {}))
    if best.ok and default.ok and best.key != default.key and confirm_rounds > 0:
        stage(f"re-measuring {best.id} against the runtime defaults, interleaved "
              f"x{confirm_rounds}")
        best, confirm, verdict = _confirm(run, bundles_of(Variant.of(sp.backend, {}))[0],
                                          bundles_of(best_variant)[0], job, default, best,
                                          confirm_rounds)
    kept = tried.get(best.key, Variant.of(sp.backend, {}))
    shipped, files = models.get(kept.rewrites(), (model, {}))[:2]
    kernels = [] if facts.get("emulated") else \
        _kernel_breakdown(dev, job, tried, done, models, bundles_of, stage)   # emulated: noise
    tuned = bundles.build(shipped, config=best.config, eval_batch=batch, extra_files=files,
                          meta={"source": str(model.path),
                                "tuned": {"target": profile.name, "variant": best.id}})
    report = TuneReport(model=str(model.path),
                        model_sha256=hashlib.sha256(model.serialized()).hexdigest(),
                        device=dev.name, device_fingerprint=device_key, target=profile.name,
                        target_reasons=chosen.reasons, trials=ranked,
                        pruned=[{"knob": k, "value": v, "reason": r} for k, v, r in sp.pruned],
                        default=default, best=best, confirm=confirm, verdict=verdict,
                        stopped=stopped, measured=spent["measured"], from_cache=spent["cached"],
                        device_s=spent["device_s"], bundle=str(tuned.path), kernels=kernels,
                        budget_s=budget_s, max_trials=max_trials, answered_at=time.time())
    busy = any((t.device_load or {}).get("others_share", 0) > BUSY_SHARE for t in ranked)
    if not busy and not verdict.startswith("re-measurement failed"):   # else measured again
        cache.put(ctx_key, device_key, answer_key, report.to_dict())
    return report


def _answer_key(sp: Space, target: str, eval_data, max_drop: float, rounds: int) -> str:
    """What besides the model, the job and the device decides a whole tuning's answer: the
    search space, the judging set and budget, the confirmation, edgesmith's own kernels."""
    import numpy as np

    from .. import __version__
    from ..own_kernels import sources_digest

    digest = sources_digest()
    for arrays in ((eval_data.inputs, eval_data.refs, {"labels": eval_data.labels},
                    {f"const:{k}": v for k, v in eval_data.consts.items()},
                    {f"state:{k}": np.array(v) for k, v in eval_data.state.items()})
                   if eval_data is not None else ()):
        for name in sorted(arrays):
            if arrays[name] is not None:
                array = np.asarray(arrays[name], order="C")
                digest.update(f"{name} {array.dtype} {array.shape}".encode() + array.tobytes())
    blob = repr((sorted(sp.values.items()), sp.pruned, target, max_drop, rounds, __version__,
                 digest.hexdigest()))
    return "answer|" + hashlib.sha256(blob.encode()).hexdigest()[:24]


def _known_answer(cache: TuningCache, ctx_key: str, device_key: str, answer_key: str,
                  budget_s: float, max_trials: int) -> TuneReport | None:
    """An identical job's answer, kept whole: trials, the interleaved confirmation and the
    per-block profile are not redone (`fresh` measures again). A search an earlier, smaller
    budget cut short is not an answer to a larger one; a tuned bundle that is gone or
    damaged makes the job run again (from the trial cache)."""
    known = cache.get(ctx_key, device_key, answer_key)
    try:
        report = TuneReport(**{**known, **{k: Candidate(**known[k]) for k in ("default", "best")},
                               "trials": [Candidate(**t) for t in known["trials"]]})
    except (TypeError, KeyError):
        return None          # none, or written by another version: measured again
    if report.stopped and (budget_s > report.budget_s or max_trials > report.max_trials):
        return None
    if bundles.cached(report.bundle) is None:
        return None
    report.from_cache, report.measured, report.device_s = len(report.trials), 0, 0.0
    for t in (*report.trials, report.default, report.best):
        t.cached = True
    return report


def _rewritten_models(model: Model, sp: Space, facts: dict) -> dict[tuple, tuple]:
    """Every model-changing knob value's model and files; a value that cannot apply to this
    model (no matching subgraph, no compiler) is pruned with its reason, not measured."""
    models: dict[tuple, tuple] = {}
    for name, values in list(sp.values.items()):
        rewrite = KNOBS[name].rewrite
        if rewrite is None:
            continue
        kept = []
        for value in values:
            made = rewrite(model, value, facts) if value else None
            if isinstance(made, str):
                sp.pruned.append((name, value, made))
            else:
                kept.append(value)
                if made is not None:
                    models[((name, value),)] = made
        if kept:
            sp.values[name] = kept
        else:
            del sp.values[name]
    return models


def _kernel_breakdown(dev, job: Job, tried: dict, done: dict, models: dict, bundles_of,
                      stage) -> list[dict]:
    """Profile the fastest model-rewriting variant and the same config without the rewrite,
    per node, and set each rewritten block against what it replaced (sdk/kernels.breakdown,
    which takes each node's profiling cost out by the variants' unprofiled times)."""
    from ..own_kernels import breakdown

    rewritten = [(done[k], v) for k, v in tried.items() if v.rewrites() and done[k].ok]
    if not rewritten:
        return []
    _, variant = min(rewritten, key=lambda pair: pair[0].p50_ms)
    plain = Variant.of(variant.backend, {k: v for k, v in variant.knobs
                                         if (k, v) not in variant.rewrites()})
    stage(f"profiling {variant.label()} and onnxruntime per node, {PROFILE_ROUNDS} rounds: what "
          "each kernel won or lost")
    profiles = []
    for _ in range(PROFILE_ROUNDS):          # interleaved: a noise burst lands in one round
        pair = []
        for v in (plain, variant):
            result = measure(dev, bundles_of(v)[0], replace(job, config=v.config(), runs=10,
                                                             warmup=2, min_time_s=0,
                                                             profile_ops=True))
            if result.error or not result.node_profile_ms:
                return []
            pair.append(result.node_profile_ms)
        profiles.append(tuple(pair))
    unprofiled = tuple(done[v.key()].p50_ms if v.key() in done and done[v.key()].ok else None
                       for v in (plain, variant))
    return [{**row, "variant": variant.label()}
            for row in breakdown(models[variant.rewrites()][2], profiles, unprofiled)]


def _measure_variant(dev, variant: Variant, plain, judged, job: Job, spent: dict,
                     budget_s: float, max_trials: int) -> Candidate:
    if spent["measured"] >= max_trials:
        raise _Stop("max_trials")
    if spent["device_s"] >= budget_s:
        raise _Stop("budget")
    numeric = variant.numeric or variant.knobs == () or bool(variant.rewrites())
    bundle, evaluate = (judged, True) if judged is not None and numeric else (plain, False)
    t0 = time.monotonic()
    result = measure(dev, bundle, replace(job, config=variant.config(), evaluate=evaluate))
    seconds = time.monotonic() - t0
    spent["device_s"] += seconds
    spent["measured"] += 1
    return Candidate.from_result(variant.label(), result, key=variant.key(),
                                 config=variant.config(), device_s=seconds)


REWRITE_TOLERANCE = 1e-4       # of the largest reference output: a rewrite keeps the numerics
PROFILE_ROUNDS = 3             # of the per-block profiles: rounds that disagree make a tie


def _check_set(model: Model, batch: int):
    """Seeded random inputs and the original's outputs on them: what a rewritten model's
    outputs are compared to on the device when no eval set was given."""
    import numpy as np

    from device_runtime.evaluate import EvalData
    from ..data import reference_outputs

    rng = np.random.default_rng(0)
    inputs = {s.name: rng.standard_normal(s.shape).astype(s.dtype) if np.dtype(s.dtype).kind
              == "f" else np.zeros(s.shape, s.dtype) for s in model.inputs}
    data = EvalData(inputs, None, {}, model.inputs[0].shape[0] if model.inputs[0].shape else 1)
    data.refs = reference_outputs(model, data, batch)
    return data


def _output_scale(data) -> float:
    """The largest |reference output| of an eval set (0 without references)."""
    import numpy as np

    refs = data.refs if data is not None else {}
    return max((float(np.abs(r).max()) for r in refs.values()), default=0.0)


def _judge_rewrite(result: Candidate, scale: float) -> None:
    """A rewritten model whose outputs on the device stray from the original's is an error row:
    the host checked its own build; this checks the device's."""
    if not result.ok:
        return
    err = (result.accuracy or {}).get("max_abs_err")
    if err is None or err > REWRITE_TOLERANCE * max(scale, 1e-30):
        result.error = (f"outputs differ from the original's on the device by {err} "
                        f"(> {REWRITE_TOLERANCE:g} of {scale:.3g}): not used")
        result.stage = "accuracy"


def _judge_numerics(result: Candidate, done: dict, max_drop: float, scores: bool) -> None:
    """A numerics-changing variant is an error row when it is not within the accuracy budget
    (not judged included: the one budget rule, `run.within`)."""
    default = next((t for t in done.values() if t.id == "runtime defaults"), None)
    drop = accuracy_drop(default.accuracy if default else None, result.accuracy, scores)
    result.accuracy_drop = drop
    if result.ok and not within(result, max_drop):
        result.error = (f"changes the outputs: accuracy drop {drop if drop is None else round(drop, 4)}"
                        f" > {max_drop}")
        result.stage = "accuracy"


def _coordinate_descent(sp: Space, trial) -> str | None:
    current: dict = {}
    try:
        for name, values in sp.values.items():
            base = trial(Variant.of(sp.backend, current))
            options = [(base, None)] + [(trial(Variant.of(sp.backend, {**current, name: v})), v)
                                        for v in values]
            ok = [(t.p50_ms, v) for t, v in options if t.ok]
            if ok:
                value = min(ok, key=lambda pv: pv[0])[1]
                if value is not None:
                    current[name] = value
    except _Stop as stop:
        return str(stop)
    return None


def _confirm(run: Run, default_bundle, best_bundle, job: Job, default: Candidate,
             best: Candidate, rounds: int):
    """Re-measure winner and default interleaved; keep the winner only when its rounds are
    faster than all of the default's (a margin inside the spread is noise)."""
    spreads = run.confirm({"default": (default_bundle, replace(job, config=default.config)),
                           "best": (best_bundle, replace(job, config=best.config))}, rounds)
    if len(spreads) < 2:
        return default, {}, "re-measurement failed; keeping the runtime defaults"
    d, b = spreads["default"], spreads["best"]
    default.confirm, best.confirm = asdict(d), asdict(b)
    confirm = {"default": asdict(d), "best": asdict(b), "speedup": d.median_ms / b.median_ms,
               "rounds": rounds, "within_noise": d.overlaps(b)}
    if b.beats(d):
        confirm["kept"] = "best"
        return best, confirm, (f"{best.id}: {confirm['speedup']:.2f}x faster than the defaults "
                               f"on interleaved re-measurement")
    confirm["kept"] = "default"
    why = ("within the noise of" if d.overlaps(b) else "slower than")
    return default, confirm, (f"kept the runtime defaults: {best.id} (rank 1 by single "
                              f"measurement) was {why} the defaults on interleaved "
                              f"re-measurement ({b.median_ms:.3f} vs {d.median_ms:.3f} ms)")
