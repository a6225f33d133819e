"""A short float pass for the smoothing choice: per input tensor of a Gemm/MatMul (channels on the
last axis) or of a pointwise or depthwise conv (channels on axis 1), the maximum |x| of every
channel over the first half of the samples (and over how many rows), and rows sampled from the
second half, on which the choice is judged. Each tensor draws its rows from its own seeded
stream, so the rows one tensor is judged on do not depend on which other tensors are asked for."""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from ..types import Feed
from .collect import Router

if TYPE_CHECKING:
    import onnx


def channel_stats(model: "onnx.ModelProto", acts: Sequence[str], loaders: Sequence[Callable[[], Feed]],
                  rows: int, seed: int, axes: Mapping[str, int] | None = None
                  ) -> dict[str, tuple[np.ndarray, int, np.ndarray]]:
    """{tensor: (channel maxima [K], the rows they were taken over, check rows [S, K])} for the
    tensors whose channel axis (`axes`, default the last) is the same on every sample and whose
    values are finite (others are left out); none with one sample."""
    router = Router(model, acts)
    rngs = {a: np.random.default_rng([seed, zlib.crc32(a.encode())]) for a in acts}
    fit = max(1, len(loaders) // 2)
    per = max(1, rows // max(1, len(loaders) - fit))
    amax: dict[str, np.ndarray] = {}
    taken: dict[str, list[np.ndarray]] = {a: [] for a in acts}
    fitted: dict[str, int] = {a: 0 for a in acts}
    bad: set[str] = set()
    for i, load in enumerate(loaders):
        for a, v in router.run_sample(load(), i).items():
            v = np.asarray(v)
            if a in bad or v.dtype != np.float32 or v.ndim < 2:
                bad.add(a)
                continue
            axis = (axes or {}).get(a, -1)
            if axis != -1:
                v = np.moveaxis(v, axis, -1)
            flat = v.reshape(-1, v.shape[-1])
            # a model computing NaN or Inf is refused by the calibration pass, in one line
            if (a in amax and amax[a].shape[0] != flat.shape[1]) or not np.isfinite(flat).all():
                bad.add(a)
                continue
            if i < fit:
                m = np.abs(flat).max(axis=0)
                amax[a] = m if a not in amax else np.maximum(amax[a], m)
                fitted[a] += flat.shape[0]
            else:
                pick = np.sort(rngs[a].choice(flat.shape[0], size=min(per, flat.shape[0]), replace=False))
                taken[a].append(flat[pick])
    return {a: (amax[a], fitted[a], np.concatenate(taken[a])) for a in acts
            if a not in bad and a in amax and taken[a]}
