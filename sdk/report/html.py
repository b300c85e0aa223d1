"""report.json and a self-contained report.html (inline SVG: no scripts, no network)."""
from __future__ import annotations

import html
import json
import math
from dataclasses import asdict
from pathlib import Path

from device_runtime.evaluate import FIDELITY_SQNR_DB, SQNR_CAP_DB

from ..measure import ms_digits
from ..model import atomic_write
from .plot import PAD, W, Axes, label_svg, leader_svg, place_labels, segment_boxes
from .text import budget_line

def judged_metric(report) -> tuple[str, str | None]:
    """(axis title, accuracy key) of the metric the candidates were judged by: top-1 with
    labels, agreement with the original for class scores, else output SQNR (detectors, maps,
    features)."""
    accs = [c.accuracy or {} for c in report.candidates if c.ok]
    if any("top1" in a for a in accs):
        return "top-1 accuracy", "top1"
    if any("agreement" in a for a in accs):
        return "top-1 agreement with the original", "agreement"
    if any("sqnr_db" in a for a in accs):
        return f"output SQNR vs the original, dB (>= {FIDELITY_SQNR_DB:g} kept)", "sqnr_db"
    return "accuracy not judged (no --eval or --calib)", None


def _y_values(report, key: str | None) -> tuple[dict, float, float, dict]:
    """Each candidate's plotted y (None: not judged), the range to show, and tick texts."""
    cands = [c for c in report.candidates if c.ok]
    ys = {c.id: (c.accuracy or {}).get(key) if key else None for c in cands}
    ys = {k: v if isinstance(v, (int, float)) and math.isfinite(v) else None   # NaN: not judged
          for k, v in ys.items()}
    judged = [v for v in ys.values() if v is not None]
    if key == "sqnr_db":    # identical outputs (the cap) sit on the top tick, marked so
        finite = [v for v in judged if v < SQNR_CAP_DB]
        lo, hi = min([FIDELITY_SQNR_DB - 5] + finite), max(finite, default=FIDELITY_SQNR_DB) + 10
        return ys, lo, hi, {"cap": "identical"}
    if not judged:
        return ys, 0.0, 1.0, {}
    lo, hi = min(judged), max(judged)
    budget = _accuracy_floor(report, key)
    if budget is not None:
        lo = min(lo, budget)
    span = max(hi - lo, 0.01)
    return ys, max(0.0, lo - 0.1 * span), min(1.0, hi + 0.1 * span), {}


def _accuracy_floor(report, key: str | None) -> float | None:
    """The lowest accuracy the budget accepts (the original's less the allowed drop)."""
    base = next((c for c in report.candidates if c.id == "fp32" and c.ok), None)
    value = (base.accuracy or {}).get(key) if base and key in ("top1", "agreement") else None
    return None if value is None else value - report.config["max_accuracy_drop"]


