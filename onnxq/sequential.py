"""Sequential mode: layers are quantized stage by stage in graph order, and each stage's input
statistics come from the model whose earlier stages are already quantized, so every layer's
rounding corrects the error it actually receives. A few passes over groups of layers, not one
pass per layer."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import onnx

from .calib.collect import collect
from .calib.data import Feed
from .config import ConvertConfig
from .graph.rewrite import apply_plan
from .planner import plan_acts, plan_layer
from .types import LayerPlan, LayerStats, Plan, Stats, Target

Progress = Callable[[str, int, int], None]


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


def sequential_layers(prepared: onnx.ModelProto, targets: Sequence[Target],
                      loaders: Sequence[Callable[[], Feed]], stats: Stats,
                      weights: Mapping[str, np.ndarray], biases: Mapping[str, np.ndarray],
                      cfg: ConvertConfig, progress: Progress | None = None
                      ) -> tuple[list[LayerPlan], dict[str, LayerStats]]:
    """Planned layers and the statistics each was planned with."""
    acts = plan_acts(stats.acts, cfg)
    used: dict[str, LayerStats] = {}
    done: list[LayerPlan] = []
    groups = stages(targets, cfg.stages)
    for s, chunk in enumerate(groups):
        layer_stats = stats.layers
        if s > 0:
            partial = apply_plan(prepared, Plan(layers=done, acts=acts))
            layer_stats = collect(partial, chunk, loaders, hessians=True, ranges=False,
                                  rows_per_sample=cfg.rows_per_sample, seed=cfg.seed).layers
        for t in chunk:
            ls = layer_stats.get(t.node)
            fm = stats.layers[t.node].mean if t.node in stats.layers else None
            done.append(plan_layer(t, weights[t.node], biases.get(t.node), ls, cfg, fm))
            if ls is not None:
                used[t.node] = ls
        if progress:
            progress("sequential", s + 1, len(groups))
    return done, used
