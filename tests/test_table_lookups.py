"""generic: an embedding table's Gather reads the stored codes and only the gathered rows are
dequantized, so onnxruntime's default session no longer dequantizes the whole table every run
(graph/tables.py). The values are the DequantizeLinear -> Gather graph's, bit for bit. A model
whose every weight a default session runs on a fused kernel is recorded as meant for one
(api.session_options)."""

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import conv_zoo, make_model, vi
from onnx import TensorProto, helper

import onnxq
from onnxq.cli import _run_options
from onnxq.graph.io import SESSION_KEY, get_metadata
from onnxq.graph.tables import lookups_on_codes

V, D, BLOCK = 40, 64, 16


def _session(model: onnx.ModelProto, entry: bool = False, path: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    if entry:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    if path:
        so.optimized_model_filepath = path
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _table(nodes: list, inits: dict, name: str, kind: str, rng) -> None:
    """A DQ of a [V, D] table: 4-bit blocked along rows, 4-bit per row, uint8 with zero point 128
    per row, int8 with one scale, or 4-bit blocked with a zero point per block."""
    four = kind.startswith("int4")
    codes = rng.integers(-8, 8, (V, D)) if four else rng.integers(-127, 128, (V, D))
    attrs, s_shape = {"axis": 0}, (V,)
    if kind in ("int4_blocked", "int4_zeros"):
        attrs, s_shape = {"axis": 1, "block_size": BLOCK}, (V, D // BLOCK)
    elif kind == "int8_one":
        s_shape = ()
    zero = np.zeros(s_shape, np.int8)
    if kind == "uint8_rows":
        codes, zero = codes + 128, np.full(s_shape, 128)
    elif kind == "int4_zeros":
        zero = rng.integers(-2, 3, s_shape)
    dtype = ml_dtypes.int4 if four else (np.uint8 if kind == "uint8_rows" else np.int8)
    inits[f"{name}/weight_q"] = codes.astype(dtype)
    inits[f"{name}/weight_scale"] = (0.01 + 0.05 * rng.random(s_shape)).astype(np.float32)
    inits[f"{name}/weight_zero"] = zero.astype(dtype)
    nodes.append(helper.make_node("DequantizeLinear", [f"{name}/weight_q", f"{name}/weight_scale", f"{name}/weight_zero"],
                                  [f"{name}/weight_dq"], name=f"{name}/weight_dequantize", **attrs))


KINDS = ("int4_blocked", "int4_rows", "uint8_rows", "int8_one", "int4_zeros")


def _lookups(opset: int = 21) -> onnx.ModelProto:
    """One Gather per table kind on ids [N, T], a second Gather of the blocked table on scalar ids;
    left alone: a table a MatMul reads too (tied output embedding), and a table that is also a
    graph output."""
    rng = np.random.default_rng(0)
    nodes, inits = [], {}
    for kind in KINDS:
        _table(nodes, inits, kind, kind, rng)
    for extra in ("tied", "shown"):
        _table(nodes, inits, extra, "int4_blocked", rng)
    outs = [vi(f"y_{k}", ["N", "T", D]) for k in KINDS + ("tied", "shown")]
    for kind in KINDS + ("tied", "shown"):
        nodes.append(helper.make_node("Gather", [f"{kind}/weight_dq", "ids"], [f"y_{kind}"], name=f"{kind}_embed"))
    nodes += [helper.make_node("Gather", ["int4_blocked/weight_dq", "one"], ["y_one"], name="scalar_embed"),
              helper.make_node("MatMul", ["h", "tied/weight_dq"], ["logits"], name="tied_head"),
              helper.make_node("Identity", ["shown/weight_dq"], ["table_out"], name="show")]
    ins = [vi("ids", ["N", "T"], TensorProto.INT64), vi("one", [], TensorProto.INT64), vi("h", ["N", V])]
    outs += [vi("y_one", [D]), vi("logits", ["N", D]), vi("table_out", [V, D])]
    return make_model(nodes, ins, outs, inits, opset=opset)


def _feeds(rng) -> dict:
    return {"ids": rng.integers(0, V, (3, 5)), "one": np.array(7, np.int64),
            "h": rng.standard_normal((2, V)).astype(np.float32)}


def test_lookups_read_the_codes_and_give_the_dequantized_rows_bit_for_bit():
    m = _lookups()
    q = onnx.ModelProto()
    q.CopyFrom(m)
    assert lookups_on_codes(q) == 5
    onnx.checker.check_model(q, full_check=True)
    feeds = _feeds(np.random.default_rng(1))
    for entry in (False, True):
        ref, got = _session(m, entry).run(None, feeds), _session(q, entry).run(None, feeds)
        for r, g in zip(ref, got):
            assert r.shape == g.shape and np.array_equal(r, g)
    dq_reads = {n.input[0] for n in q.graph.node if n.op_type == "DequantizeLinear"}
    assert dq_reads == {"tied/weight_q", "shown/weight_q"}     # the two left alone
    inits = {t.name: t for t in q.graph.initializer}
    for kind in KINDS:                  # each lookup reads stored codes; 4-bit ones two to a byte
        gather = next(n for n in q.graph.node if n.name == f"{kind}_embed")
        assert gather.op_type == "Gather" and gather.input[0] in inits
        codes = inits[gather.input[0]]
        assert codes.data_type in (TensorProto.UINT8, TensorProto.INT8)
        assert list(codes.dims) == ([V, D // 2] if kind.startswith("int4") else [V, D])
    old = sum(t.ByteSize() for t in m.graph.initializer)
    assert sum(t.ByteSize() for t in q.graph.initializer) <= old + 80 * len(KINDS)   # the same bytes, a few constants a table
    zeros = inits["int4_zeros/weight_zero_q4"]              # the zero points two to a byte as well
    assert zeros.data_type == TensorProto.UINT8 and list(zeros.dims) == [V, D // BLOCK // 2]


def test_zero_points_of_an_odd_count_of_blocks_are_gathered_a_byte_each():
    rng = np.random.default_rng(6)
    d = 3 * BLOCK
    codes, zero = rng.integers(0, 16, (V, d)), rng.integers(0, 16, (V, 3))
    scales = (0.01 + 0.05 * rng.random((V, 3))).astype(np.float32)
    inits = {"t/weight_q": codes.astype(ml_dtypes.uint4), "t/weight_scale": scales, "t/weight_zero": zero.astype(ml_dtypes.uint4)}
    nodes = [helper.make_node("DequantizeLinear", ["t/weight_q", "t/weight_scale", "t/weight_zero"], ["t/weight_dq"],
                              axis=1, block_size=BLOCK),
             helper.make_node("Gather", ["t/weight_dq", "ids"], ["y"], name="embed")]
    m = make_model(nodes, [vi("ids", ["N"], TensorProto.INT64)], [vi("y", ["N", d])], inits, opset=21)
    q = onnx.ModelProto()
    q.CopyFrom(m)
    assert lookups_on_codes(q) == 1
    onnx.checker.check_model(q, full_check=True)
    stored = {t.name: t for t in q.graph.initializer}["t/weight_zero_q"]
    assert stored.data_type == TensorProto.UINT8 and list(stored.dims) == [V, 3]
    ids = rng.integers(0, V, 9)
    want = ((codes - np.repeat(zero, BLOCK, axis=1)) * np.repeat(scales, BLOCK, axis=1)).astype(np.float32)[ids]
    assert np.array_equal(_session(q).run(None, {"ids": ids})[0], want)
    assert np.array_equal(_session(m).run(None, {"ids": ids})[0], want)


def _half_table(shown: bool) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """A 4-bit table blocked along rows with float16 scales, as a conversion writes it: DQ (float16
    out) -> Cast(float) -> Gather; `shown`: the cast table is a graph output too."""
    rng = np.random.default_rng(4)
    codes = rng.integers(-8, 8, (V, D))
    scales = (0.01 + 0.05 * rng.random((V, D // BLOCK))).astype(np.float16)
    inits = {"t/weight_q": codes.astype(ml_dtypes.int4), "t/weight_scale": scales}
    nodes = [helper.make_node("DequantizeLinear", ["t/weight_q", "t/weight_scale"], ["t/dq16"], axis=1, block_size=BLOCK),
             helper.make_node("Cast", ["t/dq16"], ["t/weight_dq"], to=TensorProto.FLOAT),
             helper.make_node("Gather", ["t/weight_dq", "ids"], ["y"], name="embed")]
    outs = [vi("y", ["N", "T", D])] + ([vi("t/weight_dq", [V, D])] if shown else [])
    return make_model(nodes, [vi("ids", ["N", "T"], TensorProto.INT64)], outs, inits, opset=21), codes, scales


def test_a_table_with_float16_scales_is_looked_up_on_its_codes_and_gathered_scales():
    """The DQ and its Cast go; the gathered scales are cast and the product taken in float: the
    stored values exactly (the DQ computes in float16 and rounds them)."""
    m, codes, scales = _half_table(shown=False)
    q = onnx.ModelProto()
    q.CopyFrom(m)
    assert lookups_on_codes(q) == 1
    onnx.checker.check_model(q, full_check=True)
    assert not any(n.op_type == "DequantizeLinear" for n in q.graph.node)
    assert {t.name: t.data_type for t in q.graph.initializer}["t/weight_scale"] == TensorProto.FLOAT16
    ids = np.random.default_rng(5).integers(0, V, (2, 6))
    want = (codes.astype(np.float32) * np.repeat(scales.astype(np.float32), BLOCK, axis=1))[ids]
    assert np.array_equal(_session(q).run(None, {"ids": ids})[0], want)
    np.testing.assert_allclose(_session(m).run(None, {"ids": ids})[0], want, rtol=1e-3)
    shown, _, _ = _half_table(shown=True)              # the cast table is read elsewhere: left alone
    assert lookups_on_codes(shown) == 0


def test_openvino_runs_the_lookups_on_dynamic_shapes(tmp_path):
    ov = pytest.importorskip("openvino")
    m = _lookups()
    m.graph.output.pop()                                   # the plugin does not return a constant table
    q = onnx.ModelProto()
    q.CopyFrom(m)
    lookups_on_codes(q)
    feeds = _feeds(np.random.default_rng(2))
    got = {}
    for name, model in (("dq", m), ("codes", q)):
        onnx.save(model, tmp_path / f"{name}.onnx")
        compiled = ov.Core().compile_model(str(tmp_path / f"{name}.onnx"), "CPU")
        res = compiled(feeds)
        got[name] = {o.name: res[compiled.output(o.name)] for o in model.graph.output}
    ref = dict(zip([o.name for o in q.graph.output], _session(q).run(None, feeds)))
    for name, r in ref.items():
        assert np.array_equal(got["codes"][name], got["dq"][name])
        if name != "logits":                # the plugin runs a MatMul on a 4-bit weight in its own precision
            assert np.array_equal(got["codes"][name], r), name


def test_4_bit_lookups_need_an_opset_with_bitwise_ops():
    q = _lookups()
    q.opset_import[0].version = 17          # BitwiseAnd is opset 18: the 8-bit tables alone change
    assert lookups_on_codes(q) == 2
    left = {n.input[0] for n in q.graph.node if n.op_type == "DequantizeLinear"}
    assert {"int4_blocked/weight_q", "int4_rows/weight_q"} <= left and "uint8_rows/weight_q" not in left


def test_a_converted_encoder_runs_no_table_dequantize_in_a_default_session(tmp_path):
    rng = np.random.default_rng(3)
    words = (rng.standard_normal((300, 64)) * 0.5).astype(np.float32)
    nodes = [helper.make_node("Gather", ["words", "ids"], ["w"], name="word_embed"),
             helper.make_node("Relu", ["w"], ["y"], name="act")]
    m = make_model(nodes, [vi("ids", ["N", 7], TensorProto.INT64)], [vi("y", ["N", 7, 64])], {"words": words})
    feeds = [{"ids": rng.integers(0, 300, (2, 7))} for _ in range(16)]
    for bits in (8, 4):
        q, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=bits, protect=0), calib=feeds)
        assert next(l for l in rep.quantized if l.op == "Gather").bits == bits
        path = str(tmp_path / f"opt{bits}.onnx")
        sess = _session(q, path=path)
        runs = onnx.load(path)
        table_dq = [n for n in runs.graph.node if n.op_type == "DequantizeLinear" and "word_embed" in n.input[0]]
        assert not table_dq and any(n.op_type == "Gather" for n in runs.graph.node)
        # the same values as the whole table dequantized at load (the session entry folds the DQ)
        assert np.array_equal(sess.run(None, feeds[0])[0], _session(q, entry=True).run(None, feeds[0])[0])
        # no weight is dequantized per call, so the model is meant for a default session: the
        # report says so, the file records it and `onnxq eval` runs it that way
        assert rep.session_options == {} and get_metadata(q, SESSION_KEY) == "{}"
        assert _run_options(q, no_qdq_fusion=False) == ("generic", {})


def test_a_conv_model_keeps_the_entry_that_folds_its_weights_at_load():
    rng = np.random.default_rng(4)
    m = conv_zoo(rng)
    shape = [d.dim_value or 1 for d in m.graph.input[0].type.tensor_type.shape.dim]
    feeds = [{m.graph.input[0].name: rng.standard_normal(shape).astype(np.float32)} for _ in range(8)]
    q, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=4), calib=feeds)
    # a default session would dequantize the 4-bit conv weights on every call
    assert rep.session_options == {"session.disable_quant_qdq": "1"} and get_metadata(q, SESSION_KEY) is None
    assert _run_options(q, no_qdq_fusion=False) == ("generic", {"session.disable_quant_qdq": "1"})
