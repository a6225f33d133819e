"""Weight layouts: every target's weight is viewed as a matrix W [O, K] (one row per output
channel, K = what one output reads); `axis` is the output-channel axis of the stored tensor.

conv     W [O, C/g, *k]      -> [O, C/g*prod(k)]        axis 0
convT    W [C, O/g, *k]      -> [O/g, C*prod(k)]        axis 1
rows     W [O, K] (Gemm transB=1, MatMul weight on the left)   axis 0
cols     W [K, O] (Gemm transB=0, MatMul weight on the right)  axis 1
"""

from __future__ import annotations

import numpy as np

AXIS = {"conv": 0, "convT": 1, "rows": 0, "cols": 1}


def to_matrix(w: np.ndarray, layout: str) -> np.ndarray:
    if layout == "conv":
        return w.reshape(w.shape[0], -1)
    if layout == "convT":
        return np.moveaxis(w, 1, 0).reshape(w.shape[1], -1)
    if layout == "rows":
        return w
    if layout == "cols":
        return w.T
    raise ValueError(layout)


def dequantize_rows(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """codes [O, K] times per-row scales [O], per-block scales [O, K / block] (each scale
    covering a run of consecutive columns), or a conv's [O, C / block, *kernel] (one scale per
    run of input channels at each kernel tap; K = C * taps, channel-major)."""
    if scales.ndim == 1:
        return codes * scales[:, None]
    if scales.ndim == 2:
        return codes * np.repeat(scales, codes.shape[1] // scales.shape[1], axis=1)
    o, nb = scales.shape[:2]
    taps = scales[0, 0].size
    per_tap = np.repeat(scales.reshape(o, nb, 1, taps), codes.shape[1] // (nb * taps), axis=2)
    return codes * per_tap.reshape(o, -1)


def from_matrix(m: np.ndarray, layout: str, shape: tuple[int, ...]) -> np.ndarray:
    if layout == "conv":
        return m.reshape(shape)
    if layout == "convT":
        moved = (shape[1], shape[0]) + tuple(shape[2:])
        return np.moveaxis(m.reshape(moved), 0, 1)
    if layout == "rows":
        return m.reshape(shape)
    if layout == "cols":
        return m.T.reshape(shape)
    raise ValueError(layout)
