"""Hot rows (plan/hot.py): at <= 4 bits the rows of an embedding table that calibration read are
corrected by a small residual table looked up beside the table, paid from --protect's budget."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import make_model, vi
from onnx import TensorProto, helper

import onnxq
from onnxq.types import Stats

V, D = 3000, 256


def encoder(rng, v: int = V, d: int = D):
    """ids -> a v-row table -> MatMul; the looked-up rows are an output too."""
    nodes = [helper.make_node("Gather", ["words", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "w"], ["y"], name="proj")]
    inits = {"words": (rng.standard_normal((v, d)) * np.exp(0.5 * rng.standard_normal((1, d)))).astype(np.float32),
             "w": (rng.standard_normal((d, 32)) * 0.2).astype(np.float32)}
    return make_model(nodes, [vi("ids", ["N", "T"], TensorProto.INT64)], [vi("e", ["N", "T", d]), vi("y", ["N", "T", 32])],
                      inits)


def convert(m, calib, rng, **cfg):
    """A conversion whose held-out check has samples of its own: every calibration sample is read."""
    return onnxq.convert(m, onnxq.ConvertConfig(**cfg), calib=calib, holdout=text_like(rng, 4))


def text_like(rng, n: int, top: int = 60) -> list[dict]:
    """Samples whose ids come from the first `top` rows, the common ones first (a Zipf law), as
    the words of a text do."""
    p = 1.0 / np.arange(1, top + 1)
    return [{"ids": rng.choice(top, size=(1, 12), p=p / p.sum()).astype(np.int64)} for _ in range(n)]


def _rows(model: onnx.ModelProto, ids: np.ndarray, options: dict | None = None) -> np.ndarray:
    so = ort.SessionOptions()
    for k, v in (options or {}).items():
        so.add_session_config_entry(k, v)
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(["e"], {"ids": ids.reshape(1, -1)})[0][0]


def _db(ref: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2)))


@pytest.mark.parametrize("target", ["generic", "ort-cpu", "openvino"])
def test_rows_read_in_calibration_come_out_closer_and_the_others_as_before(target):
    rng = np.random.default_rng(0)
    m, calib = encoder(rng), text_like(rng, 24)
    q, rep = convert(m, calib, rng, bits=4, target=target)
    plain, _ = convert(m, calib, rng, bits=4, target=target, hot_rows=False)
    table = next(l for l in rep.quantized if l.op == "Gather")
    assert table.bits == 4 and "rows read in calibration corrected" in table.method
    read = np.unique(np.concatenate([f["ids"].ravel() for f in calib]))
    cold = np.setdiff1d(np.arange(V), np.arange(60))
    ref = onnx.numpy_helper.to_array(m.graph.initializer[0])
    hot_db, cold_db = _db(ref[read], _rows(q, read, rep.session_options)), _db(ref[cold], _rows(q, cold, rep.session_options))
    assert hot_db > cold_db + 12.0 and cold_db > 15.0, (hot_db, cold_db)
    # the other rows look up exactly what they do without the residual table
    np.testing.assert_array_equal(_rows(q, cold, rep.session_options), _rows(plain, cold, rep.session_options))
    assert any(n.name == "embed/hot/add" for n in q.graph.node)
    # the residual is looked up as the target looks up tables: onnxruntime's kernel under ort-cpu,
    # 8-bit codes a row under generic (a few plain ops), a DequantizeLinear folded at load under openvino
    hot = next(n for n in q.graph.node if n.name == "embed/hot")
    assert (hot.op_type, hot.input[0]) == {"ort-cpu": ("GatherBlockQuantized", "embed/hot/weight_q"),
                                           "generic": ("Gather", "embed/hot/weight_q"),
                                           "openvino": ("Gather", "embed/hot/weight_dq")}[target], (hot.op_type, hot.input)


def test_the_hot_rows_are_paid_from_the_protect_budget():
    rng = np.random.default_rng(1)
    m, calib = encoder(rng), text_like(rng, 24)
    q, rep = convert(m, calib, rng, bits=4)
    _, plain = convert(m, calib, rng, bits=4, hot_rows=False)
    n = len(np.unique(np.concatenate([f["ids"].ravel() for f in calib])))
    # the map (uint16 a table row) and the residual table, which generic looks up on its codes:
    # 8-bit codes and a float32 scale a row, for the n rows and the zero row
    paid = 2 * V + (n + 1) * (D + 4)
    assert plain.protect.budget_bytes - rep.protect.budget_bytes == pytest.approx(paid)
    stored = {t.name: t for t in q.graph.initializer if t.name.startswith("embed/hot/")}
    assert stored["embed/hot/map"].data_type == TensorProto.UINT16 and list(stored["embed/hot/map"].dims) == [V]
    assert list(stored["embed/hot/weight_q"].dims) == [n + 1, D]
    assert stored["embed/hot/weight_q"].data_type == TensorProto.INT8
    # the table's harm, by which the budget weighs raising it, is measured without its hot rows: the
    # harm samples are calibration samples, whose rows are all hot
    assert rep.protect.harm["embed"] == pytest.approx(plain.protect.harm["embed"]) and rep.protect.harm["embed"] > 0


@pytest.mark.parametrize("why", ["no protect", "switched off", "most rows read", "8 bits"])
def test_no_hot_rows_without_a_budget_or_where_calibration_reads_most_of_the_table(why):
    rng = np.random.default_rng(2)
    most = why == "most rows read"          # 24 x 12 ids drawn from 600 rows: about 40% of them
    m = encoder(rng, 600, 64) if most else encoder(rng)
    calib = [{"ids": rng.integers(0, 600, (1, 12))} for _ in range(24)] if most else text_like(rng, 24)
    cfg = {"no protect": dict(bits=4, protect=0.0), "switched off": dict(bits=4, hot_rows=False),
           "most rows read": dict(bits=4), "8 bits": dict(bits=8)}[why]
    q, rep = convert(m, calib, rng, **cfg)
    assert "rows read" not in next(l for l in rep.quantized if l.op == "Gather").method
    assert not any("/hot" in n.name for n in q.graph.node)


def test_saved_statistics_keep_each_tables_reads(tmp_path):
    rng = np.random.default_rng(3)
    m, calib = encoder(rng), text_like(rng, 24)
    path = str(tmp_path / "stats.npz")
    held = text_like(rng, 4)
    q, _ = onnxq.convert(m, onnxq.ConvertConfig(bits=4), calib=calib, holdout=held, save_stats=path)
    st = Stats.load(path)
    expected = np.bincount(np.concatenate([f["ids"].ravel() for f in calib]), minlength=V)
    np.testing.assert_array_equal(st.layers["embed"].reads, expected)
    again, _ = onnxq.convert(m, onnxq.ConvertConfig(bits=4), calib=calib, holdout=held, stats=path)
    assert again.SerializeToString() == q.SerializeToString()


def test_hot_rows_take_at_most_a_quarter_of_the_budget_the_most_read_rows_first():
    """A small model: the map alone is a sizeable share of its budget, so only the most read rows
    are kept (search/protect.cap_hot_rows)."""
    rng = np.random.default_rng(4)
    m, calib = encoder(rng, 600, 64), text_like(rng, 24)
    q, rep = convert(m, calib, rng, bits=4)
    _, plain = convert(m, calib, rng, bits=4, hot_rows=False)
    counts = np.bincount(np.concatenate([f["ids"].ravel() for f in calib]), minlength=600)
    kept = next(l for l in rep.quantized if l.op == "Gather").hot_rows
    assert 0 < kept < np.count_nonzero(counts)
    mapped = onnx.numpy_helper.to_array(next(t for t in q.graph.initializer if t.name == "embed/hot/map"))
    rows = np.flatnonzero(mapped)
    assert len(rows) == kept and counts[rows].min() >= np.sort(counts)[::-1][kept - 1]   # the most read
    # what they take (the budget without them less the one with them) is within a quarter of the budget
    assert 0 < plain.protect.budget_bytes - rep.protect.budget_bytes <= 0.25 * plain.protect.budget_bytes
