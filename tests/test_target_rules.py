"""Per-target emission: the node units each target's rules promise, checked on the graph that
onnxruntime's own optimizer makes of the output (real sessions, no mocks)."""

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import make_model, vi
from onnx import helper

import onnxq
from onnxq.graph.rotate import ROTATE_PREFIX
from onnxq.algos.metrics import sqnr_db
from onnxq.graph.io import TARGET_KEY, get_metadata
from onnxq.graph.prepare import fuse_hardswish


def optimized_ops(model: onnx.ModelProto, tmp_path) -> Counter:
    """Op types of the graph onnxruntime's CPU provider runs (extended optimizations, where its
    QDQ fusions happen)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def relu_net(rng) -> onnx.ModelProto:
    """Conv-ReLU, Conv-Clip(0,6), a residual Add, MaxPool, Concat, GlobalAveragePool, Flatten, Gemm."""
    r = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    inits = {"w0": r(8, 3, 3, 3), "b0": r(8), "w1": r(8, 8, 3, 3), "b1": r(8), "w2": r(8, 8, 1, 1),
             "w3": r(8, 16, 3, 3), "wf": r(5, 8), "bf": r(5),
             "lo": np.array(0, np.float32), "hi": np.array(6, np.float32)}
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1] * 4, name="conv0"),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], pads=[1] * 4, name="conv1"),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
        helper.make_node("Add", ["c2", "r0"], ["a"]),
        helper.make_node("MaxPool", ["a"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Concat", ["p", "p"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "w3"], ["c3"], pads=[1] * 4, name="conv3"),
        helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("GlobalAveragePool", ["r3"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1, name="fc"),
    ]
    return make_model(nodes, [vi("x", ["N", 3, 16, 16])], [vi("y", ["N", 5])], inits)


@pytest.fixture(scope="module")
def net():
    rng = np.random.default_rng(0)
    m = relu_net(rng)
    feeds = [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(24)]
    return m, feeds


def _sqnr(ref: onnx.ModelProto, q: onnx.ModelProto, feeds) -> float:
    a, b = ort.InferenceSession(ref.SerializeToString()), ort.InferenceSession(q.SerializeToString())
    return sqnr_db(np.concatenate([a.run(None, f)[0] for f in feeds]), np.concatenate([b.run(None, f)[0] for f in feeds]))


@pytest.mark.parametrize("bits", [8, 4])
def test_ort_cpu_fuses_every_quantized_conv_into_an_integer_kernel(net, tmp_path, bits):
    m, feeds = net
    # every activation at 8 bits: an int16 one (--protect-acts, within its multiply-add budget;
    # tests/test_wide_acts.py) would run its units in float
    q, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=bits, target="ort-cpu", protect_acts=0), calib=feeds[:20])
    ops = optimized_ops(q, tmp_path)
    # the three convs past the input run as integer kernels; conv0 on the 3-channel input stays
    # float (faster there), with its ReLU fused, and the report says why
    assert ops["QLinearConv"] == 3 and ops["Conv"] + ops["FusedConv"] == 1, ops
    assert [s.node for s in rep.skipped if "few-channel input" in s.reason] == ["conv0"]
    assert ops["QLinearAdd"] == 1 and ops["QLinearConcat"] == 1 and ops["QLinearGlobalAveragePool"] == 1, ops
    assert ops["MaxPool"] == 1 and ops["Relu"] == 0 and ops["Clip"] == 0, ops   # absorbed by the kernels
    generic, _ = onnxq.convert(m, onnxq.ConvertConfig(bits=bits), calib=feeds[:20])
    assert optimized_ops(generic, tmp_path)["Conv"] > 0               # input-side placement does not fuse
    assert get_metadata(q, TARGET_KEY) == "ort-cpu" and get_metadata(generic, TARGET_KEY) is None
    # output rounding costs little: at 8 bits the output stays far above what rounding weights to
    # 4 bits costs, at 4 bits the weights' own error dominates (held-out samples)
    full, inputs_only = _sqnr(m, q, feeds[20:]), _sqnr(m, generic, feeds[20:])
    assert (full > 40.0) if bits == 8 else (full > inputs_only - 1.0), (full, inputs_only)


def test_ort_cpu_ties_data_movement_outputs_to_their_input_scale(net):
    m, feeds = net
    q, _ = onnxq.convert(m, onnxq.ConvertConfig(bits=8, target="ort-cpu"), calib=feeds)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in q.graph.initializer}
    assert inits["p/act_scale"] == inits["a/act_scale"] and inits["p/act_zero"] == inits["a/act_zero"]
    # fc runs as MatMulNBits (weight-only at 8 bits too), which reads float: Flatten's output is
    # not rounded, and the pool's own rounding is the only one on that path
    assert "f/act_scale" not in inits and "g/act_scale" in inits


def split_net(rng) -> onnx.ModelProto:
    """A C2f-style block (YOLOv8): a conv's output split in two, one half through another conv,
    both halves and that conv's output concatenated and read by a last conv."""
    r = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    inits = {"w0": r(8, 8, 3, 3), "w1": r(4, 4, 3, 3), "w2": r(6, 12, 1, 1), "parts": np.array([4, 4], np.int64)}
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1] * 4, name="conv0"),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Split", ["r0", "parts"], ["s0", "s1"], axis=1),
        helper.make_node("Conv", ["s1", "w1"], ["c1"], pads=[1] * 4, name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Concat", ["s0", "s1", "r1"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "w2"], ["y"], name="conv2"),
    ]
    # 8 input channels: a stem on a 3-channel image would stay float under ort-cpu (its own test)
    return make_model(nodes, [vi("x", ["N", 8, 12, 12])], [vi("y", ["N", 6, 12, 12])], inits)


