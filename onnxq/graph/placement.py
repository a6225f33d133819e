"""Which tensors get Q/DQ pairs under a target's rules (plan/rules.py), found from the graph
before calibration so the streamed pass observes them all."""

from __future__ import annotations

from typing import Sequence

import math

import onnx

from ..plan.rules import ABSORBED_OPS, BRANCH_LAYERS, DECISION_OPS, SAME_SCALE_OPS, Rules
from ..types import Placement, Target
from .norms import constant_names, normalisation_nodes
from .prepare import readers_of, scalar
from .walk import attr

POOLS = ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean")
# |x| beyond which Sigmoid and Tanh lie within 2^-11 of their asymptotes (sigmoid(-8) = 0.00034,
# 1 - tanh(4.5) = 0.00025): the ends of their inputs' ranges under full node units
SMOOTH_EDGE = {"Sigmoid": 8.0, "Tanh": 4.5}


def _unit_output(node: onnx.NodeProto, consumers, outputs: set[str]) -> str | None:
    """The tensor a quantized layer's output Q goes on: after a Relu/Clip that is its only reader
    (the fused kernel absorbs it), also past Transposes between them (a channels-last export's
    layout, which onnxruntime's transpose optimizer removes); else its own output; None for a
    graph output."""
    y = node.output[0]
    if y in outputs:
        return None
    z = y
    while True:
        readers = consumers.get(z, [])
        if len(readers) != 1 or readers[0].output[0] in outputs:
            return y
        if readers[0].op_type in ABSORBED_OPS:
            return readers[0].output[0]
        if readers[0].op_type != "Transpose":
            return y
        z = readers[0].output[0]


def _pad_sources(g: onnx.GraphProto, quantized: set[str], add) -> None:
    """The input of a Pad that feeds a quantized layer is quantized too (a node's output, not a
    model input): the Pad then keeps its scale (SAME_SCALE_OPS) and runs on the codes (graph/pads.py)."""
    made = {y for n in g.node for y in n.output}
    for node in g.node:
        if node.op_type == "Pad" and node.output[0] in quantized and node.input[0] in made:
            add(node.input[0])


def _paired_inputs(model: onnx.ModelProto, targets: Sequence[Target], p: Placement, norms: set[str],
                   op: str) -> None:
    """Both inputs of every main-graph `op` of two activations read Q/DQ pairs: residual Adds
    (TensorRT fuses one into the conv before it when they do), attention MatMuls (Q.K^T, A.V)."""
    inits = {t.name for t in model.graph.initializer}
    layer_inputs = {t.act for t in targets if not t.graph and t.act}
    for node in model.graph.node:
        ins = [i for i in node.input if i]
        if node.op_type == op and len(ins) == 2 and not set(ins) & inits and node.name not in norms:
            p.readers[node.name] = ins
            p.observe += [i for i in ins if i not in layer_inputs and i not in p.observe]


