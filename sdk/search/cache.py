"""The cache the searches share: device measurements kept as JSON lines under the cache dir,
keyed by a measurement context (what besides the device and the variant decides a timing), the
device's fingerprint and the entry's own key. tune keeps its trials here, NetAdapt's latency
table its kernels; an identical measurement is never taken twice."""
from __future__ import annotations

import fcntl
import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

from ..bundle import cache_dir
from ..devices import Job
from ..model import Model


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
                        self._entries[(rec["context"], rec["device"], rec["key"])] = rec["trial"]
                    except (ValueError, KeyError, TypeError):
                        continue   # a torn last line (or an older format) is skipped, not fatal
        return self._entries

    def get(self, context: str, device: str, key: str) -> dict | None:
        return self._load().get((context, device, key))

    def put(self, context: str, device: str, key: str, trial: dict) -> None:
        self._load()[(context, device, key)] = trial
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"context": context, "device": device, "key": key, "trial": trial,
                           "time": time.time()}) + "\n"
        with open(self.path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            fh.write(line)


def context_key(model: Model, job: Job) -> str:
    """What besides the device and variant decides a timing: model bytes, inputs, settings."""
    settings = {k: v for k, v in asdict(job).items()
                if k not in ("config", "evaluate", "wait_idle_s")}    # waiting changes no timing
    blob = json.dumps({"model": hashlib.sha256(model.serialized()).hexdigest(),
                       "inputs": [s.as_manifest() for s in model.inputs],
                       "job": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]
