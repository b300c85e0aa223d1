"""What every command shares: the error-to-exit-code group, device options, small parsers."""
from __future__ import annotations

import contextlib
import re
import sys
import zipfile
from pathlib import Path

import click

from device_runtime.measure import BUSY_SHARE

from ..errors import EdgesmithError


class Group(click.Group):
    """Expected failures print one line on stderr and exit 1; usage errors exit 2 (click)."""

    def invoke(self, ctx):
        from device_runtime.errors import RuntimeFailure

        from .. import cancel

        cancel.install()
        try:
            return super().invoke(ctx)
        except (EdgesmithError, RuntimeFailure) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


def status(message: str, quiet: bool = False):
    """A spinner on stderr when it is a terminal; nothing otherwise (logs stay clean)."""
    from rich.console import Console

    console = Console(stderr=True)
    if quiet or not console.is_terminal:
        return contextlib.nullcontext()
    return console.status(message)


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


def input_shape_option(fn):
    return click.option("--input-shape",
                        help="fix dynamic inputs: NAME=1x3x224x224[,NAME2=...]")(fn)


def state_option(fn):
    return click.option("--state", "state_pairs",
                        help="a streaming model's state: OUTPUT=INPUT[,...] (the next call "
                             "takes OUTPUT as INPUT; paired by name when unset; none: no "
                             "state)")(fn)


def host_device_option(fn):
    return click.option("--host-device", default="auto", show_default=True,
                        help="where torch trains on this host: auto (a CUDA GPU when torch "
                             "sees one), cpu, or cuda[:N]")(fn)


def quant_effort_option(fn):
    return click.option("--quant-effort", default="balanced", show_default=True,
                        type=click.Choice(["fast", "balanced", "max"]),
                        help="how far int8 accuracy repairs go when the fastest recipe misses "
                             "the budget: fast (ranges, calibration, CLE), balanced (+ block "
                             "reconstruction, minutes), max (reconstruction from every start; mixed "
                             "precision learned again around the float blocks)")(fn)


def data_source(ctx, param, value):
    """--calib/--eval/--train take an .npz (or, where said, an image folder): a model or other
    file given there by mistake is refused at once, naming the option."""
    if value and Path(value).is_file() and not zipfile.is_zipfile(value):
        raise click.BadParameter(f"{Path(value).name} is not an .npz file (numpy.savez writes one "
                                 "array per model input, plus optional labels)")
    return value


def model_out(suffix: str):
    """-o of a command that writes one model file: a plain path ending in `suffix`; an existing
    file there must be a model of that format (a re-run replaces it), never an unrelated file
    or a symlink (writing would replace the link, not its target)."""
    def check(ctx, param, value):
        if value is None:
            return value
        path = Path(value)
        if path.is_symlink():
            raise click.BadParameter(f"{value} is a symbolic link; give a plain file path")
        if path.suffix.lower() != suffix:
            raise click.BadParameter(f"{value} does not end in {suffix}; name the model file "
                                     f"{path.with_suffix(suffix).name}")
        if path.exists():
            from device_runtime.bundle import KINDS, model_format

            if not path.is_file():
                raise click.BadParameter(f"{value} exists and is not a file")
            want = suffix[1:]      # the format from the content, as the runtime's verify reads it
            if model_format(path) != want or (want == "onnx" and not _is_onnx(path)):
                raise click.BadParameter(f"{value} exists and is not {KINDS[want]} model; "
                                         "edgesmith does not replace it: choose another -o")
        return value
    return check


def _is_onnx(path: Path) -> bool:
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:     # noqa: BLE001 - whatever the parser says, it is not a model
        return False
    return proto.HasField("graph")


def json_to(ctx, param, value):
    """`--json -`: the JSON alone on stdout (for pipes), all else the command says on stderr;
    write_json takes the returned stream."""
    if value != "-":
        return value
    stdout, sys.stdout = sys.stdout, sys.stderr
    ctx.call_on_close(lambda: setattr(sys, "stdout", stdout))
    return stdout


def json_option(what: str = "the report"):
    return click.option("--json", "json_out", type=click.Path(dir_okay=False), callback=json_to,
                        help=f"write {what} here as JSON ('-': stdout)")


def devices_from(values: tuple[str, ...], identity, accept_new_host_key, remote_python) -> list:
    """--device values: `local`, SSH destinations, or devices.toml inventories."""
    from ..devices import load_inventory
    from ..run import resolve

    devices = []
    for value in values or ("local",):
        if value.endswith(".toml"):
            devices += load_inventory(value)
        elif value == "local":
            devices.append(resolve("local"))
        else:
            devices.append(resolve(value, identity=identity, python=remote_python,
                                   accept_new_host_key=accept_new_host_key))
    return devices


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


def parse_duration(text: str) -> float:
    """`90`, `90s`, `10m`, `1h` -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text or "")
    if not m:
        raise click.BadParameter(f"{text!r} is not a duration; write e.g. 120s, 10m or 1h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def config_error(exc: ValueError) -> EdgesmithError:
    """A config dataclass refused a value: its message names the field."""
    return EdgesmithError(str(exc))


def wait_idle_option(f):
    return click.option("--wait-idle", default="0", show_default=True,
                        help="before each timing, wait up to this long (e.g. 60s) for other "
                             "processes to leave the device's cores (busy: over "
                             f"{BUSY_SHARE:.0%} of them); figures taken busy are flagged either "
                             "way")(f)
