"""edgesmith: optimise a model for an edge device, measured on that device."""
from __future__ import annotations

import sys

import click

from .errors import EdgesmithError


class Group(click.Group):
    """Expected failures print one line on stderr and exit 1; usage errors exit 2 (click)."""

    def invoke(self, ctx):
        from device_runtime.errors import RuntimeFailure

        try:
            return super().invoke(ctx)
        except (EdgesmithError, RuntimeFailure) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


def _status(message: str, quiet: bool = False):
    """A spinner on stderr when it is a terminal; nothing otherwise (logs stay clean)."""
    import contextlib

    from rich.console import Console

    console = Console(stderr=True)
    if quiet or not console.is_terminal:
        return contextlib.nullcontext()
    return console.status(message)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgesmith")
def main():
    """edgesmith: optimise a model for an edge device, measured on that device."""


def ssh_options(fn):
    """Options every command that reaches a device takes."""
    for opt in reversed([
        click.option("--identity", "-i", type=click.Path(dir_okay=False),
                     help="SSH private key (else ~/.ssh/config, ssh-agent, ~/.ssh/id_*)"),
        click.option("--accept-new-host-key", is_flag=True,
                     help="record an unknown device's host key (like accept-new); a changed "
                          "key is always refused"),
        click.option("--python", "remote_python", help="python3 to use on the device"),
    ]):
        fn = opt(fn)
    return fn


def one_device(value: str, identity, accept_new_host_key, remote_python):
    """The device a search runs on; searches by latency on an emulated device are said to be so."""
    [device] = devices_from((value,), identity, accept_new_host_key, remote_python)
    try:
        emulated = device.facts().get("emulated")
    except Exception:   # unreachable and the like: the command itself reports the stage
        emulated = False
    if emulated:
        click.echo(f"warning: {device.name} is emulated: latencies and the choices made by them "
                   "are not meaningful there; accuracy and deployment are", err=True)
    return device


def devices_from(values: tuple[str, ...], identity, accept_new_host_key, remote_python) -> list:
    """--device values: `local`, SSH destinations, or devices.toml inventories."""
    from .devices import get_device, load_inventory

    devices = []
    for value in values or ("local",):
        if value.endswith(".toml"):
            devices += load_inventory(value)
        elif value == "local":
            devices.append(get_device("local"))
        else:
            devices.append(get_device(value, identity=identity, python=remote_python,
                                      accept_new_host_key=accept_new_host_key))
    return devices


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--device", "-d", "device_values", multiple=True,
              help="`local` (default), user@host[:port], a Host alias from ~/.ssh/config, or a "
                   "devices.toml inventory; repeat to profile a fleet in parallel")
@ssh_options
@click.option("--eval", "eval_path", type=click.Path(), help=".npz eval set: inputs by name + labels")
@click.option("--runs", default=100, show_default=True, type=click.IntRange(1))
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(0))
@click.option("--min-time", default=0.0, show_default=True, type=click.FloatRange(0),
              help="keep timing for at least this many seconds")
@click.option("--threads", type=click.IntRange(0), help="backend threads (0 = backend default)")
@click.option("--input-shape", help="fix dynamic inputs: NAME=1x3x224x224[,NAME2=...]")
@click.option("--profile-ops", is_flag=True, help="also time each op type")
@click.option("--timeout", default=600.0, show_default=True, type=click.FloatRange(1),
              help="seconds the device may take for the whole run")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="write the Result here")
def profile(model, device_values, identity, accept_new_host_key, remote_python, eval_path, runs,
            warmup, min_time, threads, input_shape, profile_ops, timeout, json_out):
    """Measure MODEL as it is on one or more devices: latency percentiles, memory, accuracy."""
    from .devices import Job
    from .model import parse_input_shapes
    from .profiling import profile_many
    from .report import print_table, results_table, write_json

    job = Job(runs=runs, warmup=warmup, min_time_s=min_time, threads=threads,
              profile_ops=profile_ops, timeout_s=timeout)
    devices = devices_from(device_values, identity, accept_new_host_key, remote_python)
    with _status(f"profiling {model} on {len(devices)} device(s)"):
        rows = profile_many(model, devices, eval_path=eval_path, job=job,
                            input_shapes=parse_input_shapes(input_shape))
    if json_out:
        write_json(json_out, rows[0][1] if len(rows) == 1 else
                   [{"name": name, **r.to_dict()} for name, r in rows])
    print_table(results_table(rows))
    for name, result in rows:
        if result.ok and result.device.get("emulated"):
            click.echo(f"note: {name} is emulated ({result.device.get('cpu')}): its latency is "
                       "not meaningful; its accuracy and memory are")
        if result.op_profile_ms:
            total = sum(result.op_profile_ms.values()) or 1.0
            click.echo(f"time per op type on {name}:")
            for op, ms in sorted(result.op_profile_ms.items(), key=lambda kv: -kv[1]):
                click.echo(f"  {op:<24} {ms:9.3f} ms  {100 * ms / total:5.1f}%")
    failed = [(name, r) for name, r in rows if not r.ok]
    for name, result in failed:
        click.echo(f"error: {name}: {result.stage}: {result.error}", err=True)
    if failed:
        sys.exit(1)