def plan_placement(model: onnx.ModelProto, targets: Sequence[Target], rules: Rules,
                   quantize_acts: bool = True, attention: bool = False) -> Placement:
    """The main graph's extra quantized tensors under `rules` (none for input-side placement),
    with `attention` the inputs of MatMuls of two activations."""
    p = Placement()
    main_layers = {t.node for t in targets if not t.graph}
    p.tails = score_branch(model.graph, main_layers)
    norms = normalisation_nodes(model.graph)     # their statistics stay float (graph/norms.py)
    if rules.add_inputs and quantize_acts:
        _paired_inputs(model, targets, p, norms, "Add")
    if attention and quantize_acts:
        _paired_inputs(model, targets, p, norms, "MatMul")
    if not rules.output_units or not quantize_acts:
        return p
    g = model.graph
    consumers = readers_of(g)
    outputs = {o.name for o in g.output}
    inits = {t.name for t in g.initializer}
    layers = {t.node for t in targets if not t.graph and t.act and t.op in rules.unit_ops}
    quantized = {t.act for t in targets if not t.graph and t.act}
    extra: list[str] = []

    def add(name: str | None) -> None:
        if name and name not in quantized and name not in outputs and name not in inits:
            quantized.add(name)
            extra.append(name)

    if rules.int_pad:
        _pad_sources(g, quantized, add)
    pooled: set[str] = set()                 # 1x1 maps after a global pool (attention gates)
    for node in g.node:
        if node.name in norms:
            continue
        if node.op_type in POOLS or (node.input and node.input[0] in pooled and node.op_type not in rules.fused_ops):
            pooled.update(node.output)
            if node.op_type not in POOLS:
                continue    # a gate's layers keep input-side Q/DQ only: an error there scales whole channels
        if node.name in layers:
            y = _unit_output(node, consumers, outputs)
            if y:
                p.units[y] = node.name
            add(y)
        elif node.op_type in rules.fused_ops:
            ins = [i for i in node.input if i]
            if ins and all(i in quantized for i in ins) and len(node.output) == 1:
                add(node.output[0])
        elif node.op_type in SAME_SCALE_OPS and node.input and node.input[0] in quantized:
            for y in node.output:          # every part of a Split keeps the scale too
                if y and y not in outputs:
                    p.tied[y] = p.tied.get(node.input[0], node.input[0])
                    add(y)
    if rules.float_decisions:
        deciding = _deciding(g, main_layers)
        p.float_outputs = [n for y, n in p.units.items() if y in deciding]
        p.units = {y: n for y, n in p.units.items() if y not in deciding}
        extra = [n for n in extra if n not in deciding]
        p.tied = {k: v for k, v in p.tied.items() if k not in deciding}
    p.observe += [n for n in extra if n not in p.tied and n not in p.observe]
    p.bounds = _bounds(g, [n for n in extra if n not in p.tied], consumers)
    return p


