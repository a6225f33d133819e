"""Normalise a loaded model before planning: unique node names, Constant nodes turned into
initializers, BatchNormalization folded into the Conv before it, the opset raised to what the
emitted QDQ needs. Works on a copy."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper, version_converter

from ..errors import InputModelError
from .io import opset_of
from .large import tensor_array
from .walk import attr, deepest_first, fixed_names, graph_by_path, graphs, node_reads, tensor_types, used_names


def name_nodes(model: onnx.ModelProto) -> None:
    seen: set[str] = set()
    for _, g in graphs(model):
        for i, node in enumerate(g.node):
            base = node.name or f"{node.op_type}_{i}"
            name, k = base, 1
            while name in seen:
                name, k = f"{base}_{k}", k + 1
            node.name = name
            seen.add(name)


def constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Move Constant nodes' tensors into their graph's initializers. Returns how many moved."""
    moved = 0
    for _, g in graphs(model):
        keep = []
        for node in g.node:
            value = constant_value(node) if node.op_type == "Constant" else None
            if value is None:
                keep.append(node)
                continue
            g.initializer.append(numpy_helper.from_array(value, node.output[0]))
            moved += 1
        if len(keep) != len(g.node):
            del g.node[:]
            g.node.extend(keep)
    return moved


def _inits(g: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in g.initializer}


def _replace_init(g: onnx.GraphProto, name: str, value: np.ndarray) -> None:
    for i, t in enumerate(g.initializer):
        if t.name == name:
            g.initializer[i].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
            return
    g.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))


def fold_batchnorm(model: onnx.ModelProto) -> int:
    """Fold Conv -> BatchNormalization (inference form, constant parameters) into the Conv.

    The Conv's weight and bias get new initializer names so that shared weights stay intact.
    Returns the number of folds.
    """
    folded = 0
    for _, g in graphs(model):
        inits = _inits(g)
        consumers: dict[str, int] = {}
        for node in g.node:
            for i in node.input:
                consumers[i] = consumers.get(i, 0) + 1
        outputs = {o.name for o in g.output}
        producer = {o: n for n in g.node for o in n.output}
        drop: set[int] = set()
        for bn_i, bn in enumerate(g.node):
            if bn.op_type != "BatchNormalization" or len([o for o in bn.output if o]) != 1:
                continue
            conv = producer.get(bn.input[0])
            if conv is None or conv.op_type != "Conv" or conv.input[1] not in inits:
                continue
            if consumers.get(conv.output[0], 0) != 1 or conv.output[0] in outputs:
                continue
            if not all(n in inits for n in bn.input[1:5]):
                continue
            gamma, beta, mean, var = (tensor_array(inits[n]).astype(np.float64)
                                      for n in bn.input[1:5])
            eps = float(attr(bn, "epsilon", 1e-5))
            w = tensor_array(inits[conv.input[1]]).astype(np.float64)
            if w.dtype.kind != "f" or w.shape[0] != gamma.shape[0]:
                continue
            k = gamma / np.sqrt(var + eps)
            b = (tensor_array(inits[conv.input[2]]).astype(np.float64)
                 if len(conv.input) > 2 and conv.input[2] in inits else np.zeros_like(mean))
            w_name, b_name = conv.name + "/folded_weight", conv.name + "/folded_bias"
            _replace_init(g, w_name, w * k.reshape(-1, *([1] * (w.ndim - 1))))
            _replace_init(g, b_name, (b - mean) * k + beta)
            inputs = [conv.input[0], w_name, b_name]
            del conv.input[:]
            conv.input.extend(inputs)
            conv.output[0] = bn.output[0]
            drop.add(bn_i)
            folded += 1
        if drop:
            keep = [n for i, n in enumerate(g.node) if i not in drop]
            del g.node[:]
            g.node.extend(keep)
    prune_initializers(model)
    return folded


