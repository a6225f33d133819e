"""Mixed precision: measure what each bit-width costs each layer, then allocate bits under a
size budget (algos/mixed.py). Costs are measured through onnxruntime with one session whose
weights are graph inputs, so every (layer, bits) trial is a feed, not a rebuilt model."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from ..algos.allocation import allocate_bits, predicted_cost
from ..config import ConvertConfig
from ..plan.layers import dequantized, plan_once, weight_bytes
from ..plan.shared import stored_weights
from ..types import Feed, LayerPlan, LayerStats, MixedSummary, Progress, Target
from .probe import TAILS, Probe

if TYPE_CHECKING:
    import onnx

TRIAL_SAMPLES = 8   # samples each (layer, bits) trial runs
NEAR_LOSSLESS = 8   # a widest choice this wide is not probed: its cost is predicted (widest_costs)


def _escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def widest_costs(next_costs: np.ndarray, widest: int, next_bits: int) -> np.ndarray:
    """The probe cost of each layer at the widest choice, predicted from its measured cost at the
    next one: rounding noise power falls 4x per bit, so 8 bits cost 1/256 of 4 bits. Only the
    differences between a layer's choices reach the allocation, and at 8 bits these are within
    the probe's own noise, so one probe run per layer is saved (a quarter of the search's runs
    with the default choices 8/4/3/2)."""
    return next_costs * 4.0 ** (next_bits - widest)


def _at_bits(cfg: ConvertConfig, b: int) -> ConvertConfig:
    """A layer's configuration at candidate width b: the conversion's weight method at b bits."""
    return dataclasses.replace(cfg, bits=b, depthwise_bits=min(cfg.bit_choices), bits_overrides=(),
                               weight_method=cfg.weight_method_for(b))


def choose_bits(prepared: "onnx.ModelProto", targets: Sequence[Target], weights: Mapping[str, np.ndarray],
                biases: Mapping[str, np.ndarray], layer_stats: Mapping[str, LayerStats],
                loaders: Sequence[Callable[[], Feed]], cfg: ConvertConfig,
                progress: Progress | None = None, tails: int = TAILS
                ) -> tuple[tuple[tuple[str, int], ...], MixedSummary, dict[str, LayerPlan]]:
    """Per-layer bits as exact-name overrides, what the allocation predicted, and the layers
    already planned at their chosen bits (the final plan reuses them; none when branches will be
    planned, as those need each layer's fitting statistics). Bits are chosen per stored weight:
    the readers of one weight take one width."""
    choices = sorted(cfg.bit_choices, reverse=True)
    probe = Probe(prepared, targets, weights, loaders[:TRIAL_SAMPLES], biases, tails=tails)
    groups = stored_weights(probe.targets)
    skip_widest = len(choices) > 1 and choices[0] >= NEAR_LOSSLESS
    costs = np.zeros((len(groups), len(choices)))
    sizes = np.zeros((len(groups), len(choices)))
    deq: dict[tuple[str, int], np.ndarray] = {}
    planned: dict[tuple[str, int], LayerPlan] = {}
    memo: dict = {}
    for gi, group in enumerate(groups):
        for ci, b in enumerate(choices):
            for t in group:        # readers pooling their statistics: the weight coded once a width
                lp = plan_once(memo, t, weights[t.node], biases.get(t.node), layer_stats.get(t.node), _at_bits(cfg, b))
                deq[(t.node, b)] = dequantized(lp)
                if cfg.rank_budget == 0:
                    planned[(t.node, b)] = dataclasses.replace(lp, fit_hessian=None, fit_target=None, input_mean=None)
            # --avg-bits counts weight bits; --max-size counts the bytes the file will hold:
            # codes in their INT4/INT8 containers plus their scales (the readers' weight once)
            sizes[gi, ci] = group[0].params * b if cfg.avg_bits is not None else 8 * weight_bytes(lp)
            if ci > 0 or not skip_widest:
                costs[gi, ci] = probe({t.node: deq[(t.node, b)] for t in group})
        if progress:
            progress("bit costs", gi + 1, len(groups))
    if skip_widest:
        costs[:, 0] = widest_costs(costs[:, 1], choices[0], choices[1])
    costs = np.maximum(costs - costs[:, :1], 0.0)          # the cost of a choice beyond the widest
    total_params = sum(g[0].params for g in groups)
    budget = cfg.size_budget_bits(total_params)
    # the allocators work on summed single-weight costs; interactions can make the sum lie, so
    # every candidate (annealed attention, greedy, the widest uniform width that fits) is
    # measured end to end and the best measured one is kept
    cands = {"anneal": allocate_bits(costs, sizes, budget, "anneal", np.random.default_rng(cfg.seed))[0],
             "greedy": allocate_bits(costs, sizes, budget, "greedy")[0]}
    for ci, b in enumerate(choices):
        if float(sizes[:, ci].sum()) <= budget + 1e-9:
            cands[f"uniform {b}"] = np.full(len(groups), ci)
            break
    each = lambda v: {t.node: choices[c] for g, c in zip(groups, v) for t in g}    # noqa: E731
    trials = {k: probe({n: deq[(n, b)] for n, b in each(v).items()}) for k, v in cands.items()}
    how = min(trials, key=lambda k: (trials[k], k))
    choice, measured = cands[how], trials[how]
    info = MixedSummary(
        allocator=how, budget_bits=budget, used_bits=float(sum(sizes[i, c] for i, c in enumerate(choice))),
        avg_bits=float(sum(g[0].params * choices[c] for g, c in zip(groups, choice)) / max(total_params, 1)),
        predicted_divergence=predicted_cost(costs, choice), measured_divergence=float(measured),
        measured_by_allocator=trials,
        predicted_by_allocator={k: predicted_cost(costs, v) for k, v in cands.items()},
        layers=each(choice),
        costs={t.node: dict(zip(map(str, choices), map(float, costs[i]))) for i, g in enumerate(groups) for t in g})
    kept = {n: planned[(n, b)] for n, b in info.layers.items() if (n, b) in planned}
    return tuple((_escape(n), b) for n, b in info.layers.items()), info, kept
