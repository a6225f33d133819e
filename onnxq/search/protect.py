"""Low-bit layers measured on the network: the rounding method chosen per model, and sensitive
layers kept at 8 bits within a small size budget (--protect).

At <= 4 bits a few layers usually carry most of the network's error. Each low-bit layer's harm
is measured on the network with the activations quantized as they will be (one probe feed per
layer: that layer at its low-bit weights, the others float). The budget is a fraction of the
uniform low-bit weight bytes with one scale per output channel, and it buys, for each layer,
one of: per-channel scales (what the budget starts from), its blocked scales (--block, where
the file stores them smaller per channel), or 8 bits; each option's harm is measured, and the
options with the most harm removed per byte are bought first. Blocks are not paid for ahead of
protection: on a CRNN reader whose LSTM blocks took the whole budget, nothing could be protected
(docs/results.md, round 46). The choice is kept only if the whole network, every layer as chosen,
is closer to FP32 than the conversion as planned on calibration samples the harm was not
measured on. A weight several layers read (an unrolled loop's steps) is weighed and changed for
all its readers at once: it stays stored once. Embedding tables are weighed like layers: a small
table every token reads (a transformer's position embeddings) can cost the network more per byte
than any MatMul, and a large vocabulary rarely fits the budget (MiniLM-L6: docs/results.md,
round 25).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import TYPE_CHECKING, Callable, Collection, Mapping, Sequence

import numpy as np

from ..config import ConvertConfig
from ..plan.hot import hot_bytes, within
from ..plan.layers import dequantized, per_channel_bytes, plan_once, plan_table, weight_bytes
from ..plan.shared import one_per_weight, weight_key
from ..types import ActQuant, Feed, LayerPlan, LayerStats, ProtectSummary, Progress, RoundingChoice
from .probe import TAILS, Probe

if TYPE_CHECKING:
    import onnx

HOT_BUDGET_SHARE = 0.25   # of --protect's budget, what tables' hot rows may take at most (plan/hot.py)
HARM_SAMPLES = 4       # samples each layer's harm is measured on (one run a layer and sample)
CHECK_SAMPLES = 8      # the next samples, on which the protected set must beat uniform low bits
PROTECT_BITS = 8


def budget_bytes(layers: Sequence[LayerPlan], cfg: ConvertConfig, bought: Collection[str] = ()) -> float:
    """What --protect may spend: cfg.protect of the bytes the quantized weights take in the
    uniform format (one scale per output channel; tables in their own blocks, which --block does
    not set), less what --block's blocked scales (Gemm/MatMul, convs) add over that, except the
    blocks of the layers in `bought`, which the budget buys or not, and less the tables' hot rows
    (plan/hot.py; paid first, within HOT_BUDGET_SHARE of the budget: cap_hot_rows): the weights stay within
    cfg.protect of a uniform conversion's. A weight several layers read is stored, and counted,
    once."""
    coded, blocks, uniform = _uniform(layers)
    hot = sum(hot_bytes(lp, weight_bytes) for lp in coded)      # tables' hot rows: paid first (plan/hot.py)
    return max(cfg.protect * uniform - sum(b for n, b in blocks.items() if n not in bought) - hot, 0.0)


def _uniform(layers: Sequence[LayerPlan]) -> tuple[list[LayerPlan], dict[str, float], float]:
    """(the coded layers, one per stored weight; the blocked ones' extra bytes by node; the bytes
    of the uniform format)."""
    coded = one_per_weight([lp for lp in layers if lp.codes is not None])
    blocks = {lp.target.node: _block_bytes(lp) for lp in coded if lp.block and lp.target.op != "Gather"}
    return coded, blocks, sum(weight_bytes(lp) for lp in coded) - sum(blocks.values())


def cap_hot_rows(layers: list[LayerPlan], weights: Mapping[str, np.ndarray], cfg: ConvertConfig) -> list[LayerPlan]:
    """The tables' hot rows within HOT_BUDGET_SHARE of the budget (the most read rows that fit):
    in a small model they would otherwise take all of it (a 2000-row table read in 24 random
    samples left nothing for the position table that costs the network most)."""
    cap = HOT_BUDGET_SHARE * cfg.protect * _uniform(layers)[2]
    return [within(lp, weights[lp.target.node], cfg, cap, plan_table, weight_bytes) for lp in layers]


def _block_bytes(lp: LayerPlan) -> float:
    """What a blocked layer's scales (and zero points) add over one scale per output channel."""
    return weight_bytes(lp) - per_channel_bytes(lp)


