"""Embedding tables: a Gather on a constant table is quantized per row (per block of a row at
4 bits; weight-only), emitted as
DequantizeLinear -> Gather, and looks up the same rows; under ort-cpu the same codes go into
onnxruntime's GatherBlockQuantized (which dequantizes only the rows it gathers), and a 4-bit
MatMul into its MatMulNBits."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import make_model, vi
from onnx import TensorProto, helper

import onnxq


def embedder(rng):
    table = (rng.standard_normal((50, 64)) * rng.uniform(0.1, 3.0, (50, 1))).astype(np.float32)  # rows of very different size
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "w"], ["y"], name="proj")]
    return make_model(nodes, [vi("ids", ["N", 7], TensorProto.INT64)], [vi("y", ["N", 7, 8])],
                      {"table": table, "w": (rng.standard_normal((64, 8)) * 0.3).astype(np.float32)})


# 8 bits: the table holds most of this model's weights, so by default it takes a scale per block
# of 32 values of a row (api.block_8bit, opset 21); block_8bit=False keeps one per row
@pytest.mark.parametrize("bits, block_8bit, floor_db", [(8, None, 40.0), (8, False, 35.0), (4, None, 15.0)])
def test_tables_are_quantized_per_row_and_look_up_the_same_rows(bits, block_8bit, floor_db):
    rng = np.random.default_rng(0)
    m = embedder(rng)
    feeds = [{"ids": rng.integers(0, 50, (1, 7))} for _ in range(12)]
    cfg = onnxq.ConvertConfig(bits=bits, act_bits=32, block_8bit=block_8bit)     # weights alone
    q, rep = onnxq.convert(m, cfg, calib=feeds)
    table = next(l for l in rep.quantized if l.op == "Gather")
    assert table.bits == bits and table.activation_bits == 32 and "embedding" in table.float_input_reason
    inits = {t.name: t for t in q.graph.initializer}
    # the lookup reads the codes (graph/tables.py): INT8 at 8 bits, 4-bit ones two to a byte
    codes = inits["embed/weight_q" if bits == 8 else "embed/weight_q4"]
    assert codes.data_type == (TensorProto.INT8 if bits == 8 else TensorProto.UINT8)
    assert list(codes.dims) == [50, 64 if bits == 8 else 32]
    # one scale a row at 8 bits unless blocked; at 4 bits one per 32 values of a row
    assert list(inits["embed/weight_scale"].dims) == ([50, 1] if block_8bit is False else [50, 2, 1])
    # at 4 bits each block on its own affine grid: a zero point a block, two to a byte
    assert ("embed/weight_zero_q4" in inits) is (bits == 4) and ("zero points" in table.method) is (bits == 4)
    # a blocked table's scales in float16 (the gathered ones are cast), one a row in float32
    half = block_8bit is None
    assert inits["embed/weight_scale"].data_type == (TensorProto.FLOAT16 if half else TensorProto.FLOAT)
    assert any(n.op_type == "Cast" and n.input[0].endswith("/scales") for n in q.graph.node) is half
    assert bool(rep.config["block_8bit"]) is (bits == 8 and block_8bit is None)       # a W8 conversion's choice
    assert ("blocks of 32" in table.method) is (block_8bit is None)
    assert "table" not in inits                                                   # no float copy kept
    ids = {"ids": np.arange(50).reshape(1, 50)[:, :7]}
    every = {"ids": np.arange(49).reshape(7, 7)}
    a, b = ort.InferenceSession(m.SerializeToString()), ort.InferenceSession(q.SerializeToString())
    for f in (ids, every):
        ref, got = a.run(None, f)[0], b.run(None, f)[0]
        db = 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2))
        assert db > floor_db, db


def _codes(q: onnx.ModelProto, name: str) -> np.ndarray:
    return onnx.numpy_helper.to_array(next(t for t in q.graph.initializer if t.name == name)).astype(np.int32)


def _unpacked(packed: np.ndarray) -> np.ndarray:
    """4-bit values stored two to a byte, columns j and j + n/2 in one byte."""
    return np.concatenate([packed & 15, packed >> 4], axis=1)


def _generic_table(q: onnx.ModelProto, bits: int) -> np.ndarray:
    """The generic target's table codes: INT8, or 4-bit ones plus their block's zero point two to
    a byte."""
    return _codes(q, "embed/weight_q") if bits == 8 else _unpacked(_codes(q, "embed/weight_q4"))


@pytest.mark.parametrize("bits", [8, 4])
def test_ort_cpu_tables_and_matmuls_use_onnxruntimes_kernels_with_the_same_codes(bits):
    rng = np.random.default_rng(1)
    m = embedder(rng)
    feeds = [{"ids": rng.integers(0, 50, (1, 7))} for _ in range(12)]
    cfg = dict(bits=bits, protect=0)
    generic, _ = onnxq.convert(m, onnxq.ConvertConfig(**cfg), calib=feeds)
    q, rep = onnxq.convert(m, onnxq.ConvertConfig(**cfg, target="ort-cpu"), calib=feeds)
    ops = {n.name: (n.op_type, n.domain) for n in q.graph.node}
    assert ops["embed"] == ("GatherBlockQuantized", "com.microsoft")
    assert ops["proj"][0] == "MatMulNBits"                    # 4 or 8 bits: the weight-only kernel
    assert any(o.domain == "com.microsoft" for o in q.opset_import)
    # the table's codes are the generic target's, stored for the kernel (uint8 with zero point
    # 128 at 8 bits; at 4, UINT4 beside the same zero points, one per block of 32)
    table = _codes(q, "embed/weight_q") - (128 if bits == 8 else 0)
    assert np.array_equal(table, _generic_table(generic, bits))
    if bits == 4:
        assert np.array_equal(_codes(q, "embed/weight_zero"), _unpacked(_codes(generic, "embed/weight_zero_q4")))
    # the generic table's scales, float16 (blocked), so the kernel's float16 rows are cast to
    # float for `proj`
    mine, theirs = (onnx.numpy_helper.to_array(next(t for t in g.graph.initializer if t.name == "embed/weight_scale"))
                    for g in (q, generic))
    assert mine.dtype == theirs.dtype == np.float16
    assert np.array_equal(mine.reshape(-1), theirs.reshape(-1))
    cast = [n for n in q.graph.node if n.op_type == "Cast" and n.output[0] == "e"]
    assert [n.input[0] for n in cast] == [next(n for n in q.graph.node if n.name == "embed").output[0]]
    if bits == 4:        # 4-bit codes + their block's zero point, two to a byte, low nibble first, per output column
        packed = _codes(q, "proj/weight_q4")                      # [N, blocks, block / 2]
        zeros = _codes(q, "proj/weight_zero")                     # [N, blocks / 2]: 2 blocks of 32
        unpacked = np.stack([packed & 15, packed >> 4], -1).reshape(8, 2, 32)
        zero = np.stack([zeros & 15, zeros >> 4], -1).reshape(8, 2, 1)
        assert np.array_equal((unpacked - zero).reshape(8, 64).T,         # the generic DQ's codes [K, N] less its zero points
                              _codes(generic, "proj/weight_q") - np.repeat(_codes(generic, "proj/weight_zero"), 32, axis=0))
    else:                # 8-bit codes + 128, one a byte, one block of the whole K = 64 (generic: INT8, no zero point)
        got = _codes(q, "proj/weight_q").reshape(8, 64).T - 128
        assert np.array_equal(got, _codes(generic, "proj/weight_q"))
    assert not any(n.op_type == "QuantizeLinear" for n in q.graph.node)       # the kernel reads float
    f = {"ids": np.arange(49).reshape(7, 7)}
    ref = ort.InferenceSession(m.SerializeToString()).run(None, f)[0]
    got = ort.InferenceSession(q.SerializeToString()).run(None, f)[0]
    assert 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2)) > (30.0 if bits == 8 else 15.0)


def positional_encoder(rng):
    """Word and position embeddings summed, then two MatMuls: every sample reads every row of the
    small position table, whose rows each hold one large value (a 4-bit block's grid is spent on it)."""
    words = (rng.standard_normal((2000, 64)) * 0.5).astype(np.float32)
    pos = (rng.standard_normal((7, 64)) * 0.5).astype(np.float32)
    pos[np.arange(7), rng.integers(0, 32, 7)] = 12.0
    nodes = [helper.make_node("Gather", ["words", "ids"], ["w"], name="word_embed"),
             helper.make_node("Gather", ["pos", "positions"], ["p"], name="pos_embed"),
             helper.make_node("Add", ["w", "p"], ["e"], name="sum"),
             helper.make_node("MatMul", ["e", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    return make_model(nodes, [vi("ids", ["N", 7], TensorProto.INT64)], [vi("y", ["N", 7, 8])],
                      {"words": words, "pos": pos, "positions": np.arange(7, dtype=np.int64),
                       "w1": (rng.standard_normal((64, 64)) * 0.2).astype(np.float32),
                       "w2": (rng.standard_normal((64, 8)) * 0.2).astype(np.float32)})


def test_protection_weighs_tables_like_layers_and_keeps_a_harmful_small_one_at_8_bits():
    rng = np.random.default_rng(3)
    m = positional_encoder(rng)
    feeds = [{"ids": rng.integers(0, 2000, (2, 7))} for _ in range(24)]
    q, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=4), calib=feeds)
    p = rep.protect
    assert {"word_embed", "pos_embed"} <= set(p.harm)          # tables measured with the layers
    assert "pos_embed" in p.protected and "word_embed" not in p.protected    # the big one does not fit the budget
    by_node = {l.node: l for l in rep.quantized}
    assert by_node["pos_embed"].bits == 8 and by_node["pos_embed"].note.startswith("protected")
    assert by_node["word_embed"].bits == 4 and p.used_bytes <= p.budget_bytes
    assert p.check_after < p.check_before
    _, plain = onnxq.convert(m, onnxq.ConvertConfig(bits=4, protect=0), calib=feeds)
    assert rep.fidelity.sqnr_db > plain.fidelity.sqnr_db + 3


def test_a_4_bit_table_on_affine_blocks_keeps_more_of_rows_that_lean_one_way():
    """Rows whose blocks are not centred on zero (a trained table's often are not) waste half of a
    symmetric grid; an affine grid per block spans each block's own range."""
    rng = np.random.default_rng(5)
    m = embedder(rng)
    table = next(t for t in m.graph.initializer if t.name == "table")
    w = onnx.numpy_helper.to_array(table)
    table.CopyFrom(onnx.numpy_helper.from_array(w + np.abs(w).mean(axis=1, keepdims=True), "table"))
    feeds = [{"ids": rng.integers(0, 50, (1, 7))} for _ in range(12)]
    sqnr = {}
    for zero_points in (True, False):
        _, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=4, act_bits=32, protect=0, zero_points=zero_points), calib=feeds)
        sqnr[zero_points] = next(l for l in rep.quantized if l.op == "Gather").sqnr_db
    assert sqnr[True] > sqnr[False] + 1.0, sqnr


