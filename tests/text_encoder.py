"""A MiniLM-class sentence encoder, as a user exports one from torch: int64 `input_ids`,
`attention_mask` and `token_type_ids` with dynamic batch and sequence length, the attention
mask's padding filled with float32's lowest value (as Hugging Face writes it), mean pooling
over the mask into one embedding. Seeded random weights: fidelity is judged against its own
fp32 outputs. `python tests/text_encoder.py OUT [--width 384 --layers 6 --seq 128]` writes the
model, a calibration set and a held-out set of token ids."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
VOCAB = 1000


def tokens(n: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    """n padded sentences of 4..seq tokens: ids, the mask, one segment."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, seq + 1, n)
    mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int64)
    return {"input_ids": rng.integers(1, VOCAB, (n, seq)).astype(np.int64) * mask,
            "attention_mask": mask, "token_type_ids": np.zeros((n, seq), np.int64)}


def export(path: Path, width: int = 128, heads: int = 4, layers: int = 2, seq: int = 16) -> None:
    import torch
    from torch import nn

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
            self.n1, self.n2 = nn.LayerNorm(width), nn.LayerNorm(width)
            self.f1, self.f2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

        def forward(self, x, bias):
            n, t, d = x.shape
            q, k, v = (m(x).view(n, t, heads, d // heads).transpose(1, 2)
                       for m in (self.q, self.k, self.v))
            att = (q @ k.transpose(-1, -2) / (d // heads) ** 0.5 + bias).softmax(-1)
            x = self.n1(x + self.o((att @ v).transpose(1, 2).reshape(n, t, d)))
            return self.n2(x + self.f2(nn.functional.gelu(self.f1(x))))

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.word, self.pos = nn.Embedding(VOCAB, width), nn.Embedding(512, width)
            self.segment, self.norm = nn.Embedding(2, width), nn.LayerNorm(width)
            self.layers = nn.ModuleList(Layer() for _ in range(layers))

        def forward(self, input_ids, attention_mask, token_type_ids):
            pos = torch.arange(input_ids.shape[1]).unsqueeze(0)
            x = self.norm(self.word(input_ids) + self.pos(pos) + self.segment(token_type_ids))
            m = attention_mask.to(torch.float32)
            bias = (1.0 - m[:, None, None, :]) * torch.finfo(torch.float32).min
            for layer in self.layers:
                x = layer(x, bias)
            return (x * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1e-9)

    torch.manual_seed(0)
    example = tuple(torch.from_numpy(v) for v in tokens(2, seq, 0).values())
    dynamic = {0: "batch", 1: "sequence"}
    torch.onnx.export(Encoder().eval(), example, str(path), dynamo=False, opset_version=17,
                      input_names=list(INPUTS), output_names=["embedding"],
                      dynamic_axes={**{name: dynamic for name in INPUTS},
                                    "embedding": {0: "batch"}})


def linear_macs(width: int, layers: int, seq: int) -> int:
    """The Linear layers' multiply-accumulates for one sentence (q, k, v, o and the 4x MLP)."""
    return layers * seq * (4 * width * width + 8 * width * width)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--seq", type=int, default=128)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    export(a.out / "encoder.onnx", a.width, a.heads, a.layers, a.seq)
    np.savez(a.out / "calib.npz", **tokens(64, a.seq, 1))
    np.savez(a.out / "heldout.npz", **tokens(64, a.seq, 2))
