"""`profile`: bundle the unchanged model, run it on one or more devices, return what they measured."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from device_runtime.result import Result

from . import bundle as bundles
from .data import eval_batch, load_eval_set, reference_outputs
from .devices import Job
from .measure import measure
from .model import Model, load
from .run import resolve


def prepare(model: Model, eval_path: str | os.PathLike | None, config: dict | None = None,
            meta: dict | None = None) -> bundles.Bundle:
    """Bundle a model with its eval set and the host's reference outputs of the same model."""
    data = None
    batch = eval_batch(model)
    if eval_path is not None:
        data = load_eval_set(eval_path, model)
        data.refs = reference_outputs(model, data, batch)
    return bundles.build(model, config=config, eval_data=data, eval_batch=batch, meta=meta)


def profile(model: str | os.PathLike | Model, device="local",
            eval_path: str | os.PathLike | None = None, job: Job | None = None,
            input_shapes: dict | None = None, config: dict | None = None) -> Result:
    """Measure `model` as it is on `device` (a name or a Device): latency, memory, accuracy."""
    return profile_many(model, [device], eval_path, job, input_shapes, config)[0][1]


def profile_many(model: str | os.PathLike | Model, devices: list,
                 eval_path: str | os.PathLike | None = None, job: Job | None = None,
                 input_shapes: dict | None = None, config: dict | None = None
                 ) -> list[tuple[str, Result]]:
    """The same bundle on every device, in parallel; an unreachable device is an error row."""
    if not isinstance(model, Model):
        model = load(model, input_shapes, data=eval_path)
    bundle = prepare(model, eval_path, config, meta={"source": str(model.path)})
    targets = [resolve(d) for d in devices]
    job = job or Job()

    def one(device) -> Result:
        try:
            return measure(device, bundle, job)
        finally:
            if hasattr(device, "close"):
                device.close()

    with ThreadPoolExecutor(max_workers=max(1, min(8, len(targets)))) as pool:
        results = list(pool.map(one, targets))
    return [(t.name, r) for t, r in zip(targets, results)]
