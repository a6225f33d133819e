"""--act-method auto: each activation's range method chosen by its effect on the network's
outputs, kept only when it also helps on calibration samples the choice did not fit."""

from pathlib import Path

import pytest

import onnxq
from onnxq.plan.acts import SEARCH_START
from onnxq.search.choose import CANDIDATES

MODELS = Path(__file__).resolve().parents[1] / "models"
DIGITS, CALIB = str(MODELS / "digits_cnn.onnx"), str(MODELS / "digits_calib")


def scales(rep):
    return {a.tensor: a.scale for a in rep.activations}


@pytest.mark.parametrize("act_bits", [4, 8])
def test_choice_lowers_the_fitting_loss_and_is_kept_only_if_it_holds_on_unseen_samples(act_bits):
    # qnn: the Gemm layers read quantized inputs at 8 bits too (generic, ort-cpu and openvino run
    # them weight-only)
    cfg = dict(bits=8, act_bits=act_bits, target="qnn")
    _, auto = onnxq.convert(DIGITS, onnxq.ConvertConfig(act_method="auto", **cfg), calib=CALIB)
    # the ranges the choice starts from and falls back to (not the default's: at 8 bits that is
    # 'best', at 4 the interval rule)
    _, start = onnxq.convert(DIGITS, onnxq.ConvertConfig(act_method=SEARCH_START, **cfg), calib=CALIB)
    ch = auto.ranges
    assert ch is not None and ch.tensors == len(auto.activations)
    assert ch.loss_after <= ch.loss_before and ch.evaluations >= 1
    assert set(ch.changed.values()) <= set(CANDIDATES)
    if ch.kept:
        assert ch.check_after < ch.check_before
        changed = {a.tensor for a in auto.activations if a.method in ch.changed.values()}
        assert changed == set(ch.changed)
    else:                       # rejected (or nothing to try): exactly the start's ranges
        assert scales(auto) == pytest.approx(scales(start))
    if act_bits == 4:           # 4-bit activations: the candidates differ enough to be tried
        assert ch.tried > 0 and ch.changed and ch.loss_after < ch.loss_before


def test_cli_accepts_auto_and_reports_the_choice(cli_run, tmp_path):
    code, out, _ = cli_run("convert", DIGITS, "--bits", "8", "--act-bits", "4", "--act-method", "auto",
                           "--calib", CALIB, "-o", tmp_path / "a.onnx")
    assert code == 0 and "activation ranges chosen per tensor" in out
