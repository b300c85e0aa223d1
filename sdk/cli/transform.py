"""The single-pass commands: fuse, quantize, prune, distill."""
from __future__ import annotations

import re
import sys
from dataclasses import asdict, replace
from pathlib import Path

import click

from ..errors import EdgesmithError
from .common import (config_error, data_source, host_device_option, input_shape_option, json_option,
                     state_option,
                     model_out, one_device, quant_effort_option, ssh_options)


def onnx_only(m, command: str):
    """The graph passes rewrite ONNX; a TFLite model is said so in one line."""
    if m.format != "onnx":
        raise EdgesmithError(f"{m.path.name} is a TFLite model; {command} works on ONNX models "
                             "(profile measures a TFLite model as it is)")
    return m


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--out", required=True, callback=model_out(".onnx"),
              help="the fused model")
@click.option("--ort-fusions", is_flag=True,
              help="also fuse Conv+activation into com.microsoft.FusedConv (onnxruntime only)")
@click.option("--opset", type=int,
              help="convert to this opset (also down, for a device with an older onnxruntime)")
@input_shape_option
@json_option()
def fuse(model, out, ort_fusions, opset, input_shape, json_out):
    """Fold constants and BatchNorms, fuse MatMul+Add, drop no-ops; outputs stay the same."""
    from ..model import load, parse_input_shapes, save
    from ..passes.fuse import PORTABLE_PIPELINE, OpsetConfig, convert_opset, fuse as run_fuse
    from ..report.text import write_json

    m = onnx_only(load(model, parse_input_shapes(input_shape), static=False), "fuse")
    passes = PORTABLE_PIPELINE + (["fuse_activations"] if ort_fusions else [])
    fused, reports = run_fuse(m.proto, passes)
    if opset is not None:
        try:
            fused, report = convert_opset(fused, OpsetConfig(opset=opset))
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


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--calib", callback=data_source,
              required=True, type=click.Path(exists=True),
              help="calibration data: .npz (inputs by name) or an image folder")
@click.option("--eval", "eval_path", callback=data_source,
              type=click.Path(dir_okay=False),
              help=".npz eval set to judge accuracy (else a held-out part of --calib)")
@click.option("--train", callback=data_source, type=click.Path(exists=True),
              help="unlabelled inputs (.npz or images) for quantization-aware training when "
                   "the post-training repairs miss the budget (needs the `train` extra)")
@click.option("--max-accuracy-drop", default=0.01, show_default=True, type=click.FloatRange(0, 1),
              help="largest top-1 drop vs fp32 a recipe may cost (outputs without classes: "
                   "SQNR >= 25 dB)")
@click.option("--device", "-d", default="local", show_default=True,
              help="where recipes are measured: `local` or an SSH destination")
@ssh_options
@click.option("--recipe", help="skip the search and use this recipe (see the report's names)")
@quant_effort_option
@host_device_option
@input_shape_option
@state_option
@click.option("-o", "--out", required=True, callback=model_out(".onnx"),
              help="the chosen model: int8, or the float model when no recipe was faster "
                   "within the accuracy budget (--recipe forces one)")
