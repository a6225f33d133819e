"""Biases of quantized layers: the mean-shift correction, and int32 coding in units of
s_x * s_w (which raises the scales of channels whose code would saturate). Pure numpy."""

from __future__ import annotations

import numpy as np

from .qmath import bias_safe_scales, weight_qmax

INT32_MIN, INT32_MAX = -2**31, 2**31 - 1


def mean_shift_bias(bias: np.ndarray | None, w_eff: np.ndarray, mean_eff: np.ndarray,
                    w_ref: np.ndarray, mean_ref: np.ndarray) -> np.ndarray:
    """The bias that cancels the mean output shift E[w_eff x~] - E[w_ref x] per output channel.
    w_eff, w_ref [O, K]; mean_eff, mean_ref [G, K] are the means of the input each weight reads
    (the same in one-pass mode), one row per group of O / G output channels. -> float32 [O]."""
    rows = w_eff.shape[0] // mean_eff.shape[0]
    m_eff = np.repeat(mean_eff, rows, axis=0)                # [O, K]: the mean of each row's group
    m_ref = np.repeat(mean_ref, rows, axis=0)
    shift = np.einsum("ok,ok->o", w_eff, m_eff) - np.einsum("ok,ok->o", w_ref, m_ref)
    b = bias.astype(np.float64) if bias is not None else np.zeros(w_eff.shape[0])
    return (b - shift).astype(np.float32)


def int32_codes(bias: np.ndarray, bscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int32 codes, float32 scales) of a bias coded in units of `bscale` (s_x * s_w)."""
    bscale = bscale.astype(np.float32)
    return np.clip(np.rint(bias.astype(np.float64) / bscale), INT32_MIN, INT32_MAX).astype(np.int32), bscale


def bias_safe(codes: np.ndarray, scales: np.ndarray, bits: int, bias: np.ndarray,
              x_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """A layer's weight codes and per-channel scales (output-channel axis 0 of `codes`) with the
    scales of channels whose int32 bias would saturate raised (bias_safe_scales), and those
    channels' weights re-rounded onto the coarser grid."""
    safe = bias_safe_scales(scales, bias, x_scale)
    if np.array_equal(safe, scales):
        return codes, scales
    ratio = (scales / safe).reshape((-1,) + (1,) * (codes.ndim - 1))
    qmax = weight_qmax(bits)
    return np.clip(np.rint(codes * ratio), -qmax, qmax).astype(codes.dtype), safe
