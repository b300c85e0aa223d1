"""Hand-drawn SVG plots for the HTML reports: axes with round ticks, points, and labels placed
where they overlap no other label, point or axis (a label with no free place becomes a number,
its name listed under the plot). Inline SVG keeps report.html one file with no script; the
layout is checked in headless Chromium by the tests (rendered boxes, not the source)."""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

W, H, PAD = 720, 420, 60
CHAR_W, LABEL_H = 6.8, 13.0      # point labels: 11px monospace is 6.6 px a character
LABEL_FONT = 'font-size="11" font-family="monospace"'


def nice_ticks(lo: float, hi: float, count: int = 5) -> tuple[list[float], int]:
    """Ticks at 1, 2 or 5 times a power of ten covering [lo, hi], and the decimals that print
    them exactly (0.9995 .. 1.0000 in steps of 0.0001, not six decimals of a fifth)."""
    if not hi > lo:
        lo, hi = lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    ticks = [round(i * step, 12) for i in range(first, last + 1)]
    return ticks, max(0, -math.floor(math.log10(step) + 1e-9))


@dataclass(kw_only=True)
class Point:
    x: float
    y: float
    label: str
    color: str = "#36c"
    radius: float = 5.0
    hollow: bool = False
    data: dict = field(default_factory=dict)       # data-* attributes (the figures it shows)


@dataclass(kw_only=True)
class Axes:
    """An x range from 0 and a y range, both widened to round ticks; pixel scales."""

    xticks: list[float]
    yticks: list[float]
    xdigits: int
    ydigits: int
    ytick_text: dict = field(default_factory=dict)     # tick value -> text shown instead

    @classmethod
    def fit(cls, xmax: float, ylo: float, yhi: float) -> "Axes":
        xticks, xd = nice_ticks(0.0, xmax)
        yticks, yd = nice_ticks(ylo, yhi)
        return cls(xticks=xticks, yticks=yticks, xdigits=xd, ydigits=yd)

    def sx(self, v: float) -> float:
        return PAD + (W - 2 * PAD) * (v - self.xticks[0]) / (self.xticks[-1] - self.xticks[0])

    def sy(self, v: float) -> float:
        lo, hi = self.yticks[0], self.yticks[-1]
        return H - PAD - (H - 2 * PAD) * (v - lo) / (hi - lo)

    def svg_open(self, svg_id: str, xlabel: str, ylabel: str) -> list[str]:
        parts = [f'<svg id="{svg_id}" xmlns="http://www.w3.org/2000/svg" width="{W}" '
                 f'height="{H}" viewBox="0 0 {W} {H}" role="img" '
                 f'aria-label="{html.escape(xlabel)} vs {html.escape(ylabel)}">',
                 f'<rect x="0" y="0" width="{W}" height="{H}" fill="white"/>',
                 f'<line class="axis" x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" '
                 'stroke="black"/>',
                 f'<line class="axis" x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" '
                 'stroke="black"/>',
                 f'<text class="axis-title" x="{W / 2}" y="{H - 15}" text-anchor="middle" '
                 f'font-size="13">{html.escape(xlabel)}</text>',
                 f'<text class="axis-title" x="15" y="{H / 2}" text-anchor="middle" '
                 f'font-size="13" transform="rotate(-90 15 {H / 2})">{html.escape(ylabel)}'
                 '</text>']
        for v in self.xticks:
            parts.append(f'<text class="xtick" data-value="{v}" x="{self.sx(v):.1f}" '
                         f'y="{H - PAD + 16}" font-size="11" text-anchor="middle">'
                         f'{v:.{self.xdigits}f}</text>')
        for v in self.yticks:
            text = self.ytick_text.get(v, f"{v:.{self.ydigits}f}")
            parts.append(f'<text class="ytick" data-value="{v}" x="{PAD - 6}" '
                         f'y="{self.sy(v) + 4:.1f}" font-size="11" text-anchor="end">'
                         f'{html.escape(text)}</text>')
        return parts


