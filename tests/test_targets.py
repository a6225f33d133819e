"""graph/targets.py: which nodes are quantizable, how their weights read, why the others stay float."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.graph.targets import find_targets, initializer_array
from builders import make_model, vi

RNG = np.random.default_rng(0)


def r(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def one(node, inputs, output, inits, opset=13):
    return make_model([node], inputs, [output], inits, opset=opset)


def by_node(targets):
    return {t.node: t for t in targets}


def test_conv_and_conv_transpose_targets_carry_their_geometry():
    m = make_model([
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2],
                         group=2),
        helper.make_node("ConvTranspose", ["c", "wt"], ["y"], name="convt", strides=[2, 2]),
        helper.make_node("Conv", ["x", "w1"], ["y1"], name="pointwise", auto_pad="SAME_UPPER"),
    ], [vi("x", [1, 4, 8, 8])], [vi("y", [1, 5, 8, 8]), vi("y1", [1, 3, 8, 8])],
        {"w": r(6, 2, 3, 3), "b": r(6), "wt": r(6, 5, 2, 2), "w1": r(3, 4, 1, 1)})
    targets, skipped = find_targets(m)
    assert skipped == []
    t = by_node(targets)
    conv, convt, pw = t["conv"], t["convt"], t["pointwise"]
    assert (conv.op, conv.graph, conv.weight, conv.act, conv.bias) == ("Conv", "", "w", "x", "b")
    assert conv.weight_layout == "conv" and conv.shape == (6, 2, 3, 3) and conv.groups == 2
    assert conv.geo.kernel == (3, 3) and conv.geo.strides == (2, 2) and conv.geo.pads == (1, 1, 1, 1)
    assert conv.geo.dilations == (1, 1) and conv.geo.auto_pad == "NOTSET" and not conv.depthwise
    assert (convt.op, convt.act, convt.bias, convt.weight_layout) == ("ConvTranspose", "c", None, "convT")
    assert convt.shape == (6, 5, 2, 2) and convt.geo.strides == (2, 2) and convt.geo.pads == (0, 0, 0, 0)
    assert pw.geo.auto_pad == "SAME_UPPER" and pw.params == 12


def test_depthwise_conv_is_marked_depthwise():
    m = one(helper.make_node("Conv", ["x", "w"], ["y"], name="dw", group=4), [vi("x", [1, 4, 5, 5])],
            vi("y", [1, 4, 3, 3]), {"w": r(4, 1, 3, 3)})
    (t,), _ = find_targets(m)
    assert t.depthwise and t.groups == 4 and t.row_groups == 4


@pytest.mark.parametrize("trans_b, layout, shape", [(1, "rows", (5, 8)), (0, "cols", (8, 5))])
def test_gemm_weight_layout_follows_trans_b(trans_b, layout, shape):
    m = one(helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=trans_b),
            [vi("x", [2, 8])], vi("y", [2, 5]), {"w": r(*shape), "b": r(5)})
    (t,), skipped = find_targets(m)
    assert skipped == []
    assert (t.op, t.weight, t.act, t.bias, t.weight_layout, t.shape) == ("Gemm", "w", "x", "b", layout, shape)
    assert t.geo is None and t.groups == 1


def test_matmul_weight_on_the_right_and_on_the_left():
    m = make_model([
        helper.make_node("MatMul", ["x", "wr"], ["h"], name="right"),        # [2, 8] @ [8, 6]
        helper.make_node("MatMul", ["wl", "h"], ["y"], name="left"),         # [3, 2] @ [2, 6]
    ], [vi("x", [2, 8])], [vi("y", [3, 6])], {"wr": r(8, 6), "wl": r(3, 2)})
    targets, skipped = find_targets(m)
    assert skipped == []
    t = by_node(targets)
    assert (t["right"].weight, t["right"].act, t["right"].weight_layout) == ("wr", "x", "cols")
    assert (t["left"].weight, t["left"].act, t["left"].weight_layout) == ("wl", "h", "rows")
    assert t["right"].bias is None and t["left"].shape == (3, 2)


def skip_reason(m):
    targets, skipped = find_targets(m)
    assert targets == [] and len(skipped) == 1
    return skipped[0]


def test_gemm_with_trans_a_is_skipped():
    m = one(helper.make_node("Gemm", ["x", "w"], ["y"], name="g", transA=1),
            [vi("x", [8, 2])], vi("y", [2, 5]), {"w": r(8, 5)})
    s = skip_reason(m)
    assert (s.node, s.op) == ("g", "Gemm") and "transA=1" in s.reason


def test_matmul_of_two_activations_is_skipped():
    m = one(helper.make_node("MatMul", ["a", "b"], ["y"], name="mm"),
            [vi("a", [2, 3]), vi("b", [3, 4])], vi("y", [2, 4]), {})
    assert "both inputs are activations" in skip_reason(m).reason


def test_weight_that_is_not_a_constant_is_skipped():
    m = one(helper.make_node("Conv", ["x", "w"], ["y"], name="c"),
            [vi("x", [1, 3, 5, 5]), vi("w", [4, 3, 3, 3])], vi("y", [1, 4, 3, 3]), {})
    s = skip_reason(m)
    assert s.op == "Conv" and s.reason == "weight is not a constant initializer"


@pytest.mark.parametrize("dtype, name", [(np.float16, "FLOAT16"), (np.float64, "DOUBLE")])
def test_non_float_weight_is_skipped(dtype, name):
    t = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.DOUBLE
    m = one(helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
            [vi("x", [2, 3], t)], vi("y", [2, 4], t), {"w": r(3, 4, dtype=dtype)})
    assert skip_reason(m).reason == f"weight type is {name}, not FLOAT"


def test_3d_convolution_is_skipped():
    m = one(helper.make_node("Conv", ["x", "w"], ["y"], name="c3d"),
            [vi("x", [1, 2, 4, 4, 4])], vi("y", [1, 3, 3, 3, 3]), {"w": r(3, 2, 2, 2, 2)})
    assert skip_reason(m).reason == "3-D convolution is not supported"


def test_1d_convolution_is_a_target():
    m = one(helper.make_node("Conv", ["x", "w"], ["y"], name="c1d", pads=[1, 1]),
            [vi("x", [1, 2, 9])], vi("y", [1, 3, 9]), {"w": r(3, 2, 3)})
    (t,), _ = find_targets(m)
    assert t.shape == (3, 2, 3) and t.geo.kernel == (3,) and t.geo.pads == (1, 1)


def test_excluded_nodes_are_skipped_and_the_others_kept():
    m = make_model([
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="block1/fc"),
        helper.make_node("Relu", ["h"], ["hr"], name="block1/relu"),
        helper.make_node("MatMul", ["hr", "w2"], ["y"], name="block2/fc"),
    ], [vi("x", [2, 4])], [vi("y", [2, 4])], {"w1": r(4, 4), "w2": r(4, 4)})
    asked = []

    def excluded(node):
        asked.append(node)
        return node.startswith("block1/")

    targets, skipped = find_targets(m, excluded)
    assert [t.node for t in targets] == ["block2/fc"]
    assert [(s.node, s.op, s.reason) for s in skipped] == [("block1/fc", "MatMul", "excluded by --exclude")]
    assert sorted(asked) == ["block1/fc", "block2/fc"]          # only weight ops are asked about
    assert [t.node for t in find_targets(m)[0]] == ["block1/fc", "block2/fc"]   # default: none excluded


def if_and_loop_model():
    """Main: MatMul `main`; If with a MatMul in each branch (then: body initializer, else: the
    main graph's `w`); Loop whose body runs a MatMul on the carried state."""
    w, wt, wb = r(4, 4), r(4, 4), r(4, 4)
    then_g = helper.make_graph([helper.make_node("MatMul", ["h", "w_then"], ["o_t"], name="then_mm")], "then",
                               [], [vi("o_t", [1, 4])], [numpy_helper.from_array(wt, "w_then")])
    else_g = helper.make_graph([helper.make_node("MatMul", ["h", "w"], ["o_e"], name="else_mm")], "else",
                               [], [vi("o_e", [1, 4])])
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
         helper.make_node("MatMul", ["s_in", "w_body"], ["s_out"], name="body_mm")], "body",
        [vi("i", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL), vi("s_in", [1, 4])],
        [vi("cond_out", [], TensorProto.BOOL), vi("s_out", [1, 4])], [numpy_helper.from_array(wb, "w_body")])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="main"),
        helper.make_node("If", ["c"], ["y_if"], name="if", then_branch=then_g, else_branch=else_g),
        helper.make_node("Loop", ["n", "", "y_if"], ["y"], name="loop", body=body),
    ]
    m = make_model(nodes, [vi("x", [1, 4]), vi("c", [], TensorProto.BOOL), vi("n", [], TensorProto.INT64)],
                   [vi("y", [1, 4])], {"w": w}, opset=16)
    return m, {"w": w, "w_then": wt, "w_body": wb}


