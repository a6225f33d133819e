"""The graph side of smoothing (algos/smoothing.py): which Gemm/MatMul, pointwise-conv and
depthwise-conv inputs can be smoothed, and the exact rewrite: the layers' weight columns (a
pointwise conv: its input channels; a depthwise conv: its filters of channel c) times s, and x
divided by s, inside the ops that make x where that is exact and
nothing else reads x, else by a Mul(x, 1/s) that only those layers read (other readers of x, a
residual Add, still read x)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from ..algos.matrix import from_matrix, to_matrix
from ..types import Target
from .large import tensor_array
from .prepare import _replace_init
from .walk import node_reads, used_names


def channel_axis(t: Target) -> int:
    """The axis of a smoothable layer's input that holds its channels."""
    return 1 if t.op == "Conv" else -1


def smoothable(model: onnx.ModelProto, targets: list[Target], convs: bool = True) -> dict[str, list[Target]]:
    """{input tensor: its readers} for main-graph layers whose weight no other node reads: Gemm
    and MatMul with the weight on the right (the input's last axis is what the weight reads),
    and with `convs` pointwise convs (1x1, ungrouped: a Gemm over each pixel's channels) and
    depthwise convs (channel c of the input meets only channel c's filters). An input read by
    both a Gemm/MatMul and a conv is left out."""
    g = model.graph
    reads = _read_counts(g)
    outputs = {o.name for o in g.output}
    groups: dict[str, list[Target]] = defaultdict(list)
    for t in targets:
        if (not t.graph and t.act and reads[t.weight] == 1 and t.weight not in outputs
                and ((len(t.shape) == 2 and (t.op == "Gemm" or (t.op == "MatMul" and t.weight_layout == "cols")))
                     or (convs and (t.depthwise or pointwise(t))))):
            groups[t.act].append(t)
    return {a: ts for a, ts in groups.items() if len({channel_axis(t) for t in ts}) == 1}


def pointwise(t: Target) -> bool:
    """An ungrouped 1x1 conv: each output pixel is W [O, C] times that pixel's channels."""
    return t.op == "Conv" and t.groups == 1 and all(k == 1 for k in t.shape[2:])


def _read_counts(g: onnx.GraphProto) -> dict[str, int]:
    """How many nodes read each tensor (subgraphs' outer-scope reads included)."""
    reads: dict[str, int] = defaultdict(int)
    for node in g.node:
        for name in node_reads(node):
            reads[name] += 1
    return reads


def _unique(g: onnx.GraphProto, base: str) -> str:
    taken = used_names(g) | {n for node in g.node for n in node.output} | {i.name for i in g.initializer}
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def apply_smoothing(model: onnx.ModelProto, act: str, readers: list[Target], scales: np.ndarray,
                    through_hardswish: bool = False) -> str:
    """Divide `act` by `scales` [K] for its `readers`, whose weights' input columns (a pointwise
    conv: its input channels; a depthwise conv: its filters of channel c) are multiplied by them;
    exact in float. Folded into the ops that make `act` where that is exact and only the readers
    read it (_fold_plan), else a Mul(act, 1/scales) before the first reader, which the readers
    read instead. With `through_hardswish`, where `act` is a HardSwish of a conv's own output
    (_hardswish_source), that conv's output is divided too and the HardSwish reads it times
    `scales`: x' = x / s is then what the conv's output rounding sees, y / s what the readers'
    input rounding sees. -> the tensor the readers read."""
    g = model.graph
    edits = _fold_plan(g, act, readers, scales)
    if edits is not None:
        _apply_edits(g, edits)
        _scale_readers(g, readers, scales, act)
        return act
    source = _hardswish_source(g, act, readers) if through_hardswish else None
    if source is not None:
        hs, conv, pad = source
        _divide_conv_output(g, hs, conv, scales.reshape(_broadcast(readers[0])))
        if pad is not None:         # the division goes ahead of the zero Pad, which keeps its output
            _scale_readers(g, readers, scales, act)
            y = hs.output[0]
            _mul_ahead(g, pad, y, (1.0 / scales).reshape(_broadcast(readers[0])), f"{y}_smooth", f"{y}_smooth_inverse",
                       f"{y}/smooth")
            return act
    new = _unique(g, f"{act}_smooth")
    inv = _unique(g, f"{act}_smooth_inverse")
    g.initializer.append(numpy_helper.from_array((1.0 / scales).reshape(_broadcast(readers[0])).astype(np.float32),
                                                 inv))
    names = {t.node for t in readers}
    first = min(i for i, n in enumerate(g.node) if n.name in names)
    _scale_readers(g, readers, scales, new)
    node_name, i = f"{act}/smooth", 1
    while any(n.name == node_name for n in g.node):
        node_name, i = f"{act}/smooth_{i}", i + 1
    g.node.insert(first, onnx.helper.make_node("Mul", [act, inv], [new], name=node_name))
    return new


