"""Loss-aware joint range search: it never ends above its start, and the search graph (QDQ
parameters as inputs) computes exactly what the emitted graph computes."""

import copy
import dataclasses
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import onnxq
from onnxq import api
from onnxq.algos.metrics import divergence
from onnxq.graph.rewrite import apply_plan
from onnxq.graph.variants import weights_as_inputs
from onnxq.plan.acts import act_quant, plan_acts
from onnxq.plan.biases import code_biases
from onnxq.plan.branches import add_branches
from onnxq.runtime import session
from onnxq.search.lapq import SearchSession, lapq_search
from onnxq.types import Plan
from builders import conv_zoo


@pytest.fixture
def search_inputs(monkeypatch):
    """search_inputs(model, cfg, calib) runs onnxq.convert with act_method="lapq" and returns
    what the converter hands lapq_search: (prepared model, plan, activation statistics). The
    real search runs; the test only keeps its arguments."""

    def run(model, cfg, cal):
        seen = {}

        def keep(prepared, plan, stats, *args, **kwargs):
            seen.update(prepared=prepared, plan=copy.deepcopy(plan), stats=stats)
            return lapq_search(prepared, plan, stats, *args, **kwargs)

        monkeypatch.setattr(api, "lapq_search", keep)
        onnxq.convert(model, dataclasses.replace(cfg, act_method="lapq", search_evals=0), calib=cal)
        monkeypatch.undo()
        return seen["prepared"], seen["plan"], seen["stats"]

    return run


