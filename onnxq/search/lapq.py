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
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from ..algos.metrics import divergence, expected
from ..config import ConvertConfig
from ..graph.rewrite import act_param_names, act_param_values, apply_plan, bias_param_values
from ..graph.variants import weights_as_inputs
from ..plan.acts import act_quant, method_acts
from ..plan.biases import code_biases, coded_biases, unrounded_inputs
from ..runtime import session
from ..types import ActQuant, ActStats, Feed, Plan, Progress, SearchSummary

if TYPE_CHECKING:
    import onnx

P_GRID = (2.0, 2.5, 3.0, 3.5, 4.0)
START_METHODS = ("minmax", "percentile", "mse", "entropy", "interval")
COORD_STEP = 0.25      # log-multiplier step of the first coordinate pass, halved on each next one
COORD_PASSES = 3
POWELL_BOUNDS = (-2.0, 0.7)   # log-multipliers of the start's ranges Powell may try (x0.14 .. x2)


class SearchSession:
    """The quantized model with activation QDQ parameters as inputs, and the loss on a subset."""

    def __init__(self, prepared: "onnx.ModelProto", plan: Plan, feeds: Sequence[Feed],
                 reference: Sequence[Sequence[np.ndarray]]) -> None:
        self.names = searched(plan)
        # a tied tensor (data movement's output) takes its source's parameters in every trial
        self.source = {a: s for a, s in plan.tied.items() if a in plan.acts and s in self.names}
        model = apply_plan(prepared, code_biases(plan))
        params = [n for a in [*self.names, *self.source] for n in act_param_names(a, plan.acts[a])]
        # int32 biases (the layer's and its branch's) are coded in units of s_x * s_w, so they
        # follow the input's scale: the session takes them as inputs too, or it would measure
        # biases rounded on the start's grid (docs/experiments/activation-ranges.md). The
        # weights' bias-safe scales stay the start's (they move only for dead channels).
        self.biased = []
        for lp in plan.layers:
            t = lp.target
            if not t.graph and (t.act in self.names or t.act in self.source):
                bound = bias_param_values(lp, coded_biases(lp, plan.acts[t.act].scale))
                if bound:
                    self.biased.append(lp)
                    params += list(bound)
        self.inputs = params
        model = weights_as_inputs(model, self.inputs)        # one copy of the quantized weights at a time
        self.sess = session(model)
        del model
        # a target may emit no Q/DQ for some planned tensor or code no int32 bias (tensorrt's
        # weight-only Gemm): those parameters are not in the graph, and changing them changes nothing
        self.known = {i.name for i in self.sess.get_inputs()}
        # ... nor for a tensor only a weight-only kernel reads (ort-cpu's MatMulNBits input)
        self.names = [a for a in self.names if act_param_names(a, plan.acts[a])[0] in self.known]
        self.source = {a: s for a, s in self.source.items() if s in self.names}
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.feeds, self.reference = batched(self.sess, feeds, reference)
        self.expected = [expected(r) for r in self.reference]
        self.evals = 0

    def on(self, feeds: Sequence[Feed], reference: Sequence[Sequence[np.ndarray]]) -> "SearchSession":
        """The same session measuring the loss on other samples."""
        other = copy.copy(self)
        other.feeds, other.reference = batched(self.sess, feeds, reference)
        other.expected = [expected(r) for r in other.reference]
        other.evals = 0
        return other

    def outputs_for(self, acts: Mapping[str, ActQuant], feed: Feed) -> list[np.ndarray]:
        extra = {}
        for a in [*self.names, *self.source]:
            extra.update(act_param_values(a, acts[self.source.get(a, a)]))
        for lp in self.biased:
            a = lp.target.act
            extra.update(bias_param_values(lp, coded_biases(lp, acts[self.source.get(a, a)].scale)))
        return self.sess.run(self.outputs, {**feed, **{k: v for k, v in extra.items() if k in self.known}})

    def loss(self, acts: Mapping[str, ActQuant]) -> float:
        self.evals += 1
        return float(np.mean([divergence(r, self.outputs_for(acts, f))
                              for f, r in zip(self.feeds, self.expected)]))


def batched(sess, feeds: Sequence[Feed], reference: Sequence[Sequence[np.ndarray]]):
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


def searched(plan: Plan) -> list[str]:
    """The activations whose ranges the searches move: the main graph's, tied ones left out
    (they take their source's after the search), and those that only weight-only layers read (not
    in the model). A tensor no layer reads (a layer's output-side Q under full node units) is a
    main-graph one."""
    inner = {lp.target.act for lp in plan.layers if lp.target.graph}
    outer = {lp.target.act for lp in plan.layers if not lp.target.graph}
    unread = unrounded_inputs(plan)
    return sorted(a for a in plan.acts if a not in plan.tied and a not in unread and (a in outer or a not in inner))


def _scaled(start: Mapping[str, ActQuant], names, cfg: ConvertConfig, x: np.ndarray) -> dict[str, ActQuant]:
    """`start` with tensor i's range multiplied by exp(x[i])."""
    out = dict(start)
    for i, a in enumerate(names):
        q, k = start[a], float(np.exp(x[i]))
        out[a] = act_quant(q.lo * k, q.hi * k, cfg.act_bits, q.signed, "lapq")
    return out