@main.group(cls=Group, invoke_without_command=True)
@click.pass_context
def targets(ctx):
    """List the target profiles (targets/*.toml)."""
    if ctx.invoked_subcommand is None:
        from rich.table import Table

        from .report import print_table
        from .targets import all_profiles

        table = Table(title="edgesmith targets")
        for col in ("name", "arch", "CPU features", "backends", "precisions", "description"):
            table.add_column(col)
        for p in all_profiles().values():
            table.add_row(p.name, p.arch, " ".join(p.cpu_features), " ".join(p.backends),
                          " ".join(p.precisions), p.description)
        print_table(table)


@targets.command("match")
@click.argument("destination", default="local")
@ssh_options
def targets_match(destination, identity, accept_new_host_key, remote_python):
    """Show which target profile a device's facts match, and why."""
    from .targets import match

    [dev] = devices_from((destination,), identity, accept_new_host_key, remote_python)
    m = match(dev.facts())
    kind = "generic profile (no shipped profile fits)" if m.generic else "profile"
    click.echo(f"{destination}: {kind} {m.profile.name}")
    for reason in m.reasons:
        click.echo(f"  + {reason}")
    for name, why in sorted(m.rejected.items()):
        click.echo(f"  - not {name}: {why}")


def parse_duration(text: str) -> float:
    """`90`, `90s`, `10m`, `1h` -> seconds."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text or "")
    if not m:
        raise click.BadParameter(f"{text!r} is not a duration; write e.g. 120s, 10m or 1h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


@main.group(cls=Group)
def device():
    """Inspect and prepare devices."""


@device.command()
@click.argument("destination", default="local")
@ssh_options
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="write the facts here")
def facts(destination, identity, accept_new_host_key, remote_python, json_out):
    """Print a device's fingerprint: arch, CPU flags, cores, memory, GPU, backends."""
    import json

    from .report import write_json

    [dev] = devices_from((destination,), identity, accept_new_host_key, remote_python)
    data = dev.facts()
    if json_out:
        write_json(json_out, data)
    click.echo(json.dumps(data, indent=1))


@device.command()
@click.argument("destination")
@ssh_options
@click.option("--wheels", type=click.Path(file_okay=False, exists=True),
              help="push these wheels and install from them only (devices without internet)")
@click.option("--tflite", is_flag=True, help="also install ai-edge-litert")
@click.option("--package", "extra", multiple=True, help="another package to install")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="write the report here")
def setup(destination, identity, accept_new_host_key, remote_python, wheels, tflite, extra,
          json_out):
    """Install numpy and a backend on a device, in a venv under ~/.edgesmith/."""
    from .devices.setup import DEFAULT_PACKAGES, setup as run_setup
    from .report import write_json

    [dev] = devices_from((destination,), identity, accept_new_host_key, remote_python)
    if dev.name == "local":
        raise EdgesmithError("`device setup` is for SSH devices; install locally with pip")
    packages = DEFAULT_PACKAGES + (("ai-edge-litert",) if tflite else ()) + tuple(extra)
    with _status(f"installing {', '.join(packages)} on {destination}"):
        report = run_setup(dev, packages, wheels)
    if json_out:
        write_json(json_out, report)
    click.echo(f"{destination}: {report.python} has " + ", ".join(
        f"{k} {v}" for k, v in sorted(report.installed.items())))


from . import cli_transform  # noqa: E402,F401  (registers fuse/quantize/prune/... on main)

if __name__ == "__main__":   # `python -m sdk.cli`: run the group cli_transform registered on
    from sdk.cli import main as registered_main

    registered_main()