def prune_initializers(model: onnx.ModelProto) -> None:
    """Drop initializers no node (in the graph or its subgraphs) reads any more."""
    for _, g in graphs(model):
        used = used_names(g) | {i.name for i in g.input}
        drop_initializers(g, [i for i, t in enumerate(g.initializer) if t.name not in used])


def drop_initializers(g: onnx.GraphProto, indices: list[int]) -> None:
    """Remove initializers by position, in place: re-extending a kept list would copy every kept
    tensor's bytes once more into the model's memory (a large model's weights twice)."""
    for i in sorted(indices, reverse=True):
        del g.initializer[i]


def _scaled_copy(g: onnx.GraphProto, inits: dict, name: str, new_name: str, k: float) -> str | None:
    """A float initializer `name` times k under a new name (others may share the original)."""
    t = inits.get(name)
    if t is None or t.data_type != onnx.TensorProto.FLOAT:
        return None
    _replace_init(g, new_name, tensor_array(t).astype(np.float64) * k)
    return new_name


def normalize_gemms(model: onnx.ModelProto) -> int:
    """Fold a Gemm's alpha into its constant B and its beta into its constant C, so that
    Y = A·B' + C' and the quantizer can treat B' as the weight and C' as the bias. Returns how
    many Gemms changed; a Gemm whose B or C is not a constant keeps the attribute it needs."""
    changed = 0
    for _, g in graphs(model):
        inits = _inits(g)
        for node in g.node:
            if node.op_type != "Gemm":
                continue
            alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
            drop = set()
            if alpha != 1.0 and len(node.input) > 1:
                new = _scaled_copy(g, inits, node.input[1], f"{node.name}/alpha_weight", alpha)
                if new:
                    node.input[1] = new
                    drop.add("alpha")
            if beta != 1.0 and len(node.input) > 2 and node.input[2]:
                new = _scaled_copy(g, inits, node.input[2], f"{node.name}/beta_bias", beta)
                if new:
                    node.input[2] = new
                    drop.add("beta")
            if drop:
                keep = [a for a in node.attribute if a.name not in drop]
                del node.attribute[:]
                node.attribute.extend(keep)
                inits = _inits(g)
                changed += 1
    prune_initializers(model)
    return changed


def scalar(inits: dict, name: str) -> float | None:
    """A one-value initializer's value (None when `name` is not one)."""
    t = inits.get(name)
    if t is None:
        return None
    v = tensor_array(t)
    return float(v.reshape(-1)[0]) if v.size == 1 else None