def scatter_svg(report) -> str:
    """Every measured candidate at its one latency figure (`latency_scale`) against the judged
    metric; the Pareto front as a staircase, the budget's floor dashed, the chosen one red."""
    from .text import latency_scale

    scale = latency_scale(report)
    cands = [c for c in report.candidates if c.ok and c.id in scale
             and math.isfinite(scale[c.id]["ms"] or math.nan)]
    if not cands:
        return "<p>No candidate ran on the device: nothing to plot.</p>"
    title, key = judged_metric(report)
    ys, lo, hi, marks = _y_values(report, key)
    ax = Axes.fit(max(scale[c.id]["ms"] for c in cands) * 1.1, lo, hi)
    if "cap" in marks:
        ax.ytick_text[ax.yticks[-1]] = marks["cap"]
    if key is None:
        ax.ytick_text = {v: "" for v in ax.yticks}

    def y_of(cid: str) -> float:
        v = ys[cid]
        if v is None:
            return ax.yticks[0] if key else (ax.yticks[0] + ax.yticks[-1]) / 2
        return ax.yticks[-1] if key == "sqnr_db" and v >= SQNR_CAP_DB else v

    parts = ax.svg_open("scatter", f"latency on {report.device}, ms (the table's figure)",
                        title)
    floor = FIDELITY_SQNR_DB if key == "sqnr_db" else _accuracy_floor(report, key)
    lines = []
    if floor is not None and ax.yticks[0] <= floor <= ax.yticks[-1]:
        parts.append(f'<line id="budget" x1="{PAD}" x2="{W - PAD}" y1="{ax.sy(floor):.1f}" '
                     f'y2="{ax.sy(floor):.1f}" stroke="#999" stroke-dasharray="3 3"/>')
        lines += segment_boxes([(PAD, ax.sy(floor)), (W - PAD, ax.sy(floor))])
    front = sorted((c for c in cands if c.pareto), key=lambda c: scale[c.id]["ms"])
    if front:
        steps, prev_y = [], None
        for c in front:
            x, y = ax.sx(scale[c.id]["ms"]), ax.sy(y_of(c.id))
            if prev_y is not None:
                steps.append((x, prev_y))
            steps.append((x, y))
            prev_y = y
        steps.append((W - PAD, prev_y))
        lines += segment_boxes(steps)
        parts.append('<polyline id="pareto" points="' + " ".join(f"{x:.1f},{y:.1f}"
                                                                 for x, y in steps) +
                     '" fill="none" stroke="#2a7" stroke-width="2" stroke-dasharray="6 3"/>')
    order = sorted(cands, key=lambda c: (c.id != report.chosen, not c.pareto))
    pts = []
    for c in order:
        chosen = c.id == report.chosen
        px, py, r = ax.sx(scale[c.id]["ms"]), ax.sy(y_of(c.id)), 8 if chosen else 5
        color = "#d22" if chosen else ("#2a7" if c.pareto else "#36c")
        fill = 'fill="white"' if ys[c.id] is None and key else f'fill="{color}"'
        parts.append(f'<circle class="point" data-id="{html.escape(c.id)}" '
                     f'data-ms="{scale[c.id]["ms"]}" cx="{px:.1f}" cy="{py:.1f}" r="{r}" '
                     f'{fill} stroke="{color}" fill-opacity="0.8"/>')
        pts.append((px, py, r, c.id + (" (chosen)" if chosen else "")))
    listed = []
    for (box, shown), c, (px, py, r, text) in zip(place_labels(pts, lines), order, pts):
        if shown:
            parts.append(leader_svg(px, py, r, box) + label_svg(box, shown, c.id))
        if shown != text:
            listed.append(f"{shown or '(no room)'}: {text} at {scale[c.id]['ms']:.3f} ms")
    parts.append("</svg>")
    key_list = ("<p class=\"plot-key\">Numbered points: " + html.escape("; ".join(listed))
                + "</p>") if listed else ""
    return "\n".join(parts) + key_list


def legend(report) -> str:
    _, key = judged_metric(report)
    cands = [c for c in report.candidates if c.ok]
    parts = [f"{len(cands)} measured candidate(s), each at the latency the table shows."]
    if any(c.pareto for c in cands):
        parts.append("Green dashed: the Pareto front (nothing is both faster and more "
                     "accurate).")
    if key == "sqnr_db":
        parts.append(f"Grey dashed: the {FIDELITY_SQNR_DB:g} dB floor a candidate must keep; "
                     "'identical': outputs equal to the original's.")
    elif _accuracy_floor(report, key) is not None:
        parts.append("Grey dashed: the lowest accuracy the budget accepts.")
    if key and any((c.accuracy or {}).get(key) is None for c in cands):
        parts.append("Hollow, on the bottom edge: not judged.")
    if report.chosen:
        parts.append("Red: chosen.")
    return " ".join(parts)


def _fmt(v, d=3):
    return "-" if v is None else f"{v:.{d}f}"


def _trial_row(t: dict, kept: str) -> str:
    vs = "" if t["vs_default"] is None else f"{t['vs_default']:.2f}x"
    note = "kept" if t["variant"] == kept else (t["error"] or "")
    return (f"<tr><td>{html.escape(t['variant'])}</td><td>{_fmt(t['p50_ms'])}</td><td>{vs}</td>"
            f"<td>{html.escape(note)}</td></tr>")