def test_targets_without_zero_points_keep_a_symmetric_4_bit_table():
    """qnn's rules take no weight zero points: its 4-bit table stays on symmetric blocks."""
    rng = np.random.default_rng(6)
    m = embedder(rng)
    feeds = [{"ids": rng.integers(0, 50, (1, 7))} for _ in range(12)]
    _, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=4, act_bits=32, protect=0, target="qnn"), calib=feeds)
    table = next(l for l in rep.quantized if l.op == "Gather")
    assert table.bits == 4 and "blocks of 32" in table.method and "zero points" not in table.method


@pytest.mark.parametrize("d", [64, 96])          # 2 and 3 blocks of 32 a row (zero points packed / one a byte)
def test_4_bit_affine_table_rows_agree_across_targets(d):
    """ort-cpu's GatherBlockQuantized and openvino's blocked DequantizeLinear compute a table row
    in float16 (float16 scales); the rows are generic's float lookups rounded to float16, exactly."""
    rng = np.random.default_rng(9)
    table = (rng.standard_normal((51, d)) + 0.5).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "w"], ["y"], name="proj")]
    m = make_model(nodes, [vi("ids", ["N", 7], TensorProto.INT64)], [vi("y", ["N", 7, 8])],
                   {"table": table, "w": (rng.standard_normal((d, 8)) * 0.3).astype(np.float32)})
    feeds = [{"ids": rng.integers(0, 51, (1, 7))} for _ in range(12)]
    rows = {}
    for target in ("generic", "ort-cpu", "openvino"):
        q, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=4, protect=0, target=target), calib=feeds)
        assert "zero points" in next(l for l in rep.quantized if l.op == "Gather").method
        q.graph.output.append(helper.make_tensor_value_info("e", TensorProto.FLOAT, None))
        so = ort.SessionOptions()
        for k, v in rep.session_options.items():
            so.add_session_config_entry(k, v)
        rows[target] = ort.InferenceSession(q.SerializeToString(), so).run(["e"], {"ids": np.arange(49).reshape(7, 7)})[0]
    want = rows["generic"].astype(np.float16).astype(np.float32)
    assert np.array_equal(rows["ort-cpu"], want) and np.array_equal(rows["openvino"], want)
    assert 10 * np.log10(np.sum(table[:49] ** 2) / np.sum((table[:49] - rows["generic"].reshape(49, d)) ** 2)) > 15.0
