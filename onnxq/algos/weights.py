"""Per-channel weight quantizers. Every method maps W [O, K] (+ optional input statistics) to
integer codes [O, K] and scales [O]; the rewriter turns them into initializers.

`rtn`  round-to-nearest with min-max scales.
`mse`  per-channel clipping chosen from a grid to minimise the weight MSE.
`gptq` clipping chosen on the layer's own objective tr(E H E^T), then second-order rounding
       (see rounding.py) from a few scales around it, per row the best on the objective kept.
       Needs H; without it the layer falls back to `mse`. (Refitting each row's scale to its
       codes in closed form lowers the objective further but is worse end to end:
       docs/experiments/weights.md.)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np

from .grouped import MAX_K, gptq_groups, group_objective
from .qmath import affine_params, channel_scales, quantize, scales_of_amax, weight_qmax
from .rounding import DEFAULT_DAMP, gptq_round, prepare_hessian

CLIP_GRID = np.linspace(0.30, 1.0, 36)
# multiples of the round-to-nearest-optimal scale that second-order rounding starts from: its
# error compensation changes which clipping is best, and rows are independent, so each row keeps
# the start that ends lowest on the objective
GPTQ_SCALE_STARTS = (1.0, 0.9, 1.1)


@dataclass(frozen=True)
class WeightQuant:
    codes: np.ndarray   # [O, K] int32
    scales: np.ndarray  # [O] float64, [O, K / block] for blocked scales, [O, C / block, taps] for a conv's
    method: str         # the method actually used (after any fallback)
    zero_points: np.ndarray | None = None   # an affine grid's, shaped as scales (codes are relative to them)


def _codes(w: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    qm = weight_qmax(bits)
    return quantize(w, scales[:, None], 0, -qm, qm)


def rtn(w: np.ndarray, bits: int, hessian: np.ndarray | None = None) -> WeightQuant:
    s = channel_scales(w, bits)
    return WeightQuant(_codes(w, s, bits), s, "rtn")


def _grid_error(w: np.ndarray, s: np.ndarray, qm: int) -> np.ndarray:
    """w - codes * s, computed in place on one buffer (the codes are exact in float64)."""
    err = np.divide(w, s[..., None], dtype=np.float64)
    np.rint(err, out=err)
    np.clip(err, -qm, qm, out=err)
    np.multiply(err, s[..., None], out=err)
    return np.subtract(w, err, out=err)


def _grid_search(w: np.ndarray, bits: int, loss: Callable[[np.ndarray], np.ndarray],
                 floor: float = 0.0, bound: "np.ndarray | float | None" = None) -> np.ndarray:
    """Per-row best clip ratio from CLIP_GRID (its ratios >= floor) under `loss(err [..., O, K]) -> [..., O]`.
    -> scales [..., O] (leading dims: groups done at once).

    `bound`: a factor b (one for all rows, or per row in any shape that broadcasts to theirs)
    with loss(e) >= b * sum(e^2) for every error (1 for a plain sum of squares; the smallest
    eigenvalue of a row's H for e H e^T). Ratio r
    clips a row's largest weight by (1 - r) max|w|, so its loss is at least b (1 - r)^2 max|w|^2;
    ratios where this exceeds every row's loss at r = 1 cannot be chosen and are skipped (the
    result is the same; at 8 bits most of the grid goes)."""
    amax = np.abs(w).max(axis=-1)
    best_loss = np.full(amax.shape, np.inf)
    best = scales_of_amax(amax, bits)
    qm = weight_qmax(bits)
    ratios = CLIP_GRID[CLIP_GRID >= floor - 1e-9]
    at_one = None                                        # the loss at r = 1, when computed first
    if bound is not None and ratios[-1] == 1.0:
        at_one = loss(_grid_error(w, scales_of_amax(amax, bits, 1.0), qm))
        factor = np.broadcast_to(np.asarray(bound, dtype=np.float64), amax.shape).reshape(1, -1)
        lower = factor * ((1.0 - ratios)[:, None] * amax.reshape(1, -1)) ** 2      # [ratios, rows]
        beaten = (lower > at_one.reshape(1, -1) * (1 + 1e-6)) | (amax.reshape(1, -1) == 0)
        ratios = ratios[~np.all(beaten, axis=1)]          # an all-zero row takes scale 1 at every ratio
    for r in ratios:
        s = scales_of_amax(amax, bits, r)
        l = at_one if at_one is not None and r == 1.0 else loss(_grid_error(w, s, qm))
        better = l < best_loss
        best_loss = np.where(better, l, best_loss)
        best = np.where(better, s, best)
    return best


def _affine_search(w: np.ndarray, bits: int, loss: Callable[[np.ndarray], np.ndarray],
                   grid: np.ndarray = CLIP_GRID) -> tuple[np.ndarray, np.ndarray]:
    """Per-row best affine grid (both ends of [min, max] shrunk by one ratio from `grid`) under
    `loss(err [..., O, K]) -> [..., O]`. -> (scales, zero points) [..., O]."""
    lo, hi = w.min(axis=-1), w.max(axis=-1)
    best_loss = np.full(lo.shape, np.inf)
    best_s, best_z = affine_params(lo, hi, bits)
    for r in grid:
        s, z = affine_params(lo * r, hi * r, bits)
        err = w - affine_codes(w, s, z, bits) * s[..., None]
        l = loss(err)
        better = l < best_loss
        best_loss = np.where(better, l, best_loss)
        best_s, best_z = np.where(better, s, best_s), np.where(better, z, best_z)
    return best_s, best_z


def affine_codes(w: np.ndarray, s: np.ndarray, z: np.ndarray, bits: int) -> np.ndarray:
    """Codes of w [..., O, K] relative to the zero points: clip(rint(w / s), -z, 2^b - 1 - z)."""
    return np.clip(np.rint(w / s[..., None]), -z[..., None], (2**bits - 1) - z[..., None])


# weights `mse` searches at once: rows are independent, and a 2 MB float64 buffer stays in cache
# (a 4096 x 16384 layer searched whole held 0.5 GB buffers)
MSE_ROWS = 1 << 18


def mse(w: np.ndarray, bits: int, hessian: np.ndarray | None = None, floor: float = 0.0) -> WeightQuant:
    step = max(1, MSE_ROWS // max(1, w.shape[1]))
    sse = lambda e: np.einsum("ok,ok->o", e, e)   # noqa: E731
    s = np.concatenate([_grid_search(np.ascontiguousarray(w[i:i + step]), bits, sse, floor, bound=1.0)
                        for i in range(0, w.shape[0], step)])
    return WeightQuant(_codes(w, s, bits), s, "mse")


def hessian_scales(w: np.ndarray, bits: int, hessian: np.ndarray) -> np.ndarray:
    """Scales minimising each row's tr(e H e^T). w [O, K], hessian [K, K]."""
    h = hessian.astype(np.float64)
    return _grid_search(w, bits, lambda e: np.einsum("ok,ok->o", e @ h, e))


