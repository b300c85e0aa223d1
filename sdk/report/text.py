"""What users read: a terminal table with the configuration beside the figures, like trtexec."""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from device_runtime.evaluate import SQNR_CAP_DB
from device_runtime.result import Result

from ..measure import BUSY_SHARE
from ..model import atomic_write


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _sqnr(value) -> str:
    """Outputs equal to the reference's are 'exact', not the cap the JSON stores."""
    return "exact" if value is not None and value >= SQNR_CAP_DB else _fmt(value, 1)


def config_summary(result: Result) -> str:
    cfg = result.config or {}
    if result.backend == "onnxruntime":
        providers = ",".join(p if isinstance(p, str) else p[0] for p in cfg.get("providers", []))
        threads = cfg.get("intra_op_threads", 0) or "auto"
        return (f"{providers.replace('ExecutionProvider', '')} threads={threads} "
                f"opt={cfg.get('graph_optimization_level')} {cfg.get('execution_mode')}")
    if result.backend == "tflite":
        d = result.delegation or {}
        share = f" ({d['delegated']}/{d['ops']} ops)" if d.get("ops") else ""
        return f"threads={cfg.get('threads') or 'auto'} xnnpack={cfg.get('xnnpack')}{share}"
    return json.dumps(cfg, sort_keys=True)


def delegation_text(d: dict) -> str:
    """XNNPACK's share in a line, naming what it left (the runtime's `Result.delegation`)."""
    if not d.get("applied", True):
        return (f"XNNPACK took none of the {d['ops']} ops (it did not start on the device, or "
                "has kernels for none of them): all ran on TFLite's reference kernels")
    text = f"XNNPACK took {d['delegated']} of {d['ops']} ops"
    if d["fallback"]:
        text += ("; left to TFLite's reference kernels (no XNNPACK kernel for the op or its "
                 "type): " + ", ".join(f"{k} x{v}" for k, v in sorted(d["fallback"].items())))
    return text


def results_table(rows: list[tuple[str, Result]], title: str = "edgesmith profile") -> Table:
    table = Table(title=title)
    for col in ("device", "backend / config", "load ms", "p50 ms", "p90 ms", "p99 ms", "mean ms",
                "runs", "peak RSS MB", "top-1", "agreement", "SQNR dB", "busy"):
        table.add_column(col, justify="left" if col in ("device", "backend / config") else "right")
    for name, r in rows:
        if not r.ok:
            table.add_row(name, f"[red]failed at {r.stage} (error below)[/red]", *[""] * 11)
            continue
        share = (r.load or {}).get("others_share")
        if share is not None and share > BUSY_SHARE:
            below(table, name, f"the device was busy: other processes used {share:.0%} of its "
                  "cores while it measured; these latencies are unreliable")
        lat, acc = r.latency_ms or {}, r.accuracy or {}
        device = f"{name} ({r.device.get('arch')}, {r.device.get('cores')} cores)"
        if r.device.get("emulated"):
            device += " [yellow]emulated[/yellow]"   # the CLI says why under the table
        versions = " ".join(f"{k} {v}" for k, v in r.versions.items() if isinstance(v, str))
        table.add_row(device, f"{versions}\n{config_summary(r)}", _fmt(r.load_ms, 1),
                      _fmt(lat.get("p50")), _fmt(lat.get("p90")), _fmt(lat.get("p99")),
                      _fmt(lat.get("mean")), str(lat.get("runs", "-")), _fmt(r.peak_rss_mb, 1),
                      _fmt(acc.get("top1"), 4), _fmt(acc.get("agreement"), 4),
                      _sqnr(acc.get("sqnr_db")), "-" if share is None else f"{share:.0%}")
    return table


def print_table(table: Table) -> None:
    """The table, then its long texts (errors, reasons not tried) one line each, as written:
    no markup read into them, no paragraph wrapped into a narrow cell."""
    Console(file=sys.stdout, width=max(Console().width, 140)).print(table)
    for line in getattr(table, "below", []):
        print(line)


