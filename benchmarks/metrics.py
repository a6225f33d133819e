"""Pure-numpy figures comparing a quantized model's outputs with the FP32 reference."""

from __future__ import annotations

import numpy as np

from checkout import require_checkout

require_checkout()          # every benchmark imports this module: none measures a stale copy

from onnxq.algos.metrics import cosine, kl_rows, sqnr_db  # noqa: E402,F401  (the same figures as onnxq's)


def top1_agreement(ref: np.ndarray, x: np.ndarray, axis: int = -1) -> float:
    """Fraction of positions whose argmax over `axis` is the same in both."""
    return float(np.mean(np.argmax(ref, axis) == np.argmax(x, axis)))


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Mean KL(p || q) between probability distributions along the last axis (re-normalised)."""
    p = np.asarray(p, np.float64)
    q = np.asarray(q, np.float64)
    return float(np.mean(kl_rows(p / p.sum(-1, keepdims=True), q / q.sum(-1, keepdims=True))))


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


def retrieval(ref: np.ndarray, x: np.ndarray) -> dict[str, float]:
    """Sentence embeddings [n, d] against FP32's: the share of sentences whose nearest other
    sentence (cosine) is the same one FP32 finds, and the mean cosine between the two embeddings
    of each sentence."""
    def unit(e):
        e = np.asarray(e, np.float64)
        return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)

    a, b = unit(ref), unit(x)
    nearest = []
    for e in (a, b):
        s = e @ e.T
        np.fill_diagonal(s, -np.inf)
        nearest.append(s.argmax(1))
    return {"retrieval_agree": float(np.mean(nearest[0] == nearest[1])),
            "mean_cosine": float(np.mean(np.sum(a * b, 1)))}
