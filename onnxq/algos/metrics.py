"""Figures comparing outputs with a reference: SQNR, cosine, KL, top-1 agreement, and the
network divergence the searches minimise. Pure numpy."""

from __future__ import annotations

from typing import Sequence

import numpy as np

KL_EPS = 1e-12     # added to probabilities before the logarithm


def sqnr_db(ref: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio, 10 log10(|ref|^2 / |ref - approx|^2)."""
    ref = np.asarray(ref, dtype=np.float64)
    noise = float(np.sum((ref - np.asarray(approx, dtype=np.float64)) ** 2))
    signal = float(np.sum(ref**2))
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


def probabilities(x: np.ndarray) -> np.ndarray:
    """x itself when its last axis already holds probabilities, else softmax(x)."""
    x = x.astype(np.float64)
    if x.min() >= 0 and np.allclose(x.sum(-1), 1.0, atol=1e-3):
        return x
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def classifier_like(x: np.ndarray) -> bool:
    """Float outputs whose last axis could be classes (rank 2 or 3, at least 2 entries)."""
    return x.dtype.kind == "f" and x.ndim in (2, 3) and x.shape[-1] >= 2


def kl_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) along the last axis of two probability arrays, one value per row."""
    return np.sum(p * (np.log(p + KL_EPS) - np.log(q + KL_EPS)), axis=-1)


def divergence(ref: Sequence[np.ndarray], out: Sequence[np.ndarray]) -> float:
    """KL for classifier-like outputs, relative MSE otherwise; summed over outputs."""
    total = 0.0
    for r, o in zip(ref, out):
        r, o = r.astype(np.float64), o.astype(np.float64)
        if classifier_like(r):
            total += float(np.mean(kl_rows(probabilities(r), probabilities(o))))
        else:
            total += float(np.mean((r - o) ** 2) / max(np.mean(r**2), 1e-12))
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
