"""Choosing among measured candidates: budgets, the Pareto front, the best trade-off."""
from __future__ import annotations

from ..measure import Candidate, Spread
from ..run.budget import within


def choose(cands: list[Candidate], cfg) -> Candidate | None:
    """Mark budget and Pareto flags; the fastest candidate within the budgets, or None; when
    others are within the noise of the fastest, `tie_break` decides among them. Once the
    contenders were re-measured interleaved, only they compete (a single run's p50 is never
    set against a median of rounds). Only
    candidates on the runtimes the user asked for (`cfg.backends`) can be chosen or be on the
    front: the others were measured as references."""
    allowed = getattr(cfg, "backends", None)
    eligible = [c for c in cands if allowed is None or c.backend in allowed]
    front = {c.id for c in pareto_front(eligible)}
    for c in cands:
        c.pareto = c.id in front
        c.within_budget = bool(c.model_sha256 and (allowed is None or c.backend in allowed)
                               and within(c, cfg.max_accuracy_drop, cfg.latency_budget_ms))
    ok = [c for c in cands if c.within_budget]
    if not ok:
        return None
    pool = [c for c in ok if c.confirm] or ok    # re-measured: only medians against medians
    fastest = min(pool, key=lambda c: c.latency_ms)
    return min([fastest, *within_noise_of(fastest, pool)], key=tie_break)


def within_noise_of(best: Candidate, cands: list[Candidate]) -> list[Candidate]:
    """The other candidates whose interleaved rounds overlap `best`'s: no measurement here can
    say which is faster (single measurements are never called ties: they have no spread)."""
    if not best.confirm:
        return []
    spread = Spread(**best.confirm)
    return [c for c in cands if c is not best and c.confirm
            and Spread(**c.confirm).overlaps(spread)]


def tie_break(c: Candidate) -> tuple:
    """Among candidates tied on speed: the more accurate (`fidelity_loss`: the drop, then the
    output SQNR, so where the SQNR floor judged, the model as given beats a lossy int8 one),
    then the smaller, then the simpler (fewer steps in its name: `+` between families, `-`
    between repairs), then by name, so the same job chooses the same candidate however the
    noise fell."""
    return (*fidelity_loss(c), c.size_bytes, c.id.count("+") + c.id.count("-"), c.id)


def fidelity_loss(c: Candidate) -> tuple[float, float]:
    """What a candidate lost, lowest best: its accuracy drop, then its output SQNR (a drop
    judged by the SQNR floor is 0 for every candidate above it, so SQNR orders those)."""
    return c.accuracy_drop, -(c.accuracy or {}).get("sqnr_db", 0.0)


def pareto_front(cands: list[Candidate]) -> list[Candidate]:
    """Candidates no other candidate beats on both latency and fidelity (`fidelity_loss`)."""
    ok = [c for c in cands if c.ok and c.accuracy_drop is not None]
    return [c for c in ok if not any(
        o is not c and o.latency_ms <= c.latency_ms and fidelity_loss(o) <= fidelity_loss(c)
        and (o.latency_ms < c.latency_ms or fidelity_loss(o) < fidelity_loss(c)) for o in ok)]


def best_tradeoff(cands: list[Candidate]) -> Candidate | None:
    """When nothing meets the budget, model.onnx holds the most accurate Pareto candidate."""
    front = [c for c in cands if c.pareto and c.model_sha256]
    return min(front, key=fidelity_loss) if front else None
