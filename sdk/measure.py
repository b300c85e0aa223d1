"""THE measurement path: every command that runs a model on a device goes through here.

`measure(device, bundle, job)` pushes (once per device and bundle), runs, retries a bundle the
device found damaged, and turns every failure into a Result carrying `error` and `stage` (it never
raises into a search). `interleave(device, trials)` re-measures contenders in rotating order and
reports each one's median over rounds with its spread: a single measurement on a busy device
flips rankings, and a difference inside the spread is noise, not a win. `Candidate` is the one
record of a measured model variant that quantize, tune and optimize all report.
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass, field, replace

from device_runtime.measure import BUSY_SHARE
from device_runtime.result import Result

from .bundle import Bundle
from .devices import Job
from .errors import StageError


@dataclass(kw_only=True)
class Candidate:
    """One measured variant: how it was made, how it ran, what it measured."""

    id: str
    recipe: dict = field(default_factory=dict)     # passes and settings that made the model
    backend: str = "onnxruntime"                   # the runtime that ran it on the device
    config: dict = field(default_factory=dict)     # runtime config it ran with
    key: str = ""                                  # identity for caches (tune: the variant)
    model_sha256: str = ""
    p50_ms: float | None = None
    p90_ms: float | None = None
    mean_ms: float | None = None
    runs: int = 0
    peak_rss_mb: float | None = None
    accuracy: dict | None = None
    accuracy_drop: float | None = None
    size_bytes: int = 0
    params: int = 0
    macs: int = 0
    error: str | None = None
    stage: str | None = None
    note: str = ""
    confirm: dict = field(default_factory=dict)    # Spread of an interleaved re-measurement
    within_budget: bool = False
    pareto: bool = False
    cached: bool = False
    device_s: float = 0.0
    host_s: float = 0.0                            # making the model on the host
    host_peak_rss_mb: float | None = None          # the host process's peak RSS by then
    device_load: dict | None = None                # others_share, loadavg while it was timed

    @property
    def ok(self) -> bool:
        return self.error is None and self.p50_ms is not None

    @property
    def latency_ms(self) -> float | None:
        """The figure rankings use: the interleaved median when there is one."""
        return self.confirm.get("median_ms", self.p50_ms) if self.confirm else self.p50_ms

    @classmethod
    def from_result(cls, cid: str, result: Result, model=None, **fields) -> "Candidate":
        lat = result.latency_ms or {}
        sizes = {} if model is None else {"size_bytes": model.facts.size_bytes,
                                          "params": model.facts.params, "macs": model.facts.macs}
        if result.backend:
            fields.setdefault("backend", result.backend)
        return cls(id=cid, p50_ms=lat.get("p50"), p90_ms=lat.get("p90"), mean_ms=lat.get("mean"),
                   runs=lat.get("runs", 0), peak_rss_mb=result.peak_rss_mb,
                   accuracy=result.accuracy, error=None if result.ok else result.error,
                   device_load=result.load,
                   stage=result.stage, **sizes, **fields)


def ms_digits(*values: float) -> int:
    """Decimals that keep three significant digits of the smallest value, so ranges that do
    not overlap do not print as if they did (0.0178-0.0179 vs 0.0184-0.0230, not 0.018s)."""
    smallest = min((v for v in values if v and v > 0), default=1.0)
    return max(3, 2 - math.floor(math.log10(smallest)))


@dataclass(kw_only=True)
class Spread:
    """Medians of interleaved rounds: the figure and how far the rounds disagreed."""

    median_ms: float
    low_ms: float
    high_ms: float
    rounds: int
    others_share: float | None = None   # the most other processes used of the device's cores
    p50s: list[float] = field(default_factory=list)   # per round, in the rounds' order

    @classmethod
    def of(cls, p50s: list[float], others_share: float | None = None) -> "Spread":
        """The median of per-round p50s with their range."""
        return cls(median_ms=statistics.median(p50s), low_ms=min(p50s), high_ms=max(p50s),
                   rounds=len(p50s), others_share=others_share, p50s=list(p50s))

    def then(self, more: "Spread") -> "Spread":
        """These rounds and `more` of the same trial, as one spread."""
        shares = [s for s in (self.others_share, more.others_share) if s is not None]
        return Spread.of(self.p50s + more.p50s, max(shares) if shares else None)

    def overlaps(self, other: "Spread") -> bool:
        """Inside each other's noise: neither can be called faster."""
        return self.low_ms <= other.high_ms and other.low_ms <= self.high_ms

    def beats(self, other: "Spread") -> bool:
        """Faster beyond the noise: a lower median and no overlap of the rounds' ranges."""
        return self.median_ms < other.median_ms and not self.overlaps(other)


