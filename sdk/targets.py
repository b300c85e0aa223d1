"""Target profiles (`targets/*.toml`): what a class of device can run and how to measure it."""
from __future__ import annotations

import sys
from dataclasses import MISSING, dataclass, field, fields

from .errors import EdgesmithError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ARCHES = ("x86_64", "aarch64", "armv7l")
MEASURE_KEYS = {"warmup", "runs", "min_time_s", "timeout_s"}


@dataclass(frozen=True)
class TargetProfile:
    name: str
    description: str
    arch: str
    cpu_features: list[str]
    cores: int
    memory_mb: int
    backends: list[str]
    providers: list[str]
    precisions: list[str]
    excludes_features: list[str] = field(default_factory=list)
    cpu_models: list[str] = field(default_factory=list)
    gpu: str | None = None          # "jetson" or "nvidia": needs that GPU in the device facts
    # pruned channel counts are kept multiples of this: onnxruntime's x86 conv kernels block
    # channels by the vector width (NCHWc: 16 fp32 lanes with AVX-512, 8 with AVX2), and a
    # count off the block costs reorders (benchmarks/real_models.py measures 8 against 16)
    channel_multiple: int = 8
    measure: dict = field(default_factory=dict)
    search: dict = field(default_factory=dict)
    path: str = ""

    def __post_init__(self):
        where = f"target profile {self.path or self.name}"
        if self.arch not in ARCHES:
            raise EdgesmithError(f"{where}: field 'arch' is {self.arch!r}; use one of {ARCHES}")
        if self.cores < 1 or self.memory_mb < 1:
            raise EdgesmithError(f"{where}: fields 'cores' and 'memory_mb' must be positive")
        unknown = set(self.precisions) - {"fp32", "fp16", "int8", "bf16"}
        if unknown:
            raise EdgesmithError(f"{where}: field 'precisions' has unknown {sorted(unknown)}")
        unknown = set(self.measure) - MEASURE_KEYS
        if unknown:
            raise EdgesmithError(f"{where}: field 'measure' has unknown {sorted(unknown)}; "
                                 f"use {sorted(MEASURE_KEYS)}")
        from .variants import KNOBS

        for knob, values in self.search.items():
            if knob not in KNOBS:
                raise EdgesmithError(f"{where}: field 'search.{knob}' is not a known knob "
                                     f"({sorted(KNOBS)})")
            if not isinstance(values, list) or not values:
                raise EdgesmithError(f"{where}: field 'search.{knob}' must be a non-empty list")
            bad = [v for v in values if not KNOBS[knob].accepts(v)]
            if bad:
                raise EdgesmithError(f"{where}: field 'search.{knob}' has invalid value(s) {bad}")

    def measure_job_args(self) -> dict:
        """Job(...) keyword arguments for this profile's measurement settings."""
        names = {"warmup": "warmup", "runs": "runs", "min_time_s": "min_time_s",
                 "timeout_s": "timeout_s"}
        return {names[k]: v for k, v in self.measure.items()}


def profile_files() -> list:
    """The shipped profiles: `targets/*.toml`, installed as the package `edgesmith_targets`
    (read through importlib.resources, so a wheel, a zip or an editable checkout all work)."""
    from importlib.resources import files

    return sorted((f for f in files("edgesmith_targets").iterdir()
                   if f.name.endswith(".toml")), key=lambda f: f.name)


