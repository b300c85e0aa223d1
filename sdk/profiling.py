"""`profile`: bundle the unchanged model, run it on a device, return what the device measured."""
from __future__ import annotations

import os

from device_runtime.result import Result

from . import bundle as bundles
from .data import eval_batch, load_eval_set, reference_outputs
from .devices import Job, get_device
from .model import Model, load


def prepare(model: Model, eval_path: str | os.PathLike | None, config: dict | None = None,
            meta: dict | None = None) -> bundles.Bundle:
    """Bundle a model with its eval set and the host's reference outputs of the same model."""
    data = None
    batch = eval_batch(model)
    if eval_path is not None:
        data = load_eval_set(eval_path, model)
        data.refs = reference_outputs(model, data, batch)
    return bundles.build(model, config=config, eval_data=data, eval_batch=batch, meta=meta)


def profile(model: str | os.PathLike | Model, device: str | None = "local",
            eval_path: str | os.PathLike | None = None, job: Job | None = None,
            input_shapes: dict | None = None, config: dict | None = None) -> Result:
    """Measure `model` as it is on `device` (latency, memory, accuracy on `eval_path`)."""
    if not isinstance(model, Model):
        model = load(model, input_shapes)
    target = get_device(device)
    bundle = prepare(model, eval_path, config, meta={"source": str(model.path)})
    remote = target.push(bundle)
    return target.run(remote, job or Job())
