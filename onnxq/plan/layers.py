"""Turns targets + statistics into a Plan: weight codes and scales, corrected biases, and
activation QDQ parameters. Pure numpy; the graph is edited later by graph/rewrite.py."""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from ..algos.bias import mean_shift_bias
from ..algos.matrix import AXIS, dequantize_rows, from_matrix, to_matrix
from ..algos.metrics import sqnr_db
from ..algos.qmath import stored_bits
from ..algos.weights import blocked, mse, quantize_weight, regularized_hessian, weighted_error
from ..config import ConvertConfig
from ..types import ActQuant, ActStats, LayerPlan, LayerStats, PairedStats, Plan, Progress, Target, half_scales
from .rules import float_input
from .acts import plan_acts
from .hot import add_hot, hot_rows, with_hot

# ridge added to Hq when solving for the compensated weight, a fraction of mean(diag Hq): an
# input that is dead on the calibration data gets a zero column instead of an ill-posed one
COMPENSATION_RIDGE = 1e-4


def weighted_sqnr(wm, w_hat, h, groups) -> float:
    noise = weighted_error(wm, w_hat, h, groups)
    signal = weighted_error(wm, np.zeros_like(wm), h, groups)
    if noise <= 0:
        return float("inf")
    return float(10 * np.log10(max(signal, 1e-30) / noise))


def _bias_corrects(t: Target, wm: np.ndarray, bias: np.ndarray | None, cfg: ConvertConfig) -> bool:
    """Whether the layer's bias will cancel its mean output shift (corrected_bias,
    plan_compensated): the one test of that, so the fit objective and the correction agree."""
    return (cfg.bias_correction and t.op in ("Conv", "Gemm") and not t.fixed_bias
            and (bias is None or bias.shape == (wm.shape[0],)))


def input_covariance(ls: LayerStats) -> np.ndarray:
    """E[(x - mu)(x - mu)^T] [G, K, K] from E[x x^T] and mu = E[x].

    When the bias is corrected afterwards, the weight error's effect on the output mean, E·mu,
    is cancelled, so what is left to minimise is tr(E Cov E^T), not tr(E H E^T): the rounding,
    its clipping and the low-rank branches all fit the covariance. After ReLU-like activations
    the mean direction dominates H, and fitting H spends the error budget on it
    (docs/experiments/weights.md, "Rounding on the input covariance")."""
    return _about_means(ls.hessian, ls.mean)


def _about_means(second: np.ndarray, mean_a: np.ndarray, mean_b: np.ndarray | None = None) -> np.ndarray:
    """E[a b^T] - E[a] E[b]^T [G, K, K] from the raw moment; without `mean_b`, b is a and the
    result is symmetrized."""
    if mean_b is not None:
        return second - np.einsum("gi,gj->gij", mean_a, mean_b)
    out = second - np.einsum("gi,gj->gij", mean_a, mean_a)
    return 0.5 * (out + np.swapaxes(out, -1, -2))


def tap_moments(t: Target, ls: LayerStats) -> LayerStats:
    """A ConvTranspose's input statistics, collected per input pixel [1, C, C], spread over its
    kernel taps to match its weight matrix [O, C*T]: each pixel meets every tap once and
    different taps land on different outputs, so H = H_pixel (x) I_T. Exact when the stride is
    at least the kernel (no overlap, as in the usual 2x2 stride-2 upsampler); with overlapping
    taps the cross terms between neighbouring pixels are left out."""
    eye = np.eye(kernel_taps(t))
    return LayerStats(None if ls.hessian is None else np.stack([np.kron(h, eye) for h in ls.hessian]),
                      np.repeat(ls.mean, eye.shape[0], axis=-1), ls.rows)


