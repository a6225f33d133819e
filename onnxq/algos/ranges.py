"""Activation range methods over a streamed histogram.

Each method maps (counts [B], edges [B+1], bits, signed) to a clipping interval (lo, hi).
The histogram is of the raw values (not magnitudes); a range always contains 0.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .qmath import act_params, act_qrange


ONE_SIDED = 0.05       # entropy: a tensor whose other side reaches under 5% of this one is one-sided
ENTROPY_KEEP = 0.999   # entropy: the fraction of values no threshold may clip


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


def _magnitudes(counts, edges) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of |x| on [0, R] from a histogram symmetric around 0 (even bin count)."""
    half = counts.size // 2
    mag = counts[half:] + counts[:half][::-1]
    return mag, edges[half:]


def _clip_to(t: float, observed, counts, edges) -> tuple[float, float]:
    lo, hi = observed if observed is not None else _span(counts, edges)
    return max(lo, -t), min(hi, t)


def interval(counts, edges, bits, signed, *, observed=None, eps: float = 0.01) -> tuple[float, float]:
    """The large-magnitude interval rule in closed form: the smallest t whose tail mass
    P(|x| > t) is at most eps / (2^bits - 1) (the fixed point the per-step widen/narrow rule
    converges to), so the rare large values that carry signal keep a small error."""
    mag, e = _magnitudes(counts, edges)
    total = mag.sum()
    if total == 0:
        return 0.0, 0.0
    tail = (total - np.cumsum(mag)) / total          # P(|x| > e[i+1])
    i = int(np.argmax(tail <= eps / (2**bits - 1)))
    return _clip_to(float(e[i + 1]), observed, counts, edges)


def entropy(counts, edges, bits, signed, *, observed=None, candidates: int = 128) -> tuple[float, float]:
    """Threshold minimising KL(P || Q) between the |x| histogram clipped at t (tail folded into
    the last bin) and its 2^(bits-1)-level quantization, as calibrators of TensorRT's kind do."""
    mag, e = _magnitudes(counts, edges)
    nz = np.nonzero(mag)[0]
    if nz.size == 0:
        return 0.0, 0.0
    last = int(nz[-1]) + 1
    lo0, hi0 = observed if observed is not None else _span(counts, edges)
    one_sided = lo0 >= -ONE_SIDED * hi0 or hi0 <= -ONE_SIDED * lo0
    levels = 2**bits if (one_sided and not signed) else 2 ** (bits - 1)
    best_t, best_kl = float(e[last]), np.inf
    # KL alone happily clips tensors whose mass sits in a spike at zero down to a sliver of their
    # range (docs/experiments/activation-ranges.md); never clip more than 0.1% of the values
    floor = int(np.searchsorted(np.cumsum(mag) / mag.sum(), ENTROPY_KEEP)) + 1
    for stop in np.unique(np.linspace(max(levels, last // 16, floor), last, candidates).astype(int)):
        sliced = mag[:stop].astype(np.float64)
        p = sliced.copy()
        p[-1] += mag[stop:].sum()                    # the reference keeps the clipped mass
        q = np.zeros(stop)                           # the candidate is quantized without it
        for g in np.array_split(np.arange(stop), min(levels, stop)):
            used = sliced[g] > 0
            if used.any():
                q[g[used]] = sliced[g].sum() / used.sum()
        m = p > 0
        kl = float(np.sum(p[m] / p.sum() * np.log((p[m] / p.sum()) / (q[m] / q.sum() + 1e-30))))
        if kl < best_kl:
            best_kl, best_t = kl, float(e[stop])
    return _clip_to(best_t, observed, counts, edges)


RANGE_METHODS: dict[str, Callable[..., tuple[float, float]]] = {
    "minmax": minmax,
    "percentile": percentile,
    "mse": mse,
    "lp": lp,
    "entropy": entropy,
    "interval": interval,
}
PARAMETER = {"percentile": "pct", "lp": "p", "interval": "eps"}


# the values each parameter may take: percentile in (50, 100], lp's p in [1, 10], interval's eps in (0, 1]
PARAMETER_RANGE = {"pct": (50.0, 100.0), "p": (1.0, 10.0), "eps": (0.0, 1.0)}


def parse_method(spec: str) -> tuple[str, dict]:
    """'percentile:99.9' -> ('percentile', {'pct': 99.9}). Raises ValueError."""
    name, _, arg = spec.partition(":")
    if name not in RANGE_METHODS:
        raise ValueError(name)
    if not arg:
        return name, {}
    if name not in PARAMETER:
        raise ValueError(f"{name} takes no parameter")
    key = PARAMETER[name]
    value = float(arg)
    lo, hi = PARAMETER_RANGE[key]
    if not (lo < value <= hi or (key == "p" and value == lo)):
        raise ValueError(f"{name}'s parameter must lie in {'[' if key == 'p' else '('}{lo:g}, {hi:g}], got {arg}")
    return name, {key: value}