@json_option()
def quantize(model, calib, eval_path, train, max_accuracy_drop, device, identity,
             accept_new_host_key, remote_python, recipe, quant_effort, host_device, input_shape,
             state_pairs, out, json_out):
    """Quantize MODEL to int8 with the recipe that is fastest on the device within the budget."""
    from ..model import load, parse_input_shapes, parse_state, save
    from ..search.int8 import choose_recipe, quant_data, quantize_with
    from ..report.text import print_table, quantize_table, why_worse_table, write_json

    m = onnx_only(load(model, parse_input_shapes(input_shape), data=eval_path or calib,
                       state=parse_state(state_pairs)), "quantize")
    if recipe:        # no search, no device: judged on the host, on held-out samples
        from device_runtime.evaluate import metrics

        from ..data import reference_outputs
        from ..model import from_proto

        data = quant_data(m, calib, eval_path, train=train)
        proto, reports = quantize_with(m, recipe, data.batches, host_device,
                                       data.train() if data.train else None)
        judged = metrics(reference_outputs(from_proto(proto, m), data.eval, data.batch),
                         data.eval)
        save(proto, out)
        if json_out:
            write_json(json_out, {"recipe": recipe, "passes": reports, "accuracy": judged})
        for note in data.notes:
            click.echo(f"note: {note}")
        click.echo(f"{recipe} on the host (onnxruntime CPU), judged on {data.judged_on}: "
                   + ", ".join(f"{k} {judged[k]:.4f}" for k in ("top1", "agreement")
                               if k in judged)
                   + (f", SQNR {judged['sqnr_db']:.1f} dB" if "sqnr_db" in judged else ""))
        click.echo(f"wrote {out}")
        return
    dev = one_device(device, identity, accept_new_host_key, remote_python)
    say = None if json_out else (lambda text: click.echo(f"  {text}", err=True))
    chosen, report = choose_recipe(m, dev, quant_data(m, calib, eval_path, train=train),
                                   max_accuracy_drop,
                                   on_step=say, effort=quant_effort, host_device=host_device)
    save(chosen.proto, out)
    if json_out:
        write_json(json_out, report)
    print_table(quantize_table(report))
    if report.sensitivity:
        print_table(why_worse_table(report))
    for note in report.notes:
        click.echo(f"note: {note}")
    click.echo(report.summary)
    click.echo(f"wrote {out}" + ("" if report.quantized else " (the float model, see above)"))


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--ratio", default=0.5, show_default=True,
              type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="fraction of channels (structured) or weights (unstructured) removed")
@click.option("--structured/--unstructured", default=True, show_default=True)
@click.option("--importance", default="l1", show_default=True,
              type=click.Choice(["l1", "l2", "bn_gamma", "activation"]))
@click.option("--calib", callback=data_source,
              type=click.Path(exists=True),
              help="data for --importance activation (.npz or image folder)")
@click.option("--eval", "eval_path", callback=data_source,
              type=click.Path(dir_okay=False),
              help=".npz with labels: report the top-1 the pruned model keeps")
@click.option("--global-ranking", is_flag=True, help="rank channels across layers, not per layer")
@click.option("--layer-ratio", multiple=True, help="NODE=RATIO for one layer (repeatable)")
@click.option("--n-m", help="unstructured N:M sparsity, e.g. 2:4")
@click.option("--target", help="target profile whose channel multiple the kept channel counts "
              "follow (default: the profile matching this machine)")
@click.option("--allow-noop", is_flag=True,
              help="exit 0 even when structured pruning removes < 5% of MACs")
@input_shape_option
@click.option("-o", "--out", required=True, callback=model_out(".onnx"),
              help="the pruned model")
@json_option()
def prune(model, ratio, structured, importance, calib, eval_path, global_ranking, layer_ratio,
          n_m, target, allow_noop, input_shape, out, json_out):
    """Remove channels from MODEL's graph (structured) or zero small weights (unstructured)."""
    from ..model import from_proto, load, parse_input_shapes, save
    from ..passes.prune import (PruneConfig, UnstructuredConfig, activation_means,
                                prune_channels, prune_unstructured)
    from ..report.text import write_json

    m = onnx_only(load(model, parse_input_shapes(input_shape), data=eval_path or calib),
                  "prune")
    if not m.facts.macs:
        raise EdgesmithError(f"{model} has no Conv, Gemm or MatMul weights to prune (0 MACs); "
                             "nothing to do")
    try:
        if structured:
            means = None
            if importance == "activation":
                if not calib:
                    raise EdgesmithError("--importance activation needs --calib data")
                from ..data import calibration_batches
                means = activation_means(m.proto, list(calibration_batches(calib, m, 16, 256)))
            profile = _prune_target(target)
            cfg = PruneConfig(ratio=ratio, layer_ratios=_layer_ratios(layer_ratio),
                              importance=importance, global_ranking=global_ranking,
                              activation_means=means, input_shapes=m.input_shapes,
                              round_to=profile.channel_multiple)
            pruned, report = prune_channels(m.proto, cfg)
        else:
            pruned, report = prune_unstructured(m.proto, UnstructuredConfig(ratio, n_m=_n_m(n_m)))
    except ValueError as exc:
        raise config_error(exc) from None
    after = from_proto(pruned, m)
    summary = {"params": [m.facts.params, after.facts.params],
               "macs": [m.facts.macs, after.facts.macs],
               "size_bytes": [m.facts.size_bytes, after.facts.size_bytes]}
    if eval_path:
        summary["top1"] = _top1_before_after(m, pruned, eval_path)
    noop = structured and m.facts.macs and after.facts.macs > 0.95 * m.facts.macs
    if not noop or allow_noop:
        save(pruned, out)
    if json_out:
        write_json(json_out, {"model": model, "out": out, "summary": summary, "report": report})
    for key, (a, b) in summary.items():
        if key == "top1":
            click.echo(f"{'top-1':<11} {a:>14.4f} -> {b:>14.4f}  (before fine-tuning; "
                       "`edgesmith distill` recovers accuracy)")
            continue
        click.echo(f"{key:<11} {a:>14,} -> {b:>14,}  ({b / max(a, 1):.2f}x)")
    if structured:
        click.echo(f"  channel multiple {profile.channel_multiple} from target {profile.name}")
    for line in report.details:
        click.echo(f"  {line}")
    for node, why in report.metrics.get("skipped", {}).items():
        click.echo(f"  frozen {node}: {why}")
    if noop and not allow_noop:
        for reason, n in list(report.metrics.get("frozen_reasons", {}).items())[:8]:
            click.echo(f"  frozen ({n} channel group(s)): {reason}")
        click.echo(f"error: structured pruning removed {1 - after.facts.macs / m.facts.macs:.1%} "
                   "of MACs (< 5%): the groups above are frozen; nothing written (pass "
                   "--allow-noop to write it anyway)", err=True)
        sys.exit(1)
    click.echo(f"wrote {out}")