def _quantize(method: str, wm: np.ndarray, bits: int, h: np.ndarray | None, groups: int, damp: float,
              block: int = 0, taps: int = 0, affine: bool = False):
    """quantize_weight, falling back to the statistics-free method when the statistics cannot be
    factorised (degenerate layers: every input dead or enormous)."""
    if h is not None and not np.all(np.isfinite(h)):
        h = None
    try:
        return quantize_weight(method, wm, bits, h, groups, damp=damp, block=block, taps=taps, affine=affine)
    except np.linalg.LinAlgError:
        q = quantize_weight("mse", wm, bits, None, groups, block=block, taps=taps, affine=affine)
        return dataclasses.replace(q, method="mse (input statistics unusable)")


# blocked weights: the stored tensor's axis that runs along K (the DQ's block axis): a Gemm/MatMul's
# K, a conv's input channels
BLOCK_AXIS = {"cols": 0, "rows": 1, "conv": 1}


def weight_block(t: Target, bits: int, cfg: ConvertConfig) -> int:
    """Scales per block of cfg.block values along K for a 2- to 4-bit layer where the target's
    rules allow blocked weights and a row holds more than one block; else 0 (per channel).
    Gemm/MatMul: blocks of K. An ungrouped Conv (rules.blocked_convs): blocks of its input
    channels at each kernel tap. 8-bit layers only under cfg.block_8bit, and only those that read
    a float input (weight-only kernels: a blocked grid there changes no integer kernel), in blocks
    of cfg.block8 where it is settled."""
    if not cfg.block or (bits > 4 and not (cfg.block_8bit and float_input(cfg.rules, t, bits))):
        return 0
    size = cfg.block8 if bits > 4 and cfg.block8 else cfg.block
    if t.op == "Conv":
        c = t.shape[1]
        ok = cfg.rules.blocked_convs and t.groups == 1 and c % cfg.block == 0 and c * kernel_taps(t) > cfg.block
        return cfg.block if ok else 0
    k = t.shape[0] if t.weight_layout == "cols" else t.shape[-1]
    if (t.op not in ("Gemm", "MatMul") or t.weight_layout not in BLOCK_AXIS or not cfg.rules.blocked_weights
            or k % size or k <= size):
        return 0
    return size


def block_zero_points(block: int, bits: int, cfg: ConvertConfig) -> bool:
    """Whether a blocked layer's grids are affine, one zero point per block (--zero-points, where
    the target's runtime takes them); 2 to 4 bits only: the codes and zero points are held in
    int8 (a blocked 8-bit grid is symmetric, at 32 values a block the affine one gains little)."""
    return bool(block) and bits <= 4 and cfg.zero_points and cfg.rules.zero_points


def kernel_taps(t: Target) -> int:
    """Kernel positions of a conv's or transposed conv's weight [.., .., *kernel] (1 for 1x1)."""
    return int(np.prod(t.shape[2:]))


def per_channel_bytes(lp: LayerPlan, bits: int | None = None) -> float:
    """What the layer's weights would take at `bits` (default: its own) with one float32 scale
    per output channel."""
    return stored_bits(lp.target.params, bits or lp.bits, lp.target.shape[AXIS[lp.target.weight_layout]]) / 8


def weight_bytes(lp: LayerPlan) -> float:
    """What the layer's codes, scales and zero points take in the file (a table's hot rows aside:
    plan/hot.hot_bytes)."""
    return stored_bits(lp.target.params, lp.bits, lp.scales.size, 16 if lp.half_scales else 32,
                       lp.zero_points is not None) / 8


def block_suffix(block: int, affine: bool = False) -> str:
    """What the report adds to a blocked layer's method."""
    return f" (blocks of {block}{', zero points' if affine else ''})" if block else ""


TABLE_BLOCK = 32   # embedding tables at <= 4 bits: one scale per 32 values of a row
# 8-bit table rows: clipping more than a fifth of a row's range never pays at that step size
# (the best ratio on every row of MiniLM-L6's tables was >= 0.98), and the grid below it is most
# of an 8-bit conversion's time on a 30k-row vocabulary
TABLE_CLIP_FLOOR_8BIT = 0.8


