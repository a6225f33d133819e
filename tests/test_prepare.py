"""graph/prepare.py: node names, Constant nodes, BatchNorm folding, unused initializers, opset
upgrades. Every rewrite is checked in onnxruntime against the model before it."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.errors import InputModelError
from onnxq.graph.io import opset_of
from onnxq.graph.prepare import (constants_to_initializers, fold_batchnorm, name_nodes, prepare,
                                 prune_initializers, upgrade_opset)
from onnxq.graph.walk import graphs
from builders import conv_zoo, make_model, vi


def run(m, feed, optimize=True):
    so = ort.SessionOptions()
    if not optimize:     # the reference: no onnxruntime fusions (it would fold BN itself)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)


def copy(m):
    out = onnx.ModelProto()
    out.CopyFrom(m)
    return out


def branch(node, name):
    return next(a.g for a in node.attribute if a.name == name)


def ops(m):
    return [n.op_type for n in m.graph.node]


def test_name_nodes_makes_every_name_unique_across_subgraphs():
    then_g = helper.make_graph([helper.make_node("Relu", ["x"], ["t"], name="a"),
                                helper.make_node("Neg", ["t"], ["o_t"])], "then", [], [vi("o_t", [2])])
    else_g = helper.make_graph([helper.make_node("Relu", ["x"], ["o_e"], name="Relu_0")], "else", [],
                               [vi("o_e", [2])])
    nodes = [helper.make_node("Relu", ["x"], ["r0"]),
             helper.make_node("Relu", ["r0"], ["r1"], name="a"),
             helper.make_node("Relu", ["r1"], ["r2"], name="a"),
             helper.make_node("Relu", ["r2"], ["r3"]),
             helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)]
    m = make_model(nodes, [vi("x", [2]), vi("c", [], TensorProto.BOOL)], [vi("y", [2])], {}, opset=16)
    name_nodes(m)
    assert [n.name for n in m.graph.node] == ["Relu_0", "a", "a_1", "Relu_3", "If_4"]
    names = [n.name for _, g in graphs(m) for n in g.node]
    assert len(names) == len(set(names)) == 8 and all(names)
    assert [n.name for n in branch(m.graph.node[4], "then_branch").node] == ["a_2", "Neg_1"]
    assert [n.name for n in branch(m.graph.node[4], "else_branch").node] == ["Relu_0_1"]
    before = [n.name for _, g in graphs(m) for n in g.node]
    name_nodes(m)                                            # idempotent on unique names
    assert [n.name for _, g in graphs(m) for n in g.node] == before


def test_constants_become_initializers_with_their_values_and_types():
    t = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "unused")
    nodes = [
        helper.make_node("Constant", [], ["k_tensor"], value=t),
        helper.make_node("Constant", [], ["k_float"], value_float=2.5),
        helper.make_node("Constant", [], ["k_floats"], value_floats=[1.0, -1.0, 0.5]),
        helper.make_node("Constant", [], ["k_ints"], value_ints=[3, 2]),
        helper.make_node("Constant", [], ["k_int"], value_int=1),
        helper.make_node("Mul", ["x", "k_tensor"], ["a"]),
        helper.make_node("Add", ["a", "k_float"], ["b"]),
        helper.make_node("Mul", ["b", "k_floats"], ["c"]),
        helper.make_node("Reshape", ["c", "k_ints"], ["d"]),
        helper.make_node("Unsqueeze", ["d", "k_int"], ["y"]),
    ]
    m = make_model(nodes, [vi("x", [2, 3])], [vi("y", [3, 1, 2])], {})
    feed = {"x": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)}
    before = run(m, feed)[0]
    assert constants_to_initializers(m) == 5
    assert "Constant" not in ops(m)
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    assert inits["k_float"].dtype == np.float32 and inits["k_float"].shape == () and inits["k_float"] == 2.5
    assert inits["k_floats"].dtype == np.float32 and inits["k_floats"].tolist() == [1.0, -1.0, 0.5]
    assert inits["k_ints"].dtype == np.int64 and inits["k_ints"].tolist() == [3, 2]
    assert inits["k_int"].dtype == np.int64 and inits["k_int"] == 1
    np.testing.assert_array_equal(inits["k_tensor"], np.arange(6, dtype=np.float32).reshape(2, 3))
    onnx.checker.check_model(m)
    np.testing.assert_array_equal(run(m, feed)[0], before)
    assert constants_to_initializers(m) == 0


def test_constants_inside_subgraphs_move_into_their_own_graph():
    then_g = helper.make_graph([helper.make_node("Constant", [], ["k"], value_float=3.0),
                                helper.make_node("Mul", ["x", "k"], ["o_t"])], "then", [], [vi("o_t", [2])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["o_e"])], "else", [], [vi("o_e", [2])])
    m = make_model([helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                   [vi("x", [2]), vi("c", [], TensorProto.BOOL)], [vi("y", [2])], {}, opset=16)
    assert constants_to_initializers(m) == 1
    sub = branch(m.graph.node[0], "then_branch")
    assert [i.name for i in sub.initializer] == ["k"] and list(m.graph.initializer) == []
    feed = {"x": np.array([1.0, -2.0], np.float32), "c": np.array(True)}
    np.testing.assert_array_equal(run(m, feed)[0], [3.0, -6.0])


def conv_bn(rng, conv_bias=True, shared=False):
    """x -> Conv(w[, b]) -> BatchNormalization -> y; with `shared`, a second Conv reads the same w."""
    c = 6
    inits = {"w": rng.standard_normal((c, 3, 3, 3)).astype(np.float32),
             "g": (1 + 0.3 * rng.standard_normal(c)).astype(np.float32),
             "beta": rng.standard_normal(c).astype(np.float32),
             "mean": rng.standard_normal(c).astype(np.float32),
             "var": (0.2 + rng.random(c)).astype(np.float32)}
    conv_in = ["x", "w"]
    if conv_bias:
        inits["b"] = rng.standard_normal(c).astype(np.float32)
        conv_in.append("b")
    nodes = [helper.make_node("Conv", conv_in, ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "beta", "mean", "var"], ["y"], name="bn",
                              epsilon=1e-3)]
    outputs = [vi("y", [1, c, 8, 8])]
    if shared:
        nodes.append(helper.make_node("Conv", ["x", "w"], ["y2"], name="other", pads=[1, 1, 1, 1]))
        outputs.append(vi("y2", [1, c, 8, 8]))
    return make_model(nodes, [vi("x", [1, 3, 8, 8])], outputs, inits)


@pytest.mark.parametrize("conv_bias", [True, False])
def test_fold_batchnorm_gives_the_same_outputs_in_onnxruntime(conv_bias):
    rng = np.random.default_rng(1)
    m = conv_bn(rng, conv_bias)
    feed = {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}
    ref = run(m, feed, optimize=False)[0]
    folded = copy(m)
    assert fold_batchnorm(folded) == 1
    assert ops(folded) == ["Conv"] and folded.graph.node[0].output[0] == "y"
    onnx.checker.check_model(folded)
    np.testing.assert_allclose(run(folded, feed, optimize=False)[0], ref, rtol=1e-4, atol=1e-4)
    assert {i.name for i in folded.graph.initializer} == {"conv/folded_weight", "conv/folded_bias"}


def test_fold_batchnorm_leaves_a_shared_conv_weight_intact():
    rng = np.random.default_rng(2)
    m = conv_bn(rng, shared=True)
    w = numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == "w"))
    feed = {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}
    ref = run(m, feed, optimize=False)
    folded = copy(m)
    assert fold_batchnorm(folded) == 1
    nodes = {n.name: n for n in folded.graph.node}
    assert list(nodes["other"].input) == ["x", "w"] and nodes["conv"].input[1] != "w"
    np.testing.assert_array_equal(numpy_helper.to_array(next(i for i in folded.graph.initializer
                                                             if i.name == "w")), w)
    out = run(folded, feed, optimize=False)
    np.testing.assert_array_equal(out[1], ref[1])
    np.testing.assert_allclose(out[0], ref[0], rtol=1e-4, atol=1e-4)


def test_batchnorm_is_not_folded_when_the_conv_output_has_other_readers():
    m = conv_bn(np.random.default_rng(3))
    m.graph.output.append(vi("c", [1, 6, 8, 8]))            # the conv's own output is a graph output
    folded = copy(m)
    assert fold_batchnorm(folded) == 0
    assert ops(folded) == ["Conv", "BatchNormalization"]


def test_prune_initializers_keeps_what_nodes_subgraphs_and_inputs_read():
    rng = np.random.default_rng(4)
    then_g = helper.make_graph([helper.make_node("Add", ["x", "k_sub"], ["o_t"])], "then", [], [vi("o_t", [2])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["o_e"])], "else", [], [vi("o_e", [2])])
    m = make_model([helper.make_node("Mul", ["x", "k_main"], ["xm"]),
                    helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                   [vi("x", [2]), vi("c", [], TensorProto.BOOL), vi("k_input", [2])], [vi("y", [2])],
                   {n: rng.standard_normal(2).astype(np.float32) for n in ("k_main", "k_sub", "dead", "k_input")},
                   opset=16)
    prune_initializers(m)
    assert {i.name for i in m.graph.initializer} == {"k_main", "k_sub", "k_input"}
    onnx.checker.check_model(m)


def opset11_model():
    """Squeeze and ReduceSum take `axes` as an attribute at opset 11 and as an input from 13/18."""
    return make_model([helper.make_node("Squeeze", ["x"], ["s"], axes=[1]),
                       helper.make_node("ReduceSum", ["s"], ["r"], axes=[1], keepdims=0),
                       helper.make_node("Relu", ["r"], ["y"])],
                      [vi("x", [2, 1, 3])], [vi("y", [2])], {}, opset=11)


@pytest.mark.parametrize("target, ir", [(13, 7), (21, 10)])
def test_upgrade_opset_raises_the_opset_and_keeps_the_outputs(target, ir):
    m = opset11_model()
    before = m.SerializeToString()
    up = upgrade_opset(m, target)
    assert m.SerializeToString() == before
    assert opset_of(up) == target and up.ir_version >= ir
    onnx.checker.check_model(up)
    squeeze = next(n for n in up.graph.node if n.op_type == "Squeeze")
    assert len(squeeze.input) == 2                           # axes became an input
    feed = {"x": np.random.default_rng(5).standard_normal((2, 1, 3)).astype(np.float32)}
    np.testing.assert_allclose(run(up, feed)[0], run(m, feed)[0], rtol=1e-6)


def test_upgrade_opset_never_lowers():
    m = conv_zoo(np.random.default_rng(0), opset=17)
    assert upgrade_opset(m, 13) is m and opset_of(m) == 17


def test_upgrade_opset_failure_is_an_input_error():
    g = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"])], "g", [vi("x", [1])], [vi("y", [1])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)])
    with pytest.raises(InputModelError, match="cannot upgrade the model from opset 11 to 13"):
        upgrade_opset(m, 13)


def test_prepare_works_on_a_copy_and_reports_what_it_did():
    m = conv_zoo(np.random.default_rng(0))
    before = m.SerializeToString()
    p, info = prepare(m)
    assert m.SerializeToString() == before
    assert info["constants_moved"] == 1 and info["batchnorm_folded"] == 1
    assert "Constant" not in ops(p) and "BatchNormalization" not in ops(p)
    assert all(n.name for n in p.graph.node)
    x = {"x": np.random.default_rng(6).standard_normal((2, 3, 12, 12)).astype(np.float32)}
    np.testing.assert_allclose(run(p, x)[0], run(m, x, optimize=False)[0], rtol=1e-4, atol=1e-5)
