"""Pure-numpy figures comparing a quantized model's outputs with the FP32 reference."""

from __future__ import annotations

import numpy as np


def top1_agreement(ref: np.ndarray, x: np.ndarray, axis: int = -1) -> float:
    """Fraction of positions whose argmax over `axis` is the same in both."""
    return float(np.mean(np.argmax(ref, axis) == np.argmax(x, axis)))


def kl_divergence(p: np.ndarray, q: np.ndarray, axis: int = -1, eps: float = 1e-8) -> float:
    """Mean KL(p || q) between probability distributions along `axis` (both re-normalised)."""
    p = np.clip(np.asarray(p, np.float64), eps, None)
    q = np.clip(np.asarray(q, np.float64), eps, None)
    p = p / p.sum(axis, keepdims=True)
    q = q / q.sum(axis, keepdims=True)
    return float(np.mean(np.sum(p * np.log(p / q), axis)))


def cosine(ref: np.ndarray, x: np.ndarray) -> float:
    """Cosine similarity of the flattened arrays."""
    a, b = np.ravel(ref).astype(np.float64), np.ravel(x).astype(np.float64)
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den > 0 else float(np.array_equal(a, b))


def sqnr_db(ref: np.ndarray, x: np.ndarray) -> float:
    """10*log10(sum(ref^2) / sum((ref - x)^2)); inf when identical."""
    a, b = np.asarray(ref, np.float64), np.asarray(x, np.float64)
    noise = np.sum((a - b) ** 2)
    if noise == 0:
        return float("inf")
    return float(10.0 * np.log10(np.sum(a ** 2) / noise))


def map_iou(ref: np.ndarray, x: np.ndarray, threshold: float = 0.3) -> float:
    """IoU of the binarised detection maps (prob > threshold); 1.0 when both are empty."""
    a, b = np.asarray(ref) > threshold, np.asarray(x) > threshold
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def string_match(a: list[str], b: list[str]) -> float:
    """Fraction of positions where the two lists of strings are equal."""
    if len(a) != len(b):
        raise ValueError("lists differ in length")
    return float(np.mean([x == y for x, y in zip(a, b)])) if a else float("nan")
