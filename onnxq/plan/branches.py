"""Plans low-rank residual branches for already-planned layers (algos/lowrank.py does the math):
spectra of each eligible layer's residual, ranks allocated under the parameter budget, INT8
factors, and the bias correction redone for the effective weight Q(W) + B·A."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..algos.lowrank import allocate_ranks, factors, spectrum
from ..algos.matrix import dequantize_rows, from_matrix, to_matrix
from ..algos.weights import gptq, quantize_weight, row_errors, rtn
from ..config import ConvertConfig
from ..types import Branch, BranchSummary, LayerPlan, Plan, Target
from .acts import act_quant
from .layers import coded_matrix, weighted_sqnr
from .shared import shared_keys, weight_key

MID_CLIP_SIGMAS = 4.0   # the middle activation's range, in its own standard deviations
GAMMAS = (0.0, 0.5, 1.0)  # powers of the measured sensitivity tried in the rank allocation


def eligible(lp: LayerPlan) -> str:
    """'' when the layer can take a branch, else the reason it cannot."""
    t = lp.target
    if lp.fit_hessian is None:
        return "no input statistics"
    if lp.bits >= 8:
        return "8-bit layer"
    if t.groups > 1:                  # grouped ConvTransposes have no statistics (above)
        return "grouped conv"
    return ""


def _quant_rows(m: np.ndarray, bits: int, h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row codes of a factor whose input has second moment `h`: second-order rounding on
    that input (whitened A rows span directions of very different input energy, so plain
    rounding of A at 8 bits loses most of what the branch gives back)."""
    q = gptq(m, bits, h) if bits <= 8 else rtn(m, bits)
    return q.codes, q.scales, q.codes * q.scales[:, None]


def build_branch(a: np.ndarray, b: np.ndarray, h: np.ndarray, cfg: ConvertConfig, init: str,
                 mean: np.ndarray | None = None) -> Branch:
    """The deployable branch for float factors. With the input's `mean` the branch is centred:
    A gets the bias -A·mean, so the middle activation is zero-mean and B adds nothing to the
    output's mean (the layer's corrected bias stays as it is). `h` is then the covariance the
    factors were fitted on, and the middle range covers its spread. Uncentred (no bias
    correction), `h` is E[x x^T] and the range covers the mean too."""
    rank = a.shape[0]
    if cfg.branch_bits >= 32:
        return Branch(rank, 32, a, b, init=init, a_bias=None if mean is None else -(a @ mean))
    a_codes, a_scales, a_hat = _quant_rows(a, cfg.branch_bits, h)
    h_mid = a_hat @ h @ a_hat.T                     # second moment of the middle activation
    b_codes, b_scales, b_hat = _quant_rows(b, cfg.branch_bits, h_mid)
    sd = float(np.sqrt(max(np.max(np.diag(h_mid)), 1e-20)))
    lim = MID_CLIP_SIGMAS * sd
    bits = min(cfg.branch_bits, 16)
    mid = act_quant(-lim, lim, bits, True, "analytic")
    return Branch(rank, cfg.branch_bits, a_hat, b_hat, a_codes, a_scales, b_codes, b_scales, mid, init,
                  a_bias=None if mean is None else -(a_hat @ mean))


def _weight(lp: LayerPlan, with_branch: bool, unrefined: Mapping[str, tuple] | None = None
            ) -> tuple[np.ndarray, np.ndarray | None]:
    """The layer's effective float weight in its original layout, and its bias (corrected for
    the mean shift of that weight; in float this equals the emitted centred branch). Without its branch, a
    layer refined jointly with the branch takes its rounding from before the refinement."""
    t = lp.target
    codes, scales, bias = lp.codes, lp.scales, lp.bias
    if not with_branch and unrefined and t.node in unrefined:
        codes, scales, bias = unrefined[t.node]
    w = dequantize_rows(to_matrix(codes, t.weight_layout), scales)
    if with_branch and lp.branch is not None:
        ba = lp.branch.b @ lp.branch.a
        w = w + ba
        if bias is not None and lp.input_mean is not None:
            bias = bias.astype(np.float64) - ba @ lp.input_mean[0]
    return from_matrix(w, t.weight_layout, t.shape), bias


def _sensitivities(cand: list[LayerPlan], errors: list[float], probe) -> list[float]:
    """Network divergence per unit of relative layer-output error, each layer quantized alone;
    layers the probe cannot reach (subgraphs) take the median of the others."""
    sens = [None] * len(cand)
    for i, (lp, e) in enumerate(zip(cand, errors)):
        if lp.target.graph or e <= 0:
            continue
        sens[i] = max(probe({lp.target.node: _weight(lp, False)}), 0.0) / e
    known = [v for v in sens if v is not None]
    fill = float(np.median(known)) if known else 1.0
    return [fill if v is None else v for v in sens]


