"""Scale / zero-point arithmetic shared by every algorithm.

Weights are symmetric with a narrow code range [-(2^(b-1)-1), 2^(b-1)-1] so that zero is exact
and the range is the same on both sides. Activations are affine (asymmetric) uint or symmetric
int; either way the float zero maps exactly onto an integer code.
"""

from __future__ import annotations

import numpy as np


def weight_qmax(bits: int) -> int:
    """Largest code magnitude of a symmetric `bits`-bit weight code."""
    if bits < 2 or bits > 16:
        raise ValueError(f"weight bits must be 2..16, got {bits}")
    return 2 ** (bits - 1) - 1


def affine_params(lo: np.ndarray, hi: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Scales and zero points of an unsigned `bits`-bit weight grid over [lo, hi] (widened to
    contain 0). A weight's code relative to its zero point, c = clip(rint(w / s), -z, 2^b - 1 - z),
    dequantizes as c * s, as a symmetric code does. -> (scales float64, zero points float64)."""
    top = 2**bits - 1
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    s = (hi - lo) / top
    s = np.where(s > 0, s, 1.0).astype(np.float64)
    return s, np.clip(np.rint(-lo / s), 0, top)


def container_bits(bits: int) -> int:
    """Bits a weight of `bits` bits occupies in the file: 2- to 4-bit codes are stored in INT4
    containers, wider ones in INT8."""
    return 4 if bits <= 4 else 8


def stored_bits(params: int, bits: int, n_scales: int, scale_bits: int = 32, zero_points: bool = False) -> int:
    """Bits a quantized weight takes in the file: codes in their containers plus the scales (and
    one zero point in the codes' container per scale, when the grid is affine)."""
    return params * container_bits(bits) + n_scales * (scale_bits + (container_bits(bits) if zero_points else 0))


def act_qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Code range of an activation of `bits` bits (uint when unsigned)."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def quantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | int,
             qmin: int, qmax: int) -> np.ndarray:
    """Codes of x: clip(round(x / scale) + zp, qmin, qmax), as int32. Rounds half to even.
    One temporary, rounded and clipped in place (a 4096 x 4096 weight: 0.5 -> 0.1 s)."""
    q = x / scale
    np.rint(q, out=q)
    if not (np.isscalar(zero_point) and zero_point == 0):
        q = q + zero_point
    np.clip(q, qmin, qmax, out=q)
    return q.astype(np.int32)


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | int = 0) -> np.ndarray:
    return ((q.astype(np.float64) - zero_point) * scale).astype(np.float64)


def fake_quant(x: np.ndarray, scale, zero_point, qmin: int, qmax: int) -> np.ndarray:
    """dequantize(quantize(x)) computed in float32 for activations."""
    q = np.clip(np.rint(x / np.float32(scale)) + zero_point, qmin, qmax)
    return ((q - zero_point) * np.float32(scale)).astype(np.float32)


def channel_scales(w: np.ndarray, bits: int, ratio: np.ndarray | float = 1.0) -> np.ndarray:
    """Per-row symmetric scales of w [O, K] with clipping value ratio * max|w_o|. -> [O]."""
    return scales_of_amax(np.abs(w).max(axis=1), bits, ratio)


def scales_of_amax(amax: np.ndarray, bits: int, ratio: np.ndarray | float = 1.0) -> np.ndarray:
    """channel_scales from the rows' max|w| already known."""
    scale = amax * ratio / weight_qmax(bits)
    return np.where(scale > 0, scale, 1.0).astype(np.float64)


BIAS_LIMIT = 2**30   # largest |int32 bias code|: leaves the accumulator room for the products


def bias_safe_scales(scales: np.ndarray, bias: np.ndarray, x_scale: float) -> np.ndarray:
    """Per-channel weight scales raised where needed so the int32 bias code round(b / (s_x s_w))
    stays within BIAS_LIMIT. Channels with near-zero weights and a real bias (common after
    pruning or in layers whose channels died in training) would otherwise saturate and lose their
    bias; a coarser grid costs nothing on weights that small."""
    need = np.abs(bias.astype(np.float64)) / (float(x_scale) * BIAS_LIMIT)
    floor = np.finfo(np.float32).tiny / max(float(x_scale), 1e-30)     # s_x s_w stays a normal float32
    return np.maximum(scales.astype(np.float64), np.maximum(need, floor))


def act_params(lo: float, hi: float, bits: int, signed: bool) -> tuple[float, int]:
    """(scale, zero_point) covering [lo, hi] (widened to contain 0) with `bits` codes.

    signed=True gives a symmetric int code (zero point 0); otherwise affine uint.
    """
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qmin, qmax = act_qrange(bits, signed)
    if signed:
        amax = max(-lo, hi)
        scale = amax / qmax if amax > 0 else 1.0
        return float(scale), 0
    if hi - lo <= 0:
        return 1.0, 0
    scale = (hi - lo) / (qmax - qmin)
    zp = int(np.clip(np.rint(qmin - lo / scale), qmin, qmax))
    return float(scale), zp
