"""graph/io.py: loading with clear errors, atomic saving, output-path checks, input specs."""

import os
import stat

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxq.errors import InputModelError, OnnxqError, OutputError
from onnxq.graph.io import check_output_path, input_specs, load_model, opset_of, save_model
from builders import conv_zoo, make_model, vi


@pytest.fixture
def zoo():
    return conv_zoo(np.random.default_rng(0))


def relu(opset):
    return make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [1])], [vi("y", [1])], {}, opset=opset)


def test_load_model_reads_a_model_and_its_external_data(zoo, tmp_path):
    onnx.save(zoo, tmp_path / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    assert (tmp_path / "ext.onnx.data").stat().st_size > 1000      # (onnx.save moved zoo's data out)
    m = load_model(tmp_path / "ext.onnx")
    fresh = conv_zoo(np.random.default_rng(0))
    assert all(t.data_location != TensorProto.EXTERNAL for t in m.graph.initializer)
    got = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    want = {t.name: onnx.numpy_helper.to_array(t) for t in fresh.graph.initializer}
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert opset_of(m) == 13


def error_of(path) -> str:
    with pytest.raises(InputModelError) as e:
        load_model(path)
    assert isinstance(e.value, OnnxqError) and e.value.exit_code == 2
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg         # one line that names the file
    return msg


def test_load_model_errors_say_what_is_wrong(tmp_path):
    assert "not found" in error_of(tmp_path / "missing.onnx")
    (tmp_path / "folder.onnx").mkdir()
    assert "is a folder" in error_of(tmp_path / "folder.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert "empty file" in error_of(tmp_path / "empty.onnx")
    (tmp_path / "garbage.onnx").write_bytes(bytes(range(256)) * 8)
    msg = error_of(tmp_path / "garbage.onnx")
    assert "not a readable ONNX model" in msg or "not an ONNX model" in msg
    (tmp_path / "text.onnx").write_text("this is not a model\n")
    assert "ONNX model" in error_of(tmp_path / "text.onnx")


def test_load_model_refuses_opset_10_and_takes_11(tmp_path):
    onnx.save(relu(10), tmp_path / "old.onnx")
    msg = error_of(tmp_path / "old.onnx")
    assert "opset 10" in msg and "11 or newer" in msg
    onnx.save(relu(11), tmp_path / "ok.onnx")
    assert opset_of(load_model(tmp_path / "ok.onnx")) == 11


def test_missing_external_data_is_an_input_error(zoo, tmp_path):
    onnx.save(zoo, tmp_path / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    (tmp_path / "ext.onnx.data").unlink()
    assert "external data" in error_of(tmp_path / "ext.onnx")


def test_save_model_writes_atomically_with_mode_0644(zoo, tmp_path):
    out = tmp_path / "q.onnx"
    old = os.umask(0o077)            # a restrictive umask must not make the model private
    try:
        save_model(zoo, out)
    finally:
        os.umask(old)
    assert os.listdir(tmp_path) == ["q.onnx"]                      # no temporary file left behind
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert out.read_bytes() == zoo.SerializeToString(deterministic=True)
    save_model(relu(13), out)                                      # replaces an existing file
    assert os.listdir(tmp_path) == ["q.onnx"]
    assert onnx.load(out).graph.node[0].op_type == "Relu"


def test_save_model_that_cannot_rename_cleans_up_and_raises_output_error(zoo, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "inside").write_text("x")               # a non-empty folder cannot be replaced
    with pytest.raises(OutputError, match="could not write"):
        save_model(zoo, tmp_path / "taken")
    assert sorted(os.listdir(tmp_path)) == ["taken"]


def test_check_output_path(tmp_path, monkeypatch):
    src = tmp_path / "m.onnx"
    src.write_bytes(b"model")
    assert check_output_path(tmp_path / "q.onnx", src) == tmp_path / "q.onnx"
    assert check_output_path(tmp_path / "q.onnx", None) == tmp_path / "q.onnx"
    with pytest.raises(OutputError, match="equals the input"):
        check_output_path(src, src)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match="equals the input"):      # the same file spelled otherwise
        check_output_path("sub/../m.onnx", str(src))
    (tmp_path / "sub").mkdir()
    assert str(check_output_path("q.onnx", src)) == "q.onnx"        # a bare name: the current folder
    with pytest.raises(OutputError, match="does not exist"):
        check_output_path(tmp_path / "nope" / "q.onnx", src)
    with pytest.raises(OutputError, match="does not exist"):        # a file in place of the folder
        check_output_path(src / "q.onnx", None)
    with pytest.raises(OutputError, match="is a folder"):
        check_output_path(tmp_path / "sub", src)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_check_output_path_refuses_a_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="not writable"):
            check_output_path(ro / "q.onnx", None)
    finally:
        ro.chmod(0o755)


def test_input_specs_dynamic_dims_are_none_and_initializers_are_not_inputs():
    g = helper.make_graph(
        [helper.make_node("Add", ["x", "k"], ["s"]), helper.make_node("Cast", ["ids"], ["c"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["s", "c"], ["y"])], "g",
        [vi("x", ["N", 3, None, 7]), vi("ids", [2, 1, 1, 7], TensorProto.INT64), vi("k", [7])],
        [vi("y", ["N", 3, None, 7])], [onnx.numpy_helper.from_array(np.ones(7, np.float32), "k")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    specs = input_specs(m)
    assert [s.name for s in specs] == ["x", "ids"]
    x, ids = specs
    assert x.dtype == np.float32 and x.shape == (None, 3, None, 7) and x.rank == 4
    assert ids.dtype == np.int64 and ids.shape == (2, 1, 1, 7)
    zero = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [vi("x", [0, 4])], [vi("y", [0, 4])])
    assert input_specs(helper.make_model(zero))[0].shape == (None, 4)    # a 0 dimension is not a size


def test_input_specs_refuse_a_non_tensor_input():
    seq = helper.make_tensor_sequence_value_info("xs", TensorProto.FLOAT, [2])
    g = helper.make_graph([helper.make_node("SequenceLength", ["xs"], ["n"])], "g", [seq],
                          [vi("n", [], TensorProto.INT64)])
    with pytest.raises(InputModelError, match="not a tensor"):
        input_specs(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]))
