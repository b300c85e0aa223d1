"""What a NetAdapt search reports: its iterations (the accuracy-vs-measured-latency curve),
the final and uniform-width models, each group's width before and after, and the latency
table's prediction error; as report.json, report.html (the curve as SVG) and a terminal table."""
from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.table import Table

from ..model import atomic_write

BUDGET_SLACK = 1.02     # a budget counts as met within 2 % (a quiet device's run-to-run spread)

NAS_SCHEMA = 1
LUT_TOLERANCE = 0.10        # a prediction within 10 % of the measurement counts as right


@dataclass(kw_only=True)
class Iteration:
    index: int
    group: str                 # the channel group narrowed (its producing nodes)
    width_before: int
    width_after: int
    predicted_ms: float        # table (or MACs) prediction, scaled by the last measurement
    measured_ms: float         # the kept model, measured whole on the device
    holdout_top1: float | None
    holdout_sqnr_db: float | None
    test_top1: float | None
    widths: dict               # every group's width after this iteration
    proposals: list            # every group's proposal: width, prediction, holdout accuracy
    finetune_s: float
    checked_ms: float | None = None   # measured interleaved with the original (the stop check)

    @property
    def lut_error(self) -> float | None:
        return self.predicted_ms / self.measured_ms - 1 if self.measured_ms else None

    def line(self) -> str:
        acc = (f"holdout top-1 {self.holdout_top1:.4f}" if self.holdout_top1 is not None
               else f"holdout SQNR {self.holdout_sqnr_db:.1f} dB")
        return (f"iteration {self.index}: {self.group} {self.width_before} -> "
                f"{self.width_after} channels; predicted {self.predicted_ms:.3f} ms, measured "
                f"{self.measured_ms:.3f} ms ({self.lut_error:+.1%}); {acc}")


@dataclass(kw_only=True)
class NasReport:
    edgesmith: str
    model: str
    device: str
    device_fingerprint: str
    proxy: str
    config: dict
    target_ms: float
    original_ms: float
    original_test_top1: float | None
    iterations: list[Iteration] = field(default_factory=list)
    final: dict | None = None
    uniform: dict | None = None
    widths_before: dict = field(default_factory=dict)
    widths_after: dict = field(default_factory=dict)
    lut: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    confirm: dict = field(default_factory=dict)   # name -> Spread: interleaved re-measurement
    stopped: str | None = None
    resumed: int = 0
    elapsed_s: float = 0.0
    schema: int = NAS_SCHEMA

    @property
    def lut_within_tolerance(self) -> float | None:
        """Share of iterations whose prediction was within LUT_TOLERANCE of the measurement."""
        errs = [it.lut_error for it in self.iterations if it.lut_error is not None]
        return sum(abs(e) <= LUT_TOLERANCE for e in errs) / len(errs) if errs else None

    def to_dict(self) -> dict:
        d = asdict(self)
        for it, row in zip(self.iterations, d["iterations"]):
            row["lut_error"] = it.lut_error
        d["lut"]["within_10pct"] = self.lut_within_tolerance
        return d

    def confirmed_ms(self, name: str, row: dict | None = None) -> float | None:
        """The interleaved median when the end of the search re-measured it, else `row`'s."""
        if name in self.confirm:
            return self.confirm[name]["median_ms"]
        return None if row is None else row["measured_ms"]

    @property
    def summary(self) -> str:
        last = self.final or ({"measured_ms": self.iterations[-1].measured_ms}
                              if self.iterations else None)
        if last is None:
            return f"no iteration completed ({self.stopped or 'the original met the budget'})"
        ms = self.confirmed_ms("netadapt", last)
        original = self.confirmed_ms("original") or self.original_ms
        budget_ms = self.target_ms
        if self.confirm and not self.config.get("latency_ms"):
            # a share of the original's latency: against the original measured in the same
            # rounds (the device may have drifted since the search's first measurement)
            budget_ms = self.target_ms / self.original_ms * original
        met = "met" if ms <= budget_ms * BUDGET_SLACK else "not met"
        basis = "interleaved medians" if self.confirm else "single measurements"
        text = (f"{ms:.3f} ms vs {original:.3f} ms original ({ms / original:.2f}x, {basis}; "
                f"budget {budget_ms:.3f} ms {met}) after {len(self.iterations)} "
                "iteration(s)")
        if self.final and self.final.get("test_top1") is not None:
            text += (f"; test top-1 {self.final['test_top1']:.4f} (original "
                     f"{self.original_test_top1:.4f}")
            if self.uniform and self.uniform.get("test_top1") is not None:
                text += (f", uniform width {self.uniform['test_top1']:.4f} at "
                         f"{self.confirmed_ms('uniform', self.uniform):.3f} ms")
            text += ")"
        return text


