"""Loss-aware joint search of activation clipping ranges (LAPQ).

1. The network loss of every single-tensor method (minmax, percentile, mse, entropy, interval)
   and of Lp ranges for p on a small grid plus p* from a quadratic fit in p; the best is the start.
2. Joint refinement of every activation's range (log-multipliers of the start): coordinate
   passes in graph order with steps 0.25, 0.125, 0.0625 (one or two evaluations a tensor a
   pass), then Powell's method on what is left of the evaluation budget, minimising the
   network loss on a calibration subset: KL to the FP32 outputs for classifier-like outputs,
   relative MSE otherwise.
Every evaluation is a feed to ONE onnxruntime session in which the QDQ scales, zero points,
clip bounds and the int32 bias codes that depend on them are graph inputs; the model is never
rebuilt during the search. The best point seen is kept, so the search never ends above its
starting loss.
"""

from __future__ import annotations

import copy
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx
from scipy.optimize import minimize

from .algos.qmath import act_params
from .algos.ranges import RANGE_METHODS, parse_method
from .calib.collect import session
from .calib.data import Feed
from .config import ConvertConfig
from .graph.rewrite import (act_param_names, act_param_values, apply_plan, layer_bias, scale_bound_params,
                            weights_as_inputs)
from .probe import divergence
from .types import ActQuant, ActStats, Plan

P_GRID = (2.0, 2.5, 3.0, 3.5, 4.0)
START_METHODS = ("minmax", "percentile", "mse", "entropy", "interval")
COORD_STEP = 0.25      # log-multiplier step of the first coordinate pass, halved on each next one
COORD_PASSES = 3
Progress = Callable[[str, int, int], None]


class SearchSession:
    """The quantized model with activation QDQ parameters as inputs, and the loss on a subset."""

    def __init__(self, prepared: onnx.ModelProto, plan: Plan, feeds: Sequence[Feed],
                 reference: Sequence[Sequence[np.ndarray]]) -> None:
        self.names = sorted(a for a in plan.acts if not _in_subgraph(plan, a))
        model = apply_plan(prepared, plan)
        params = [n for a in self.names for n in act_param_names(a, plan.acts[a])]
        # int32 biases (the layer's and its branch's) are coded in units of s_x * s_w, so they
        # follow the input's scale: the session takes them as inputs too, or it would measure
        # biases rounded on the start's grid (on PP-OCR cls at W4A4 that alone read KL 0.41 where
        # the emitted model had 0.50). The weights' bias-safe scales stay the start's (they move
        # only for dead channels).
        self.biased = []
        for lp in plan.layers:
            t = lp.target
            if not t.graph and t.act in self.names:
                bias = layer_bias(prepared.graph, lp, plan.acts[t.act].scale)
                bound = scale_bound_params(lp, bias, plan.acts[t.act].scale)
                if bound:
                    self.biased.append((lp, bias))
                    params += list(bound)
        self.inputs = params
        self.sess = session(weights_as_inputs(model, self.inputs))
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.feeds, self.reference = _batched(self.sess, feeds, reference)
        self.evals = 0

    def on(self, feeds: Sequence[Feed], reference: Sequence[Sequence[np.ndarray]]) -> "SearchSession":
        """The same session measuring the loss on other samples."""
        other = copy.copy(self)
        other.feeds, other.reference = _batched(self.sess, feeds, reference)
        other.evals = 0
        return other

    def outputs_for(self, acts: Mapping[str, ActQuant], feed: Feed) -> list[np.ndarray]:
        extra = {}
        for a in self.names:
            extra.update(act_param_values(a, acts[a]))
        for lp, bias in self.biased:
            extra.update(scale_bound_params(lp, bias, acts[lp.target.act].scale))
        return self.sess.run(self.outputs, {**feed, **extra})

    def loss(self, acts: Mapping[str, ActQuant]) -> float:
        self.evals += 1
        return float(np.mean([divergence(r, self.outputs_for(acts, f))
                              for f, r in zip(self.feeds, self.reference)]))


def _batched(sess, feeds: Sequence[Feed], reference: Sequence[Sequence[np.ndarray]]):
    """Samples of equal shapes stacked into one run each (fewer, larger runs are much faster on
    small models) when every graph input and output has a free leading batch axis."""
    ins = [i for i in sess.get_inputs() if i.name in feeds[0]] if feeds else []
    free = all(not isinstance(v.shape[0], int) for v in ins + list(sess.get_outputs()) if v.shape)
    if not free or not all(len(v.shape) for v in ins):
        return list(feeds), list(reference)
    groups: dict[tuple, list[int]] = {}
    for i, f in enumerate(feeds):
        groups.setdefault(tuple((k, v.shape) for k, v in sorted(f.items())), []).append(i)
    out_f, out_r = [], []
    for idx in groups.values():
        out_f.append({k: np.concatenate([feeds[i][k] for i in idx]) for k in feeds[idx[0]]})
        out_r.append([np.concatenate([reference[i][j] for i in idx]) for j in range(len(reference[idx[0]]))])
    return out_f, out_r


def _in_subgraph(plan: Plan, act: str) -> bool:
    return all(lp.target.graph for lp in plan.layers if lp.target.act == act)


