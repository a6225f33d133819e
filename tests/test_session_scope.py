"""A conversion's searches run the partly quantized model the way the target's runtime runs the
result: every session made while a conversion quantizes takes the target's session entries."""

import onnx
import pytest

import onnxq
import onnxq.runtime as runtime
import onnxq.search.probe as probe
from onnxq.runtime import run_as, session
from test_shared import CAL, unrolled

KEY = "session.disable_quant_qdq"


def entry(sess) -> str | None:
    try:
        return sess.get_session_options().get_session_config_entry(KEY)
    except RuntimeError:                 # onnxruntime raises for an entry never set
        return None


def test_sessions_made_in_scope_take_its_entries_and_their_own_win():
    model = unrolled()
    assert entry(session(model)) is None
    with run_as({KEY: "1"}):
        assert entry(session(model)) == "1"
        assert entry(session(model, options={KEY: "0"})) == "0"
        with run_as({}):
            assert entry(session(model)) is None
        assert entry(session(model)) == "1"
    assert entry(session(model)) is None


@pytest.mark.parametrize("target, want", [("generic", "1"), ("ort-cpu", None)])
def test_every_session_on_a_quantized_model_runs_as_the_target_runs_it(monkeypatch, target, want):
    made = []
    real = runtime.ort.InferenceSession

    def spy(model, so=None, **kw):
        sess = real(model, so, **kw)
        if isinstance(model, bytes):
            ops = {n.op_type for n in onnx.load_from_string(model).graph.node}
            made.append(("QuantizeLinear" in ops, entry(sess)))
        return sess

    monkeypatch.setattr(runtime.ort, "InferenceSession", spy)
    # the probes keep their tail sessions, which a model this small would not be given
    monkeypatch.setattr(probe, "TAIL_MIN_MACS", 0.0)
    # W4A8 with 16-bit protection and sequential mode: the mask, search and paired sessions
    onnxq.convert(unrolled(), onnxq.ConvertConfig(bits=4, target=target), calib=CAL)
    quantized = [e for q, e in made if q]
    assert len(quantized) >= 3
    assert all(e == want for e in quantized), quantized
