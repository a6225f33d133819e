"""Streaming reducers: each takes one array at a time and keeps a fixed-size summary, so memory
does not grow with the number of calibration samples."""

from __future__ import annotations

import numpy as np

from ..types import ConvGeometry


class RangeHistogram:
    """Min/max plus a histogram over a symmetric interval [-R, R] that doubles when a value falls
    outside it; doubling merges bin pairs, which is exact (no re-binning error)."""

    def __init__(self, bins: int = 4096) -> None:
        assert bins % 4 == 0
        self.bins = bins
        self.radius = 0.0
        self.counts = np.zeros(bins, dtype=np.int64)
        self.lo, self.hi = np.inf, -np.inf

    def update(self, x: np.ndarray, extent: tuple[float, float] | None = None) -> None:
        """Add x's values (`extent`: x's (min, max), when the caller already has them)."""
        x = np.asarray(x, dtype=np.float32).ravel()
        if x.size == 0:
            return
        lo, hi = extent if extent is not None else (float(x.min()), float(x.max()))
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        need = max(-lo, hi)
        if need <= 0:
            need = 1e-8
        if self.radius == 0.0:
            self.radius = float(2.0 ** np.ceil(np.log2(need)))
        while need > self.radius:
            merged = self.counts.reshape(-1, 2).sum(axis=1)
            self.counts = np.zeros_like(self.counts)
            q = self.bins // 4
            self.counts[q:q + merged.size] = merged
            self.radius *= 2.0
        t = x + np.float32(self.radius)           # bin index floor((x + R) / 2R * bins), in place
        t /= np.float32(2 * self.radius)
        t *= np.float32(self.bins)
        np.clip(t, 0, self.bins - 1, out=t)         # then truncation is the floor
        self.counts += np.bincount(t.astype(np.intp), minlength=self.bins)

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(-self.radius, self.radius, self.bins + 1)

    @property
    def observed(self) -> tuple[float, float]:
        return (float(self.lo), float(self.hi)) if self.hi >= self.lo else (0.0, 0.0)


def _span(geo: ConvGeometry) -> list[int]:
    """The input extent one output position reads along each spatial axis."""
    return [(k - 1) * d + 1 for k, d in zip(geo.kernel, geo.dilations)]