class _Search:
    """The state of one search: the session, the budget, and the best point seen."""

    def __init__(self, search: SearchSession, plan: Plan, cfg: ConvertConfig, progress: Progress | None):
        self.search, self.cfg, self.progress = search, cfg, progress
        self.names = search.names
        self.budget = cfg.search_evals
        self.start_loss = search.loss(plan.acts)
        self.loss, self.acts, self.how = self.start_loss, dict(plan.acts), cfg.act_method_name

    def consider(self, acts: dict[str, ActQuant], how: str) -> float:
        value = self.search.loss(acts)
        if value < self.loss:
            self.loss, self.acts, self.how = value, acts, how
        if self.progress:
            self.progress(f"search loss {self.loss:.4g}", min(self.search.evals, self.budget), self.budget)
        return value

    def starts(self, stats: Mapping[str, ActStats], base: Mapping[str, ActQuant]) -> dict:
        """Every single-tensor method and the Lp family (p* from a quadratic fit over P_GRID)."""
        method = lambda spec: self.consider(method_acts(stats, self.names, base, self.cfg, spec, "lapq"), spec)  # noqa: E731
        singles = {m: method(m) for m in START_METHODS}
        grid = [method(f"lp:{p}") for p in P_GRID]
        a2, a1, _ = np.polyfit(P_GRID, grid, 2)
        p_star = float(np.clip(-a1 / (2 * a2), P_GRID[0], P_GRID[-1])) if a2 > 0 else P_GRID[int(np.argmin(grid))]
        method(f"lp:{p_star:.3f}")
        return {"single_method_losses": singles, "p_grid": dict(zip(map(str, P_GRID), grid)), "p_star": p_star}

    def coordinate(self, start: Mapping[str, ActQuant]) -> np.ndarray:
        """Coordinate passes in graph order, each with half the step of the one before."""
        x = np.zeros(len(self.names))
        for p in range(COORD_PASSES):
            for i in range(len(self.names)):
                x = self._step(start, x, i, COORD_STEP / 2**p)
        return x

    def _step(self, start, x: np.ndarray, i: int, step: float) -> np.ndarray:
        """x moved by -step or +step along tensor i if either lowers the loss, else x."""
        for sign in (-1.0, 1.0):
            if self.search.evals >= self.budget:
                break
            trial = x.copy()
            trial[i] += sign * step
            before = self.loss
            self.consider(_scaled(start, self.names, self.cfg, trial), "coordinate")
            if self.loss < before:
                return trial
        return x

    def powell(self, start: Mapping[str, ActQuant], x: np.ndarray) -> None:
        """Powell's method on what is left of the evaluation budget."""
        from scipy.optimize import minimize     # imported on first use: the command line starts faster

        n = len(self.names)
        if n and self.budget > self.search.evals + 2 * n:
            minimize(lambda v: self.consider(_scaled(start, self.names, self.cfg, v), "powell"), x,
                     method="Powell", bounds=[POWELL_BOUNDS] * n,
                     options={"maxfev": self.budget - self.search.evals, "xtol": 1e-2, "ftol": 1e-4})


def lapq_search(prepared: "onnx.ModelProto", plan: Plan, stats: Mapping[str, ActStats],
                ref_feeds: Sequence[Feed], reference: Sequence[Sequence[np.ndarray]], cfg: ConvertConfig,
                progress: Progress | None = None, check_feeds: Sequence[Feed] = (),
                check_reference: Sequence[Sequence[np.ndarray]] = ()) -> tuple[dict[str, ActQuant], SearchSummary]:
    """Searched activation parameters and a summary of the search.

    Starts from the best of every single-tensor method and of the Lp family, then refines each
    tensor's range jointly: coordinate passes, then Powell's method on what is left of the
    evaluation budget. With `check_feeds` (calibration samples the search did not see), the
    start, the coordinate result and the final point are compared on them and the best is
    returned: dozens of ranges fitted on a few samples can overfit them."""
    session_ = SearchSession(prepared, plan, ref_feeds, reference)
    order = {lp.target.act: i for i, lp in reversed(list(enumerate(plan.layers)))}
    session_.names.sort(key=lambda a: (order.get(a, len(order)), a))     # graph order
    s = _Search(session_, plan, cfg, progress)
    found = s.starts(stats, plan.acts)
    start, start_how, single_best = s.acts, s.how, s.loss
    x = s.coordinate(start)
    stages = {"start": (single_best, start), "coordinate": (s.loss, s.acts)}
    s.powell(start, x)
    stages["powell"] = (s.loss, s.acts)
    kept, check = "powell", {}
    if len(check_feeds):
        held = session_.on(check_feeds, check_reference)
        check = {k: held.loss(acts) for k, (_, acts) in stages.items()}
        kept = min(check, key=lambda k: (check[k], k != "start"))
    info = SearchSummary(start_loss=s.start_loss, **found, start=start_how, loss_before=single_best,
                         loss_after=s.loss, final=s.how, evaluations=session_.evals, tensors=len(s.names),
                         check_losses=check, kept=kept, check_samples=len(check_feeds))
    return stages[kept][1], info
