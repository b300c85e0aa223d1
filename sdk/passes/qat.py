"""Quantization-aware training by distillation (QAT) of an int8 QDQ model, in place.

A post-training recipe rounds each weight once, and block reconstruction moves each at most one
step. QAT lets the weights move under the rounding, across the whole model at once: the QDQ
graph runs in torch (the ONNX->torch interpreter) with fake-quantized weights (straight-through
rounding on the recipe's per-channel grid, its scales fixed) and activations (LSQ step sizes
from the calibrated ones), and learns from unlabelled inputs to give the float model's outputs
(the teacher; mean squared error of the outputs, each scaled by its own power). The latent
weights live in units of their step, so one learning rate fits every layer. The learned
integers and step sizes, and the int32 biases that follow them, are written into the very same
initializers: the QDQ graph onnxruntime fuses, and hence the speed, is unchanged. A held-out
share of the training inputs picks the best epoch; the model is kept as it was unless that
share's error drops. Anchors: NNCF's and TensorFlow Model Optimization's QAT. Needs torch.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import EdgesmithError
from ..onnx_utils import Graph, probe_session
from . import PassReport, register
from .distill import host_device
from .ranges import requantize_biases
from .reconstruct import Block, BlockModule, constants, float_twins, write_scales


@dataclass(frozen=True, eq=False)
class QatConfig:
    float_model: onnx.ModelProto = None   # the graph the QDQ model's weights round
    teacher: onnx.ModelProto = None       # the float model whose outputs are learned
    batches: list = None                  # unlabelled training feeds
    weight_range: tuple[int, int] = (-127, 127)
    epochs: int = 3
    batch_size: int = 8
    lr: float = 5e-3                      # of the latent weights, in steps of their grid
    scale_lr: float = 1e-3                # of the activations' log step sizes
    holdout: float = 0.125                # share of the inputs that picks the epoch
    #                                       (batch_size: the model's own when it is fixed)
    host_device: str = "auto"             # where torch learns: auto (CUDA when seen) | cpu | cuda
    seed: int = 0
    deadline: float = math.inf            # time.monotonic(): training stops, best epoch kept
    drop: float = 0.0                     # read by the block module: no QDrop in QAT

    def __post_init__(self):
        if self.float_model is None or self.teacher is None or not self.batches:
            raise ValueError("QatConfig needs the float model, the teacher and training feeds")
        if self.epochs < 1 or self.batch_size < 1 or not 0 < self.holdout < 1:
            raise ValueError("QatConfig.epochs and .batch_size must be >= 1, .holdout in (0, 1)")


class _QatModule(BlockModule):
    """The whole QDQ graph with latent weights under straight-through rounding."""

    def _init_rounding(self, w):
        """Latent weights at the model's own integers (a reconstruction's learned rounding
        included), with the float weight's fraction of a step kept within the rounding."""
        r = super()._init_rounding(w)
        ratio = self.tensor(w.w_float) / r["s"]
        frac = (ratio - self.torch.round(ratio)).clamp(-0.49, 0.49)
        start = self.tensor(self.graph.array(w.name).astype(np.float32)) - r["zp"]
        r["latent"] = (start + frac).detach().requires_grad_(True)
        return r

    def weight(self, r, mode: str):
        qmin, qmax = self.cfg.weight_range
        c = r["latent"] + r["zp"]
        q = c + (self.torch.round(c) - c).detach()
        return r["s"] * (self.torch.clamp(q, qmin, qmax) - r["zp"])

    def integers(self, r) -> np.ndarray:
        qmin, qmax = self.cfg.weight_range
        q = self.torch.clamp(self.torch.round(r["latent"] + r["zp"]), qmin, qmax)
        return q.detach().cpu().numpy()

    def state(self) -> list:
        return [t.detach().clone() for t in self.trained()]

    def load(self, saved: list) -> None:
        with self.torch.no_grad():
            for t, v in zip(self.trained(), saved):
                t.copy_(v)

    def trained(self) -> list:
        return [r["latent"] for r in self.rounding.values()] + list(self.log_scale.values())


def _checked(qdq: onnx.ModelProto, teacher: onnx.ModelProto, batches: list[dict]
             ) -> tuple[str, int | None]:
    """The one float input QAT feeds and the model's fixed batch (None: any); a model QAT
    cannot train is refused here, in words."""
    inputs = [i for i in qdq.graph.input if i.name not in {t.name for t in qdq.graph.initializer}]
    if len(inputs) != 1 or len(batches[0]) != 1:
        raise EdgesmithError(f"QAT takes models with one input; this one has {len(inputs)}")
    floats = (onnx.TensorProto.FLOAT,)
    wrong = [v.name for v in [*inputs, *teacher.graph.output]
             if v.type.tensor_type.elem_type not in floats]
    if wrong:
        raise EdgesmithError(f"QAT learns float inputs and outputs; {', '.join(wrong)} of this "
                             "model are not float: leave --train out for it")
    dims = inputs[0].type.tensor_type.shape.dim
    fixed = dims[0].dim_value if dims and dims[0].HasField("dim_value") else 0
    return inputs[0].name, fixed or None


