"""A network-level probe: one onnxruntime session of the float model whose weights are graph
inputs, so "how far from FP32 are the outputs if these layers get these weights?" is one feed,
never a rebuilt model. Mixed precision (bit costs) and the low-rank branches (per-layer
sensitivity, end-to-end check) both ask it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from ..algos.metrics import divergence
from ..graph.variants import weights_as_inputs, with_act_qdq
from ..runtime import session
from ..types import ActQuant, Feed, Target

if TYPE_CHECKING:
    import onnx


class Probe:
    """Divergence of the network's outputs from FP32 when some main-graph layers take other
    weights (in their original layout) and biases; the rest keep their float values. Biases
    matter: a quantized layer's corrected bias cancels its mean shift, which would otherwise
    dominate what the probe measures."""

    def __init__(self, prepared: "onnx.ModelProto", targets: Sequence[Target],
                 weights: Mapping[str, np.ndarray], loaders: Sequence[Callable[[], Feed]],
                 biases: Mapping[str, np.ndarray] | None = None,
                 acts: Mapping[str, ActQuant] | None = None):
        """With `acts`, the probed model carries those activation QDQ pairs (weights stay
        inputs), so what it measures includes activation quantization; the reference is still
        the FP32 model."""
        self.targets = [t for t in targets if not t.graph]
        biases = biases or {}
        self.bias_of = {t.node: t.bias for t in self.targets if t.bias and t.node in biases}
        params = [t.weight for t in self.targets] + list(self.bias_of.values())
        probed = with_act_qdq(prepared, self.targets, dict(acts)) if acts else prepared
        self.sess = session(weights_as_inputs(probed, params))
        self.names = [o.name for o in self.sess.get_outputs()]
        self.feeds = [load() for load in loaders]
        self.base = {t.weight: np.asarray(weights[t.node], np.float32) for t in self.targets}
        self.base.update({b: np.asarray(biases[n], np.float32) for n, b in self.bias_of.items()})
        self.weight_of = {t.node: t.weight for t in self.targets}
        if acts:
            ref = session(prepared)
            self.ref = [ref.run(self.names, f) for f in self.feeds]
        else:
            self.ref = [self.sess.run(self.names, {**f, **self.base}) for f in self.feeds]

    def __call__(self, layer_weights: Mapping[str, "np.ndarray | tuple"]) -> float:
        """Mean divergence over the probe's samples; `layer_weights` maps node -> weight, or
        node -> (weight, bias or None)."""
        trial = dict(self.base)
        for node, w in layer_weights.items():
            if isinstance(w, tuple):
                w, b = w
                if b is not None and node in self.bias_of:
                    trial[self.bias_of[node]] = np.asarray(b, np.float32).reshape(trial[self.bias_of[node]].shape)
            trial[self.weight_of[node]] = np.asarray(w, np.float32)
        return float(np.mean([divergence(r, self.sess.run(self.names, {**f, **trial}))
                              for f, r in zip(self.feeds, self.ref)]))
