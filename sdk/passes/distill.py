"""Knowledge distillation: a teacher ONNX model (run by onnxruntime) trains a student ONNX model.

Soft targets are the teacher's logits, computed once per config (a caller distilling several
students from one teacher passes them in `soft_targets`). The student runs
as a torch module built from its own graph (`onnx_torch`, beside this file), trains with
KL(softmax(s/T) || softmax(t/T)) * T^2 + alpha * CE(s, labels), and its weights go back into the
same graph, which is then checked against onnxruntime. Needs the `train` extra (torch).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx

from device_runtime.evaluate import EvalData

from ..errors import EdgesmithError
from . import PassReport, register


@dataclass(frozen=True, eq=False)
class DistillConfig:
    teacher: onnx.ModelProto = None   # the model whose soft targets supervise
    data: EvalData = None             # training inputs (+ optional labels)
    eval_data: EvalData | None = None   # held-out set: top-1 before/after in the report
    soft_targets: np.ndarray | None = None   # teacher logits on `data`, if computed already
    on_epoch: object = None           # callback(epoch, epochs, loss) for progress
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3                 # 3e-3 diverges on deep students without BatchNorm
    clip_grad_norm: float = 5.0
    weight_decay: float = 1e-4
    temperature: float = 4.0
    alpha: float = 0.5               # weight of cross-entropy on labels (when there are labels)
    seed: int = 0
    shift: int = 0                   # random translations of up to this many pixels (images)

    def __post_init__(self):
        if self.teacher is None or self.data is None:
            raise ValueError("DistillConfig needs a teacher model and training data")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"DistillConfig.{name} must be >= 1")
        if self.lr <= 0 or self.temperature <= 0:
            raise ValueError("DistillConfig.lr and .temperature must be > 0")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError("DistillConfig.alpha must be in [0, 1]")


def _torch():
    try:
        import torch
    except ImportError:
        raise EdgesmithError("distillation needs torch: pip install 'edgesmith[train]' "
                             "(CPU build: pip install torch==2.13.0)") from None
    return torch


def soft_targets(teacher: onnx.ModelProto, data: EvalData, batch: int = 256) -> np.ndarray:
    """Teacher logits for every sample (onnxruntime on the host, in memory)."""
    import onnxruntime as ort

    session = ort.InferenceSession(teacher.SerializeToString(), providers=["CPUExecutionProvider"])
    fixed = session.get_inputs()[0].shape[0]
    step = fixed if isinstance(fixed, int) else batch
    outs = []
    for start in range(0, data.n, step):
        feed = {k: v[start:start + step] for k, v in data.inputs.items()}
        outs.append(session.run(None, feed)[0])
    return np.concatenate(outs).astype(np.float32)


def evaluate(model: onnx.ModelProto, data: EvalData) -> float | None:
    """Top-1 of `model` on `data` with onnxruntime (None without labels)."""
    import onnxruntime as ort

    if data.labels is None:
        return None
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    preds = [session.run(None, {k: v[i:i + 256] for k, v in data.inputs.items()})[0].argmax(1)
             for i in range(0, data.n, 256)]
    return float(np.mean(np.concatenate(preds) == data.labels))


@register("distill")
def distill(student: onnx.ModelProto, cfg: DistillConfig) -> tuple[onnx.ModelProto, PassReport]:
    """Train `student` to match the config's teacher; returns the student with trained weights."""
    torch = _torch()
    from .onnx_torch import to_torch, write_back

    teacher, data, eval_data, progress = cfg.teacher, cfg.data, cfg.eval_data, cfg.on_epoch
    report = PassReport("distill")
    t0 = time.time()
    logits = cfg.soft_targets if cfg.soft_targets is not None else soft_targets(teacher, data)
    targets = torch.from_numpy(logits)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    module = to_torch(student)
    names = module.inputs
    inputs = [torch.from_numpy(np.ascontiguousarray(data.inputs[n])) for n in names]
    labels = torch.from_numpy(data.labels.astype(np.int64)) if data.labels is not None else None
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * int(np.ceil(data.n / cfg.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    T = cfg.temperature
    before = evaluate(student, eval_data) if eval_data is not None else None
    loss_value = float("nan")
    module.train()
    for epoch in range(cfg.epochs):
        order = torch.from_numpy(rng.permutation(data.n))
        for start in range(0, data.n, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            batch = [x[idx] for x in inputs]
            if cfg.shift and batch[0].dim() == 4:
                dy, dx = (int(v) for v in rng.integers(-cfg.shift, cfg.shift + 1, 2))
                batch[0] = torch.roll(batch[0], (dy, dx), (2, 3))
            logits = module(*batch)
            loss = torch.nn.functional.kl_div(
                torch.log_softmax(logits / T, 1), torch.softmax(targets[idx] / T, 1),
                reduction="batchmean") * T * T
            if labels is not None and cfg.alpha > 0:
                loss = loss + cfg.alpha * torch.nn.functional.cross_entropy(logits, labels[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.clip_grad_norm)
            opt.step()
            sched.step()
            loss_value = float(loss.detach())
        if progress:
            progress(epoch + 1, cfg.epochs, loss_value)
    module.eval()
    trained = write_back(student, module)
    _verify(trained, module, inputs, names, torch)
    after = evaluate(trained, eval_data) if eval_data is not None else None
    teacher_acc = evaluate(teacher, eval_data) if eval_data is not None else None
    report.changed = 1
    report.metrics.update(epochs=cfg.epochs, samples=data.n, final_loss=loss_value,
                          seconds=time.time() - t0, student_top1_before=before,
                          student_top1_after=after, teacher_top1=teacher_acc)
    report.details.append(f"{cfg.epochs} epoch(s) on {data.n} samples, T={T}, alpha={cfg.alpha}"
                          + (f"; top-1 {before:.4f} -> {after:.4f} (teacher {teacher_acc:.4f})"
                             if after is not None else ""))
    return trained, report


def _verify(trained: onnx.ModelProto, module, inputs, names, torch) -> None:
    """The written-back ONNX model must compute what the trained torch module computes."""
    import onnxruntime as ort

    onnx.checker.check_model(trained)
    probe = [x[:8] for x in inputs]
    with torch.no_grad():
        expected = module(*probe).numpy()
    session = ort.InferenceSession(trained.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {n: p.numpy() for n, p in zip(names, probe)})[0]
    err = float(np.max(np.abs(got - expected)))
    if err > 1e-3 * max(1.0, float(np.max(np.abs(expected)))):
        raise EdgesmithError(f"distilled model does not match its training graph (max error "
                             f"{err:.2e}); please report this with the student model")
