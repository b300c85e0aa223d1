"""ONNX ops as torch functions, for the ONNX->torch interpreter (`interpreter`).

One plain registry: `OPS[op_type](node, inputs, env) -> tensor | tuple of tensors`. The set
covers what real exports contain (the test corpus: classifiers from old zoo graphs to dynamo,
YOLO-style detectors, DBNet/CRNN OCR, transformers), so students of all of them can be trained.
Parameters are read through `graph.operand`, whatever opset wrote them (input or attribute).
Anything the interpreter cannot reproduce exactly is refused with the op's name, never guessed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import EdgesmithError
from ..onnx_utils import attr, operand


@dataclass(frozen=True)
class Env:
    torch: object
    F: object
    opset: int


OPS: dict = {}


def op(*names):
    def add(fn):
        for name in names:
            OPS[name] = fn
        return fn
    return add


def _ints(value) -> list[int]:
    return [int(v) for v in (value.tolist() if hasattr(value, "tolist") else value)]


def _pads(node, x=None):
    """(symmetric padding for torch, or None; explicit F.pad list for asymmetric)."""
    if attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        raise EdgesmithError(f"{node.op_type} {node.name}: auto_pad SAME is not supported; run "
                             "`edgesmith fuse` or re-export with explicit pads")
    pads = attr(node, "pads")
    if not pads:
        return 0, None
    half = len(pads) // 2
    if list(pads[:half]) == list(pads[half:]):
        return tuple(pads[:half]), None
    return 0, [p for pair in zip(reversed(pads[:half]), reversed(pads[half:])) for p in pair]


@op("Constant")
def _constant(n, x, e):
    value = attr(n, "value")
    if value is None:
        raise EdgesmithError(f"Constant {n.name}: only tensor `value` is supported")
    return e.torch.tensor(numpy_helper.to_array(value).copy())


@op("Conv")
def _conv(n, x, e):
    pad, explicit = _pads(n)
    inp = e.F.pad(x[0], explicit) if explicit else x[0]
    conv = {3: e.F.conv1d, 4: e.F.conv2d, 5: e.F.conv3d}[x[0].dim()]
    rank = x[0].dim() - 2
    return conv(inp, x[1], x[2] if len(x) > 2 else None, tuple(attr(n, "strides", [1] * rank)),
                pad, tuple(attr(n, "dilations", [1] * rank)), attr(n, "group", 1))


@op("ConvTranspose")
def _conv_transpose(n, x, e):
    pad, explicit = _pads(n)
    if explicit or attr(n, "output_shape") or x[0].dim() != 4:
        raise EdgesmithError(f"ConvTranspose {n.name}: only 2-D with symmetric pads is supported")
    return e.F.conv_transpose2d(x[0], x[1], x[2] if len(x) > 2 else None,
                                tuple(attr(n, "strides", [1, 1])), pad,
                                tuple(attr(n, "output_padding", [0, 0])), attr(n, "group", 1),
                                tuple(attr(n, "dilations", [1, 1])))


@op("Gemm")
def _gemm(n, x, e):
    a = x[0].t() if attr(n, "transA", 0) else x[0]
    b = x[1].t() if attr(n, "transB", 0) else x[1]
    y = attr(n, "alpha", 1.0) * (a @ b)
    return y + attr(n, "beta", 1.0) * x[2] if len(x) > 2 and x[2] is not None else y


_UNARY = {"Relu": lambda t, F, x: F.relu(x), "Sigmoid": lambda t, F, x: t.sigmoid(x),
          "Tanh": lambda t, F, x: t.tanh(x), "HardSwish": lambda t, F, x: F.hardswish(x),
          "Erf": lambda t, F, x: t.erf(x), "Sqrt": lambda t, F, x: t.sqrt(x),
          "Exp": lambda t, F, x: t.exp(x), "Log": lambda t, F, x: t.log(x),
          "Neg": lambda t, F, x: -x, "Abs": lambda t, F, x: x.abs(),
          "Reciprocal": lambda t, F, x: 1 / x, "Floor": lambda t, F, x: x.floor(),
          "Ceil": lambda t, F, x: x.ceil(), "Softplus": lambda t, F, x: F.softplus(x),
          "Identity": lambda t, F, x: x, "Dropout": lambda t, F, x: x}
_BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Pow": "pow",
           "MatMul": "matmul", "Equal": "eq", "Less": "lt", "Greater": "gt"}


@op(*_UNARY)
def _unary(n, x, e):
    return _UNARY[n.op_type](e.torch, e.F, x[0])


@op(*_BINARY)
def _binary(n, x, e):
    fn = getattr(e.torch, _BINARY[n.op_type])
    a, b = x[0], x[1]
    if n.op_type == "Div" and not a.is_floating_point() and not b.is_floating_point():
        return e.torch.div(a, b, rounding_mode="trunc")
    return fn(a, b)


@op("Sum", "Max", "Min")
def _variadic(n, x, e):
    fn = {"Sum": e.torch.add, "Max": e.torch.maximum, "Min": e.torch.minimum}[n.op_type]
    out = x[0]
    for t in x[1:]:
        out = fn(out, t)
    return out


@op("Where")
def _where(n, x, e):
    return e.torch.where(x[0].bool(), x[1], x[2])


@op("Clip")
def _clip(n, x, e):
    lo, hi = (operand(n, x, i, key) for i, key in ((1, "min"), (2, "max")))
    return e.torch.clamp(x[0], None if lo is None else float(lo),
                         None if hi is None else float(hi))


@op("Gelu")
def _gelu(n, x, e):
    approximate = attr(n, "approximate", b"none")
    return e.F.gelu(x[0], approximate="tanh" if approximate in (b"tanh", "tanh") else "none")


@op("LeakyRelu")
def _leaky(n, x, e):
    return e.F.leaky_relu(x[0], attr(n, "alpha", 0.01))


@op("HardSigmoid")
def _hard_sigmoid(n, x, e):
    return e.torch.clamp(attr(n, "alpha", 0.2) * x[0] + attr(n, "beta", 0.5), 0, 1)


@op("Softmax", "LogSoftmax")
def _softmax(n, x, e):
    fn = e.torch.softmax if n.op_type == "Softmax" else e.torch.log_softmax
    if e.opset >= 13:
        return fn(x[0], attr(n, "axis", -1))
    axis = attr(n, "axis", 1) % x[0].dim()     # before opset 13: over the flattened tail
    flat = x[0].reshape(int(np.prod(x[0].shape[:axis])), -1)
    return fn(flat, 1).reshape(x[0].shape)


@op("BatchNormalization")
def _batch_norm(n, x, e):   # inference statistics; scale and shift train
    return e.F.batch_norm(x[0], x[3], x[4], x[1], x[2], False, 0.0, attr(n, "epsilon", 1e-5))


@op("LayerNormalization")
def _layer_norm(n, x, e):
    axis = attr(n, "axis", -1) % x[0].dim()
    return e.F.layer_norm(x[0], tuple(x[0].shape[axis:]), x[1], x[2] if len(x) > 2 else None,
                          attr(n, "epsilon", 1e-5))


@op("Flatten")
def _flatten(n, x, e):
    axis = attr(n, "axis", 1)
    return x[0].reshape(int(np.prod(x[0].shape[:axis])) if axis else 1, -1)


@op("Reshape")
def _reshape(n, x, e):
    shape = _ints(x[1])
    if not attr(n, "allowzero", 0):
        shape = [x[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x[0].reshape(shape)


@op("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(n, x, e):
    dims = tuple(range(2, x[0].dim()))
    if n.op_type == "GlobalAveragePool":
        return x[0].mean(dim=dims, keepdim=True)
    return x[0].amax(dim=dims, keepdim=True)


@op("MaxPool", "AveragePool")
def _pool(n, x, e):
    pad, explicit = _pads(n)
    if explicit and n.op_type == "AveragePool" and not attr(n, "count_include_pad", 0):
        raise EdgesmithError(f"AveragePool {n.name}: asymmetric pads without "
                             "count_include_pad are not supported for training")
    inp = e.F.pad(x[0], explicit, value=-np.inf if n.op_type == "MaxPool" else 0.0) \
        if explicit else x[0]
    k = tuple(attr(n, "kernel_shape"))
    s = tuple(attr(n, "strides", [1] * len(k)))
    if len(k) != 2 or any(d != 1 for d in attr(n, "dilations", [1, 1])):
        raise EdgesmithError(f"{n.op_type} {n.name}: only 2-D pooling without dilation")
    if n.op_type == "MaxPool":
        return e.F.max_pool2d(inp, k, s, pad, ceil_mode=bool(attr(n, "ceil_mode", 0)))
    return e.F.avg_pool2d(inp, k, s, pad, ceil_mode=bool(attr(n, "ceil_mode", 0)),
                          count_include_pad=bool(attr(n, "count_include_pad", 0)))


@op("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin")
def _reduce(n, x, e):
    axes = operand(n, x, 1, "axes")
    keep = bool(attr(n, "keepdims", 1))
    if axes is None or not len(_ints(axes)):
        if attr(n, "noop_with_empty_axes", 0):
            return x[0]
        axes = range(x[0].dim())
    dims = tuple(a % x[0].dim() for a in _ints(axes))
    fn = {"ReduceMean": "mean", "ReduceSum": "sum", "ReduceMax": "amax", "ReduceMin": "amin"}
    return getattr(x[0], fn[n.op_type])(dim=dims, keepdim=keep)


@op("Concat")
def _concat(n, x, e):
    return e.torch.cat([t for t in x if t is not None], attr(n, "axis"))


@op("Split")
def _split(n, x, e):
    axis = attr(n, "axis", 0)
    sizes = operand(n, x, 1, "split")
    if sizes is None or not len(_ints(sizes)):
        count, dim = attr(n, "num_outputs", len(n.output)), x[0].shape[axis]
        size = -(-dim // count)     # ceil: onnx makes the last part(s) shorter, even empty
        sizes = [max(0, min(size, dim - i * size)) for i in range(count)]
        return tuple(e.torch.split(x[0], sizes, axis))
    return tuple(e.torch.split(x[0], _ints(sizes), axis))


@op("Squeeze", "Unsqueeze")
def _squeeze(n, x, e):
    axes = operand(n, x, 1, "axes")
    y = x[0]
    if n.op_type == "Squeeze":
        if axes is None:
            return y.squeeze()
        for a in sorted((a % y.dim() for a in _ints(axes)), reverse=True):
            y = y.squeeze(a)
        return y
    rank = y.dim() + len(_ints(axes))
    for a in sorted(a % rank for a in _ints(axes)):
        y = y.unsqueeze(a)
    return y


@op("Transpose")
def _transpose(n, x, e):
    perm = attr(n, "perm") or list(reversed(range(x[0].dim())))
    return x[0].permute(*perm)


@op("Shape")
def _shape(n, x, e):
    dims = list(x[0].shape)
    start, end = attr(n, "start", 0), attr(n, "end", len(dims))
    return e.torch.tensor(dims[start:end], dtype=e.torch.int64)


@op("Gather")
def _gather(n, x, e):
    axis = attr(n, "axis", 0) % x[0].dim()
    index = x[1].long()
    index = e.torch.where(index < 0, index + x[0].shape[axis], index)
    flat = e.torch.index_select(x[0], axis, index.reshape(-1))
    return flat.reshape(tuple(x[0].shape[:axis]) + tuple(index.shape) + tuple(x[0].shape[axis + 1:]))


@op("Slice")
def _slice(n, x, e):
    starts, ends = _ints(operand(n, x, 1, "starts")), _ints(operand(n, x, 2, "ends"))
    axes = operand(n, x, 3, "axes")
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = operand(n, x, 4, "steps")
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    y = x[0]
    for start, end, axis, step in zip(starts, ends, axes, steps):
        size = y.shape[axis]
        if step < 0:
            raise EdgesmithError(f"Slice {n.name}: negative steps are not supported")
        start = max(0, min(size, start + size if start < 0 else start))
        end = max(0, min(size, end + size if end < 0 else end))
        y = y.narrow(axis, start, max(0, end - start))[(slice(None),) * (axis % y.dim())
                                                      + (slice(None, None, step),)]
    return y


_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.DOUBLE: "float64",
           onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT64: "int64",
           onnx.TensorProto.INT32: "int32", onnx.TensorProto.BOOL: "bool",
           onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8"}


@op("Cast")
def _cast(n, x, e):
    to = attr(n, "to")
    if to not in _DTYPES:
        raise EdgesmithError(f"Cast {n.name}: target type {to} is not supported")
    return x[0].to(getattr(e.torch, _DTYPES[to]))


@op("ConstantOfShape")
def _constant_of_shape(n, x, e):
    value = attr(n, "value")
    fill = numpy_helper.to_array(value) if value is not None else np.zeros(1, np.float32)
    return e.torch.full(_ints(x[0]), fill.reshape(-1)[0].item(),
                        dtype=getattr(e.torch, str(fill.dtype)))


@op("Expand")
def _expand(n, x, e):
    shape = _ints(x[1])
    return x[0] * e.torch.ones(shape, dtype=x[0].dtype)     # numpy-style broadcast, as ONNX


@op("Range")
def _range(n, x, e):
    return e.torch.arange(x[0].item(), x[1].item(), x[2].item(), dtype=x[0].dtype)


@op("Pad")
def _pad(n, x, e):
    pads = _ints(operand(n, x, 1, "pads"))
    value = operand(n, x, 2, "value", 0.0)
    value = float(value.reshape(-1)[0]) if hasattr(value, "reshape") else float(value)
    mode = attr(n, "mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if len(x) > 3 and x[3] is not None:
        raise EdgesmithError(f"Pad {n.name}: the `axes` input is not supported")
    half = len(pads) // 2
    torch_pads = [p for d in reversed(range(half)) for p in (pads[d], pads[d + half])]
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}.get(mode)
    if mode is None:
        raise EdgesmithError(f"Pad {n.name}: mode {attr(n, 'mode')} is not supported")
    while torch_pads and mode != "constant" and torch_pads[-2:] == [0, 0]:
        torch_pads = torch_pads[:-2]   # torch pads only the spatial dims in these modes
    return e.F.pad(x[0], torch_pads, mode=mode, value=value if mode == "constant" else None)


@op("Resize", "Upsample")
def _resize(n, x, e):
    """nearest (asymmetric, floor) and (bi)linear (half-pixel or align-corners): what torch,
    Keras and the old zoo export; other modes are refused rather than approximated."""
    def text(name, default):
        value = attr(n, name, default)
        return value.decode() if isinstance(value, bytes) else value

    legacy = n.op_type == "Upsample" or e.opset < 11       # before 11: asymmetric, no modes
    mode, ctm = text("mode", "nearest"), text("coordinate_transformation_mode",
                                              "asymmetric" if legacy else "half_pixel")
    if attr(n, "antialias", 0) or attr(n, "axes") is not None:
        raise EdgesmithError(f"{n.op_type} {n.name}: antialias and axes are not supported "
                             "for training")
    if legacy:
        scales, sizes = operand(n, x, 1, "scales"), None
    else:
        scales, sizes = operand(n, x, 2, "scales"), (x[3] if len(x) > 3 else None)
    spatial = x[0].dim() - 2
    kwargs, factors = {}, None
    if sizes is not None and sizes.numel():
        kwargs["size"] = _ints(sizes)[2:]
        factors = [o / i for o, i in zip(kwargs["size"], x[0].shape[2:])]
    elif scales is not None:
        values = [float(v) for v in (scales.tolist() if hasattr(scales, "tolist") else scales)]
        if values[:2] != [1.0, 1.0]:
            raise EdgesmithError(f"{n.op_type} {n.name}: scaling batch or channels")
        kwargs["scale_factor"] = factors = tuple(values[2:])
    nearest = text("nearest_mode", "round_prefer_floor")
    # asymmetric nearest is torch's floor; rounding modes agree with it at an exact 2x upscale
    if mode == "nearest" and ctm == "asymmetric" and (
            nearest == "floor" or legacy or (factors and all(f == 2.0 for f in factors))):
        return e.F.interpolate(x[0], mode="nearest", **kwargs)
    if mode == "linear" and ctm in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        torch_mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[spatial]
        return e.F.interpolate(x[0], mode=torch_mode, align_corners=ctm == "align_corners",
                               **kwargs)
    raise EdgesmithError(f"{n.op_type} {n.name}: mode {mode} ({nearest}) with {ctm} "
                         "coordinates is not supported for training")


@op("GRU")
def _gru(n, x, e):
    """ONNX GRU (gates z, r, h; default activations) unrolled over the sequence."""
    torch = e.torch
    if attr(n, "activations") not in (None, [b"Sigmoid", b"Tanh"] * 2, [b"Sigmoid", b"Tanh"]) or \
            attr(n, "layout", 0) or (len(x) > 4 and x[4] is not None) or \
            attr(n, "clip") is not None:
        raise EdgesmithError(f"GRU {n.name}: custom activations, batch-first layout, clip or "
                             "sequence_lens are not supported")
    seq, w, r = x[0], x[1], x[2]
    dirs, hidden = w.shape[0], w.shape[1] // 3
    b = x[3] if len(x) > 3 and x[3] is not None else torch.zeros(dirs, 6 * hidden)
    h0 = x[5] if len(x) > 5 and x[5] is not None else torch.zeros(dirs, seq.shape[1], hidden)
    before_reset = attr(n, "linear_before_reset", 0)
    reverse = attr(n, "direction", b"forward") in (b"reverse", "reverse")
    ys, finals = [], []
    for d in range(dirs):
        h, steps, out = h0[d], range(seq.shape[0]), []
        if d == 1 or reverse:
            steps = reversed(steps)
        wb, rb = b[d, :3 * hidden], b[d, 3 * hidden:]
        for t in steps:
            gx = seq[t] @ w[d].t() + wb
            zx, rx, hx = gx.chunk(3, -1)
            zh, rh, _ = (h @ r[d].t() + rb).chunk(3, -1)
            z, rr = torch.sigmoid(zx + zh), torch.sigmoid(rx + rh)
            r_h, rb_h = r[d, 2 * hidden:], rb[2 * hidden:]
            hh = rr * (h @ r_h.t() + rb_h) if before_reset else (rr * h) @ r_h.t() + rb_h
            h = (1 - z) * torch.tanh(hx + hh) + z * h
            out.append(h)
        if d == 1 or reverse:
            out.reverse()
        ys.append(torch.stack(out))
        finals.append(h)
    return torch.stack(ys, 1), torch.stack(finals)
