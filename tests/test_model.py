"""Model facts: parameters and MACs computed independently of the code under test."""
from __future__ import annotations

import numpy as np
import pytest

from edgesmith.errors import EdgesmithError
from edgesmith.model import from_proto, load, parse_input_shapes
from edgesmith.recipes import quantize_with


def test_cnn_facts_match_the_architecture(models):
    model = load(models / "digits_cnn.onnx")
    # DigitsCNN: conv 1->16, 16->32 at 8x8; maxpool; 32->64 at 4x4; Linear 1024->64->10
    convs = 8 * 8 * 16 * 1 * 9 + 8 * 8 * 32 * 16 * 9 + 4 * 4 * 64 * 32 * 9
    gemms = 1024 * 64 + 64 * 10
    assert model.facts.macs_by_op == {"Conv": convs, "Gemm": gemms}
    weights = 16 * 9 + 32 * 16 * 9 + 64 * 32 * 9 + 1024 * 64 + 64 * 10
    biases = 16 + 32 + 64 + 64 + 10       # BN folded into conv biases at export
    assert model.facts.params == weights + biases
    x = np.load(models / "digits_cnn_eval.npz")["input"][:16]
    int8, _ = quantize_with(model, "qdq-u8s8", [{"input": x}])
    assert from_proto(int8, model).facts.params == weights + biases   # int8 weights count too
    assert model.inputs[0].shape == [1, 1, 8, 8] and model.inputs[0].dims[0] is None
    assert any("dynamic batch" in note for note in model.facts.notes)


def test_input_shape_sets_the_batch(models):
    model = load(models / "digits_cnn.onnx", parse_input_shapes("input=4x1x8x8"))
    assert model.inputs[0].shape == [4, 1, 8, 8]
    assert model.facts.macs_by_op["Gemm"] == 4 * (1024 * 64 + 64 * 10)


@pytest.mark.parametrize("text", ["input", "input=", "=1x2", "input=1xa", "input=0x3"])
def test_bad_input_shape_text(text):
    with pytest.raises(EdgesmithError, match="--input-shape"):
        parse_input_shapes(text)


def test_input_shape_must_fit(models):
    with pytest.raises(EdgesmithError, match="does not fit"):
        load(models / "digits_cnn.onnx", {"input": [1, 3, 8, 8]})
