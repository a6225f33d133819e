"""Block rotations of the inputs of weight-only Gemm/MatMul layers whose runtime rounds that
input to int8 per block of K as it runs (onnxruntime's MatMulNBits at accuracy level 4:
what a default session fuses a blocked DequantizeLinear -> MatMul into, and what ort-cpu writes).

For an orthogonal R, x W = (x R)(R^T W) exactly. R here is block diagonal: one Hadamard matrix
of ROTATE_BLOCK (seeded random signs on its rows) for each run of ROTATE_BLOCK input channels, so
a channel of large values (LayerNorm outputs carry a few) is spread over its block instead of
setting the int8 step that every other channel of the block is rounded to. The readers' weights
take R^T; the input takes R through Reshape -> MatMul [B, B] -> Reshape ahead of the readers.
The rotation is made in the prepared float graph before calibration, so the statistics, the
weight rounding and every check see the rotated basis; the rotation itself stays float. At 4 bits
the weights are rounded in the rotated basis as well.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..algos.matrix import from_matrix, to_matrix
from ..types import Target
from .large import tensor_array
from .prepare import _replace_init
from .smooth import _unique
from .walk import tensor_ranks

ROTATE_PREFIX = "onnxq_rotate"      # names of the nodes and constants a rotation adds
ROTATE_REASON = "an input rotation the conversion added (float; exact: graph/rotate.py)"


def hadamard(n: int) -> np.ndarray:
    """The orthonormal Sylvester Hadamard matrix of order n (a power of 2)."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def rotate_inputs(model: onnx.ModelProto, groups: dict[str, list[Target]], block: int, seed: int,
                  given: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Rotate each input tensor of `groups` ({input: its Gemm/MatMul readers}, every reader's weight
    read by it alone) per block of `block` channels, in place; -> {tensor: its matrix [B, B]} of
    those rotated (whose K is a multiple of B and whose rank shape inference knows). `given`: the
    rotations to make instead (statistics collected under them), each input its own matrix."""
    ranks = tensor_ranks(model)
    rng = np.random.default_rng([seed, block])
    done = {}
    for act in sorted(groups):
        readers = groups[act]
        r = (rng.choice([-1.0, 1.0], size=block)[:, None] * hadamard(block) if given is None   # x_b -> x_b @ r
             else given.get(act))
        if r is None:
            continue
        k = readers[0].params // readers[0].out_channels       # K of a 2-D weight
        rank = 2 if all(t.op == "Gemm" for t in readers) else ranks.get(act, 0)
        if k % r.shape[0] or rank < 2 or any(t.params // t.out_channels != k for t in readers):
            continue
        _rotate_readers(model.graph, readers, r)
        _insert(model.graph, act, readers, r, k, rank)
        done[act] = r
    return done


def _rotate_readers(g: onnx.GraphProto, readers: list[Target], r: np.ndarray) -> None:
    """Each reader's weight [O, K] as a matrix times the block-diagonal R: W' = W R, so that
    (x R) W'^T = x W^T."""
    b = r.shape[0]
    inits = {i.name: i for i in g.initializer}
    for t in readers:
        m = to_matrix(tensor_array(inits[t.weight]).astype(np.float64), t.weight_layout)
        rotated = (m.reshape(m.shape[0], -1, b) @ r).reshape(m.shape)
        _replace_init(g, t.weight, from_matrix(rotated, t.weight_layout, t.shape).astype(np.float32))


def _insert(g: onnx.GraphProto, act: str, readers: list[Target], r: np.ndarray, k: int, rank: int) -> None:
    """Reshape(act, [..., K / B, B]) -> MatMul(r) -> Reshape([..., K]) before the first reader,
    which every reader reads instead of `act`."""
    b = r.shape[0]
    base = _unique(g, ROTATE_PREFIX + ("" if act.startswith("/") else "/") + act)
    g.initializer.extend([
        numpy_helper.from_array(r.astype(np.float32), f"{base}/matrix"),
        numpy_helper.from_array(np.array([0] * (rank - 1) + [k // b, b], np.int64), f"{base}/blocks"),
        numpy_helper.from_array(np.array([0] * (rank - 1) + [k], np.int64), f"{base}/channels")])
    nodes = [helper.make_node("Reshape", [act, f"{base}/blocks"], [f"{base}/split"], name=f"{base}/split"),
             helper.make_node("MatMul", [f"{base}/split", f"{base}/matrix"], [f"{base}/turned"],
                              name=f"{base}/turn"),
             helper.make_node("Reshape", [f"{base}/turned", f"{base}/channels"], [f"{base}/out"],
                              name=f"{base}/join")]
    names = {t.node for t in readers}
    first = min(i for i, n in enumerate(g.node) if n.name in names)
    for n in g.node:
        if n.name in names:
            n.input[0] = f"{base}/out"
    for i, n in enumerate(nodes):
        g.node.insert(first + i, n)
