"""What a hostile or careless user hits, each with one clear line and exit 2 (run in process):
corrupt headers, float64 models, external data outside the model's folder or missing, empty or
absurd calibration samples, stats files that are not there, out-of-range options, read-only
outputs, markup in paths. All-zero calibration data converts, with a warning."""

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import make_model, vi
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
CALIB = ROOT / "models" / "digits_calib"


def _samples(folder: Path, x: np.ndarray) -> Path:
    folder.mkdir()
    np.savez(folder / "s0.npz", input=x)
    return folder


def _external(folder: Path, location: str | None) -> Path:
    """A model whose weight lives in external data, then pointed at `location` (None: removed)."""
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    path = folder / "ext.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), path,
              save_as_external_data=True, location="ext.data", size_threshold=0)
    if location is None:
        (folder / "ext.data").unlink()
        return path
    m = onnx.load(str(path), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(m, path)
    return path


def cases(d: Path) -> dict:
    x = np.zeros((1, 1, 8, 8), np.float32)
    flipped = bytearray(DIGITS.read_bytes())
    flipped[3] ^= 0xFF
    (d / "flip.onnx").write_bytes(bytes(flipped))
    f64 = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [1, 4], TensorProto.DOUBLE)],
                     [vi("y", [1, 4], TensorProto.DOUBLE)], {})
    onnx.save(f64, d / "f64.onnx")
    (d / "garbage.npz").write_text("not numpy")
    (d / "ro.onnx").write_text("old")
    os.chmod(d / "ro.onnx", 0o444)
    for name in ("up", "abs", "gone"):
        (d / name).mkdir()
    out = ["-o", d / "out.onnx"]
    return {
        "flipped header": (["convert", d / "flip.onnx", *out], "not a readable ONNX model"),
        "float64 model": (["convert", d / "f64.onnx", *out], "computes in double"),
        "external data ..": (["convert", _external(d / "up", "../../etc/passwd"), *out], "refused"),
        "external data absolute": (["convert", _external(d / "abs", "/etc/passwd"), *out], "refused"),
        "external data missing": (["convert", _external(d / "gone", None), *out], "is missing"),
        "zero-size sample": (["convert", DIGITS, *out, "--calib", _samples(d / "z", x[:0])], "is empty"),
        "huge values": (["convert", DIGITS, *out, "--calib", _samples(d / "h", x + 3e38)], "must stay below"),
        "stats missing": (["convert", DIGITS, *out, "--load-stats", d / "none.npz"], "no such file"),
        "stats garbage": (["convert", DIGITS, *out, "--load-stats", d / "garbage.npz"], "not a statistics file"),
        "stats folder missing": (["convert", DIGITS, *out, "--save-stats", d / "no" / "s.npz"], "does not exist"),
        "negative seed": (["convert", DIGITS, *out, "--seed", "-1"], "not in the range"),
        "zero stages": (["convert", DIGITS, *out, "--sequential", "--stages", "0"], "not in the range"),
        "zero runs": (["eval", DIGITS, DIGITS, "--data", CALIB, "--runs", "0"], "not in the range"),
        "negative percentile": (["convert", DIGITS, *out, "--act-method", "percentile:-5"], "must lie in"),
        "lp zero": (["convert", DIGITS, *out, "--act-method", "lp:0"], "must lie in"),
        "read-only output": (["convert", DIGITS, "-o", d / "ro.onnx", "--calib", CALIB], "read-only"),
        "markup in path": (["convert", d / "x[/]y.onnx"], "not found"),
        "bad layout": (["convert", DIGITS, *out, "--layout", "NWHC"], "NWHC"),
    }


@pytest.mark.parametrize("case", ["flipped header", "float64 model", "external data ..", "external data absolute",
                                  "external data missing", "zero-size sample", "huge values", "stats missing",
                                  "stats garbage", "stats folder missing", "negative seed", "zero stages",
                                  "zero runs", "negative percentile", "lp zero", "read-only output",
                                  "markup in path", "bad layout"])
def test_bad_input_gives_one_clear_line(tmp_path, cli_run, case):
    argv, expect = cases(tmp_path)[case]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, _, err = cli_run(*argv)
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("onnxq: error:"), err
    assert expect in lines[0] and "internal error" not in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before                # nothing written
    if case == "read-only output":
        assert (tmp_path / "ro.onnx").read_text() == "old"


def test_all_zero_calibration_converts_with_a_warning(tmp_path, cli_run):
    data = _samples(tmp_path / "zeros", np.zeros((1, 1, 8, 8), np.float32))
    shutil.copy(data / "s0.npz", data / "s1.npz")
    code, _, err = cli_run("convert", DIGITS, "-o", tmp_path / "z.onnx", "--calib", data, "-q")
    assert code == 0 and "single value in every sample" in err
