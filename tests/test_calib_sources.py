"""Calibration sources from Python: a generator and an onnxruntime CalibrationDataReader
calibrate exactly as the same samples in a list do."""

import numpy as np
import pytest
from onnxruntime.quantization import CalibrationDataReader

import onnxq
from onnxq.errors import CalibrationError


class Reader(CalibrationDataReader):
    def __init__(self, feeds):
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)


@pytest.fixture(scope="module")
def digits():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "models"
    feeds = []
    for p in sorted((root / "digits_calib").glob("*.npz")):
        with np.load(p) as z:
            feeds.append({k: z[k] for k in z.files})
    return str(root / "digits_cnn.onnx"), feeds


def test_a_generator_and_a_reader_calibrate_as_a_list(digits):
    model, feeds = digits
    cfg = onnxq.ConvertConfig(bits=4)
    want = onnxq.convert(model, cfg, calib=feeds)[0].SerializeToString()
    assert onnxq.convert(model, cfg, calib=(f for f in feeds))[0].SerializeToString() == want
    assert onnxq.convert(model, cfg, calib=Reader(feeds))[0].SerializeToString() == want


@pytest.mark.parametrize("bad, message", [(iter([]), "holds no samples"), ([np.zeros(3)], "not a dict"),
                                          (3.5, "calib must be a path")])
def test_bad_python_calibration_sources_say_what_is_wrong(digits, bad, message):
    with pytest.raises(CalibrationError, match=message):
        onnxq.convert(digits[0], onnxq.ConvertConfig(bits=8), calib=bad)
