"""Sequential mode: layers are quantized stage by stage in graph order. After each stage, the
partly quantized model and the FP32 model run side by side on the calibration data, and the
first layers of the next stage (those with no unquantized target upstream inside their stage)
are solved to map the input they really receive back onto the FP32 output (planner.
plan_compensated). Other layers use the FP32 statistics: once the stage's first layers have
absorbed the upstream error, their inputs are close to FP32 again, and compensating the same
error twice would overshoot. A few passes over groups of layers, not one pass per layer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from ..calib.collect import collect_paired
from ..config import ConvertConfig
from ..graph.rewrite import apply_plan
from ..graph.targets import target_ancestors
from ..plan.acts import plan_acts
from ..plan.biases import code_biases
from ..plan.layers import plan_compensated, plan_layer
from ..types import Feed, LayerPlan, Plan, Progress, Stats, Target

if TYPE_CHECKING:
    import onnx


def stages(targets: Sequence[Target], n: int) -> list[list[Target]]:
    """Split targets (in graph order) into at most n stages of about equal weight count."""
    total = sum(t.params for t in targets) or 1
    out: list[list[Target]] = [[]]
    acc = 0
    for t in targets:
        if acc >= total * len(out) / n and out[-1]:
            out.append([])
        out[-1].append(t)
        acc += t.params
    return out


def sequential_layers(prepared: "onnx.ModelProto", targets: Sequence[Target],
                      loaders: Sequence[Callable[[], Feed]], stats: Stats,
                      weights: Mapping[str, np.ndarray], biases: Mapping[str, np.ndarray],
                      cfg: ConvertConfig, progress: Progress | None = None) -> list[LayerPlan]:
    acts = plan_acts(stats.acts, cfg)
    ancestors = target_ancestors(prepared, targets)
    done: list[LayerPlan] = []
    groups = stages(targets, cfg.stages)
    for s, chunk in enumerate(groups):
        names = {t.node for t in chunk}
        paired = {}
        if s > 0:
            first = [t for t in chunk if t.node in ancestors and not (ancestors[t.node] & names)]
            partial = apply_plan(prepared, code_biases(Plan(layers=done, acts=acts)))
            paired = collect_paired(prepared, partial, first, loaders[:cfg.sequential_samples], acts,
                                    rows_per_sample=cfg.rows_per_sample, seed=cfg.seed + s)
        for t in chunk:
            if t.node in paired:
                done.append(plan_compensated(t, weights[t.node], biases.get(t.node), paired[t.node], cfg))
            else:
                done.append(plan_layer(t, weights[t.node], biases.get(t.node), stats.layers.get(t.node), cfg))
        if progress:
            progress("sequential", s + 1, len(groups))
    return done
