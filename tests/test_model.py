"""Model facts: parameters and MACs computed independently of the code under test."""
from __future__ import annotations

import numpy as np
import pytest

from edgesmith.errors import EdgesmithError
from edgesmith.model import from_proto, load, parse_input_shapes
from edgesmith.search.int8 import quantize_with


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


def test_pooled_features_are_judged_by_sqnr_and_class_scores_by_agreement():
    """A feature extractor's [N, 2048] output is 2-D like class scores, but the arg-max of
    pooled features means nothing: ResNet-50 features at 23.5 dB agreed on every arg-max, and
    the int8 search called that no loss. Its SQNR decides instead."""
    from onnx import TensorProto, helper

    from edgesmith.model import class_scores
    from edgesmith.run.budget import FIDELITY_SQNR_DB, accuracy_drop

    def graph(*tail):
        nodes = [helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
                 helper.make_node("Flatten", ["pooled"], ["features"])]
        last = "features"
        for op in tail:
            inputs = [last, "w"] if op == "MatMul" else [last]
            nodes.append(helper.make_node(op, inputs, [f"{op}_out"]))
            last = f"{op}_out"
        return helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 4, 4])],
            [helper.make_tensor_value_info(last, TensorProto.FLOAT, None)])

    assert not class_scores(graph())
    assert not class_scores(graph("Tanh"))
    assert class_scores(graph("MatMul")) and class_scores(graph("MatMul", "Softmax"))
    assert class_scores(graph("MatMul", "Identity"))
    fp32 = {"agreement": 1.0, "sqnr_db": 200.0}
    noisy = {"agreement": 1.0, "sqnr_db": FIDELITY_SQNR_DB - 1.5}
    assert accuracy_drop(fp32, noisy, scores=True) == 0.0
    assert accuracy_drop(fp32, noisy, scores=False) == 1.0
    assert accuracy_drop(fp32, {**noisy, "sqnr_db": FIDELITY_SQNR_DB + 1}, scores=False) == 0.0
