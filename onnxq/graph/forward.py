"""Fold a constant per-channel scale and shift that a tensor passes through on its way into convs
into those convs, so the tensor feeds them directly.

PP-LCNetV3-style nets (PP-OCRv4 det and rec) follow each activation with a learnt affine block,
y = a * hardswish(x) + b, whose Mul and Add run in float between two quantized kernels. Every
reader of y being a conv, the block folds into the readers (prepare.fold_affine folds one that
follows a conv into that conv, backwards; this is the forward case): with y = k h + c per channel,

    conv(y) = conv'(h) + W c          W' = W k (per input channel), bias' = bias + sum W c

exactly, when the conv does not pad. A padding conv pads y with zeros, i.e. h with -c/k: where that
is one value for every channel (a scalar block), an explicit constant Pad of h with it goes before
the conv and the conv pads no more; otherwise the block stays. Exact in float."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .prepare import (_AFFINE, _affine_step, _channel_constant, _inits, _replace_init, prune_initializers,
                      readers_of)
from .large import tensor_array
from .walk import attr


def _affine_run(h: str, readers, outputs: set[str]) -> tuple[list[onnx.NodeProto], str]:
    """The constant-operand affine ops from h on while each tensor has one as its one reader, and
    the tensor they end at."""
    nodes, y = [], h
    while len(rs := readers.get(y, [])) == 1 and y not in outputs:
        node = rs[0]
        if node.op_type not in _AFFINE or len(node.input) != 2 or node.input[0] == node.input[1]:
            break
        nodes.append(node)
        y = node.output[0]
    return nodes, y


def _composed(h: str, nodes, inits, channels: int, rank: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(k, c) [C] of the chain from h, y = k h + c, or None when a constant is not one value per channel."""
    k, c, y = np.ones(channels), np.zeros(channels), h
    for node in nodes:
        other = node.input[1] if node.input[0] == y else node.input[0]
        const = _channel_constant(inits, other, channels, rank - 1, rank)
        step = None if const is None else _affine_step(node, y, const)
        if step is None:
            return None
        k, c = k * step[0], c * step[0] + step[1]
        y = node.output[0]
    return k, c


def _conv_readers(y: str, readers, inits, outputs: set[str]) -> list[onnx.NodeProto] | None:
    """y's readers when every one is a Conv reading it as its input, with a constant float weight
    and explicit (or no) padding."""
    rs = readers.get(y, [])
    if not rs or y in outputs:
        return None
    for r in rs:
        auto = attr(r, "auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if (r.op_type != "Conv" or r.input[0] != y or y in r.input[1:] or len(r.input) < 2
                or r.input[1] not in inits or inits[r.input[1]].data_type != onnx.TensorProto.FLOAT
                or auto not in ("NOTSET", "VALID")
                or (len(r.input) > 2 and r.input[2] and r.input[2] not in inits)):
            return None
    return rs


def _pad_value(conv: onnx.NodeProto, k: np.ndarray, c: np.ndarray) -> float | None:
    """What h must be padded with for `conv` (0.0 when the conv does not pad or nothing is added;
    None when no single value does it)."""
    if not any(attr(conv, "pads", [])) or not np.any(c):
        return 0.0
    v = -c / k
    return float(v[0]) if np.allclose(v, v[0], rtol=1e-6, atol=1e-12) else None


