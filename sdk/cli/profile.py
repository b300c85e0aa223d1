"""`edgesmith profile`: the model as it is, measured on one device or a fleet."""
from __future__ import annotations

import sys

import click

from .common import (data_source, devices_from, input_shape_option, json_option, parse_duration,
                     state_option,
                     ssh_options, status, wait_idle_option)


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--device", "-d", "device_values", multiple=True,
              help="`local` (default), user@host[:port], a Host alias from ~/.ssh/config, or a "
                   "devices.toml inventory; repeat to profile a fleet in parallel")
@ssh_options
@click.option("--eval", "eval_path", callback=data_source,
              type=click.Path(dir_okay=False),
              help=".npz eval set: inputs by name + labels")
@click.option("--runs", default=100, show_default=True, type=click.IntRange(1),
              help="timed runs (more while --min-time has not passed)")
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(0),
              help="untimed runs first (caches, lazy initialisation)")
@click.option("--min-time", default=0.0, show_default=True, type=click.FloatRange(0),
              help="keep timing for at least this many seconds")
@click.option("--threads", type=click.IntRange(0), help="backend threads (0 = backend default)")
@input_shape_option
@state_option
@click.option("--profile-ops", is_flag=True, help="also time each op type (ms per run)")
@click.option("--timeout", default=600.0, show_default=True, type=click.FloatRange(1),
              help="seconds the device may take for the whole run (and each run of the model "
                   "on this host, e.g. its reference outputs)")
@wait_idle_option
@json_option("the Result")
def profile(model, device_values, identity, accept_new_host_key, remote_python, eval_path, runs,
            warmup, min_time, threads, input_shape, state_pairs, profile_ops, timeout, wait_idle,
            json_out):
    """Measure MODEL as it is on one or more devices: latency percentiles, memory, accuracy."""
    from ..devices import Job
    from ..host_runs import run_limit
    from ..model import load, parse_input_shapes, parse_state
    from ..profiling import profile_many
    from ..report.text import print_table, results_table, write_json

    job = Job(runs=runs, warmup=warmup, min_time_s=min_time, threads=threads,
              profile_ops=profile_ops, timeout_s=timeout + parse_duration(wait_idle),
              wait_idle_s=parse_duration(wait_idle))
    devices = devices_from(device_values, identity, accept_new_host_key, remote_python)
    with status(f"profiling {model} on {len(devices)} device(s)"), run_limit(timeout):
        loaded = load(model, parse_input_shapes(input_shape), data=eval_path,
                      state=parse_state(state_pairs))
        rows = profile_many(loaded, devices, eval_path=eval_path, job=job)
    if json_out:
        write_json(json_out, rows[0][1] if len(rows) == 1 else
                   [{"name": name, **r.to_dict()} for name, r in rows])
    if any(r.ok for _, r in rows):     # a lone failure is said once, below, not in a table too
        print_table(results_table(rows))
    for name, result in rows:
        if result.ok and result.device.get("emulated"):
            click.echo(f"note: {name} is emulated ({result.device.get('cpu')}): its latency is "
                       "not meaningful; its accuracy and memory are")
        if profile_ops and result.ok and not result.op_profile_ms:
            click.echo(f"note: no per-op times on {name}: they come from onnxruntime's profiler, "
                       f"and {result.backend} has none to read")
        if result.op_profile_ms:
            per_run = result.op_profile_ms
            total = sum(per_run.values()) or 1.0
            click.echo(f"time per op type on {name} (ms per run, like p50):")
            for op, ms in sorted(per_run.items(), key=lambda kv: -kv[1]):
                click.echo(f"  {op:<24} {ms:9.4f} ms  {100 * ms / total:5.1f}%")
    failed = [(name, r) for name, r in rows if not r.ok]
    for name, result in failed:
        click.echo(f"error: {name}: {result.stage}: {result.error}", err=True)
    if failed:
        sys.exit(1)