def below(table: Table, key: str, text: str) -> str:
    """Keep `text` for the lines under `table`; the cell says where it went."""
    table.below = getattr(table, "below", []) + [f"  {key}: {text}"]
    return "(below)"


def to_jsonable(obj):
    """Dataclasses as dicts, also inside lists and dicts (a list of pass reports)."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return obj


def write_json(path, obj) -> None:
    """`--json OUT`: machine-readable output, written atomically (or to the stream `--json -`
    gave: cli.common.json_to)."""
    text = json.dumps(to_jsonable(obj), indent=1, default=str) + "\n"
    if hasattr(path, "write"):
        path.write(text)
        path.flush()
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text.encode())


def budget_line(report) -> str:
    """How the run kept its --budget: the time taken, and how far past it when it was."""
    budget = report.config["budget_s"]
    if report.overshoot_s > 0:
        return (f"took {report.elapsed_s:.0f} s: {report.overshoot_s:.0f} s past the "
                f"{budget:.0f} s --budget (a candidate or closing step already under way)")
    return f"took {report.elapsed_s:.0f} s of the {budget:.0f} s --budget"


def age(seconds: float) -> str:
    """How long ago, in the unit a person would say it."""
    seconds = max(0.0, seconds)
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def tune_table(report) -> Table:
    """Ranked variants with the config beside each figure, plus what was pruned and why."""
    title = (f"edgesmith tune: {Path(report.model).name} on {report.device} "
             f"(target {report.target}; {report.measured} measured, {report.from_cache} cached"
             f"{', stopped: ' + report.stopped if report.stopped else ''})")
    table = Table(title=title)
    for col in ("#", "variant", "p50 ms", "p90 ms", "mean ms", "runs", "vs default (1 run)",
                "note"):
        table.add_column(col, justify="left" if col in ("variant", "note") else "right")
    base = report.default.p50_ms
    for i, t in enumerate(report.trials, 1):
        if not t.ok:
            table.add_row(str(i), escape(t.id), "", "", "", "", "", "[red]error[/red] " +
                          below(table, t.id, f"{t.stage}: {t.error}"))
            continue
        note = "kept" if t.key == report.best.key else ("default" if t.key == report.default.key
                                                        else "")
        table.add_row(str(i), t.id, _fmt(t.p50_ms), _fmt(t.p90_ms), _fmt(t.mean_ms),
                      str(t.runs), f"{base / t.p50_ms:.2f}x" if base else "-",
                      " ".join(filter(None, (note, "(cached)" if t.cached else ""))))
    for p in report.pruned:
        name = f"{p['knob']}={p['value']}"
        table.add_row("", escape(name), "", "", "", "", "", "[yellow]not tried[/yellow] " +
                      below(table, name, f"not tried: {p['reason']}"))
    if report.confirm:
        d, b = report.confirm["default"], report.confirm["best"]
        table.caption = (f"re-measured interleaved x{report.confirm['rounds']}: default "
                         f"{d['median_ms']:.3f} ms ({d['low_ms']:.3f}-{d['high_ms']:.3f}), "
                         f"rank 1 {b['median_ms']:.3f} ms ({b['low_ms']:.3f}-{b['high_ms']:.3f})"
                         f" -> kept {report.confirm['kept']}")
    return table


def kernels_table(report) -> Table:
    """Per fused block: onnxruntime's nodes against edgesmith's kernel, profiled on the device."""
    variant = report.kernels[0].get("variant", "") if report.kernels else ""
    table = Table(title=f"edgesmith kernels{f' ({variant})' if variant else ''}, per block "
                        "(per-node profile less the profiler's own cost per node, ms per run)")
    for col in ("block", "channels", "stride", "output", "onnxruntime", "edgesmith", "verdict"):
        table.add_column(col, justify="left" if col in ("block", "verdict") else "right")
    for row in report.kernels:
        parts = row["block"].strip("/").split("/")    # exporters' paths: the module is 2nd
        table.add_row(parts[1] if len(parts) > 2 else row["block"],
                      row["channels"], str(row["stride"]), row["output_hw"],
                      _fmt(row["onnxruntime_ms"]), _fmt(row["edgesmith_ms"]),
                      row.get("verdict", ""))
    return table


def quantize_table(report) -> Table:
    """Every measured recipe: latency vs fp32, accuracy and its drop, what was pruned and why."""
    table = Table(title=f"edgesmith quantize on {report.device} "
                        f"(max accuracy drop {report.max_accuracy_drop}); accuracy judged on "
                        f"{report.judged_on}")
    for col in ("recipe", "p50 ms", "vs fp32", "top-1", "agreement", "SQNR dB", "drop", "size KB",
                "host s", "note"):
        table.add_column(col, justify="left" if col in ("recipe", "note") else "right")
    base = report.baseline
    for c in [base] + report.candidates:
        if not c.ok:
            table.add_row(escape(c.id), *[""] * 8, "[red]error[/red] " +
                          below(table, c.id, c.error))
            continue
        acc = c.accuracy or {}
        note = "; ".join(filter(None, ["chosen" if c.id == report.chosen.id else "", c.note]))
        table.add_row(c.id, _fmt(c.p50_ms), f"{base.p50_ms / c.p50_ms:.2f}x",
                      _fmt(acc.get("top1"), 4), _fmt(acc.get("agreement"), 4),
                      _sqnr(acc.get("sqnr_db")), judged_drop(c),
                      f"{c.size_bytes / 1024:.0f}", f"{c.host_s:.1f}" if c.host_s else "",
                      escape(note))
    for p in report.pruned:
        table.add_row(escape(p["recipe"]), *[""] * 8, "[yellow]not tried[/yellow] " +
                      below(table, p["recipe"], f"not tried: {p['reason']}"))
    if report.kept_float:
        table.caption = f"kept in float: {', '.join(report.kept_float)}"
    return table


def why_worse_table(report) -> Table:
    """Per block of the int8 model: its share of the output error (quantized alone), and what
    int8 saves there on the device; the costliest per millisecond saved first."""
    table = Table(title=f"why int8 is worse, per block (on {report.device})")
    for col in ("block input", "layers", "error share", "SQNR alone dB", "fp32 ms", "int8 ms",
                "share per ms saved"):
        table.add_column(col, justify="left" if col == "block input" else "right")
    for r in report.sensitivity:
        table.add_row(r["block"][-48:], str(r["layers"]), f"{r['share']:.3f}",
                      _sqnr(r["sqnr_db"]), _fmt(r.get("fp32_ms"), 3), _fmt(r.get("int8_ms"), 3),
                      "no saving" if r.get("cost") is None else f"{r['cost']:.2f}")
    return table


def latency_scale(report) -> dict[str, dict]:
    """The one latency figure per measured candidate that the table, the summary, report.json
    and report.html all show, with how it was measured: the chosen one's is the shipped
    bundle's interleaved re-measurement (tuned config included), a contender's its median of
    the selection's interleaved rounds, any other its single run's p50."""
    rem, out = report.remeasure, {}
    for c in report.candidates:
        if not c.ok:
            continue
        spread = rem["chosen"] if c.id == report.chosen and "chosen" in rem else c.confirm
        if spread:
            out[c.id] = {"ms": spread["median_ms"], "low_ms": spread["low_ms"],
                         "high_ms": spread["high_ms"], "rounds": spread["rounds"],
                         "basis": f"median of {spread['rounds']} interleaved round(s)"
                                  + (" as shipped" if c.id == report.chosen else "")}
        else:
            out[c.id] = {"ms": c.p50_ms, "basis": "single run p50"}
    return out


def speedups(report) -> dict[str, float]:
    """Speedup over the original for every measured candidate, each against the original of
    the same interleaved rounds: the chosen one's is the summary's figure, the other
    contenders' come from the selection rounds, the rest from a single p50."""
    rem = report.remeasure
    original = rem.get("selection_original", rem.get("original", {})).get("median_ms")
    if original is None:
        fp32 = next((c for c in report.candidates if c.id == "fp32" and c.ok), None)
        original = fp32.p50_ms if fp32 else None
    out = {c.id: original / c.latency_ms for c in report.candidates if c.ok and original}
    if report.chosen and "speedup" in rem:
        out[report.chosen] = rem["speedup"]
    return out


