"""The searches measured on the device: `tune` (runtime config) and `optimize` (the main job)."""
from __future__ import annotations

import sys
import time


import click

from ..errors import EdgesmithError
from .common import (config_error, data_source, host_device_option, input_shape_option, json_option,
                     state_option,
                     json_to, one_device, parse_duration, quant_effort_option, ssh_options,
                     wait_idle_option)


def ratios_of(option: str, text: str) -> tuple[float, ...]:
    try:
        return tuple(float(r) for r in text.split(",") if r.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers (e.g. "
                                 "0.5,0.7)", param_hint=option) from None


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--device", "-d", default="local", show_default=True,
              help="`local`, user@host[:port] or a Host alias from ~/.ssh/config")
@ssh_options
@click.option("--target", "-t", help="target profile (default: matched from the device's facts)")
@click.option("--budget", default="120s", show_default=True, help="device time to spend, e.g. 10m")
@click.option("--max-trials", default=40, show_default=True, type=click.IntRange(1))
@click.option("--fresh", is_flag=True, help="measure again instead of answering from the cache")
@click.option("--eval", "eval_path", callback=data_source, type=click.Path(dir_okay=False),
              help=".npz the model is timed and judged on (needed where random inputs would "
                   "not do: token ids, a branch-selecting input, a stream)")
@input_shape_option
@state_option
@click.option("-o", "--out", type=click.Path(file_okay=False),
              help="write the tuned bundle (best config in its manifest) to this directory")
@click.option("--force", is_flag=True, help="write into an -o directory edgesmith did not create")
@json_option()
def tune(model, device, identity, accept_new_host_key, remote_python, target, budget, max_trials,
         fresh, eval_path, input_shape, state_pairs, out, force, json_out):
    """Autotune MODEL's runtime config on a device; the result is never slower than the default.

    The search is the target profile's: threads, spinning, optimisation level, the providers
    the device has, and edgesmith's own fused kernels (edgesmith_kernels: 0 off, N every block
    at N rows a band, "R@S" only blocks at least S pixels a side), each measured on the device;
    a per-block table says what the kernels won or lost."""
    from ..model import load, parse_input_shapes, parse_state
    from ..run.outputs import claim, copy_dir_atomic
    from ..report.text import age, kernels_table, print_table, tune_table, write_json
    from ..search.tune import tune as run_tune

    if out:
        claim(out, force, "tune output directory")     # refused before any device time
    dev = one_device(device, identity, accept_new_host_key, remote_python)
    progress = None if json_out else (
        lambda t: click.echo(f"  {'cached ' if t.cached else ''}{t.id}: "
                             f"{'error: ' + t.error if t.error else f'{t.p50_ms:.3f} ms'}",
                             err=True))
    loaded = load(model, parse_input_shapes(input_shape), data=eval_path,
                  state=parse_state(state_pairs))
    judge = None
    if eval_path:
        from ..data import eval_batch, load_eval_set, reference_outputs

        judge = load_eval_set(eval_path, loaded)
        judge.refs = reference_outputs(loaded, judge, eval_batch(loaded))
    try:
        report = run_tune(loaded, dev, target=target, eval_data=judge,
                          budget_s=parse_duration(budget), max_trials=max_trials, fresh=fresh,
                          on_trial=progress,
                          on_stage=None if json_out else lambda line: click.echo(line, err=True))
    except KeyboardInterrupt:
        click.echo("interrupted: measured trials are cached; run the same command to resume",
                   err=True)
        sys.exit(130)
    if not any(t.ok for t in report.trials):     # no verdict to give: not "defaults fastest"
        raise EdgesmithError(f"every trial failed on {dev.name}, the runtime defaults included "
                             f"({report.default.stage}: {report.default.error}); fix that first "
                             f"(`edgesmith profile {model}` shows it alone)")
    if out:
        copy_dir_atomic(report.bundle, out, force)
    if json_out:
        write_json(json_out, report)
    if report.measured == 0 and report.answered_at and not json_out:
        click.echo(f"answered from the cache: this job was measured on {dev.name} "
                   f"{age(time.time() - report.answered_at)} ago (--fresh measures again)",
                   err=True)
    print_table(tune_table(report))
    if report.kernels:
        print_table(kernels_table(report))
    click.echo(report.verdict)
    click.echo(f"best: {report.best.id} (bundle {out or report.bundle})")


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="output directory (re-running the same job with it resumes)")
@click.option("--force", is_flag=True, help="write into an -o directory edgesmith did not create")
@click.option("--device", "-d", default="local", show_default=True,
              help="`local`, user@host[:port] or a Host alias from ~/.ssh/config")
