"""The one budget rule every search applies: what a candidate's accuracy drop is, and whether it
is within the user's budgets.

"Not judged" (no accuracy figure: no eval data, or a device run without one) is never within
the accuracy budget. The unchanged model is judged by definition (its drop is 0), so without
data only it can meet the budget, and every search says so rather than passing the unknown.
"""
from __future__ import annotations

from device_runtime.evaluate import FIDELITY_SQNR_DB, accuracy_drop  # the device judges alike

__all__ = ["FIDELITY_SQNR_DB", "accuracy_drop", "within"]


def within(cand, max_accuracy_drop: float, latency_budget_ms: float | None = None) -> bool:
    """Whether a measured candidate meets the budgets: it ran, it was judged, its drop is at
    most `max_accuracy_drop`, and its latency (the interleaved median where it was re-measured,
    else its p50) is at most `latency_budget_ms` when one is set."""
    return bool(cand.ok and cand.accuracy_drop is not None
                and cand.accuracy_drop <= max_accuracy_drop
                and (latency_budget_ms is None or cand.latency_ms <= latency_budget_ms))