def axes(svg_id: str, xmax: float, ylo: float, yhi: float, xlabel: str, ylabel: str):
    """An SVG plot's opening, axes and round ticks: (parts, x scale, y scale); the caller
    appends its marks and the closing tag."""
    ax = Axes.fit(xmax, ylo, yhi)
    return ax.svg_open(svg_id, xlabel, ylabel), ax.sx, ax.sy


def _boxes_meet(a: tuple, b: tuple, gap: float = 2.0) -> bool:
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def _label_box(px: float, py: float, r: float, width: float, where: str,
               reach: float = 1.0) -> tuple:
    """(left, top, right, bottom) of a label `width` wide at side `where` of a point, `reach`
    times the near distance away (beyond 1 a leader line joins them)."""
    gap = (r + 4) * reach
    dx, dy = {"right": (gap, -LABEL_H / 2), "left": (-gap - width, -LABEL_H / 2),
              "above": (-width / 2, -gap - LABEL_H), "below": (-width / 2, gap),
              "above-right": (gap * 0.7, -gap * 0.7 - LABEL_H),
              "below-right": (gap * 0.7, gap * 0.7),
              "above-left": (-gap * 0.7 - width, -gap * 0.7 - LABEL_H),
              "below-left": (-gap * 0.7 - width, gap * 0.7)}[where]
    return (px + dx, py + dy, px + dx + width, py + dy + LABEL_H)


SIDES = ("right", "left", "above", "below", "above-right", "below-right", "above-left",
         "below-left")


def segment_boxes(points: list[tuple[float, float]], width: float = 2.0) -> list[tuple]:
    """The boxes a polyline of horizontal and vertical segments covers (labels keep off)."""
    return [(min(a[0], b[0]) - width, min(a[1], b[1]) - width, max(a[0], b[0]) + width,
             max(a[1], b[1]) + width) for a, b in zip(points, points[1:])]


def place_labels(points: list[tuple[float, float, float, str]], lines: list[tuple] = ()
                 ) -> list[tuple[tuple, str]]:
    """For each (px, py, radius, text): the label's box and the text drawn there. A place is
    taken only inside the plot area, clear of every point, axis, line box in `lines` and label
    placed before; a label that fits nowhere becomes its number (1-based), and failing that
    nothing ("")."""
    area = (PAD + 3, 8, W - 8, H - PAD - 3)
    dots = [(px - r, py - r, px + r, py + r) for px, py, r, _ in points] + list(lines)
    placed: list[tuple] = []
    out = []
    tries = [(text_or_number, where, reach) for text_or_number in (0, 1)
             for reach in REACHES for where in SIDES]
    for number, (px, py, r, text) in enumerate(points, 1):
        found = ((px, py, px, py), "")
        for use_number, where, reach in tries:
            shown = str(number) if use_number else text
            box = _label_box(px, py, r, CHAR_W * len(shown), where, reach)
            inside = area[0] <= box[0] and box[2] <= area[2] and area[1] <= box[1] and \
                box[3] <= area[3]
            if inside and not any(_boxes_meet(box, o) for o in placed + dots):
                found = (box, shown)
                break
        placed.append(found[0])
        out.append(found)
    return out


REACHES = (1.0, 2.5, 4.0, 6.0)     # near first; farther labels get a leader line


def leader_svg(px: float, py: float, r: float, box: tuple) -> str:
    """A thin line from a point's edge to its label's nearest edge, when the label is away."""
    cx, cy = min(max(px, box[0]), box[2]), min(max(py, box[1]), box[3])
    dist = math.hypot(cx - px, cy - py)
    if dist <= r + 6:
        return ""
    sx, sy = px + (cx - px) * r / dist, py + (cy - py) * r / dist
    return (f'<line class="leader" x1="{sx:.1f}" y1="{sy:.1f}" x2="{cx:.1f}" y2="{cy:.1f}" '
            'stroke="#888" stroke-width="0.8"/>')


def label_svg(box: tuple, text: str, data_for: str) -> str:
    """A placed label: left-aligned at its box, baseline near its bottom."""
    return (f'<text class="label" data-for="{html.escape(data_for)}" x="{box[0]:.1f}" '
            f'y="{box[3] - 3:.1f}" {LABEL_FONT}>{html.escape(text)}</text>')
