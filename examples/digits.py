"""scikit-learn's digits as model-ready arrays, with numpy only (no torch needed).

The 8x8 images are upsampled bilinearly so that the MobileNetV2/ResNet-style examples run at a
size where speed work means something. The split is fixed, so every script sees the same test set.
"""
from __future__ import annotations

import numpy as np

SEED = 0
TEST_FRACTION = 0.2


def _interp_matrix(src: int, dst: int) -> np.ndarray:
    """Bilinear interpolation weights (align_corners=False), shape [dst, src]."""
    pos = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0, src - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, src - 1)
    frac = pos - lo
    m = np.zeros((dst, src))
    m[np.arange(dst), lo] += 1 - frac
    m[np.arange(dst), hi] += frac
    return m


def load(size: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test); x is float32 N×1×size×size in [0, 1], 8-bit levels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.images.astype(np.float64) / 16.0
    y = digits.target.astype(np.int64)
    if size != 8:
        m = _interp_matrix(8, size)
        x = m @ x @ m.T
    x = (np.round(x * 255) / 255).astype(np.float32)[:, None]
    order = np.random.default_rng(SEED).permutation(len(y))
    n_test = int(len(y) * TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def save_eval(path: str, input_name: str, x: np.ndarray, y: np.ndarray) -> None:
    """The eval-set format edgesmith reads: arrays named after the model inputs, plus labels."""
    np.savez_compressed(path, **{input_name: x, "labels": y})
