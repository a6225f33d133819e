"""generic: a float-input 4- or 8-bit Gemm becomes MatMul (+ Add of its C) on [K, N] codes.

Runtimes fuse DequantizeLinear -> MatMul on a constant 4- or 8-bit weight (blocked along K, or one
scale per output column) into a weight-only kernel that reads the codes as stored (onnxruntime's
CPU provider: MatMulNBits, which rounds its float input to int8 per block as it runs). A
DQ -> Gemm its default session neither fuses nor folds: every run dequantizes the weight again,
and a weight that an unrolled loop reads N times N times a run. Y = A·Bᵀ + C is A·(Bᵀ) + C: the
codes, scales and zero points are transposed, the values stay the same."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .large import tensor_array
from .prepare import graph_views, own_constant_dq
from .walk import attr

CODES = (TensorProto.INT4, TensorProto.UINT4, TensorProto.INT8, TensorProto.UINT8)


def _plain_gemm(n: onnx.NodeProto, w: str) -> bool:
    """A Gemm that reads `w` as its B and computes A·op(B) + C with no scaling."""
    return (n.op_type == "Gemm" and n.domain in ("", "ai.onnx") and len(n.input) > 1 and n.input[1] == w
            and n.input[0] != w and not attr(n, "transA", 0)
            and float(attr(n, "alpha", 1.0)) == 1.0 and float(attr(n, "beta", 1.0)) == 1.0)


def _weight_dq(dq: onnx.NodeProto, inits: dict, readers: dict, kept: set[str]) -> int | None:
    """transB of the one Gemm that reads this DQ of a constant 4- or 8-bit matrix, blocked along K
    or with one scale per output column, with float32 scales; None when it is not one. Constants
    or an output that another node reads too (`kept`: what subgraphs read from this graph) rule
    it out: onnxruntime fuses a DQ into MatMulNBits only when the DQ and its codes are the
    MatMul's own (a weight that the steps of an unrolled loop share, stored once, keeps its Gemms)."""
    if not own_constant_dq(dq, inits, readers, kept) or len(readers.get(dq.output[0], [])) != 1:
        return None
    q, s = inits[dq.input[0]], inits[dq.input[1]]
    if q.data_type not in CODES or len(q.dims) != 2 or s.data_type != TensorProto.FLOAT:
        return None
    gemm = readers[dq.output[0]][0]
    trans = int(attr(gemm, "transB", 0))
    along_k = int(attr(dq, "axis", 1)) % 2 == trans           # K: axis 1 of B [N, K], 0 of B [K, N]
    if not _plain_gemm(gemm, dq.output[0]) or along_k != bool(attr(dq, "block_size", 0)) or len(s.dims) > 2:
        return None
    return trans


def _transpose_dq(dq: onnx.NodeProto, inits: dict) -> None:
    """The DQ of [N, K] codes becomes one of [K, N]: blocked along K (axis 1 -> 0) or one scale
    per column (axis 0 -> 1); its constants, which it alone reads, transposed in place."""
    blocked = bool(attr(dq, "block_size", 0))
    for name in (i for i in dq.input if i):
        inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(tensor_array(inits[name]).T), name))
    block = _block(dq, inits) if blocked else 0
    del dq.attribute[:]
    dq.attribute.extend([helper.make_attribute("axis", 0), helper.make_attribute("block_size", block)] if blocked
                        else [helper.make_attribute("axis", 1)])


def _block(dq: onnx.NodeProto, inits: dict) -> int:
    q, s = inits[dq.input[0]], inits[dq.input[1]]
    return -(-q.dims[0] // s.dims[0])


def _as_matmul(n: onnx.NodeProto) -> list[onnx.NodeProto]:
    """The Gemm as MatMul, followed by the Add of its C when it has one (the Add keeps its output)."""
    c = n.input[2] if len(n.input) > 2 else ""
    mm = helper.make_node("MatMul", list(n.input[:2]), [n.output[0]], name=n.name)
    if not c:
        return [mm]
    mm.output[0] = f"{n.name}/matmul_out"
    return [mm, helper.make_node("Add", [mm.output[0], c], [n.output[0]], name=f"{n.name}/bias_add")]


def gemms_as_matmuls(model: onnx.ModelProto) -> int:
    """Rewrites, in place and in every graph, each Gemm on a 4-bit weight blocked along K as MatMul
    (+ Add); returns how many Gemms changed."""
    changed = 0
    for g, inits, readers, kept in graph_views(model):
        gemms: set[str] = set()                     # by output
        for dq in list(g.node):
            trans = _weight_dq(dq, inits, readers, kept)
            if trans is None:
                continue
            if trans:
                _transpose_dq(dq, inits)
            gemms.add(readers[dq.output[0]][0].output[0])
        if not gemms:
            continue
        order = [m for n in g.node for m in (_as_matmul(n) if n.op_type == "Gemm" and n.output[0] in gemms else [n])]
        del g.node[:]
        g.node.extend(order)
        changed += len(gemms)
    return changed
