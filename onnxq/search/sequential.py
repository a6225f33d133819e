"""Sequential mode: the planned layers are coded again stage by stage in graph order, each on the
input it really receives. Before each stage, the model with the earlier stages quantized (and
every activation QDQ before them) and the FP32 model run side by side on calibration samples,
and the stage's first layers (those with no target of the same stage upstream) are solved to map
their quantized input, own activation QDQ included, back onto the FP32 output
(plan.layers.plan_compensated), at the bits and on the grid (blocks or not) the one-pass plan
gave them.

A stage is made of whole levels (layers that never read each other's output) and closes once it
holds its share of the weights: by default as many stages as layers, so a heavy level stands
alone and consecutive light ones share a stage (rec: 29 stages for 47 layers, EfficientNet-Lite1
30 for 65, YOLOv8n 36 for 64, MiniLM 25 for 39, its depth). The runs of a stage compute only the
part of the model past what earlier stages kept (calib.collect.Frontier), so the whole sequence
costs about one extra pass over the model. A stage's later layers keep their one-pass codes: once
its first layers have absorbed the upstream error, their inputs are close to FP32 again, and
compensating the same error twice would overshoot."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from ..calib.collect import Frontier, collect_paired
from ..config import ConvertConfig
from ..graph.rewrite import apply_plan
from ..graph.targets import target_ancestors
from ..plan.biases import code_biases, weight_only
from ..plan.layers import plan_compensated
from ..plan.shared import shared_keys, weight_key
from ..types import Feed, LayerPlan, Plan, Progress, Target

if TYPE_CHECKING:
    import onnx

# a layer is compensated only when its paired input rows outnumber its inputs K this many times:
# V = W C Hq^-1 fitted on fewer rows learns the calibration samples (a classifier's last Gemm,
# one row a sample: EfficientNet-Lite1 top-1 agreement 0.775 with it kept one-pass, 0.733 with it
# compensated on 64 rows for K = 1280)
FIT_ROWS = 4


def levels(targets: Sequence[Target], ancestors: Mapping[str, set[str]]) -> dict[str, int]:
    """Each target's depth among the targets: 0 with none upstream, else one more than the deepest
    upstream. Targets of one level never read each other's output."""
    level: dict[str, int] = {}
    for t in targets:                                     # graph order: upstream ones first
        level[t.node] = 1 + max((level[a] for a in ancestors.get(t.node, ()) if a in level), default=-1)
    return level


def stages(targets: Sequence[Target], ancestors: Mapping[str, set[str]], n: int) -> list[list[Target]]:
    """Split targets into at most n stages of whole levels, of about equal weight count (a stage
    closes once it holds its 1/n share: light consecutive levels share one)."""
    level = levels(targets, ancestors)
    units: dict[int, list[Target]] = {}
    for t in targets:
        units.setdefault(level[t.node], []).append(t)
    total = sum(t.params for t in targets) or 1
    out: list[list[Target]] = [[]]
    acc = 0
    for k in sorted(units):
        if acc >= total * len(out) / n and out[-1]:
            out.append([])
        out[-1].extend(units[k])
        acc += sum(t.params for t in units[k])
    return out


def sequential_layers(prepared: "onnx.ModelProto", plan: Plan, loaders: Sequence[Callable[[], Feed]],
                      weights: Mapping[str, np.ndarray], biases: Mapping[str, np.ndarray],
                      cfg: ConvertConfig, progress: Progress | None = None) -> list[LayerPlan]:
    """The plan's layers (one-pass, in target order) with each stage's first layers coded again
    on their quantized input. A weight several layers read keeps its one coding."""
    layers = plan.layers
    targets = [lp.target for lp in layers]
    ancestors = target_ancestors(prepared, targets)
    shared = shared_keys(layers)
    out = {lp.target.node: lp for lp in layers}
    groups = stages(targets, ancestors, cfg.stages or len(targets))
    done: list[LayerPlan] = []
    samples = loaders[:cfg.sequential_samples]
    feeds = [load() for load in samples] if Frontier.fits(prepared) else None
    frontiers = (Frontier(feeds), Frontier(feeds)) if feeds is not None else None
    for s, chunk in enumerate(groups):
        names = {t.node for t in chunk}
        first = [t for t in chunk if t.node in ancestors and not (ancestors[t.node] & names)
                 and out[t.node].codes is not None and t.op != "Gather" and weight_key(out[t.node]) not in shared]
        if first:                   # else nothing this stage can fit: no partial model to build
            _fit_stage(prepared, plan, done, first, out, samples, frontiers, weights, biases, cfg, cfg.seed + s)
        done.extend(out[t.node] for t in chunk)
        if progress:
            progress("sequential", s + 1, len(groups))
    return [out[lp.target.node] for lp in layers]


def _fit_stage(prepared: "onnx.ModelProto", plan: Plan, done: list[LayerPlan], first: list[Target],
               out: dict[str, LayerPlan], samples: Sequence[Callable[[], Feed]], frontiers,
               weights: Mapping[str, np.ndarray], biases: Mapping[str, np.ndarray], cfg: ConvertConfig,
               seed: int) -> None:
    """Code the stage's first layers again (in `out`) on the input the model with `done` quantized
    feeds them."""
    # nothing quantized yet: the partial model is the FP32 one (its run is shared)
    partial = apply_plan(prepared, code_biases(dataclasses.replace(plan, layers=done, biases={}))) if done \
        else prepared
    # a layer the target runs on float input (int4 weight-only kernels) sees no QDQ of its own
    own = {t.act: plan.acts[t.act] for t in first if t.act in plan.acts and not weight_only(plan, out[t.node])}
    paired = collect_paired(prepared, partial, first, samples, own, rows_per_sample=cfg.rows_per_sample,
                            seed=seed, frontiers=frontiers)
    for t in first:
        if t.node in paired and paired[t.node].quant.rows >= FIT_ROWS * paired[t.node].cross.shape[-1]:
            lp = out[t.node]
            out[t.node] = plan_compensated(t, weights[t.node], biases.get(t.node), paired[t.node], cfg,
                                           bits=lp.bits, note=lp.note, block=lp.block)
