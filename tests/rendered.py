"""report.html as headless Chromium lays it out: the boxes of the plot's points, labels, ticks
and axes, read from the rendered page (a copy with a script added that writes them into the
DOM, dumped with --dump-dom), and the checks a reader's eye would make."""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

from conftest import require

PROBE = """<script>
const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
const all = q => [...document.querySelectorAll(q)];
const pre = document.createElement('pre');
pre.id = 'boxes';
pre.textContent = JSON.stringify({
  svg: all('#scatter').map(box)[0] || null,
  points: all('#scatter circle.point').map(e => ({id: e.dataset.id, ms: +e.dataset.ms,
                                                  box: box(e)})),
  labels: all('#scatter text.label').map(e => ({id: e.dataset.for, text: e.textContent,
                                                box: box(e)})),
  xticks: all('#scatter text.xtick').map(e => ({v: +e.dataset.value, text: e.textContent,
                                                box: box(e)})),
  yticks: all('#scatter text.ytick').map(e => ({v: +e.dataset.value, text: e.textContent,
                                                box: box(e)})),
  axes: all('#scatter line.axis').map(box),
  pareto: (document.getElementById('pareto') || {getAttribute: () => ''}).getAttribute('points'),
  key: all('.plot-key').map(e => e.textContent).join(' ')});
document.body.appendChild(pre);
</script>"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def plot_boxes(report_html: Path, tmp_path: Path) -> dict:
    """The rendered boxes (CSS pixels) of report.html's scatter plot."""
    browser = chromium()
    require(browser is not None, "chromium missing: .ci/run installs it (apt-get install chromium)")
    page = tmp_path / "probe.html"
    page.write_text(report_html.read_text().replace("</body>", PROBE + "</body>"))
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                           "--disable-quic", "--no-first-run", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={tmp_path / 'chromium-profile'}",
                           "--window-size=1200,900", "--dump-dom", f"file://{page}"],
                          capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="boxes">(.*?)</pre>', proc.stdout, re.S)
    assert found, proc.stderr[-2000:]
    return json.loads(html.unescape(found.group(1)))


def meet(a, b, gap: float = 0.0) -> bool:
    return a[0] < b[2] - gap and b[0] < a[2] - gap and a[1] < b[3] - gap and b[1] < a[3] - gap


def check_plot(boxes: dict, report: dict) -> None:
    """What a reader needs of the plot: every measured candidate drawn at the table's figure,
    the chosen one where the table says, readable distinct ticks, the Pareto front, and no
    label on another label, a point or an axis, none outside the picture."""
    figures = report["latency"]
    points = {p["id"]: p for p in boxes["points"]}
    assert set(points) == set(figures), (set(points), set(figures))
    for cid, p in points.items():
        assert abs(p["ms"] - figures[cid]["ms"]) <= 1e-9 * max(1.0, figures[cid]["ms"])
    xs = sorted(((t["box"][0] + t["box"][2]) / 2, t["v"]) for t in boxes["xticks"])
    (x0, v0), (x1, v1) = xs[0], xs[-1]
    span = v1 - v0
    for cid in ([report["chosen"]] if report["chosen"] else []) + list(points):
        b = points[cid]["box"]
        at = v0 + ((b[0] + b[2]) / 2 - x0) * (v1 - v0) / (x1 - x0)
        assert abs(at - figures[cid]["ms"]) <= 0.01 * span, (cid, at, figures[cid])
    for ticks in (boxes["xticks"], boxes["yticks"]):
        texts = [t["text"] for t in ticks]
        assert len(set(texts)) == len(texts), texts
        assert all(len(t.split(".")[1]) <= 4 for t in texts if "." in t), texts
    if any(c.get("pareto") for c in report["candidates"]):
        assert len(boxes["pareto"].split()) >= 2, boxes["pareto"]
    labels = boxes["labels"]
    svg = boxes["svg"]
    for i, a in enumerate(labels):
        assert svg[0] <= a["box"][0] and a["box"][2] <= svg[2] and svg[1] <= a["box"][1] and \
            a["box"][3] <= svg[3], ("clipped", a)
        for b in labels[i + 1:]:
            assert not meet(a["box"], b["box"]), ("labels overlap", a, b)
        for p in boxes["points"]:
            assert not meet(a["box"], p["box"]), ("label on a point", a, p)
        for line in boxes["axes"] + [t["box"] for t in boxes["xticks"] + boxes["yticks"]]:
            assert not meet(a["box"], line), ("label on an axis", a, line)
    for cid in points:     # labelled, or numbered and listed under the plot
        assert any(a["id"] == cid and cid in a["text"] for a in labels) or \
            cid in boxes["key"], (cid, labels, boxes["key"])
