"""Activation QDQ parameters from the calibration histograms."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ..algos.qmath import act_params
from ..algos.ranges import RANGE_METHODS, parse_method
from ..config import SEARCHED_METHODS, START_RANGE, ConvertConfig
from ..types import ActQuant, ActStats

SEARCH_START = START_RANGE     # the ranges the searches start from (search/lapq.py, search/choose.py)


def act_quant(lo: float, hi: float, bits: int, signed: bool, method: str) -> ActQuant:
    """The QDQ parameters covering [lo, hi] (widened to contain 0)."""
    scale, zp = act_params(lo, hi, bits, signed)
    return ActQuant(scale, zp, bits, signed, lo, hi, method)


def method_range(st: ActStats, spec: str, bits: int, signed: bool) -> tuple[float, float]:
    """(lo, hi) of one tensor by the range method `spec` (e.g. 'percentile:99.9')."""
    method, params = parse_method(spec)
    return RANGE_METHODS[method](st.counts, st.edges, bits, signed, observed=st.observed, **params)


def method_acts(stats: Mapping[str, ActStats], names, base: Mapping[str, ActQuant], cfg: ConvertConfig,
                spec: str, label: str) -> dict[str, ActQuant]:
    """`base` with every tensor of `names` ranged by the method `spec`, recorded as `label`."""
    out = dict(base)
    for a in names:
        signed = base[a].signed
        out[a] = act_quant(*method_range(stats[a], spec, cfg.act_bits, signed), cfg.act_bits, signed, label)
    return out


# a score branch's grid spans this many times what calibration saw: its top is a sample maximum,
# and photos holding what the detector looks for reach about twice what photos without it do
# (YOLOv8n's stride-8 class branch: 12.0 calibrated on photos without people, 24.9 on photos with;
# docs/results.md, round 33)
TAIL_HEADROOM = 2.0


def keep_tails(acts: Mapping[str, ActQuant], stats: Mapping[str, ActStats], names) -> dict[str, ActQuant]:
    """`acts` with the tensors of `names` (graph/placement.score_branch: just ahead of a
    thresholded score) on min-max ranges times TAIL_HEADROOM, keeping the tail calibration saw,
    and room beyond it, where it decides."""
    out = dict(acts)
    for a in (a for a in names if a in acts and a in stats):
        q = acts[a]                 # at its width: 8 bits, or 16 where search/wide.py kept it so
        lo, hi = method_range(stats[a], "minmax", q.bits, q.signed)
        out[a] = act_quant(lo * TAIL_HEADROOM, hi * TAIL_HEADROOM, q.bits, q.signed,
                           f"minmax x{TAIL_HEADROOM:g} (score branch)")
    return out


def act_signed(cfg: ConvertConfig) -> bool:
    """Symmetric int activations when asked for, at 16 bits, and where the target wants them."""
    return cfg.act_symmetric or cfg.act_bits == 16 or cfg.rules.act_signed


def plan_acts(acts: Mapping[str, ActStats], cfg: ConvertConfig,
              tied: Mapping[str, str] | None = None) -> dict[str, ActQuant]:
    """Every observed activation's parameters by the configured method (empty when weight-only);
    a `tied` tensor takes the parameters of the tensor it maps to (data movement keeps scales)."""
    if not cfg.quantize_acts:
        return {}
    spec = SEARCH_START if cfg.act_method_name in SEARCHED_METHODS else cfg.act_method_name
    signed = act_signed(cfg)
    out = {name: act_quant(*method_range(st, spec, cfg.act_bits, signed), cfg.act_bits, signed,
                           cfg.act_method_name)
           for name, st in sorted(acts.items())}
    return tie(out, tied)


def saturate(acts: Mapping[str, ActStats], bounds: Mapping[str, tuple[float, float]]) -> dict[str, ActStats]:
    """`acts` as their readers see them: a tensor whose every reader saturates outside (lo, hi)
    has the values beyond moved onto the bound (graph/placement.py), so every range method sizes
    it by what can change the network's output."""
    out = dict(acts)
    for name, (lo, hi) in bounds.items():
        st = acts.get(name)
        if st is None:
            continue
        counts = st.counts.copy()
        centers = 0.5 * (st.edges[:-1] + st.edges[1:])
        for below, end in ((centers < lo, lo), (centers > hi, hi)):
            if np.isfinite(end) and below.any() and counts[below].any():
                k = int(np.clip(np.searchsorted(st.edges, end, side="right") - 1, 0, counts.size - 1))
                moved = counts[below].sum()
                counts[below] = 0
                counts[k] += moved
        seen = (min(max(st.observed[0], lo), hi), max(min(st.observed[1], hi), lo))
        out[name] = ActStats(counts, st.edges, seen)
    return out


def tie(acts: dict[str, ActQuant], tied: Mapping[str, str] | None) -> dict[str, ActQuant]:
    """`acts` with every tied tensor given its source's parameters (when the source has some)."""
    for name, source in (tied or {}).items():
        if source in acts:
            acts[name] = acts[source]
    return acts