def _folded(conv: onnx.NodeProto, inits, k: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """conv's weight times k along its input channels, and its bias plus W c."""
    w = tensor_array(inits[conv.input[1]]).astype(np.float64)
    o, cin = w.shape[:2]
    groups = attr(conv, "group", 1)
    per = o // groups
    channel = (np.arange(o)[:, None] // per) * cin + np.arange(cin)[None, :]       # [O, Cin/g] -> h's channel
    shape = (o, cin) + (1,) * (w.ndim - 2)
    b = (tensor_array(inits[conv.input[2]]).astype(np.float64)
         if len(conv.input) > 2 and conv.input[2] else np.zeros(o))
    w2 = w * k[channel].reshape(shape)
    b2 = b + (w.reshape(o, cin, -1).sum(-1) * c[channel]).sum(1)
    return w2, b2


def _rewire(g: onnx.GraphProto, conv: onnx.NodeProto, h: str, pad: float, w: np.ndarray, b: np.ndarray) -> list:
    """Point conv at h (through a constant Pad of `pad` when it pads and pad is not 0) with the
    folded weight and bias; returns the Pad's nodes to insert before it."""
    w_name, b_name = conv.name + "/in_affine_weight", conv.name + "/in_affine_bias"
    _replace_init(g, w_name, w)
    _replace_init(g, b_name, b)
    new, src = [], h
    pads = list(attr(conv, "pads", []))
    if any(pads) and pad != 0.0:
        spatial = len(pads) // 2
        pads_name, value_name = conv.name + "/in_affine_pads", conv.name + "/in_affine_pad_value"
        g.initializer.append(onnx.numpy_helper.from_array(
            np.array([0, 0] + pads[:spatial] + [0, 0] + pads[spatial:], np.int64), pads_name))
        g.initializer.append(onnx.numpy_helper.from_array(np.array(pad, np.float32), value_name))
        src = conv.name + "/in_affine_padded"
        new.append(helper.make_node("Pad", [h, pads_name, value_name], [src], name=conv.name + "/in_affine_pad",
                                    mode="constant"))
        for a in conv.attribute:
            if a.name == "pads":
                del a.ints[:]
                a.ints.extend([0] * len(pads))
    del conv.input[:]
    conv.input.extend([src, w_name, b_name])
    return new


def fold_affine_into_readers(model: onnx.ModelProto) -> int:
    """Fold, in place, each constant per-channel affine chain (Mul / Div / Add / Sub) whose result
    only convs read into those convs, as above. Main graph; the chain must start at a node's
    output (a model input's normalisation is left to the model's own first conv). Returns how many
    affine ops were folded."""
    g = model.graph
    inits = _inits(g)
    readers = readers_of(g)
    outputs = {o.name for o in g.output}
    drop, folded, inserts = set(), 0, {}        # drop: the folded ops' outputs
    for node in list(g.node):
        if node.output and node.output[0] in drop:
            continue
        for h in node.output:
            first = readers.get(h, [])
            if len(first) != 1 or first[0].op_type not in _AFFINE:
                continue
            found = _fold_one(g, h, readers, inits, outputs)
            if found is None:
                continue
            chain, pads = found
            drop |= {n.output[0] for n in chain}
            folded += len(chain)
            inserts.update(pads)
    if folded:
        order = []
        for n in g.node:
            if not (n.output and n.output[0] in drop):
                order.extend(inserts.get(n.name, []))
                order.append(n)
        del g.node[:]
        g.node.extend(order)
        prune_initializers(model)
    return folded


def _fold_one(g, h: str, readers, inits, outputs):
    """Fold the chain from h if every reader at its end is a conv it folds into: (chain nodes,
    {conv name: Pad nodes to put before it}), or None."""
    chain, y = _affine_run(h, readers, outputs)
    convs = _conv_readers(y, readers, inits, outputs) if chain else None
    if convs is None:
        return None
    w = inits[convs[0].input[1]]
    found = _composed(h, chain, inits, int(w.dims[1]) * attr(convs[0], "group", 1), len(w.dims))
    if found is None or np.any(found[0] == 0):
        return None
    k, c = found
    pads = [_pad_value(conv, k, c) for conv in convs]
    if any(p is None for p in pads):
        return None
    inserted = {}
    for conv, pad in zip(convs, pads):
        w2, b2 = _folded(conv, inits, k, c)
        inserted[conv.name] = _rewire(g, conv, h, pad, w2, b2)
    return chain, inserted