def unfused(model):
    """A session without graph optimizations: with constant scales onnxruntime fuses QDQ into
    integer kernels whose requantization rounds differently from the graph's semantics."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("abits", [4, 8])
def test_search_never_increases_the_calibration_loss(abits, feeds):
    m = conv_zoo(np.random.default_rng(0))
    _, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=4, act_bits=abits, act_method="lapq",
                                                  search_evals=120), calib=feeds())
    s = rep.search
    # every activation the model rounds: the 4-bit Gemm/MatMul layers' inputs are float (weight-only)
    assert s.tensors == len(rep.activations) == 5 and s.evaluations <= 120
    assert s.loss_after <= s.loss_before <= s.start_loss
    assert s.loss_before <= min(s.single_method_losses.values())   # starts from the best method
    widened = set(rep.wide.widened) if rep.wide else set()           # int16 min-max (--protect-acts)
    assert all(a.method == "lapq" for a in rep.activations if a.tensor not in widened) or s.loss_after == s.loss_before


@pytest.mark.parametrize("budget", [0.0, 0.2])
def test_search_graph_and_emitted_graph_agree_for_the_same_ranges(budget, feeds, search_inputs):
    """With branches, their A biases are int32 in units of s_x too and must follow the trial scale."""
    m = conv_zoo(np.random.default_rng(0))
    cfg = onnxq.ConvertConfig(bits=4, act_bits=4, sequential=False, rank_budget=budget, protect=0)
    cal = feeds(8)
    prepared, plan, stats = search_inputs(m, cfg, cal)
    if budget:     # the converter plans branches after the search; a plan with them must search too
        weights = {i.name: numpy_helper.to_array(i) for i in prepared.graph.initializer}
        add_branches(plan, [lp.target for lp in plan.layers], {lp.target.node: weights[lp.target.weight]
                                                               for lp in plan.layers}, cfg)
    ref = [session(prepared).run(None, f) for f in cal]
    search = SearchSession(prepared, plan, cal, ref)          # built on the converter's ranges
    # other ranges than the plan's: every tensor by Lp (p = 3), then shrunk by exp(-0.3)
    lp3 = plan_acts(stats, dataclasses.replace(cfg, act_method="lp:3.0"))
    k = float(np.exp(-0.3))
    other = {**plan.acts, **{a: act_quant(lp3[a].lo * k, lp3[a].hi * k, cfg.act_bits, lp3[a].signed, "lapq")
                             for a in search.names}}
    assert any(other[a].scale != plan.acts[a].scale for a in search.names)
    assert search.biased                                      # int32 biases that follow s_x
    assert any("/residual/A_bias" in n for n in search.inputs) == (budget > 0)
    # the same graph semantics on both sides: no onnxruntime fusions
    search.sess = unfused(weights_as_inputs(apply_plan(prepared, code_biases(plan)), search.inputs))
    emitted = unfused(apply_plan(prepared, code_biases(Plan(layers=plan.layers, acts=other))))
    for f in cal[:3]:
        got = search.outputs_for(other, f)[0]
        want = emitted.run(None, f)[0]
        assert np.array_equal(got, want)
    # and the ranges matter: the plan's own ranges give other outputs
    assert not np.array_equal(search.outputs_for(plan.acts, cal[0])[0], emitted.run(None, cal[0])[0])


def test_stacked_search_runs_give_the_loss_of_separate_runs(feeds, search_inputs):
    """Samples of one shape are stacked into one run; the KL loss is a mean over rows either way."""
    m = conv_zoo(np.random.default_rng(0))
    prepared, plan, _ = search_inputs(m, onnxq.ConvertConfig(bits=4, act_bits=4), feeds(8))
    cal = feeds(6, seed=5)
    ref = [session(prepared).run(None, f) for f in cal]
    stacked = SearchSession(prepared, plan, cal, ref)
    assert len(stacked.feeds) == 1 and stacked.feeds[0]["x"].shape == (12, 3, 12, 12)
    assert len(stacked.reference) == 1 and stacked.reference[0][0].shape[0] == 12
    separate = np.mean([divergence(r, stacked.outputs_for(plan.acts, f)) for f, r in zip(cal, ref)])
    assert np.isclose(stacked.loss(plan.acts), separate, rtol=1e-5)
    assert stacked.evals == 1


def test_search_stacks_only_feeds_of_equal_shapes(feeds, search_inputs):
    m = conv_zoo(np.random.default_rng(0))
    prepared, plan, _ = search_inputs(m, onnxq.ConvertConfig(bits=4, act_bits=8), feeds(8))
    cal = feeds(3, seed=2) + feeds(2, seed=3, shape=(1, 3, 12, 12)) + feeds(1, seed=4)
    ref = [session(prepared).run(None, f) for f in cal]
    s = SearchSession(prepared, plan, cal, ref)
    assert sorted(f["x"].shape[0] for f in s.feeds) == [2, 8]            # 4 of batch 2, 2 of batch 1
    big = next(i for i, f in enumerate(s.feeds) if f["x"].shape[0] == 8)
    np.testing.assert_array_equal(s.feeds[big]["x"][6:], cal[5]["x"])   # stacked in sample order
    np.testing.assert_array_equal(s.reference[big][0][:2], ref[0][0])
    held = s.on(cal[:2], ref[:2])                                        # other samples, same session
    assert len(held.feeds) == 1 and held.feeds[0]["x"].shape[0] == 4 and held.sess is s.sess
    assert len(s.feeds) == 2                                             # the original is unchanged


@pytest.mark.parametrize("search_samples, checked", [(6, 6), (18, 3), (21, 0)])
def test_search_keeps_the_stage_best_on_samples_it_did_not_fit(search_samples, checked, feeds):
    """24 samples: 3 are held out for the fidelity check, 21 calibrate; the search fits the first
    `search_samples` of those and checks its stages on the next as many that are left."""
    m = conv_zoo(np.random.default_rng(0))
    cfg = onnxq.ConvertConfig(bits=4, act_bits=4, act_method="lapq", search_evals=40,
                              search_samples=search_samples)
    _, rep = onnxq.convert(m, cfg, calib=feeds())
    s = rep.search
    assert rep.calib_samples == 21 and s.check_samples == checked
    if checked:
        assert set(s.check_losses) == {"start", "coordinate", "powell"}
        assert s.check_losses[s.kept] == min(s.check_losses.values())
    else:
        assert s.check_losses == {} and s.kept == "powell"


@pytest.mark.parametrize("abits, method", [(4, "interval"), (6, "interval"), (8, "best"), (16, "best")])
def test_default_range_method_follows_the_activation_bits(abits, method):
    """Percentile clips too little at 4 and 6 bits (PP-OCR cls W4A4: 0.665 vs interval 0.810
    top-1 agreement); the interval rule scales its clipped fraction with the code count."""
    root = Path(__file__).parents[1] / "models"
    assert onnxq.ConvertConfig(act_bits=abits).act_method_name == method
    assert onnxq.ConvertConfig(act_bits=abits, act_method="mse").act_method_name == "mse"
    _, rep = onnxq.convert(str(root / "digits_cnn.onnx"), onnxq.ConvertConfig(act_bits=abits),
                           calib=str(root / "digits_calib"))
    chosen = {method} if method != "best" else {rep.ranges.chosen}      # 'best' names the method it kept
    # the tensors --protect-acts keeps at 16 bits take their whole range (search/wide.py)
    assert rep.activations and {a.method for a in rep.activations if a.bits == abits} == chosen
    assert all(a.method == "minmax" for a in rep.activations if a.bits != abits)
    if method == "best":
        assert rep.ranges.methods[rep.ranges.chosen] == min(rep.ranges.methods.values())