def test_ort_cpu_splits_and_concatenates_on_quantized_tensors(tmp_path):
    """A Split's outputs keep its input's scale, so onnxruntime splits the 8-bit tensor and the
    Concat after it runs as QLinearConcat, with no float Split or Concat between the kernels."""
    rng = np.random.default_rng(1)
    m = split_net(rng)
    feeds = [{"x": rng.standard_normal((1, 8, 12, 12)).astype(np.float32)} for _ in range(16)]
    q, _ = onnxq.convert(m, onnxq.ConvertConfig(bits=8, target="ort-cpu", protect_acts=0), calib=feeds)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in q.graph.initializer}
    for part in ("s0", "s1"):
        assert inits[f"{part}/act_scale"] == inits["r0/act_scale"] and inits[f"{part}/act_zero"] == inits["r0/act_zero"]
    ops = optimized_ops(q, tmp_path)       # (the last conv makes the graph's output: float, the tail rule)
    assert ops["QLinearConv"] == 2 and ops["QLinearConcat"] == 1 and ops["Concat"] == 0 and ops["Split"] == 1, ops
    g = onnx.load(str(tmp_path / "optimized.onnx")).graph
    made_by = {y: n.op_type for n in g.node for y in n.output}
    split = next(n for n in g.node if n.op_type == "Split")
    assert made_by[split.input[0]] == "QLinearConv"                  # the 8-bit tensor, not a DQ's output
    readers = [n.op_type for n in g.node if set(n.input) & set(split.output)]
    assert sorted(readers) == ["QLinearConcat", "QLinearConv"], readers


def test_targets_choose_weight_containers(net):
    m, feeds = net
    containers = {}
    for target in ("generic", "ort-cpu", "openvino"):
        # every layer at 4 bits (no layer kept at 8 by --protect): the containers of 4-bit codes
        q, _ = onnxq.convert(m, onnxq.ConvertConfig(bits=4, target=target, protect=0.0), calib=feeds)
        types = {t.name: t.data_type for t in q.graph.initializer}
        containers[target] = (types["conv1/weight_q"], types.get("fc/weight_q", types.get("fc/weight_q4")))
    int4, int8, u8 = onnx.TensorProto.INT4, onnx.TensorProto.INT8, onnx.TensorProto.UINT8
    # ort-cpu: 4-bit conv codes in INT8 for QLinearConv, the Gemm as MatMulNBits (packed uint8)
    assert containers == {"generic": (int4, int4), "ort-cpu": (int8, u8), "openvino": (int8, int4)}