def paired_ratios(a: Spread, b: Spread) -> list[float]:
    """a's ms over b's, round by round: both ran in the same rounds, close in time, so a
    device that drifts between rounds cancels out; the ratio of medians where rounds are
    missing (a failed round is left out of a spread)."""
    if a.p50s and len(a.p50s) == len(b.p50s):
        return [x / y for x, y in zip(a.p50s, b.p50s)]
    return [a.median_ms / b.median_ms]


def pinned(ratios: list[float], within: float = 0.05) -> bool:
    """Whether the middle half of per-round ratios lies within +-`within` of their median."""
    if len(ratios) < 3:
        return False
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    mid = statistics.median(ratios)
    return mid * (1 - within) <= q1 and q3 <= mid * (1 + within)


def push_once(device, bundle: Bundle) -> str:
    """Upload a bundle to a device at most once per device object (uploads are content-addressed
    on the device too; this saves the round trip that asks)."""
    pushed = device.__dict__.setdefault("_edgesmith_pushed", {})
    if bundle.id not in pushed:
        pushed[bundle.id] = device.push(bundle)
    return pushed[bundle.id]


def opset_skew(device, bundle: Bundle) -> dict | None:
    """The model's opset against the newest the device's onnxruntime reads, known before upload."""
    if bundle.manifest.backend != "onnxruntime":
        return None
    facts = device.facts()
    limit, opset = facts.get("ort_opset"), bundle.manifest.meta.get("opset")
    if limit and opset and opset > limit:
        return {"kind": "opset", "model": opset, "device_max": limit,
                "onnxruntime": facts.get("packages", {}).get("onnxruntime", "")}
    return None


def explain_skew(skew: dict, device_opset: int | None, model_opset: int | None) -> str:
    """One line from the structured skew fields: what is too new, and the opset that fits.

    For an IR version the host's onnx knows the newest opset that IR version carries; the model's
    own opset is kept when it fits, so the conversion only re-stamps the IR version."""
    from .passes.fuse import newest_opset_for_ir

    what = "IR version" if skew["kind"] == "ir_version" else "opset"
    limit = skew["device_max"]
    fits = newest_opset_for_ir(limit) if skew["kind"] == "ir_version" else limit
    fits = min(fits, device_opset or fits)
    opset = min(model_opset or fits, fits)
    return (f"the model's ONNX {what} {skew['model']} is newer than onnxruntime "
            f"{skew.get('onnxruntime', '')} on the device reads (up to {limit}): convert it with "
            f"`edgesmith fuse MODEL --opset {opset} -o OUT` or upgrade onnxruntime on the device "
            "(`edgesmith device setup`)")


