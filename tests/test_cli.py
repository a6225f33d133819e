"""The command line on good and bad input: bad input gets one line and a non-zero exit."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper

from builders import conv_zoo, make_model, vi

slow = pytest.mark.slow          # every test that starts the CLI as a subprocess


def onnxq(*args, cwd=None):
    r = subprocess.run([sys.executable, "-m", "onnxq.cli", *map(str, args)], capture_output=True,
                       text=True, cwd=cwd, timeout=300)
    return r.returncode, r.stdout, r.stderr


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    onnx.save(conv_zoo(np.random.default_rng(0)), d / "zoo.onnx")
    cal = d / "calib"
    cal.mkdir()
    rng = np.random.default_rng(1)
    for i in range(12):
        np.savez(cal / f"s{i:02d}.npz", x=rng.standard_normal((1, 3, 12, 12)).astype(np.float32))
    return d


def one_line_error(code, out, err):
    assert code != 0
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("onnxq: error:")
    assert "Traceback" not in err
    return lines[0]


@slow
def test_convert_writes_model_report_and_summary(work):
    out, rep = work / "zoo.q.onnx", work / "zoo.json"
    code, stdout, err = onnxq("convert", work / "zoo.onnx", "-o", out, "--bits", 4,
                              "--calib", work / "calib", "--report", rep, "--layers")
    assert code == 0, err
    assert "quantized: " in stdout and "fidelity on" in stdout and "size:" in stdout
    data = json.loads(rep.read_text())
    assert len(data["quantized"]) == 8 and data["fidelity"]["cosine"] > 0.99
    page = rep.with_suffix(".html").read_text()           # the page beside the JSON
    assert page.startswith("<!DOCTYPE html>") and data["quantized"][0]["node"] in page
    assert oct(rep.stat().st_mode & 0o777) == oct(out.stat().st_mode & 0o777)   # readable like the model
    onnx.checker.check_model(onnx.load(out))
    code, stdout, err = onnxq("eval", work / "zoo.onnx", out, "--data", work / "calib", "--runs", 3,
                              "--json", work / "eval.json")
    assert code == 0, err
    ev = json.loads((work / "eval.json").read_text())
    assert ev["fidelity"]["samples"] == 12 and ev["latency_ms_candidate_1t"] > 0
    assert ev["candidate_target"] == "generic"          # an onnxq model: timed as its target runs it
    assert ev["candidate_session_options"] == {"session.disable_quant_qdq": "1"}


@slow
def test_smoothing_and_blocks_are_set_from_the_command_line(work):
    rep = work / "flags.json"
    code, stdout, err = onnxq("convert", work / "zoo.onnx", "-o", work / "flags.onnx", "--calib", work / "calib",
                              "--no-smooth", "--block", 64, "--no-block-8bit", "--report", rep)
    assert code == 0, err
    cfg = json.loads(rep.read_text())["config"]
    assert cfg["smooth"] is False and cfg["block"] == 64 and cfg["block_8bit"] is False


def test_sessions_can_skip_qdq_fusion(tmp_path):
    """What `eval --no-qdq-fusion` asks of runtime.session (in process: no subprocess)."""
    from onnxq.runtime import session
    m = str(tmp_path / "zoo.onnx")
    onnx.save(conv_zoo(np.random.default_rng(0)), m)
    entry = "session.disable_quant_qdq"
    assert session(m, qdq_fusion=False).get_session_options().get_session_config_entry(entry) == "1"
    with pytest.raises(RuntimeError, match="does not have configuration"):    # default: unset
        session(m).get_session_options().get_session_config_entry(entry)


@slow
def test_eval_can_time_the_candidate_without_qdq_fusion(work):
    m = str(work / "zoo.onnx")
    q = work / "nofuse.onnx"
    assert onnxq("convert", m, "-o", q, "--calib", work / "calib", "-q")[0] == 0
    code, stdout, err = onnxq("eval", m, q, "--data", work / "calib", "--runs", 2, "--no-qdq-fusion",
                              "--json", work / "nofuse.json")
    assert code == 0, err
    assert "session.disable_quant_qdq=1" in stdout
    res = json.loads((work / "nofuse.json").read_text())
    assert res["candidate_session_options"] == {"session.disable_quant_qdq": "1"}
    assert res["latency_ms_candidate_1t"] > 0


@slow
def test_same_input_and_seed_give_same_bytes(work):
    a, b = work / "a.onnx", work / "b.onnx"
    for o in (a, b):
        assert onnxq("convert", work / "zoo.onnx", "-o", o, "--calib", work / "calib", "-q")[0] == 0
    assert a.read_bytes() == b.read_bytes()


@slow
def test_min_agreement_failure_writes_nothing(work):
    out = work / "never.onnx"
    code, _, err = onnxq("convert", work / "zoo.onnx", "-o", out, "--calib", work / "calib",
                         "--bits", 2, "--min-cosine", 0.99999999)
    assert code == 3 and "below --min-cosine" in err and not out.exists()


@slow
def test_max_rank_caps_every_branch(work):
    """The budget alone would give some layer of the zoo a rank above 1 (checked first)."""
    ranks = {}
    for cap in ("64", "1"):
        rep = work / f"cap{cap}.json"
        code, _, err = onnxq("convert", work / "zoo.onnx", "-o", work / f"cap{cap}.onnx", "--calib", work / "calib",
                             "--bits", 2, "--rank-budget", "0.5", "--branch-weighting", "layer",
                             "--max-rank", cap, "--report", rep, "-q")
        assert code == 0, err
        ranks[cap] = [l["branch_rank"] for l in json.loads(rep.read_text())["quantized"]]
    assert max(ranks["64"]) > 1
    assert max(ranks["1"]) == 1


def _bad_calib(work, name, **arrays):
    d = work / name
    d.mkdir(exist_ok=True)
    np.savez(d / "s0.npz", **arrays)
    return d


def bad_cases(work):
    x = np.zeros((1, 3, 12, 12), np.float32)
    (work / "text.onnx").write_text("this is not a model\n")
    (work / "trunc.onnx").write_bytes((work / "zoo.onnx").read_bytes()[:3000])
    old = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [1])], [vi("y", [1])], {}, opset=10)
    onnx.save(old, work / "old.onnx")
    (work / "empty").mkdir(exist_ok=True)
    nan = x.copy()
    nan[0, 0, 0, 0] = np.nan
    zoo, cal = work / "zoo.onnx", work / "calib"
    return {
        "missing file": (["convert", work / "nope.onnx"], "not found"),
        "not onnx": (["convert", work / "text.onnx"], "not"),
        "truncated": (["convert", work / "trunc.onnx"], "ONNX"),
        "opset 10": (["convert", work / "old.onnx"], "opset 10"),
        "wrong input name": (["convert", zoo, "--calib", _bad_calib(work, "n", y=x)], "missing model input"),
        "wrong rank": (["convert", zoo, "--calib", _bad_calib(work, "r", x=x[0])], "rank"),
        "wrong dtype": (["convert", zoo, "--calib", _bad_calib(work, "d", x=x.astype(np.int32))], "dtype"),
        "nan": (["convert", zoo, "--calib", _bad_calib(work, "nan", x=nan)], "NaN"),
        "empty folder": (["convert", zoo, "--calib", work / "empty"], "holds no"),
        "output folder missing": (["convert", zoo, "--calib", cal, "-o", work / "no" / "x.onnx"], "does not exist"),
        "output under a file": (["convert", zoo, "--calib", cal, "-o", zoo / "x.onnx"], "does not exist"),
        "output is input": (["convert", zoo, "--calib", cal, "-o", zoo], "equals the input"),
        "unknown method": (["convert", zoo, "--weight-method", "magic"], "known: rtn, mse, gptq"),
        "bad bits": (["convert", zoo, "--bits", "5"], "--bits"),
        "bad damping": (["convert", zoo, "--damp", "0"], "--damp"),
        "bad max rank": (["convert", zoo, "--rank-budget", "0.02", "--max-rank", "0"], "--max-rank"),
        "bad block": (["convert", zoo, "--block", "48"], "--block"),
    }


CASES = ["missing file", "not onnx", "truncated", "opset 10", "wrong input name", "wrong rank",
         "wrong dtype", "nan", "empty folder", "output folder missing", "output under a file", "output is input", "unknown method",
         "bad bits", "bad damping", "bad max rank", "bad block"]


@slow
@pytest.mark.parametrize("case", CASES)
def test_bad_input_one_line_nonzero_nothing_written(work, case):
    args, expect = bad_cases(work)[case]
    before = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()}
    code, _, err = onnxq(*args)
    line = one_line_error(code, _, err)
    assert expect in line
    after = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()}
    assert after == before                     # nothing written, input untouched


@slow
def test_external_data_model_converts(work, tmp_path):
    m = conv_zoo(np.random.default_rng(0))
    onnx.save(m, tmp_path / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    assert (tmp_path / "ext.onnx.data").stat().st_size > 1000
    code, _, err = onnxq("convert", tmp_path / "ext.onnx", "-o", tmp_path / "q.onnx", "--calib",
                         work / "calib", "-q")
    assert code == 0, err
    onnx.checker.check_model(onnx.load(tmp_path / "q.onnx"))


@slow
def test_verbose_prints_timestamped_stages_decisions_and_the_layer_table(work):
    code, stdout, err = onnxq("convert", work / "zoo.onnx", "-o", work / "v.onnx", "--bits", 4,
                              "--calib", work / "calib", "-v")
    assert code == 0, err
    stamped = [line for line in err.splitlines() if line[:2].isdigit() and line[2] == ":"]
    assert any("calibrate done in" in line for line in stamped), err
    assert any("layers to quantize" in line for line in stamped) and any("activation ranges:" in line for line in stamped)
    assert len([line for line in err.splitlines() if "calibrate done in" in line]) == 1     # once, not twice
    assert "layers" in stdout and "SQNR" in stdout
    code, _, err = onnxq("convert", work / "zoo.onnx", "-o", work / "v.onnx", "-q", "-v")
    assert code == 2 and "contradict" in err


@slow
def test_python_dash_m_onnxq_is_the_same_command_line(work):
    r = subprocess.run([sys.executable, "-m", "onnxq", "inspect", work / "zoo.onnx"], capture_output=True,
                       text=True, timeout=300)
    code, out, _ = onnxq("inspect", work / "zoo.onnx")
    assert r.returncode == code == 0 and r.stdout == out and "Conv" in out


def _two_matmuls(tmp_path, act: str, seed: int):
    """x [N, 64] -> MatMul -> `act` -> MatMul -> y [N, 8], saved; its path."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
             helper.make_node(act, ["h"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="down")]
    m = make_model(nodes, [vi("x", ["N", 64])], [vi("y", ["N", 8])],
                   {"w1": (rng.standard_normal((64, 96)) * 0.2).astype(np.float32),
                    "w2": (rng.standard_normal((96, 8)) * 0.2).astype(np.float32)})
    src = tmp_path / "mlp.onnx"
    onnx.save(m, src)
    return src