def test_targets_inside_if_and_loop_bodies():
    m, _ = if_and_loop_model()
    targets, skipped = find_targets(m)
    assert skipped == []
    t = by_node(targets)
    assert set(t) == {"main", "then_mm", "else_mm", "body_mm"}
    assert t["main"].graph == "" and t["main"].act == "x"
    assert (t["then_mm"].graph, t["then_mm"].weight, t["then_mm"].act) == ("if/then_branch/", "w_then", "h")
    # an If branch reads the outer scope's initializer as its weight
    assert (t["else_mm"].graph, t["else_mm"].weight, t["else_mm"].act) == ("if/else_branch/", "w", "h")
    # activations inside Loop/Scan bodies cannot be calibrated: weight only
    assert (t["body_mm"].graph, t["body_mm"].weight, t["body_mm"].act) == ("loop/body/", "w_body", None)


def test_scan_body_targets_get_no_activation():
    body = helper.make_graph([helper.make_node("MatMul", ["row", "w"], ["out"], name="scan_mm")], "body",
                             [vi("row", [1, 3])], [vi("out", [1, 2])])
    m = make_model([helper.make_node("Scan", ["xs"], ["ys"], name="scan", body=body, num_scan_inputs=1)],
                   [vi("xs", [5, 1, 3])], [vi("ys", [5, 1, 2])], {"w": r(3, 2)}, opset=16)
    (t,), _ = find_targets(m)
    assert (t.node, t.graph, t.weight, t.act) == ("scan_mm", "scan/body/", "w", None)


