"""Field telemetry at bounded cost, per deployed version: calls, errors, a fixed-size log-bucket
latency histogram, input statistics (every `sample_every`-th call: mean, std, min, max per input
tensor), a class histogram per classifier output, and opt-in samples (a reservoir of N real
inputs). Flushed now and then as `<version>.<pid>.json` (+ `.npz`) by temp file and rename;
`summary` merges what every process flushed, and `drift` sets it against the calibration data's
statistics the bundle carries."""
from __future__ import annotations

import math
import os
import random
import threading
import time
from pathlib import Path

from .store import read_json, write_json

STEPS = 8            # buckets per doubling of latency: each bucket is 2^(1/8) = 9 % wide


def bucket(us: float) -> int:
    return max(0, int(STEPS * math.log2(max(us, 1.0))))


def percentile_us(hist: dict, q: float) -> float | None:
    """The q-th percentile from a histogram {bucket: count}, at its bucket's geometric middle."""
    total = sum(hist.values())
    if not total:
        return None
    seen = 0
    for b in sorted(hist, key=int):
        seen += hist[b]
        if seen >= q / 100 * total:
            return 2 ** ((int(b) + 0.5) / STEPS)
    return None


class Telemetry:
    def __init__(self, directory: Path, flush_s: float = 10.0, sample_every: int = 16,
                 capture: int = 0):
        self.dir, self.flush_s, self.sample_every = Path(directory), flush_s, max(1, sample_every)
        self.capture, self.samples, self.seen = capture, [], 0
        self.versions: dict = {}
        self._lock = threading.Lock()
        self._next_flush = time.monotonic() + flush_s

    def _entry(self, version: int) -> dict:
        if version not in self.versions:
            self.versions[version] = {"version": version, "calls": 0, "errors": 0,
                                      "latency_hist": {}, "inputs": {}, "classes": {},
                                      "load_error": None}
        return self.versions[version]

    def record(self, version: int, us: float, feed: dict, outputs: dict) -> None:
        with self._lock:
            entry = self._entry(version)
            entry["calls"] += 1
            hist, b = entry["latency_hist"], str(bucket(us))
            hist[b] = hist.get(b, 0) + 1
            if entry["calls"] % self.sample_every == 1 or self.sample_every == 1:
                self._statistics(entry, feed, outputs)
            if self.capture:
                self._reservoir(feed)
        if time.monotonic() >= self._next_flush:
            self.flush()

    def _statistics(self, entry: dict, feed: dict, outputs: dict) -> None:
        import numpy as np

        for name, x in feed.items():
            x = np.asarray(x)
            if x.dtype.kind not in "fiu" or not x.size:
                continue
            flat = x.reshape(-1).astype(np.float64, copy=False)
            s = entry["inputs"].setdefault(name, {"n": 0, "sum": 0.0, "sumsq": 0.0,
                                                  "min": float(flat[0]), "max": float(flat[0])})
            s["n"] += flat.size
            s["sum"] += float(flat.sum())
            s["sumsq"] += float(np.dot(flat, flat))
            s["min"], s["max"] = min(s["min"], float(flat.min())), max(s["max"], float(flat.max()))
        for name, y in outputs.items():
            if getattr(y, "ndim", 0) == 2 and y.dtype.kind == "f" and y.shape[1] > 1:
                counts = entry["classes"].setdefault(name, {})
                for c in y.argmax(axis=1).tolist():
                    counts[str(c)] = counts.get(str(c), 0) + 1

    def _reservoir(self, feed: dict) -> None:
        """Algorithm R: every call so far had the same chance to be among the kept samples."""
        import numpy as np

        self.seen += 1
        if len(self.samples) < self.capture:
            self.samples.append({k: np.array(v) for k, v in feed.items()})
        elif (j := random.randrange(self.seen)) < self.capture:
            self.samples[j] = {k: np.array(v) for k, v in feed.items()}

    def error(self, version: int) -> None:
        with self._lock:
            self._entry(version)["errors"] += 1

    def load_failed(self, version: int, message: str) -> None:
        with self._lock:
            self._entry(version)["load_error"] = message
        self.flush()

    def flush(self) -> None:
        with self._lock:
            self._next_flush = time.monotonic() + self.flush_s
            entries = [dict(e, updated=time.time()) for e in self.versions.values()]
            samples = list(self.samples)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            for entry in entries:
                write_json(self.dir / f"{entry['version']}.{os.getpid()}.json", entry)
            if samples:
                self._write_samples(samples)
        except OSError:
            pass     # a full disk must not fail the application's calls; the next flush retries

    def _write_samples(self, samples: list) -> None:
        import numpy as np

        path = self.dir / f"samples.{os.getpid()}.npz"
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, **{k: np.concatenate([s[k] for s in samples]) for k in samples[0]})
        os.replace(tmp, path)


