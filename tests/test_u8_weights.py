"""8-bit weights under generic are UINT8 codes with zero point 128, so onnxruntime's fused integer
kernels compute what the QDQ graph says on every x86 CPU: its u8 x s8 kernels without VNNI add
pairs of products in int16 and saturate (docs/results.md, round 21). Under ort-cpu the container
follows the converting CPU (UINT8 there, INT8 with zero point 0 on a VNNI or non-x86 CPU, whose
symmetric conv path runs 1.2-2.3x faster: round 29), or --u8-weights / --int8-weights."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.algos.metrics import sqnr_db


def _saturating_net() -> onnx.ModelProto:
    """Two 3x3 convs whose weights all sit at their channel's largest code, read by activations
    at the top of their range: every pair of u8 x s8 products is 255 * 127 * 2 > 32767."""
    w1 = np.ones((8, 16, 3, 3), np.float32) * np.array([1, -1] * 4, np.float32)[:, None, None, None]
    w2 = np.ones((4, 8, 3, 3), np.float32) * 0.05
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], pads=[1, 1, 1, 1], name="conv2")]
    g = helper.make_graph(nodes, "sat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.uniform(0.9, 1.0, (1, 16, 8, 8)).astype(np.float32)} for _ in range(n)]


def _run(model: onnx.ModelProto, feeds, exact: bool) -> np.ndarray:
    so = ort.SessionOptions()
    if exact:          # no fusion into integer kernels: the graph's own arithmetic
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, f)[0] for f in feeds])


@pytest.mark.parametrize("cfg", [dict(target="generic"), dict(target="ort-cpu", u8_weights=True)])
def test_fused_integer_kernels_compute_what_the_graph_says(cfg):
    q, _ = onnxq.convert(_saturating_net(), onnxq.ConvertConfig(bits=8, **cfg), calib=_feeds(16, 0))
    zeros = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer if t.name.endswith("/weight_zero")}
    assert set(zeros) == {"conv1/weight_zero", "conv2/weight_zero"}
    assert all(z.dtype == np.uint8 and np.all(z == 128) for z in zeros.values())
    held = _feeds(4, 1)
    fused, exact = _run(q, held, exact=False), _run(q, held, exact=True)
    assert sqnr_db(exact, fused) > 35.0      # INT8 containers: about 1 dB on an AVX2 CPU
    # and the graph itself stays close to the float net
    assert sqnr_db(_run(_saturating_net(), held, exact=True), exact) > 30.0


@pytest.mark.parametrize("u8", [None, True, False])
def test_ort_cpu_weights_follow_the_cpu_unless_asked(u8):
    """INT8 with zero point 0 where this CPU adds int8 products in int32 (plan.rules.int16_pair_sums),
    else UINT8 with zero point 128; the report's config says which; the graph's values the same."""
    from onnxq.plan.rules import int16_pair_sums
    q, rep = onnxq.convert(_saturating_net(), onnxq.ConvertConfig(bits=8, target="ort-cpu", u8_weights=u8),
                           calib=_feeds(16, 0))
    want = int16_pair_sums() if u8 is None else u8
    assert rep.config["u8_weights"] is want
    zeros = [numpy_helper.to_array(t) for t in q.graph.initializer if t.name.endswith("/weight_zero")]
    assert len(zeros) == 2
    assert all(z.dtype == np.uint8 and np.all(z == 128) if want else z.dtype == np.int8 and not z.any() for z in zeros)
    held = _feeds(4, 1)
    assert sqnr_db(_run(_saturating_net(), held, exact=True), _run(q, held, exact=True)) > 30.0


def test_the_weight_container_is_not_offered_where_the_runtime_wants_symmetric_int8():
    from onnxq.errors import ConfigError
    with pytest.raises(ConfigError, match="generic and ort-cpu"):
        onnxq.ConvertConfig(target="qnn", u8_weights=True)


@pytest.mark.parametrize("target", ["tensorrt", "qnn", "openvino"])
def test_targets_whose_runtimes_want_symmetric_int8_keep_it(target):
    q, _ = onnxq.convert(_saturating_net(), onnxq.ConvertConfig(bits=8, target=target), calib=_feeds(16, 0))
    zeros = [numpy_helper.to_array(t) for t in q.graph.initializer if t.name.endswith("/weight_zero")]
    assert len(zeros) == 2 and all(z.dtype == np.int8 and not z.any() for z in zeros)


def test_branch_factors_read_by_fused_kernels_are_uint8_too():
    """A low-rank branch's first factor reads the layer's u8 input as a conv weight, and
    onnxruntime fuses it with the branch's int8 middle Q into QLinearConv: under generic its
    8-bit codes are UINT8 with zero point 128 as well, and the fused branch computes what the
    graph says (INT8 factors read 51.5 dB fused against exact on this net, on an AVX2 CPU)."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_t(2, (64, 64, 3, 3)) * 0.05).astype(np.float32)
    w2 = (rng.standard_normal((8, 64, 1, 1)) * 0.1).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2")]
    g = helper.make_graph(nodes, "branches", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    net = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    def feeds(n, seed):
        r = np.random.default_rng(seed)
        return [{"x": r.uniform(0, 1, (1, 64, 8, 8)).astype(np.float32)} for _ in range(n)]

    q, rep = onnxq.convert(net, onnxq.ConvertConfig(bits=4, rank_budget=0.2, max_rank=16, sequential=False),
                           calib=feeds(16, 0))
    assert any(l.branch_rank for l in rep.quantized)
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    a_zero = [v for k, v in inits.items() if k.endswith("/residual/A_weight_zero")]
    assert a_zero and all(z.dtype == np.uint8 and np.all(z == 128) for z in a_zero)
    held = feeds(4, 100)
    assert sqnr_db(_run(q, held, exact=True), _run(q, held, exact=False)) > 80.0


def _session_run(model: onnx.ModelProto, feeds, options: dict) -> np.ndarray:
    so = ort.SessionOptions()
    for k, v in options.items():
        so.add_session_config_entry(k, v)
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, f)[0] for f in feeds])