def row_errors(e: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Each row's e_o H e_o^T. e [O, K], h [K, K] -> [O]."""
    return np.einsum("ok,ok->o", e @ h, e)


def gptq(w: np.ndarray, bits: int, hessian: np.ndarray | None = None,
         damp: float = DEFAULT_DAMP) -> WeightQuant:
    if hessian is None:
        q = mse(w, bits)
        return WeightQuant(q.codes, q.scales, "mse (no input statistics)")
    h = hessian.astype(np.float64)
    base = hessian_scales(w, bits, h)
    best_err = np.full(w.shape[0], np.inf)
    codes, scales = np.zeros(w.shape, dtype=np.int32), base.copy()
    prepared = prepare_hessian(h, damp)            # H's factorisation, shared by the starts
    for f in GPTQ_SCALE_STARTS:
        s = base * f
        c = gptq_round(w, s, bits, h, damp=damp, prepared=prepared)
        err = row_errors(w - c * s[:, None], h)
        better = err < best_err
        codes[better], scales[better], best_err[better] = c[better], s[better], err[better]
    return WeightQuant(codes, scales, "gptq")


WEIGHT_METHODS: dict[str, Callable[..., WeightQuant]] = {"rtn": rtn, "mse": mse, "gptq": gptq}


def blocked(method: str, w: np.ndarray, bits: int, hessian: np.ndarray | None, block: int,
            damp: float = DEFAULT_DAMP, affine: bool = False, floor: float = 0.0) -> WeightQuant:
    """One scale per run of `block` consecutive columns of W [O, K] (K a multiple of block):
    scales [O, K / block]. gptq: each block's clipping on its own part of the objective (H's
    diagonal block), then second-order rounding over the whole row with those scales fixed;
    the other methods: each block quantized as a row of its own. `affine`: each block's grid
    spans its own [min, max] with a zero point (zero_points [O, K / block]). `floor`: the least
    clipping ratio mse searches (mse)."""
    o, k = w.shape
    nb = k // block
    if method != "gptq" or hessian is None:
        if affine:
            return _affine_rows(method, w, bits, block)
        rows = w.reshape(o * nb, block)
        q = rtn(rows, bits) if method == "rtn" else mse(rows, bits, None, floor)
        return WeightQuant(q.codes.reshape(o, k), q.scales.reshape(o, nb),
                           q.method + ("" if method != "gptq" else " (no input statistics)"))
    h = hessian.astype(np.float64)
    hb = np.stack([h[i:i + block, i:i + block] for i in range(0, k, block)])            # [nb, block, block]
    # each block's e_b H_b e_b^T: the products with H_b as one batched matmul, not inside einsum
    loss = lambda e: np.einsum("bol,obl->ob", np.matmul(e.transpose(1, 0, 2), hb), e)    # noqa: E731
    wb = w.reshape(o, nb, block)
    if affine:
        base, zeros = _affine_search(wb, bits, loss)
    else:       # e H_b e^T >= (H_b's smallest eigenvalue) |e|^2 lets the search skip hopeless ratios
        least = np.maximum(np.linalg.eigvalsh(hb)[:, 0], 0.0) * (1 - 1e-6)    # [nb], the same for every row
        base, zeros = _grid_search(wb, bits, loss, bound=least), None
    bounds = None
    if zeros is not None:                      # each code between its block's -z and 2^b - 1 - z
        bounds = (-np.repeat(zeros, block, axis=1), np.repeat(2**bits - 1 - zeros, block, axis=1))
    best_err = np.full(o, np.inf)
    codes, scales = np.zeros(w.shape, dtype=np.int32), base.copy()
    prepared = prepare_hessian(h, damp)
    for f in GPTQ_SCALE_STARTS:
        s = base * f
        full = np.repeat(s, block, axis=1)
        c = gptq_round(w, full, bits, h, damp=damp, prepared=prepared, bounds=bounds)
        err = row_errors(w - c * full, h)
        better = err < best_err
        codes[better], scales[better], best_err[better] = c[better], s[better], err[better]
    return WeightQuant(codes, scales, "gptq", zeros)


def _affine_rows(method: str, w: np.ndarray, bits: int, block: int) -> WeightQuant:
    """Blocks of `block` columns on affine grids without input statistics: min-max (rtn) or the
    clipping of least squared error."""
    o, k = w.shape
    rows = w.reshape(o * (k // block), block).astype(np.float64)
    s, z = _affine_search(rows, bits, lambda e: np.einsum("ok,ok->o", e, e),
                          CLIP_GRID[-1:] if method == "rtn" else CLIP_GRID)
    codes = affine_codes(rows, s, z, bits).astype(np.int32)
    name = "rtn" if method == "rtn" else "mse" + ("" if method != "gptq" else " (no input statistics)")
    return WeightQuant(codes.reshape(o, k), s.reshape(o, -1), name, z.reshape(o, -1))


def blocked_taps(method: str, w: np.ndarray, bits: int, hessian: np.ndarray | None, block: int, taps: int,
                 damp: float = DEFAULT_DAMP, affine: bool = False) -> WeightQuant:
    """A conv's W [O, C * taps] (columns channel-major, as im2col reads them) with one scale per
    run of `block` input channels at each kernel tap: what a DequantizeLinear blocked along the
    weight's input-channel axis stores. The columns are put tap-major so each block is a run of
    consecutive columns, quantized by `blocked`, and put back. -> scales [O, C / block, taps]."""
    o, k = w.shape
    c = k // taps
    perm = np.arange(k).reshape(c, taps).T.reshape(-1)            # tap-major position -> column
    h = None if hessian is None else hessian[np.ix_(perm, perm)]
    q = blocked(method, w[:, perm], bits, h, block, damp, affine)
    codes = np.empty_like(q.codes)
    codes[:, perm] = q.codes
    per_tap = lambda a: None if a is None else a.reshape(o, taps, c // block).transpose(0, 2, 1)   # noqa: E731
    return WeightQuant(codes, per_tap(q.scales), q.method, per_tap(q.zero_points))


def quantize_weight(method: str, w: np.ndarray, bits: int, hessians: np.ndarray | None,
                    groups: int = 1, damp: float = DEFAULT_DAMP, block: int = 0, taps: int = 0,
                    affine: bool = False) -> WeightQuant:
    """Apply `method` to W [O, K]; grouped layers pass hessians [G, K, K] and are done per group.
    `damp` is gptq's damping of H (the other methods have none). `block` > 0: blocked scales
    (ungrouped layers only); `taps` > 0: W is a conv's with that many kernel taps, blocked along
    its input channels at each tap (blocked_taps); `affine`: the blocks' grids take zero points."""
    if block:
        h = None if hessians is None else hessians[0]
        if taps:
            return blocked_taps(method, w, bits, h, block, taps, damp, affine)
        return blocked(method, w, bits, h, block, damp, affine)
    if method != "gptq" or hessians is None:      # rtn and mse treat every row alike, without H
        return WEIGHT_METHODS[method](w, bits, None)
    fn = partial(gptq, damp=damp)
    if groups > 1:
        hessians = layer_floor(hessians, damp)
    if groups > 1 and w.shape[1] <= MAX_K:      # all groups at once (algos/grouped.py)
        wg, h = w.reshape(groups, -1, w.shape[1]).astype(np.float64), np.asarray(hessians, np.float64)
        base = _grid_search(wg, bits, lambda e: group_objective(e, h))
        codes, scales = gptq_groups(wg, bits, h, base, GPTQ_SCALE_STARTS, damp)
        return WeightQuant(codes.reshape(w.shape), scales.reshape(-1), "gptq")
    rows = w.shape[0] // groups
    parts = [fn(w[g * rows:(g + 1) * rows], bits, hessians[g]) for g in range(groups)]
    return WeightQuant(np.concatenate([p.codes for p in parts]),
                       np.concatenate([p.scales for p in parts]), parts[0].method)


def layer_floor(h: np.ndarray, damp: float) -> np.ndarray:
    """Each group's H [G, K, K] plus damp x the layer's mean diagonal on its diagonal.

    A group's own damping is relative to its own H. A depthwise channel whose input is constant
    (or zero) on every calibration sample has an H of almost nothing but zero padding at the
    borders: its clipping and codes were then fitted to noise, and on held-out data where the
    channel comes alive its output error reached a quarter of its signal. Against the layer's
    scale such a group's H is nothing, so it is rounded as without data (nearest codes, the
    weight-error clipping); live groups see the same small ridge as an ungrouped layer's inputs."""
    diag = np.einsum("gkk->gk", h)
    floor = damp * float(np.mean(diag)) if np.all(np.isfinite(diag)) else 0.0
    if floor <= 0:
        return h
    out = np.array(h, dtype=np.float64, copy=True)
    idx = np.arange(h.shape[-1])
    out[:, idx, idx] += floor
    return out


def regularized_hessian(h: np.ndarray, rows: int) -> np.ndarray:
    """Shrink H [G, K, K] toward its diagonal by K / (K + rows).

    With few input rows (a conv over a short sequence, a small calibration set) H is
    rank-deficient, and second-order rounding would push error into directions the calibration
    data never excited but held-out data does. Shrinkage keeps those directions costed.
    """
    k = h.shape[-1]
    alpha = k / (k + max(rows, 1))
    diag = np.einsum("gkk->gk", h)
    out = (1.0 - alpha) * h
    idx = np.arange(k)
    out[:, idx, idx] += alpha * diag
    return out


def weighted_error(w: np.ndarray, w_hat: np.ndarray, hessians: np.ndarray, groups: int = 1) -> float:
    """sum_g tr(E_g H_g E_g^T) for E = w - w_hat, grouped like quantize_weight."""
    e = (w - w_hat).astype(np.float64)
    rows = w.shape[0] // groups
    return float(sum(np.einsum("ok,ok->", e[g * rows:(g + 1) * rows] @ hessians[g],
                               e[g * rows:(g + 1) * rows]) for g in range(groups)))