def blocks_bought(lp: LayerPlan, cfg: ConvertConfig) -> bool:
    """Whether a low-bit layer's blocks are the budget's to buy: blocked, and smaller per channel
    in the file (not a Gemm/MatMul that onnxruntime's MatMulNBits stores in blocks either way)."""
    return bool(lp.block) and lp.target.op != "Gather" and not (
        cfg.rules.ms_kernels and lp.target.op in ("Gemm", "MatMul"))


def lower_hull(options: Sequence[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The options (bytes, harm, name) worth buying, cheapest first: each dearer one removes
    harm, and at a rate per byte no higher than the one before it (the lower convex hull)."""
    out: list[tuple[float, float, str]] = []
    for o in sorted(options, key=lambda o: (o[0], o[1])):
        if out and o[1] >= out[-1][1]:
            continue
        while len(out) >= 2 and _rate(out[-2], out[-1]) <= _rate(out[-1], o):
            out.pop()
        out.append(o)
    return out


def _rate(a: tuple, b: tuple) -> float:
    return (a[1] - b[1]) / max(b[0] - a[0], 1.0)


def buy(options: Mapping[str, Sequence[tuple[float, float, str]]], budget: float) -> tuple[dict[str, str], float]:
    """Each layer's option (bytes over its cheapest, harm to the network, name) within `budget`:
    every layer starts at its cheapest; the steps along the layers' lower hulls are taken the most
    harm removed per byte first, as long as they fit, none that removes no harm.
    -> (layer -> option name, bytes spent)."""
    hulls = {n: lower_hull(o) for n, o in options.items()}
    steps = sorted(((_rate(h[i], h[i + 1]), n, i) for n, h in hulls.items() for i in range(len(h) - 1)),
                   key=lambda s: (-s[0], s[1], s[2]))
    at = dict.fromkeys(hulls, 0)
    used = 0.0
    for rate, n, i in steps:
        cost = hulls[n][i + 1][0] - hulls[n][i][0]
        if rate > 0 and at[n] == i and used + cost <= budget:
            at[n], used = i + 1, used + cost
    return {n: hulls[n][at[n]][2] for n in hulls}, used


def _low_bit(lp: LayerPlan, cfg: ConvertConfig) -> bool:
    t = lp.target
    return (not t.graph and lp.bits == cfg.bits and lp.bits < PROTECT_BITS
            and lp.codes is not None and not lp.note)         # a note: the user's override or a rule


def check_probe(prepared: "onnx.ModelProto", layers: Sequence[LayerPlan], weights: Mapping[str, np.ndarray],
                biases: Mapping[str, np.ndarray], loaders: Sequence[Callable[[], Feed]],
                acts: Mapping[str, ActQuant] | None) -> Probe:
    """The network probe on the calibration samples after the harm samples: the whole-network
    checks (rounding choice, protected set) are judged there."""
    check = loaders[HARM_SAMPLES:HARM_SAMPLES + CHECK_SAMPLES] or loaders[:HARM_SAMPLES]
    return Probe(prepared, [lp.target for lp in layers if not lp.target.graph], weights, check, biases, acts)


def choose_rounding(judge: Probe, variants: Mapping[str, list[LayerPlan]], cfg: ConvertConfig) -> RoundingChoice:
    """Which weight method's low-bit layers (e.g. second-order rounding or per-channel clipping)
    leave the network closest to FP32, every layer at once, on calibration samples the harm of
    single layers is not measured on. Neither wins everywhere: second-order rounding fits the
    calibration inputs of each layer, and on some nets that fit does not carry over."""
    losses = {name: judge({lp.target.node: dequantized(lp) for lp in layers if _low_bit(lp, cfg)})
              for name, layers in variants.items()}
    return RoundingChoice(losses=losses, chosen=min(losses, key=lambda k: (losses[k], k)),
                          samples=len(judge.feeds))


def protect_layers(prepared: "onnx.ModelProto", layers: list[LayerPlan], weights: Mapping[str, np.ndarray],
                   biases: Mapping[str, np.ndarray], layer_stats: Mapping[str, LayerStats],
                   loaders: Sequence[Callable[[], Feed]], cfg: ConvertConfig,
                   acts: Mapping[str, ActQuant] | None, progress: Progress | None = None,
                   judge: Probe | None = None, method: str | None = None, tails: int = TAILS
                   ) -> tuple[list[LayerPlan], ProtectSummary | None]:
    """`layers` with the protected ones re-planned at 8 bits (and blocked ones the budget bought
    no blocks for, per channel), and what the choice measured; `judge`, the check_probe when the
    caller already has one; `method`, the low-bit layers' weight method where a choice settled it."""
    layers = cap_hot_rows(layers, weights, cfg)
    low = [lp for lp in layers if _low_bit(lp, cfg)]
    if not low:
        return layers, None
    units = weight_units(layers, low)
    plan = lambda names, c: _planned(units, names, weights, biases, layer_stats, c)   # noqa: E731
    flat = plan([n for n, g in units.items() if blocks_bought(g[0], cfg)],
                dataclasses.replace(cfg, block=0, weight_method=method or cfg.weight_method))
    fit = Probe(prepared, [lp.target for lp in layers if not lp.target.graph], weights, loaders[:HARM_SAMPLES],
                biases, acts, tails=tails)
    harm = _harms(fit, units, progress)
    # per channel, a layer harms the network as blocked, scaled by how much more its output error
    # grows on its own inputs (the layer objective: exact where four samples' network loss is not)
    flat_harm = {n: max(harm[n], 0.0) * 10 ** ((units[n][0].sqnr_db - g[0].sqnr_db) / 10) for n, g in flat.items()}
    budget = budget_bytes(layers, cfg, {lp.target.node for n in flat for lp in units[n]})
    blocks = sum(_block_bytes(units[n][0]) for n in flat)
    choices = {  # the blocks paid first (the rest protects), and every option bought by harm per byte
        FIRST: buy({n: _options(g[0], harm[n]) for n, g in units.items()}, max(budget - blocks, 0.0)),
        PER_BYTE: buy({n: _options(g[0], harm[n], flat.get(n), flat_harm.get(n)) for n, g in units.items()}, budget)}
    summary = ProtectSummary(budget_bytes=budget, used_bytes=blocks, harm=harm, protected=[], flat_harm=flat_harm)
    # the low-bit conversion's method at 8 bits (mse by default: second-order rounding of the raised
    # layers measured mixed), not an 8-bit conversion's; each unit planned once for both rules
    eight = plan(sorted({n for picked, _ in choices.values() for n, o in picked.items() if o == EIGHT}),
                 dataclasses.replace(cfg, bits=PROTECT_BITS, weight_method=cfg.weight_method_for(PROTECT_BITS)))
    changes = {rule: _changed(picked, flat, eight, cfg) for rule, (picked, _) in choices.items()}
    changes = {rule: c for rule, c in changes.items() if c}
    if not changes:
        return layers, summary
    if judge is None:
        judge = check_probe(prepared, layers, weights, biases, loaders, acts) if len(loaders) > HARM_SAMPLES else fit
    uniform = {lp.target.node: dequantized(lp) for lp in low}
    summary.check_before = judge(uniform)
    losses = {rule: judge({**uniform, **{lp.target.node: dequantized(lp) for g in c.values() for lp in g}})
              for rule, c in changes.items()}
    rule = min(losses, key=lambda r: (losses[r], r))
    summary.check_after, summary.rules = losses[rule], losses
    if summary.check_after >= summary.check_before:
        return layers, summary
    new = {lp.target.node: lp for g in changes[rule].values() for lp in g}
    summary.rule, summary.used_bytes = rule, choices[rule][1] + (blocks if rule == FIRST else 0.0)
    summary.protected = sorted(n for n, lp in new.items() if lp.bits == PROTECT_BITS)
    summary.per_channel = sorted(set(new) - set(summary.protected))
    return [new.get(lp.target.node, lp) for lp in layers], summary


EIGHT, FLAT, AS_PLANNED = "8 bits", "per channel", "as planned"
FIRST, PER_BYTE = "blocks first", "by harm per byte"


def _changed(picked: Mapping[str, str], flat: Mapping[str, list[LayerPlan]], eight: Mapping[str, list[LayerPlan]],
             cfg: ConvertConfig) -> dict[str, list[LayerPlan]]:
    """The units a choice changes, as it picked them (copies of their 8-bit or per-channel plans,
    with the note that says why)."""
    out = {n: [dataclasses.replace(lp) for lp in (eight[n] if o == EIGHT else flat[n])]
           for n, o in picked.items() if o in (EIGHT, FLAT)}
    for n, g in out.items():
        for lp in g:
            lp.note = (f"protected: kept at {PROTECT_BITS} bits (the most harm to the network at {cfg.bits} bits)"
                       if picked[n] == EIGHT else "per channel: --protect's budget took more harm off elsewhere "
                       "than its blocks would")
    return out


def weight_units(layers: Sequence[LayerPlan], low: Sequence[LayerPlan]) -> dict[str, list[LayerPlan]]:
    """The low-bit layers by the stored weight they read, named by its first reader: a weight is
    raised or unblocked for all its readers at once (it stays stored once), and only where every
    reader of it is a low-bit layer."""
    readers = Counter(weight_key(lp) for lp in layers)
    out: dict[tuple, list[LayerPlan]] = {}
    for lp in low:
        out.setdefault(weight_key(lp), []).append(lp)
    return {g[0].target.node: g for k, g in out.items() if len(g) == readers[k]}


def _planned(units: Mapping[str, list[LayerPlan]], names: Sequence[str], weights: Mapping[str, np.ndarray],
             biases: Mapping[str, np.ndarray], stats: Mapping[str, LayerStats],
             cfg: ConvertConfig) -> dict[str, list[LayerPlan]]:
    """The named units' readers planned under `cfg` (a weight its readers pool statistics for
    coded once for all of them)."""
    memo: dict = {}
    return {n: [plan_once(memo, lp.target, weights[lp.target.node], biases.get(lp.target.node),
                          stats.get(lp.target.node), cfg) for lp in units[n]] for n in names}


def _harms(fit: Probe, units: Mapping[str, list[LayerPlan]], progress: Progress | None) -> dict[str, float]:
    """The network loss each unit's plans add on the fit samples, those layers alone quantized. A
    table's hot rows are left out: they are the rows these calibration samples read, so with them
    a table would look nearly harmless here and not on text they miss (a position table's rows past
    the calibration's longest sample)."""
    base = fit({})
    out = {}
    for i, (name, group) in enumerate(units.items()):
        out[name] = fit({lp.target.node: dequantized(dataclasses.replace(lp, hot=None)) for lp in group}) - base
        if progress:
            progress("layer harm", i + 1, len(units))
    return out


def _options(lp: LayerPlan, harm: float, flat: LayerPlan | None = None, flat_harm: float | None = None) -> list[tuple]:
    """A low-bit layer's choices (bytes over the cheapest, harm, name): as planned or at 8 bits;
    given its per-channel plan, per channel (the cheapest), as planned (blocked), or at 8 bits."""
    eight = per_channel_bytes(lp, PROTECT_BITS)
    if flat is None:
        return [(0.0, harm, AS_PLANNED), (eight - weight_bytes(lp), 0.0, EIGHT)]
    return [(0.0, flat_harm, FLAT), (_block_bytes(lp), harm, AS_PLANNED), (eight - per_channel_bytes(lp), 0.0, EIGHT)]