def _prune_target(name: str | None):
    """The profile a pruned model is shaped for: the named one, else this machine's."""
    from ..run import Run

    return Run.open("local", target=name).target.profile


def _layer_ratios(items) -> dict:
    ratios = {}
    for item in items:
        node, _, value = item.rpartition("=")
        try:
            ratios[node] = float(value)
        except ValueError:
            raise click.BadParameter(f"{item!r}; write NODE=0.3", param_hint="--layer-ratio")
    return ratios


def _n_m(text):
    if not text:
        return None
    try:
        n, m = (int(v) for v in text.split(":"))
    except ValueError:
        raise click.BadParameter(f"{text!r}; write N:M such as 2:4", param_hint="--n-m")
    return (n, m)


def _top1_before_after(model, pruned, eval_path) -> list[float]:
    from ..data import load_eval_set
    from ..passes.distill import evaluate

    data = load_eval_set(eval_path, model)
    if data.labels is None:
        raise EdgesmithError(f"{eval_path} has no 'labels' array: prune --eval reports top-1")
    return [evaluate(model.proto, data), evaluate(pruned, data)]


@click.command()
@click.option("--teacher", required=True, type=click.Path(dir_okay=False))
@click.option("--student", required=True, type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=click.Path(exists=True),
              help="training data: .npz (inputs by name + optional labels) or image folder")
@click.option("--eval", "eval_path", callback=data_source,
              type=click.Path(dir_okay=False),
              help=".npz to report top-1 before/after")
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
@host_device_option
@click.option("-o", "--out", required=True, callback=model_out(".onnx"),
              help="the trained student")
@json_option()
def distill(teacher, student, data, eval_path, epochs, batch_size, lr, temperature, alpha, shift,
            seed, host_device, out, json_out):
    """Train STUDENT to match TEACHER's soft targets (and labels); needs the `train` extra."""
    from ..data import load_eval_set, load_training_set
    from ..model import load, save
    from ..passes.distill import DistillConfig, distill as run_distill
    from ..report.text import write_json

    t, s = load(teacher, data=data), load(student, data=data)
    train = load_training_set(data, s)
    ev = load_eval_set(eval_path, s) if eval_path else None
    progress = None if json_out else (
        lambda e, n, loss: click.echo(f"  epoch {e}/{n} loss {loss:.4f}", err=True))
    try:
        cfg = DistillConfig(t.proto, train, ev, None, progress, epochs, batch_size, lr,
                            temperature=temperature, alpha=alpha, seed=seed, shift=shift,
                            host_device=host_device)
    except ValueError as exc:
        raise config_error(exc) from None
    trained, report = run_distill(s.proto, cfg)
    save(trained, out)
    if json_out:
        write_json(json_out, report)
    click.echo(report.details[-1])
    click.echo(f"wrote {out}")


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--to", "fmt", required=True, type=click.Choice(["tflite"]),
              help="the format to write (TFLite/LiteRT)")
