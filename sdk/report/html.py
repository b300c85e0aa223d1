"""report.json and a self-contained report.html (inline SVG: no scripts, no network)."""
from __future__ import annotations

import html
import json
from dataclasses import asdict
from pathlib import Path

from ..measure import ms_digits
from ..model import atomic_write
from .text import budget_line

W, H, PAD = 720, 420, 60


def _metric(c) -> tuple[str, float | None]:
    acc = c.accuracy or {}
    if "top1" in acc:
        return "top-1 accuracy", acc["top1"]
    if "agreement" in acc:
        return "top-1 agreement with the original", acc["agreement"]
    return "accuracy", None


def scatter_svg(report) -> str:
    pts = [(c, c.latency_ms, _metric(c)[1]) for c in report.candidates if c.ok]
    pts = [p for p in pts if p[2] is not None]
    label = _metric(pts[0][0])[0] if pts else "accuracy"
    if not pts:
        return "<p>No candidate produced latency and accuracy figures.</p>"
    xmax = max(p[1] for p in pts) * 1.15
    ylo, yhi = min(p[2] for p in pts), max(p[2] for p in pts)
    ylo, yhi = max(0.0, ylo - 0.05 * max(yhi - ylo, 0.01)), min(1.0, yhi + 0.05 * max(
        yhi - ylo, 0.01))
    if yhi - ylo < 1e-6:
        ylo, yhi = ylo - 0.01, yhi + 0.01

    parts, sx, sy = axes("scatter", xmax, ylo, yhi,
                         f"latency on {report.device} (ms; interleaved median where "
                         "re-measured, else p50)", label)
    front = sorted((p for p in pts if p[0].pareto), key=lambda p: p[1])
    if len(front) > 1:
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for _, x, y in front)
        parts.append(f'<polyline id="pareto" points="{path}" fill="none" stroke="#2a7" '
                     f'stroke-width="2" stroke-dasharray="6 3"/>')
    placed: list[tuple[float, float, float]] = []      # (left, right, baseline) of labels
    for c, x, y in pts:
        chosen = c.id == report.chosen
        color = "#d22" if chosen else ("#2a7" if c.pareto else "#36c")
        px, py = sx(x), sy(y)
        parts.append(f'<circle class="point" cx="{px:.1f}" cy="{py:.1f}" '
                     f'r="{8 if chosen else 5}" fill="{color}" fill-opacity="0.8"/>')
        text = c.id + (" (chosen)" if chosen else "")
        width = 6.2 * len(text)           # ~ 11px sans-serif
        right_half = px > W * 0.55        # labels grow leftwards there, so none is clipped
        left = px - 9 - width if right_half else px + 9
        ly = py - 7
        while any(abs(ly - oy) < 13 and left < r and left + width > lft
                  for lft, r, oy in placed):
            ly += 14                      # step down past labels already drawn there
        placed.append((left, left + width, ly))
        parts.append(f'<text x="{px - 9 if right_half else px + 9:.1f}" y="{ly:.1f}" '
                     f'font-size="11" text-anchor="{"end" if right_half else "start"}">'
                     f'{html.escape(text)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def axes(svg_id: str, xmax: float, ylo: float, yhi: float, xlabel: str, ylabel: str):
    """An SVG plot's opening, axes, labels and ticks: (parts, x scale, y scale); the caller
    appends its marks and the closing tag."""
    def sx(v):
        return PAD + (W - 2 * PAD) * v / xmax

    def sy(v):
        return H - PAD - (H - 2 * PAD) * (v - ylo) / (yhi - ylo)

    parts = [f'<svg id="{svg_id}" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
             f'viewBox="0 0 {W} {H}" role="img" aria-label="{html.escape(xlabel)} vs '
             f'{html.escape(ylabel)}">',
             f'<rect x="0" y="0" width="{W}" height="{H}" fill="white"/>',
             f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="black"/>',
             f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" stroke="black"/>',
             f'<text x="{W / 2}" y="{H - 15}" text-anchor="middle" font-size="13">'
             f'{html.escape(xlabel)}</text>',
             f'<text x="15" y="{H / 2}" text-anchor="middle" font-size="13" '
             f'transform="rotate(-90 15 {H / 2})">{html.escape(ylabel)}</text>']
    xdigits, ydigits = _digits(xmax / 5), _digits((yhi - ylo) / 5)
    for i in range(6):
        xv, yv = xmax * i / 5, ylo + (yhi - ylo) * i / 5
        parts.append(f'<text x="{sx(xv):.1f}" y="{H - PAD + 16}" font-size="11" '
                     f'text-anchor="middle">{xv:.{xdigits}f}</text>')
        parts.append(f'<text x="{PAD - 6}" y="{sy(yv) + 4:.1f}" font-size="11" '
                     f'text-anchor="end">{yv:.{ydigits}f}</text>')
    return parts, sx, sy


def _digits(step: float) -> int:
    """Decimals that make ticks `step` apart read as different numbers."""
    import math

    return max(1, min(6, 1 - math.floor(math.log10(step)))) if step > 0 else 3


def legend(report) -> str:
    pts = [c for c in report.candidates if c.ok and _metric(c)[1] is not None]
    front = [c for c in pts if c.pareto]
    parts = [f"{len(pts)} candidate(s) with latency and accuracy."]
    if len(front) > 1:
        parts.append("Green dashed: the Pareto front (nothing is both faster and more accurate).")
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


def render_html(report) -> str:
    from .text import speedups

    speed = speedups(report)
    rows = []
    for c in sorted(report.candidates, key=lambda c: (not c.ok, c.latency_ms or 0)):
        acc = c.accuracy or {}
        cls = ' class="chosen"' if c.id == report.chosen else ""
        conf = (report.remeasure.get("chosen") if c.id == report.chosen else None) or c.confirm
        confirmed = (f"{conf['median_ms']:.3f} ({conf['low_ms']:.3f}-{conf['high_ms']:.3f})"
                     if conf else "")
        rows.append(
            f"<tr{cls}><td>{html.escape(c.id)}</td><td>{_fmt(c.p50_ms)}</td>"
            f"<td>{confirmed}</td>"
            f"<td>{f'{speed[c.id]:.2f}x' if c.id in speed else '-'}</td>"
            f"<td>{_fmt(acc.get('top1'), 4)}</td>"
            f"<td>{_fmt(acc.get('agreement'), 4)}</td><td>{_fmt(acc.get('sqnr_db'), 1)}</td>"
            f"<td>{_fmt(c.accuracy_drop, 4)}</td><td>{c.size_bytes / 1024:.0f}</td>"
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
&middot; target profile {html.escape(report.target)} &middot; budget: accuracy drop &le;
{report.config['max_accuracy_drop']}{f", p50 &le; {report.config['latency_budget_ms']} ms"
                                     if report.config['latency_budget_ms'] else ''}</p>
<h2>Latency vs accuracy</h2>
{scatter_svg(report)}
<p>{legend(report)}</p>
{remeasure}
<h2>Candidates</h2>
<table><tr><th>candidate</th><th>p50 ms</th><th>re-measured ms (range)</th><th>vs original</th>
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
