"""onnxq inspect: every layer name it lists is one --bits-override and --exclude accept, with
the bits convert then gives; --json is machine-readable."""

import json
from pathlib import Path

import onnxq
from onnxq import api

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "models" / "digits_cnn.onnx")


def test_inspect_lists_the_names_convert_uses_with_their_bits():
    info = api.inspect(DIGITS)
    names = [l.node for l in info.layers]
    calib = str(ROOT / "models" / "digits_calib")
    _, rep = onnxq.convert(DIGITS, onnxq.ConvertConfig(bits=4, protect=0), calib=calib)
    assert names == [l.node for l in rep.quantized]
    assert [l.bits for l in info.layers] == [l.bits for l in rep.quantized]
    # protection (on by default) only raises the layers it names to 8 bits
    _, prot = onnxq.convert(DIGITS, onnxq.ConvertConfig(bits=4), calib=calib)
    raised = {l.node for l, i in zip(prot.quantized, info.layers) if l.bits != i.bits}
    assert raised == set(prot.protect.protected) and all(l.bits == 8 for l in prot.quantized if l.node in raised)
    first = names[0]
    over = api.inspect(DIGITS, onnxq.ConvertConfig(bits=4, bits_overrides=((first, 8),)))
    assert over.layers[0].bits == 8 and all(l.bits == b.bits for l, b in zip(over.layers[1:], info.layers[1:]))
    excluded = api.inspect(DIGITS, onnxq.ConvertConfig(exclude=(first,)))
    assert first not in [l.node for l in excluded.layers]
    assert [(s.node, s.reason) for s in excluded.skipped] == [(first, "excluded by --exclude")]
    assert info.inputs[0].name == "input" and info.inputs[0].shape == ["N", 1, 8, 8]


def test_inspect_json(cli_run):
    code, out, _ = cli_run("inspect", DIGITS, "--json")
    assert code == 0
    data = json.loads(out)
    assert len(data["layers"]) == 7 and data["outputs"][0]["name"] == "logits"
    assert data["float_ops"]["Relu"] == 6