def plan_table(t: Target, w: np.ndarray, cfg: ConvertConfig, bits: int | None = None,
               reads: np.ndarray | None = None) -> LayerPlan:
    """An embedding table, weight-only: one scale per row at 8 bits (per block under
    cfg.block_8bit); at 4 bits and below one per block of TABLE_BLOCK values of a row, as a whole
    row is too coarse a grid there (a 3-layer MiniLM's retrieval agreement: 0.777 with 4-bit
    per-row tables, the rest at 8 bits), each block on its own affine grid where the target takes
    zero points (all-MiniLM-L6-v2's word table: 20.8 -> 22.2 dB, docs/results.md round 34).
    `bits`: given (a hot-row residual's), else the table's by cfg; `reads`: how often calibration
    read each row, for the hot rows (plan/hot.py)."""
    bits, note = (bits, "") if bits is not None else cfg.bits_for(t.node, False)
    v, d = w.shape
    block = TABLE_BLOCK if (bits <= 4 or cfg.block_8bit) and d % TABLE_BLOCK == 0 and d > TABLE_BLOCK else 0
    wm = w.astype(np.float64)
    floor = TABLE_CLIP_FLOOR_8BIT if bits >= 8 else 0.0
    affine = block_zero_points(block, bits, cfg)
    wq = blocked("mse", wm, bits, None, block, floor=floor, affine=affine) if block else mse(wm, bits, None, floor)
    codes, scales = wq.codes, stored_scales(wq.scales, t, block, bits)
    zeros = None if wq.zero_points is None else wq.zero_points.astype(np.int8)
    plan = LayerPlan(target=t, bits=bits, method=wq.method + block_suffix(block, zeros is not None),
                     codes=codes.astype(np.int8), scales=scales, axis=1 if block else 0, bias=None,
                     note=note, block=block, zero_points=zeros)
    plan.sqnr_db = sqnr_db(w, dequantize_rows(codes, scales))
    return with_hot(plan, hot_rows(plan, w, reads, cfg, plan_table))


def coded_matrix(lp: LayerPlan) -> np.ndarray:
    """The matrix [O, K] the layer's codes and scales stand for (per channel or blocked; a table's
    hot rows with their residuals)."""
    return add_hot(lp, dequantize_rows(to_matrix(lp.codes, lp.target.weight_layout), lp.scales))


def dequantized(lp: LayerPlan) -> tuple[np.ndarray, np.ndarray | None]:
    """(the weight the layer's codes and scales stand for, float32 in its original layout; its bias):
    what the network probes feed for a planned layer."""
    t = lp.target
    w = from_matrix(coded_matrix(lp), t.weight_layout, t.shape)
    return w.astype(np.float32), lp.bias


def plan_layer(t: Target, w: np.ndarray, bias: np.ndarray | None, ls: LayerStats | None,
               cfg: ConvertConfig, float_mean: np.ndarray | None = None) -> LayerPlan:
    """Quantize one layer. `ls` holds the statistics of the input the layer will receive;
    `float_mean` is E[x] in the FP32 model when that differs (sequential mode)."""
    if t.op == "Gather":
        return plan_table(t, w, cfg, reads=None if ls is None else ls.reads)
    if ls is not None and t.op == "ConvTranspose":
        ls = tap_moments(t, ls)
    bits, note = cfg.bits_for(t.node, t.depthwise)
    method = cfg.weight_method_for(bits, t.op)
    wm = to_matrix(w, t.weight_layout).astype(np.float64, order="C")     # [O, K]
    groups = t.row_groups
    h = None
    if ls is not None and ls.hessian is not None:
        fit = input_covariance(ls) if _bias_corrects(t, wm, bias, cfg) else ls.hessian
        h = regularized_hessian(fit, ls.rows)
    wq, block, taps, affine = _code(t, wm, bits, h, cfg, method)
    w_hat = dequantize_rows(wq.codes, wq.scales)
    plan = LayerPlan(target=t, bits=bits, bias=None, note=note, source_bias=bias,
                     **_coded_fields(t, wq, block, taps))
    if ls is not None:
        plan.input_mean = ls.mean
    if h is not None:
        plan.fit_hessian = h
        plan.sqnr_db = weighted_sqnr(wm, w_hat, h, groups)
        plan.sqnr_rtn_db = _rtn_sqnr(wm, bits, h, groups, block, taps, affine)
    else:
        plan.sqnr_db = sqnr_db(wm, w_hat)
    plan.bias = corrected_bias(t, wm, w_hat, bias, ls, cfg, float_mean)
    return plan


