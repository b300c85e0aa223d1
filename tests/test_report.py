"""report.html's plot under crowding, checked in headless Chromium (tests/rendered.py). The
reports here are written by hand (a crowd of 14 candidates within 10 % of each other is rare in
a real run, and this is about layout); real runs' plots are checked in test_optimize.py and
test_corpus.py."""
from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from edgesmith.measure import Candidate
from edgesmith.pipeline import REPORT_SCHEMA, OptimizeReport
from edgesmith.pipeline.config import OptimizeConfig
from edgesmith.report import html as report_html
from edgesmith.report.html import render_html
from edgesmith.report.text import latency_scale
from edgesmith.search.select import choose
from rendered import check_plot, meet, plot_boxes

FACTS = {"arch": "x86_64", "cpu": "test", "cores": 2, "cpu_flags": []}


def crowd(metric: str) -> OptimizeReport:
    cands = [Candidate(id="fp32", p50_ms=10.0, model_sha256="0",
                       accuracy={"top1": 0.91, "sqnr_db": 200.0}, accuracy_drop=0.0)]
    for i in range(13):           # recipes 1-4 % apart, accuracies a few tenths of a point
        acc = {"top1": 0.905 - 0.001 * (i % 4), "sqnr_db": 31.0 + 0.3 * i}
        cands.append(Candidate(id=f"int8:qdq-u8s8-repair-{i}", p50_ms=6.0 + 0.06 * i,
                               model_sha256=str(i + 1), accuracy_drop=0.91 - acc["top1"]
                               if metric == "top1" else 0.0,
                               accuracy={k: v for k, v in acc.items()
                                         if metric == "top1" or k == "sqnr_db"}))
    if metric == "sqnr_db":
        cands[0].accuracy = {"sqnr_db": 200.0}
    cfg = OptimizeConfig()
    chosen = choose(cands, cfg)
    report = OptimizeReport(schema=REPORT_SCHEMA, edgesmith="test", model="crowd.onnx",
                            device="local", device_facts=FACTS, target="x86", target_reasons=[],
                            config=asdict(cfg), candidates=cands, skipped=[],
                            chosen=chosen.id, outcome="met", summary="")
    report.latency = latency_scale(report)
    return report


@pytest.mark.parametrize("metric", ["top1", "sqnr_db"])
def test_a_crowded_plot_keeps_every_label_clear(metric, tmp_path):
    report = crowd(metric)
    page = tmp_path / "report.html"
    page.write_text(render_html(report))
    boxes = plot_boxes(page, tmp_path)
    check_plot(boxes, json.loads(json.dumps(asdict(report), default=str)))
    assert 'class="leader"' in page.read_text()    # 14 names do not all fit beside their points
    ticks = [t["text"] for t in boxes["yticks"]]
    assert ticks[-1] == "identical" if metric == "sqnr_db" else ticks[-1].startswith("0.9")


def test_the_layout_check_catches_labels_placed_blindly(tmp_path, monkeypatch):
    """The check can fail: every label put right of its point overlaps in this crowd."""
    from edgesmith.report.plot import _label_box

    monkeypatch.setattr(report_html, "place_labels", lambda pts, lines=(): [
        (_label_box(px, py, r, 6.8 * len(text), "right"), text) for px, py, r, text in pts])
    report = crowd("top1")
    page = tmp_path / "report.html"
    page.write_text(render_html(report))
    boxes = plot_boxes(page, tmp_path)
    assert any(meet(a["box"], b["box"]) for i, a in enumerate(boxes["labels"])
               for b in boxes["labels"][i + 1:])
    with pytest.raises(AssertionError):
        check_plot(boxes, json.loads(json.dumps(asdict(report), default=str)))
