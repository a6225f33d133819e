"""--protect: at 4 bits the layers that harm the network most are kept at 8 bits within a stated
share of the weight bytes, only when that helps on samples the choice was not made on."""

import re
from pathlib import Path

import pytest

import onnxq
from onnxq.errors import ConfigError

MODELS = Path(__file__).resolve().parents[1] / "models"
DIGITS, CALIB = str(MODELS / "digits_cnn.onnx"), str(MODELS / "digits_calib")


def convert(**cfg):
    return onnxq.convert(DIGITS, onnxq.ConvertConfig(**cfg), calib=CALIB)


@pytest.fixture(scope="module")
def pair():
    return convert(bits=4), convert(bits=4, protect=0)


def test_protected_layers_stay_in_budget_and_help_on_unseen_samples(pair):
    (q, rep), (q0, rep0) = pair
    p = rep.protect
    assert p is not None and rep0.protect is None
    low = [l for l in rep0.quantized if l.bits == 4]
    assert set(p.harm) == {l.node for l in low}           # every low-bit layer measured
    assert p.protected and 0 < p.used_bytes <= p.budget_bytes
    assert p.check_after < p.check_before
    by_node = {l.node: l for l in rep.quantized}
    assert all(by_node[n].bits == 8 and by_node[n].note.startswith("protected") for n in p.protected)
    assert all(by_node[l.node].bits == 4 for l in low if l.node not in p.protected)
    # the most harmful layer per byte is among the protected
    assert max(p.harm, key=lambda n: p.harm[n] / next(l.params for l in low if l.node == n)) in p.protected
    # the weights grow by the protected layers' extra bytes, not more
    weight_bytes = lambda m: sum(t.ByteSize() for t in m.graph.initializer if "/weight_" in t.name)  # noqa: E731
    assert weight_bytes(q) - weight_bytes(q0) <= p.used_bytes + 64 * len(p.protected)
    # and the file by those and, for a protected Gemm that read a float input at 4 bits (weight-only
    # under generic), by its input's Q/DQ pair and int32 bias (a few hundred bytes of names here)
    now_quantized = sum(l.node in p.protected and l.activation_bits == 32 for l in rep0.quantized)
    assert rep.size_after - rep0.size_after <= p.used_bytes + 64 * len(p.protected) + 700 * now_quantized
    assert rep.fidelity.sqnr_db > rep0.fidelity.sqnr_db


def test_the_rounding_the_network_prefers_is_kept():
    _, rep = convert(bits=4, weight_method="auto")
    ro = rep.rounding
    assert set(ro.losses) == {"gptq", "mse"} and ro.samples > 0
    assert ro.losses[ro.chosen] == min(ro.losses.values())
    low = [l for l in rep.quantized if l.bits == 4]
    assert low and all(l.method.split("+")[0] == ro.chosen for l in low)     # sequential may add "+compensated"


def test_a_chosen_weight_method_is_not_second_guessed(pair):
    (_, default), _ = pair
    _, rep = convert(bits=4, weight_method="rtn")
    assert rep.rounding is None is default.rounding and all(l.method.split("+")[0] in ("rtn", "mse") for l in rep.quantized)


@pytest.mark.parametrize("cfg", [dict(bits=8), dict(bits=4, protect=0), dict(bits=4, avg_bits=4.5)])
def test_no_protection_at_8_bits_when_off_or_when_bits_are_chosen_otherwise(cfg):
    _, rep = convert(**cfg)
    assert rep.protect is None
    assert not any(l.note.startswith("protected") for l in rep.quantized)


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_protect_must_be_a_fraction(value):
    with pytest.raises(ConfigError, match="--protect"):
        onnxq.ConvertConfig(protect=value)


def test_cli_reports_protection_and_no_protect_turns_it_off(cli_run, tmp_path):
    code, out, _ = cli_run("convert", DIGITS, "--bits", "4", "--calib", CALIB, "-o", tmp_path / "a.onnx")
    assert code == 0 and "protected:" in out and re.search(r"protected: \d+ layers? kept at 8 bits", out)
    code, out, _ = cli_run("convert", DIGITS, "--bits", "4", "--no-protect", "--calib", CALIB, "-o", tmp_path / "b.onnx")
    assert code == 0 and "protected" not in out


