"""edgesmith: optimise a model for an edge device, measured on that device.

The click entry point: thin commands over the Python API, one module per family of commands;
every module imports only `common`, and this one gathers them (no import cycles).
"""
from __future__ import annotations

import click

from .common import Group
from .deploy import deploy, pull_samples, rollback, status
from .devices import device, doctor, targets
from .profile import profile
from .search import nas, optimize, tune
from .transform import convert, distill, fuse, prune, quantize


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgesmith")
def main():
    """edgesmith: optimise a model for an edge device, measured on that device."""


for command in (optimize, profile, fuse, quantize, prune, distill, convert, tune, nas, deploy,
                rollback, status, pull_samples, device, targets, doctor):
    main.add_command(command)
