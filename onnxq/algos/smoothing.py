"""Per-channel smoothing of a quantized Gemm/MatMul input: X W^T = (X / s) (W s)^T exactly, so a
channel whose activations are far larger than the rest (transformers keep a few such channels)
can hand part of its range to the weight columns it multiplies, where per-channel weight scales
absorb it. A pointwise (1x1) conv's input likewise (a Gemm over each pixel's channels), and a
depthwise conv's (filter c times s_c), where the filter's own scale absorbs all of it.

    s_j = a_j^alpha / w_j^(1 - alpha)

a_j: max |x_j| over calibration rows; w_j: max |W[:, j]| over every layer reading x. alpha is
chosen per input tensor from ALPHAS, or no smoothing at all, by the error of the readers'
outputs with both sides quantized (round-to-nearest weights at the layer's bits, a per-tensor
activation grid) on rows that the channel maxima were not taken from. The grid is fitted on those
rows themselves: it stands for the calibrated range, which sees every calibration sample (fitted
on the maxima's few samples instead, it clipped the rarer large values of GELU outputs and turned
MiniLM's W8A8 gain of 4 dB into 0.2 dB). Too few rows to know a channel's maximum: no smoothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .qmath import act_params, act_qrange, channel_scales, fake_quant, weight_qmax

ALPHAS = (0.25, 0.5, 0.75)
CLIPS = np.linspace(0.5, 1.0, 11)   # activation clipping ratios the proxy grid is fitted over
# smoothing is kept only where it halves the proxy's output error: the proxy (round-to-nearest
# weights, a least-squares grid) is rough, and smaller gains were noise end to end (at 0.9, PP-OCR
# rec's second data set lost 0.900 -> 0.842 of its strings while MiniLM gained; at 0.5 rec reads as
# without smoothing and MiniLM keeps its gain: docs/results.md, round 7)
GAIN = 0.5
# a pointwise conv's input must have its readers' proxy error cut 5 times: at 2-4 times (YOLOv8n,
# PP-OCR cls, PP-OCR det) it lost up to 5.6 dB held out at W8A8, while the inputs that gained (PP-OCR
# rec's squeeze-excited 480-channel tensor, 10x) clear 5 easily (docs/results.md, round 24)
POINTWISE_GAIN = 0.2
MIN_ROWS = 128                      # rows both to fit and to judge on, at least
# a depthwise conv's per-channel weight scales absorb any s exactly, so its input may be
# equalised fully; its readers stand in the proxy as diag(|w_c|) (exact on the grid: only the
# input's rounding counts, weighted by the filter it meets)
DEPTHWISE_ALPHAS = ALPHAS + (1.0,)


@dataclass
class Smoothing:
    """The choice for one input tensor: alpha (None: left as it is), the scales s [K] (divide
    the input, multiply the weights' columns), and the relative output error before and after."""

    alpha: float | None
    scales: np.ndarray | None
    error_before: float
    error_after: float


def depthwise_proxy(w: np.ndarray, channels: int) -> np.ndarray:
    """The proxy weight [C, C] of a depthwise conv's filters w [C*m, 1, k...] over C input
    channels: diag of the norm of each input channel's m filters."""
    per = np.sqrt(np.sum(w.reshape(channels, -1).astype(np.float64) ** 2, axis=1))
    return np.diag(per)


def _fake_weight(w: np.ndarray, bits: int) -> np.ndarray:
    """Round-to-nearest with per-row symmetric scales: w [O, K]."""
    s = channel_scales(w, bits)[:, None]
    q = weight_qmax(bits)
    return np.clip(np.rint(w / s), -q, q) * s


def _act_grid(fit: np.ndarray, bits: int, signed: bool) -> tuple[float, int]:
    """The per-tensor grid (scale, zero point) of rows `fit`: clipped min-max, the clipping
    ratio by least squares."""
    lo, hi = float(fit.min()), float(fit.max())
    qmin, qmax = act_qrange(bits, signed)
    best, best_err = act_params(lo, hi, bits, signed), np.inf
    for r in CLIPS:
        scale, zp = act_params(lo * r, hi * r, bits, signed)
        err = float(np.sum((fake_quant(fit, scale, zp, qmin, qmax) - fit) ** 2))
        if err < best_err:
            best, best_err = (scale, zp), err
    return best


def output_error(x: np.ndarray, weights: list[np.ndarray], bits: list[int], act_bits: int, signed: bool,
                 s: np.ndarray | None) -> float:
    """sum_i |Q(x / s) Q(W_i s)^T - x W_i^T|^2 / sum_i |x W_i^T|^2 over rows x [S, K]."""
    xs = (x if s is None else x / s).astype(np.float32)
    scale, zp = _act_grid(xs, act_bits, signed)
    xq = fake_quant(xs, scale, zp, *act_qrange(act_bits, signed)).astype(np.float64)
    num = den = 0.0
    for w, b in zip(weights, bits):
        ref = x @ w.T
        wq = _fake_weight(w if s is None else w * s, b)
        num += float(np.sum((xq @ wq.T - ref) ** 2))
        den += float(np.sum(ref ** 2))
    return num / max(den, 1e-30)


def smoothing_scales(amax: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """s [K] for channel maxima amax [K] and the readers' weights [O_i, K]; channels that never
    fire (or have no weight) keep s = 1. Normalised to geometric mean 1 (a common factor is
    absorbed by the per-tensor and per-channel scales anyway)."""
    wmax = np.max([np.abs(w).max(axis=0) for w in weights], axis=0)
    a = np.asarray(amax, np.float64)
    live = (a > 1e-6 * max(a.max(), 1e-30)) & (wmax > 0)
    s = np.ones_like(a)
    s[live] = a[live] ** alpha / wmax[live] ** (1 - alpha)
    s[live] /= np.exp(np.mean(np.log(s[live])))
    return s


def choose_smoothing(amax: np.ndarray, fitted: int, rows: np.ndarray, weights: list[np.ndarray],
                     bits: list[int], act_bits: int, signed: bool = False,
                     alphas: tuple[float, ...] = ALPHAS, gain: float = GAIN) -> Smoothing:
    """The alpha (or none) whose quantized outputs of every reader are closest to float on
    `rows` [S, K] (rows not among the `fitted` rows `amax` was taken over); a candidate must
    beat no smoothing by `gain` (its error at most gain times the unsmoothed one)."""
    x = np.asarray(rows, np.float64)
    ws = [np.asarray(w, np.float64) for w in weights]
    before = output_error(x, ws, bits, act_bits, signed, None)
    best = Smoothing(None, None, before, before)
    if min(len(x), fitted) < MIN_ROWS:
        return best
    for alpha in alphas:
        s = smoothing_scales(amax, ws, alpha)
        err = output_error(x, ws, bits, act_bits, signed, s)
        if err < gain * before and err < best.error_after:
            best = Smoothing(alpha, s, before, err)
    return best