def folds(model: onnx.ModelProto, act: str, readers: list[Target], through_hardswish: bool = False) -> bool:
    """Whether apply_smoothing would fold `act`'s division into the ops that make it (no Mul), or
    with `through_hardswish` into the conv before its HardSwish."""
    t = readers[0]                  # the plan reads the scales' shape only
    if _fold_plan(model.graph, act, readers, np.ones(t.shape[1] * t.groups)) is not None:
        return True
    return through_hardswish and _hardswish_source(model.graph, act, readers) is not None


def _apply_edits(g: onnx.GraphProto, edits: list["Edit"]) -> None:
    """Each edit's constant as a new initializer its node reads instead."""
    for node, index, value in edits:
        name = _unique(g, f"{node.input[index]}_smoothed")
        g.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
        node.input[index] = name


def _hardswish_source(g: onnx.GraphProto, act: str, readers: list[Target]) -> tuple | None:
    """(HardSwish, Conv, zero Pad or None) when `act` is a HardSwish (or a zero Pad of one), read
    only by `readers`, of a conv output only it reads, the conv's weight (and bias) constants only
    it reads, one filter a channel of `act`."""
    if channel_axis(readers[0]) != 1:
        return None
    producer = {o: n for n in g.node for o in n.output}
    reads = _read_counts(g)
    outputs = {o.name for o in g.output}
    hs = producer.get(act)
    if act in outputs or reads[act] != len(readers) or hs is None:
        return None
    pad = hs if _zero_pad(g, hs) else None
    if pad is not None:
        hs = producer.get(pad.input[0])
        if hs is None or reads[pad.input[0]] != 1 or pad.input[0] in outputs:
            return None
    if hs.op_type != "HardSwish" or hs.domain not in ("", "ai.onnx"):
        return None
    x = hs.input[0]
    conv = producer.get(x)
    if conv is None or conv.op_type != "Conv" or x in outputs or reads[x] != 1:
        return None
    consts = _Constants(g, np.ones((1, readers[0].shape[1] * readers[0].groups, 1, 1)))
    return (hs, conv, pad) if _fold_step(conv, consts, reads) is not None else None