def _choose_weighting(cand, spectra, gains, costs, errors, budget, probe) -> tuple[list[int], dict]:
    """Ranks allocated with each layer's gains weighted by sensitivity**gamma for gamma in
    GAMMAS (0: the layer's own output error; 1: fully by its measured single-layer effect on
    the network), each allocation measured end to end with float factors; the best is kept.
    Single-layer sensitivities are noisy and do not add up exactly, so the end-to-end
    measurement, not the model, has the last word."""
    sens = np.array(_sensitivities(cand, errors, probe))
    sens = sens / max(float(np.median(sens)), 1e-30)
    tried, best = {}, None
    for gamma in GAMMAS:
        ranks = allocate_ranks([g * s**gamma for g, s in zip(gains, sens)], costs, budget)
        trial = {}
        for lp, sp, r in zip(cand, spectra, ranks):
            lp.branch = None
            if r > 0:
                a, b = factors(sp, r)
                lp.branch = Branch(r, 32, a, b)
            if not lp.target.graph:
                trial[lp.target.node] = _weight(lp, True)
        tried[str(gamma)] = probe(trial)
        if best is None or tried[str(gamma)] < best[0]:
            best = (tried[str(gamma)], gamma, ranks)
    for lp in cand:
        lp.branch = None
    return best[2], {"sensitivity_power": best[1], "divergence_by_power": tried}


def _end_to_end(layers: list[LayerPlan], probe, drop: bool = True,
                unrefined: Mapping[str, tuple] | None = None) -> dict:
    """Every main-graph layer at its quantized weight; drop each branch whose removal does not
    make the network's output diverge more (least useful first); a dropped branch's layer gets
    its rounding from before any joint refinement back. Returns the figures."""
    unrefined = unrefined or {}
    main = [lp for lp in layers if not lp.target.graph]
    current = {lp.target.node: _weight(lp, True) for lp in main}
    without = probe({lp.target.node: _weight(lp, False, unrefined) for lp in main})
    with_all = probe(current)
    dropped = []
    loss = with_all
    trial_losses = []
    for lp in [lp for lp in main if lp.branch is not None and drop]:
        trial = {**current, lp.target.node: _weight(lp, False, unrefined)}
        trial_losses.append((probe(trial), lp))
    for _, lp in sorted(trial_losses, key=lambda x: x[0]):
        trial = {**current, lp.target.node: _weight(lp, False, unrefined)}
        d = probe(trial)
        if d <= loss:
            lp.branch = None
            if lp.target.node in unrefined:
                lp.codes, lp.scales, lp.bias = unrefined[lp.target.node]
            current, loss = trial, d
            dropped.append(lp.target.node)
    return {"divergence_without_branches": without, "divergence_all_branches": with_all,
            "divergence_final": loss, "dropped": dropped}


def _objective(e: np.ndarray, h: np.ndarray) -> float:
    """tr(E H E^T): the layer's output error for a weight error E [O, K]."""
    return float(row_errors(e, h).sum())


def refine(lp: LayerPlan, wm: np.ndarray, h: np.ndarray, cfg: ConvertConfig, iters: int) -> tuple | None:
    """Joint refinement of a layer with a branch: re-round W - B·A, refit the branch to what that
    rounding leaves, `iters` times; the codes, scales and float factors that end lowest on the
    layer objective ||(W - Q - B·A) L||^2 are kept (the bias follows the new mean shift).
    The branch's rank stays. -> the layer's (codes, scales, bias) before, or None if unchanged."""
    t, br = lp.target, lp.branch
    rank = br.rank
    w_hat = coded_matrix(lp)
    a, b = br.a, br.b
    best = (_objective(wm - w_hat - b @ a, h), None)
    for _ in range(iters):
        q = quantize_weight(cfg.weight_method_for(lp.bits, t.op), wm - b @ a, lp.bits, h[None],
                            damp=cfg.damp)
        w_new = q.codes * q.scales[:, None]
        a, b = factors(spectrum(wm - w_new, h, rank, cfg.branch_init), rank)
        err = _objective(wm - w_new - b @ a, h)
        if err < best[0]:
            best = (err, (q, w_new, a, b))
    if best[1] is None:
        return None
    before = (lp.codes, lp.scales, lp.bias)
    q, w_new, a, b = best[1]
    if lp.bias is not None and lp.input_mean is not None:
        lp.bias = (lp.bias.astype(np.float64) - (w_new - w_hat) @ lp.input_mean[0]).astype(np.float32)
    lp.codes = from_matrix(q.codes, t.weight_layout, t.shape).astype(np.int8)
    lp.scales = q.scales
    lp.branch = Branch(rank, 32, a, b, init=br.init)
    return before


