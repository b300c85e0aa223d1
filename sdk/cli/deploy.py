"""Deploy and operate: `deploy`, `rollback`, `status`."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from .common import devices_from, json_option, ssh_options

DEVICES = click.option("--device", "-d", "devices", multiple=True,
                       help="`local` (default), user@host[:port], a Host alias, or a "
                            "devices.toml inventory; repeat for several")
FLEET = click.option("--fleet", type=click.Path(exists=True, dir_okay=False),
                     help="a devices.toml inventory ([[device]] tables), as --device")
STORE = click.option("--store", help="the model store on the device (default: "
                                     "$EDGESMITH_STORE there, else ~/.edgesmith/models)")


def _devices(devices, fleet, identity, accept_new_host_key, remote_python) -> list:
    return devices_from(tuple(devices) + ((fleet,) if fleet else ()), identity,
                        accept_new_host_key, remote_python)


def _fmt_row(row) -> list[str]:
    acc = row.figures.get("accuracy") or {}
    judged = ", ".join(f"{k} {acc[k]:.4f}" for k in ("top1", "agreement") if k in acc) or \
        (f"SQNR {acc['sqnr_db']:.1f} dB" if "sqnr_db" in acc else "")
    p50 = row.figures.get("p50_ms")
    return [row.device + (" (canary)" if row.canary else ""),
            "-" if row.version is None else str(row.version),
            "-" if row.active is None else str(row.active),
            "activated" if row.activated else ("ok" if row.ok else "FAILED"),
            judged, "" if p50 is None else f"{p50:.3f}", f"{row.seconds:.1f}"]


def _print_rows(title: str, rows) -> None:
    from rich.table import Table

    from ..report.text import print_table

    table = Table(title=title)
    for col in ("device", "version", "active", "result", "judged on the device", "p50 ms", "s"):
        table.add_column(col)
    for row in rows:
        table.add_row(*_fmt_row(row))
    print_table(table)
    for row in rows:       # reasons below the table, one line each: cells stay narrow
        for text in row.reasons + ([row.note] if row.note else []):
            click.echo(f"{row.device}: {text}", err=not row.ok)


@click.command()
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.option("--name", "-n", required=True, help="the name the application serves it by")
@DEVICES
@FLEET
@ssh_options
@STORE
@click.option("--keep", default=5, show_default=True, type=click.IntRange(1),
              help="older versions kept on the device (for rollback)")
@click.option("--latency-tolerance", default=1.5, show_default=True, type=click.FloatRange(0),
              help="the device's p50 may be this many times the latency measured when the "
                   "bundle was chosen, on the same CPU (0: not compared)")
@click.option("--canary", default=0, show_default=True, type=click.IntRange(0),
              help="deploy to the first N devices one by one; a failure stops the rollout")
@click.option("--parallel", default=4, show_default=True, type=click.IntRange(1),
              help="devices deployed to at once after the canaries")
@click.option("--capture", default=0, show_default=True, type=click.IntRange(0),
              help="keep N real field inputs on the device (`edgesmith pull-samples`)")
@json_option("one row per device")
def deploy(source, name, devices, fleet, identity, accept_new_host_key, remote_python, store,
           keep, latency_tolerance, canary, parallel, capture, json_out):
    """Install SOURCE (an optimize OUT or a bundle) on devices as NAME; each activates it only
    after its check there passed (fidelity within the budget it was chosen under, latency within
    the tolerance). A failed check leaves the previous version serving. Re-run to finish."""
    from ..deploy import deploy as run_deploy
    from ..report.text import write_json

    targets = _devices(devices, fleet, identity, accept_new_host_key, remote_python)
    say = None if json_out else (lambda text: click.echo(f"  {text}", err=True))
    rows = run_deploy(source, name, targets, store=store, keep=keep, tolerance=latency_tolerance,
                      capture=capture, canary=canary, parallel=parallel, say=say)
    if json_out:
        write_json(json_out, rows)
    _print_rows(f"edgesmith deploy {name}", rows)
    failed = [r for r in rows if not r.ok]
    click.echo(f"{len(rows) - len(failed)} of {len(rows)} device(s) serve the bundle as {name}"
               + (f"; {len(failed)} failed (run the same command to retry)" if failed else ""))
    sys.exit(1 if failed else 0)


@click.command()
@click.argument("name")
@DEVICES
@FLEET
@ssh_options
@STORE
@click.option("--to", type=int, help="this version (default: the previous one)")
@json_option("one row per device")
def rollback(name, devices, fleet, identity, accept_new_host_key, remote_python, store, to,
             json_out):
    """Make NAME's previous version (or --to VERSION) active again on the devices: a pointer
    switch; serving applications follow between calls."""
    from ..deploy import rollback as run_rollback
    from ..report.text import write_json

    rows = run_rollback(name, _devices(devices, fleet, identity, accept_new_host_key,
                                       remote_python), to=to, store=store)
    if json_out:
        write_json(json_out, rows)
    for row in rows:
        click.echo(f"{row.device}: " + (f"{name} version {row.active} active" if row.ok else
                                         "; ".join(row.reasons)), err=not row.ok)
    sys.exit(0 if all(r.ok for r in rows) else 1)


@click.command()
@click.argument("name", required=False)
@DEVICES
@FLEET
@ssh_options
@STORE
@json_option("each device's store")
def status(name, devices, fleet, identity, accept_new_host_key, remote_python, store, json_out):
    """What each device serves: active and previous versions, who deployed them and when, their
    checks, and the field figures (calls, errors, p50/p99, input drift)."""
    import time

    from ..deploy import status as run_status
    from ..report.text import write_json

    found = run_status(name, _devices(devices, fleet, identity, accept_new_host_key,
                                      remote_python), store=store)
    if json_out:
        write_json(json_out, dict(found))
    failed = False
    for device, reply in found:
        if not reply.get("ok", True):
            click.echo(f"{device}: {reply.get('error')}", err=True)
            failed = True
            continue
        for model, info in reply["models"].items():
            ptr = info["pointer"]
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(ptr["activated"])) \
                if ptr.get("activated") else "never"
            click.echo(f"{device}: {model} active {ptr.get('version')} (previous "
                       f"{ptr.get('previous')}; {when} from {ptr.get('host') or '?'})")
            for v, row in info["versions"].items():
                click.echo("  " + _version_line(v, row))
    sys.exit(1 if failed else 0)


def _version_line(v: str, row: dict) -> str:
    check = row.get("check") or {}
    figures = check.get("figures") or {}
    text = f"v{v}: " + ("check passed" if check.get("passed") else
                        "check FAILED: " + "; ".join(check.get("reasons") or []) if check
                        else "not checked")
    if figures.get("p50_ms"):
        text += f", check p50 {figures['p50_ms']:.3f} ms"
    field = row.get("field")
    if field:
        text += f"; field: {field['calls']} calls, {field['errors']} errors"
        if field.get("p50_ms"):
            text += f", p50 {field['p50_ms']:.3f} ms, p99 {field['p99_ms']:.3f} ms"
        if field.get("load_error"):
            text += f", failed to load in the app: {field['load_error']}"
    drifted = [f"{k} ({d['why']})" for k, d in (row.get("drift") or {}).items() if d["drift"]]
    if drifted:
        text += "; DRIFT: " + ", ".join(drifted)
    return text


@click.command("pull-samples")
@click.argument("name")
@click.option("--device", "-d", default="local", show_default=True,
              help="`local`, user@host[:port] or a Host alias from ~/.ssh/config")
@ssh_options
@STORE
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False),
              help="the .npz to write (what `edgesmith optimize --calib` reads)")
def pull_samples(name, device, identity, accept_new_host_key, remote_python, store, out):
    """Fetch the real inputs a device kept for NAME (`deploy --capture N`): the next
    optimization is calibrated on what the device sees."""
    from ..deploy import pull_samples as run_pull
    from ..errors import EdgesmithError

    [dev] = devices_from((device,), identity, accept_new_host_key, remote_python)
    if Path(out).exists():
        raise EdgesmithError(f"{out} exists; choose another -o (a finished file is never "
                             "replaced silently)")
    n = run_pull(name, dev, out, store=store)
    click.echo(f"wrote {out}: {n} field sample(s) of {name} from {dev.name}")
