"""Silero VAD: a real model whose whole network sits inside If branches (and an LSTM)."""

import numpy as np
import onnx
import pytest

import onnxq
from realdata import silero_path, silero_stream, speech_like


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def calib():
    _, feeds = silero_stream(str(silero_path()), speech_like(12.0, seed=0))
    return feeds


@pytest.mark.parametrize("bits", [8, 4])
def test_vad_quantized_inside_if_branches_and_keeps_decisions(calib, bits):
    q, rep = onnxq.convert(str(silero_path()), onnxq.ConvertConfig(bits=bits), calib=calib)
    onnx.checker.check_model(q)
    reached = [l for l in rep.quantized if l.graph != "main" and l.activation_bits < 32]
    assert len(reached) >= 6                                  # the 16 kHz branch, activations too
    # gptq at 4 bits (blocked scales where a conv row holds several blocks), and for the ungrouped
    # convs of an 8-bit conversion
    assert all(l.method.split(" (blocks of")[0] == ("gptq" if bits == 4 or (l.op == "Conv" and l.groups == 1) else "mse")
               for l in reached)
    audio = speech_like(8.0, seed=1)                          # held out
    ref, _ = silero_stream(str(silero_path()), audio)
    got, _ = silero_stream(q.SerializeToString(), audio)
    assert (ref > 0.5).mean() > 0.15 and (ref < 0.5).mean() > 0.15   # the audio has both classes
    agree = np.mean((ref > 0.5) == (got > 0.5))
    assert agree >= (0.97 if bits == 8 else 0.90), agree          # measured: 0.99 / 0.93
    assert np.abs(ref - got).mean() < (0.035 if bits == 8 else 0.09)


def test_vad_branches_inside_if_branches_are_weighted_by_layer_error_and_keep_decisions(calib):
    """Every layer the branch planner may use sits inside an If branch, which the network probe
    does not run: the allocation falls back to layer error and says so, instead of reporting
    divergences of a network in which nothing changed."""
    q, rep = onnxq.convert(str(silero_path()), onnxq.ConvertConfig(bits=4, rank_budget=0.05), calib=calib)
    onnx.checker.check_model(q)
    b = rep.branches
    assert b.layers_with_branch > 0 and b.used_params <= b.budget_params
    assert b.weighting.startswith("layer output error (every candidate layer is inside a subgraph")
    assert b.divergence_final is None and b.sensitivity_power is None
    with_branch = [l for l in rep.quantized if l.branch_rank]
    assert all(l.graph != "main" for l in with_branch)
    audio = speech_like(8.0, seed=1)
    ref, _ = silero_stream(str(silero_path()), audio)
    got, _ = silero_stream(q.SerializeToString(), audio)
    assert np.mean((ref > 0.5) == (got > 0.5)) >= 0.90