def test_nothing_to_protect_converts_and_says_so_in_the_log(caplog):
    """Every layer overridden to 8 bits: --protect has no low-bit layer to weigh (this crashed the
    verbose log line once)."""
    import logging
    with caplog.at_level(logging.INFO, logger="onnxq"):
        _, rep = convert(bits=4, bits_overrides=(("*", 8),))
    assert {l.bits for l in rep.quantized} == {8} and rep.protect is None
    assert any("activation ranges" in r.message for r in caplog.records)


def test_sequential_mode_codes_again_the_layers_protection_chose(pair):
    """Sequential mode starts from the one-pass plan, protected layers included: it changes codes,
    never bits."""
    (_, rep), _ = pair
    _, seq = convert(bits=4, sequential=True, stages=2)
    assert seq.protect is not None and seq.protect.protected == rep.protect.protected
    assert {l.node: l.bits for l in seq.quantized} == {l.node: l.bits for l in rep.quantized}
    assert any("+compensated" in l.method for l in seq.quantized)


def test_cli_reports_sequential_mode_by_default_at_w4a8_and_no_sequential_turns_it_off(cli_run, tmp_path):
    code, out, _ = cli_run("convert", DIGITS, "--bits", "4", "--calib", CALIB, "-o", tmp_path / "a.onnx")
    line = next(x for x in out.splitlines() if x.strip().startswith("sequential:"))
    assert code == 0 and "coded again on their quantized input, in stages of whole levels of layers" in line and "% of the compensation" in line
    code, out, _ = cli_run("convert", DIGITS, "--bits", "4", "--no-sequential", "--calib", CALIB,
                           "-o", tmp_path / "b.onnx")
    assert code == 0 and "sequential:" not in out
    code, out, _ = cli_run("convert", DIGITS, "--bits", "8", "--calib", CALIB, "-o", tmp_path / "c.onnx")
    assert code == 0 and "sequential:" not in out         # off by default at 8 bits


def test_the_default_budget_is_wider_where_every_layer_reads_a_float_input():
    """--protect unset: 0.28 of the low-bit bytes for a model whose every layer is weight-only at
    4 and 8 bits (an encoder at W4A8: its 8-bit layers add no activation rounding), 0.18 for a
    convnet; a given value is kept either way."""
    import numpy as np
    from test_rotate import encoder_block, feeds

    from onnxq.config import ENCODER_PROTECT, PROTECT
    rng = np.random.default_rng(5)
    enc, cal = encoder_block(rng), feeds(rng, 8, loud=(3,))
    assert (ENCODER_PROTECT, PROTECT) == (0.28, 0.18)
    _, rep = onnxq.convert(enc, onnxq.ConvertConfig(bits=4), calib=cal)
    assert rep.config["protect"] == ENCODER_PROTECT
    _, rep = onnxq.convert(enc, onnxq.ConvertConfig(bits=4, protect=0.18), calib=cal)
    assert rep.config["protect"] == 0.18
    _, rep = convert(bits=4)
    assert rep.config["protect"] == PROTECT


def _convert_chain(shared: bool, block: int = 32, protect: float = 1.0):
    """W4A8 of six Gemm steps (test_matmul_gemms._chain), reading one weight or one each, with the
    whole weight bytes as --protect's budget by default."""
    import numpy as np
    from test_matmul_gemms import _chain
    feeds = [{"x": np.random.default_rng(s).standard_normal((4, 64)).astype(np.float32)} for s in range(8)]
    return onnxq.convert(_chain(shared), onnxq.ConvertConfig(bits=4, protect=protect, block=block), calib=feeds)


def test_a_weight_several_layers_read_is_raised_for_all_of_them_at_once():
    """Six Gemm steps read one weight: raising one reader alone would store the weight once per
    reader, past what the budget counts, so the six are weighed as one (one harm, the weight's
    bytes counted once) and, the budget covering the weight at 8 bits, raised together; the weight
    stays stored once."""
    q, rep = _convert_chain(True)
    p = rep.protect
    assert p is not None and list(p.harm) == ["step0"] and p.harm["step0"] > 0
    assert p.protected == [f"step{i}" for i in range(6)] and p.check_after < p.check_before
    assert rep.shared_weights == 1 and {x.bits for x in rep.quantized} == {8}
    assert sum("weight_q" in i.name for i in q.graph.initializer) == 1


