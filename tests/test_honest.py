"""Honest first use: held-out samples spread across the data, a constant reference flagged
instead of meaningless dB, and progress lines when no terminal is attached."""

import re
from pathlib import Path

import numpy as np
from builders import make_model, vi
from onnx import helper

import onnxq
from onnxq import api

ROOT = Path(__file__).resolve().parents[1]


def test_held_out_samples_are_drawn_across_the_data():
    loaders = list(range(64))
    cal, held, _ = api.split(loaders, onnxq.ConvertConfig(seed=0), None)
    assert len(held) == 8 and min(held) < 32 and set(cal) | set(held) == set(loaders) and not set(cal) & set(held)
    other = api.split(loaders, onnxq.ConvertConfig(seed=1), None)[1]
    assert other != held                               # the seed decides the pick


def test_a_constant_reference_output_is_flagged():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Mul", ["h", "zero"], ["y"])]
    m = make_model(nodes, [vi("x", ["N", 8])], [vi("y", ["N", 4])],
                   {"w": rng.standard_normal((8, 4)).astype(np.float32), "zero": np.array(0.0, np.float32)})
    feeds = [{"x": rng.standard_normal((2, 8)).astype(np.float32)} for _ in range(16)]
    _, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=8), calib=feeds)
    assert rep.fidelity.outputs["y"].degenerate and rep.fidelity.sqnr_db is None
    assert any("'y' is constant" in w for w in rep.warnings)


def test_progress_lines_without_a_terminal(tmp_path, cli_run):
    code, _, err = cli_run("convert", ROOT / "models" / "digits_cnn.onnx", "-o", tmp_path / "q.onnx",
                           "--calib", ROOT / "models" / "digits_calib", "--log-file", tmp_path / "log.txt")
    assert code == 0
    stamp = r"^\d\d:\d\d:\d\d (calibrate|quantize) \d+/\d+$"
    assert any(re.match(stamp, l) for l in err.splitlines()), err
    assert any(re.match(stamp, l) for l in (tmp_path / "log.txt").read_text().splitlines())