@ssh_options
@click.option("--target", "-t", help="target profile (default: matched from the device's facts)")
@click.option("--calib", callback=data_source,
              type=click.Path(exists=True), help="calibration data (.npz or images)")
@click.option("--eval", "eval_path", callback=data_source,
              type=click.Path(exists=True, dir_okay=False),
              help=".npz eval set (inputs by name + labels)")
@click.option("--train", callback=data_source,
              type=click.Path(exists=True),
              help="training data for pruning + distillation and int8 quantization-aware "
                   "training (needs the `train` extra)")
@click.option("--max-accuracy-drop", default=0.01, show_default=True,
              type=click.FloatRange(0, 1),
              help="largest top-1 drop vs the original a candidate may cost (outputs without "
                   "classes: SQNR >= 25 dB)")
@click.option("--latency-budget-ms", type=click.FloatRange(0, min_open=True),
              help="a candidate counts as within budget only if its measured latency is at "
                   "most this")
@click.option("--budget", default="10m", show_default=True,
              help="wall-clock budget for the search, e.g. 90s, 10m")
@click.option("--prune-ratios", default="0.3,0.5", show_default=True,
              help="shares of channels structured pruning removes (with --train); empty to skip")
@click.option("--nas-ratios", default="0.6", show_default=True,
              help="NetAdapt width searches (with --train) toward these shares of fp32's "
                   "measured latency; empty to skip")
@click.option("--distill-epochs", default=10, show_default=True, type=click.IntRange(1),
              help="more epochs recover more accuracy after heavy pruning: 30 brought the "
                   "50%-pruned ResNet-style digits model back to its teacher's top-1 (10 left it "
                   "2% short)")
@click.option("--tune-budget", default="60s", show_default=True,
              help="device time for tuning the winner's runtime config (0 to skip)")
@host_device_option
@quant_effort_option
@click.option("--backends", default="onnxruntime,tflite", show_default=True,
              callback=lambda ctx, param, value: _backends(value),
              help="runtimes the answer may use: your application embeds one (TFLite "
                   "candidates need the `tflite-convert` extra on the host)")
@input_shape_option
@state_option
@wait_idle_option
@click.option("--json", "json_out", type=click.Path(dir_okay=False), callback=json_to,
              help="also write the report here ('-': stdout); quiet progress")
def optimize(model, out_dir, force, device, identity, accept_new_host_key, remote_python,
             target, calib, eval_path, train, max_accuracy_drop, latency_budget_ms, budget,
             prune_ratios, nas_ratios, distill_epochs, tune_budget, host_device, quant_effort,
             backends, input_shape, state_pairs, wait_idle, json_out):
    """The main job: the fastest variant of MODEL within the accuracy budget, on the device.

    Exit 0 when a candidate met the budget; 1 when none did (the trade-offs are still saved).
    """
    from ..model import parse_input_shapes, parse_state
    from ..pipeline import OptimizeConfig, optimize as run_optimize
    from ..report.text import age, budget_line, optimize_table, print_table, write_json

    try:
        ratios, searches = ratios_of("--prune-ratios", prune_ratios), ratios_of("--nas-ratios",
                                                                                nas_ratios)
        cfg = OptimizeConfig(max_accuracy_drop=max_accuracy_drop,
                             latency_budget_ms=latency_budget_ms, budget_s=parse_duration(budget),
                             prune_ratios=ratios, nas_ratios=searches,
                             distill_epochs=distill_epochs, host_device=host_device,
                             tune_budget_s=parse_duration(tune_budget), target=target,
                             backends=backends, quant_effort=quant_effort,
                             wait_idle_s=parse_duration(wait_idle),
                             state=parse_state(state_pairs))
    except ValueError as exc:
        raise config_error(exc) from None
    dev = one_device(device, identity, accept_new_host_key, remote_python)
    say = None if json_out else (lambda text: click.echo(f"  {text}", err=True))
    try:
        report = run_optimize(model, out_dir, dev, calib, eval_path, train, cfg,
                              parse_input_shapes(input_shape), force, say)
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
    if report.already_finished:
        click.echo(f"{out_dir} already holds this job's finished result (written "
                   f"{age(time.time() - report.finished_at)} ago): nothing was measured; to "
                   "measure again, remove it or choose another -o")
    else:
        click.echo(budget_line(report))
        click.echo(f"wrote {out_dir}/{report.model_file}, bundle/, report.json, report.html")
    if report.chosen is None:   # the budget was not met: outputs are saved, the exit says so
        sys.exit(1)


