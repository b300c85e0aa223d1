"""`profile`: bundle the unchanged model, run it on one or more devices, return what they measured."""
from __future__ import annotations

import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from device_runtime.result import Result

from . import bundle as bundles
from .data import eval_batch, load_eval_set, reference_outputs
from .devices import Job, get_device
from .errors import StageError
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


def measure(bundle: bundles.Bundle, device, job: Job) -> Result:
    """push -> run on one device; a failed stage is a Result with `error`, never an exception."""
    t0 = time.perf_counter()
    job = replace(job, backend=bundle.manifest.backend)
    try:
        facts = device.facts() if bundle.manifest.backend == "onnxruntime" else {}
        limit, opset = facts.get("ort_opset"), bundle.manifest.meta.get("opset")
        if limit and opset and opset > limit:   # known before uploading anything
            ort = facts.get("packages", {}).get("onnxruntime", "")
            return Result.failure("load", f"the model's ONNX opset {opset} is newer than "
                                  f"onnxruntime {ort} on the device reads (up to {limit}): "
                                  f"convert it with `edgesmith fuse MODEL --opset {limit} -o OUT` "
                                  "or upgrade onnxruntime on the device (`edgesmith device setup`)",
                                  device=facts)
        remote = device.push(bundle)
        pushed_ms = (time.perf_counter() - t0) * 1e3
        result = device.run(remote, job)
        if result.stage == "verify" and hasattr(device, "forget"):
            device.forget(remote)      # damaged on the device: upload afresh, once
            result = device.run(device.push(bundle), job)
    except StageError as exc:
        return Result.failure(exc.stage, exc.message)
    result.stages_ms["push"] = pushed_ms
    if result.stage == "load" and "--opset N" in (result.error or ""):
        result.error = name_the_opset(result.error, limit, opset)
    return result


def name_the_opset(message: str, device_opset: int | None, model_opset: int | None) -> str:
    """The device says what IR version or opset it reads; the host's onnx knows which opset fits.

    The model's own opset if that fits (the conversion then only re-stamps the IR version)."""
    from .passes.fuse import newest_opset_for_ir

    found = re.search(r"ONNX (IR version|opset) \d+ .*\(up to (\d+)\)", message)
    if not found:
        return message
    limit = int(found[2])
    opset = newest_opset_for_ir(limit) if found[1] == "IR version" else limit
    fits = min(opset, device_opset or opset)
    return message.replace("--opset N", f"--opset {min(model_opset or fits, fits)}")


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
        model = load(model, input_shapes)
    bundle = prepare(model, eval_path, config, meta={"source": str(model.path)})
    targets = [get_device(d) if isinstance(d, str) or d is None else d for d in devices]
    job = job or Job()

    def one(device) -> Result:
        try:
            return measure(bundle, device, job)
        finally:
            if hasattr(device, "close"):
                device.close()

    with ThreadPoolExecutor(max_workers=max(1, min(8, len(targets)))) as pool:
        results = list(pool.map(one, targets))
    return [(t.name, r) for t, r in zip(targets, results)]
