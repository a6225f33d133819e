"""Second-order rounding of a grouped layer (a depthwise conv: one output channel and nine
weights per group) for all its groups at once: the same steps as weights.gptq on each group
(factorisation of its H, column-by-column rounding from a few starting scales around the
clipping weights._grid_search chose on the group's objective, per row the best start kept), as
array operations over the groups. One
EfficientNet layer has hundreds of groups, and a Python loop of tiny problems spent most of
mixed precision's time there."""

from __future__ import annotations

import numpy as np

from .qmath import weight_qmax
from .rounding import _inverse_cholesky

MAX_K = 128          # one rounding block: wider groups take the per-group path


def group_objective(e: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Each row's e H e^T per group. e [G, r, K], h [G, K, K] -> [G, r]."""
    return np.einsum("grk,grk->gr", np.matmul(e, h), e)


def _factor(hp: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factors of each damped inverse (rounding._inverse_cholesky per group),
    all at once; groups whose factorisation fails take the per-group retries."""
    k = hp.shape[-1]
    mean_diag = np.ascontiguousarray(np.einsum("gkk->gk", hp)).mean(axis=1)
    mean_diag = np.where(mean_diag != 0, mean_diag, 1.0)
    try:
        lower = np.linalg.cholesky(hp + (damp * mean_diag)[:, None, None] * np.eye(k))
        inv = np.linalg.solve(lower, np.broadcast_to(np.eye(k), hp.shape))
        return np.swapaxes(np.linalg.cholesky(np.swapaxes(inv, 1, 2) @ inv), 1, 2)
    except np.linalg.LinAlgError:
        return np.stack([_inverse_cholesky(x, damp) for x in hp])


def gptq_groups(wg: np.ndarray, bits: int, h: np.ndarray, base: np.ndarray, starts,
                damp: float) -> tuple[np.ndarray, np.ndarray]:
    """Codes [G, r, K] (int32) and scales [G, r] of the groups' weights wg [G, r, K] (float64)
    with H [G, K, K], rounded from the clipped scales `base` [G, r] times each of `starts`."""
    k = wg.shape[-1]
    diag = np.einsum("gkk->gk", h).copy()
    dead = diag <= 0
    hd = h.copy()
    hd[:, np.arange(k), np.arange(k)] = np.where(dead, 1.0, diag)
    perm = np.argsort(-np.where(dead, 1.0, diag), axis=1, kind="stable")
    hp = np.take_along_axis(np.take_along_axis(hd, perm[:, :, None], 1), perm[:, None, :], 2)
    u = _factor(hp, damp)
    moved = np.take_along_axis(wg, perm[:, None, :], 2)
    qm = weight_qmax(bits)
    codes, scales = np.zeros(wg.shape, np.int32), base.copy()
    best = np.full(base.shape, np.inf)
    for f in starts:
        s = base * f
        x = moved.copy()
        c = np.zeros(wg.shape)
        for j in range(k):
            q = np.clip(np.rint(x[:, :, j] / s), -qm, qm)
            c[:, :, j] = q
            err = (x[:, :, j] - q * s) / u[:, j, j][:, None]
            x[:, :, j:] -= err[:, :, None] * u[:, None, j, j:]
        back = np.empty_like(c)
        np.put_along_axis(back, np.broadcast_to(perm[:, None, :], c.shape), c, axis=2)
        loss = group_objective(wg - back * s[..., None], h)
        better = loss < best
        codes[better], scales[better], best[better] = back[better], s[better], loss[better]
    return codes, scales
