"""Weights that several layers read (tied embeddings, a layer applied twice, an unrolled loop):
one set of codes and scales for all of them, so the file stores the weight once.

Each reader was planned on its own input statistics, so their codes can differ. The codes kept
are those that minimise the readers' summed output error, sum_m tr(E H_m E^T) (the plain weight
error when a reader has no statistics), among each reader's own and, where every reader has
statistics, the weight coded again on sum_m H_m; each reader then gets its bias
corrected for those codes. Readers planned differently (other bits, a low-rank branch, input
compensation, another layout) keep their own codes, and the report says why."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Mapping, Sequence

import numpy as np

from ..algos.matrix import dequantize_rows, to_matrix
from ..algos.metrics import sqnr_db
from ..algos.weights import weighted_error
from ..config import ConvertConfig
from ..types import LayerPlan, LayerStats, Target
from .layers import recoded, recoded_bias, weighted_sqnr

SHAREABLE_OPS = ("Conv", "Gemm", "MatMul", "Gather")


def weight_key(lp: LayerPlan) -> tuple:
    """Which stored weight a layer reads: layers with equal keys read one tensor."""
    t = lp.target
    return (t.graph, t.weight)


def stored_weights(targets: Sequence[Target]) -> list[list[Target]]:
    """The readers of each stored weight, in order of first reader: layers that read one weight
    alike (the same op, layout and shape, as _why_not asks) store it once when they take one width,
    so a size budget gives them one together and counts its bytes once (search/mixed.py); any
    other layer is a group of its own."""
    groups: dict[tuple, list[Target]] = {}
    for t in targets:
        key = (t.graph, t.weight, t.op, t.weight_layout, t.shape) if t.op in SHAREABLE_OPS else (t.node,)
        groups.setdefault(key, []).append(t)
    return list(groups.values())


def shared_keys(layers: list[LayerPlan]) -> set[tuple]:
    """The weight_keys that several of `layers` read (their weight is coded once for all)."""
    return {k for k, n in Counter(weight_key(lp) for lp in layers).items() if n > 1}


def one_per_weight(layers: "Sequence[LayerPlan]") -> list[LayerPlan]:
    """The first of `layers` to read each stored weight (the bytes a weight takes, counted once)."""
    first: dict[tuple, LayerPlan] = {}
    for lp in layers:
        first.setdefault(weight_key(lp), lp)
    return list(first.values())


def pool_stats(targets: list[Target], layers: dict[str, LayerStats]) -> int:
    """Readers of one weight on equal terms (Target.weight_terms) get their inputs' statistics
    pooled (weighted by rows) as `LayerStats.pooled`, which the weight is coded on once
    (plan_once), and keep their own means for their biases. One calibration pass pools while it
    collects (calib.collect); this pools statistics that were loaded or gathered in chunks.
    In place. -> groups pooled."""
    groups: dict[tuple, list[str]] = {}
    for t in targets:
        if t.op in SHAREABLE_OPS and t.op != "Gather" and t.node in layers:
            groups.setdefault(t.weight_terms, []).append(t.node)
    pooled = 0
    for nodes in groups.values():
        parts = [layers[n] for n in nodes]
        if len(parts) < 2 or parts[0].pooled is not None or len({p.hessian is None for p in parts}) > 1:
            continue                          # one reader, pooled while collected, or mixed statistics
        rows = sum(p.rows for p in parts)
        share = [p.rows / rows for p in parts]
        h = None if parts[0].hessian is None else sum(s * p.hessian for s, p in zip(share, parts))
        one = LayerStats(h, sum(s * p.mean for s, p in zip(share, parts)), rows)
        for n, p in zip(nodes, parts):
            layers[n] = LayerStats(h, p.mean, p.rows, pooled=one)
        pooled += 1
    return pooled


def _why_not(group: list[LayerPlan]) -> str | None:
    first = group[0]
    for lp in group:
        t = lp.target
        if t.op not in SHAREABLE_OPS:
            return f"{t.op} readers keep their own codes"
        if lp.branch is not None:
            return "a reader has a low-rank branch"
        if lp.method.endswith("+compensated"):
            return "readers are fitted to different quantized inputs (sequential mode)"
        if (lp.bits, lp.axis, lp.block, t.weight_layout, t.shape, t.op) != \
                (first.bits, first.axis, first.block, first.target.weight_layout, first.target.shape, first.target.op):
            return "readers take different bits or layouts"
    return None


def _error(lp: LayerPlan, wm: np.ndarray, w_hat: np.ndarray, weighted: bool) -> float:
    if weighted:
        return weighted_error(wm, w_hat, lp.fit_hessian, lp.target.row_groups)
    return float(np.sum((wm - w_hat) ** 2))


def share_weights(layers: list[LayerPlan], weights: Mapping[str, np.ndarray],
                  stats: Mapping[str, LayerStats], cfg: ConvertConfig) -> int:
    """Unify the codes of layers that read one weight, in place; every such reader's note says
    what was shared, or why not. -> how many weights are now stored once."""
    groups: dict[tuple, list[int]] = {}
    for i, lp in enumerate(layers):
        groups.setdefault(weight_key(lp), []).append(i)
    shared = 0
    for idx in groups.values():
        if len(idx) < 2:
            continue
        group = [layers[i] for i in idx]
        names = ", ".join(lp.target.node for lp in group)
        why = _why_not(group)
        if why is None:
            _unify(idx, group, layers, weights, stats, cfg)
            shared += 1
        note = f"weight shared with {names}: stored once" if why is None else \
            f"weight read by {names}, stored once per reader: {why}"
        for i in idx:
            layers[i].note = f"{layers[i].note}; {note}" if layers[i].note else note
    return shared


def _unify(idx: list[int], group: list[LayerPlan], layers: list[LayerPlan], weights: Mapping[str, np.ndarray],
           stats: Mapping[str, LayerStats], cfg: ConvertConfig) -> None:
    first = group[0]
    if first.target.op == "Gather" or all(lp.codes is first.codes for lp in group):
        best = first                          # tables (weight-only, deterministic) and readers coded once
        wm = None
    else:
        layout = first.target.weight_layout
        wm = to_matrix(weights[first.target.node], layout).astype(np.float64, order="C")
        weighted = all(lp.fit_hessian is not None for lp in group)

        def total(cand: LayerPlan) -> float:
            w_hat = dequantize_rows(to_matrix(cand.codes, layout), cand.scales)
            return sum(_error(lp, wm, w_hat, weighted) for lp in group)
        cands = group + ([recoded(first, wm, sum(lp.fit_hessian for lp in group), cfg)] if weighted else [])
        best = min(cands, key=lambda cand: (total(cand), cand is not first, cand.target.node))
    for i, lp in zip(idx, group):
        layers[i] = _adopt(lp, best, wm, stats.get(lp.target.node), cfg)


def _adopt(lp: LayerPlan, best: LayerPlan, wm: np.ndarray | None, ls: LayerStats | None,
           cfg: ConvertConfig) -> LayerPlan:
    """`lp` with `best`'s codes and scales, its bias corrected for them and its SQNR re-estimated."""
    if best is lp or wm is None:
        return dataclasses.replace(lp, codes=best.codes, scales=best.scales, zero_points=best.zero_points)
    t = lp.target
    out = dataclasses.replace(lp, codes=best.codes, scales=best.scales, zero_points=best.zero_points,
                              method=best.method)
    w_hat, out.bias = recoded_bias(t, wm, best, lp.source_bias, ls, cfg)
    out.sqnr_db = (weighted_sqnr(wm, w_hat, lp.fit_hessian, t.row_groups) if lp.fit_hessian is not None
                   else sqnr_db(wm, w_hat))
    return out
