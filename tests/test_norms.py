"""Hand-decomposed normalisations: found in the graph, and no statistic inside them (a mean, a
variance, its square root) or tensor they centre is ever quantized, under any target; the
normalised result is, where a quantized layer reads it."""

import numpy as np
import onnx
import pytest
from onnx import helper

from builders import make_model, vi
from realdata import ocr_path

import onnxq
from onnxq.graph.rotate import ROTATE_PREFIX, ROTATE_REASON
from onnxq.graph.norms import REASON, normalisation_nodes
from onnxq.graph.prepare import name_nodes

TARGETS = ["generic", "ort-cpu", "qnn", "tensorrt", "openvino"]
INSIDE = {"mu", "d", "d2", "var", "ve", "sd", "n"}


def _layer_norm_model(rms: bool = False) -> onnx.ModelProto:
    """x -> MatMul -> LayerNorm written out in small ops (or RMSNorm) -> MatMul -> y."""
    rng = np.random.default_rng(0)
    r = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    centre = [] if rms else [helper.make_node("ReduceMean", ["h"], ["mu"], axes=[-1]),
                             helper.make_node("Sub", ["h", "mu"], ["d"])]
    d = "h" if rms else "d"
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), *centre,
             helper.make_node("Pow", [d, "two"], ["d2"]),
             helper.make_node("ReduceMean", ["d2"], ["var"], axes=[-1]),
             helper.make_node("Add", ["var", "eps"], ["ve"]),
             helper.make_node("Sqrt", ["ve"], ["sd"]),
             helper.make_node("Div", [d, "sd"], ["n"]),
             helper.make_node("Mul", ["n", "gamma"], ["ng"]),
             helper.make_node("Add", ["ng", "beta"], ["ln"]),
             helper.make_node("MatMul", ["ln", "w2"], ["y"])]
    m = make_model(nodes, [vi("x", [1, 8, 16])], [vi("y", [1, 8, 16])],
                   {"w1": r(16, 16), "w2": r(16, 16), "two": np.array(2.0, np.float32),
                    "eps": np.array(1e-5, np.float32), "gamma": 1 + r(16), "beta": r(16)})
    name_nodes(m)
    return m


def _quantized(q: onnx.ModelProto) -> set[str]:
    return {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}


@pytest.mark.parametrize("rms", [False, True])
def test_the_decomposed_forms_are_found_node_by_node(rms):
    m = _layer_norm_model(rms)
    found = normalisation_nodes(m.graph)
    want = {n.name for n in m.graph.node if set(n.output) & INSIDE}
    assert found == want and len(found) == (5 if rms else 7)


def test_a_global_pool_feeding_a_layer_is_not_a_normalisation():
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("ReduceMean", ["x"], ["p"], axes=[2, 3]),
             helper.make_node("Conv", ["p", "w"], ["g"]),
             helper.make_node("Sigmoid", ["g"], ["s"]),
             helper.make_node("Mul", ["x", "s"], ["y"])]
    m = make_model(nodes, [vi("x", [1, 4, 6, 6])], [vi("y", [1, 4, 6, 6])],
                   {"w": rng.standard_normal((4, 4, 1, 1)).astype(np.float32)})
    name_nodes(m)
    assert normalisation_nodes(m.graph) == set()


@pytest.mark.parametrize("target", TARGETS)
def test_no_statistic_inside_a_decomposed_layer_norm_is_quantized(target):
    m = _layer_norm_model()
    rng = np.random.default_rng(2)
    cal = [{"x": rng.standard_normal((1, 8, 16)).astype(np.float32)} for _ in range(16)]
    q, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=8, target=target), calib=cal)
    got = _quantized(q)
    assert not got & INSIDE
    # the second layer reads the normalised result quantized; under generic, ort-cpu and openvino
    # it is weight-only (float input)
    assert ("ln" in got) == (target not in ("generic", "ort-cpu", "openvino"))
    assert rep.fidelity.sqnr_db > 30


def test_the_real_recogniser_norms_keep_their_statistics_float_under_qnn():
    """PP-OCRv4 rec writes its five LayerNorms out in ReduceMean/Sub/Pow/Sqrt/Div; the fully
    quantized qnn target quantizes around them, never inside."""
    m = onnx.load(str(ocr_path("rec")))
    norms = normalisation_nodes(m.graph)
    assert len(norms) == 35
    inside = {o for n in m.graph.node if n.name in norms for o in n.output}
    rng = np.random.default_rng(3)
    cal = [{"x": rng.random((1, 3, 48, 160), dtype=np.float32)} for _ in range(4)]
    q, _ = onnxq.convert(m, onnxq.ConvertConfig(bits=8, target="qnn", verify=False), calib=cal)
    quantized = _quantized(q)
    assert len(quantized) > 50             # the rest of the net is fully quantized
    assert not quantized & inside


def test_the_report_names_every_node_left_in_float_with_its_reason():
    m = _layer_norm_model()
    rng = np.random.default_rng(4)
    cal = [{"x": rng.standard_normal((1, 8, 16)).astype(np.float32)} for _ in range(16)]
    _, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=8, target="ort-cpu"), calib=cal)
    why = {f.node: f.reason for f in rep.float_ops}
    layers = {l.node for l in rep.quantized}
    assert len(layers) == 2 and not layers & set(why)
    # the rotations the conversion adds ahead of the 8-bit kernels' inputs are named as its own
    added = {n for n in why if n.startswith(ROTATE_PREFIX)}
    assert len(added) == 6 and all(why[n] == ROTATE_REASON for n in added)
    # every other node is named, the normalisation's own with theirs
    assert set(why) - added == {n.name for n in m.graph.node} - layers
    norms = normalisation_nodes(m.graph)
    assert all(why[n] == REASON for n in norms)
    assert all(why[n] and why[n] != REASON for n in set(why) - norms - added)
    assert rep.to_dict()["float_ops"][0].keys() == {"node", "op", "reason"}