def test_decomposed_hardswish_becomes_one_node_with_the_same_values():
    rng = np.random.default_rng(1)
    inits = {"three": np.array(3, np.float32), "zero": np.array(0, np.float32), "six": np.array(6, np.float32)}
    nodes = [helper.make_node("Add", ["x", "three"], ["a"]), helper.make_node("Clip", ["a", "zero", "six"], ["c"]),
             helper.make_node("Mul", ["x", "c"], ["m"]), helper.make_node("Div", ["m", "six"], ["y"])]
    m = make_model(nodes, [vi("x", [2, 50])], [vi("y", [2, 50])], inits, opset=14)
    fused = onnx.ModelProto()
    fused.CopyFrom(m)
    assert fuse_hardswish(fused) == 1
    assert [n.op_type for n in fused.graph.node] == ["HardSwish"] and not fused.graph.initializer
    x = {"x": (rng.standard_normal((2, 50)) * 4).astype(np.float32)}
    a = ort.InferenceSession(m.SerializeToString()).run(None, x)[0]
    b = ort.InferenceSession(fused.SerializeToString()).run(None, x)[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_unknown_target_is_a_config_error():
    with pytest.raises(onnxq.OnnxqError, match="unknown target 'tensorrt-9'; known: generic, ort-cpu"):
        onnxq.ConvertConfig(target="tensorrt-9")


def _same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feed: dict) -> None:
    np.testing.assert_allclose(ort.InferenceSession(a.SerializeToString()).run(None, feed)[0],
                               ort.InferenceSession(b.SerializeToString()).run(None, feed)[0], rtol=1e-5, atol=1e-5)


def test_a_constant_affine_block_after_a_conv_folds_into_it_exactly():
    from onnxq.graph.prepare import fold_affine
    rng = np.random.default_rng(2)
    inits = {"w": rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "b": rng.standard_normal(6).astype(np.float32),
             "s": rng.uniform(0.5, 2, (6, 1, 1)).astype(np.float32), "t": rng.standard_normal((1, 6, 1, 1)).astype(np.float32),
             "k": np.array(0.7, np.float32), "sp": rng.standard_normal((1, 1, 8, 8)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1] * 4, name="conv"),
             helper.make_node("Mul", ["c", "s"], ["m"]), helper.make_node("Add", ["t", "m"], ["a"]),
             helper.make_node("Mul", ["a", "k"], ["d"]),
             helper.make_node("Mul", ["d", "sp"], ["y"])]          # per pixel, not per channel: stays
    m = make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 6, 8, 8])], inits)
    folded = onnx.ModelProto()
    folded.CopyFrom(m)
    assert fold_affine(folded) == 3
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Mul"]
    _same_outputs(folded, m, {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)})


def test_an_affine_block_past_a_channels_last_transpose_folds_and_the_transpose_stays():
    """A TensorFlow export's NHWC conv: Conv, Transpose to NHWC, identity Casts, then the bias and
    a BatchNorm as Add / Sub / Mul / Div by [C] constants, then ReLU."""
    from onnxq.graph.prepare import drop_identities, fold_affine
    rng = np.random.default_rng(3)
    inits = {"w": rng.standard_normal((6, 3, 3, 3)).astype(np.float32),
             "bias": rng.standard_normal(6).astype(np.float32), "mean": rng.standard_normal(6).astype(np.float32),
             "g": rng.uniform(0.5, 2, 6).astype(np.float32), "sd": rng.uniform(0.5, 2, (1, 1, 1, 6)).astype(np.float32)}
    cast = lambda i, o: helper.make_node("Cast", [i], [o], to=onnx.TensorProto.FLOAT)  # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4, name="conv"),
             helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1]), cast("t", "t2"),
             helper.make_node("Add", ["t2", "bias"], ["a"]), cast("a", "a2"),
             helper.make_node("Sub", ["a2", "mean"], ["s"]), helper.make_node("Mul", ["s", "g"], ["m"]),
             helper.make_node("Div", ["m", "sd"], ["d"]), cast("d", "d2"),
             helper.make_node("Relu", ["d2"], ["y"])]
    m = make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 8, 8, 6])], inits)
    folded = onnx.ModelProto()
    folded.CopyFrom(m)
    assert drop_identities(folded) == 3 and fold_affine(folded) == 4
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Transpose", "Relu"]
    _same_outputs(folded, m, {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)})
    # a constant along another axis of the NHWC tensor is not per channel: nothing folds
    inits["bias"] = rng.standard_normal((8, 1)).astype(np.float32)
    m = make_model(nodes[:4], [vi("x", [1, 3, 8, 8])], [vi("a", [1, 8, 8, 6])], inits)
    assert fold_affine(m) == 0 and len(m.graph.node) == 4


