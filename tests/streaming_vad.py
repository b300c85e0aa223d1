"""A streaming voice-activity model of the Silero-VAD class, and audio streams for it.

The model takes a 512-sample chunk `input` [batch, samples], its recurrent `state` [2, batch,
64] (h and c stacked: the batch sits on axis 1) and a scalar sample rate `sr` that picks a
branch of an If (16 kHz audio as it is, other rates scaled), and returns a speech probability
`output` [batch, 1] and the next state `stateN`. Inside: frame features (|x| through a MatMul),
an LSTM over the chunk's 8 frames, a sigmoid head. Weights are seeded; the head is set so that
the decision follows the frames' energy (loud chunks: speech), which a trained VAD learns.
Built with onnx.helper: no torch needed, so it runs where the `train` extra is absent.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CHUNK, FRAMES, FEATURES, HIDDEN = 512, 8, 32, 64


def build(path: Path, seed: int = 0, hidden: int = HIDDEN) -> Path:
    """The model at `path`; `hidden`: the LSTM's width (64 here, 128 in Silero-VAD)."""
    rng = np.random.default_rng(seed)
    frame = CHUNK // FRAMES
    wf = (np.abs(rng.standard_normal((frame, FEATURES))) / np.sqrt(frame)).astype(np.float32)
    w = (rng.standard_normal((1, 4 * hidden, FEATURES)) / np.sqrt(FEATURES)).astype(np.float32)
    r = (rng.standard_normal((1, 4 * hidden, hidden)) * 0.5 / np.sqrt(hidden)).astype(np.float32)
    b = np.zeros((1, 8 * hidden), np.float32)
    b[0, :hidden] = 1.0                   # input gates open: the frames reach the state
    b[0, 2 * hidden:3 * hidden] = 3.0     # forget gates mostly shut: the state spans chunks
    inits = [numpy_helper.from_array(a, n) for a, n in (
        (wf, "wf"), (w, "w"), (r, "r"), (b, "b"),
        (np.array(16000, np.int64), "sr16k"), (np.array(0.5, np.float32), "half"),
        (np.array([-1, FRAMES, frame], np.int64), "frames"),
        (np.array([0], np.int64), "zero"), (np.array([1], np.int64), "one"),
        (np.array([2], np.int64), "two"))]
    then_branch = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["audio16"])], "as_is", [],
        [helper.make_tensor_value_info("audio16", TensorProto.FLOAT, None)])
    else_branch = helper.make_graph(
        [helper.make_node("Mul", ["input", "half"], ["audio8"])], "scaled", [],
        [helper.make_tensor_value_info("audio8", TensorProto.FLOAT, None)])
    nodes = [
        helper.make_node("Equal", ["sr", "sr16k"], ["is16k"]),
        helper.make_node("If", ["is16k"], ["audio"], then_branch=then_branch,
                         else_branch=else_branch),
        helper.make_node("Reshape", ["audio", "frames"], ["framed"]),
        helper.make_node("Abs", ["framed"], ["magnitude"]),
        helper.make_node("MatMul", ["magnitude", "wf"], ["feat"]),
        helper.make_node("Transpose", ["feat"], ["seq"], perm=[1, 0, 2]),
        helper.make_node("Slice", ["state", "zero", "one"], ["h0"]),
        helper.make_node("Slice", ["state", "one", "two"], ["c0"]),
        helper.make_node("LSTM", ["seq", "w", "r", "b", "", "h0", "c0"], ["", "h", "c"],
                         hidden_size=hidden),
        helper.make_node("Concat", ["h", "c"], ["stateN"], axis=0),
        helper.make_node("Squeeze", ["h", "zero"], ["last"]),
        helper.make_node("MatMul", ["last", "wo"], ["logit"]),
        helper.make_node("Add", ["logit", "bo"], ["logit_b"]),
        helper.make_node("Sigmoid", ["logit_b"], ["output"]),
    ]
    # the head: a direction in state space that loud chunks move the state along
    inits += [numpy_helper.from_array(np.zeros((hidden, 1), np.float32), "wo"),
              numpy_helper.from_array(np.zeros((1,), np.float32), "bo")]
    graph = helper.make_graph(
        nodes, "streaming_vad",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "samples"]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", hidden]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1]),
         helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "batch", hidden])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    _fit_head(model, hidden)
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    return path


def _fit_head(model: onnx.ModelProto, hidden: int) -> None:
    """Least squares from the final h to a speech target on a seeded stream: the decision
    follows loudness as a trained VAD's would, and sits away from 0.5 (not a coin toss)."""
    audio, speech = stream(400, seed=99)
    _, hs = run(model.SerializeToString(), audio, hidden)
    h = np.concatenate([hs, np.ones((len(hs), 1), np.float32)], axis=1)
    target = np.where(speech, 4.0, -4.0)
    coef = np.linalg.lstsq(h, target, rcond=None)[0].astype(np.float32)
    inits = {t.name: t for t in model.graph.initializer}
    inits["wo"].CopyFrom(numpy_helper.from_array(coef[:-1, None], "wo"))
    inits["bo"].CopyFrom(numpy_helper.from_array(coef[-1:], "bo"))


def run(model, audio: np.ndarray, hidden: int = HIDDEN, carry: bool = True, threads: int = 0
        ) -> tuple[np.ndarray, np.ndarray]:
    """Plain onnxruntime over `audio` (`model`: a path or bytes), one call per chunk, the state
    carried (or reset every call): (speech probabilities [chunks], final h [chunks, hidden])."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts,
                                   providers=["CPUExecutionProvider"])
    state, probs, hs = np.zeros((2, 1, hidden), np.float32), [], []
    for chunk in audio:
        fresh = state if carry else np.zeros_like(state)
        prob, state = session.run(None, {"input": chunk[None], "state": fresh,
                                         "sr": np.array(16000, np.int64)})
        probs.append(prob[0, 0])
        hs.append(state[0, 0])
    return np.array(probs), np.stack(hs)


def stream(chunks: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(audio [chunks, 512] float32, speech [chunks] bool): silence (low noise) and talk spurts
    (voiced harmonics at a wandering pitch, loudness varying), a few chunks to a second each."""
    rng = np.random.default_rng(seed)
    audio = np.empty((chunks, CHUNK), np.float32)
    speech = np.zeros(chunks, bool)
    i, talking = 0, False
    t = np.arange(CHUNK) / 16000.0
    while i < chunks:
        length = int(rng.integers(4, 30))
        for j in range(i, min(chunks, i + length)):
            noise = rng.standard_normal(CHUNK) * 0.01
            if talking:
                pitch, loud = rng.uniform(90, 250), rng.uniform(0.1, 0.6)
                voiced = sum(np.sin(2 * np.pi * pitch * k * t + rng.uniform(0, 6.3)) / k
                             for k in range(1, 6))
                audio[j] = (loud * voiced + noise).astype(np.float32)
            else:
                audio[j] = noise.astype(np.float32)
            speech[j] = talking
        i += length
        talking = not talking
    return audio, speech


def save_data(path: Path, chunks: int, seed: int, sr: int = 16000) -> Path:
    """An .npz as a user gives a streaming model: the chunks in order (samples on axis 0) and
    the sample rate once, as `const:sr`; the state starts at zeros (no `const:state`)."""
    audio, _ = stream(chunks, seed)
    np.savez(path, input=audio, **{"const:sr": np.array(sr, np.int64)})
    return Path(path)