@click.option("--int8", is_flag=True,
              help="a fully int8 model: quantized with --recipe on --calib, then converted")
@click.option("--calib", callback=data_source,
              type=click.Path(exists=True),
              help="calibration data for --int8: .npz (inputs by name) or an image folder")
@click.option("--recipe", default="qdq-u8s8", show_default=True,
              help="the int8 recipe (`edgesmith quantize` reports which one the device chose)")
@click.option("--eval", "eval_path", callback=data_source,
              type=click.Path(dir_okay=False),
              help=".npz to check the .tflite against onnxruntime on (else held-out --calib "
                   "samples, else random inputs)")
@input_shape_option
@click.option("-o", "--out", required=True, callback=model_out(".tflite"),
              help="the converted model")
@json_option()
def convert(model, fmt, int8, calib, recipe, eval_path, input_shape, out, json_out):
    """Convert MODEL (ONNX) to TFLite, fp32 or int8, checked against onnxruntime; needs the
    `tflite-convert` extra. An already-quantized (QDQ) model converts to int8 as it is."""
    from ..model import atomic_write, load, parse_input_shapes
    from ..report.text import write_json
    from ..convert.tflite import (available, check, conversion_sample, random_inputs, to_tflite,
                                  unconvertible)

    if int8 and calib is None:
        raise EdgesmithError("--int8 needs --calib (samples to calibrate activation ranges on)")
    m = load(model, parse_input_shapes(input_shape), data=eval_path or calib)
    if m.format != "onnx":
        raise EdgesmithError(f"{model} is already a {m.format} model; convert takes ONNX models")
    if (why := available()) is not None:
        raise EdgesmithError(why)
    notes, proto, judge, labels = [], m.proto, None, None
    if (why := unconvertible(m, m.sample)) is not None:
        raise EdgesmithError(why)
    if calib is not None:
        from ..search.int8 import quant_data, quantize_with

        data = quant_data(m, calib, eval_path)
        notes, judge, labels = data.notes, data.eval.inputs, data.eval.labels
        if int8:
            proto, _ = quantize_with(m, recipe, data.batches)
    elif eval_path is not None:
        from ..data import load_eval_set

        judged = load_eval_set(eval_path, m)
        judge, labels = judged.inputs, judged.labels
    if judge is None:
        judge = random_inputs(m)
        notes.append("no --eval or --calib: checked on random inputs (give real samples to "
                     "judge fidelity)")
    data_bytes, report = to_tflite(proto, conversion_sample(m, judge))
    report = replace(check(proto, data_bytes, judge, labels), seconds=report.seconds,
                     notes=notes)
    vs_float = check(m.proto, data_bytes, judge).fidelity if report.int8 else None
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(out), data_bytes)
    if json_out:
        write_json(json_out, {"model": model, "out": out, "recipe": recipe if int8 else None,
                              "report": asdict(report), "int8_vs_fp32": vs_float})
    for note in notes:
        click.echo(f"note: {note}")
    d, f = report.delegation or {}, report.fidelity
    click.echo(f"converted to {f'int8 ({recipe})' if int8 else 'int8' if report.int8 else 'fp32'}"
               f" TFLite in {report.seconds:.1f} s"
               f": {sum(report.ops.values())} ops ({report.ops.get('TRANSPOSE', 0)} TRANSPOSE)")
    if d:
        from ..report.text import delegation_text

        click.echo(f"  {delegation_text(d)}")
    click.echo(f"against {'our int8 ONNX model' if report.int8 else 'the ONNX model'} under "
               f"onnxruntime, {f['n']} samples: max relative error {report.max_rel_err:.2e}, "
               f"SQNR {f['sqnr_db']:.1f} dB"
               + (f", top-1 agreement {f['agreement']:.4f}" if "agreement" in f else "")
               + (f", top-1 on the labels {f['top1']:.4f}" if "top1" in f else ""))
    if vs_float:
        click.echo(f"against the fp32 ONNX model: SQNR {vs_float['sqnr_db']:.1f} dB"
                   + (f", top-1 agreement {vs_float['agreement']:.4f}"
                      if "agreement" in vs_float else ""))
    click.echo(f"wrote {out}")