def test_ort_cpu_fuses_a_channels_last_exports_conv_relu_chain_without_requantizing(tmp_path):
    """Conv -> Transpose to NHWC -> Cast -> bias and BatchNorm as [C] Add / Sub / Mul (one constant
    behind an Identity) -> Relu ->
    Transpose back -> Conv: after the affine fold, the first conv's output Q goes after the Relu
    (past the Transpose), so onnxruntime runs it as a QLinearConv with no DQ -> Q after it (the
    last conv, whose output is the model's, stays a float Conv on a dequantized input)."""
    rng = np.random.default_rng(4)
    r = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    inits = {"w0": r(8, 8, 3, 3), "w1": r(4, 8, 3, 3), "b": r(8), "m": r(8), "g": rng.uniform(0.5, 2, 8).astype(np.float32)}
    nodes = [helper.make_node("Identity", ["m"], ["mean"]),                  # a constant behind an Identity
             helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1] * 4, name="conv0"),
             helper.make_node("Transpose", ["c0"], ["t0"], perm=[0, 2, 3, 1]),
             helper.make_node("Cast", ["t0"], ["k0"], to=onnx.TensorProto.FLOAT),
             helper.make_node("Add", ["k0", "b"], ["a0"]), helper.make_node("Sub", ["a0", "mean"], ["s0"]),
             helper.make_node("Mul", ["s0", "g"], ["m0"]), helper.make_node("Relu", ["m0"], ["r0"]),
             helper.make_node("Transpose", ["r0"], ["t1"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["t1", "w1"], ["y"], pads=[1] * 4, name="conv1")]
    # 8 input channels: a stem on a <= 4-channel input would stay float (its own test above)
    m = make_model(nodes, [vi("x", [1, 8, 8, 8])], [vi("y", [1, 4, 8, 8])], inits)
    feeds = [{"x": rng.standard_normal((1, 8, 8, 8)).astype(np.float32)} for _ in range(8)]
    q, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=8, target="ort-cpu"), calib=feeds)
    assert rep.prepare["affine_folded"] == 3 and rep.prepare["identities_dropped"] == 2
    ops = optimized_ops(q, tmp_path)
    assert ops["QLinearConv"] == 1 and ops["QuantizeLinear"] == 1, ops     # the input's Q only
    assert _sqnr(m, q, feeds) > 30


def test_tensorrt_rules_hold_in_the_emitted_graph(net):
    """Symmetric int8 activations with zero point 0, Q/DQ on both residual-Add inputs, INT8 conv
    weights, INT4 weight-only Gemm (its input stays float)."""
    m, feeds = net
    q, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=4, target="tensorrt"), calib=feeds)
    inits = {t.name: t for t in q.graph.initializer}
    producer = {o: n for n in q.graph.node for o in n.output}
    quantizers = [n for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert quantizers
    for n in quantizers:
        zero = inits[n.input[2]]
        assert zero.data_type == onnx.TensorProto.INT8 and not onnx.numpy_helper.to_array(zero).any()
    add = next(n for n in q.graph.node if n.op_type == "Add")
    assert all(producer[i].op_type == "DequantizeLinear" for i in add.input)
    assert inits["conv1/weight_q"].data_type == onnx.TensorProto.INT8
    assert inits["fc/weight_q"].data_type == onnx.TensorProto.INT4
    fc = next(n for n in q.graph.node if n.name == "fc")
    assert producer[fc.input[0]].op_type != "DequantizeLinear"               # weight-only
    assert _sqnr(m, q, feeds[20:]) > 15.0


def encoder_block(rng) -> onnx.ModelProto:
    """LayerNorm -> MatMul + bias -> GELU-free FFN, with a residual Add that reads the LayerNorm
    output too (a transformer's residual stream)."""
    r = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    inits = {"g": np.ones(32, np.float32), "b": np.zeros(32, np.float32), "w1": r(32, 64), "b1": r(64),
             "w2": r(64, 32), "b2": r(32)}
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["n"], axis=-1, name="ln"),
        helper.make_node("MatMul", ["n", "w1"], ["h"], name="up"),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["d"], name="down"),
        helper.make_node("Add", ["d", "b2"], ["db"]),
        helper.make_node("Add", ["n", "db"], ["y"], name="residual"),
    ]
    return make_model(nodes, [vi("x", ["N", 10, 32])], [vi("y", ["N", 10, 32])], inits, opset=17)