class _Candidates:
    """The layers that can take a branch, with each one's whitened spectrum, the relative gain
    of every rank, the relative output error without a branch, and the parameters of one rank."""

    def __init__(self, layers: list[LayerPlan], weights: Mapping[str, np.ndarray], cfg: ConvertConfig,
                 judged: bool = False):
        self.layers, self.spectra, self.gains, self.costs, self.hs, self.errors = [], [], [], [], [], []
        self.skipped: dict[str, int] = {}
        shared = shared_keys(layers)
        for lp in layers:
            why = eligible(lp)
            if not why and weight_key(lp) in shared:     # coded once for all readers (plan/shared.py)
                why = "weight read by several layers"
            if not why and lp.block and (lp.target.graph or not judged):
                why = "blocked scales and no network check of the branch"
            if why:
                self.skipped[why] = self.skipped.get(why, 0) + 1
                continue
            h = lp.fit_hessian[0]
            wm = _fit_target(lp, weights)
            w_hat = coded_matrix(lp)
            sp = spectrum(wm - w_hat, h, cfg.max_rank, cfg.branch_init)
            signal = _objective(wm, h) or 1.0
            self.layers.append(lp)
            self.hs.append(h)
            self.spectra.append(sp)
            self.gains.append(sp.gains() / signal)          # relative output-error reduction per rank
            self.errors.append(_objective(wm - w_hat, h) / signal)
            self.costs.append(wm.shape[0] + wm.shape[1])    # parameters of one rank: a column of B, a row of A


def _fit_target(lp: LayerPlan, weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """The float matrix the layer's rounding was fitted to [O, K]."""
    t = lp.target
    return (lp.fit_target if lp.fit_target is not None
            else to_matrix(weights[t.node], t.weight_layout).astype(np.float64))


def plan_branches(layers: list[LayerPlan], weights: Mapping[str, np.ndarray],
                  cfg: ConvertConfig, total_params: int, probe=None) -> BranchSummary:
    """Adds `branch` to the chosen layers in place; returns a summary for the report.

    With a `probe` (search/probe.Probe) each layer's gains are weighted by its measured effect
    on the network's output, and branches that do not improve it end to end are dropped."""
    budget = int(np.floor(cfg.rank_budget * total_params))
    # a branch on blocked codes only where the network check judges it: unjudged, on the VAD's
    # subgraph convs at 5%, they read 0.974 of 32 s of decisions, per-channel ones 0.978, none 0.979
    judged = probe is not None and cfg.branch_weighting == "network"
    c = _Candidates(layers, weights, cfg, judged)
    cand = c.layers
    reachable = any(not lp.target.graph for lp in cand)   # the probe runs the main graph's layers
    network = judged and budget > 0 and reachable
    ranks = allocate_ranks(c.gains, c.costs, budget) if budget > 0 else [0] * len(cand)
    choice: dict = {}
    if network:
        ranks, choice = _choose_weighting(cand, c.spectra, c.gains, c.costs, c.errors, budget, probe)
    unrefined: dict[str, tuple] = {}      # a refined layer's rounding without its branch
    for lp, sp, r, h in zip(cand, c.spectra, ranks, c.hs):
        lp.branch = None
        if r > 0:
            a, b = factors(sp, r)
            lp.branch = Branch(r, 32, a, b, init=cfg.branch_init)
            if cfg.branch_refine > 0 and not lp.block:     # re-rounding is per channel
                before = refine(lp, _fit_target(lp, weights), h, cfg, cfg.branch_refine)
                if before is not None:
                    unrefined[lp.target.node] = before
            centred = lp.bias is not None and lp.input_mean is not None
            lp.branch = build_branch(lp.branch.a, lp.branch.b, h, cfg, cfg.branch_init,
                                     lp.input_mean[0] if centred else None)
    measurable = probe is not None and reachable and any(r > 0 for r in ranks)
    check = _end_to_end(layers, probe, network, unrefined) if measurable else {}
    used = sum(lp.branch.rank * cost for lp, cost in zip(cand, c.costs) if lp.branch is not None)
    weighting = "network (measured)" if network else "layer output error"
    if cfg.branch_weighting == "network" and probe is not None and cand and not reachable:
        weighting += " (every candidate layer is inside a subgraph, which the probe does not run)"
    return BranchSummary(
        budget_params=budget, used_params=used, layers_with_branch=sum(lp.branch is not None for lp in cand),
        ineligible=c.skipped, weighting=weighting,
        refined_layers=sum(lp.branch is not None and lp.target.node in unrefined for lp in cand),
        **choice, **check)


def add_branches(plan: Plan, targets: Sequence[Target], weights: Mapping[str, np.ndarray], cfg: ConvertConfig,
                 probe=None) -> None:
    """Low-rank branches on the plan's final codes (after sequential mode); `probe`
    (probe.Probe, carrying the plan's activation QDQ) lets the branch planner measure layers on
    the network's output."""
    total = sum(t.params for t in targets)
    plan.branch_summary = plan_branches(plan.layers, weights, cfg, total, probe)
    for lp in plan.layers:
        if lp.branch is not None:
            _account_branch(lp, weights[lp.target.node])


def _account_branch(lp: LayerPlan, w: np.ndarray) -> None:
    """SQNR estimate once the branch adds B·A to the effective weight (a centred branch adds
    nothing to the mean, so the corrected bias stands)."""
    t, br = lp.target, lp.branch
    target = lp.fit_target if lp.fit_target is not None else to_matrix(w, t.weight_layout).astype(np.float64)
    w_eff = coded_matrix(lp) + br.b @ br.a
    lp.sqnr_branch_db = weighted_sqnr(target, w_eff, lp.fit_hessian, 1)
