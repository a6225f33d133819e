"""A network-level probe: one onnxruntime session of the float model whose weights are graph
inputs, so "how far from FP32 are the outputs if these layers get these weights?" is one feed,
never a rebuilt model. Mixed precision (bit costs) and the low-rank branches (per-layer
sensitivity, end-to-end check) both ask it.

A probe asked about single layers again and again (`tails`) also keeps sessions of the graph's
tails: a trial whose layers all sit late in the graph runs from the latest cut before them, fed
the float tensors cached at that cut, instead of from the graph's inputs. Nothing before a
changed layer can change, so the answer is the same; a layer halfway down costs half a run."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from ..algos.metrics import divergence, expected
from ..graph.large import is_large
from ..graph.variants import augmented, cut_names, tail, weights_as_inputs, with_act_qdq, with_zero_biases
from ..graph.walk import node_reads
from ..runtime import owned, session
from ..types import ActQuant, Feed, Target

if TYPE_CHECKING:
    import onnx

TAILS = 8                  # tail sessions a single-layer probe keeps (cuts spread over its layers)
# multiply-adds a sample under which a model keeps no tails: its whole runs cost less than the
# tails' sessions and cached cuts (digits CNN, 0.09 M: conversion 1.0 -> 0.55 s without; PP-OCR cls,
# 14 M: 13.3 / 14.8 s with, 13.2 / 11.5 s without, the same files; the 800 x 608 layout detector's gain
# is in docs/results.md, round 38; PP-OCR rec has 632 M)
TAIL_MIN_MACS = 1e8
TAIL_CACHE = 1 << 30       # most bytes of cut tensors a probe caches over all its samples (256 MiB kept 2 of
                           # 7 cuts of an 800 x 608 detector's 16 samples, 1 GiB 5: 306 -> 249 s, peak unchanged)


@dataclasses.dataclass
class Tail:
    start: int                        # index of the tail's first node in the main graph
    sess: object                      # its onnxruntime session
    cached: list[dict[str, np.ndarray]]   # per sample: the cut tensors' float values
    inputs: set[str]                  # every name it takes (graph inputs and cut tensors)
    outputs: list[str]                # the graph outputs it computes


def keep_tails(model: "onnx.ModelProto", positions, count: int, feeds: Sequence[Feed],
               all_outputs: bool = False) -> list[Tail]:
    """Tails of `model` from up to count - 1 cuts spread over `positions` (node indices where
    trials begin to differ), with the tensors at each cut cached for `feeds` (the whole graph's
    inputs, the trial inputs at their base values). A cut whose tensors would take the cache over
    TAIL_CACHE is not kept, nor with `all_outputs` one that does not compute every graph output."""
    order = sorted(set(positions))
    if not order:
        return []
    starts = sorted({order[j * len(order) // count] for j in range(1, count)} - {0})
    cuts = {s: cut_names(model, s) for s in starts}
    wanted = sorted(set().union(*cuts.values())) if cuts else []
    if not wanted:
        return []
    aug = session(augmented(model, wanted))
    values = [dict(zip(wanted, owned(aug.run(wanted, f)))) for f in feeds]
    del aug
    used, out = 0, []
    for s in starts:
        size = sum(v[n].nbytes for v in values for n in cuts[s])
        if used + size > TAIL_CACHE:
            continue
        tm = tail(model, s, {n: values[0][n].dtype for n in cuts[s]})
        if all_outputs and len(tm.graph.output) != len(model.graph.output):
            continue
        used += size
        out.append(Tail(s, session(tm), [{n: v[n] for n in cuts[s]} for v in values],
                        {i.name for i in tm.graph.input}, [o.name for o in tm.graph.output]))
    return out


def tails_for(macs_per_sample: float) -> int:
    """How many tails a single-layer probe of a model with this many multiply-adds a sample keeps."""
    return TAILS if macs_per_sample >= TAIL_MIN_MACS else 0


def latest_tail(tails: Sequence[Tail], positions) -> Tail | None:
    """The latest of `tails` that starts at or before every one of `positions`."""
    if not positions or not tails:
        return None
    first = min(positions)
    fit = [t for t in tails if t.start <= first]
    return fit[-1] if fit else None


class Probe:
    """Divergence of the network's outputs from FP32 when some main-graph layers take other
    weights (in their original layout) and biases; the rest keep their float values. Biases
    matter: a quantized layer's corrected bias cancels its mean shift, which would otherwise
    dominate what the probe measures."""

    def __init__(self, prepared: "onnx.ModelProto", targets: Sequence[Target],
                 weights: Mapping[str, np.ndarray], loaders: Sequence[Callable[[], Feed]],
                 biases: Mapping[str, np.ndarray] | None = None,
                 acts: Mapping[str, ActQuant] | None = None, tails: int = 0):
        """With `acts`, the probed model carries those activation QDQ pairs (weights stay
        inputs), so what it measures includes activation quantization; the reference is still
        the FP32 model. `tails`: how many tail sessions to keep for single-layer trials (0: none)."""
        self.targets = [t for t in targets if not t.graph]
        biases = dict(biases or {})
        self.bias_of = {t.node: t.bias for t in self.targets if t.bias and t.node in biases}
        # a layer without a bias gets one from its plan (the corrected mean shift, sequential
        # mode's fit): the probed model reads a zero bias it can be fed
        added = {t.node: (f"{t.node}/probe_bias", t.out_channels) for t in self.targets
                 if not t.bias and t.op in ("Conv", "ConvTranspose", "Gemm")}
        biases.update({n: np.zeros(c, np.float32) for n, (_, c) in added.items()})
        self.bias_of.update({n: b for n, (b, _) in added.items()})
        params = [t.weight for t in self.targets] + list(self.bias_of.values())
        probed = with_zero_biases(prepared, added) if added else prepared
        probed = with_act_qdq(probed, self.targets, dict(acts)) if acts else probed
        model = weights_as_inputs(probed, params)
        self.sess = session(model)
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
        self.expected = [expected(r) for r in self.ref]
        self.first: dict[str, int] = {}
        self.tails: list[Tail] = []
        self.base_out = self.ref
        if tails > 1 and len(self.targets) > 1 and not is_large(model):
            if acts:   # outputs a tail does not compute are taken from the probed model's own run
                self.base_out = [self.sess.run(self.names, {**f, **self.base}) for f in self.feeds]
            self._keep_tails(model, tails)

    def _keep_tails(self, model: "onnx.ModelProto", count: int) -> None:
        """Cuts at the first reader of evenly spaced layers."""
        readers: dict[str, int] = {}
        for i, node in enumerate(model.graph.node):
            for name in node_reads(node):
                readers.setdefault(name, i)
        params = {n: [self.weight_of[n]] + ([self.bias_of[n]] if n in self.bias_of else []) for n in self.weight_of}
        self.first = {n: min(readers.get(p, len(model.graph.node)) for p in ps) for n, ps in params.items()}
        self.tails = keep_tails(model, self.first.values(), count, [{**f, **self.base} for f in self.feeds])

    def _tail_for(self, nodes) -> Tail | None:
        """The latest kept tail that starts at or before the first reader of every layer in `nodes`."""
        return latest_tail(self.tails, [self.first[n] for n in nodes]) if self.tails else None

    def _run(self, i: int, feed: Feed, trial: dict, t: Tail | None) -> list[np.ndarray]:
        if t is None:
            return self.sess.run(self.names, {**feed, **trial})
        given = {**t.cached[i], **{k: v for k, v in feed.items() if k in t.inputs},
                 **{k: v for k, v in trial.items() if k in t.inputs}}
        got = dict(zip(t.outputs, t.sess.run(t.outputs, given)))
        return [got[n] if n in got else b for n, b in zip(self.names, self.base_out[i])]

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
        t = self._tail_for(list(layer_weights))
        return float(np.mean([divergence(r, self._run(i, f, trial, t))
                              for i, (f, r) in enumerate(zip(self.feeds, self.expected))]))