def _positions(x: np.ndarray, geo: ConvGeometry, rows: int, rng: np.random.Generator):
    """Up to `rows` sampled output positions of a conv over x [N, C, *spatial]: (pads, the
    positions' (n, *out) indices, how many)."""
    nd = len(geo.kernel)
    pads = geo.resolve_pads(x.shape[2:])
    span = _span(geo)
    out_shape = tuple((x.shape[2 + i] + pads[i] + pads[i + nd] - span[i]) // geo.strides[i] + 1 for i in range(nd))
    total = x.shape[0] * int(np.prod(out_shape))
    take = min(rows, total)
    flat = np.sort(rng.choice(total, size=take, replace=False)) if take < total else np.arange(total)
    return pads, np.unravel_index(flat, (x.shape[0],) + out_shape), take


def im2col_cols(x: np.ndarray, geo: ConvGeometry, rows: int, rng: np.random.Generator) -> np.ndarray:
    """Up to `rows` sampled im2col patches of x [N, C, *spatial] for a conv, as columns.
    -> [G, C/G*prod(k), S] (the weight's [Cout, Cin/G, *k] order along the middle axis).

    Works for 1-D and 2-D convs; padding is explicit (auto_pad resolved from x's shape). One
    gather of whole channel rows: the input laid out [C, N*pixels] (padded), each patch element
    a flat index into it.
    """
    pads, idx, take = _positions(x, geo, rows, rng)
    nd = len(geo.kernel)
    padded = tuple(x.shape[2 + i] + pads[i] + pads[i + nd] for i in range(nd))
    xc = np.zeros((x.shape[1], x.shape[0]) + padded, dtype=np.float32)
    xc[(slice(None), slice(None)) + tuple(slice(pads[i], pads[i] + x.shape[2 + i]) for i in range(nd))] = \
        np.swapaxes(x, 0, 1)
    offsets = np.array(list(np.ndindex(*geo.kernel)), dtype=np.intp)          # [prod(k), nd]
    flat = np.repeat((idx[0] * int(np.prod(padded)))[None, :], len(offsets), axis=0)
    for a in range(nd):
        step = int(np.prod(padded[a + 1:]))
        flat += (idx[1 + a][None, :] * geo.strides[a] + offsets[:, a:a + 1] * geo.dilations[a]) * step
    cols = np.take(xc.reshape(x.shape[1], -1), flat, axis=1)                  # [C, prod(k), S]
    return cols.reshape(geo.group, -1, take)


def im2col_sums(x: np.ndarray, geo: ConvGeometry, rows: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """The float64 sum over the same sampled patches as im2col_cols (same draws of `rng`, the
    same order of addition, so the same values). -> ([G, C/G*prod(k)], S)."""
    cols = im2col_cols(x, geo, rows, rng)
    return cols.sum(axis=2, dtype=np.float64), cols.shape[2]


class SecondMoment:
    """Accumulates H = sum x x^T [G, K, K] and sum x [G, K] (float64) over sampled input rows
    (given as columns [G, K, S])."""

    def __init__(self, groups: int, k: int, second: bool = True, batch: int = 0) -> None:
        """Without `second`, only the mean is kept (all that bias correction needs). With `batch`,
        rows wait until that many have come and enter H in one product (many readers pooled into
        one H, each giving a row or two per sample: one pass over H per batch, not per row)."""
        self.h = np.zeros((groups, k, k), dtype=np.float64) if second else None
        self.s = np.zeros((groups, k), dtype=np.float64)
        self.n = 0
        self.batch = batch
        self._waiting: list[np.ndarray] = []

    def update(self, cols: np.ndarray) -> None:
        """cols [G, K, S]: S sampled input rows, as columns."""
        if self.batch and self.h is not None:
            self._waiting.append(cols)
            if sum(w.shape[2] for w in self._waiting) >= self.batch:
                self._flush()
            return
        self._add(cols)

    def _add(self, cols: np.ndarray, product=np.float32) -> None:
        # one sample's rows are few: a float32 product is exact enough, the running sum is float64
        # (a batch of many samples' rows multiplies in float64)
        if self.h is not None:
            x = cols.astype(product, copy=False)
            self.h += np.matmul(x, x.transpose(0, 2, 1))
        self.s += cols.sum(axis=2, dtype=np.float64)
        self.n += cols.shape[2]

    def _flush(self) -> None:
        if self._waiting:
            cols = np.concatenate(self._waiting, axis=2)
            self._waiting = []
            self._add(cols, np.float64)

    def add_sums(self, sums: np.ndarray, n: int) -> None:
        """Rows already summed ([G, K] float64 over n rows): the mean-only update."""
        self.s += sums
        self.n += n

    @property
    def mean(self) -> np.ndarray:
        self._flush()
        return self.s / max(self.n, 1)

    @property
    def hessian(self) -> np.ndarray | None:
        """E[x x^T], normalised per row so layers are comparable (None: mean only)."""
        self._flush()
        return None if self.h is None else self.h / max(self.n, 1)

    def hand_over(self) -> np.ndarray | None:
        """`hessian` without a copy: the sum is normalised in place and the accumulator lets go
        of it (a large model's second moments are never held twice)."""
        self._flush()
        h, self.h = self.h, None
        if h is not None:
            h /= max(self.n, 1)
        return h


class CrossMoment:
    """Paired rows of the FP32 input x and the input x^ the quantized model feeds the same layer
    (same sample, same positions): C = E[x x^T], Hq = E[x^ x^T], and both means. [G, K, K]."""

    def __init__(self, groups: int, k: int) -> None:
        self.c = np.zeros((groups, k, k), dtype=np.float64)
        self.hq = SecondMoment(groups, k)
        self.s_fp = np.zeros((groups, k), dtype=np.float64)

    def update(self, cols_fp: np.ndarray, cols_q: np.ndarray) -> None:
        """cols_fp, cols_q: [G, K, S] taken at the same positions."""
        f = cols_fp.astype(np.float32, copy=False)
        self.c += np.matmul(f, cols_q.astype(np.float32, copy=False).transpose(0, 2, 1))
        self.s_fp += f.sum(axis=2, dtype=np.float64)
        self.hq.update(cols_q)

    @property
    def n(self) -> int:
        return self.hq.n
