"""Low-rank residual branches: give back part of the rounding residual R = W - Q(W) as a
rank-r product B·A beside the quantized layer (y = Q(W)x + B(Ax)).

Data-aware factors minimise the layer's output error E||(R - BA) x||^2 = ||(R - BA) L||_F^2 with
H = E[x x^T] = L L^T: take the truncated SVD of R·L = U S V^T and unwhiten,
B = U_r S_r, A = V_r^T L^-1. Then E[(Ax)(Ax)^T] = I, so the branch's middle activation has unit
variance in every channel (one fixed INT8 range fits all), and the output error falls by exactly
S_i^2 for the i-th rank: the gain of every rank is known in closed form, which is what the
budget allocation below spends.

Plain factors (`svd`) take the SVD of R itself, A = sqrt(S) V^T, B = U sqrt(S).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from .rounding import damped


@dataclass(frozen=True)
class Spectrum:
    """Whitened SVD of one layer's residual, truncated to what any budget could use."""

    u: np.ndarray        # [O, m]
    s: np.ndarray        # [m] singular values of R L, decreasing
    a_rows: np.ndarray   # [m, K] rows of A = V^T L^-1 (data-aware) or sqrt(S) V^T (plain)
    scale_b: np.ndarray  # [m] B = U * scale_b

    def gains(self) -> np.ndarray:
        """Output-error reduction of each successive rank (data-aware: exactly s_i^2)."""
        return self.s**2


def _cholesky(h: np.ndarray, damp: float) -> np.ndarray:
    return damped(h, damp, np.linalg.cholesky, "whitening")


def spectrum(resid: np.ndarray, h: np.ndarray | None, max_rank: int, method: str = "whitened",
             damp: float = 1e-4) -> Spectrum:
    """resid [O, K], h [K, K] -> the top `max_rank` components for `method` (whitened | svd)."""
    m = min(max_rank, *resid.shape)
    if method == "whitened":
        if h is None:
            raise ValueError("whitened factors need the layer's input statistics")
        lower = _cholesky(h.astype(np.float64), damp)                  # H = L L^T
        u, s, vt = np.linalg.svd(resid @ lower, full_matrices=False)
        u, s, vt = u[:, :m], s[:m], vt[:m]
        a_rows = np.linalg.solve(lower.T, vt.T).T                      # V^T L^-1   [m, K]
        return Spectrum(u, s, a_rows, s.copy())
    if method == "svd":
        u, s, vt = np.linalg.svd(resid, full_matrices=False)
        u, s, vt = u[:, :m], s[:m], vt[:m]
        root = np.sqrt(s)
        if h is not None:   # report the gains on the same (output) objective as whitened
            lower = _cholesky(h.astype(np.float64), damp)
            s_out = np.array([np.linalg.norm(np.outer(u[:, i] * s[i], vt[i]) @ lower) for i in range(m)])
        else:
            s_out = s
        return Spectrum(u, s_out, root[:, None] * vt, root)
    raise ValueError(f"unknown branch init '{method}'")


def factors(sp: Spectrum, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(A [r, K], B [O, r]) of the given rank."""
    return sp.a_rows[:rank].copy(), sp.u[:, :rank] * sp.scale_b[:rank]


def allocate_ranks(gains: list[np.ndarray], costs: list[int], budget: int) -> list[int]:
    """Ranks per layer maximising the summed gain with sum(rank_l * cost_l) <= budget.

    Greedy by gain per parameter over each layer's next rank; exact for the fractional problem
    when each layer's gains decrease with rank, which whitened spectra do.
    """
    ranks = [0] * len(gains)
    heap = [(-g[0] / c, i) for i, (g, c) in enumerate(zip(gains, costs)) if len(g) and c > 0 and g[0] > 0]
    heapq.heapify(heap)
    spent = 0
    while heap:
        _, i = heapq.heappop(heap)
        if spent + costs[i] > budget:
            continue                      # this layer's next rank does not fit; others may
        spent += costs[i]
        ranks[i] += 1
        if ranks[i] < len(gains[i]) and gains[i][ranks[i]] > 0:
            heapq.heappush(heap, (-gains[i][ranks[i]] / costs[i], i))
    return ranks