def _block_row(k: dict) -> str:
    cells = (k["block"], k["channels"], k["stride"], k["output_hw"], _fmt(k["onnxruntime_ms"]),
             _fmt(k["edgesmith_ms"]), k.get("verdict", ""))
    return "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>"


def tuning_html(tuning: dict) -> str:
    """The config search on the chosen model: each variant's figure or error, what was not
    tried and why, and edgesmith's kernels per block when a kernel variant was profiled."""
    if not tuning:
        return ("<p>No runtime config search ran (tuning budget 0, or it could not run: "
                "see the notes).</p>")
    rows = "".join(_trial_row(t, tuning["kept"]) for t in tuning["trials"]) + "".join(
        f"<tr><td>{html.escape(n['variant'])}</td><td></td><td></td><td>not tried: "
        f"{html.escape(n['reason'])}</td></tr>" for n in tuning["not_tried"])
    kernels = "" if not tuning["kernels"] else (
        "<h3>edgesmith kernels per block (per-node profile less the profiler's own cost per "
        "node, ms per run)</h3><table><tr><th>block</th><th>channels</th><th>stride</th>"
        "<th>output</th><th>onnxruntime</th><th>edgesmith</th><th>verdict</th></tr>"
        + "".join(_block_row(k) for k in tuning["kernels"]) + "</table>")
    return (f"<p>Config search: {html.escape(tuning['verdict'])}</p><table><tr><th>variant</th>"
            f"<th>p50 ms</th><th>vs default (1 run)</th><th>note</th></tr>{rows}</table>"
            f"{kernels}")


def _figure(f: dict | None) -> tuple[str, str]:
    if f is None:
        return "", ""
    spread = f" ({f['low_ms']:.3f}-{f['high_ms']:.3f})" if "rounds" in f else ""
    return f"{f['ms']:.3f}", f"{f['basis']}{spread}"


def _budget_text(report) -> str:
    _, key = judged_metric(report)
    text = (f"output SQNR &ge; {FIDELITY_SQNR_DB:g} dB" if key == "sqnr_db" else
            f"{'top-1' if key == 'top1' else 'agreement'} drop &le; "
            f"{report.config['max_accuracy_drop']}" if key else "accuracy not judged")
    if key and report.judged_on:
        text += f", judged on {html.escape(report.judged_on)}"
    if report.config["latency_budget_ms"]:
        text += f", latency &le; {report.config['latency_budget_ms']} ms"
    return text