def summary(directory: Path) -> dict:
    """{version: calls, errors, p50_ms, p99_ms, inputs {mean, std, min, max}, classes,
    load_error} merged over every process that served it."""
    merged: dict = {}
    for path in sorted(Path(directory).glob("*.*.json")) if Path(directory).is_dir() else ():
        e = read_json(path)
        if not isinstance(e.get("version"), int):
            continue
        m = merged.setdefault(e["version"], {"calls": 0, "errors": 0, "hist": {}, "inputs": {},
                                             "classes": {}, "load_error": None})
        m["calls"] += e.get("calls", 0)
        m["errors"] += e.get("errors", 0)
        m["load_error"] = e.get("load_error") or m["load_error"]
        for b, n in (e.get("latency_hist") or {}).items():
            m["hist"][b] = m["hist"].get(b, 0) + n
        for name, s in (e.get("inputs") or {}).items():
            t = m["inputs"].setdefault(name, {"n": 0, "sum": 0.0, "sumsq": 0.0,
                                              "min": s["min"], "max": s["max"]})
            for k in ("n", "sum", "sumsq"):
                t[k] += s[k]
            t["min"], t["max"] = min(t["min"], s["min"]), max(t["max"], s["max"])
        for name, counts in (e.get("classes") or {}).items():
            c = m["classes"].setdefault(name, {})
            for k, n in counts.items():
                c[k] = c.get(k, 0) + n
    out = {}
    for version, m in merged.items():
        p50, p99 = percentile_us(m["hist"], 50), percentile_us(m["hist"], 99)
        out[version] = {"calls": m["calls"], "errors": m["errors"], "load_error": m["load_error"],
                        "p50_ms": p50 and p50 / 1e3, "p99_ms": p99 and p99 / 1e3,
                        "classes": m["classes"], "inputs": {
                            name: {"mean": t["sum"] / t["n"], "std": math.sqrt(max(
                                0.0, t["sumsq"] / t["n"] - (t["sum"] / t["n"]) ** 2)),
                                "min": t["min"], "max": t["max"]}
                            for name, t in m["inputs"].items() if t["n"]}}
    return out


def drift(field: dict, calib: dict) -> dict:
    """Per input: whether the field statistics left the calibration data's (the mean moved by
    more than half the calibration std, or the range grew by more than a tenth), and why."""
    out = {}
    for name, f in (field or {}).items():
        c = (calib or {}).get(name)
        if not c:
            continue
        span = max(c["max"] - c["min"], 1e-12)
        why = []
        if abs(f["mean"] - c["mean"]) > 0.5 * max(c["std"], 1e-12):
            why.append(f"mean {f['mean']:.4g} vs {c['mean']:.4g} (std {c['std']:.4g})")
        if f["min"] < c["min"] - 0.1 * span or f["max"] > c["max"] + 0.1 * span:
            why.append(f"range [{f['min']:.4g}, {f['max']:.4g}] vs [{c['min']:.4g}, "
                       f"{c['max']:.4g}]")
        out[name] = {"drift": bool(why), "why": "; ".join(why)}
    return out
