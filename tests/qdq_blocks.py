"""Random int8 inverted-residual blocks written directly as QDQ graphs, with grids a quantizer
would rarely pick: any zero point, scales over four decades, weights at -128, biases near the
int32 range the kernel allows. onnxruntime fuses them into QLinearConv/QLinearAdd as it does a
quantizer's output (the bias scale is the input's times the weight's, as the quantizer writes
it), so they test the int8 kernel's requantization and saturation on every path."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

EVEX_CC = Path(__file__).resolve().parent.parent / "scripts" / "evex-cc"


def random_grid(rng) -> tuple[float, int]:
    return float(10 ** rng.uniform(-2.5, 0.5)), int(rng.integers(0, 256))


def qdq_block(rng, c: int, e: int, o: int, stride: int = 1, residual: bool = False,
              stem_stride: int = 0, batch: int = 1, h: int = 9, w: int = 9,
              big_bias: bool = False, weight_bits: int | tuple[int, int] = 8):
    """(QDQ model of one block, a float input for it); `stem_stride` > 0 makes the expand a
    3x3 conv of that stride (a network's stem); `big_bias` puts a depthwise bias at 2^24;
    `weight_bits` 7 keeps onnxruntime's x86 kernels without VNNI from saturating (their
    vpmaddubsw sums pairs of u8 x s8 products in int16: 255 x 128 x 2 does not fit), with
    weights from -64 to 64 as reduce_range makes them; (expand's, project's) sets each."""
    k = 3 if stem_stride else 1
    expand_bits, project_bits = (weight_bits, weight_bits) if isinstance(weight_bits, int) \
        else weight_bits
    nodes, inits = [], []

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def q_dq(src, name, grid):
        scale, zero = const(f"{name}_s", np.float32(grid[0])), const(f"{name}_z", np.uint8(grid[1]))
        nodes.append(helper.make_node("QuantizeLinear", [src, scale, zero], [f"{name}_q"]))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", scale, zero], [f"{name}_dq"]))
        return f"{name}_dq"

    def conv(src, name, shape, in_scale, group=1, kernel=1, s=1):
        bits = project_bits if name == "project" else expand_bits
        top = 1 << (bits - 1)
        weights = rng.integers(-top, top + (bits < 8), shape, dtype=np.int8)
        weights.flat[0] = -top
        w_scale = (10 ** rng.uniform(-3, -1, shape[0])).astype(np.float32)
        bias_scale = (np.float32(in_scale) * w_scale).astype(np.float32)
        bias = rng.integers(-20000, 20000, shape[0]).astype(np.int32)
        if big_bias and group > 1:      # past what the kernel's float depthwise keeps exact
            bias[0] = 1 << 24
        nodes.append(helper.make_node("DequantizeLinear", [
            const(f"{name}_w", weights), const(f"{name}_ws", w_scale),
            const(f"{name}_wz", np.zeros(shape[0], np.int8))], [f"{name}_wdq"], axis=0))
        nodes.append(helper.make_node("DequantizeLinear", [
            const(f"{name}_b", bias), const(f"{name}_bs", bias_scale),
            const(f"{name}_bz", np.zeros(shape[0], np.int32))], [f"{name}_bdq"], axis=0))
        nodes.append(helper.make_node("Conv", [src, f"{name}_wdq", f"{name}_bdq"], [name],
                                      group=group, kernel_shape=[kernel, kernel],
                                      strides=[s, s], pads=[kernel // 2] * 4))
        return name

    grids = [random_grid(rng) for _ in range(5)]
    x = q_dq("x", "in", grids[0])
    t = q_dq(conv(x, "expand", (e, c, k, k), grids[0][0], kernel=k, s=stem_stride or 1),
             "e", grids[1])
    t = q_dq(conv(t, "dw", (e, 1, 3, 3), grids[1][0], group=e, kernel=3, s=stride), "d", grids[2])
    t = q_dq(conv(t, "project", (o, e, 1, 1), grids[2][0]), "p", grids[3])
    if residual:
        first = rng.random() < 0.5
        nodes.append(helper.make_node("Add", [x, t] if first else [t, x], ["sum"]))
        t = q_dq("sum", "y", grids[4])
    graph = helper.make_graph(
        nodes, "qdq_block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c, h, w])],
        [helper.make_tensor_value_info(t, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x_in = rng.normal(0, 2 * grids[0][0] * 64, (batch, c, h, w)).astype(np.float32)
    return model, x_in


def avx_vnni_stand_in(flags, compiler: str) -> dict[str, str] | None:
    """The environment in which the avx-vnni kernel build runs on a host with these CPU flags:
    {} where it has AVX-VNNI; where it has AVX-512 VNNI but not AVX-VNNI (Zen 4, Ice Lake,
    Sapphire Rapids), `compiler` behind scripts/evex-cc, which builds the same 256-bit
    vpdpbusd in its EVEX form; None where it has neither."""
    flags = set(flags)
    if "avx_vnni" in flags:
        return {}
    if {"avx2", "fma", "avx512vl", "avx512_vnni"} <= flags:
        return {"EVEX_CC_REAL": compiler, "CC": str(EVEX_CC)}
    return None


def reference_saturates(flags) -> bool:
    """Whether this x86 host's onnxruntime sums u8 x s8 pairs in int16 (no VNNI): exact
    comparisons need 7-bit weights there."""
    return not {"avx512_vnni", "avx_vnni"} & set(flags)