def render_html(report) -> str:
    from .text import judged_drop, latency_scale, speedups

    speed, scale = speedups(report), latency_scale(report)
    rows = []
    for c in sorted(report.candidates, key=lambda c: (not c.ok, (scale.get(c.id) or {})
                                                      .get("ms") or 0)):
        acc = c.accuracy or {}
        cls = ' class="chosen"' if c.id == report.chosen else ""
        ms, basis = _figure(scale.get(c.id))
        rows.append(
            f"<tr{cls}><td>{html.escape(c.id)}</td><td>{ms}</td>"
            f"<td>{basis}</td>"
            f"<td>{f'{speed[c.id]:.2f}x' if c.id in speed else '-'}</td>"
            f"<td>{_fmt(acc.get('top1'), 4)}</td>"
            f"<td>{_fmt(acc.get('agreement'), 4)}</td><td>{_fmt(acc.get('sqnr_db'), 1)}</td>"
            f"<td>{judged_drop(c)}</td><td>{c.size_bytes / 1024:.0f}</td>"
            f"<td>{c.params:,}</td><td>{c.macs:,}</td><td>{_fmt(c.peak_rss_mb, 1)}</td>"
            f"<td>{'yes' if c.within_budget else 'no'}</td><td>{'yes' if c.pareto else ''}</td>"
            f"<td>{html.escape(c.error or c.note)}</td></tr>")
    rows += [f"<tr><td>{html.escape(sk['id'])}</td>" + "<td></td>" * 13 +
             f"<td>not tried: {html.escape(sk['reason'])}</td></tr>" for sk in report.skipped]
    ops = sorted(report.op_profile_ms.items(), key=lambda kv: -kv[1])
    total = sum(v for _, v in ops) or 1.0
    op_rows = "".join(
        f"<tr><td>{html.escape(op)}</td><td>{ms:.3f}</td><td><div class='bar' "
        f"style='width:{300 * ms / total:.0f}px'></div> {100 * ms / total:.1f}%</td></tr>"
        for op, ms in ops)
    facts = report.device_facts
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report.notes)
    rem = report.remeasure
    o, c = rem.get("original", {}), rem.get("chosen", {})
    d = ms_digits(c.get("low_ms"), o.get("low_ms"))
    remeasure = (f"<p>Re-measured interleaved ({c['rounds']} rounds, median and "
                 f"range): original {o['median_ms']:.{d}f} ms "
                 f"({o['low_ms']:.{d}f}-{o['high_ms']:.{d}f}), chosen "
                 f"{c['median_ms']:.{d}f} ms ({c['low_ms']:.{d}f}-{c['high_ms']:.{d}f}): "
                 + ("within noise." if rem["within_noise"] else f"{rem['speedup']:.2f}x.")
                 + (f" Split: the model {rem['model_gain']:.2f}x ({report.model_file} alone, "
                    f"both at the runtime defaults) x the runtime config "
                    f"{rem['config_gain']:.2f}x (the bundle's)." if "model_gain" in rem and not rem["within_noise"] else "")
                 + "</p>" if "chosen" in rem else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>edgesmith report: {html.escape(
        Path(report.model).name)}</title>
<style>body{{font-family:sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right}}
td:first-child,td:last-child{{text-align:left}}tr.chosen{{background:#fde2e2;font-weight:bold}}
.bar{{display:inline-block;height:10px;background:#36c}}</style></head><body>
<h1>edgesmith optimize: {html.escape(Path(report.model).name)}</h1>
<p><b>{html.escape(report.outcome)}</b>: {html.escape(report.summary)}</p>
<p>Device {html.escape(report.device)}: {html.escape(str(facts.get('arch')))},
{html.escape(str(facts.get('cpu')))}, {facts.get('cores')} cores,
{html.escape(' '.join(facts.get('cpu_flags', [])))}{' (emulated)' if facts.get('emulated') else ''}
&middot; target profile {html.escape(report.target)} &middot; budget: {_budget_text(report)}</p>
<h2>Latency vs accuracy</h2>
{scatter_svg(report)}
<p>{legend(report)}</p>
{remeasure}
<h2>Candidates</h2>
<table><tr><th>candidate</th><th>ms</th><th>how measured (range)</th><th>vs original</th>
<th>top-1</th><th>agreement</th>
<th>SQNR dB</th><th>drop</th><th>size KB</th><th>params</th><th>MACs</th><th>peak RSS MB</th>
<th>in budget</th><th>Pareto</th><th>note</th></tr>
{''.join(rows)}</table>
<h2>Where time goes on the device (chosen model, per op type)</h2>
<p>From onnxruntime's profiler: each op's time includes the profiler's own overhead, so the
sum exceeds the end-to-end latency on small models; read the shares, not the sum.</p>
<table><tr><th>op</th><th>ms per run</th><th>share</th></tr>{op_rows}</table>
<h2>Runtime config of the bundle</h2><pre>{html.escape(json.dumps(report.tuned_config or
                                                                  "runtime defaults kept",
                                                               indent=1))}</pre>
{tuning_html(report.tuning)}
<h2>Notes</h2><ul>{notes}</ul>
<p>edgesmith {html.escape(report.edgesmith)}; {html.escape(budget_line(report))}.</p>
</body></html>
"""


def write_reports(report, out: Path) -> None:
    atomic_write(out / "report.json", (json.dumps(asdict(report), indent=1, default=str) + "\n")
                 .encode())
    atomic_write(out / "report.html", render_html(report).encode())
