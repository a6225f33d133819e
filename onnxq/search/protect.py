"""Low-bit layers measured on the network: the rounding method chosen per model, and sensitive
layers kept at 8 bits within a small size budget (--protect).

At <= 4 bits a few layers usually carry most of the network's error. Each low-bit layer's harm
is measured on the network with the activations quantized as they will be (one probe feed per
layer: that layer at its low-bit weights, the others float); the layers with the most harm per
extra byte move to 8 bits until the budget (a fraction of the uniform low-bit weight bytes) is
spent. The protected set is kept only if the whole network, every layer at its chosen bits,
is closer to FP32 than uniform low bits on calibration samples the harm was not measured on.
Embedding tables are weighed like layers: a small table every token reads (a transformer's
position embeddings) can cost the network more per byte than any MatMul, and a large vocabulary
rarely fits the budget (MiniLM-L6: docs/results.md, round 25).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from ..config import ConvertConfig
from ..plan.layers import dequantized, per_channel_bytes, plan_layer, weight_bytes
from ..plan.shared import one_per_weight, shared_keys, weight_key
from ..types import ActQuant, Feed, LayerPlan, LayerStats, ProtectSummary, Progress, RoundingChoice
from .probe import TAILS, Probe

if TYPE_CHECKING:
    import onnx

HARM_SAMPLES = 4       # samples each layer's harm is measured on (one run a layer and sample)
CHECK_SAMPLES = 8      # the next samples, on which the protected set must beat uniform low bits
PROTECT_BITS = 8


def budget_bytes(layers: Sequence[LayerPlan], cfg: ConvertConfig) -> float:
    """What --protect may spend: cfg.protect of the bytes the quantized weights take in the
    uniform format (one scale per output channel; tables in their own blocks, which --block does
    not set), less what --block's blocked scales (Gemm/MatMul, convs) add over that: the weights
    stay within cfg.protect of a uniform conversion's. A weight several layers read is stored, and
    counted, once."""
    coded = one_per_weight([lp for lp in layers if lp.codes is not None])
    blocks = sum(weight_bytes(lp) - per_channel_bytes(lp) for lp in coded if lp.block and lp.target.op != "Gather")
    uniform = sum(weight_bytes(lp) for lp in coded) - blocks
    return max(cfg.protect * uniform - blocks, 0.0)


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
                   judge: Probe | None = None) -> tuple[list[LayerPlan], ProtectSummary | None]:
    """`layers` with the protected ones re-planned at 8 bits, and what the choice measured;
    `judge`, the check_probe when the caller already has one."""
    low = [lp for lp in layers if _low_bit(lp, cfg)]
    if not low:
        return layers, None
    targets = [lp.target for lp in layers if not lp.target.graph]
    fit = Probe(prepared, targets, weights, loaders[:HARM_SAMPLES], biases, acts, tails=TAILS)
    base = fit({})
    harm = {}
    for i, lp in enumerate(low):
        harm[lp.target.node] = fit({lp.target.node: dequantized(lp)}) - base
        if progress:
            progress("layer harm", i + 1, len(low))
    extra = {lp.target.node: per_channel_bytes(lp, PROTECT_BITS) - weight_bytes(lp) for lp in low}
    budget = budget_bytes(layers, cfg)
    # a reader of a weight other layers read too is not raised alone: the weight would be stored
    # once per reader (plan/shared.py), past what the budget counts
    shared = shared_keys(layers)
    alone = {lp.target.node for lp in low if weight_key(lp) not in shared}
    chosen, used = [], 0.0
    for node in sorted(harm, key=lambda n: (-harm[n] / max(extra[n], 1.0), n)):
        if harm[node] <= 0:
            break
        if node in alone and used + extra[node] <= budget:
            chosen.append(node)
            used += extra[node]
    summary = ProtectSummary(budget_bytes=budget, used_bytes=used, harm=harm, protected=[])
    if not chosen:
        return layers, summary
    by_node = {lp.target.node: lp for lp in layers}
    # the low-bit conversion's method at 8 bits (mse by default: second-order rounding of the raised
    # layers measured mixed), not an 8-bit conversion's
    eight = dataclasses.replace(cfg, bits=PROTECT_BITS, weight_method=cfg.weight_method_for(PROTECT_BITS))
    raised = {n: plan_layer(by_node[n].target, weights[n], biases.get(n), layer_stats.get(n), eight)
              for n in chosen}
    for n, lp in raised.items():
        lp.note = f"protected: kept at {PROTECT_BITS} bits (the most harm to the network at {cfg.bits} bits)"
    if judge is None:
        judge = check_probe(prepared, layers, weights, biases, loaders, acts) if len(loaders) > HARM_SAMPLES else fit
    uniform = {lp.target.node: dequantized(lp) for lp in low}
    summary.check_before = judge(uniform)
    summary.check_after = judge({**uniform, **{n: dequantized(lp) for n, lp in raised.items()}})
    if summary.check_after >= summary.check_before:
        summary.used_bytes = 0.0
        return layers, summary
    summary.protected = sorted(chosen)
    return [raised.get(lp.target.node, lp) for lp in layers], summary
