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


def _x86_without_vnni() -> bool:
    """An x86 CPU without VNNI (AVX2, AVX-512 before VNNI), read from /proc/cpuinfo where there is one."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and "vnni" not in flags


@pytest.mark.parametrize("target", list(RULES))
@pytest.mark.parametrize("bits", [8, 4])
def test_openvino_runs_every_target_like_onnxruntime(tmp_path, target, bits):
    if target == "tensorrt" and _x86_without_vnni():
        # OpenVINO's own int8 kernels, not the graph: on an AVX2 EPYC its result on this target's
        # symmetric int8 activations reads 18.7 dB against onnxruntime's exact QDQ (> 25 dB on VNNI
        # CPUs, and on this CPU for every other target); TensorRT, the target's runtime, is a GPU's
        pytest.skip("OpenVINO's int8 kernels on an x86 CPU without VNNI read symmetric int8 activations "
                    "less exactly than onnxruntime (18.7 dB)")
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


def _conv_precisions(path: Path, shape: list[int]) -> list[str]:
    core = ov.Core()
    model = core.read_model(str(path))
    model.reshape({model.inputs[0].get_any_name(): ov.PartialShape(shape)})
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1})
    return [op.get_rt_info()["runtimePrecision"].astype(str) for op in compiled.get_runtime_model().get_ordered_ops()
            if op.get_rt_info()["layerType"].astype(str) in ("Convolution", "GroupConvolution")]


@pytest.mark.parametrize("bits", [8, 4])
def test_openvino_target_runs_every_conv_in_integer(tmp_path, bits):
    """Under --target openvino every quantized conv runs as a u8 kernel, also where several convs have
    equal zero-point vectors: a constant shared between two convs' weight dequantization made the
    plugin run them in float (13 of PP-OCR det's 62 convs)."""
    q, rep = onnxq.convert(str(ROOT / "models" / "digits_cnn.onnx"), onnxq.ConvertConfig(bits=bits, target="openvino"),
                           calib=str(ROOT / "models" / "digits_calib"))
    path = tmp_path / "q.onnx"
    onnxq.save(q, path)
    precisions = _conv_precisions(path, [1, 1, 28, 28])
    assert len(precisions) == sum(lr.op == "Conv" for lr in rep.quantized) == 5
    assert set(precisions) == {"u8"}, precisions


def _encoder(rng):
    """Token embedding (a 300-row table) -> MatMul -> Relu -> MatMul on ids [N, T] of dynamic
    shape: at 8 bits every weight is weight-only, so the table and the MatMuls are blocked."""
    from builders import make_model, vi
    from onnx import TensorProto, helper
    nodes = [helper.make_node("Gather", ["words", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "w1"], ["h"], name="up"),
             helper.make_node("Relu", ["h"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="down")]
    inits = {"words": (rng.standard_normal((300, 64)) * np.exp(rng.standard_normal((1, 64)))).astype(np.float32),
             "w1": (rng.standard_normal((64, 96)) * 0.2).astype(np.float32),
             "w2": (rng.standard_normal((96, 16)) * 0.2).astype(np.float32)}
    return make_model(nodes, [vi("ids", ["N", "T"], TensorProto.INT64)], [vi("y", ["N", "T", 16])], inits)


def _both_runtimes(tmp_path, q, rep, ids) -> tuple[np.ndarray, np.ndarray]:
    """(onnxruntime's output with the session options the conversion asks for, OpenVINO's in f32)
    of the converted encoder `q` on `ids`."""
    path = tmp_path / "q.onnx"
    onnxq.save(q, path)
    so = ort.SessionOptions()
    for k, v in rep.session_options.items():
        so.add_session_config_entry(k, v)
    want = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return want, compiled({"ids": ids})[compiled.output(0)]


@pytest.mark.parametrize("target", ["generic", "openvino"])
def test_openvino_runs_blocked_8bit_tables_and_matmuls_like_onnxruntime(tmp_path, target):
    rng = np.random.default_rng(7)
    m = _encoder(rng)
    calib = [{"ids": rng.integers(0, 300, (2, 9))} for _ in range(12)]
    q, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=8, target=target), calib=calib)
    # tables in blocks of 32 a row; MatMuls in blocks of 16 (every layer weight-only: api.fine_8bit_block)
    assert rep.config["block_8bit"] is True
    assert all(("blocks of 32" if l.op == "Gather" else "blocks of 16") in l.method for l in rep.quantized)
    ids = rng.integers(0, 300, (3, 11))
    want, got = _both_runtimes(tmp_path, q, rep, ids)
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    assert sqnr_db(want, got) > 30.0 and sqnr_db(ref, got) > 30.0


@pytest.mark.parametrize("target", ["generic", "openvino"])
def test_openvino_runs_4bit_tables_on_affine_blocks_like_onnxruntime(tmp_path, target):
    """At 4 bits the table's blocks sit on affine grids (a zero point a block): generic gathers
    codes and zero points (graph/tables.py), openvino keeps the blocked DequantizeLinear."""
    rng = np.random.default_rng(8)
    m = _encoder(rng)
    calib = [{"ids": rng.integers(0, 300, (2, 9))} for _ in range(12)]
    q, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=4, protect=0, target=target), calib=calib)
    table = next(l for l in rep.quantized if l.op == "Gather")
    assert table.bits == 4 and "zero points" in table.method
    want, got = _both_runtimes(tmp_path, q, rep, rng.integers(0, 300, (3, 11)))
    assert sqnr_db(want, got) > 30.0, sqnr_db(want, got)


@pytest.mark.parametrize("target", ["generic", "openvino"])
def test_openvino_looks_up_hot_rows_like_onnxruntime(tmp_path, target):
    """A 4-bit table's rows read in calibration come with a residual table looked up through a
    uint16 map (plan/hot.py): OpenVINO gathers them as onnxruntime does."""
    rng = np.random.default_rng(9)
    m = _encoder(rng)
    p = 1.0 / np.arange(1, 41)
    calib = [{"ids": rng.choice(40, size=(2, 9), p=p / p.sum()).astype(np.int64)} for _ in range(12)]
    q, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=4, target=target), calib=calib)
    table = next(l for l in rep.quantized if l.op == "Gather")
    assert "rows read in calibration corrected" in table.method
    ids = np.concatenate([rng.integers(0, 40, (3, 6)), rng.integers(40, 300, (3, 5))], axis=1)
    want, got = _both_runtimes(tmp_path, q, rep, ids)
    assert sqnr_db(want, got) > 30.0, sqnr_db(want, got)