def readers_of(g: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """tensor -> the nodes of `g` that read it (an optional input left empty is no tensor)."""
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            if i:
                out.setdefault(i, []).append(n)
    return out


def graph_views(model: onnx.ModelProto):
    """(graph, its initializers by name, readers_of(graph), fixed_names(graph)) for every graph,
    subgraphs before their parents: what a pass that rewrites nodes in place needs (walk.deepest_first)."""
    by_path = graph_by_path(model)
    for path in deepest_first(by_path):
        g = by_path[path]
        yield g, {t.name: t for t in g.initializer}, readers_of(g), fixed_names(g)


def own_constant_dq(dq: onnx.NodeProto, inits: dict, readers: dict, kept: set[str]) -> bool:
    """Whether `dq` is a DequantizeLinear whose inputs are initializers that it alone reads, none
    of them nor its output among `kept` (graph_views): a rewrite may then change them in place."""
    if dq.op_type != "DequantizeLinear" or any(i and i not in inits for i in dq.input):
        return False
    consts = [i for i in dq.input if i]
    return not any(n in kept for n in [*consts, dq.output[0]]) and all(len(readers.get(n, [])) == 1 for n in consts)


def _drop_nodes(model: onnx.ModelProto, drop: set[int]) -> None:
    """Remove the main-graph nodes whose id() is in `drop`, and initializers left unread."""
    if drop:
        g = model.graph
        keep = [n for n in g.node if id(n) not in drop]
        del g.node[:]
        g.node.extend(keep)
        prune_initializers(model)


def _channel_constant(inits: dict, name: str, channels: int, from_end: int, rank: int) -> np.ndarray | None:
    """A float constant that broadcasts against a rank-`rank` tensor as one value per channel, the
    channel axis being `from_end` places from the last (3 for NCHW, 1 for NHWC), as [C]."""
    t = inits.get(name)
    if t is None or t.data_type != onnx.TensorProto.FLOAT:
        return None
    v = tensor_array(t).astype(np.float64)
    if v.size == 1 and v.ndim <= rank:
        return np.full(channels, float(v.reshape(-1)[0]))
    axis = v.ndim - from_end
    if v.ndim > rank or axis < 0 or v.shape[axis] != channels or v.size != channels:
        return None
    return v.reshape(-1)


# per-channel affine ops a Conv's output may pass through, folded as y -> y * k + c
_AFFINE = ("Mul", "Div", "Add", "Sub")


def _affine_step(node: onnx.NodeProto, y: str, k: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, shift) of `node` applied to y, whose other input is the per-channel constant k."""
    first = node.input[0] == y
    if node.op_type == "Mul":
        return k, np.zeros_like(k)
    if node.op_type == "Add":
        return np.ones_like(k), k
    if node.op_type == "Sub" and first:
        return np.ones_like(k), -k
    if node.op_type == "Div" and first and np.all(k != 0):
        return 1.0 / k, np.zeros_like(k)
    return None


def fold_affine(model: onnx.ModelProto) -> int:
    """Fold the constant per-channel Mul / Div / Add / Sub ops that follow a Conv (an affine block,
    as some exporters write a BatchNorm or a learnable scale) into the Conv's weight and bias, also
    past one Transpose to channels-last (a TensorFlow export's NHWC layout; its identity Casts go
    first, drop_identities): exact up to float rounding, and it removes float ops between
    quantized kernels. The Transpose stays, after the Conv. Main graph; returns how many ops
    were folded."""
    g = model.graph
    inits = _inits(g)
    readers = readers_of(g)
    outputs = {o.name for o in g.output}
    only = lambda t: readers[t][0] if len(readers.get(t, [])) == 1 and t not in outputs else None  # noqa: E731
    drop, folded = set(), 0
    for conv in list(g.node):
        if conv.op_type != "Conv" or len(conv.input) < 2 or conv.input[1] not in inits:
            continue
        w = tensor_array(inits[conv.input[1]]).astype(np.float64)
        b = (tensor_array(inits[conv.input[2]]).astype(np.float64)
             if len(conv.input) > 2 and conv.input[2] in inits else np.zeros(w.shape[0]))
        rank, from_end = w.ndim, w.ndim - 1
        y, chain, transpose, used = conv.output[0], [], None, 0
        while (node := only(y)) is not None and node.output:
            if node.op_type == "Transpose" and transpose is None:
                perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
                if perm is None or len(perm) != rank:
                    break
                transpose, from_end = node, rank - perm.index(1)
            elif node.op_type in _AFFINE and len(node.input) == 2:
                other = node.input[1] if node.input[0] == y else node.input[0]
                k = _channel_constant(inits, other, w.shape[0], from_end, rank)
                step = None if k is None else _affine_step(node, y, k)
                if step is None:
                    break
                w, b = w * step[0].reshape(-1, *([1] * (rank - 1))), b * step[0] + step[1]
                used = len(chain) + 1
            else:
                break
            chain.append(node)
            y = node.output[0]
        chain = chain[:used]                  # up to the last op folded (a trailing Transpose stays)
        if not chain:
            continue
        last = chain[-1].output[0]
        if any(n is transpose for n in chain):
            transpose.input[0] = conv.output[0]
            transpose.output[0] = last
        else:
            conv.output[0] = last
        drop |= {id(n) for n in chain if n is not transpose}
        folded += sum(n.op_type in _AFFINE for n in chain)
        w_name, b_name = conv.name + "/affine_weight", conv.name + "/affine_bias"
        _replace_init(g, w_name, w)
        _replace_init(g, b_name, b)
        inputs = [conv.input[0], w_name, b_name]
        del conv.input[:]
        conv.input.extend(inputs)
        inits = _inits(g)
    _drop_nodes(model, drop)
    return folded


def drop_identities(model: onnx.ModelProto) -> int:
    """Remove Identity nodes and the Casts whose input already has the target type (exporters
    write float-to-float Casts around every op, and Identity copies of constants): they sit
    between a layer and the ops its fused kernel would absorb, and hide constants from the
    affine fold. Main graph, typed tensors only for Casts; returns how many."""
    g = model.graph
    types = tensor_types(model)
    types.update({t.name: t.data_type for t in g.initializer})
    nodes = list(g.node)             # held: the drop list is by id(), stable only while referenced
    keep = {o.name for o in g.output}                      # and names read inside subgraphs
    for node in nodes:
        keep |= node_reads(node) - set(node.input)
    rename, drop = {}, set()
    for node in nodes:
        if node.op_type not in ("Cast", "Identity") or node.output[0] in keep or not node.input:
            continue
        src = rename.get(node.input[0], node.input[0])
        if node.op_type == "Identity" or types.get(node.input[0]) == attr(node, "to", None):
            rename[node.output[0]] = src
            drop.add(id(node))
    for node in nodes:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    _drop_nodes(model, drop)
    return len(drop)


def fuse_hardswish(model: onnx.ModelProto) -> int:
    """Replace the decomposed x * clip(x + 3, 0, 6) / 6 (Add, Clip, Mul, Div, as exporters write
    hard-swish) by one HardSwish node (opset 14): one pass over the tensor instead of four, and
    one tensor less to carry between quantized kernels. Main graph; returns how many."""
    g = model.graph
    inits = _inits(g)
    readers = readers_of(g)
    outputs = {o.name for o in g.output}
    only = lambda t: readers.get(t, [None])[0] if len(readers.get(t, [])) == 1 and t not in outputs else None  # noqa: E731
    drop, fused = set(), 0
    for add in g.node:
        if add.op_type != "Add" or len(add.input) != 2 or scalar(inits, add.input[1]) != 3.0:
            continue
        x = add.input[0]
        clip = only(add.output[0])
        if clip is None or clip.op_type != "Clip" or len(clip.input) != 3 or \
                (scalar(inits, clip.input[1]), scalar(inits, clip.input[2])) != (0.0, 6.0):
            continue
        mul = only(clip.output[0])
        if mul is None or mul.op_type != "Mul" or x not in mul.input:
            continue
        div = only(mul.output[0])
        if div is None or div.op_type != "Div" or div.input[0] != mul.output[0] or scalar(inits, div.input[1]) != 6.0:
            continue
        drop |= {id(add), id(clip), id(mul)}
        div.op_type, div.name = "HardSwish", f"{div.name}/hardswish"
        del div.input[:]
        div.input.append(x)
        fused += 1
    _drop_nodes(model, drop)
    return fused


def prepare(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    name_nodes(m)
    moved = constants_to_initializers(m)
    folded = fold_batchnorm(m)
    gemms = normalize_gemms(m)
    return m, {"constants_moved": moved, "batchnorm_folded": folded, "gemm_scales_folded": gemms}


def upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """Raise the default-domain opset to `target` (never lowers it)."""
    current = opset_of(model)
    if current >= target:
        return model
    try:
        out = version_converter.convert_version(model, target)
    except Exception as e:
        raise InputModelError(f"cannot upgrade the model from opset {current} to {target} "
                              f"(needed for {'int4 weights' if target >= 21 else 'per-channel QDQ'}): "
                              f"{str(e).splitlines()[0][:160]}; try --bits 8") from None
    if target >= 21:
        out.ir_version = max(out.ir_version, 10)
    return out