def nas_table(report: NasReport) -> Table:
    table = Table(title=f"edgesmith nas on {report.device} ({report.proxy} proxy)")
    for col in ("iteration", "narrowed", "width", "predicted ms", "measured ms", "error",
                "holdout", "test top-1"):
        table.add_column(col, justify="left" if col == "narrowed" else "right")
    table.add_row("0", "original", "", "", f"{report.original_ms:.3f}", "", "",
                  _f(report.original_test_top1))
    for it in report.iterations:
        hold = _f(it.holdout_top1) if it.holdout_top1 is not None else \
            f"{it.holdout_sqnr_db:.1f} dB"
        table.add_row(str(it.index), it.group, f"{it.width_before}->{it.width_after}",
                      f"{it.predicted_ms:.3f}", f"{it.measured_ms:.3f}", f"{it.lut_error:+.1%}",
                      hold, _f(it.test_top1))
    for key, row in (("netadapt", report.final), ("uniform", report.uniform)):
        if row:
            table.add_row("", row["name"], "", "", f"{report.confirmed_ms(key, row):.3f}", "",
                          _f(row.get("holdout_top1")), _f(row.get("test_top1")))
    if report.confirm:
        table.caption = ("final rows: interleaved medians of the original, the final model and "
                         "the baseline, re-measured in the same rounds")
    return table


def _f(v, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _accuracy(row: dict) -> float | None:
    return row.get("test_top1") if row.get("test_top1") is not None else row.get("holdout_top1")


def curve_svg(report: NasReport) -> str:
    """Accuracy (test top-1, else holdout) against measured latency: the search's path from the
    original, its final model, and the uniform-width baseline beside it."""
    from .plot import axes

    path = [(report.original_ms, report.original_test_top1)] + \
        [(it.measured_ms, it.test_top1 if it.test_top1 is not None else it.holdout_top1)
         for it in report.iterations]
    path = [p for p in path if p[1] is not None]
    extra = [(name, report.confirmed_ms(key, row), _accuracy(row)) for name, key, row in
             (("final", "netadapt", report.final), ("uniform width", "uniform", report.uniform))
             if row]
    extra = [e for e in extra if e[2] is not None]
    pts = path + [(x, y) for _, x, y in extra]
    if len(pts) < 2:
        return "<p>No accuracy figures to plot (the data has no labels).</p>"
    ylo, yhi = min(y for _, y in pts), max(y for _, y in pts)
    span = max(yhi - ylo, 0.01)
    parts, sx, sy = axes("curve", max(x for x, _ in pts) * 1.1, ylo - 0.1 * span,
                         yhi + 0.1 * span, f"measured latency on {report.device} (ms)",
                         "top-1")
    parts.append('<polyline id="search" fill="none" stroke="#36c" stroke-width="2" points="'
                 + " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in path) + '"/>')
    colors = {"final": "#d22", "uniform width": "#f80"}
    for name, x, y in extra:
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="6" fill="{colors[name]}"/>'
                     f'<text x="{sx(x) + 9:.1f}" y="{sy(y) + 4:.1f}" font-size="11">'
                     f'{html.escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def render_nas_html(report: NasReport) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(g)}</td><td>{w}</td><td>{report.widths_after.get(g, '-')}</td></tr>"
        for g, w in report.widths_before.items())
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report.notes)
    within = report.lut_within_tolerance
    lut = "" if within is None else (f"<p>Latency prediction within 10 % of the measurement in "
                                     f"{within:.0%} of iterations.</p>")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>edgesmith nas</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}td,th{{padding:2px 8px}}
</style></head><body><h1>NetAdapt on {html.escape(report.device)}</h1>
<p>{html.escape(report.summary)}</p>
<h2>Accuracy vs measured latency</h2>
<p>Blue: each iteration's kept model (test top-1 where a test set was given, else holdout).
Red: after the final distillation. Orange: uniform width scaling at the same latency.</p>
{curve_svg(report)}{lut}
<h2>Widths</h2><table><tr><th>channel group</th><th>before</th><th>after</th></tr>{rows}</table>
<h2>Notes</h2><ul>{notes}</ul>
<p>edgesmith {html.escape(report.edgesmith)}, {report.elapsed_s:.1f} s.</p></body></html>
"""


def write_nas_reports(report: NasReport, out: Path) -> None:
    atomic_write(Path(out) / "report.json",
                 (json.dumps(report.to_dict(), indent=1, default=str) + "\n").encode())
    atomic_write(Path(out) / "report.html", render_nas_html(report).encode())