def test_initializer_array_sees_the_scope_of_the_graph():
    m, values = if_and_loop_model()
    np.testing.assert_array_equal(initializer_array(m, "", "w"), values["w"])
    np.testing.assert_array_equal(initializer_array(m, "if/then_branch/", "w_then"), values["w_then"])
    np.testing.assert_array_equal(initializer_array(m, "if/else_branch/", "w"), values["w"])   # outer scope
    np.testing.assert_array_equal(initializer_array(m, "loop/body/", "w_body"), values["w_body"])
    with pytest.raises(KeyError):
        initializer_array(m, "", "w_then")                 # a body's initializer is not visible outside
    with pytest.raises(KeyError):
        initializer_array(m, "if/else_branch/", "w_then")  # nor in a sibling branch
    for t in find_targets(m)[0]:                           # every target's weight resolves in its graph
        assert initializer_array(m, t.graph, t.weight).shape == t.shape


def test_initializer_array_prefers_the_innermost_definition():
    """A branch initializer with the same name as a main-graph one shadows it inside the branch."""
    outer, inner = r(4, 4), r(4, 4)
    branch = lambda name, inits: helper.make_graph(   # noqa: E731
        [helper.make_node("MatMul", ["x", "w"], [f"o_{name}"], name=f"{name}_mm")], name, [],
        [vi(f"o_{name}", [1, 4])], inits)
    g = helper.make_graph([helper.make_node("If", ["c"], ["y"], name="if",
                                            then_branch=branch("t", [numpy_helper.from_array(inner, "w")]),
                                            else_branch=branch("e", []))],
                          "g", [vi("x", [1, 4]), vi("c", [], TensorProto.BOOL)], [vi("y", [1, 4])],
                          [numpy_helper.from_array(outer, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 16)])
    np.testing.assert_array_equal(initializer_array(m, "if/then_branch/", "w"), inner)
    np.testing.assert_array_equal(initializer_array(m, "if/else_branch/", "w"), outer)
    np.testing.assert_array_equal(initializer_array(m, "", "w"), outer)


def test_conv_zoo_targets_and_order():
    """Every weight layer of the zoo in graph order (the Constant-node weight needs prepare)."""
    from builders import conv_zoo
    from onnxq.graph.prepare import prepare
    m, _ = prepare(conv_zoo(np.random.default_rng(0)))
    targets, skipped = find_targets(m)
    assert skipped == []
    assert [t.op for t in targets] == ["Conv"] * 4 + ["ConvTranspose", "Gemm", "Gemm", "MatMul"]
    assert [t.weight_layout for t in targets] == ["conv"] * 4 + ["convT", "rows", "cols", "rows"]
    assert [t.depthwise for t in targets] == [False, False, True] + [False] * 5
    raw, raw_skipped = find_targets(conv_zoo(np.random.default_rng(0)))
    assert len(raw) == 7 and [s.reason for s in raw_skipped] == ["weight is not a constant initializer"]