def load_profile(path) -> TargetProfile:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise EdgesmithError(f"target profile {path}: cannot read it ({exc})") from None
    known = {f.name for f in fields(TargetProfile)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise EdgesmithError(f"target profile {path}: unknown field(s) {unknown}")
    required = {f.name for f in fields(TargetProfile)
                if f.default is MISSING and f.default_factory is MISSING}
    missing = sorted(required - set(data) - {"path"})
    if missing:
        raise EdgesmithError(f"target profile {path}: missing field(s) {missing}")
    for name in ("cpu_features", "backends", "providers", "precisions", "excludes_features",
                 "cpu_models"):
        if name not in data:
            continue
        if not isinstance(data[name], list):
            raise EdgesmithError(f"target profile {path}: field {name!r} must be a list")
    for name in ("cores", "memory_mb", "channel_multiple"):
        if name in data and (not isinstance(data[name], int) or data[name] < 1):
            raise EdgesmithError(f"target profile {path}: field {name!r} must be a positive "
                                 "integer")
    return TargetProfile(**data, path=str(path))


def all_profiles() -> dict[str, TargetProfile]:
    profiles = {}
    for path in profile_files():
        profile = load_profile(path)
        if profile.name in profiles:
            raise EdgesmithError(f"target profile {path}: name {profile.name!r} is used twice")
        profiles[profile.name] = profile
    return profiles


def get_profile(name: str) -> TargetProfile:
    profiles = all_profiles()
    if name not in profiles:
        raise EdgesmithError(f"unknown target {name!r}; `edgesmith targets` lists "
                             f"{sorted(profiles)}")
    return profiles[name]


@dataclass
class Match:
    profile: TargetProfile
    reasons: list[str]            # why it matched (or, for a generic profile, why none did)
    generic: bool = False
    rejected: dict[str, str] = field(default_factory=dict)   # profile name -> first failed check


def _check(profile: TargetProfile, facts: dict) -> tuple[list[str], str | None, int]:
    """(reasons it fits, first reason it does not, specificity score)."""
    flags = set(facts.get("cpu_flags", []))
    reasons = []
    if facts.get("arch") != profile.arch:
        return reasons, f"arch is {facts.get('arch')}, profile wants {profile.arch}", 0
    reasons.append(f"arch {profile.arch}")
    missing = [f for f in profile.cpu_features if f not in flags]
    if missing:
        return reasons, f"CPU lacks {missing}", 0
    reasons.append(f"CPU has {profile.cpu_features}")
    present = [f for f in profile.excludes_features if f in flags]
    if present:
        return reasons, f"CPU has {present}, which this profile excludes", 0
    if profile.excludes_features:
        reasons.append(f"CPU lacks {profile.excludes_features}")
    gpu = (facts.get("gpu") or {}).get("kind")
    if profile.gpu and gpu != profile.gpu:
        return reasons, f"needs a {profile.gpu} GPU, the device has {gpu or 'none'}", 0
    score = len(profile.cpu_features) + len(profile.excludes_features) + (5 if profile.gpu else 0)
    if profile.gpu:
        reasons.append(f"{gpu} GPU present")
    cpu = facts.get("cpu", "")
    if profile.cpu_models:
        if any(m.lower() in cpu.lower() for m in profile.cpu_models):
            reasons.append(f"CPU model {cpu}")
            score += 3
        else:
            reasons.append(f"CPU model {cpu!r} is not {profile.cpu_models} (features fit)")
    return reasons, None, score


# the distributions that give a device each backend (device_runtime/backends/)
BACKEND_PACKAGES = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
                    "tflite": ("ai-edge-litert", "tflite-runtime")}


def device_backends(facts: dict) -> list[str]:
    """The backends the device's installed packages can run."""
    packages = facts.get("packages") or {}
    return [b for b, dists in BACKEND_PACKAGES.items() if any(packages.get(d) for d in dists)]


def generic_profile(facts: dict) -> TargetProfile:
    """A profile built from the device's own facts when no shipped profile fits."""
    backends = device_backends(facts) or ["onnxruntime"]
    arch = facts.get("arch") if facts.get("arch") in ARCHES else "x86_64"
    cores = max(1, int(facts.get("cores") or 1))
    threads = sorted({1, min(2, cores), cores})
    return TargetProfile(
        name=f"generic-{arch}", description=f"built from the device's facts ({facts.get('cpu')})",
        arch=arch, cpu_features=list(facts.get("cpu_flags", [])), cores=cores,
        memory_mb=max(1, int(facts.get("memory_mb") or 1024)), backends=backends,
        providers=list(facts.get("ort_providers") or ["CPUExecutionProvider"]),
        precisions=["fp32", "int8"], measure={"warmup": 10, "runs": 50, "min_time_s": 1.0},
        channel_multiple=16 if "avx512f" in facts.get("cpu_flags", []) else 8,
        search={"threads": threads, "allow_spinning": [True, False],
                "graph_optimization_level": ["all", "extended"],
                "edgesmith_kernels": [0, "0@1", 4, 8, "0@14", "0@28", "0@56"]})


def match(facts: dict, profiles: dict[str, TargetProfile] | None = None) -> Match:
    """The most specific shipped profile the device's facts satisfy, else a generic one."""
    profiles = all_profiles() if profiles is None else profiles
    best, rejected = None, {}
    for profile in profiles.values():
        reasons, failure, score = _check(profile, facts)
        if failure:
            rejected[profile.name] = failure
        elif best is None or score > best[0]:
            best = (score, profile, reasons)
    if best is None:
        return Match(generic_profile(facts), ["no shipped profile fits this device; using a "
                                              "generic profile built from its facts"], True,
                     rejected)
    return Match(best[1], best[2], False, rejected)
