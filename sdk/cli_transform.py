"""The model-transforming commands: fuse, quantize, prune, distill, tune, optimize.

They register on `sdk.cli.main`; `sdk.cli` imports this module at its end.
"""
from __future__ import annotations

import re
import sys

import click

from .cli import main, one_device, parse_duration, ssh_options
from .errors import EdgesmithError


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--device", "-d", default="local", show_default=True,
              help="`local`, user@host[:port] or a Host alias from ~/.ssh/config")
@ssh_options
@click.option("--target", "-t", help="target profile (default: matched from the device's facts)")
@click.option("--budget", default="120s", show_default=True, help="device time to spend, e.g. 10m")
@click.option("--max-trials", default=40, show_default=True, type=click.IntRange(1))
@click.option("--fresh", is_flag=True, help="measure again instead of answering from the cache")
@click.option("--input-shape", help="fix dynamic inputs: NAME=1x3x224x224[,NAME2=...]")
@click.option("-o", "--out", type=click.Path(file_okay=False),
              help="write the tuned bundle (best config in its manifest) to this directory")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="write the report here")
def tune(model, device, identity, accept_new_host_key, remote_python, target, budget, max_trials,
         fresh, input_shape, out, json_out):
    """Autotune MODEL's runtime config on a device; the result is never slower than the default."""
    from .model import load, parse_input_shapes
    from .report import copy_dir_atomic, print_table, tune_table, write_json
    from .tune import tune as run_tune

    dev = one_device(device, identity, accept_new_host_key, remote_python)
    quiet = bool(json_out)
    progress = (lambda t: click.echo(f"  {'cached ' if t.cached else ''}{t.label}: "
                                     f"{'error: ' + t.error if t.error else f'{t.p50_ms:.3f} ms'}",
                                     err=True)) if not quiet else None
    try:
        report = run_tune(load(model, parse_input_shapes(input_shape)), dev, target=target,
                          budget_s=parse_duration(budget), max_trials=max_trials, fresh=fresh,
                          on_trial=progress)
    except KeyboardInterrupt:
        click.echo("interrupted: measured trials are cached; run the same command to resume",
                   err=True)
        sys.exit(130)
    if out:
        copy_dir_atomic(report.bundle, out)
    if json_out:
        write_json(json_out, report)
    print_table(tune_table(report))
    click.echo(f"best: {report.best.label} (bundle {out or report.bundle})")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False))
@click.option("--ort-fusions", is_flag=True,
              help="also fuse Conv+activation into com.microsoft.FusedConv (onnxruntime only)")
@click.option("--opset", type=int,
              help="convert to this opset (also down, for a device with an older onnxruntime)")
@click.option("--input-shape", help="fix dynamic inputs: NAME=1x3x224x224[,NAME2=...]")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="write the report here")
def fuse(model, out, ort_fusions, opset, input_shape, json_out):
    """Fold constants and BatchNorms, fuse MatMul+Add, drop no-ops; outputs stay the same."""
    from .model import load, parse_input_shapes, save
    from .passes.fuse import PORTABLE_PIPELINE, convert_opset, fuse as run_fuse
    from .report import write_json

    m = load(model, parse_input_shapes(input_shape))
    passes = PORTABLE_PIPELINE + (["fuse_activations"] if ort_fusions else [])
    fused, reports = run_fuse(m.proto, passes)
    if opset is not None:
        try:
            fused, report = convert_opset(fused, opset)
        except Exception as exc:   # onnx's converter raises bare RuntimeErrors per op
            text = str(exc).strip().splitlines()[0]
            if found := re.search(r"No Adapter From Version \$(\d+) for (\w+)", text):
                text = (f"onnx has no down-converter for {found[2]} from opset {found[1]} (No "
                        f"Adapter); choose opset {found[1]} or later")
            raise EdgesmithError(f"cannot convert {model} to opset {opset}: {text}") from None
        reports.append(report)
    save(fused, out)
    if json_out:
        write_json(json_out, {"model": model, "out": out, "passes": reports})
    for r in reports:
        click.echo(f"{r.name:<22} {r.changed:4d} change(s)")
        for line in r.details[:20]:
            click.echo(f"    {line}")
    click.echo(f"wrote {out} ({len(m.proto.graph.node)} -> {len(fused.graph.node)} nodes)")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--calib", required=True, type=click.Path(exists=True),
              help="calibration data: .npz (inputs by name) or an image folder")
@click.option("--eval", "eval_path", type=click.Path(), help=".npz eval set to judge accuracy")
@click.option("--max-accuracy-drop", default=0.01, show_default=True, type=click.FloatRange(0, 1))
@click.option("--device", "-d", default="local", show_default=True,
              help="where recipes are measured: `local` or an SSH destination")
