"""Fidelity of a quantized model against its FP32 source, through onnxruntime."""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import onnx

from .algos.qmath import sqnr_db
from .calib.collect import session
from .errors import VerificationError


def probabilities(x: np.ndarray) -> np.ndarray:
    """x itself when its last axis already holds probabilities, else softmax(x)."""
    x = x.astype(np.float64)
    if x.min() >= 0 and np.allclose(x.sum(-1), 1.0, atol=1e-3):
        return x
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def classifier_like(x: np.ndarray) -> bool:
    return x.dtype.kind == "f" and x.ndim in (2, 3) and x.shape[-1] >= 2


def compare_outputs(ref: Sequence[np.ndarray], out: Sequence[np.ndarray]) -> dict:
    """Metrics of one output accumulated over samples (lists of per-sample arrays)."""
    r = np.concatenate([a.reshape(-1) for a in ref]).astype(np.float64)
    o = np.concatenate([a.reshape(-1) for a in out]).astype(np.float64)
    denom = np.linalg.norm(r) * np.linalg.norm(o)
    m = {"cosine": float(r @ o / denom) if denom > 0 else float(np.array_equal(r, o)),
         "sqnr_db": sqnr_db(r, o)}
    if all(classifier_like(a) for a in ref):
        agree, kl, n = 0, 0.0, 0
        for a, b in zip(ref, out):
            agree += int(np.sum(a.argmax(-1) == b.argmax(-1)))
            p, q = probabilities(a), probabilities(b)
            kl += float(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12))))
            n += int(np.prod(a.shape[:-1]))
        m["top1_agreement"] = agree / max(n, 1)
        m["kl"] = kl / max(n, 1)
    return m


def fidelity(ref_model: onnx.ModelProto | bytes | str, cand_model: onnx.ModelProto | bytes | str,
             loaders: Sequence[Callable[[], dict]], labels: np.ndarray | None = None) -> dict:
    """Per-output metrics plus a summary (worst cosine, first classifier output's agreement)."""
    ref_s, cand_s = session(ref_model), session(cand_model)
    names = [o.name for o in ref_s.get_outputs()]
    ref_out: dict[str, list] = {n: [] for n in names}
    cand_out: dict[str, list] = {n: [] for n in names}
    for load in loaders:
        feed = load()
        for n, a in zip(names, ref_s.run(names, feed)):
            ref_out[n].append(np.asarray(a))
        try:
            res = cand_s.run(names, feed)
        except Exception as e:
            raise VerificationError(f"the quantized model failed to run in onnxruntime: "
                                    f"{str(e).splitlines()[0][:200]}") from None
        for n, a in zip(names, res):
            cand_out[n].append(np.asarray(a))
    per = {n: compare_outputs(ref_out[n], cand_out[n]) for n in names
           if all(a.dtype.kind == "f" for a in ref_out[n])}
    summary: dict = {"samples": len(loaders), "outputs": per}
    cls_out = next((n for n in per if "top1_agreement" in per[n]), None)
    if labels is not None and cls_out is not None:
        pred_r = np.concatenate([a.reshape(-1, a.shape[-1]).argmax(-1) for a in ref_out[cls_out]])
        pred_c = np.concatenate([a.reshape(-1, a.shape[-1]).argmax(-1) for a in cand_out[cls_out]])
        if pred_r.shape == labels.shape:
            summary["accuracy_reference"] = float(np.mean(pred_r == labels))
            summary["accuracy_candidate"] = float(np.mean(pred_c == labels))
    if per:
        summary["cosine"] = min(v["cosine"] for v in per.values())
        summary["sqnr_db"] = min(v["sqnr_db"] for v in per.values())
        agree = [v["top1_agreement"] for v in per.values() if "top1_agreement" in v]
        if agree:
            summary["top1_agreement"] = agree[0]
            summary["kl"] = next(v["kl"] for v in per.values() if "kl" in v)
    return summary


def latency_ms(model: onnx.ModelProto | bytes | str, feed: dict, runs: int = 30, warmup: int = 5,
               qdq_fusion: bool = True) -> float:
    """Median wall time of one run at the given feed (onnxruntime CPU, 2 threads)."""
    s = session(model, qdq_fusion=qdq_fusion)
    for _ in range(warmup):
        s.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        s.run(None, feed)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)
