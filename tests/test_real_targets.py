"""ort-cpu on a real pretrained convnet (OriNet page-orientation classifier, occular-deskew wheel):
onnxruntime's optimizer turns every quantized conv into an integer kernel, and the answers on
held-out rendered pages stay those of input-side placement."""

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from realdata import orinet_path, rotated_pages

import onnxq

pytestmark = pytest.mark.slow


def _answers(model, feeds, options=None) -> np.ndarray:
    so = ort.SessionOptions()
    for k, v in (options or {}).items():
        so.add_session_config_entry(k, v)
    s = ort.InferenceSession(model.SerializeToString() if hasattr(model, "SerializeToString") else str(model), so,
                             providers=["CPUExecutionProvider"])
    return np.array([int(s.run(None, f)[0].argmax()) for f in feeds])


def test_orinet_runs_as_integer_kernels_with_the_same_answers(tmp_path, bits=8):
    """(W8A8: at 4 bits the same check takes minutes of rounding; benchmarks/targets.py has it.)"""
    calib, _ = rotated_pages(16, seed=0)
    held, ks = rotated_pages(32, seed=1)
    fp32 = _answers(orinet_path(), held)
    assert np.mean(fp32 == ks) >= 0.9                           # the pages are real inputs for it
    answers = {}
    for target in ("generic", "ort-cpu"):
        q, rep = onnxq.convert(str(orinet_path()), onnxq.ConvertConfig(bits=bits, target=target), calib=calib)
        answers[target] = _answers(q, held, onnxq.plan.rules.RULES[target].session_options)
        # 8-bit ranges: one method for the model under generic, one per tensor under ort-cpu
        assert rep.ranges is not None and rep.ranges.evaluations >= (2 if target == "ort-cpu" else 1)
        assert (rep.ranges.chosen == "") == (target == "ort-cpu") and rep.config["act_method"] == (
            "auto" if target == "ort-cpu" else "best")
        if target == "ort-cpu":
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            so.optimized_model_filepath = str(tmp_path / "opt.onnx")
            ort.InferenceSession(q.SerializeToString(), so, providers=["CPUExecutionProvider"])
            ops = Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
            convs = sum(n.op_type == "Conv" for n in onnx.load(str(orinet_path())).graph.node)
            # every conv but the stem on the 3-channel page, which stays float (faster there)
            stems = [s.node for s in rep.skipped if "few-channel input" in s.reason]
            assert len(stems) == 1 and ops["QLinearConv"] == convs - 1 and ops["Conv"] + ops["FusedConv"] == 1, ops
    agree = {t: float(np.mean(a == fp32)) for t, a in answers.items()}
    assert agree["ort-cpu"] >= agree["generic"] - 1 / 32, agree     # at most one page of 32 apart
    assert agree["ort-cpu"] >= 0.9, agree
