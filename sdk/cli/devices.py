"""Devices and targets: `device facts|setup`, `targets [match]`, `doctor`."""
from __future__ import annotations

import json
import sys

import click

from ..errors import EdgesmithError
from .common import Group, devices_from, json_option, ssh_options, status


@click.group(cls=Group, invoke_without_command=True)
@click.pass_context
def targets(ctx):
    """List the target profiles (targets/*.toml)."""
    if ctx.invoked_subcommand is None:
        from rich.table import Table

        from ..report.text import print_table
        from ..targets import all_profiles

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
    from ..targets import match

    [dev] = devices_from((destination,), identity, accept_new_host_key, remote_python)
    m = match(dev.facts())
    kind = "generic profile (no shipped profile fits)" if m.generic else "profile"
    click.echo(f"{destination}: {kind} {m.profile.name}")
    for reason in m.reasons:
        click.echo(f"  + {reason}")
    for name, why in sorted(m.rejected.items()):
        click.echo(f"  - not {name}: {why}")


@click.group(cls=Group)
def device():
    """Inspect and prepare devices."""


@device.command()
@click.argument("destination", default="local")
@ssh_options
@json_option("the facts")
def facts(destination, identity, accept_new_host_key, remote_python, json_out):
    """Print a device's fingerprint: arch, CPU flags, cores, memory, GPU, backends."""
    from ..report.text import write_json

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
@json_option()
def setup(destination, identity, accept_new_host_key, remote_python, wheels, tflite, extra,
          json_out):
    """Install numpy and a backend on a device, in a venv under ~/.edgesmith/."""
    from ..devices.setup import DEFAULT_PACKAGES, setup as run_setup
    from ..report.text import write_json

    [dev] = devices_from((destination,), identity, accept_new_host_key, remote_python)
    if dev.name == "local":
        raise EdgesmithError("`device setup` is for SSH devices; install locally with pip")
    packages = DEFAULT_PACKAGES + (("ai-edge-litert",) if tflite else ()) + tuple(extra)
    with status(f"installing {', '.join(packages)} on {destination}"):
        report = run_setup(dev, packages, wheels)
    if json_out:
        write_json(json_out, report)
    click.echo(f"{destination}: {report.python} has " + ", ".join(
        f"{k} {v}" for k, v in sorted(report.installed.items())))


@click.command()
@click.option("--device", "-d", "destination", default="local", show_default=True,
              help="also check this device (SSH destination)")
@ssh_options
@json_option()
def doctor(destination, identity, accept_new_host_key, remote_python, json_out):
    """What is installed on the host (and the device), what each part enables, how to add it."""
    from ..doctor import check_device, check_host
    from ..report.text import write_json

    rows = check_host()
    if destination != "local":
        [dev] = devices_from((destination,), identity, accept_new_host_key, remote_python)
        rows += check_device(dev)
    if json_out:
        write_json(json_out, rows)
    for row in rows:
        mark = "ok " if row["ok"] else "-- "
        click.echo(f"{mark}{row['where']:<7} {row['what']:<22} {row['detail']}")
        if not row["ok"]:
            click.echo(f"{'':11}{row['enables']}: {row['fix']}")
    if any(r["what"] == "reachable" and not r["ok"] for r in rows):
        sys.exit(1)        # the device asked about cannot be used at all