@ssh_options
@click.option("--recipe", help="skip the search and use this recipe (see the report's names)")
@click.option("--input-shape", help="fix dynamic inputs: NAME=1x3x224x224[,NAME2=...]")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False))
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="write the report here")
def quantize(model, calib, eval_path, max_accuracy_drop, device, identity, accept_new_host_key,
             remote_python, recipe, input_shape, out, json_out):
    """Quantize MODEL to int8 with the recipe that is fastest on the device within the budget."""
    from .model import load, parse_input_shapes, save
    from .recipes import choose_recipe, quantize_with
    from .report import print_table, quantize_table, write_json

    m = load(model, parse_input_shapes(input_shape))
    if recipe:
        proto, reports = quantize_with(m, recipe, calib)
        save(proto, out)
        if json_out:
            write_json(json_out, {"recipe": recipe, "passes": reports})
        click.echo(f"wrote {out} ({recipe})")
        return
    dev = one_device(device, identity, accept_new_host_key, remote_python)
    say = None if json_out else (lambda text: click.echo(f"  {text}", err=True))
    chosen, report = choose_recipe(m, dev, calib, eval_path, max_accuracy_drop, on_step=say)
    save(chosen.proto, out)
    if json_out:
        write_json(json_out, report)
    print_table(quantize_table(report))
    click.echo(report.summary)
    click.echo(f"wrote {out}")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--ratio", default=0.5, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="fraction of channels (structured) or weights (unstructured) removed")
@click.option("--structured/--unstructured", default=True, show_default=True)
@click.option("--importance", default="l1", show_default=True,
              type=click.Choice(["l1", "l2", "bn_gamma", "activation"]))
@click.option("--calib", type=click.Path(exists=True),
              help="data for --importance activation (.npz or image folder)")
@click.option("--global-ranking", is_flag=True, help="rank channels across layers, not per layer")
@click.option("--layer-ratio", multiple=True, help="NODE=RATIO for one layer (repeatable)")
@click.option("--n-m", help="unstructured N:M sparsity, e.g. 2:4")
@click.option("--input-shape", help="fix dynamic inputs: NAME=1x3x224x224[,NAME2=...]")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False))
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="write the report here")
def prune(model, ratio, structured, importance, calib, global_ranking, layer_ratio, n_m,
          input_shape, out, json_out):
    """Remove channels from MODEL's graph (structured) or zero small weights (unstructured)."""
    from .model import from_proto, load, parse_input_shapes, save
    from .passes.prune import PruneConfig, prune_channels, prune_unstructured
    from .report import write_json

    m = load(model, parse_input_shapes(input_shape))
    if structured:
        ratios = {}
        for item in layer_ratio:
            node, _, value = item.rpartition("=")
            try:
                ratios[node] = float(value)
            except ValueError:
                raise click.BadParameter(f"{item!r}; write NODE=0.3", param_hint="--layer-ratio")
        means = None
        if importance == "activation":
            if not calib:
                raise EdgesmithError("--importance activation needs --calib data")
            from .data import calibration_batches
            from .passes.equalize import channel_stats
            tensors = [n.output[0] for n in m.proto.graph.node if n.op_type in ("Conv", "Gemm")]
            means = channel_stats(m.proto, tensors, list(calibration_batches(calib, m, 16, 256)))[
                "mean"]
        try:
            cfg = PruneConfig(ratio=ratio, layer_ratios=ratios, importance=importance,
                              global_ranking=global_ranking)
        except ValueError as exc:
            raise EdgesmithError(str(exc)) from None
        pruned, report = prune_channels(m.proto, cfg, means)
    else:
        nm = None
        if n_m:
            try:
                nm = tuple(int(v) for v in n_m.split(":"))
                assert len(nm) == 2 and 0 < nm[0] < nm[1]
            except (ValueError, AssertionError):
                raise click.BadParameter(f"{n_m!r}; write N:M such as 2:4", param_hint="--n-m")
        pruned, report = prune_unstructured(m.proto, ratio, n_m=nm)
    after = from_proto(pruned, m)
    save(pruned, out)
    summary = {"params": [m.facts.params, after.facts.params],
               "macs": [m.facts.macs, after.facts.macs],
               "size_bytes": [m.facts.size_bytes, after.facts.size_bytes]}
    if json_out:
        write_json(json_out, {"model": model, "out": out, "summary": summary, "report": report})
    for key, (a, b) in summary.items():
        click.echo(f"{key:<11} {a:>14,} -> {b:>14,}  ({b / max(a, 1):.2f}x)")
    for line in report.details:
        click.echo(f"  {line}")
    for node, why in report.metrics.get("skipped", {}).items():
        click.echo(f"  skipped {node}: {why}")
    click.echo(f"wrote {out}")


@main.command()
@click.option("--teacher", required=True, type=click.Path(dir_okay=False))
@click.option("--student", required=True, type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=click.Path(exists=True),
              help="training data: .npz (inputs by name + optional labels) or image folder")
@click.option("--eval", "eval_path", type=click.Path(), help=".npz to report top-1 before/after")
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--temperature", default=4.0, show_default=True,
              type=click.FloatRange(0, min_open=True))
