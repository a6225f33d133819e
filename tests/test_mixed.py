"""Mixed precision: the allocators on their objective, and the end-to-end budget."""

import numpy as np
import onnxruntime as ort
import pytest
import onnx
from onnx import helper

import onnxq
from onnxq.algos.allocation import allocate_bits, anneal, greedy
from builders import make_model, vi

BITS = np.array([8, 4, 3, 2])


# bits a value of each initializer type takes in the file
WIDTH = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4, onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT8: 8,
         onnx.TensorProto.FLOAT: 32}

def problem(seed, layers=20):
    rng = np.random.default_rng(seed)
    params = rng.integers(100, 5000, layers)
    sizes = params[:, None] * BITS[None]
    costs = rng.lognormal(0, 1.5, layers)[:, None] * np.array([0, 1, 4, 16])[None]
    return params, sizes.astype(float), costs


@pytest.mark.parametrize("avg", [2.0, 2.5, 3.0, 3.5, 4.0, 6.0, 8.0])
@pytest.mark.parametrize("method", ["greedy", "anneal", "best"])
def test_allocation_respects_the_budget(avg, method):
    params, sizes, costs = problem(0)
    choice, _ = allocate_bits(costs, sizes, avg * params.sum(), method=method)
    assert sizes[np.arange(len(choice)), choice].sum() <= avg * params.sum() + 1e-6


def test_budget_of_uniform_8_bits_gives_8_everywhere():
    params, sizes, costs = problem(1)
    choice, _ = allocate_bits(costs + 1e-9, sizes, 8 * params.sum())
    assert (BITS[choice] == 8).all()


def test_annealing_converges_to_one_hot():
    params, sizes, costs = problem(2)
    _, pi = anneal(costs, sizes, 3.5 * params.sum())
    assert np.all(pi.max(axis=1) > 0.99)


def test_best_of_both_is_never_worse_than_greedy():
    for seed in range(5):
        params, sizes, costs = problem(seed)
        b = 3.0 * params.sum()
        g = greedy(costs, sizes, b)
        c, _ = allocate_bits(costs, sizes, b)
        assert costs[np.arange(len(c)), c].sum() <= costs[np.arange(len(g)), g].sum() + 1e-9


def test_sensitive_layer_gets_the_most_bits():
    """Three equal MatMuls on the same input, summed after scaling: the middle one's output
    counts 20x more than the others', so must its rounding error: it gets the most bits."""
    rng = np.random.default_rng(3)
    w = {f"w{i}": (rng.standard_normal((32, 32)) / 6).astype(np.float32) for i in range(3)}
    w["big"], w["small"] = np.array(4.0, np.float32), np.array(0.2, np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["a"], name="l0"),
             helper.make_node("MatMul", ["x", "w1"], ["b"], name="sensitive"),
             helper.make_node("MatMul", ["x", "w2"], ["c"], name="l2"),
             helper.make_node("Mul", ["a", "small"], ["a2"]),
             helper.make_node("Mul", ["b", "big"], ["b2"]),
             helper.make_node("Mul", ["c", "small"], ["c2"]),
             helper.make_node("Sum", ["a2", "b2", "c2"], ["y"])]
    m = make_model(nodes, [vi("x", [8, 32])], [vi("y", [8, 32])], w)
    cal = [{"x": rng.standard_normal((8, 32)).astype(np.float32)} for _ in range(16)]
    q, rep = onnxq.convert(m, onnxq.ConvertConfig(avg_bits=3.5, act_bits=32), calib=cal)
    bits = rep.mixed.layers
    assert bits["sensitive"] == max(bits.values()) and bits["sensitive"] > min(bits.values())
    assert rep.mixed.avg_bits <= 3.5
    ort.InferenceSession(q.SerializeToString())


def test_every_allocation_is_measured_end_to_end_and_the_best_is_kept():
    from pathlib import Path
    root = Path(__file__).parents[1] / "models"
    cfg = onnxq.ConvertConfig(bits=4, avg_bits=3.0)
    _, rep = onnxq.convert(str(root / "digits_cnn.onnx"), cfg, calib=str(root / "digits_calib"))
    mx = rep.mixed
    assert {"anneal", "greedy"} <= set(mx.measured_by_allocator)
    assert any(k.startswith("uniform") for k in mx.measured_by_allocator)
    assert mx.measured_divergence == min(mx.measured_by_allocator.values())
    assert mx.used_bits <= mx.budget_bits



