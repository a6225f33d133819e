"""onnxruntime's own quantized weight kernels (com.microsoft), emitted in place of DQ -> op under
targets whose rules ask for them (plan/rules.py `ms_kernels`):

MatMulNBits           Y = A @ W (+ bias) with W as 4-bit codes, two to a byte, or 8-bit ones, one
                      scale per block of K values of a column; A stays float and the CPU kernel
                      quantizes it to int8 per block as it runs (accuracy_level 4).
GatherBlockQuantized  rows of a table stored as 8- or 4-bit codes with one scale per block of a
                      row, dequantized as they are gathered.

Both take onnxq's own codes unchanged: a per-channel scale becomes the same scale repeated over
the blocks, so the emitted weights equal the generic target's bit for bit.
"""

from __future__ import annotations

import hashlib

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..algos.matrix import to_matrix
from ..plan.rules import nbits_fits
from ..types import LayerPlan
from .large import tensor_array
from .prepare import drop_initializers
from .walk import graphs, graphs_in

DOMAIN = "com.microsoft"
MIN_BLOCK = 16            # both kernels take power-of-two blocks of at least 16
MAX_BLOCK = 128
ACCURACY_LEVEL = 4        # MatMulNBits: int8 compute on the float input (rounded per block as it runs)


def _block(k: int, plan_block: int, padded: bool) -> int:
    """The block size along K: the plan's own (blocked scales), else the largest power of two in
    [16, 128] that divides K (a per-channel scale is then repeated); with `padded` (the kernel pads
    the last block) MAX_BLOCK when none divides; else 0 (not expressible)."""
    if plan_block:
        ok = plan_block >= MIN_BLOCK and plan_block & (plan_block - 1) == 0
        return plan_block if ok and (padded or k % plan_block == 0) else 0
    b = MAX_BLOCK
    while b >= MIN_BLOCK:
        if k % b == 0:
            return b
        b //= 2
    return MAX_BLOCK if padded else 0


def _block_scales(scales: np.ndarray, rows: int, blocks: int) -> np.ndarray:
    """Scales as [rows, blocks]: per-row scales repeated, blocked ones as they are."""
    s = np.asarray(scales, np.float32)
    return s.reshape(rows, blocks) if s.size == rows * blocks else np.repeat(s.reshape(rows, 1), blocks, 1)


def add_initializer(g: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    """Appends `value` to g's initializers as `name`; returns the name."""
    g.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return name


def set_bias(node: onnx.NodeProto, name: str) -> None:
    """Makes `name` the third input (the bias) of a Conv, ConvTranspose or Gemm."""
    if len(node.input) > 2:
        node.input[2] = name
    else:
        node.input.append(name)


def _constant(g: onnx.GraphProto, name: str, n: int) -> np.ndarray | None:
    """A constant bias as a vector of n values (None when it is not an initializer of that size)."""
    init = next((t for t in g.initializer if t.name == name), None)
    if init is None:
        return None
    value = tensor_array(init).astype(np.float32)
    return np.broadcast_to(value.reshape(-1), (n,)).copy() if value.size in (1, n) else None


def _become(node: onnx.NodeProto, op: str, inputs: list[str], **attrs) -> None:
    """Turns `node` into a com.microsoft `op` in place (its name and outputs stay)."""
    node.op_type, node.domain = op, DOMAIN
    del node.input[:]
    node.input.extend(inputs)
    del node.attribute[:]
    node.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())


