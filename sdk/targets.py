"""Target profiles (`targets/*.toml`): what a class of device can run and how to measure it."""
from __future__ import annotations

import sys
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from .errors import EdgesmithError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ARCHES = ("x86_64", "aarch64", "armv7l")


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
    gpu: str | None = None
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


def profiles_dir() -> Path:
    """`targets/` next to the packages in a checkout; the installed copy otherwise."""
    here = Path(__file__).resolve().parent.parent / "targets"
    if here.is_dir():
        return here
    from importlib.resources import files
    return Path(str(files("edgesmith_targets")))


def load_profile(path: Path) -> TargetProfile:
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
    for name in ("cpu_features", "backends", "providers", "precisions"):
        if not isinstance(data[name], list):
            raise EdgesmithError(f"target profile {path}: field {name!r} must be a list")
    return TargetProfile(**data, path=str(path))


def all_profiles() -> dict[str, TargetProfile]:
    profiles = {}
    for path in sorted(profiles_dir().glob("*.toml")):
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