def _method_acts(stats: Mapping[str, ActStats], names, base: Mapping[str, ActQuant],
                 cfg: ConvertConfig, spec: str) -> dict[str, ActQuant]:
    """Every searched tensor's range from one single-tensor method."""
    method, params = parse_method(spec)
    fn = RANGE_METHODS[method]
    out = dict(base)
    for a in names:
        st, q = stats[a], base[a]
        lo, hi = fn(st.counts, st.edges, cfg.act_bits, q.signed, observed=st.observed, **params)
        scale, zp = act_params(lo, hi, cfg.act_bits, q.signed)
        out[a] = ActQuant(scale, zp, cfg.act_bits, q.signed, lo, hi, "lapq")
    return out


def _scaled(start: Mapping[str, ActQuant], names, cfg: ConvertConfig, x: np.ndarray) -> dict[str, ActQuant]:
    """`start` with tensor i's range multiplied by exp(x[i])."""
    out = dict(start)
    for i, a in enumerate(names):
        q, k = start[a], float(np.exp(x[i]))
        scale, zp = act_params(q.lo * k, q.hi * k, cfg.act_bits, q.signed)
        out[a] = ActQuant(scale, zp, cfg.act_bits, q.signed, q.lo * k, q.hi * k, "lapq")
    return out


def lapq_search(prepared: onnx.ModelProto, plan: Plan, stats: Mapping[str, ActStats],
                ref_feeds: Sequence[Feed], reference: Sequence[Sequence[np.ndarray]], cfg: ConvertConfig,
                progress: Progress | None = None, check_feeds: Sequence[Feed] = (),
                check_reference: Sequence[Sequence[np.ndarray]] = ()) -> tuple[dict[str, ActQuant], dict]:
    """Searched activation parameters and a summary of the search.

    Starts from the best of every single-tensor method and of the Lp family (p from a quadratic
    fit over P_GRID) on the network loss, then refines each tensor's range jointly:
    coordinate passes (COORD_STEP, halved each pass, in graph order), then Powell's method on
    what is left of the evaluation budget. With `check_feeds` (calibration samples the search
    did not see), the start, the coordinate result and the final point are compared on them and
    the best is returned: dozens of ranges fitted on a few samples can overfit them."""
    search = SearchSession(prepared, plan, ref_feeds, reference)
    order = {lp.target.act: i for i, lp in reversed(list(enumerate(plan.layers)))}
    search.names.sort(key=lambda a: (order.get(a, len(order)), a))     # graph order
    names = search.names
    budget = cfg.search_evals
    start_loss = search.loss(plan.acts)
    best = {"loss": start_loss, "acts": dict(plan.acts), "how": cfg.act_method_name}

    def consider(acts: dict[str, ActQuant], how: str) -> float:
        value = search.loss(acts)
        if value < best["loss"]:
            best.update(loss=value, acts=acts, how=how)
        if progress:
            progress(f"search loss {best['loss']:.4g}", min(search.evals, budget), budget)
        return value

    singles = {m: consider(_method_acts(stats, names, plan.acts, cfg, m), m) for m in START_METHODS}
    grid = [consider(_method_acts(stats, names, plan.acts, cfg, f"lp:{p}"), f"lp:{p}") for p in P_GRID]
    a2, a1, _ = np.polyfit(P_GRID, grid, 2)
    p_star = float(np.clip(-a1 / (2 * a2), P_GRID[0], P_GRID[-1])) if a2 > 0 else P_GRID[int(np.argmin(grid))]
    consider(_method_acts(stats, names, plan.acts, cfg, f"lp:{p_star:.3f}"), f"lp:{p_star:.3f}")
    start, start_how, single_best = best["acts"], best["how"], best["loss"]

    def coordinate_step(x: np.ndarray, i: int, step: float) -> np.ndarray:
        """x moved by -step or +step along tensor i if either lowers the loss, else x."""
        for sign in (-1.0, 1.0):
            if search.evals >= budget:
                break
            trial = x.copy()
            trial[i] += sign * step
            before = best["loss"]
            consider(_scaled(start, names, cfg, trial), "coordinate")
            if best["loss"] < before:
                return trial
        return x

    x = np.zeros(len(names))
    for p in range(COORD_PASSES):                   # coordinate passes in graph order, finer each time
        for i in range(len(names)):
            x = coordinate_step(x, i, COORD_STEP / 2**p)

    stages = {"start": (single_best, start), "coordinate": (best["loss"], best["acts"])}

    def f(v: np.ndarray) -> float:
        return consider(_scaled(start, names, cfg, v), "powell")

    if names and budget > search.evals + 2 * len(names):
        minimize(f, x, method="Powell", bounds=[(-2.0, 0.7)] * len(names),
                 options={"maxfev": budget - search.evals, "xtol": 1e-2, "ftol": 1e-4})
    stages["powell"] = (best["loss"], best["acts"])
    kept, check = "powell", {}
    if len(check_feeds):
        held = search.on(check_feeds, check_reference)
        check = {k: held.loss(acts) for k, (_, acts) in stages.items()}
        kept = min(check, key=lambda k: (check[k], k != "start"))
    info = {"start_loss": start_loss, "single_method_losses": singles,
            "p_grid": dict(zip(map(str, P_GRID), grid)), "p_star": p_star,
            "start": start_how, "loss_before": single_best, "loss_after": best["loss"],
            "final": best["how"], "evaluations": search.evals, "tensors": len(names),
            "check_losses": check, "kept": kept, "check_samples": len(check_feeds)}
    return stages[kept][1], info