def plan_once(memo: dict, t: Target, w: np.ndarray, bias: np.ndarray | None, ls: LayerStats | None,
              cfg: ConvertConfig) -> LayerPlan:
    """plan_layer, with the weight of readers that pool their statistics (LayerStats.pooled: an
    unrolled loop's steps, a layer applied twice) coded once on all their inputs; each reader
    then gets those codes with its own corrected bias. `memo` lives for one planning of all layers."""
    if ls is None or ls.pooled is None or t.op == "Gather":
        return plan_layer(t, w, bias, ls, cfg)
    key = (t.weight_terms, id(ls.pooled), cfg.bits_for(t.node, t.depthwise))
    if key not in memo:
        memo[key] = plan_layer(t, w, bias, ls.pooled, cfg)
    done = memo[key]
    wm = to_matrix(w, t.weight_layout).astype(np.float64, order="C")
    _, b = recoded_bias(t, wm, done, bias, ls, cfg)
    return dataclasses.replace(done, target=t, source_bias=bias, input_mean=ls.mean, bias=b)


def recoded_bias(t: Target, wm: np.ndarray, coded: LayerPlan, bias: np.ndarray | None, ls: LayerStats | None,
                 cfg: ConvertConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """The weight `coded`'s codes and scales stand for (as a matrix) and the bias of layer `t`
    (float weight `wm`, bias `bias`) corrected for them: a reader adopting codes made elsewhere."""
    w_hat = dequantize_rows(to_matrix(coded.codes, t.weight_layout), coded.scales)
    return w_hat, corrected_bias(t, wm, w_hat, bias, ls, cfg)


def _rtn_sqnr(wm: np.ndarray, bits: int, h: np.ndarray, groups: int, block: int, taps: int, affine: bool) -> float:
    """What plain rounding on the same grid would read (the report's baseline for the layer)."""
    r = quantize_weight("rtn", wm, bits, None, groups, block=block, taps=taps, affine=affine)
    return weighted_sqnr(wm, dequantize_rows(r.codes, r.scales), h, groups)


def _code(t: Target, wm: np.ndarray, bits: int, h: np.ndarray | None, cfg: ConvertConfig, method: str,
          block: int | None = None):
    """A layer's codes and scales on its grid (blocks, taps, zero points as cfg and its target
    allow; `block`, the blocks a plan already settled, e.g. none where --protect's budget bought
    more elsewhere), scales rounded to what the file stores. -> (WeightQuant, block, taps, affine)."""
    block = weight_block(t, bits, cfg) if block is None else block
    taps = kernel_taps(t) if block and t.op == "Conv" else 0
    affine = block_zero_points(block, bits, cfg)
    wq = _quantize(method, wm, bits, h, t.row_groups, cfg.damp, block, taps, affine)
    wq = dataclasses.replace(wq, scales=stored_scales(wq.scales, t, block, bits))
    return wq, block, taps, affine


def stored_scales(scales: np.ndarray, t: Target, block: int, bits: int) -> np.ndarray:
    """`scales` rounded to what the file stores: float16 where types.half_scales says so (2^-11
    relative), else as they are."""
    return scales.astype(np.float16).astype(np.float64) if half_scales(t, block, bits) else scales


def _coded_fields(t: Target, wq, block: int, taps: int) -> dict:
    """The LayerPlan fields of a coded weight: codes in the weight's layout, scales (and zero
    points) shaped as its DequantizeLinear reads them."""
    per_tap = lambda a: a.reshape(a.shape[:2] + t.shape[2:]) if taps and a is not None else a   # noqa: E731
    return dict(method=wq.method + block_suffix(block, wq.zero_points is not None), block=block,
                codes=from_matrix(wq.codes, t.weight_layout, t.shape).astype(np.int8), scales=per_tap(wq.scales),
                axis=BLOCK_AXIS[t.weight_layout] if block else AXIS[t.weight_layout],
                zero_points=None if wq.zero_points is None else per_tap(wq.zero_points).astype(np.int8))


def recoded(lp: LayerPlan, w: np.ndarray, h: np.ndarray, cfg: ConvertConfig) -> LayerPlan:
    """`lp` with its weight W [O, K] coded again on H [G, K, K] at its bits and on its grid (a
    shared weight on its readers' summed objective)."""
    t = lp.target
    wq, block, taps, _ = _code(t, w, lp.bits, h, cfg, cfg.weight_method_for(lp.bits, t.op), lp.block)
    return dataclasses.replace(lp, **_coded_fields(t, wq, block, taps))


def plan_compensated(t: Target, w: np.ndarray, bias: np.ndarray | None, ps: PairedStats,
                     cfg: ConvertConfig, bits: int | None = None, note: str | None = None,
                     block: int | None = None) -> LayerPlan:
    """Quantize a layer so that its output on the input it really receives, x^, matches the FP32
    layer on the FP32 input x: V = W C Hq^-1 (least squares, C = E[x x^'], Hq = E[x^ x^']) is
    the best float weight for x^, then V is coded on Hq on the layer's grid (blocks, zero points
    as plan_layer would, or `block`) at `bits` (default: cfg's for the layer); the bias takes the mean
    difference. When the bias is corrected, C and Hq are taken about the means (covariances), as
    in plan_layer: the bias cancels what the means would add."""
    own_bits, own_note = cfg.bits_for(t.node, t.depthwise)
    bits, note = bits or own_bits, own_note if note is None else note
    wm = to_matrix(w, t.weight_layout).astype(np.float64, order="C")     # [O, K]
    centred = _bias_corrects(t, wm, bias, cfg)
    hq, cross = _paired_moments(ps, centred)
    share = _held_out_share(wm, ps, centred, t.row_groups)
    v = wm + share * (_compensated_weight(wm, hq, cross, t.row_groups) - wm)
    wq, block, taps, affine = _code(t, v, bits, hq, cfg, cfg.weight_method_for(bits, t.op), block)
    w_hat = dequantize_rows(wq.codes, wq.scales)
    plan = LayerPlan(target=t, bits=bits, bias=None, note=note, source_bias=bias,
                     **_coded_fields(t, wq, block, taps))
    plan.method += f"+compensated ({share:.0%})"
    plan.sqnr_db = weighted_sqnr(v, w_hat, hq, t.row_groups)
    plan.sqnr_rtn_db = _rtn_sqnr(v, bits, hq, t.row_groups, block, taps, affine)
    plan.fit_target, plan.fit_hessian, plan.input_mean = v, hq, ps.quant.mean
    if centred:
        plan.bias = mean_shift_bias(bias, w_hat, ps.quant.mean, wm, ps.fp_mean)
    return plan


def _paired_moments(ps: PairedStats, centred: bool, shrink: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(Hq, C) of the compensation: about the means when the bias takes the mean difference;
    with `shrink`, both shrunk toward their diagonals alike (x^ = x still gives V = W)."""
    hq, cross = ps.quant.hessian, ps.cross
    if centred:
        hq = _about_means(hq, ps.quant.mean)
        cross = _about_means(cross, ps.fp_mean, ps.quant.mean)
    if shrink:
        hq, cross = regularized_hessian(hq, ps.quant.rows), regularized_hessian(cross, ps.quant.rows)
    return hq, cross


def _held_out_share(wm: np.ndarray, ps: PairedStats, centred: bool, groups: int) -> float:
    """The share of the compensation D = V - W to apply: D fitted on one half of the samples, the
    output error E||W x - (W + g D) x^||^2 on the other half is least at
    g = (tr(W C D') - tr(W Hq D')) / tr(D Hq D'); both ways summed, clipped to [0, 1]. Where the
    upstream error is mostly noise the fit finds spurious correlations and g goes to 0
    (docs/experiments/weights.md, "Sequential mode"). Without halves, all of it."""
    if ps.halves is None:
        return 1.0
    num = den = 0.0
    w3 = wm.reshape(groups, -1, wm.shape[1])
    for fit, check in (ps.halves, ps.halves[::-1]):
        hq, cross = _paired_moments(fit, centred)
        d = (_compensated_weight(wm, hq, cross, groups) - wm).reshape(w3.shape)
        hq, cross = _paired_moments(check, centred, shrink=False)
        num += float(np.sum((w3 @ cross - w3 @ hq) * d))
        den += float(np.sum((d @ hq) * d))
    return float(np.clip(num / den, 0.0, 1.0)) if den > 0 else 0.0


def _compensated_weight(wm: np.ndarray, hq: np.ndarray, cross: np.ndarray, groups: int) -> np.ndarray:
    """V = W C Hq^-1 per row group, with a small ridge on Hq."""
    k, rows = hq.shape[-1], wm.shape[0] // groups
    ridge = COMPENSATION_RIDGE * np.maximum(np.einsum("gkk->g", hq) / k, 1e-12)
    return np.concatenate([np.linalg.solve(hq[g] + ridge[g] * np.eye(k),
                                           cross[g].T @ wm[g * rows:(g + 1) * rows].T).T
                           for g in range(groups)])


def corrected_bias(t: Target, wm: np.ndarray, w_eff: np.ndarray, bias: np.ndarray | None,
                   ls: LayerStats | None, cfg: ConvertConfig,
                   float_mean: np.ndarray | None = None) -> np.ndarray | None:
    """Bias that cancels the mean output shift E[w_eff x~] - E[W x] per channel, or None
    (x~ the input the quantized layer receives, x the FP32 one; the same in one-pass mode)."""
    if ls is None or not _bias_corrects(t, wm, bias, cfg):
        return None
    return mean_shift_bias(bias, w_eff, ls.mean, wm, float_mean if float_mean is not None else ls.mean)


def make_plan(targets: Sequence[Target], weights: Mapping[str, np.ndarray],
              biases: Mapping[str, np.ndarray | None], stats_layers: Mapping[str, LayerStats],
              acts: Mapping[str, ActStats], cfg: ConvertConfig,
              progress: Progress | None = None, layers: list[LayerPlan] | None = None,
              act_plan: Mapping[str, ActQuant] | None = None,
              planned: Mapping[str, LayerPlan] | None = None) -> Plan:
    """The whole plan but the branches (add_branches); `layers` may hold layers already planned;
    `act_plan`, the activation parameters when the caller has already planned them from `acts`;
    `planned`, layers the mixed-precision search already planned at the bits the config now gives them."""
    plan = Plan(acts=dict(act_plan) if act_plan is not None else plan_acts(acts, cfg))
    if layers is not None:
        plan.layers = list(layers)
    else:
        memo: dict = {}
        for i, t in enumerate(targets):
            bits, note = cfg.bits_for(t.node, t.depthwise)
            done = (planned or {}).get(t.node)
            plan.layers.append(dataclasses.replace(done, note=note) if done is not None and done.bits == bits
                               else plan_once(memo, t, weights[t.node], biases.get(t.node), stats_layers.get(t.node),
                                              cfg))
            if progress:
                progress("quantize", i + 1, len(targets))
    return plan
