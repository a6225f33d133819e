"""Figures comparing outputs with a reference: SQNR, cosine, KL, top-1 agreement, and the
network divergence the searches minimise. Pure numpy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

KL_EPS = 1e-12     # added to probabilities before the logarithm
SQNR_CHUNK = 1 << 18      # values sqnr_db converts to float64 at a time


def sqnr_db(ref: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio, 10 log10(|ref|^2 / |ref - approx|^2), in float64,
    a chunk of rows at a time (no float64 copy of a large weight is made whole)."""
    ref, approx = np.asarray(ref), np.asarray(approx)
    rows = ref.reshape(ref.shape[0], -1) if ref.ndim > 1 and ref.size else ref.reshape(1, -1)
    other = np.broadcast_to(approx, ref.shape).reshape(rows.shape)
    step = max(1, SQNR_CHUNK // max(1, rows.shape[1]))
    noise = signal = 0.0
    for i in range(0, rows.shape[0], step):
        r = rows[i:i + step].astype(np.float64).ravel()
        d = r - other[i:i + step].astype(np.float64).ravel()
        noise, signal = noise + float(d @ d), signal + float(r @ r)
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))


def cosine(ref: np.ndarray, x: np.ndarray) -> float:
    """Cosine similarity of the flattened arrays (1.0 for two zero arrays, 0.0 for one)."""
    a, b = np.ravel(ref).astype(np.float64), np.ravel(x).astype(np.float64)
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den > 0 else float(np.array_equal(a, b))


def _is_probabilities(x: np.ndarray) -> bool:
    return bool(x.min() >= 0 and np.allclose(x.sum(-1), 1.0, atol=1e-3))


def probabilities(x: np.ndarray) -> np.ndarray:
    """x itself when its last axis already holds probabilities, else softmax(x)."""
    x = x.astype(np.float64)
    if _is_probabilities(x):
        return x
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _is_unit_rows(x: np.ndarray) -> bool:
    """Rows of L2 norm one: a normalised embedding (a sentence encoder's output)."""
    return bool(np.allclose(np.linalg.norm(x.astype(np.float64), axis=-1), 1.0, atol=1e-3))


def classifier_like(x: np.ndarray) -> bool:
    """Float outputs whose last axis holds class scores: rank-2 logits or probabilities, or a
    rank-3 tensor whose last axis already sums to one (per-step probabilities). A rank-3 tensor
    of other values is a detector head or a feature map, whose argmax means nothing; rows of
    unit L2 norm are embeddings, compared by direction, not by their largest entry."""
    if x.dtype.kind != "f" or x.ndim not in (2, 3) or x.shape[-1] < 2:
        return False
    if _is_probabilities(x):
        return True
    return x.ndim == 2 and not _is_unit_rows(x)


def kl_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) along the last axis of two probability arrays, one value per row."""
    return np.sum(p * (np.log(p + KL_EPS) - np.log(q + KL_EPS)), axis=-1)


def relative_mse(ref: np.ndarray, out: np.ndarray) -> float:
    """Squared error relative to the reference's energy. For tensors of rank 3 and more it is
    taken per index of axis 1 and averaged, so a detector head's few large rows (box coordinates)
    do not drown its small ones (class scores), nor a feature map's loud channels its quiet ones."""
    if ref.ndim < 3 or ref.shape[1] < 2:
        return float(np.mean((ref - out) ** 2) / max(np.mean(ref**2), 1e-12))
    r = ref.reshape(ref.shape[0], ref.shape[1], -1)
    o = out.reshape(r.shape)
    err, energy = np.mean((r - o) ** 2, axis=(0, 2)), np.mean(r**2, axis=(0, 2))
    floor = max(float(energy.mean()) * 1e-6, 1e-12)      # silent rows must not dominate
    return float(np.mean(err / np.maximum(energy, floor)))


@dataclass(frozen=True)
class Expected:
    """A reference output made ready for `divergence` once, for searches that compare many
    trials with it: class scores as float64 probabilities with their logarithms, any other
    output as float64 (logs None)."""
    values: np.ndarray
    logs: np.ndarray | None


def expected(outputs: Sequence[np.ndarray]) -> list[Expected]:
    """One sample's (or batch's) reference outputs, ready for `divergence`."""
    out = []
    for r in outputs:
        r = r.astype(np.float64)
        if classifier_like(r):
            p = probabilities(r)
            out.append(Expected(p, np.log(p + KL_EPS)))
        else:
            out.append(Expected(r, None))
    return out


def divergence(ref: Sequence[np.ndarray | Expected], out: Sequence[np.ndarray]) -> float:
    """The loss the searches minimise, summed over outputs: KL for class scores, relative MSE
    otherwise. `ref`: the reference outputs, raw or `expected` (the same value, faster)."""
    total = 0.0
    for r, o in zip(ref if all(isinstance(r, Expected) for r in ref) else expected(ref), out):
        o = o.astype(np.float64)
        if r.logs is not None:     # kl_rows, the reference's logarithms taken once
            total += float(np.mean(np.sum(r.values * (r.logs - np.log(probabilities(o) + KL_EPS)), axis=-1)))
        else:
            total += relative_mse(r.values, o)
    return total


def compare_outputs(ref: Sequence[np.ndarray], out: Sequence[np.ndarray]) -> dict:
    """Metrics of one output accumulated over samples (lists of per-sample arrays)."""
    r = np.concatenate([a.reshape(-1) for a in ref]).astype(np.float64)
    o = np.concatenate([a.reshape(-1) for a in out]).astype(np.float64)
    m = {"cosine": cosine(r, o), "sqnr_db": sqnr_db(r, o), "degenerate": bool(r.size == 0 or np.ptp(r) == 0)}
    if all(classifier_like(a) for a in ref):
        agree, kl, n = 0, 0.0, 0
        for a, b in zip(ref, out):
            agree += int(np.sum(a.argmax(-1) == b.argmax(-1)))
            kl += float(np.sum(kl_rows(probabilities(a), probabilities(b))))
            n += int(np.prod(a.shape[:-1]))
        m["top1_agreement"] = agree / max(n, 1)
        m["kl"] = kl / max(n, 1)
    return m
