"""Plans low-rank residual branches for already-planned layers (algos/lowrank.py does the math):
spectra of each eligible layer's residual, ranks allocated under the parameter budget, INT8
factors, and the bias correction redone for the effective weight Q(W) + B·A."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from .algos.lowrank import allocate, factors, spectrum
from .algos.qmath import act_params
from .algos.weights import mse
from .config import ConvertConfig
from .layout import to_matrix
from .types import ActQuant, Branch, LayerPlan

MID_CLIP_SIGMAS = 4.0   # the middle activation's range, in its own standard deviations


def eligible(lp: LayerPlan) -> str:
    """'' when the layer can take a branch, else the reason it cannot."""
    t = lp.target
    if lp.fit_hessian is None:
        return "no input statistics"
    if lp.bits >= 8:
        return "8-bit layer"
    if t.op == "ConvTranspose":
        return "ConvTranspose"
    if t.op == "Conv" and t.groups > 1:
        return "grouped conv"
    return ""


def _quant_rows(m: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q = mse(m, bits)
    return q.codes, q.scales, q.codes * q.scales[:, None]


def build_branch(a: np.ndarray, b: np.ndarray, h: np.ndarray, cfg: ConvertConfig, init: str) -> Branch:
    rank = a.shape[0]
    if cfg.adapter_bits >= 32:
        return Branch(rank, 32, a, b, init=init)
    a_codes, a_scales, a_hat = _quant_rows(a, cfg.adapter_bits)
    b_codes, b_scales, b_hat = _quant_rows(b, cfg.adapter_bits)
    sd = float(np.sqrt(max(np.max(np.einsum("rk,kl,rl->r", a_hat, h, a_hat)), 1e-20)))
    lim = MID_CLIP_SIGMAS * sd
    scale, zp = act_params(-lim, lim, 8, True)
    mid = ActQuant(scale, zp, 8, True, -lim, lim, "analytic")
    return Branch(rank, cfg.adapter_bits, a_hat, b_hat, a_codes, a_scales, b_codes, b_scales, mid, init)


def plan_branches(layers: list[LayerPlan], weights: Mapping[str, np.ndarray],
                  cfg: ConvertConfig, total_params: int) -> dict:
    """Adds `branch` to the chosen layers in place; returns a summary for the report."""
    budget = int(np.floor(cfg.rank_budget * total_params))
    cand, spectra, gains, costs, hs = [], [], [], [], []
    skipped: dict[str, int] = {}
    for lp in layers:
        why = eligible(lp)
        if why:
            skipped[why] = skipped.get(why, 0) + 1
            continue
        t, h = lp.target, lp.fit_hessian[0]
        wm = (lp.fit_target if lp.fit_target is not None
              else to_matrix(weights[t.node], t.layout).astype(np.float64))
        w_hat = to_matrix(lp.codes, t.layout) * lp.scales[:, None]
        sp = spectrum(wm - w_hat, h, cfg.max_rank, cfg.adapter_init)
        signal = float(np.einsum("ok,kl,ol->", wm, h, wm)) or 1.0
        cand.append(lp)
        hs.append(h)
        spectra.append(sp)
        gains.append(sp.gains() / signal)          # relative output-error reduction per rank
        costs.append(wm.shape[0] + wm.shape[1])    # parameters of one rank: a column of B, a row of A
    ranks = allocate(gains, costs, budget) if budget > 0 else [0] * len(cand)
    used = 0
    for lp, sp, r, c, h in zip(cand, spectra, ranks, costs, hs):
        if r == 0:
            continue
        a, b = factors(sp, r)
        lp.branch = build_branch(a, b, h, cfg, cfg.adapter_init)
        used += r * c
    return {"budget_params": budget, "used_params": used, "layers_with_branch": sum(r > 0 for r in ranks),
            "ineligible": skipped}
