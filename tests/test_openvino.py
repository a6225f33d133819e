"""A second runtime: OpenVINO's CPU plugin compiles every target's output and computes what
onnxruntime computes from it (the maintainers deploy to both)."""

import numpy as np
import onnxruntime as ort
import pytest
from pathlib import Path

import onnxq
from onnxq.algos.metrics import sqnr_db
from onnxq.plan.rules import RULES

ov = pytest.importorskip("openvino")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("target", list(RULES))
@pytest.mark.parametrize("bits", [8, 4])
def test_openvino_runs_every_target_like_onnxruntime(tmp_path, target, bits):
    calib = str(ROOT / "models" / "digits_calib")
    q, _ = onnxq.convert(str(ROOT / "models" / "digits_cnn.onnx"), onnxq.ConvertConfig(bits=bits, target=target),
                         calib=calib)
    path = tmp_path / "q.onnx"
    onnxq.save(q, path)
    with np.load(ROOT / "models" / "digits_eval.npz") as z:
        x = z["input"][:64].astype(np.float32)
    so = ort.SessionOptions()
    for k, v in RULES[target].session_options.items():
        so.add_session_config_entry(k, v)
    want = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = compiled(x)[compiled.output(0)]
    assert sqnr_db(want, got) > 25.0
    assert np.mean(want.argmax(1) == got.argmax(1)) >= 0.95