def measure(device, bundle: Bundle, job: Job) -> Result:
    """push -> run on one device; a failed stage is a Result with `error`, never an exception."""
    t0 = time.perf_counter()
    job = replace(job, backend=bundle.manifest.backend)
    model_opset = bundle.manifest.meta.get("opset")
    try:
        skew = opset_skew(device, bundle)
        if skew:
            return Result.failure("load", explain_skew(skew, skew["device_max"], model_opset),
                                  device=device.facts(), skew=skew)
        remote = push_once(device, bundle)
        pushed_ms = (time.perf_counter() - t0) * 1e3
        result = device.run(remote, job)
        if result.stage == "verify" and hasattr(device, "forget"):
            print(f"note: {device.name}: the bundle there failed its check ({result.error}); "
                  "uploading it again", file=sys.stderr, flush=True)     # said, not silent
            device.forget(remote)      # damaged on the device: upload afresh, once
            device.__dict__.get("_edgesmith_pushed", {}).pop(bundle.id, None)
            result = device.run(push_once(device, bundle), job)
    except StageError as exc:
        return Result.failure(exc.stage, exc.message)
    result.stages_ms["push"] = pushed_ms
    if result.skew:
        result.error = explain_skew(result.skew, (result.device or {}).get("ort_opset"),
                                    model_opset)
    return result


def interleave(device, trials: dict[str, tuple[Bundle, Job]], rounds: int = 3
               ) -> dict[str, Spread]:
    """Each trial's p50 per round, in rotating order (no trial always runs first or last);
    the median over rounds with its low/high. Failed rounds are left out; a trial that never
    ran is missing from the answer."""
    if (together := _in_one_process(device, trials, rounds)) is not None:
        return together
    names = list(trials)
    samples: dict[str, list[float]] = {n: [] for n in names}
    busy: dict[str, float] = {}
    for i in range(rounds):
        shift = i % max(1, len(names))
        for name in names[shift:] + names[:shift]:
            bundle, job = trials[name]
            result = measure(device, bundle, job)
            if result.ok and result.latency_ms:
                samples[name].append(result.latency_ms["p50"])
                share = (result.load or {}).get("others_share")
                if share is not None:
                    busy[name] = max(share, busy.get(name, 0.0))
    return {n: Spread.of(s, busy.get(n)) for n, s in samples.items() if s}


def _in_one_process(device, trials: dict[str, tuple[Bundle, Job]], rounds: int
                    ) -> dict[str, Spread] | None:
    """The rounds in one runtime process (`device_runtime compare`): sessions load once, no
    process starts between trials (a third of a confirmation's time on a small model). Only
    for timing-only trials of one job whose models fit the device's memory several times
    over (all stay loaded); None when it does not apply or the device could not do it, and
    the caller measures one run at a time."""
    jobs = [replace(job, backend="") for _, job in trials.values()]     # a bundle says its own
    if len(trials) < 2 or any(j != jobs[0] for j in jobs) or not hasattr(device, "compare"):
        return None
    job = jobs[0]
    if job.evaluate or job.profile_ops:
        return None
    try:
        memory_mb = device.facts().get("memory_mb") or 0
        if sum(b.manifest.files.get(b.manifest.model, {}).get("size", 0)
               for b, _ in trials.values()) * 4 > memory_mb * 1e6 / 2 or \
                any(opset_skew(device, b) for b, _ in trials.values()):
            return None
        paths = {name: push_once(device, bundle) for name, (bundle, _) in trials.items()}
        reply = device.compare(list(dict.fromkeys(paths.values())), job, rounds)
    except StageError:
        return None
    if not reply.get("ok"):
        return None
    share = (reply.get("load") or {}).get("others_share")
    rounds_ms = reply.get("p50_ms", {})
    return {name: Spread.of(rounds_ms[path], share) for name, path in paths.items()
            if rounds_ms.get(path)}


def busy_note(spreads) -> str | None:
    """One line when other processes used more than BUSY_SHARE of the device's cores during
    any of these re-measurements, None when the device was quiet (or could not say)."""
    shares = [s.others_share for s in spreads if s.others_share is not None]
    if not shares or max(shares) <= BUSY_SHARE:
        return None
    return (f"the device was busy: other processes used up to {max(shares):.0%} of its cores "
            "while these figures were measured, so they are unreliable; measure again on an "
            "idle device")
