"""The external-data paths that models over the 2 GiB protobuf limit take, exercised on the
digits CNN with the size threshold lowered: sessions, the checker and the output all go through
external data, the model in memory keeps its weights, and no temporary file or folder is left."""

import dataclasses
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
    # weights left on disk are planned layer group by layer group, without the network probes of
    # protection and the rounding choice: the in-memory path without them gives the same model
    # sequential mode off: it is skipped by default for weights on disk, like protection
    cfg = onnxq.ConvertConfig(bits=bits, protect=0.0, weight_method="gptq" if bits < 8 else "auto", sequential=False)
    small, _ = onnxq.convert(str(ROOT / "models" / "digits_cnn.onnx"), cfg, calib=calib)
    before = _leftovers()
    monkeypatch.setattr(large, "EXTERNAL_THRESHOLD", 1000)
    q, rep = onnxq.convert(str(folder / "m.onnx"), cfg, calib=calib)
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


def test_8bit_matmuls_left_on_disk_keep_the_blocks_clipping(tmp_path, monkeypatch):
    """An 8-bit conversion of a MatMul stack rounds its blocked weights second-order when they are
    in memory, and by the blocks' clipping alone when they stay on disk (a K x K moment a layer
    and its factorisation, for a 1 dB refinement, is not spent on a model over the threshold)."""
    from builders import matmul_stack
    src, _ = matmul_stack(tmp_path, 3, 64)
    rng = np.random.default_rng(2)
    calib = [{"x": rng.standard_normal((1, 8, 64)).astype(np.float32)} for _ in range(8)]
    cfg = onnxq.ConvertConfig(bits=8, act_bits=32)
    _, rep = onnxq.convert(str(src), cfg, calib=calib)
    assert rep.config["gptq_8bit_matmul"] is True and {l.method for l in rep.quantized} == {"gptq (blocks of 16)"}
    monkeypatch.setattr(large, "EXTERNAL_THRESHOLD", 1000)
    _, rep = onnxq.convert(str(src), cfg, calib=calib)
    assert rep.config["block_8bit"] is True and rep.config["gptq_8bit_matmul"] is False
    assert {l.method for l in rep.quantized} == {"mse (blocks of 16)"}
    _, rep = onnxq.convert(str(src), dataclasses.replace(cfg, gptq_8bit_matmul=True), calib=calib)
    assert {l.method for l in rep.quantized} == {"gptq (blocks of 16)"}        # asked for: done on disk too


@pytest.mark.parametrize("method", [None, "rtn"])
def test_weights_on_disk_skip_the_probes_that_would_load_them_all_and_say_so(tmp_path, monkeypatch, method):
    """With second-order rounding calibration is chunked; with rtn it is not, and the probes
    must be skipped all the same."""
    src = onnx.load(str(ROOT / "models" / "digits_cnn.onnx"))
    onnx.save_model(src, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.onnx.data",
                    size_threshold=0)
    monkeypatch.setattr(large, "EXTERNAL_THRESHOLD", 1000)
    q, rep = onnxq.convert(str(tmp_path / "m.onnx"), onnxq.ConvertConfig(bits=4, weight_method=method),
                           calib=str(ROOT / "models" / "digits_calib"))
    assert rep.protect is None and rep.rounding is None
    assert any("protection of sensitive layers" in w and "stay on disk" in w for w in rep.warnings)
    assert rep.fidelity.top1_agreement > 0.9


@pytest.mark.slow
def test_a_model_over_2_gib_converts_at_8_bits_within_twice_its_weights_in_memory(tmp_path):
    """The real thing, built on the fly (pytest removes it): 2.15 GB of MatMul weights in external
    data, converted by the command line in a child process whose peak RSS the kernel reports.
    Weight-only and 32 blocks, so the answer can be held to FP32's: the error of random residual
    blocks adds up along the stream (128 blocks of 2048 read cosine 0.91 at W8A8 and SQNR 10 dB
    weight-only; the W8A8 peak memory, 1.54x the weights at 2.55 GB, is in
    benchmarks/large_model.py)."""
    import os
    import subprocess
    import sys

    from builders import matmul_stack

    src, weight_bytes = matmul_stack(tmp_path, 32, 4096)
    assert weight_bytes > 2**31                                   # past the protobuf limit
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        np.savez(calib / f"s{i}.npz", x=rng.standard_normal((1, 8, 4096)).astype(np.float32))
    out = tmp_path / "out" / "big.q.onnx"
    out.parent.mkdir()
    before = _leftovers()
    with open(tmp_path / "stderr", "w") as err:
        p = subprocess.Popen([sys.executable, "-m", "onnxq", "convert", str(src), "--bits", "8", "--calib",
                              str(calib), "--act-bits", "32", "-o", str(out), "-q"], stderr=err)
        _, status, usage = os.wait4(p.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, (tmp_path / "stderr").read_text()
    assert usage.ru_maxrss * 1024 <= 2 * weight_bytes              # peak RSS (kB) within twice the weights
    assert sorted(x.name for x in out.parent.iterdir()) == ["big.q.onnx", "big.q.onnx.data"]
    assert _leftovers() == before
    feed = {"x": rng.standard_normal((1, 8, 4096)).astype(np.float32)}
    got = ort.InferenceSession(str(out)).run(None, feed)[0].ravel()
    want = ort.InferenceSession(str(src)).run(None, feed)[0].ravel()
    assert got @ want / (np.linalg.norm(got) * np.linalg.norm(want)) > 0.99


def test_a_large_4_bit_model_never_holds_all_its_dequantized_weights_at_once(tmp_path, monkeypatch):
    """onnxruntime's default order runs every weight's DequantizeLinear before any MatMul (they
    read only constants): a 4-bit stack ran with 2.4x its float weights resident. The sessions
    onnxq opens on a large model must dequantize each weight next to its reader. W4A8: a
    weight-only 4-bit DequantizeLinear -> MatMul is fused by onnxruntime and never showed it."""
    import subprocess
    import sys

    from builders import matmul_stack

    src, weight_bytes = matmul_stack(tmp_path, 24, 1024)            # 0.1 GB of float weights
    monkeypatch.setattr(large, "EXTERNAL_THRESHOLD", 1000)
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 4, 1024)).astype(np.float32)} for i in range(3)]
    q, _ = onnxq.convert(str(src), onnxq.ConvertConfig(bits=4, weight_method="rtn", protect=0.0),
                         calib=feeds)
    out = tmp_path / "q" / "big.q.onnx"
    out.parent.mkdir()
    onnxq.save(q, out)
    # the peak is reset after the session is built (VmHWM, /proc/self/clear_refs): running alone is measured
    child = ("import sys, re, numpy as np, onnx; import onnxq.graph.large as L; L.EXTERNAL_THRESHOLD = 1000\n"
             "from onnxq.runtime import session\n"
             "s = session(onnx.load(sys.argv[1]))\n"
             "hwm = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]) * 1024\n"
             "open('/proc/self/clear_refs', 'w').write('5')\n"
             "before = hwm()\n"
             "s.run(None, {'x': np.ones((1, 4, 1024), np.float32)})\n"
             "print(hwm() - before)\n")
    grown = int(subprocess.run([sys.executable, "-c", child, str(out)], capture_output=True, text=True,
                               check=True).stdout)
    assert grown < 0.6 * weight_bytes, f"running grew RSS by {grown / weight_bytes:.2f}x the float weights"
