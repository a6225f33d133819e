"""Per-tensor choice of the activation range method by its effect on the network's outputs.

Every activation starts at the default range (plan/acts.SEARCH_START). Each tensor, in graph order, then tries the
other candidate methods' ranges (computed from the same histograms) and keeps one when it lowers
the network loss on fitting samples; tensors whose candidates barely differ are not tried, and
those whose candidates differ most are tried first, within an evaluation budget. The result is
kept only if it also beats the start on calibration samples the choice did not fit. Every
evaluation is one feed to the search session of search/lapq.py (QDQ parameters as inputs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from ..config import ConvertConfig
from ..plan.acts import act_quant, method_acts, method_range
from ..types import ActQuant, ActStats, ChoiceSummary, Feed, Plan, Progress
from .lapq import SearchSession

if TYPE_CHECKING:
    import onnx

CANDIDATES = ("percentile", "minmax", "mse")
# 'best' (the default at 8 bits): one method for the whole model, the one of these with the lowest
# network loss. No single one won on every model (docs/experiments/generalisation.md).
BEST_OF = ("percentile:99.99", "percentile:99.999", "mse")
SAME_RANGE = 0.1      # candidates within 10% of the current range's width are not tried
CHOICE_EVALS = 60     # network-loss evaluations at most (--search-evals lowers it)


def _candidates(st: ActStats, q: ActQuant, cfg: ConvertConfig) -> dict[str, ActQuant]:
    """The other methods' parameters for one tensor, when they differ from q's range enough."""
    out = {}
    for m in CANDIDATES:
        lo, hi = method_range(st, m, cfg.act_bits, q.signed)
        if abs((hi - lo) - (q.hi - q.lo)) > SAME_RANGE * max(q.hi - q.lo, 1e-12):
            out[m] = act_quant(lo, hi, cfg.act_bits, q.signed, m)
    return out


def best_method(prepared: "onnx.ModelProto", plan: Plan, stats: Mapping[str, ActStats],
                feeds: Sequence[Feed], reference, cfg: ConvertConfig) -> tuple[dict[str, ActQuant], ChoiceSummary]:
    """Every activation's range by the one method of BEST_OF that leaves the network closest to
    FP32 on `feeds` (one evaluation a method)."""
    sess = SearchSession(prepared, plan, feeds, reference)
    trials = {spec: method_acts(stats, sess.names, plan.acts, cfg, spec, spec) for spec in BEST_OF}
    losses = {spec: sess.loss(acts) for spec, acts in trials.items()}
    best = min(BEST_OF, key=lambda k: (losses[k], BEST_OF.index(k)))
    summary = ChoiceSummary(tensors=len(sess.names), tried=0, evaluations=sess.evals, loss_before=losses[BEST_OF[0]],
                            loss_after=losses[best], check_before=None, check_after=None, changed={},
                            kept=True, methods=losses, chosen=best)
    return trials[best], summary


def choose_ranges(prepared: "onnx.ModelProto", plan: Plan, stats: Mapping[str, ActStats],
                  fit: Sequence[Feed], fit_ref, check: Sequence[Feed], check_ref, cfg: ConvertConfig,
                  progress: Progress | None = None) -> tuple[dict[str, ActQuant], ChoiceSummary]:
    """Activation parameters with a method chosen per tensor, and what the choice measured."""
    sess = SearchSession(prepared, plan, fit, fit_ref)
    start = dict(plan.acts)
    options = {a: _candidates(stats[a], start[a], cfg) for a in sess.names}
    # widest disagreement first: those are the tensors whose range matters most to decide
    spread = {a: max((abs(np.log((c.hi - c.lo) / max(start[a].hi - start[a].lo, 1e-12))) for c in o.values()),
                     default=0.0) for a, o in options.items()}
    order = sorted((a for a in sess.names if options[a]), key=lambda a: -spread[a])
    best = dict(start)
    loss0 = loss = sess.loss(best)
    changed: dict[str, str] = {}
    budget = max(min(cfg.search_evals, CHOICE_EVALS), 1)
    for i, a in enumerate(order):
        for method, q in options[a].items():
            if sess.evals >= budget:
                break
            trial = {**best, a: q}
            value = sess.loss(trial)
            if value < loss:
                best, loss, changed[a] = trial, value, method
        if progress:
            progress("choosing ranges", min(sess.evals, budget), budget)
    held_start = held_best = None
    kept = bool(changed)
    if check and changed:
        held = sess.on(check, check_ref)
        held_start, held_best = held.loss(start), held.loss(best)
        kept = held_best < held_start
    if not kept:
        best = start
    summary = ChoiceSummary(tensors=len(sess.names), tried=len(order), evaluations=sess.evals,
                            loss_before=loss0, loss_after=loss, check_before=held_start, check_after=held_best,
                            changed=dict(sorted(changed.items())), kept=kept)
    return best, summary