def _error(module: _QatModule, xs: np.ndarray, ys: list, power: list, batch: int) -> float:
    torch = module.torch
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(xs), batch):
            outs = module(module.tensor(xs[i:i + batch]), mode="hard")
            total += sum(float(((o - module.tensor(y[i:i + batch])) ** 2).sum()) / p
                         for o, y, p in zip(outs, ys, power))
    return total / max(len(xs), 1)


@register("qat")
def qat(qdq: onnx.ModelProto, cfg: QatConfig) -> tuple[onnx.ModelProto, PassReport]:
    """Fine-tune every int8 weight and activation step size of `qdq` to match `cfg.teacher`'s
    outputs on `cfg.batches` (no labels), in place of the QDQ graph's initializers."""
    try:
        import torch
    except ImportError:
        raise EdgesmithError("quantization-aware training needs torch: pip install "
                             "'edgesmith[train]' (CPU build: pip install torch==2.13.0)") from None
    name, fixed = _checked(qdq, cfg.teacher, cfg.batches)
    try:
        return _train(qdq, cfg, name, fixed or cfg.batch_size, torch)
    except EdgesmithError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch's and onnxruntime's errors, in one line
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise EdgesmithError(f"QAT failed: {type(exc).__name__}: {text}") from None


def _train(qdq: onnx.ModelProto, cfg: QatConfig, name: str, batch: int, torch
           ) -> tuple[onnx.ModelProto, PassReport]:
    t0 = time.time()
    out = onnx.ModelProto()
    out.CopyFrom(qdq)
    report = PassReport("qat")
    weights, skipped = float_twins(out, cfg.float_model)
    const = constants(out.graph)
    flow = [n for n in out.graph.node if not all(not i or i in const for i in n.input)]
    block = Block(nodes=flow, input=name, outputs=[o.name for o in out.graph.output],
                  layers=sum(n.input[1] in weights for n in flow if len(n.input) > 1))
    if not block.layers:
        raise EdgesmithError("QAT: the model has no int8 weights with a float twin to train")
    xs = np.concatenate([b[name] for b in cfg.batches])
    n_val = batch * max(1, int(round(len(xs) * cfg.holdout / batch)))
    if len(xs) - n_val < batch:
        raise EdgesmithError(f"QAT needs at least {batch + n_val} training samples; "
                             f"got {len(xs)}")
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(xs))
    val, train = np.sort(order[:n_val]), order[n_val:]
    outputs = [o.name for o in cfg.teacher.graph.output]
    teacher = probe_session(cfg.teacher, outputs)
    targets = lambda idx: teacher.run(outputs, {name: xs[idx]})  # noqa: E731 - per batch
    yval = [np.concatenate(v) for v in zip(*(targets(val[i:i + batch])
                                             for i in range(0, n_val, batch)))]
    power = [max(float(np.mean(y.astype(np.float64) ** 2)) * y[0].size, 1e-12) for y in yval]
    torch.manual_seed(cfg.seed)
    device = host_device(cfg.host_device, torch)
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 13)
    module = _QatModule(Graph(out.graph), block, weights, cfg, opset, torch, device)
    before = _error(module, xs[val], yval, power, batch)   # as it came
    best, best_state, best_epoch = before, None, 0
    opt = torch.optim.Adam([{"params": [r["latent"] for r in module.rounding.values()],
                             "lr": cfg.lr},
                            {"params": list(module.log_scale.values()), "lr": cfg.scale_lr}])
    steps, stopped = 0, False
    for epoch in range(1, cfg.epochs + 1):
        rng.shuffle(train)
        for i in range(0, len(train) - batch + 1, batch):
            if time.monotonic() > cfg.deadline:
                stopped = True
                break
            idx = np.sort(train[i:i + batch])
            outs = module(module.tensor(xs[idx]), mode="hard")
            loss = sum(((o - module.tensor(y)) ** 2).mean() * y[0].size / p
                       for o, y, p in zip(outs, targets(idx), power))
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
        err = _error(module, xs[val], yval, power, batch)
        report.details.append(f"epoch {epoch}: held-out output error {_db(before, err):+.2f} dB "
                              "against the calibrated model")
        if err < best:
            best, best_state, best_epoch = err, module.state(), epoch
        if stopped:
            report.details.append(f"stopped at the time limit after {steps} steps")
            break
    if best_state is not None:
        module.load(best_state)
        graph = Graph(out.graph)
        for r in module.rounding.values():
            graph.set_array(r["weight"].name,
                            module.integers(r).astype(graph.array(r["weight"].name).dtype))
        requantize_biases(Graph(out.graph), write_scales(graph, module))
        report.changed = 1
    gain = _db(before, best)
    report.metrics.update(epochs=cfg.epochs, best_epoch=best_epoch, steps=steps,
                          train_samples=len(train), held_out_samples=n_val, gain_db=gain,
                          skipped=len(skipped), seconds=time.time() - t0)
    report.details.extend(f"{layer}: not trained ({why})" for layer, why in skipped)
    report.details.append(
        f"QAT on {len(train)} samples, {steps} steps: output error on {n_val} held-out samples "
        f"{gain:.1f} dB lower than as calibrated" if best_state is not None else
        f"QAT on {len(train)} samples did not lower the output error on {n_val} held-out "
        "samples: kept as calibrated")
    return out, report


def _db(before: float, after: float) -> float:
    return float(10 * np.log10(max(before, 1e-30) / max(after, 1e-30)))

