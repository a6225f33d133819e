"""Error-compensating rounding (the OBQ/GPTQ family), in numpy.

Columns of W [O, K] are rounded one at a time; the error of each rounded column is spread over
the columns not yet rounded through the inverse of H = sum x x^T, which minimises the increase
of the layer's output error tr(E H E^T) at each step. Columns are taken in decreasing order of
diag(H) ("act order"), in blocks so most work is matrix-matrix.
"""

from __future__ import annotations

import numpy as np

from .qmath import weight_qmax

# damping of H in second-order rounding, a fraction of mean(diag H) (--damp); no value wins on
# every model, this one is the safest measured (docs/experiments/weights.md, "Damping")
DEFAULT_DAMP = 0.01


DAMP_RETRIES = 6   # a factorisation that fails is retried with 10x the damping, this many times


def damped(h: np.ndarray, damp: float, factor, what: str):
    """factor(H + d * mean(diag H) * I) for d = damp, 10 damp, 100 damp, ...: the first that
    succeeds (a Cholesky factorisation fails on matrices that are not positive definite)."""
    mean_diag = float(np.mean(np.diag(h))) or 1.0
    diag = np.diag_indices_from(h)
    for attempt in range(DAMP_RETRIES):
        hd = np.array(h, dtype=np.float64, copy=True)
        hd[diag] += (damp * 10**attempt) * mean_diag       # H + d I, without a K x K identity
        try:
            return factor(hd)
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError(f"input statistics are too ill-conditioned for {what}")


def _inverse_upper(hd: np.ndarray) -> np.ndarray:
    """U upper with U^T U = hd^-1, from one Cholesky factorisation and one triangular inverse.
    With J the reversal of the index order, J hd J = L L^T gives hd = V V^T for the upper
    V = J L J, so hd^-1 = (V^-1)^T V^-1 and U = V^-1 = J L^-1 J (a Cholesky factor is unique).
    About a fifth of the work of inverting hd and factorising the inverse again."""
    from scipy.linalg import lapack    # imported on first use: the command line starts faster

    lower = np.linalg.cholesky(hd[::-1, ::-1])
    inv_lower, info = lapack.dtrtri(lower, lower=1)
    if info != 0:
        raise np.linalg.LinAlgError("singular triangular factor")
    return np.ascontiguousarray(inv_lower[::-1, ::-1])


def _inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor U of (H + damp*mean(diag H)*I)^-1, so that Hinv = U^T U."""
    return damped(h, damp, _inverse_upper, "second-order rounding")


def prepare_hessian(h: np.ndarray, damp: float = DEFAULT_DAMP, act_order: bool = True):
    """What gptq_round needs of H alone (dead columns, column order, the inverse's Cholesky
    factor): computed once when several scales or bit-widths are rounded against one H."""
    h = h.astype(np.float64).copy()
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(h.shape[0])
    return dead, perm, _inverse_cholesky(h[np.ix_(perm, perm)], damp)


def gptq_round(w: np.ndarray, scales: np.ndarray, bits: int, h: np.ndarray,
               damp: float = DEFAULT_DAMP, block: int = 128, act_order: bool = True,
               prepared=None, bounds: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Codes [O, K] (int32) for W [O, K] with fixed `scales`, per row [O] or per weight [O, K]
    (blocked scales expanded), and H [K, K] (`prepared`: prepare_hessian(h, damp, act_order),
    when it is already known). `bounds`: each code's (lowest, highest) [O, K] on an affine grid
    (codes relative to the zero point); else the symmetric +-weight_qmax(bits)."""
    dead, perm, u = prepared if prepared is not None else prepare_hessian(h, damp, act_order)
    w = w.astype(np.float64).copy()
    o, k = w.shape
    w = w[:, perm]
    qm = weight_qmax(bits)
    lo, hi = (None, None) if bounds is None else (b[:, perm] for b in bounds)
    s = scales.astype(np.float64)
    s = s[:, perm] if s.ndim == 2 else np.broadcast_to(s[:, None], (o, k))
    codes = np.zeros((o, k), dtype=np.int32)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        wb = w[:, i1:i2].copy()
        errs = np.zeros_like(wb)
        ub = u[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col, sc = wb[:, j], s[:, i1 + j]
            low, high = (-qm, qm) if lo is None else (lo[:, i1 + j], hi[:, i1 + j])
            q = np.clip(np.rint(col / sc), low, high)
            codes[:, i1 + j] = q
            err = (col - q * sc) / ub[j, j]
            wb[:, j:] -= np.outer(err, ub[j, j:])
            errs[:, j] = err
        w[:, i2:] -= errs @ u[i1:i2, i2:]
    out = np.empty_like(codes)
    out[:, perm] = codes
    return out
