"""TFLite models on the host: input specs and size, read through the TFLite interpreter."""
from __future__ import annotations

from pathlib import Path

from device_runtime.errors import RuntimeFailure

from .errors import EdgesmithError
from .model import InputSpec, Model, ModelFacts


def load_tflite(path: Path, data: bytes, input_shapes: dict[str, list[int]]) -> Model:
    from device_runtime.backends.tflite import Backend

    try:
        backend = Backend(str(path), {"xnnpack": False})
    except RuntimeFailure as exc:
        raise EdgesmithError(f"cannot read {path.name}: {exc.message}") from None
    details = backend.interp.get_input_details()
    names = [d["name"] for d in details]
    unknown = sorted(set(input_shapes) - set(names))
    if unknown:
        raise EdgesmithError(f"--input-shape names {unknown}, but the model's inputs are {names}")
    inputs = []
    for d in details:
        dims = [None if s < 0 else int(s) for s in d.get("shape_signature", d["shape"])]
        shape = input_shapes.get(d["name"], [int(s) for s in d["shape"]])
        inputs.append(InputSpec(d["name"], dims, list(shape), str(d["dtype"].__name__)))
    facts = ModelFacts("tflite", len(data), 0, 0, {},
                       notes=["parameters and MACs are not computed for TFLite models"])
    return Model(path, "tflite", inputs, backend.output_names, facts, data=data)
