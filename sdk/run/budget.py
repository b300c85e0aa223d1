"""The one budget rule every search applies: what a candidate's accuracy drop is, and whether it
is within the user's budgets.

"Not judged" (no accuracy figure: no eval data, or a device run without one) is never within
the accuracy budget. The unchanged model is judged by definition (its drop is 0), so without
data only it can meet the budget, and every search says so rather than passing the unknown.
"""
from __future__ import annotations

FIDELITY_SQNR_DB = 25.0    # outputs that are not class scores (boxes, maps, sequences)


def accuracy_drop(base: dict | None, cand: dict | None, scores: bool = True) -> float | None:
    """Top-1 drop vs labels when there are labels, else 1 - top-1 agreement with fp32 for
    class scores (`scores`: ModelFacts.class_scores). Other outputs (a detector's boxes, an OCR
    map, pooled features) have no top-1: they pass (drop 0) when their SQNR against fp32
    reaches FIDELITY_SQNR_DB, and fail (drop 1) below. None: not judged."""
    if not base or not cand:
        return None
    if "top1" in base and "top1" in cand:
        return base["top1"] - cand["top1"]
    if "agreement" in cand and scores:
        return 1.0 - cand["agreement"]
    if "sqnr_db" in cand:
        return 0.0 if cand["sqnr_db"] >= FIDELITY_SQNR_DB else 1.0
    return None


def within(cand, max_accuracy_drop: float, latency_budget_ms: float | None = None) -> bool:
    """Whether a measured candidate meets the budgets: it ran, it was judged, its drop is at
    most `max_accuracy_drop`, and its latency (the interleaved median where it was re-measured,
    else its p50) is at most `latency_budget_ms` when one is set."""
    return bool(cand.ok and cand.accuracy_drop is not None
                and cand.accuracy_drop <= max_accuracy_drop
                and (latency_budget_ms is None or cand.latency_ms <= latency_budget_ms))
