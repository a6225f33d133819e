"""A seeded mutator over the real test models: every mutant gives exit 0 with a valid model, or
one `onnxq: error:` line with a documented exit code — never a traceback or an internal error.
Run in process (no interpreter start-up per mutant), a fixed number of mutants per model."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from realdata import ocr_path

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTED = {0, 2, 3}
pytestmark = pytest.mark.slow


def _mutate(model: onnx.ModelProto, rng: np.random.Generator) -> bytes:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    kind = int(rng.integers(10))
    node = g.node[int(rng.integers(len(g.node)))]
    if kind == 0:                                   # a node dropped
        g.node.remove(node)
    elif kind == 1:                                 # an input renamed to something that does not exist
        if node.input:
            node.input[int(rng.integers(len(node.input)))] = "ghost"
    elif kind == 2 and node.attribute:              # an attribute set to a random integer
        a = node.attribute[int(rng.integers(len(node.attribute)))]
        if a.type == onnx.AttributeProto.INTS and a.ints:
            a.ints[int(rng.integers(len(a.ints)))] = int(rng.integers(-3, 9))
        elif a.type == onnx.AttributeProto.INT:
            a.i = int(rng.integers(-3, 9))
    elif kind == 3 and g.initializer:               # an initializer's shape changed
        t = g.initializer[int(rng.integers(len(g.initializer)))]
        if t.dims:
            t.dims[int(rng.integers(len(t.dims)))] += int(rng.integers(1, 3))
    elif kind == 4:                                 # the opset changed
        m.opset_import[0].version = int(rng.integers(1, 26))
    elif kind == 5:                                 # an op type changed
        node.op_type = str(rng.choice(["Relu", "Conv", "MatMul", "Softmax", "Nope"]))
    elif kind == 6 and g.initializer:               # an initializer removed
        g.initializer.remove(g.initializer[int(rng.integers(len(g.initializer)))])
    elif kind == 7:                                 # the input's rank changed
        g.input[0].type.tensor_type.shape.dim.add().dim_value = 1
    elif kind == 8:                                 # a node duplicated (two producers of one tensor)
        g.node.append(helper.make_node(node.op_type, list(node.input), list(node.output)))
    data = bytearray(m.SerializeToString())
    if kind == 9 or rng.random() < 0.2:             # raw bytes flipped, or the file cut short
        if rng.random() < 0.5:
            for i in rng.integers(0, len(data), int(rng.integers(1, 4))):
                data[i] ^= int(rng.integers(1, 256))
        else:
            data = data[:int(rng.integers(1, len(data)))]
    return bytes(data)


@pytest.mark.parametrize("source, mutants", [("digits", 600), ("cls", 6)])
def test_mutated_models_fail_cleanly_or_convert_to_valid_models(tmp_path, cli_run, source, mutants):
    if source == "digits":
        model, data = onnx.load(str(ROOT / "models" / "digits_cnn.onnx")), ["--calib", ROOT / "models" / "digits_calib"]
    else:                                      # PP-OCR cls on random inputs (the warning says so)
        model, data = onnx.load(str(ocr_path("cls"))), []
    rng = np.random.default_rng(2026)
    outcomes = {}
    for seen in range(mutants):
        path, out = tmp_path / f"m{seen}.onnx", tmp_path / f"m{seen}.q.onnx"
        path.write_bytes(_mutate(model, rng))
        code, _, err = cli_run("convert", path, "-o", out, *data, "-q", "--bits", 4)
        assert code in DOCUMENTED, (seen, code, err)
        assert "Traceback" not in err and "internal error" not in err, (seen, err)
        if code == 0:
            onnx.checker.check_model(onnx.load(str(out)))
        else:
            errors = [l for l in err.splitlines() if l.startswith("onnxq: error:")]
            assert len(errors) == 1 and not out.exists(), (seen, err)
        outcomes[code] = outcomes.get(code, 0) + 1
    assert outcomes.get(2, 0) > 0, outcomes            # the mutator does break models
