"""One run of a search: the device and its facts, the matched target, the budget clock, the run
key and the resumable state under OUT, and one interleaved confirmation.

optimize, quantize, tune and nas all open a `Run`; it is the only place a device name becomes a
device (`resolve`), so every search reaches, fingerprints and matches devices the same way.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import EdgesmithError, StageError
from .budget import accuracy_drop, within

__all__ = ["Run", "accuracy_drop", "resolve", "within"]


def resolve(device="local", **ssh_options):
    """A device from `local`, an SSH destination or Host alias; a device object as it is."""
    from ..devices import get_device

    if device is None or isinstance(device, str):
        return get_device(device or "local", **ssh_options)
    return device


def _quiet(text: str) -> None:
    pass


@dataclass(kw_only=True)
class Run:
    """What every search shares: where it measures, what it may spend, where it resumes."""

    device: object
    facts: dict
    target: object                          # targets.Match: the profile and why it matched
    started: float = field(default_factory=time.monotonic)
    budget_s: float = math.inf              # wall clock for the whole run
    say: Callable[[str], None] = _quiet     # progress lines
    out: Path | None = None
    state: object = None                    # run.state.State under OUT, once `resume_in` ran
    notes: list[str] = field(default_factory=list)
    reserve_s: float = 0.0                  # of the budget, held back for the closing stages
    costs: dict[str, float] = field(default_factory=dict)   # slowest step of each kind, s

    @classmethod
    def open(cls, device="local", *, target=None, budget_s: float = math.inf, say=None,
             started: float | None = None) -> "Run":
        """Reach the device, read its facts, match its target profile (or take the named one,
        or a Match already made). An existing Run is returned as it is."""
        from ..targets import Match, get_profile, match

        if isinstance(device, Run):
            return device
        dev = resolve(device)
        try:
            facts = dev.facts()
        except StageError as exc:
            raise EdgesmithError(str(exc)) from None
        listed = getattr(dev, "target_profile", None)       # devices.toml `target = "..."`
        chosen = target if isinstance(target, Match) else \
            Match(get_profile(target), [f"chosen with --target {target}"]) if target else \
            Match(get_profile(listed), [f"chosen by target = {listed!r} in the device "
                                        "inventory"]) if listed else match(facts)
        notes = []
        if chosen.generic:
            notes.append(chosen.reasons[0])
        if facts.get("emulated"):
            notes.append(f"{dev.name} is emulated ({facts.get('cpu')}): latencies, and the "
                         "choices made by them, are not meaningful; accuracy and deployment are")
        return cls(device=dev, facts=facts, target=chosen, budget_s=budget_s,
                   say=say or _quiet, notes=notes,
                   started=time.monotonic() if started is None else started)

    @property
    def fingerprint(self) -> str:
        from ..devices import fingerprint

        return fingerprint(self.facts)

    def key(self, model, config: dict, **sources) -> dict:
        """The run key: everything that decides a result (the model's bytes and inputs, each
        data source's content, the device's fingerprint, the settings, edgesmith's version)."""
        from .. import __version__
        from .state import sha256, source_digest

        return {"model": sha256(model.serialized()),
                "inputs": [asdict(s) for s in model.inputs],
                **{name: source_digest(path) for name, path in sorted(sources.items())},
                "device": self.fingerprint, "config": config, "edgesmith": __version__}

    def resume_in(self, out_dir, key: dict, *, force: bool = False,
                  what: str = "output directory") -> None:
        """Claim OUT (never a directory edgesmith did not write, unless `force`) and open the
        state kept there under `key`: the same job resumes, a different one starts afresh."""
        from .outputs import claim, move_aside
        from .state import State

        self.out = claim(out_dir, force, what)
        self.state = State(self.out, key)
        if self.state.discarded:
            kept = move_aside(self.out)
            self.notes.append(f"{self.out} held results of a different run (changed: "
                              f"{', '.join(self.state.changed)}): started afresh"
                              + (f"; its result moved to {kept}" if kept else ""))

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def remaining_s(self) -> float:
        """What the searches may still spend: the budget less the time spent and the reserve."""
        return self.budget_s - self.elapsed_s() - self.reserve_s

    def over_budget(self) -> bool:
        return self.remaining_s() < 0

    def deadline(self) -> float:
        """The time.monotonic() by which long host work (reconstruction, distillation) stops."""
        return self.started + self.budget_s - self.reserve_s

    def spent(self, kind: str, seconds: float) -> None:
        """One step of `kind` took `seconds`: what the next one is expected to cost."""
        self.costs[kind] = max(self.costs.get(kind, 0.0), seconds)

    def fits(self, kind: str) -> str | None:
        """None when one more step of `kind` fits in the time left (its cost: the slowest seen
        so far; a kind not seen yet starts while any time is left, the one overshoot a budget
        allows); else why not, in words for the report."""
        left, need = self.remaining_s(), self.costs.get(kind, 0.0)
        if left > need:
            return None
        return (f"--budget ({self.budget_s:.0f}s) has {max(left, 0):.0f} s left for it, one "
                f"took {need:.0f} s" if need else f"--budget ({self.budget_s:.0f}s) was spent")

    def resumed(self, cid: str):
        """The candidate an interrupted run of this job already measured under `cid`."""
        return None if self.state is None else self.state.done.get(cid)

    def confirm(self, trials: dict, rounds: int = 3) -> dict:
        """Re-measure `trials` ({name: (bundle, job)}) interleaved on this run's device: each
        name's median over `rounds` with its spread (`measure.Spread`). Every search confirms
        through here, so what a 'faster' means is decided in one place (`Spread.beats`)."""
        from ..measure import interleave

        return interleave(self.device, trials, rounds)
