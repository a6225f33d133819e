"""Loss-aware joint search of activation clipping ranges (LAPQ).

1. Lp ranges for p on a small grid, the network loss of each; a quadratic fit in p gives p*.
2. Powell's method jointly over every activation's range (log-multipliers of the p* range),
   minimising the network loss on a calibration subset: KL to the FP32 outputs for classifier-
   like outputs, relative MSE otherwise.
Every evaluation is a feed to ONE onnxruntime session in which the QDQ scales, zero points and
clip bounds are graph inputs; the model is never rebuilt during the search. The best point seen
is kept, so the search never ends above its starting loss.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import onnx
from scipy.optimize import minimize

from .algos.qmath import act_params
from .algos.ranges import lp
from .calib.collect import session
from .calib.data import Feed
from .config import ConvertConfig
from .graph.rewrite import act_param_names, act_param_values, apply_plan, weights_as_inputs
from .probe import divergence
from .types import ActQuant, ActStats, Plan

P_GRID = (2.0, 2.5, 3.0, 3.5, 4.0)
Progress = Callable[[str, int, int], None]


class SearchSession:
    """The quantized model with activation QDQ parameters as inputs, and the loss on a subset."""

    def __init__(self, prepared: onnx.ModelProto, plan: Plan, feeds: Sequence[Feed],
                 reference: Sequence[Sequence[np.ndarray]]) -> None:
        self.names = sorted(a for a in plan.acts if not _in_subgraph(plan, a))
        model = apply_plan(prepared, plan)
        params = [n for a in self.names for n in act_param_names(a, plan.acts[a])]
        self.sess = session(weights_as_inputs(model, params))
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.feeds, self.reference = feeds, reference
        self.evals = 0

    def outputs_for(self, acts: Mapping[str, ActQuant], feed: Feed) -> list[np.ndarray]:
        extra = {}
        for a in self.names:
            extra.update(act_param_values(a, acts[a]))
        return self.sess.run(self.outputs, {**feed, **extra})

    def loss(self, acts: Mapping[str, ActQuant]) -> float:
        self.evals += 1
        return float(np.mean([divergence(r, self.outputs_for(acts, f))
                              for f, r in zip(self.feeds, self.reference)]))


def _in_subgraph(plan: Plan, act: str) -> bool:
    return all(lp.target.graph for lp in plan.layers if lp.target.act == act)


def _ranges(stats: Mapping[str, ActStats], names, cfg: ConvertConfig, p: float) -> dict[str, tuple[float, float]]:
    signed = cfg.act_symmetric
    return {a: lp(stats[a].counts, stats[a].edges, cfg.act_bits, signed, observed=stats[a].observed, p=p)
            for a in names}


def _acts(ranges: Mapping[str, tuple[float, float]], base: Mapping[str, ActQuant], cfg: ConvertConfig,
          mult: np.ndarray | None = None) -> dict[str, ActQuant]:
    out = dict(base)
    for i, (a, (lo, hi)) in enumerate(ranges.items()):
        k = 1.0 if mult is None else float(np.exp(mult[i]))
        scale, zp = act_params(lo * k, hi * k, cfg.act_bits, base[a].signed)
        out[a] = ActQuant(scale, zp, cfg.act_bits, base[a].signed, lo * k, hi * k, "lapq")
    return out


def lapq_search(prepared: onnx.ModelProto, plan: Plan, stats: Mapping[str, ActStats],
                ref_feeds: Sequence[Feed], reference: Sequence[Sequence[np.ndarray]], cfg: ConvertConfig,
                progress: Progress | None = None) -> tuple[dict[str, ActQuant], dict]:
    """Searched activation parameters and a summary of the search."""
    search = SearchSession(prepared, plan, ref_feeds, reference)
    names = search.names
    start_loss = search.loss(plan.acts)
    grid = []
    for p in P_GRID:
        grid.append(search.loss(_acts(_ranges(stats, names, cfg, p), plan.acts, cfg)))
    a2, a1, _ = np.polyfit(P_GRID, grid, 2)
    p_star = float(np.clip(-a1 / (2 * a2), P_GRID[0], P_GRID[-1])) if a2 > 0 else P_GRID[int(np.argmin(grid))]
    init = _ranges(stats, names, cfg, p_star)
    best = {"loss": search.loss(_acts(init, plan.acts, cfg)), "x": np.zeros(len(names))}

    def f(x: np.ndarray) -> float:
        value = search.loss(_acts(init, plan.acts, cfg, x))
        if value < best["loss"]:
            best.update(loss=value, x=x.copy())
        if progress:
            progress(f"search loss {best['loss']:.4g}", min(search.evals, cfg.search_evals), cfg.search_evals)
        return value

    if names and cfg.search_evals > search.evals:
        minimize(f, np.zeros(len(names)), method="Powell", bounds=[(-2.0, 0.7)] * len(names),
                 options={"maxfev": cfg.search_evals - search.evals, "xtol": 1e-2, "ftol": 1e-4})
    acts = _acts(init, plan.acts, cfg, best["x"])
    if best["loss"] > start_loss:                 # the single-tensor start was better: keep it
        acts, best["loss"] = dict(plan.acts), start_loss
    info = {"p_grid": dict(zip(map(str, P_GRID), grid)), "p_star": p_star, "loss_before": start_loss,
            "loss_after": best["loss"], "evaluations": search.evals, "tensors": len(names)}
    return acts, info
