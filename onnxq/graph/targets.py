"""Which nodes are quantizable, and why the others are not."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

import onnx

from ..types import ConvGeometry, Skipped, Target
from .large import tensor_array
from .rotate import ROTATE_PREFIX
from .walk import attr, graphs, loop_scopes, tensor_types

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
TABLE_OPS = ("Gather",)      # embedding lookups in a constant table (weight-only)
RECURRENT_OPS = ("LSTM", "GRU", "RNN")
INPUT_CONV_REASON = ("a conv on the model's few-channel input runs faster in float on this target "
                     "(the 8-bit kernel's short rows of Cin x kh x kw taps)")


def _geometry(node: onnx.NodeProto, w_shape: tuple[int, ...]) -> ConvGeometry:
    nd = len(w_shape) - 2
    auto_pad = attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    return ConvGeometry(
        kernel=tuple(attr(node, "kernel_shape", None) or w_shape[2:]),
        strides=tuple(attr(node, "strides", None) or (1,) * nd),
        dilations=tuple(attr(node, "dilations", None) or (1,) * nd),
        pads=tuple(attr(node, "pads", None) or (0,) * (2 * nd)),
        auto_pad=auto_pad or "NOTSET",
        group=int(attr(node, "group", 1)),
    )


def _bad_geometry(geo: ConvGeometry, shape: tuple[int, ...], op: str) -> str:
    """Why a conv's attributes cannot describe its weight, or ''."""
    nd = len(shape) - 2
    out_channels = shape[0] if op == "Conv" else shape[1] * geo.group
    if geo.group < 1 or out_channels % geo.group:
        return f"invalid group {geo.group} for a weight of shape {list(shape)}"
    if (len(geo.kernel) != nd or tuple(geo.kernel) != tuple(shape[2:]) or min(geo.strides, default=1) < 1
            or min(geo.dilations, default=1) < 1 or min(geo.pads, default=0) < 0 or len(geo.strides) != nd
            or len(geo.dilations) != nd or len(geo.pads) != 2 * nd):
        return "kernel, strides, dilations or pads do not fit the weight"
    return ""


def _classify(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], graph: str,
              in_loop: bool) -> Target | str:
    """A Target, or the reason the node is left in float."""
    op = node.op_type
    ins = list(node.input)
    act_i, w_i, layout = 0, 1, ""
    if op in ("Conv", "ConvTranspose"):
        layout = "conv" if op == "Conv" else "convT"
    elif op == "Gemm":
        if attr(node, "transA", 0):
            return "Gemm with transA=1 is not supported"
        layout = "rows" if attr(node, "transB", 0) else "cols"
    elif op == "MatMul":
        if len(ins) > 1 and ins[1] in inits:
            layout = "cols"
        elif ins[0] in inits:
            act_i, w_i, layout = 1, 0, "rows"
        else:
            return "both inputs are activations (no constant weight)"
    elif op == "Gather":                    # an embedding table: one row per token, weight-only
        if ins[0] not in inits:
            return "not a lookup in a constant table"
        if int(attr(node, "axis", 0)) != 0:
            return "Gather along an axis other than 0 is not an embedding lookup"
        act_i, w_i, layout = 1, 0, "rows"
    if len(ins) <= w_i or ins[w_i] not in inits:
        return "weight is not a constant initializer"
    w = inits[ins[w_i]]
    if w.data_type != onnx.TensorProto.FLOAT:
        return f"weight type is {onnx.TensorProto.DataType.Name(w.data_type)}, not FLOAT"
    shape = tuple(int(d) for d in w.dims)
    if op in ("Conv", "ConvTranspose") and len(shape) not in (3, 4):
        return f"{len(shape) - 2}-D convolution is not supported"
    if op in ("Gemm", "MatMul", "Gather") and len(shape) != 2:
        return f"weight has rank {len(shape)}; only 2-D {'tables' if op == 'Gather' else 'MatMul weights'} are quantized"
    if min(shape) == 0:
        return "empty weight"
    geo = _geometry(node, shape) if layout in ("conv", "convT") else None
    if geo is not None:
        bad = _bad_geometry(geo, shape, op)
        if bad:
            return bad
    bias = ins[2] if len(ins) > 2 and ins[2] and ins[2] in inits else None
    # a bias input the quantizer must leave as it is: a Gemm's C that is an activation, or that
    # still carries a beta (graph/prepare.py folds beta into constant C)
    fixed = op == "Gemm" and len(ins) > 2 and bool(ins[2]) and (
        bias is None or float(attr(node, "beta", 1.0)) != 1.0)
    if fixed:
        bias = None
    # activations inside Loop/Scan bodies cannot be observed; If branches are (graph/inline.py)
    act = None if in_loop or ins[act_i] in inits or op == "Gather" else ins[act_i]
    return Target(node=node.name, op=op, graph=graph, weight=ins[w_i], act=act, bias=bias,
                  weight_layout=layout, shape=shape, groups=geo.group if geo else 1, geo=geo,
                  fixed_bias=fixed)


