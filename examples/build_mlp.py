"""A digits MLP in both formats: TFLite (written with the `tflite` package's flatbuffer builders)
and ONNX (onnx.helper), with identical weights from scikit-learn's MLPClassifier.

    python examples/build_mlp.py     # writes examples/models/digits_mlp.{tflite,onnx,_eval.npz}

No converter is involved: both files are built op by op, so the TFLite backend is tested on a real
model without installing TensorFlow. Needs the `dev` extra (scikit-learn, tflite, flatbuffers).
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import flatbuffers
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.neural_network import MLPClassifier

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import digits  # noqa: E402

HIDDEN = 32


def tfl(name: str):
    """The flatc-generated module (its builder functions), not the class tflite re-exports."""
    return importlib.import_module(f"tflite.{name}")


def _vector(builder, start, items, prepend):
    start(builder, len(items))
    for item in reversed(items):
        prepend(item)
    return builder.EndVector()


def write_tflite(path: Path, w1, b1, w2, b2) -> None:
    """input[1,64] -> FULLY_CONNECTED(+RELU) -> FULLY_CONNECTED -> logits[1,10]."""
    b = flatbuffers.Builder(1024)
    Model, SubGraph, Tensor, Operator = tfl("Model"), tfl("SubGraph"), tfl("Tensor"), tfl("Operator")
    Buffer, OpCode, FCOpts = tfl("Buffer"), tfl("OperatorCode"), tfl("FullyConnectedOptions")
    builtin_op, builtin_opts = tfl("BuiltinOperator").BuiltinOperator, tfl("BuiltinOptions")
    act, ttype = tfl("ActivationFunctionType").ActivationFunctionType, tfl("TensorType").TensorType

    # buffers: 0 is the empty sentinel; weights follow in tensor order
    datas = [None, w1, b1, w2, b2]
    buffers = []
    for data in datas:
        vec = None
        if data is not None:
            raw = np.ascontiguousarray(data, dtype=np.float32).tobytes()
            b.StartVector(1, len(raw), 16)
            b.head = b.head - len(raw)
            b.Bytes[b.head:b.head + len(raw)] = raw
            vec = b.EndVector()
        Buffer.BufferStart(b)
        if vec is not None:
            Buffer.BufferAddData(b, vec)
        buffers.append(Buffer.BufferEnd(b))
    # tensors: (name, shape, buffer)
    specs = [("input", [1, 64], 0), ("fc1/weights", list(w1.shape), 1), ("fc1/bias", [HIDDEN], 2),
             ("hidden", [1, HIDDEN], 0), ("fc2/weights", list(w2.shape), 3), ("fc2/bias", [10], 4),
             ("logits", [1, 10], 0)]
    tensors = []
    for name, shape, buf in specs:
        name_off = b.CreateString(name)
        shape_off = _vector(b, Tensor.TensorStartShapeVector, shape, b.PrependInt32)
        Tensor.TensorStart(b)
        Tensor.TensorAddShape(b, shape_off)
        Tensor.TensorAddType(b, ttype.FLOAT32)
        Tensor.TensorAddBuffer(b, buf)
        Tensor.TensorAddName(b, name_off)
        tensors.append(Tensor.TensorEnd(b))
    ops = []
    for inputs, output, activation in (([0, 1, 2], 3, act.RELU), ([3, 4, 5], 6, act.NONE)):
        FCOpts.FullyConnectedOptionsStart(b)
        FCOpts.FullyConnectedOptionsAddFusedActivationFunction(b, activation)
        opts = FCOpts.FullyConnectedOptionsEnd(b)
        ins = _vector(b, Operator.OperatorStartInputsVector, inputs, b.PrependInt32)
        outs = _vector(b, Operator.OperatorStartOutputsVector, [output], b.PrependInt32)
        Operator.OperatorStart(b)
        Operator.OperatorAddOpcodeIndex(b, 0)
        Operator.OperatorAddInputs(b, ins)
        Operator.OperatorAddOutputs(b, outs)
        Operator.OperatorAddBuiltinOptionsType(b, builtin_opts.BuiltinOptions.FullyConnectedOptions)
        Operator.OperatorAddBuiltinOptions(b, opts)
        ops.append(Operator.OperatorEnd(b))
    tensors_off = _vector(b, SubGraph.SubGraphStartTensorsVector, tensors, b.PrependUOffsetTRelative)
    in_off = _vector(b, SubGraph.SubGraphStartInputsVector, [0], b.PrependInt32)
    out_off = _vector(b, SubGraph.SubGraphStartOutputsVector, [6], b.PrependInt32)
    ops_off = _vector(b, SubGraph.SubGraphStartOperatorsVector, ops, b.PrependUOffsetTRelative)
    sg_name = b.CreateString("main")
    SubGraph.SubGraphStart(b)
    SubGraph.SubGraphAddTensors(b, tensors_off)
    SubGraph.SubGraphAddInputs(b, in_off)
    SubGraph.SubGraphAddOutputs(b, out_off)
    SubGraph.SubGraphAddOperators(b, ops_off)
    SubGraph.SubGraphAddName(b, sg_name)
    subgraph = SubGraph.SubGraphEnd(b)
    OpCode.OperatorCodeStart(b)
    OpCode.OperatorCodeAddDeprecatedBuiltinCode(b, builtin_op.FULLY_CONNECTED)
    OpCode.OperatorCodeAddBuiltinCode(b, builtin_op.FULLY_CONNECTED)
    OpCode.OperatorCodeAddVersion(b, 1)
    opcode = OpCode.OperatorCodeEnd(b)
    codes_off = _vector(b, Model.ModelStartOperatorCodesVector, [opcode], b.PrependUOffsetTRelative)
    subgraphs_off = _vector(b, Model.ModelStartSubgraphsVector, [subgraph],
                            b.PrependUOffsetTRelative)
    buffers_off = _vector(b, Model.ModelStartBuffersVector, buffers, b.PrependUOffsetTRelative)
    desc = b.CreateString("edgesmith digits MLP")
    Model.ModelStart(b)
    Model.ModelAddVersion(b, 3)
    Model.ModelAddOperatorCodes(b, codes_off)
    Model.ModelAddSubgraphs(b, subgraphs_off)
    Model.ModelAddDescription(b, desc)
    Model.ModelAddBuffers(b, buffers_off)
    b.Finish(Model.ModelEnd(b), file_identifier=b"TFL3")
    path.write_bytes(b.Output())


def write_onnx(path: Path, w1, b1, w2, b2) -> None:
    """The same network as ONNX: Gemm(transB) -> Relu -> Gemm(transB)."""
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in
             ((w1, "fc1.weight"), (b1, "fc1.bias"), (w2, "fc2.weight"), (b2, "fc2.bias"))]
    nodes = [helper.make_node("Gemm", ["input", "fc1.weight", "fc1.bias"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["hidden"]),
             helper.make_node("Gemm", ["hidden", "fc2.weight", "fc2.bias"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "digits_mlp",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
                              inits)
    # IR 8 is what opset 17 needs; onnx's default (its newest IR) shuts out older onnxruntimes
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
                              producer_name="edgesmith-examples")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def main() -> None:
    out = HERE / "models"
    out.mkdir(exist_ok=True)
    x_train, y_train, x_test, y_test = digits.load(8)
    x_train, x_test = x_train.reshape(len(x_train), 64), x_test.reshape(len(x_test), 64)
    clf = MLPClassifier((HIDDEN,), max_iter=600, random_state=0).fit(x_train, y_train)
    print(f"digits MLP test top-1 {clf.score(x_test, y_test):.4f}")
    # sklearn stores [in, out]; TFLite FULLY_CONNECTED and ONNX Gemm(transB) take [out, in]
    w1, w2 = clf.coefs_[0].T, clf.coefs_[1].T
    b1, b2 = clf.intercepts_
    write_tflite(out / "digits_mlp.tflite", w1, b1, w2, b2)
    write_onnx(out / "digits_mlp.onnx", w1, b1, w2, b2)
    digits.save_eval(str(out / "digits_mlp_eval.npz"), "input", x_test, y_test)


if __name__ == "__main__":
    main()
