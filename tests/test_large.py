"""The external-data paths that models over the 2 GiB protobuf limit take, exercised on the
digits CNN with the size threshold lowered: sessions, the checker and the output all go through
external data, the model in memory keeps its weights, and no temporary file or folder is left."""

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxq
from onnxq.graph import large

ROOT = Path(__file__).resolve().parents[1]


def _leftovers() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("onnxq-*")}


@pytest.mark.parametrize("bits", [8, 4])
def test_a_large_model_converts_through_external_data_and_leaves_nothing_behind(tmp_path, monkeypatch, bits):
    src = onnx.load(str(ROOT / "models" / "digits_cnn.onnx"))
    folder = tmp_path / "in"
    folder.mkdir()
    onnx.save_model(src, str(folder / "m.onnx"), save_as_external_data=True, location="m.onnx.data",
                    size_threshold=0)                                  # an external-data input
    calib = str(ROOT / "models" / "digits_calib")
    small, _ = onnxq.convert(str(ROOT / "models" / "digits_cnn.onnx"), onnxq.ConvertConfig(bits=bits), calib=calib)
    before = _leftovers()
    monkeypatch.setattr(large, "EXTERNAL_THRESHOLD", 1000)
    q, rep = onnxq.convert(str(folder / "m.onnx"), onnxq.ConvertConfig(bits=bits), calib=calib)
    assert rep.size_before > 1000 and large.is_large(q)
    out = tmp_path / "out" / "m.q.onnx"
    out.parent.mkdir()
    onnxq.save(q, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.q.onnx", "m.q.onnx.data"]   # nothing else
    assert (out.parent / "m.q.onnx.data").stat().st_size >= rep.params * (1 if bits == 8 else 0.5)  # the weights
    assert _leftovers() == before
    feed = {"input": np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)}
    got = ort.InferenceSession(str(out)).run(None, feed)[0]
    want = ort.InferenceSession(small.SerializeToString()).run(None, feed)[0]
    np.testing.assert_array_equal(got, want)           # the same model as the in-memory path gives
    assert all(t.HasField("raw_data") or t.int32_data or t.float_data for t in q.graph.initializer)  # kept in memory