def _zero_pad(g: onnx.GraphProto, node: onnx.NodeProto) -> bool:
    """A Pad (opset 11+) that pads with zeros (constant mode, no value or 0) along spatial axes
    only: it commutes with a per-channel scale."""
    if node.op_type != "Pad" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return False
    mode = next((a.s for a in node.attribute if a.name == "mode"), b"constant")
    inits = {i.name: i for i in g.initializer}
    if mode != b"constant" or node.input[1] not in inits or len(node.input) > 3:
        return False
    value = node.input[2] if len(node.input) > 2 else ""
    if value and (value not in inits or np.any(tensor_array(inits[value]) != 0)):
        return False
    pads = tensor_array(inits[node.input[1]]).ravel()
    return pads.size >= 4 and pads.size % 2 == 0 and pads[1] == 0 and pads[pads.size // 2 + 1] == 0


def _mul_ahead(g: onnx.GraphProto, reader: onnx.NodeProto, source: str, value: np.ndarray, out: str,
               const: str, node: str | None = None) -> None:
    """A Mul(source, value) inserted ahead of `reader`, which reads its output `out` (made unique)
    instead of `source`; the constant is named `const`, the node `node` (default: `{out}/mul`)."""
    new, name = _unique(g, out), _unique(g, const)
    g.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
    at = next(i for i, n in enumerate(g.node) if n is reader)
    node = _unique(g, node or f"{new}/mul")
    g.node.insert(at, onnx.helper.make_node("Mul", [source, name], [new], name=node))
    reader.input[list(reader.input).index(source)] = new


def _divide_conv_output(g: onnx.GraphProto, hs: onnx.NodeProto, conv: onnx.NodeProto, per: np.ndarray) -> None:
    """The conv's filters and bias divided by `per` (so its output is x / s), and a Mul by `per`
    ahead of the HardSwish, which so reads x again: exact in float."""
    _apply_edits(g, _fold_step(conv, _Constants(g, per), _read_counts(g))[0])
    x = hs.input[0]
    _mul_ahead(g, hs, x, per, f"{x}_unsmoothed", f"{x}_smooth_times")


def _broadcast(t: Target) -> tuple[int, ...]:
    """The shape per-channel scales take to broadcast over a reader's input: a conv's is
    [N, C, spatial...], a Gemm/MatMul's channels are its last axis."""
    return (1, -1) + (1,) * (len(t.shape) - 2) if channel_axis(t) == 1 else (-1,)


def _scale_readers(g: onnx.GraphProto, readers: list[Target], scales: np.ndarray, source: str) -> None:
    """Point the readers at `source` and multiply their weights' input channels by `scales`."""
    names = {t.node: t for t in readers}
    inits = {i.name: i for i in g.initializer}
    for node in g.node:
        t = names.get(node.name)
        if t is None:
            continue
        node.input[0] = source
        w = tensor_array(inits[t.weight]).astype(np.float64)
        if t.depthwise:     # output channel o filters input channel o // multiplier
            _replace_init(g, t.weight, _times_rows(w, np.repeat(scales, t.shape[0] // len(scales))))
        else:               # Gemm/MatMul columns, or a pointwise conv's [O, C] matrix
            m = to_matrix(w, t.weight_layout)
            _replace_init(g, t.weight, from_matrix(m * scales[None, :], t.weight_layout, t.shape))


def _times_rows(w: np.ndarray, v: np.ndarray) -> np.ndarray:
    """w with row (output channel) o multiplied by v[o]."""
    return w * v.reshape((-1,) + (1,) * (w.ndim - 1))


# ops that commute with a positive per-channel scale: f(x / s) = f(x) / s
HOMOGENEOUS_OPS = ("Relu", "LeakyRelu")


Edit = tuple[onnx.NodeProto, int, np.ndarray]      # (node, input index, new constant value)


def _fold_plan(g: onnx.GraphProto, act: str, readers: list[Target], scales: np.ndarray) -> list[Edit] | None:
    """The constant inputs to replace so that `act` itself comes out divided by `scales`, walking
    up through Add/Sub of a constant and Relu to a Conv (its filters and bias), a
    BatchNormalization (its scale and shift), or a Mul/Div by a constant; None when the chain
    meets anything else, a tensor another node reads, or a constant that does not broadcast
    per channel. Conv inputs only (channels on axis 1)."""
    if channel_axis(readers[0]) != 1:
        return None
    producer = {o: n for n in g.node for o in n.output}
    reads = _read_counts(g)
    outputs = {o.name for o in g.output}
    if reads[act] != len(readers):
        return None
    consts = _Constants(g, scales.reshape(_broadcast(readers[0])))
    edits: list[Edit] = []
    t: str | None = act
    while t is not None:
        node = producer.get(t)
        if node is None or t in outputs or (t != act and reads[t] != 1):
            return None
        step = _fold_step(node, consts, reads)
        if step is None:
            return None
        found, t = step
        edits += found
    return edits


class _Constants:
    """A graph's constant inputs as float64 arrays, and the per-channel scales in the shape that
    broadcasts over the smoothed input."""

    def __init__(self, g: onnx.GraphProto, per: np.ndarray) -> None:
        self.inits = {i.name: i for i in g.initializer}
        self.per = per

    def of(self, node: onnx.NodeProto, i: int) -> np.ndarray | None:
        name = node.input[i] if i < len(node.input) else ""
        return tensor_array(self.inits[name]).astype(np.float64) if name in self.inits else None

    def per_channel(self, k: np.ndarray) -> bool:
        try:
            return np.broadcast_shapes(k.shape, self.per.shape) == self.per.shape
        except ValueError:
            return False


def _fold_step(node: onnx.NodeProto, c: _Constants, reads) -> tuple[list[Edit], str | None] | None:
    """One node of a fold: (its edits, the tensor to walk up to, or None when the fold ends
    here), or None when the node does not fold."""
    op, s = node.op_type, c.per.ravel()
    if op == "Conv":
        w, b = c.of(node, 1), c.of(node, 2)
        if w is None or reads[node.input[1]] != 1 or w.shape[0] != s.size:
            return None
        return [(node, 1, _times_rows(w, 1.0 / s))] + ([(node, 2, b / s)] if b is not None else []), None
    if op == "BatchNormalization":
        gamma, beta = c.of(node, 1), c.of(node, 2)
        return None if gamma is None or beta is None else ([(node, 1, gamma / s), (node, 2, beta / s)], None)
    if op in ("Mul", "Div", "Add", "Sub"):
        found = [(i, k) for i in (1, 0) if (k := c.of(node, i)) is not None]
        if not found:
            return None
        k_at, k = found[0]
        if (op in ("Div", "Sub") and k_at == 0) or not c.per_channel(k):
            return None
        edit = [(node, k_at, k * c.per if op == "Div" else k / c.per)]
        return edit, (None if op in ("Mul", "Div") else node.input[1 - k_at])
    if op in HOMOGENEOUS_OPS:
        return [], node.input[0]
    return None