def test_a_weight_several_layers_read_counts_once_in_the_budget():
    """The budget is a share of the bytes the weights are stored in: six steps reading one weight
    store it once, so their budget is a sixth of six steps with a weight each. (Counted once per
    reader, a model's blocked readers of one weight had their blocks' bytes counted as often, and
    the CRNN reader's unrolled LSTM left it no budget at all: docs/results.md, round 45.) Per-channel
    scales: blocks the budget does not buy (a shared weight's) would be taken off one side only."""
    budget = {shared: _convert_chain(shared, 0)[1].protect.budget_bytes for shared in (True, False)}
    assert budget[False] > 0 and budget[True] == pytest.approx(budget[False] / 6)


def test_a_layer_kept_per_channel_stays_per_channel_when_sequential_mode_codes_it_again():
    """Sequential mode codes a layer again on its quantized input on the grid its plan settled
    (search/sequential.py passes the plan's block): a layer of a blocked conversion that --protect
    kept per channel is not given its blocks back, and a blocked one keeps them."""
    import numpy as np

    from onnxq.plan.layers import plan_compensated
    from onnxq.types import LayerStats, PairedStats, Target
    rng = np.random.default_rng(0)
    o, k, n = 16, 64, 2000
    x = rng.standard_normal((n, k))
    xq = x + rng.uniform(-0.1, 0.1, x.shape)
    w = rng.standard_normal((o, k)) * 0.2
    t = Target("n", "Gemm", "", "w", "x", None, "rows", (o, k))
    ps = PairedStats(LayerStats((xq.T @ xq / n)[None], xq.mean(0)[None], n), (x.T @ xq / n)[None], x.mean(0)[None])
    cfg = onnxq.ConvertConfig(bits=4)
    assert cfg.block == 32
    blocked, flat = (plan_compensated(t, w, np.zeros(o), ps, cfg, block=b) for b in (None, 0))
    assert blocked.block == 32 and blocked.scales.size == o * k // 32 and "blocks of 32" in blocked.method
    assert flat.block == 0 and flat.scales.size == o and "blocks" not in flat.method


def test_a_layer_options_worth_buying_lie_on_its_lower_hull():
    """An option that costs more and removes no harm, or removes it at a better rate only by way
    of a dearer one, is never bought on its own: the hull keeps the cheapest, then the options
    whose harm per byte falls the least steeply last."""
    from onnxq.search.protect import lower_hull
    opts = [(0.0, 10.0, "flat"), (5.0, 9.0, "blocks"), (6.0, 2.0, "other"), (7.0, 2.5, "worse"), (20.0, 0.0, "8 bits")]
    assert [o[2] for o in lower_hull(opts)] == ["flat", "other", "8 bits"]
    # a blocked layer whose blocks remove much per byte keeps them as a step before its 8 bits
    assert [o[2] for o in lower_hull([(0.0, 4.0, "flat"), (1.0, 1.0, "blocks"), (10.0, 0.0, "8 bits")])] == \
        ["flat", "blocks", "8 bits"]


def test_the_budget_buys_the_most_harm_per_byte_first_and_only_what_fits():
    """Two layers: a's blocks remove 3 per byte, b's 8 bits 1 per byte, a's 8 bits after its blocks
    1/9 per byte; a budget of 5 bytes buys a's blocks (1) and not b's 8 bits (5 more), but a's 8
    bits past its blocks do not fit either; 7 bytes buy both of the first; a step that removes no
    harm is never bought."""
    from onnxq.search.protect import buy
    opts = {"a": [(0.0, 4.0, "flat"), (1.0, 1.0, "blocks"), (10.0, 0.0, "8 bits")],
            "b": [(0.0, 5.0, "low"), (5.0, 0.0, "8 bits")],
            "c": [(0.0, -1.0, "low"), (2.0, 0.0, "8 bits")]}
    assert buy(opts, 5.0) == ({"a": "blocks", "b": "low", "c": "low"}, 1.0)
    assert buy(opts, 7.0) == ({"a": "blocks", "b": "8 bits", "c": "low"}, 6.0)
    assert buy(opts, 100.0) == ({"a": "8 bits", "b": "8 bits", "c": "low"}, 15.0)