@pytest.mark.parametrize("avg", [3.0, 5.0])
def test_predicting_the_8_bit_costs_chooses_what_probing_them_chooses(monkeypatch, avg):
    """The widest (8-bit) choice is not probed: its cost, predicted from the 4-bit one, leads to
    the same bits per layer as measuring it does."""
    from pathlib import Path
    from onnxq.search import mixed
    root = Path(__file__).parents[1] / "models"
    cfg = onnxq.ConvertConfig(avg_bits=avg)
    args = (str(root / "digits_cnn.onnx"), cfg)
    _, predicted = onnxq.convert(*args, calib=str(root / "digits_calib"))
    calls = []
    monkeypatch.setattr(mixed, "NEAR_LOSSLESS", 99)                 # every choice probed
    monkeypatch.setattr(mixed, "widest_costs", lambda *a: calls.append(a))
    _, measured = onnxq.convert(*args, calib=str(root / "digits_calib"))
    assert not calls and set(measured.mixed.layers.values()) > {8}
    assert predicted.mixed.layers == measured.mixed.layers


def test_max_size_counts_the_bytes_the_file_holds():
    """Under --max-size the allocator's size is the file's: 3-bit codes in INT4 containers (4 bits
    each), 8-bit in INT8 or UINT8, plus float32 per-channel scales."""
    from pathlib import Path
    root = Path(__file__).parents[1] / "models"
    m = onnx.load(str(root / "digits_cnn.onnx"))
    params = sum(int(np.prod(t.dims)) for t in m.graph.initializer if len(t.dims) > 1)
    cfg = onnxq.ConvertConfig(bit_choices=(8, 3), max_size=int(params * 0.85), act_bits=32)
    q, rep = onnxq.convert(m, cfg, calib=str(root / "digits_calib"))
    assert set(rep.mixed.layers.values()) == {8, 3}
    held = sum(WIDTH[t.data_type] * int(np.prod(t.dims)) for t in q.graph.initializer
               if t.name.endswith(("/weight_q", "/weight_scale")))
    assert rep.mixed.used_bits == held <= rep.mixed.budget_bits


def test_a_size_budget_that_cannot_be_met_is_said_in_the_report():
    from pathlib import Path
    root = Path(__file__).parents[1] / "models"
    cfg = onnxq.ConvertConfig(bit_choices=(8, 4), max_size=100, act_bits=32)
    _, rep = onnxq.convert(str(root / "digits_cnn.onnx"), cfg, calib=str(root / "digits_calib"))
    assert set(rep.mixed.layers.values()) == {4}
    assert any("size budget cannot be met" in w for w in rep.warnings)


def test_readers_of_one_weight_take_one_width_and_their_weight_counts_once():
    """Six Gemm steps reading one weight (an unrolled loop's) store it once when they take one
    width: the allocation gives them one together and counts its bytes once. Counted once per
    reader, 3000 bytes could not hold the six (the run warned and stored 4 bits), and an average
    of 6 bits mixed 8 and 4 across the steps, storing the weight again for each width."""
    from test_matmul_gemms import _chain
    feeds = [{"x": np.random.default_rng(s).standard_normal((4, 64)).astype(np.float32)} for s in range(8)]
    q, rep = onnxq.convert(_chain(True), onnxq.ConvertConfig(bit_choices=(8, 4), max_size=3000, act_bits=32), calib=feeds)
    held = sum(WIDTH[t.data_type] * int(np.prod(t.dims)) for t in q.graph.initializer
               if t.name.endswith(("/weight_q", "/weight_scale", "/weight_zero")))
    assert rep.shared_weights == 1 and set(rep.mixed.layers.values()) == {4}
    assert rep.mixed.used_bits == held <= rep.mixed.budget_bits == 3000 * 8
    assert not any("budget cannot be met" in w for w in rep.warnings)
    q, rep = onnxq.convert(_chain(True), onnxq.ConvertConfig(bit_choices=(8, 4), avg_bits=6.0, act_bits=32), calib=feeds)
    assert rep.shared_weights == 1 and len(set(rep.mixed.layers.values())) == 1 and rep.mixed.avg_bits <= 6.0
    assert sum(t.name.endswith("/weight_q") for t in q.graph.initializer) == 1
    # a weight each: the six are sized and given widths one by one
    _, rep = onnxq.convert(_chain(False), onnxq.ConvertConfig(bit_choices=(8, 4), avg_bits=6.0, act_bits=32), calib=feeds)
    assert set(rep.mixed.layers.values()) == {8, 4} and rep.mixed.avg_bits == pytest.approx(6.0)
