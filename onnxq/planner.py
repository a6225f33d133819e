"""Turns targets + statistics into a Plan: weight codes and scales, corrected biases, and
activation QDQ parameters. Pure numpy; the graph is edited later by graph/rewrite.py."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from .algos.qmath import act_params, sqnr_db
from .algos.ranges import RANGE_METHODS
from .algos.weights import quantize_weight, rtn, weighted_error
from .config import ConvertConfig
from .layout import AXIS, from_matrix, to_matrix
from .types import ActQuant, ActStats, LayerPlan, LayerStats, Plan, Target

Progress = Callable[[int, int], None]


def layer_method(cfg: ConvertConfig, bits: int) -> str:
    if cfg.weight_method:
        return cfg.weight_method
    return "gptq" if bits <= 4 else "mse"


def _weighted_sqnr(wm, w_hat, h, groups) -> float:
    noise = weighted_error(wm, w_hat, h, groups)
    signal = weighted_error(wm, np.zeros_like(wm), h, groups)
    if noise <= 0:
        return float("inf")
    return float(10 * np.log10(max(signal, 1e-30) / noise))


def plan_layer(t: Target, w: np.ndarray, bias: np.ndarray | None, ls: LayerStats | None,
               cfg: ConvertConfig) -> LayerPlan:
    bits, note = cfg.bits_for(t.node, t.depthwise)
    method = layer_method(cfg, bits)
    wm = to_matrix(w, t.layout).astype(np.float64)               # [O, K]
    groups = t.groups if t.op == "Conv" else 1
    h = ls.hessian if ls is not None else None
    wq = quantize_weight(method, wm, bits, h, groups)
    w_hat = wq.codes * wq.scales[:, None]
    plan = LayerPlan(target=t, bits=bits, method=wq.method,
                     codes=from_matrix(wq.codes, t.layout, t.shape).astype(np.int32),
                     scales=wq.scales, axis=AXIS[t.layout], bias=None, note=note)
    if h is not None:
        plan.sqnr_db = _weighted_sqnr(wm, w_hat, h, groups)
        r = rtn(wm, bits)
        plan.sqnr_rtn_db = _weighted_sqnr(wm, r.codes * r.scales[:, None], h, groups)
    else:
        plan.sqnr_db = sqnr_db(wm, w_hat)
    if cfg.bias_correction and ls is not None and t.op in ("Conv", "Gemm"):
        rows = wm.shape[0] // groups
        mean = np.repeat(ls.mean, rows, axis=0)                 # [O, K]: E[x] of each row's group
        shift = np.einsum("ok,ok->o", w_hat - wm, mean)          # E[y_q - y] per channel
        b = bias.astype(np.float64) if bias is not None else np.zeros(wm.shape[0])
        if b.shape == shift.shape:
            plan.bias = (b - shift).astype(np.float32)
    return plan


def plan_acts(acts: Mapping[str, ActStats], cfg: ConvertConfig) -> dict[str, ActQuant]:
    out: dict[str, ActQuant] = {}
    if not cfg.quantize_acts:
        return out
    fn = RANGE_METHODS[cfg.act_method_name]
    for name, st in sorted(acts.items()):
        signed = cfg.act_symmetric or cfg.act_bits == 16
        lo, hi = fn(st.counts, st.edges, cfg.act_bits, signed, observed=st.observed)
        scale, zp = act_params(lo, hi, cfg.act_bits, signed)
        out[name] = ActQuant(scale, zp, cfg.act_bits, signed, lo, hi, cfg.act_method_name)
    return out


def make_plan(targets: Sequence[Target], weights: Mapping[str, np.ndarray],
              biases: Mapping[str, np.ndarray | None], stats_layers: Mapping[str, LayerStats],
              acts: Mapping[str, ActStats], cfg: ConvertConfig,
              progress: Progress | None = None) -> Plan:
    plan = Plan(acts=plan_acts(acts, cfg))
    for i, t in enumerate(targets):
        plan.layers.append(plan_layer(t, weights[t.node], biases.get(t.node),
                                      stats_layers.get(t.node), cfg))
        if progress:
            progress(i + 1, len(targets))
    return plan