def judged_drop(c) -> str:
    """The drop in the metric it was judged by: top-1 (labels) or agreement points, else the
    SQNR floor's verdict (a detector's boxes, a map, features have no top-1)."""
    acc, drop = c.accuracy or {}, c.accuracy_drop
    if drop is None:
        return "-"
    if "top1" in acc or ("agreement" in acc and abs(drop - (1 - acc["agreement"])) < 1e-9) \
            or "sqnr_db" not in acc:
        return _fmt(drop, 4)
    return "SQNR ok" if drop == 0 else "SQNR < 25 dB"


def _excluded(report, c) -> str:
    allowed = report.config.get("backends") or (c.backend,)
    return "" if c.backend in allowed else f"reference only ({c.backend} is not in --backends); "


def optimize_table(report) -> Table:
    """The same rows as report.html: every candidate, fastest first, then errors and skips."""
    table = Table(title=f"edgesmith optimize: {Path(report.model).name} on {report.device} "
                        f"(target {report.target})" + (f"; accuracy judged on {report.judged_on}"
                                                       if report.judged_on else ""))
    names = [c.id for c in report.candidates] + [s["id"] for s in report.skipped]
    table.add_column("candidate", no_wrap=True, min_width=max(map(len, names), default=9))
    for col in ("ms", "vs original", "top-1", "agreement", "SQNR dB", "drop", "size KB", "MACs",
                "in budget", "note"):       # a name is never cut: the note column gives way
        table.add_column(col, justify="left" if col == "note" else "right")
    speed, scale = speedups(report), latency_scale(report)
    noise = report.remeasure.get("within_noise")
    for c in sorted(report.candidates, key=lambda c: (not c.ok, c.latency_ms or 0)):
        if not c.ok:
            table.add_row(escape(c.id), *[""] * 9, "[red]error[/red] " +
                          below(table, c.id, f"{c.stage}: {c.error}"))
            continue
        acc = c.accuracy or {}
        mark = "[bold green]chosen[/bold green] " if c.id == report.chosen else ""
        if c.id == report.chosen and noise:
            mark += "(within noise) "
        figure = scale[c.id]
        table.add_row(c.id, _fmt(figure["ms"]) + ("" if "rounds" in figure else "*"),
                      f"{speed[c.id]:.2f}x" if c.id in speed else "-",
                      _fmt(acc.get("top1"), 4), _fmt(acc.get("agreement"), 4),
                      _sqnr(acc.get("sqnr_db")), judged_drop(c), f"{c.size_bytes / 1024:.0f}",
                      f"{c.macs:,}",
                      "yes" if c.within_budget else "no",
                      mark + ("Pareto " if c.pareto else "") + escape(_excluded(report, c) +
                                                                     c.note))
    for skip in report.skipped:
        table.add_row(escape(skip["id"]), *[""] * 9, "[yellow]not tried[/yellow] " +
                      below(table, skip["id"], f"not tried: {skip['reason']}"))
    table.caption = ("ms: median of interleaved rounds with the original where re-measured "
                     "(the fastest in-budget candidates; the chosen one as shipped, tuned "
                     "config included); * a single run's p50")
    return table
