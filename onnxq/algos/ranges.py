"""Activation range methods over a streamed histogram.

Each method maps (counts [B], edges [B+1], bits, signed) to a clipping interval (lo, hi).
The histogram is of the raw values (not magnitudes); a range always contains 0.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .qmath import act_params, act_qrange


def _span(counts: np.ndarray, edges: np.ndarray) -> tuple[float, float]:
    nz = np.nonzero(counts)[0]
    if nz.size == 0:
        return 0.0, 0.0
    return float(edges[nz[0]]), float(edges[nz[-1] + 1])


def minmax(counts, edges, bits, signed, *, observed=None) -> tuple[float, float]:
    """The observed extremes (exact when `observed` min/max are passed)."""
    if observed is not None:
        return observed
    return _span(counts, edges)


def percentile(counts, edges, bits, signed, *, observed=None, pct: float = 99.99) -> tuple[float, float]:
    """Clip the (100 - pct)% tail on each side."""
    total = counts.sum()
    if total == 0:
        return 0.0, 0.0
    cdf = np.cumsum(counts) / total
    tail = (100.0 - pct) / 100.0
    lo_i = int(np.searchsorted(cdf, tail, side="left"))
    hi_i = int(np.searchsorted(cdf, 1.0 - tail, side="left"))
    lo, hi = float(edges[lo_i]), float(edges[min(hi_i + 1, len(edges) - 1)])
    if observed is not None:
        lo, hi = max(lo, observed[0]), min(hi, observed[1])
    return lo, hi


def _expected_error(centers, counts, lo, hi, bits, signed, p: float) -> float:
    scale, zp = act_params(lo, hi, bits, signed)
    qmin, qmax = act_qrange(bits, signed)
    q = np.clip(np.rint(centers / scale) + zp, qmin, qmax)
    return float(np.sum(counts * np.abs(centers - (q - zp) * scale) ** p))


def lp(counts, edges, bits, signed, *, observed=None, p: float = 2.0,
       grid: int = 100) -> tuple[float, float]:
    """Shrink the observed interval by a common ratio to minimise E|Q(x) - x|^p."""
    lo0, hi0 = observed if observed is not None else _span(counts, edges)
    if hi0 - lo0 <= 0:
        return lo0, hi0
    centers = 0.5 * (edges[:-1] + edges[1:])
    used = counts > 0
    c, n = centers[used], counts[used]
    best, best_err = (lo0, hi0), np.inf
    for r in np.linspace(1.0 / grid, 1.0, grid):
        err = _expected_error(c, n, lo0 * r, hi0 * r, bits, signed, p)
        if err < best_err:
            best, best_err = (lo0 * r, hi0 * r), err
    return best


def mse(counts, edges, bits, signed, *, observed=None) -> tuple[float, float]:
    return lp(counts, edges, bits, signed, observed=observed, p=2.0)


RANGE_METHODS: dict[str, Callable[..., tuple[float, float]]] = {
    "minmax": minmax,
    "percentile": percentile,
    "mse": mse,
}