@click.option("--alpha", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="weight of cross-entropy on labels")
@click.option("--shift", default=0, show_default=True, type=click.IntRange(0),
              help="random translations (pixels) as augmentation")
@click.option("--seed", default=0, show_default=True)
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False))
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="write the report here")
def distill(teacher, student, data, eval_path, epochs, batch_size, lr, temperature, alpha, shift,
            seed, out, json_out):
    """Train STUDENT to match TEACHER's soft targets (and labels); needs the `train` extra."""
    from .data import load_eval_set, load_training_set
    from .model import load, save
    from .passes.distill import DistillConfig, distill as run_distill
    from .report import write_json

    t, s = load(teacher), load(student)
    train = load_training_set(data, s)
    ev = load_eval_set(eval_path, s) if eval_path else None
    progress = None if json_out else (
        lambda e, n, loss: click.echo(f"  epoch {e}/{n} loss {loss:.4f}", err=True))
    try:
        cfg = DistillConfig(epochs, batch_size, lr, temperature=temperature, alpha=alpha,
                            seed=seed, shift=shift)
    except ValueError as exc:
        raise EdgesmithError(str(exc)) from None
    trained, report = run_distill(t.proto, s.proto, train, cfg, ev, progress)
    save(trained, out)
    if json_out:
        write_json(json_out, report)
    click.echo(report.details[-1])
    click.echo(f"wrote {out}")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="output directory (re-running with the same one resumes)")
@click.option("--device", "-d", default="local", show_default=True,
              help="`local`, user@host[:port] or a Host alias from ~/.ssh/config")
@ssh_options
@click.option("--target", "-t", help="target profile (default: matched from the device's facts)")
@click.option("--calib", type=click.Path(exists=True), help="calibration data (.npz or images)")
@click.option("--eval", "eval_path", type=click.Path(exists=True),
              help=".npz eval set (inputs by name + labels)")
@click.option("--train", type=click.Path(exists=True),
              help="training data for pruning + distillation (needs the `train` extra)")
@click.option("--max-accuracy-drop", default=0.01, show_default=True,
              type=click.FloatRange(0, 1))
@click.option("--latency-budget-ms", type=click.FloatRange(0, min_open=True))
@click.option("--budget", default="10m", show_default=True,
              help="wall-clock budget for the search, e.g. 90s, 10m")
@click.option("--prune-ratios", default="0.3,0.5", show_default=True)
@click.option("--distill-epochs", default=10, show_default=True, type=click.IntRange(1),
              help="more recover more accuracy after heavy pruning: 30 brought the 50%-pruned "
                   "ResNet-style digits model back to its teacher's top-1 (10 left it 2% short)")
@click.option("--tune-budget", default="60s", show_default=True,
              help="device time for tuning the winner's runtime config (0 to skip)")
@click.option("--input-shape", help="fix dynamic inputs: NAME=1x3x224x224[,NAME2=...]")
@click.option("--json", "json_out", type=click.Path(dir_okay=False),
              help="also write the report here; quiet progress")
def optimize(model, out_dir, device, identity, accept_new_host_key, remote_python, target, calib,
             eval_path, train, max_accuracy_drop, latency_budget_ms, budget, prune_ratios,
             distill_epochs, tune_budget, input_shape, json_out):
    """The main job: the fastest variant of MODEL within the accuracy budget, on the device.

    Exit 0 when a candidate met the budget; 1 when none did (the trade-offs are still saved).
    """
    from .model import parse_input_shapes
    from .pipeline import optimize as run_optimize
    from .report import optimize_table, print_table, write_json

    try:
        ratios = tuple(float(r) for r in prune_ratios.split(",") if r.strip())
        assert all(0 < r < 1 for r in ratios)
    except (ValueError, AssertionError):
        raise click.BadParameter(f"{prune_ratios!r}; write e.g. 0.3,0.5",
                                 param_hint="--prune-ratios")
    dev = one_device(device, identity, accept_new_host_key, remote_python)
    say = None if json_out else (lambda text: click.echo(f"  {text}", err=True))
    try:
        report = run_optimize(model, out_dir, dev, target, calib, eval_path, train,
                              max_accuracy_drop, latency_budget_ms, parse_duration(budget),
                              ratios, distill_epochs, parse_duration(tune_budget),
                              parse_input_shapes(input_shape), say)
    except KeyboardInterrupt:
        click.echo(f"interrupted: measured candidates are kept in {out_dir}; run the same "
                   "command to resume", err=True)
        sys.exit(130)
    if json_out:
        write_json(json_out, report)
    print_table(optimize_table(report))
    for note in report.notes:
        click.echo(f"note: {note}")
    click.echo(f"{report.outcome}: {report.summary}")
    click.echo(f"wrote {out_dir}/model.onnx, bundle/, report.json, report.html")
    if report.chosen is None:   # the budget was not met: outputs are saved, the exit says so
        sys.exit(1)
