"""generic: an embedding table's rows are gathered as codes, then dequantized.

DequantizeLinear -> Gather dequantizes the whole table before the lookup. A runtime that folds
constant DQs at load pays it once (and holds the table in float); onnxruntime's default session
keeps every DQ while its QDQ fusions are on, so each run dequantized all V x D values to use a
few rows (all-MiniLM-L6-v2: 11.7M values a call, most of its time). Here the lookup reads the
stored codes and only the gathered rows are dequantized:

    Gather(codes, ids) -> Cast(float) -> Sub(zero point) -> Mul(Gather(scales, ids))

(a blocked table's scales are float16, its DQ's output cast to float: the gathered scales are
cast instead, and the product is taken in float, the plan's values exactly; a table with a zero
point per block gathers them as it gathers the scales)

with plain float ops, which give the DQ's values exactly ((q - z) * s of small integers) and
run with dynamic shapes everywhere (a blocked DequantizeLinear on a tensor of dynamic shape
does not load in OpenVINO). 4-bit codes, which no Gather reads, are stored two to a byte in
uint8 (column j in the low nibble, column j + D/2 in the high one, offset to 0..15) and
unpacked with two BitwiseAnds, the high nibble divided by 16 in float (OpenVINO's BitShift rounds
10 >> 4 to 1), and one Concat: the file keeps its size."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .large import tensor_array
from .prepare import graph_views, own_constant_dq
from .walk import attr

CODES = (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4)
OFFSET = {TensorProto.INT4: 8, TensorProto.INT8: 0, TensorProto.UINT8: 0, TensorProto.UINT4: 0}
BIT_OPS_OPSET = 18                                   # BitwiseAnd


def _lookups(dq: onnx.NodeProto, readers: dict, kept: set[str]) -> tuple[list[onnx.NodeProto], onnx.NodeProto | None]:
    """The Gathers (axis 0, the table as their data) that alone read the DQ's output, or the
    output of the one Cast to float that alone reads it (a table with float16 scales); and that
    Cast."""
    table, cast = dq.output[0], None
    out = readers.get(table, [])
    if len(out) == 1 and out[0].op_type == "Cast" and attr(out[0], "to", 0) == TensorProto.FLOAT:
        cast = out[0]
        table = cast.output[0]
        out = [] if table in kept else readers.get(table, [])
    ok = all(n.op_type == "Gather" and n.domain in ("", "ai.onnx") and n.input[0] == table
             and n.input[1] != table and int(attr(n, "axis", 0)) == 0 for n in out)
    return (out, cast) if ok and out else ([], None)


def _table(dq: onnx.NodeProto, inits: dict, readers: dict, kept: set[str], opset: int, half: bool
           ) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(codes [V, D] offset to non-negative, scales [V, blocks, 1] or [V, 1] or [], the zero
    point on that offset: one throughout, or one per block [V, blocks, 1]) of a DQ of a constant
    2-D table with one scale per row, per block of a row or per tensor; None when the DQ is not
    one, or when its constants or output are read elsewhere (`kept`: what subgraphs or outputs read)."""
    if not own_constant_dq(dq, inits, readers, kept):
        return None
    q, s = inits[dq.input[0]], inits[dq.input[1]]
    four = q.data_type in (TensorProto.INT4, TensorProto.UINT4)
    if (q.data_type not in CODES or len(q.dims) != 2 or s.data_type != (TensorProto.FLOAT16 if half else TensorProto.FLOAT)
            or (four and (q.dims[1] % 2 or opset < BIT_OPS_OPSET))):
        return None
    codes, scales = tensor_array(q).astype(np.int16), tensor_array(s)
    has_zero = len(dq.input) > 2 and bool(dq.input[2])
    zero = tensor_array(inits[dq.input[2]]).astype(np.int16) if has_zero else np.zeros(1, np.int16)
    v, d = codes.shape
    block, axis = int(attr(dq, "block_size", 0)), int(attr(dq, "axis", 1)) % 2
    if scales.ndim == 0 or scales.size == 1:
        shaped = scales.reshape(())
    elif block and axis == 1 and scales.shape == (v, -(-d // block)) and d % block == 0:
        shaped = scales.reshape(v, d // block, 1)
    elif not block and axis == 0 and scales.shape == (v,):
        shaped = scales.reshape(v, 1)
    else:
        return None
    off = OFFSET[q.data_type]
    if zero.size and np.any(zero != zero.flat[0]):            # a zero point per block of a row
        return (codes + off, shaped, zero.reshape(shaped.shape) + off) if shaped.ndim == 3 else None
    return codes + off, shaped, float(zero.flat[0] + off)


def _packed(codes: np.ndarray) -> np.ndarray:
    """4-bit codes 0..15 [V, D], two to a byte: column j low, column j + D/2 high."""
    half = codes.shape[1] // 2
    return (codes[:, :half] | (codes[:, half:] << 4)).astype(np.uint8)


def _as_float(src: str, dst: str, four: bool, names: dict[str, str]) -> list[onnx.NodeProto]:
    """Nodes that turn gathered codes `src` into float `dst`; 4-bit ones (two to a byte) are
    unpacked: the high nibble masked, then / 16 in float (exact)."""
    mk = helper.make_node
    if not four:
        return [mk("Cast", [src], [dst], name=f"{src}_cast", to=TensorProto.FLOAT)]
    return [mk("BitwiseAnd", [src, names["low_mask"]], [f"{src}_low"], name=f"{src}_low"),
            mk("BitwiseAnd", [src, names["high_mask"]], [f"{src}_high"], name=f"{src}_high"),
            mk("Cast", [f"{src}_low"], [f"{src}_low_f"], name=f"{src}_low_cast", to=TensorProto.FLOAT),
            mk("Cast", [f"{src}_high"], [f"{src}_high_f"], name=f"{src}_high_cast", to=TensorProto.FLOAT),
            mk("Mul", [f"{src}_high_f", names["sixteenth"]], [f"{src}_high_s"], name=f"{src}_high_shift"),
            mk("Concat", [f"{src}_low_f", f"{src}_high_s"], [dst], name=f"{src}_unpack", axis=-1)]


def _lookup_nodes(n: onnx.NodeProto, names: dict[str, str], four: bool, blocked: bool) -> list[onnx.NodeProto]:
    """The nodes that replace one Gather `n` of the table whose constants `names` holds."""
    p, ids = n.name or n.output[0], n.input[1]
    mk = helper.make_node
    out = [mk("Gather", [names["codes"], ids], [f"{p}/codes"], name=n.name, axis=0)]
    out += _as_float(f"{p}/codes", f"{p}/codes_f", four, names)
    x = f"{p}/codes_f"
    if blocked:
        out += [mk("Shape", [ids], [f"{p}/ids_shape"], name=f"{p}/ids_shape"),
                mk("Concat", [f"{p}/ids_shape", names["block_dims"]], [f"{p}/block_shape"],
                   name=f"{p}/block_shape", axis=0),
                mk("Concat", [f"{p}/ids_shape", names["row_dims"]], [f"{p}/row_shape"], name=f"{p}/row_shape", axis=0),
                mk("Reshape", [x, f"{p}/block_shape"], [f"{p}/blocks"], name=f"{p}/blocks")]
        x = f"{p}/blocks"
    zero = names.get("zero")      # one zero point throughout (absent when it is 0)
    if "row_zero" in names:       # a zero point per block: gathered like the codes, [..., blocks, 1]
        out += [mk("Gather", [names["row_zero"], ids], [f"{p}/zeros"], name=f"{p}/zeros_gather", axis=0),
                *_as_float(f"{p}/zeros", f"{p}/zeros_f", "zero_packed" in names, names),
                mk("Unsqueeze", [f"{p}/zeros_f", names["last_axis"]], [f"{p}/zeros_b"], name=f"{p}/zeros_blocks")]
        zero = f"{p}/zeros_b"
    if zero:
        out.append(mk("Sub", [x, zero], [f"{p}/centred"], name=f"{p}/centre"))
        x = f"{p}/centred"
    scale = names["scale"]
    if "row_scales" in names:
        out.append(mk("Gather", [names["scale"], ids], [f"{p}/scales"], name=f"{p}/scales_gather", axis=0))
        scale = f"{p}/scales"
        if names.get("half"):       # float16 scales: only the gathered ones are cast
            out.append(mk("Cast", [scale], [f"{p}/scales_f"], name=f"{p}/scales_cast", to=TensorProto.FLOAT))
            scale = f"{p}/scales_f"
    y = f"{p}/scaled" if blocked else n.output[0]
    out.append(mk("Mul", [x, scale], [y], name=f"{p}/scale"))
    if blocked:
        out.append(mk("Reshape", [y, f"{p}/row_shape"], [n.output[0]], name=f"{p}/rows"))
    return out


def _store(g: onnx.GraphProto, dq: onnx.NodeProto, inits: dict, table) -> tuple[dict[str, str], bool, bool]:
    """Replaces the DQ's constants by the lookup's: (their names, 4-bit, blocked); a zero point
    that is not 0 is among the names ('zero', or 'row_zero' for one per block)."""
    codes, scales, zero = table
    four = inits[dq.input[0]].data_type in (TensorProto.INT4, TensorProto.UINT4)
    pre = dq.input[0].rsplit("/weight_q", 1)[0] if "/weight_q" in dq.input[0] else dq.name or dq.output[0]
    half = bool(scales.ndim) and scales.dtype == np.float16      # a scalar scale is stored float32
    names = {"scale": dq.input[1], **({"half": "1"} if half else {})}
    inits[dq.input[1]].CopyFrom(numpy_helper.from_array(scales.astype(np.float16 if half else np.float32),
                                                        dq.input[1]))
    drop = {dq.input[2]} if len(dq.input) > 2 and dq.input[2] else set()
    new = {}
    if four:
        drop.add(dq.input[0])
        new["codes"] = (f"{pre}/weight_q4", _packed(codes))
        new["low_mask"] = (f"{pre}/low_mask", np.array(15, np.uint8))
        new["high_mask"] = (f"{pre}/high_mask", np.array(0xF0, np.uint8))
        new["sixteenth"] = (f"{pre}/sixteenth", np.array(1 / 16, np.float32))
    else:
        names["codes"] = dq.input[0]
    blocked = scales.ndim == 3
    if blocked:
        blocks = scales.shape[1]
        new["block_dims"] = (f"{pre}/block_dims", np.array([blocks, codes.shape[1] // blocks], np.int64))
        new["row_dims"] = (f"{pre}/row_dims", np.array([codes.shape[1]], np.int64))
    if scales.ndim:
        names["row_scales"] = dq.input[1]
    if isinstance(zero, np.ndarray):              # one per block: 4-bit ones two to a byte where they pair up
        rows = zero.reshape(zero.shape[:2])
        if four and rows.shape[1] % 2 == 0:
            names["zero_packed"] = "1"
            new["row_zero"] = (f"{pre}/weight_zero_q4", _packed(rows))
        else:
            new["row_zero"] = (f"{pre}/weight_zero_q", rows.astype(np.uint8))
        new["last_axis"] = (f"{pre}/last_axis", np.array([-1], np.int64))
    elif zero:
        new["zero"] = (f"{pre}/weight_zero_f", np.array(zero, np.float32))
    keep = [t for t in g.initializer if t.name not in drop]
    del g.initializer[:]
    g.initializer.extend(keep + [numpy_helper.from_array(v, name) for name, v in new.values()])
    names.update({k: name for k, (name, _) in new.items()})
    return names, four, blocked


def lookups_on_codes(model: onnx.ModelProto) -> int:
    """Rewrites, in place and in every graph, each DQ -> Gather of a constant table so the Gather
    reads the codes and only the gathered rows are dequantized; returns how many tables changed."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    changed = 0
    for g, inits, readers, kept in graph_views(model):
        swap: dict[int, list[onnx.NodeProto]] = {}          # id(node) -> its replacement
        for dq in list(g.node):
            lookups, cast = _lookups(dq, readers, kept) if dq.op_type == "DequantizeLinear" else ([], None)
            table = _table(dq, inits, readers, kept, opset, cast is not None) if lookups else None
            if table is None:
                continue
            names, four, blocked = _store(g, dq, inits, table)
            inits = {t.name: t for t in g.initializer}
            swap[id(dq)] = []
            if cast is not None:
                swap[id(cast)] = []
            for n in lookups:
                swap[id(n)] = _lookup_nodes(n, names, four, blocked)
            changed += 1
        if swap:
            order = [m for n in g.node for m in swap.get(id(n), [n])]
            del g.node[:]
            g.node.extend(order)
    return changed