def _saturation(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> tuple[float, float] | None:
    """(lo, hi) outside which `node`'s output no longer changes with its first input (it
    saturates), or None: HardSwish is 0 below -3, HardSigmoid flat outside [-b/a, (1-b)/a],
    Relu 0 below 0, Clip flat outside its constant bounds; Sigmoid and Tanh within 2^-11 of
    their asymptotes outside +-SMOOTH_EDGE[op] (under a quarter step of an 8-bit grid on [0, 1]
    or [-1, 1]: what clipping there moves, an 8-bit reader of their output hardly tells)."""
    op = node.op_type
    if op in SMOOTH_EDGE:
        return -SMOOTH_EDGE[op], SMOOTH_EDGE[op]
    if op == "HardSwish":
        return -3.0, math.inf
    if op == "Relu":
        return 0.0, math.inf
    if op == "HardSigmoid":
        a, b = attr(node, "alpha", 0.2), attr(node, "beta", 0.5)
        return (-b / a, (1.0 - b) / a) if a > 0 else None
    if op == "Clip":                 # opset < 11: attributes; later: optional constant inputs
        ends = [attr(node, "min", -math.inf), attr(node, "max", math.inf)]
        for k, name in enumerate(node.input[1:3]):
            if name:
                ends[k] = scalar(inits, name)
        return None if None in ends else (ends[0], ends[1])
    return None


def _gated(node: onnx.NodeProto, name: str, readers, inits) -> tuple[float, float] | None:
    """(lo, inf) for a Mul of `name` by its own gate, a Sigmoid or HardSigmoid of it among its
    `readers` (SiLU, hard-swish written out), below whose lo the product is 0 (HardSigmoid) or
    smaller than 8 * sigmoid(-8) = 0.0027 (Sigmoid); else None."""
    if node.op_type != "Mul" or list(node.input).count(name) != 1:
        return None
    other = node.input[1] if node.input[0] == name else node.input[0]
    gate = next((r for r in readers if r.op_type in ("Sigmoid", "HardSigmoid") and r.output[0] == other
                 and r.input[0] == name), None)
    ends = _saturation(gate, inits) if gate is not None else None
    return (ends[0], math.inf) if ends is not None and ends[0] > -math.inf else None


def _bounds(g: onnx.GraphProto, names: Sequence[str], consumers) -> dict[str, tuple[float, float]]:
    """Output-side tensors every reader of which saturates outside some interval: rounding
    clipped to the union of these intervals changes no reader's output, so their ranges need not
    cover more (a conv's pre-activation before a HardSwish: what lies below -3 is all read as 0;
    before x * sigmoid(x), below -8)."""
    inits = {t.name: t for t in g.initializer}
    out = {}
    for name in names:
        readers = consumers.get(name, [])
        ends = [(_saturation(n, inits) if n.input[0] == name and name not in n.input[1:] else None)
                or _gated(n, name, readers, inits) for n in readers]
        if ends and all(e is not None for e in ends):    # flat outside every reader's interval
            lo, hi = min(e[0] for e in ends), max(e[1] for e in ends)
            if lo < hi and (lo > -math.inf or hi < math.inf):
                out[name] = (lo, hi)
    return out


SHAPE_READERS = frozenset({"Shape", "Size"})   # read a tensor's shape, not its values


def _tail(g: onnx.GraphProto, layers: set[str]) -> set[str]:
    """The tensors that reach a graph output through no layer of `layers`."""
    tail = {o.name for o in g.output}
    for node in reversed(g.node):
        if node.name not in layers and any(o in tail for o in node.output):
            tail.update(i for i in node.input if i)
    return tail


def score_branch(g: onnx.GraphProto, layers: set[str], depth: int = BRANCH_LAYERS) -> list[str]:
    """The tensors of a branch that ends in a Sigmoid whose output reaches a graph output (a
    detector's class scores, a segmentation mask), up to `depth` layers ahead of the score, where
    nothing outside the branch reads them. A thresholded score is decided by values calibration
    seldom sees (a YOLOv8n's confident detections), so these tensors keep min-max ranges instead
    of the searched ones that clip the tail (docs/results.md, round 16), with room beyond them
    (plan/acts.keep_tails; round 33). Classifiers' Softmax
    (an argmax of logits) is left alone."""
    tail = _tail(g, layers)
    readers = readers_of(g)
    scores = [n for n in g.node if n.op_type == "Sigmoid" and n.output[0] in tail]
    inside = {n.name for n in scores}
    level = {n.input[0]: 0 for n in scores}
    consts = constant_names(g)
    for node in reversed(g.node):
        for y in node.output:        # every reader of a branch tensor is in the branch (they come later)
            if y in level and not all(r.name in inside or r.op_type in SHAPE_READERS for r in readers.get(y, [])):
                del level[y]
        outs = [level[y] for y in node.output if y in level]
        if not outs:
            continue
        inside.add(node.name)
        d = min(outs) + (node.name in layers)
        if d > depth:
            continue
        for x in (node.input[:1] if node.name in layers else [i for i in node.input if i and i not in consts]):
            level[x] = min(level.get(x, d), d)
    return sorted(x for x, d in level.items() if 0 < d <= depth and x not in consts)


def _deciding(g: onnx.GraphProto, layers: set[str]) -> set[str]:
    """The tensors that reach a graph output through no quantized layer (the network's final
    values: a detector's box distances), and those that flow, through no quantized layer, into a
    Sigmoid or Softmax whose output reaches one (the scores that decide the answer: a detector's
    class logits, a segmentation head's last map). Input-side placement never rounds them; an
    output-side Q would, and its calibrated range clips what calibration never saw (a YOLOv8n's
    class logits: calibrated maximum 0.3, confident detections at 3 and more; its box
    distances: calibrated maximum 8.7 bins of 16). The layers that produce them run in float."""
    tail = _tail(g, layers)                      # tensors that reach an output through no layer
    deciding: set[str] = set()
    for node in reversed(g.node):
        if node.name in layers:
            continue
        if (node.op_type in DECISION_OPS and node.output[0] in tail) or any(o in deciding for o in node.output):
            deciding.update(i for i in node.input if i)
    return deciding | tail