def matmul_nbits(g: onnx.GraphProto, node: onnx.NodeProto, lp: LayerPlan, bias: np.ndarray | None) -> bool:
    """Emits a MatMul (X @ W) or Gemm (transA=0) with 2- to 4-bit or 8-bit codes as MatMulNBits;
    False when its shape or bias does not fit the kernel (the caller then emits DQ -> op)."""
    t = lp.target
    w = to_matrix(lp.codes, t.weight_layout)          # [N, K]
    n, k = w.shape
    if bias is None and t.op == "Gemm" and len(node.input) > 2 and node.input[2]:
        bias = _constant(g, node.input[2], n)          # the model's own C, kept as it is
    block = _block(k, lp.block, padded=True)
    has_c = t.op == "Gemm" and len(node.input) > 2 and bool(node.input[2])
    if not (nbits_fits(t) and block) or (bias is None and has_c) or (bias is not None and np.asarray(bias).size != n):
        return False
    bits = 4 if lp.bits <= 4 else 8
    blocks = -(-k // block)
    # codes + their zero point: the plan's (affine blocks) or 2^(bits - 1), the kernel's default
    zeros = (np.full((n, blocks), 1 << (bits - 1), np.int16) if lp.zero_points is None
             else lp.zero_points.reshape(n, blocks).astype(np.int16))
    u = np.repeat(zeros, block, axis=1)                 # a padded tail dequantizes to 0
    u[:, :k] += w.astype(np.int16)
    u = u.astype(np.uint8).reshape(n, blocks, block)
    pre = t.node
    data = (f"{pre}/weight_q4", _nibbles(u)) if bits == 4 else (f"{pre}/weight_q", u)   # 4-bit: two to a byte
    ins = [node.input[0], add_initializer(g, *data),
           add_initializer(g, f"{pre}/weight_scale", _block_scales(lp.scales, n, blocks))]
    if lp.zero_points is not None:                      # 4-bit zero points two to a byte per row
        z = zeros.astype(np.uint8)
        z = _nibbles(np.pad(z, ((0, 0), (0, blocks % 2)))) if bits == 4 else z
        ins.append(add_initializer(g, f"{pre}/weight_zero", z))
    if bias is not None:
        ins += [""] * (4 - len(ins) + 1) + [add_initializer(g, f"{pre}/bias", np.asarray(bias, np.float32).reshape(n))]
    _become(node, "MatMulNBits", ins, K=k, N=n, bits=bits, block_size=block, accuracy_level=ACCURACY_LEVEL)
    return True


def _nibbles(u: np.ndarray) -> np.ndarray:
    """4-bit values [..., 2m] packed two to a byte along the last axis, low nibble first."""
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def gather_blocks(g: onnx.GraphProto, node: onnx.NodeProto, lp: LayerPlan) -> bool:
    """Emits an embedding table (Gather along axis 0) as GatherBlockQuantized: 4-bit codes in an
    INT4 tensor (UINT4 beside UINT4 zero points on affine grids), 8-bit ones as uint8 with zero
    point 128; False when the row length has no block."""
    v, d = lp.codes.shape
    block = _block(d, lp.block, padded=False)
    if not block:
        return False
    blocks = d // block
    pre = lp.target.node
    half = lp.half_scales           # float16 scales (as stored by the plan): the rows come out float16
    scales = add_initializer(g, f"{pre}/weight_scale",
                             _block_scales(lp.scales, v, blocks).astype(np.float16 if half else np.float32))
    if lp.bits <= 4:
        ins = [node.input[1], scales]
        if lp.zero_points is None:
            data = add_initializer(g, f"{pre}/weight_q", lp.codes.astype(ml_dtypes.int4))
        else:                       # affine blocks: UINT4 codes beside their zero points
            zeros = lp.zero_points.reshape(v, blocks).astype(np.int16)
            data = add_initializer(g, f"{pre}/weight_q",
                                   (lp.codes + np.repeat(zeros, block, axis=1)).astype(ml_dtypes.uint4))
            ins.append(add_initializer(g, f"{pre}/weight_zero", zeros.astype(ml_dtypes.uint4)))
        _become(node, "GatherBlockQuantized", [data, *ins], gather_axis=0, quantize_axis=1, block_size=block, bits=4)
    else:
        data = add_initializer(g, f"{pre}/weight_q", (lp.codes.astype(np.int16) + 128).astype(np.uint8))
        zero = add_initializer(g, f"{pre}/weight_zero", np.full((v, blocks), 128, np.uint8))
        _become(node, "GatherBlockQuantized", [data, node.input[1], scales, zero],
                gather_axis=0, quantize_axis=1, block_size=block, bits=8)
    if half:
        _cast_after(g, node)
    return True


def _cast_after(g: onnx.GraphProto, node: onnx.NodeProto) -> None:
    """`node` now writes float16: it writes a new tensor, cast to float under its old name by a
    Cast placed right after it."""
    out = node.output[0]
    node.output[0] = f"{out}/half"
    cast = helper.make_node("Cast", [node.output[0]], [out], name=f"{node.name}/cast", to=onnx.TensorProto.FLOAT)
    g.node.insert(list(g.node).index(node) + 1, cast)


def declare_domain(model: onnx.ModelProto, graphs) -> None:
    """Adds the com.microsoft opset import when an emitted node (in any graph) needs it."""
    used = any(n.domain == DOMAIN for g in graphs.values() for n in g.node)
    if used and all(o.domain != DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))


WEIGHT_SUFFIXES = ("/weight_q", "/weight_q4", "/weight_scale", "/weight_zero")


def _weight_sets(g: onnx.GraphProto) -> dict[str, dict[str, onnx.TensorProto]]:
    """A layer's quantized weight initializers (codes, scales, zero points) by the layer's prefix."""
    sets: dict[str, dict[str, onnx.TensorProto]] = {}
    for t in g.initializer:
        suffix = next((s for s in WEIGHT_SUFFIXES if t.name.endswith(s)), None)
        if suffix and t.HasField("raw_data"):
            sets.setdefault(t.name[:-len(suffix)], {})[suffix] = t
    return sets


def _same_set(a: dict[str, onnx.TensorProto], b: dict[str, onnx.TensorProto]) -> bool:
    return a.keys() == b.keys() and all(a[k].data_type == b[k].data_type and a[k].dims == b[k].dims
                                        and a[k].raw_data == b[k].raw_data for k in a)


def dedupe_weights(model: onnx.ModelProto) -> int:
    """Layers whose quantized weight initializers (codes, scales and zero points together) have equal
    type, shape and bytes in one graph store them once: the readers of a shared weight (plan/shared.py
    gave them the same codes and scales) read the first layer's copies, the rest are dropped. Only
    whole layers merge: a zero-point vector equal to another layer's by chance stays its own, since
    OpenVINO's CPU plugin runs a conv in float when its weight dequantization shares a constant
    with another conv's (docs/results.md, round 16). Returns how many initializers were dropped."""
    dropped = 0
    for _, g in graphs(model):
        first: dict[tuple, list[dict[str, onnx.TensorProto]]] = {}
        rename: dict[str, str] = {}
        for layer in _weight_sets(g).values():
            key = tuple(sorted((k, t.data_type, tuple(t.dims), hashlib.blake2b(t.raw_data, digest_size=16).digest())
                               for k, t in layer.items()))
            same = next((u for u in first.get(key, ()) if _same_set(u, layer)), None)
            if same is None:
                first.setdefault(key, []).append(layer)
            else:
                rename.update({t.name: same[k].name for k, t in layer.items()})
        if not rename:
            continue
        for _, sub in graphs_in(g):
            for node in sub.node:
                for i, name in enumerate(node.input):
                    if name in rename:
                        node.input[i] = rename[name]
        drop_initializers(g, [i for i, t in enumerate(g.initializer) if t.name in rename])
        dropped += len(rename)
    return dropped