def find_targets(model: onnx.ModelProto, excluded: Callable[[str], bool] = lambda node: False,
                 tables: bool = True, input_convs: int = 0) -> tuple[list[Target], list[Skipped]]:
    """Quantizable nodes of the main graph and of every subgraph, plus the skipped ones
    (`excluded(node name)` marks the nodes the user leaves in float); with `tables`, embedding
    lookups (Gather on a constant 2-D float table) too; with `input_convs`, ungrouped convs that
    read a model input of at most that many channels stay float (a target's rule)."""
    ops = WEIGHT_OPS + (TABLE_OPS if tables else ())
    on_input = _input_readers(model) if input_convs else set()
    types = tensor_types(model)
    loops = loop_scopes(model)
    targets: list[Target] = []
    skipped: list[Skipped] = []
    scopes: dict[str, dict[str, onnx.TensorProto]] = {}
    for path, g in graphs(model):
        inits: dict[str, onnx.TensorProto] = {}
        for p in sorted((p for p in scopes if path.startswith(p)), key=len):
            inits.update(scopes[p])          # outer-scope initializers are visible inside
        inits.update({t.name: t for t in g.initializer})
        scopes[path] = inits
        for node in g.node:
            if node.op_type in RECURRENT_OPS:
                skipped.append(Skipped(node.name, node.op_type, "recurrent layers are not quantized"))
            if (node.op_type not in ops or (node.op_type in TABLE_OPS and node.input[0] not in inits)
                    or node.name.startswith(ROTATE_PREFIX)):        # the conversion's own float rotation
                continue
            if excluded(node.name):
                skipped.append(Skipped(node.name, node.op_type, "excluded by --exclude"))
                continue
            if not path and node.name in on_input and _few_channels(node, inits, input_convs):
                skipped.append(Skipped(node.name, node.op_type, INPUT_CONV_REASON))
                continue
            t = _classify(node, inits, path, path in loops)
            if isinstance(t, str):
                skipped.append(Skipped(node.name, node.op_type, t))
                continue
            if t.act is not None and types.get(t.act, onnx.TensorProto.FLOAT) != onnx.TensorProto.FLOAT:
                t = Target(**{**t.__dict__, "act": None})
            targets.append(t)
    return targets, skipped


def _input_readers(model: onnx.ModelProto) -> set[str]:
    """Main-graph nodes that read a model input, directly or through Transposes and Casts."""
    inputs = {i.name for i in model.graph.input}
    reached, out = set(inputs), set()
    for node in model.graph.node:              # topological order
        if not node.input or node.input[0] not in reached:
            continue
        if node.op_type in ("Transpose", "Cast"):
            reached.update(node.output)
        else:
            out.add(node.name)
    return out


def _few_channels(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto], most: int) -> bool:
    w = inits.get(node.input[1]) if len(node.input) > 1 else None
    return (node.op_type == "Conv" and w is not None and len(w.dims) == 4 and w.dims[1] <= most
            and (attr(node, "group", 1) or 1) == 1)


def initializer_array(model: onnx.ModelProto, graph: str, name: str):
    """The value of `name` as seen from the graph at path `graph` (innermost scope first)."""
    for path, g in sorted(graphs(model), key=lambda pg: -len(pg[0])):
        if graph.startswith(path):
            for init in g.initializer:
                if init.name == name:
                    return tensor_array(init)
    raise KeyError(name)


def target_ancestors(model: onnx.ModelProto, targets) -> dict[str, set[str]]:
    """For each main-graph target, the targets upstream of it (through any path)."""
    names = {t.node for t in targets if not t.graph}
    producer_anc: dict[str, set[str]] = {}           # tensor -> targets it depends on
    out: dict[str, set[str]] = {}
    for node in model.graph.node:
        anc: set[str] = set()
        for i in node.input:
            anc |= producer_anc.get(i, set())
        if node.name in names:
            out[node.name] = anc
            anc = anc | {node.name}
        for o in node.output:
            producer_anc[o] = anc
    return out


class WeightMap(Mapping):
    """node -> weight array of the targets, read from the model on each access: for a model whose
    weights were left on disk (graph/large.py), so they are never all in memory at once."""

    def __init__(self, model: onnx.ModelProto, targets) -> None:
        self.model = model
        self.where = {t.node: (t.graph, t.weight) for t in targets}

    def __getitem__(self, node: str):
        return initializer_array(self.model, *self.where[node])

    def __iter__(self):
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)