def test_ort_cpu_keeps_a_residual_stream_float_and_fuses_matmuls_with_float_outputs(tmp_path):
    rng = np.random.default_rng(3)
    m = encoder_block(rng)
    feeds = [{"x": rng.standard_normal((1, 10, 32)).astype(np.float32) * 3} for _ in range(16)]
    q, _ = onnxq.convert(m, onnxq.ConvertConfig(bits=8, target="ort-cpu"), calib=feeds)
    by_name = {n.name: n for n in q.graph.node}
    assert by_name["residual"].input[0] == "n"                 # not the DQ of the MatMul's input
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in ("h", "d") for n in q.graph.node)
    ops = optimized_ops(q, tmp_path)
    # both MatMuls on onnxruntime's weight-only kernel (8 bits, input rounded per block as it runs); the
    # only float MatMuls left are the [16, 16] rotations of their two inputs (graph/rotate.py)
    rotations = sum(n.op_type == "MatMul" and n.name.startswith(ROTATE_PREFIX) for n in q.graph.node)
    assert ops["MatMulNBits"] == 2 and ops["MatMul"] == rotations == 2, ops
    # input-side placement with 8-bit MatMul inputs (openvino; generic's MatMuls are weight-only)
    inputs_side, _ = onnxq.convert(m, onnxq.ConvertConfig(bits=8, target="openvino"), calib=feeds)
    assert _sqnr(m, q, feeds[12:]) > _sqnr(m, inputs_side, feeds[12:]) - 0.5


def _producers(m: onnx.ModelProto) -> dict:
    return {y: n for n in m.graph.node for y in n.output}


def test_qnn_output_is_fully_quantized_like_onnxruntimes_qnn_configuration(net, tmp_path):
    """Every op between the graph's input and output reads DQs and writes one Q (a Relu/Clip
    after a layer is absorbed into it); the activations onnxruntime's own QNN configuration
    quantizes are quantized here too."""
    from onnxruntime.quantization import quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    m, feeds = net
    q, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=4, target="qnn"), calib=feeds)
    assert get_metadata(q, TARGET_KEY) == "qnn"
    prod, outputs = _producers(q), {o.name for o in q.graph.output}
    readers: dict[str, list] = {}
    for n in q.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    inits = {t.name for t in q.graph.initializer}
    for n in q.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i in (i for i in n.input if i and i not in inits):
            src = prod.get(i)
            absorbed = n.op_type in ("Relu", "Clip") and src is not None and src.op_type == "Conv"
            assert (src is not None and src.op_type == "DequantizeLinear") or absorbed, (n.name, i)
        y = n.output[0]
        if y not in outputs and not (n.op_type == "Conv" and readers[y][0].op_type in ("Relu", "Clip")):
            assert [r.op_type for r in readers[y]] == ["QuantizeLinear"], (n.name, [r.op_type for r in readers[y]])
    # weights: symmetric (zero point 0) per-channel, INT4 at 4 bits
    w = {t.name: t.data_type for t in q.graph.initializer if t.name.endswith("/weight_q")}
    want = {f"{l.node}/weight_q": onnx.TensorProto.INT4 if l.bits <= 4 else onnx.TensorProto.INT8 for l in rep.quantized}
    assert w == want and onnx.TensorProto.INT4 in w.values()
    zeros = [onnx.numpy_helper.to_array(t) for t in q.graph.initializer if t.name.endswith("/weight_zero")]
    assert all(not np.any(z.astype(np.int32)) for z in zeros)

    class Reader:
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    src, dst = tmp_path / "m.onnx", tmp_path / "ortqnn.onnx"
    onnx.save(m, src)
    quantize(str(src), str(dst), get_qnn_qdq_config(str(src), Reader(), per_channel=True))
    theirs = {n.input[0] for n in onnx.load(str(dst)).graph.node if n.op_type == "QuantizeLinear"}
    ours = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    conv_outputs = {n.output[0] for n in m.graph.node if n.op_type == "Conv"}   # ours quantize after the Relu/Clip
    theirs = {t for t in theirs if t in {v.name for v in m.graph.value_info} | {"x"} | {n.output[0] for n in m.graph.node}}
    assert len(theirs) >= 8 and len(ours) >= 8
    missing = theirs - ours - conv_outputs - outputs
    assert not missing, missing


