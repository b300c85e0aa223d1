"""Knowledge distillation: a teacher ONNX model (run by onnxruntime) trains a student ONNX model.

Soft targets are the teacher's outputs, computed once per config (a caller distilling several
students from one teacher passes them in `soft_targets`). The student runs as a torch module
built from its own graph (`edgesmith.torch_interp`) and trains on every output: a
classifier's logits with KL(softmax(s/T) || softmax(t/T)) * T^2 + alpha * CE(s, labels), other
outputs (detector heads, OCR sequences, maps) with MSE relative to the teacher's energy. Its
weights go back into the same graph, which is then checked against onnxruntime. Exports with a
fixed batch train by gradient accumulation. Needs the `train` extra (torch).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import onnx

from device_runtime.evaluate import SQNR_CAP_DB, EvalData

from ..errors import EdgesmithError
from ..host_runs import host_session
from . import PassReport, register


@dataclass(frozen=True, eq=False)
class DistillConfig:
    teacher: onnx.ModelProto = None   # the model whose soft targets supervise
    data: EvalData = None             # training inputs (+ optional labels)
    eval_data: EvalData | None = None   # held-out set: top-1 before/after in the report
    soft_targets: object = None       # TeacherOutputs on `data`, if computed already
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
    host_device: str = "auto"        # where torch trains: auto (CUDA when torch sees it) | cpu
    #                                  | cuda[:N]
    deadline: float = math.inf       # time.monotonic(): no epoch starts after it

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
        if self.host_device not in ("auto", "cpu") and not self.host_device.startswith("cuda"):
            raise ValueError(f"DistillConfig.host_device must be auto, cpu or cuda[:N], got "
                             f"{self.host_device!r}")


def host_device(name: str, torch) -> str:
    """The torch device training runs on: users with real models optimise on a workstation's
    GPU; a GPU asked for and not seen is an error, not a silent CPU run."""
    has_cuda = torch.cuda.is_available()
    if name == "auto":
        return "cuda" if has_cuda else "cpu"
    if name.startswith("cuda") and not has_cuda:
        raise EdgesmithError(f"--host-device {name}: torch {torch.__version__} sees no CUDA GPU "
                             "here; use --host-device cpu, or install a CUDA build of torch")
    return name


def require_torch():
    try:
        import torch
    except ImportError:
        raise EdgesmithError("distillation needs torch: pip install 'edgesmith[train]' "
                             "(CPU build: pip install torch==2.13.0)") from None
    return torch


@dataclass
class TeacherOutputs:
    """The teacher's outputs on the training set, batch axis first, so a student of any output
    layout (a classifier's [N, C], a CRNN's [T, N, C], a detector's [N, 84, A]) trains on them."""
    outputs: list[np.ndarray]
    batch_axes: list[int]     # where the batch is in each model output
    fixed_batch: int | None   # the model's batch size when the export fixed it


def _session(model: onnx.ModelProto):
    return host_session(model.SerializeToString())


def _run(session, data: EvalData, start: int, stop: int) -> list[np.ndarray]:
    return session.run(None, {k: v[start:stop] for k, v in data.inputs.items()})


def _fixed_batch(session) -> int | None:
    fixed = session.get_inputs()[0].shape[0]
    return fixed if isinstance(fixed, int) and fixed > 0 else None


def _whole_batches(data: EvalData, fixed: int | None) -> EvalData:
    """The judging set cut to whole batches of a fixed-batch export (its last samples unused)."""
    if not fixed or data.n % fixed == 0:
        return data
    n = data.n - data.n % fixed
    return EvalData({k: v[:n] for k, v in data.inputs.items()},
                    None if data.labels is None else data.labels[:n], {}, n)


def soft_targets(teacher: onnx.ModelProto, data: EvalData, batch: int = 64) -> TeacherOutputs:
    """Teacher outputs for every sample (onnxruntime on the host, in memory)."""
    session = _session(teacher)
    fixed = _fixed_batch(session)
    if fixed is not None and fixed > 1 and data.n % fixed:
        raise EdgesmithError(f"the model's batch is fixed at {fixed}, and {data.n} training "
                             f"samples do not divide into it; give a multiple of {fixed}")
    if fixed is None and data.n > 1:    # the batch axis is the one that grows with the batch
        one, two = _run(session, data, 0, 1), _run(session, data, 0, 2)
        axes = [next((i for i, (a, b) in enumerate(zip(o.shape, t.shape)) if a != b), 0)
                for o, t in zip(one, two)]
    else:
        axes = [next((i for i, d in enumerate(o.shape) if d == (fixed or 1)), NO_BATCH_AXIS)
                for o in _run(session, data, 0, fixed or 1)]
    step = fixed or batch
    chunks = [_run(session, data, i, i + step) for i in range(0, data.n, step)]
    outputs = [np.concatenate([batch_first(c[k], axes[k], np) for c in chunks]
                              ).astype(np.float32) for k in range(len(axes))]
    return TeacherOutputs(outputs, axes, fixed)


NO_BATCH_AXIS = -1    # an output a batch-1 export squeezed: one sample per run, no batch axis


def batch_first(value, axis: int, lib):
    """`value` with its batch axis first (numpy or torch: `lib` is the module)."""
    if axis == NO_BATCH_AXIS:
        return value[None]
    return lib.moveaxis(value, axis, 0) if lib is np else lib.movedim(value, axis, 0)


def _is_logits(t: np.ndarray) -> bool:
    return t.ndim == 2 and t.shape[1] > 1


def evaluate(model: onnx.ModelProto, data: EvalData) -> float | None:
    """Top-1 of a classifier `model` on `data` with onnxruntime (None without labels, or when
    the first output is not [N, classes])."""
    if data.labels is None:
        return None
    session = _session(model)
    fixed = _fixed_batch(session)
    if fixed and data.n % fixed:
        return None
    step = fixed or 256
    outs = [_run(session, data, i, i + step)[0] for i in range(0, data.n, step)]
    if not _is_logits(outs[0]):
        return None
    return float(np.mean(np.concatenate(outs).argmax(1) == data.labels))


def _loss(student_outs, teacher: TeacherOutputs, idx, labels, cfg: DistillConfig, torch):
    """KL on temperature-softened logits (+ CE on labels) for a classifier's [N, C] output;
    elsewhere (boxes, maps, sequences) mean squared error relative to the teacher's energy."""
    F = torch.nn.functional
    total = 0.0
    for k, (s, axis) in enumerate(zip(student_outs, teacher.batch_axes)):
        s = batch_first(s, axis, torch)
        t = torch.from_numpy(teacher.outputs[k][idx.numpy()]).to(s.device)   # keeps the batch axis
        if _is_logits(teacher.outputs[k]):
            T = cfg.temperature
            total = total + F.kl_div(torch.log_softmax(s / T, 1), torch.softmax(t / T, 1),
                                     reduction="batchmean") * T * T
            if k == 0 and labels is not None and cfg.alpha > 0:
                total = total + cfg.alpha * F.cross_entropy(s, labels[idx])
        else:
            total = total + ((s - t) ** 2).mean() / (t ** 2).mean().clamp_min(1e-12)
    return total


@dataclass
class _Trainer:
    """One student's training state: the module, its data as tensors, and the step sizes."""
    module: object
    inputs: list
    labels: object
    teacher: TeacherOutputs
    batch: int
    micro: int      # a fixed-batch export trains by accumulating micro-batches


def _epoch(t: _Trainer, opt, sched, rng, cfg: DistillConfig, torch) -> float:
    order = torch.from_numpy(rng.permutation(len(t.inputs[0])))
    loss_sum, steps = 0.0, 0
    for start in range(0, len(order), t.batch):
        opt.zero_grad()
        chunk = order[start:start + t.batch]
        steps += 1
        for m in range(0, len(chunk), t.micro):
            idx = chunk[m:m + t.micro]
            xs = [x[idx] for x in t.inputs]
            if cfg.shift and xs[0].dim() == 4:
                dy, dx = (int(v) for v in rng.integers(-cfg.shift, cfg.shift + 1, 2))
                xs[0] = torch.roll(xs[0], (dy, dx), (2, 3))
            outs = t.module(*xs)
            loss = _loss(outs, t.teacher, idx, t.labels, cfg, torch) * len(idx) / len(chunk)
            loss.backward()
            loss_sum += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(t.module.parameters(), cfg.clip_grad_norm)
        opt.step()
        sched.step()
    return loss_sum / max(1, steps)     # the epoch's mean loss


def _score(module, data: EvalData, targets: TeacherOutputs, micro: int, torch) -> tuple:
    """(top-1, output SQNR dB vs the teacher) of the torch module on `data`: higher is better,
    compared after every epoch so the best epoch is kept, not merely the last."""
    device = next(module.parameters()).device
    xs = [torch.from_numpy(np.ascontiguousarray(data.inputs[n])) for n in module.inputs]
    step = micro if targets.fixed_batch else 256
    chunks = []
    with torch.no_grad():
        for i in range(0, data.n, step):
            outs = module(*[x[i:i + step].to(device) for x in xs])
            chunks.append([batch_first(o, a, torch).cpu().numpy()
                           for o, a in zip(outs, targets.batch_axes)])
    got = [np.concatenate([c[k] for c in chunks]) for k in range(len(targets.outputs))]
    top1 = float(np.mean(got[0].argmax(1) == data.labels)) \
        if data.labels is not None and _is_logits(got[0]) else 0.0
    signal = sum(float(np.sum(t.astype(np.float64) ** 2)) for t in targets.outputs)
    noise = sum(float(np.sum((t.astype(np.float64) - g) ** 2))
                for t, g in zip(targets.outputs, got))
    return top1, (SQNR_CAP_DB if noise == 0 else
                  min(SQNR_CAP_DB, 10 * float(np.log10(max(signal, 1e-30) / noise))))


@register("distill")
def distill(student: onnx.ModelProto, cfg: DistillConfig) -> tuple[onnx.ModelProto, PassReport]:
    """Train `student` to match the config's teacher; returns the student with the weights of
    its best epoch on the judging samples (held-out when `eval_data` is given), which may be
    its own weights when training made it no better."""
    torch = require_torch()
    from ..torch_interp.interpreter import to_torch, write_back

    data, eval_data = cfg.data, cfg.eval_data
    report, t0 = PassReport("distill"), time.time()
    teacher = cfg.soft_targets if cfg.soft_targets is not None else \
        soft_targets(cfg.teacher, data)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = host_device(cfg.host_device, torch)
    module = to_torch(student).to(device)
    batch = min(cfg.batch_size, data.n)
    micro = teacher.fixed_batch or batch
    t = _Trainer(module, [torch.from_numpy(np.ascontiguousarray(data.inputs[n])).to(device)
                          for n in module.inputs],
                 torch.from_numpy(data.labels.astype(np.int64)).to(device)
                 if data.labels is not None else None, teacher,
                 max(micro, batch // micro * micro), micro)
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * int(np.ceil(data.n / t.batch)))
    judge = data if eval_data is None else _whole_batches(eval_data, teacher.fixed_batch)
    if judge.n == 0:
        judge = data
    judge_targets = teacher if judge is data else soft_targets(cfg.teacher, judge)
    best_score = first = _score(module, judge, judge_targets, micro, torch)
    best_epoch, best_state = 0, {k: v.detach().clone() for k, v in module.state_dict().items()}
    loss_value = float("nan")
    for epoch in range(1, cfg.epochs + 1):
        if time.monotonic() > cfg.deadline:
            report.details.append(f"stopped at the time limit after {epoch - 1} of "
                                  f"{cfg.epochs} epoch(s)")
            break
        loss_value = _epoch(t, opt, sched, rng, cfg, torch)
        score = _score(module, judge, judge_targets, micro, torch)
        if score > best_score:
            best_score, best_epoch = score, epoch
            best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        if cfg.on_epoch:
            cfg.on_epoch(epoch, cfg.epochs, loss_value)
    module.load_state_dict(best_state)
    module.cpu()
    trained = write_back(student, module)
    _verify(trained, module, t.inputs, module.inputs, teacher.fixed_batch or 8, torch)
    _describe(report, cfg, judge, first, best_score, best_epoch)
    report.changed = int(best_epoch > 0)
    report.metrics.update(final_loss=loss_value, seconds=time.time() - t0, host_device=device)
    return trained, report


def _describe(report: PassReport, cfg: DistillConfig, judge: EvalData, first: tuple,
              best: tuple, best_epoch: int) -> None:
    where = "training" if judge is cfg.data else "held-out"
    top1 = judge.labels is not None and cfg.teacher is not None and first[0] + best[0] > 0
    teacher_acc = evaluate(cfg.teacher, judge) if top1 else None
    report.metrics.update(epochs=cfg.epochs, samples=cfg.data.n, best_epoch=best_epoch,
                          sqnr_db_before=first[1], sqnr_db_after=best[1],
                          student_top1_before=first[0] if top1 else None,
                          student_top1_after=best[0] if top1 else None, teacher_top1=teacher_acc)
    kept = (f"kept epoch {best_epoch}" if best_epoch else
            "training did not improve the student, kept its own weights")
    report.details.append(
        f"{cfg.epochs} epoch(s) on {cfg.data.n} samples, T={cfg.temperature}, alpha={cfg.alpha}; "
        f"{kept} (best on the {judge.n} {where} samples): output SQNR vs the teacher "
        f"{first[1]:.1f} -> {best[1]:.1f} dB"
        + (f"; top-1 {first[0]:.4f} -> {best[0]:.4f} (teacher {teacher_acc:.4f})"
           if teacher_acc is not None else ""))


def _verify(trained: onnx.ModelProto, module, inputs, names, probe_n: int, torch) -> None:
    """The written-back ONNX model must compute what the trained torch module computes."""
    onnx.checker.check_model(trained)
    probe = [x[:probe_n].cpu() for x in inputs]
    with torch.no_grad():
        expected = [t.numpy() for t in module(*probe)]
    got = _session(trained).run(None, {n: p.numpy() for n, p in zip(names, probe)})
    for e, g in zip(expected, got):
        err = float(np.max(np.abs(g - e)))
        if err > 1e-3 * max(1.0, float(np.max(np.abs(e)))):
            raise EdgesmithError(f"distilled model does not match its training graph (max "
                                 f"error {err:.2e}); please report this with the student model")
