"""The Result contract: one JSON object per run, shared by the device and the host."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from . import RESULT_SCHEMA


@dataclass
class Result:
    bundle_sha256: str | None = None
    device: dict = field(default_factory=dict)
    backend: str | None = None
    versions: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    load_ms: float | None = None
    latency_ms: dict | None = None          # runs, warmup, p50, p90, p99, mean, min, max, samples
    peak_rss_mb: float | None = None
    load: dict | None = None                # others_share, loadavg_1m, cpu_mhz while measuring
    #                                          (+ share_when_waited after --wait-idle)
    accuracy: dict | None = None            # n, top1?, agreement?, sqnr_db?, max_abs_err?
    op_profile_ms: dict | None = None       # op type -> ms per run (mean over profiled runs)
    node_profile_ms: dict | None = None     # node of the optimised graph -> ms per run
    delegation: dict | None = None          # tflite: XNNPACK's share (ops, delegated, fallback)
    stages_ms: dict = field(default_factory=dict)
    window_s: list | None = None            # [start, end] epoch seconds holding the device lock
    meta: dict = field(default_factory=dict)
    error: str | None = None
    stage: str | None = None                # where it failed: connect, upload, verify, load, ...
    skew: dict | None = None                # model too new: kind, model, device_max, onnxruntime
    schema: int = RESULT_SCHEMA

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Result":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def failure(cls, stage: str, error: str, **extra) -> "Result":
        return cls(error=error, stage=stage, **extra)
