"""Autotune the runtime config of a model on a device, measured there, with a tuning cache.

Search: the default config first (so the answer is never worse than it), then coordinate
descent over the profile's knobs (each knob's values with the others at their best so far).
Every trial is the bundle run by the device runtime with a config override; a failing variant is
an error row. Trials go to a JSON-lines cache keyed by model hash + device fingerprint + config,
so a repeated or interrupted tune answers from it. The winner is re-measured against the default,
interleaved, and kept only if it holds up.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from device_runtime.result import Result

from .bundle import DEFAULT_BACKEND, cache_dir
from .devices import Job, get_device
from .errors import EdgesmithError, StageError
from .model import Model, load
from .profiling import prepare
from .targets import Match, get_profile, match
from .variants import Space, Variant, space

FINGERPRINT_FACTS = ("arch", "cpu", "cpu_flags", "cores", "memory_mb", "gpu", "packages",
                     "ort_providers")


def device_fingerprint(facts: dict) -> str:
    """Same hardware and software -> same key; the hostname does not matter (a fleet shares)."""
    keep = {k: facts.get(k) for k in FINGERPRINT_FACTS}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Trial:
    label: str
    key: str
    config: dict
    p50_ms: float | None = None
    p90_ms: float | None = None
    mean_ms: float | None = None
    runs: int = 0
    error: str | None = None
    stage: str | None = None
    device_s: float = 0.0
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and self.p50_ms is not None

    @classmethod
    def from_result(cls, variant: Variant, result: Result, seconds: float) -> "Trial":
        lat = result.latency_ms or {}
        return cls(variant.label(), variant.key(), variant.config(), lat.get("p50"),
                   lat.get("p90"), lat.get("mean"), lat.get("runs", 0), result.error,
                   result.stage, seconds)


class TuningCache:
    """JSON lines under the cache dir; appends are locked so parallel tunes do not interleave."""

    def __init__(self, path: Path | None = None):
        self.path = path or cache_dir() / "tuning.jsonl"
        self._entries: dict[tuple, dict] | None = None

    def _load(self) -> dict[tuple, dict]:
        if self._entries is None:
            self._entries = {}
            if self.path.is_file():
                for line in self.path.read_text().splitlines():
                    try:
                        rec = json.loads(line)
                        self._entries[(rec["model"], rec["device"], rec["key"])] = rec["trial"]
                    except (ValueError, KeyError, TypeError):
                        continue   # a torn last line from a killed run is skipped, not fatal
        return self._entries

    def get(self, model: str, device: str, key: str) -> dict | None:
        return self._load().get((model, device, key))

    def put(self, model: str, device: str, key: str, trial: dict) -> None:
        self._load()[(model, device, key)] = trial
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"model": model, "device": device, "key": key, "trial": trial,
                           "time": time.time()}) + "\n"
        with open(self.path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            fh.write(line)


@dataclass
class TuneReport:
    model: str
    model_sha256: str
    device: str
    device_fingerprint: str
    target: str
    target_reasons: list[str]
    trials: list[Trial]                      # ranked: fastest first, errors last
    pruned: list[dict]
    default: Trial
    best: Trial
    confirm: dict = field(default_factory=dict)
    stopped: str | None = None               # "budget" | "max_trials" when the search was cut
    measured: int = 0
    from_cache: int = 0
    device_s: float = 0.0
    bundle: str = ""                         # tuned bundle: best config in its manifest

    def to_dict(self) -> dict:
        return asdict(self)


class _Stop(Exception):
    pass


def _pick_target(facts: dict, target: str | None) -> Match:
    if target:
        return Match(get_profile(target), [f"chosen with --target {target}"])
    return match(facts)


def tune(model: str | os.PathLike | Model, device="local", target: str | None = None,
         budget_s: float = 120.0, max_trials: int = 40, fresh: bool = False,
         search_space: Space | None = None, cache: TuningCache | None = None,
         confirm_rounds: int = 3, measure: dict | None = None, on_trial=None) -> TuneReport:
    """Find the fastest runtime config for `model` on `device`; never slower than the default."""
    if not isinstance(model, Model):
        model = load(model)
    dev = get_device(device) if isinstance(device, str) or device is None else device
    cache = cache or TuningCache()
    try:
        facts = dev.facts()
        chosen = _pick_target(facts, target)
        profile = chosen.profile
        backend = DEFAULT_BACKEND[model.format]
        if backend not in profile.backends:
            raise EdgesmithError(f"target {profile.name} does not list backend {backend}")
        sp = search_space or space(profile.search, facts, backend)
        bundle = prepare(model, None, meta={"source": str(model.path)})
        settings = {**profile.measure_job_args(), **(measure or {})}
        job = replace(Job(**settings), evaluate=False, backend=backend)
        remote = dev.push(bundle)
    except StageError as exc:
        raise EdgesmithError(str(exc)) from None
    model_sha = hashlib.sha256(model.serialized()).hexdigest()
    fingerprint = device_fingerprint(facts)
    done: dict[str, Trial] = {}
    spent = {"device_s": 0.0, "measured": 0, "cached": 0}

    def trial(variant: Variant) -> Trial:
        key = variant.key()
        if key in done:
            return done[key]
        record = None if fresh else cache.get(model_sha, fingerprint, key)
        if record is not None:
            result = Trial(**{**record, "label": variant.label(), "cached": True})
            spent["cached"] += 1
        else:
            if spent["measured"] >= max_trials:
                raise _Stop("max_trials")
            if spent["device_s"] >= budget_s:
                raise _Stop("budget")
            t0 = time.monotonic()
            run = dev.run(remote, replace(job, config=variant.config()))
            result = Trial.from_result(variant, run, time.monotonic() - t0)
            spent["device_s"] += result.device_s
            spent["measured"] += 1
            cache.put(model_sha, fingerprint, key, {**asdict(result), "cached": False})
        done[key] = result
        if on_trial:
            on_trial(result)
        return result

    default = trial(Variant.of(sp.backend, {}))
    stopped = None
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
        stopped = str(stop)
    ranked = sorted(done.values(), key=lambda t: (not t.ok, t.p50_ms or float("inf")))
    best = ranked[0] if ranked[0].ok else default
    confirm = {}
    if best.ok and default.ok and best.key != default.key and confirm_rounds > 0:
        best, confirm = _confirm(dev, remote, job, default, best, confirm_rounds)
    tuned = prepare(model, None, config=best.config,
                    meta={"source": str(model.path), "tuned": {"target": profile.name,
                                                                 "variant": best.label}})
    return TuneReport(str(model.path), model_sha, getattr(dev, "name", str(device)), fingerprint,
                      profile.name, chosen.reasons, ranked,
                      [{"knob": k, "value": v, "reason": r} for k, v, r in sp.pruned],
                      default, best, confirm, stopped, spent["measured"], spent["cached"],
                      spent["device_s"], str(tuned.path))


def _confirm(dev, remote: str, job: Job, default: Trial, best: Trial, rounds: int):
    """Re-measure winner and default interleaved (ABBA); keep the winner only if it holds."""
    samples: dict[str, list[float]] = {default.key: [], best.key: []}
    order = [default, best]
    for i in range(rounds):
        for t in (order if i % 2 == 0 else order[::-1]):
            r = dev.run(remote, replace(job, config=t.config))
            if r.ok:
                samples[t.key].append(r.latency_ms["p50"])
    d, b = (statistics.median(samples[k]) if samples[k] else float("inf")
            for k in (default.key, best.key))
    confirm = {"default_p50_ms": d, "best_p50_ms": b, "speedup": d / b if b else None,
               "rounds": rounds, "kept": "best" if b < d else "default"}
    return (best if b < d else default), confirm