def test_int8_weights_run_on_exact_kernels_wherever_this_cpu_saturates(monkeypatch):
    """An ort-cpu file with INT8 8-bit weights (--int8-weights, or written on a CPU with VNNI) runs
    with session.x64quantprecision=1 where this CPU adds u8 x s8 pairs in int16: in `onnxq eval`
    (api.run_options) and in the conversion's own check, which warns. The entry is decided where the
    model runs and never written into it; a UINT8 file, or INT8 codes within +-64 (4-bit), takes none."""
    from onnxq import api
    from onnxq.graph.io import SESSION_KEY, get_metadata
    from onnxq.plan.rules import int16_pair_sums
    calib = _feeds(16, 0)
    q8, rep8 = onnxq.convert(_saturating_net(), onnxq.ConvertConfig(bits=8, target="ort-cpu", u8_weights=False), calib=calib)
    qu8, _ = onnxq.convert(_saturating_net(), onnxq.ConvertConfig(bits=8, target="ort-cpu", u8_weights=True), calib=calib)
    q4, _ = onnxq.convert(_saturating_net(), onnxq.ConvertConfig(bits=4, target="ort-cpu", u8_weights=False), calib=calib)
    assert get_metadata(q8, SESSION_KEY) is None and rep8.session_options == {}
    for saturates in (True, False):
        monkeypatch.setattr(api, "int16_pair_sums", lambda: saturates)
        assert api.run_options(q8) == ("ort-cpu", {"session.x64quantprecision": "1"} if saturates else {})
        assert api.run_options(qu8) == api.run_options(q4) == ("ort-cpu", {})
    monkeypatch.undo()
    if not int16_pair_sums():
        pytest.skip("this CPU adds int8 products in int32: nothing saturates to check against")
    held = _feeds(4, 1)
    exact = _run(q8, held, exact=True)
    assert sqnr_db(exact, _session_run(q8, held, {})) < 20.0          # a default session saturates here
    assert sqnr_db(exact, _session_run(q8, held, api.run_options(q8)[1])) > 35.0
    assert rep8.fidelity.sqnr_db > 35.0 and any("x64quantprecision" in w for w in rep8.warnings)


def test_eval_warns_when_a_model_onnxq_did_not_write_may_saturate_here(tmp_path, monkeypatch):
    """`onnxq eval` runs a model onnxq did not write (onnxruntime's own W8A8, say) as a default
    session runs it, and on a CPU whose u8 x s8 kernels add pairs in int16 says when its INT8
    weights may saturate there; UINT8 weights, or INT8 codes within +-64, draw no warning."""
    import subprocess
    import sys

    from onnxq import api
    from onnxq.plan.rules import int16_pair_sums

    def foreign(cfg: dict) -> onnx.ModelProto:
        q, _ = onnxq.convert(_saturating_net(), onnxq.ConvertConfig(target="ort-cpu", **cfg), calib=_feeds(16, 0))
        q.producer_name = "another tool"
        del q.metadata_props[:]
        return q

    s8, u8, s4 = foreign(dict(bits=8, u8_weights=False)), foreign(dict(bits=8, u8_weights=True)), \
        foreign(dict(bits=4, u8_weights=False))
    assert api.run_options(s8) == (None, {})
    monkeypatch.setattr(api, "int16_pair_sums", lambda: True)
    assert "may saturate" in api.saturation_note(s8) and not api.saturation_note(u8) and not api.saturation_note(s4)
    monkeypatch.setattr(api, "int16_pair_sums", lambda: False)
    assert not api.saturation_note(s8)
    monkeypatch.undo()
    if not int16_pair_sums():
        pytest.skip("this CPU adds int8 products in int32: the command has nothing to warn of")
    onnx.save(_saturating_net(), tmp_path / "ref.onnx")
    onnx.save(s8, tmp_path / "cand.onnx")
    (tmp_path / "data").mkdir()
    for i, f in enumerate(_feeds(3, 2)):
        np.savez(tmp_path / "data" / f"{i}.npz", **f)
    r = subprocess.run([sys.executable, "-m", "onnxq.cli", "eval", str(tmp_path / "ref.onnx"), str(tmp_path / "cand.onnx"),
                        "--data", str(tmp_path / "data"), "--runs", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "may saturate" in r.stderr and "Traceback" not in r.stderr