def attention_head(rng) -> onnx.ModelProto:
    """One attention head: Q, K, V projections, softmax(Q K^T / 4) V."""
    r = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    inits = {"wq": r(16, 16), "wk": r(16, 16), "wv": r(16, 16), "t": np.array(0.25, np.float32)}
    nodes = [helper.make_node("MatMul", ["x", w], [o], name=o) for w, o in (("wq", "q"), ("wk", "k"), ("wv", "v"))]
    nodes += [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
              helper.make_node("MatMul", ["q", "kt"], ["s"], name="scores"),
              helper.make_node("Mul", ["s", "t"], ["st"]), helper.make_node("Softmax", ["st"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "v"], ["y"], name="mix")]
    return make_model(nodes, [vi("x", ["N", 8, 16])], [vi("y", ["N", 8, 16])], inits, opset=17)


@pytest.mark.parametrize("target", ["generic", "tensorrt"])
def test_quantize_attention_puts_qdq_on_both_inputs_of_activation_matmuls(target):
    rng = np.random.default_rng(7)
    m = attention_head(rng)
    feeds = [{"x": rng.standard_normal((1, 8, 16)).astype(np.float32)} for _ in range(12)]
    plain, _ = onnxq.convert(m, onnxq.ConvertConfig(bits=8, target=target), calib=feeds)
    q, _ = onnxq.convert(m, onnxq.ConvertConfig(bits=8, target=target, quantize_attention=True), calib=feeds)
    for model, want in ((plain, False), (q, True)):
        producer = _producers(model)
        for name in ("scores", "mix"):
            node = next(n for n in model.graph.node if n.name == name)
            assert all((producer.get(i) is not None and producer[i].op_type == "DequantizeLinear") == want
                       for i in node.input), (name, want)
    assert _sqnr(m, q, feeds) > 30


def test_quantize_attention_is_refused_where_the_target_places_every_op():
    with pytest.raises(onnxq.OnnxqError, match="--quantize-attention is for the input-side targets"):
        onnxq.ConvertConfig(target="ort-cpu", quantize_attention=True)


def detector_head(rng, channels: int = 3) -> onnx.ModelProto:
    """conv -> Relu, then a box conv and a class conv, concatenated along channels and split
    again: boxes out as they are, class logits through a Sigmoid (a YOLOv8-style head)."""
    r = lambda *s: (rng.standard_normal(s) * 0.4).astype(np.float32)  # noqa: E731
    inits = {"w0": r(8, channels, 3, 3), "wb": r(4, 8, 1, 1), "wc": r(3, 8, 1, 1), "bc": np.full(3, -2.0, np.float32),
             "parts": np.array([4, 3], np.int64)}
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1] * 4, name="conv0"),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "wb"], ["box"], name="box_conv"),
             helper.make_node("Conv", ["r0", "wc", "bc"], ["logit"], name="cls_conv"),
             helper.make_node("Concat", ["box", "logit"], ["cat"], axis=1),
             helper.make_node("Split", ["cat", "parts"], ["b", "l"], axis=1),
             helper.make_node("Sigmoid", ["l"], ["score"]),
             helper.make_node("Concat", ["b", "score"], ["y"], axis=1)]
    return make_model(nodes, [vi("x", [1, channels, 8, 8])], [vi("y", [1, 7, 8, 8])], inits)


def test_ort_cpu_leaves_the_scores_ahead_of_an_outputs_sigmoid_unrounded(tmp_path):
    """Input-side placement never rounds a head's class logits; an output Q on the class conv
    under ort-cpu would (on a real YOLOv8n its calibrated range clipped the confident detections
    calibration never saw). The head's convs run in float, the first conv as an integer kernel,
    and the scores are the input-side placement's."""
    rng = np.random.default_rng(11)
    m = detector_head(rng, channels=8)   # (a stem on a <= 4-channel input would stay float under ort-cpu)
    feeds = [{"x": rng.standard_normal((1, 8, 8, 8)).astype(np.float32)} for _ in range(24)]
    q, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=8, target="ort-cpu"), calib=feeds[:16])
    generic, _ = onnxq.convert(m, onnxq.ConvertConfig(bits=8), calib=feeds[:16])
    quantized = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert not quantized & {"box", "logit", "cat"}, quantized
    notes = {layer.node: layer.note for layer in rep.quantized}
    assert "decides the answer" in notes["cls_conv"] and "decides the answer" in notes["box_conv"]
    assert "decides" not in notes["conv0"]
    ops = optimized_ops(q, tmp_path)
    assert ops["QLinearConv"] == 1 and ops["Conv"] == 2, ops
    outs = [np.concatenate([ort.InferenceSession(model.SerializeToString()).run(None, f)[0] for f in feeds[16:]])
            for model in (q, generic)]
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-6)