def test_exact_matmuls_name_the_session_entry_they_need(tmp_path):
    """An all-MatMul model at --bits 8 runs on fused kernels in a default session; with
    --exact-matmuls the summary names the entry that keeps their inputs float. ort-cpu, which
    writes its own kernels, refuses the flag in one line."""
    src = _two_matmuls(tmp_path, "Tanh", 1)
    code, stdout, err = onnxq("convert", src, "-o", tmp_path / "a.onnx", "--bits", 8)
    assert code == 0, err
    assert "onnxruntime session: default options" in stdout
    assert "rotated: 2 Gemm/MatMul inputs" in stdout           # the fused kernels round them per block
    code, stdout, err = onnxq("convert", src, "-o", tmp_path / "x.onnx", "--bits", 8, "--exact-matmuls")
    assert code == 0, err
    assert "onnxruntime session: session.disable_quant_qdq=1" in stdout and "rotated" not in stdout
    code, stdout, err = onnxq("convert", src, "-o", tmp_path / "n.onnx", "--bits", 8, "--no-rotate")
    assert code == 0 and "rotated" not in stdout, err
    code, stdout, err = onnxq("convert", src, "-o", tmp_path / "y.onnx", "--bits", 8, "--exact-matmuls",
                              "--target", "ort-cpu")
    assert code != 0 and "--exact-matmuls" in err and "Traceback" not in err and not (tmp_path / "y.onnx").exists()


def test_the_summary_says_when_8bit_weights_are_blocked(tmp_path):
    """An all-MatMul model at --bits 8: its weights take a scale per 32 values of K and the summary
    says so (and what it costs: opset 21); --no-block-8bit keeps one scale per column, no line."""
    src = _two_matmuls(tmp_path, "Relu", 0)
    code, stdout, err = onnxq("convert", src, "-o", tmp_path / "b.onnx", "--bits", 8)
    assert code == 0, err
    assert "8-bit blocks: 2 layers with a scale per 16 values along K" in stdout and "opset 21" in stdout
    code, stdout, err = onnxq("convert", src, "-o", tmp_path / "b32.onnx", "--bits", 8, "--block-8bit-size", 32)
    assert code == 0, err
    assert "8-bit blocks: 2 layers with a scale per 32 values along K" in stdout
    code, stdout, err = onnxq("convert", src, "-o", tmp_path / "c.onnx", "--bits", 8, "--no-block-8bit")
    assert code == 0, err
    assert "8-bit blocks" not in stdout and "quantized: 2 layers at 8 bits" in stdout