def _backends(value: str) -> tuple[str, ...]:
    from ..pipeline.config import BACKENDS

    chosen = tuple(b.strip() for b in value.split(",") if b.strip())
    if not chosen or not set(chosen) <= set(BACKENDS):
        raise click.BadParameter(f"{value!r}: name some of {', '.join(BACKENDS)}, comma-separated")
    return chosen


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--train", callback=data_source,
              required=True, type=click.Path(exists=True),
              help="training data (.npz: inputs by name + labels; or an image folder); a "
                   "share is held out to choose between proposals")
@click.option("--latency-budget", required=True,
              callback=lambda ctx, param, value: _latency_budget(value),
              help="target latency: a share of the original's measured latency (0.6x) or "
                   "milliseconds (12ms)")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="output directory (re-running the same search with it resumes)")
@click.option("--force", is_flag=True, help="write into an -o directory edgesmith did not create")
@click.option("--holdout", type=click.Path(exists=True),
              help="data to choose between proposals on (default: a fifth of --train; give "
                   "one when --train holds several augmentations of the same image)")
@click.option("--eval", "eval_path", callback=data_source,
              type=click.Path(exists=True, dir_okay=False),
              help=".npz test set: reported for every iteration, never used to choose")
@click.option("--device", "-d", default="local", show_default=True,
              help="`local`, user@host[:port] or a Host alias from ~/.ssh/config")
@ssh_options
@click.option("--budget", default="60m", show_default=True,
              help="wall-clock budget, e.g. 90s, 30m; the best so far is always written")
@click.option("--steps", default=200, show_default=True, type=click.IntRange(1),
              help="fine-tuning steps per proposal")
@click.option("--final-epochs", default=20, show_default=True, type=click.IntRange(1),
              help="epochs of the final distillation")
@click.option("--shift", default=0, show_default=True, type=click.IntRange(0),
              help="augmentation: random translations of up to N pixels while fine-tuning")
@click.option("--proxy", type=click.Choice(["latency", "macs"]), default="latency",
              show_default=True, help="what predicts a proposal's cost: the latency table "
                                      "measured on the device, or MACs (FLOPs-driven NetAdapt)")
@click.option("--threads", type=click.IntRange(0), help="threads on the device (default: all)")
@click.option("--workers", default=0, type=click.IntRange(0),
              help="parallel fine-tunes on the host (default: one per two cores)")
@click.option("--no-baseline", is_flag=True, help="skip the uniform-width baseline")
@host_device_option
@input_shape_option
@json_option()
def nas(model, train, latency_budget, out_dir, force, holdout, eval_path, device, identity,
        accept_new_host_key, remote_python, budget, steps, final_epochs, shift, proxy, threads,
        workers, no_baseline, host_device, input_shape, json_out):
    """Search MODEL's layer widths for a latency budget on the device (NetAdapt).

    Each iteration narrows the channel group whose short fine-tune keeps the most accuracy at
    the next latency step, predicted by a per-kernel table measured on the device and checked
    by measuring the kept model whole. Needs the `train` extra (torch).
    """
    from ..model import parse_input_shapes
    from ..search.nas import NasConfig, nas as run_nas
    from ..report.nas import nas_table
    from ..report.text import print_table, write_json

    try:
        cfg = NasConfig(**latency_budget, steps=steps,
                        final_epochs=final_epochs, shift=shift, proxy=proxy, threads=threads,
                        workers=workers, uniform_baseline=not no_baseline,
                        budget_s=parse_duration(budget), host_device=host_device)
    except ValueError as exc:
        raise config_error(exc) from None
    dev = one_device(device, identity, accept_new_host_key, remote_python)
    say = None if json_out else (lambda text: click.echo(f"  {text}", err=True))
    try:
        report = run_nas(model, train, out_dir, dev, cfg, eval_path,
                         parse_input_shapes(input_shape), force, say, holdout)
    except KeyboardInterrupt:
        click.echo(f"interrupted: completed iterations are kept in {out_dir}; run the same "
                   "command to continue", err=True)
        sys.exit(130)
    if json_out:
        write_json(json_out, report.to_dict())
    print_table(nas_table(report))
    for note in report.notes:
        click.echo(f"note: {note}")
    click.echo(report.summary)
    click.echo(f"wrote {out_dir}/model.onnx, report.json, report.html")


def _latency_budget(value: str) -> dict:
    from ..search.nas import NasConfig, parse_latency_budget

    try:
        budget = parse_latency_budget(value)
        NasConfig(**budget)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return budget
