"""config.py: ConvertConfig validation, the defaults it derives, per-layer bits and exclusion."""

import dataclasses
import json

import pytest

from onnxq.config import ACT_BITS, WEIGHT_BITS, ConvertConfig
from onnxq.errors import ConfigError, OnnxqError

BAD = [
    ({"bits": 5}, "--bits must be one of"),
    ({"bits": 16}, "--bits must be one of"),
    ({"act_bits": 7}, "--act-bits must be one of"),
    ({"weight_method": "magic"}, "unknown weight method 'magic'; known: rtn, mse, gptq"),
    ({"act_method": "magic"}, "unknown activation method 'magic'"),
    ({"act_method": "percentile:abc"}, "unknown activation method 'percentile:abc'"),
    ({"search_samples": 0}, "--search-samples must be at least 1"),
    ({"search_evals": -1}, "--search-evals at least 0"),
    ({"damp": 0.0}, "--damp must lie in (0, 1]"),
    ({"damp": 1.5}, "--damp must lie in (0, 1]"),
    ({"damp": -0.1}, "--damp must lie in (0, 1]"),
    ({"calib_size": 0}, "--calib-size must be at least 1"),
    ({"depthwise_bits": 6}, "depthwise bits must be one of"),
    ({"rank_budget": -0.01}, "--rank-budget is a fraction"),
    ({"rank_budget": 1.5}, "--rank-budget is a fraction"),
    ({"branch_init": "random"}, "unknown --branch-init 'random'; known: whitened, svd"),
    ({"branch_bits": 4}, "--branch-bits must be 8, 16 or 32"),
    ({"max_rank": 0}, "--max-rank must be at least 1"),
    ({"branch_refine": -1}, "--branch-refine must lie in 0..10"),
    ({"branch_refine": 11}, "--branch-refine must lie in 0..10"),
    ({"branch_weighting": "global"}, "unknown --branch-weighting 'global'; known: network, layer"),
    ({"avg_bits": 1.5}, "--avg-bits must lie in 2..8"),
    ({"avg_bits": 8.5}, "--avg-bits must lie in 2..8"),
    ({"max_size": 0}, "--max-size must be positive"),
    ({"max_size": -5}, "--max-size must be positive"),
    ({"bit_choices": ()}, "--bit-choices must come from"),
    ({"bit_choices": (8, 5)}, "--bit-choices must come from"),
    ({"bits_overrides": (("conv*", 4), ("fc", 7))}, "bit override must be one of"),
    ({"sequential": "False"}, "sequential must be True or False, got 'False'"),
    ({"smooth": 0}, "smooth must be True or False, got 0"),
    ({"verify": None}, "verify must be True or False, got None"),
]


@pytest.mark.parametrize("kwargs, message", BAD, ids=[f"{next(iter(k))}={next(iter(k.values()))}" for k, _ in BAD])
def test_every_bad_value_is_a_config_error_that_names_the_option(kwargs, message):
    with pytest.raises(ConfigError) as e:
        ConvertConfig(**kwargs)
    assert message in str(e.value)
    assert isinstance(e.value, OnnxqError) and e.value.exit_code == 2


GOOD = [{"bits": b} for b in WEIGHT_BITS] + [{"act_bits": b} for b in ACT_BITS] + [
    {"weight_method": m} for m in ("rtn", "mse", "gptq")] + [
    {"act_method": m} for m in ("minmax", "percentile", "percentile:99.9", "mse", "lp:2.5", "entropy",
                                "interval", "interval:0.01", "lapq")] + [
    {"damp": 1.0}, {"damp": 1e-6}, {"search_evals": 0}, {"search_samples": 1}, {"calib_size": 1},
    {"rank_budget": 0.0}, {"rank_budget": 1.0}, {"branch_init": "svd"}, {"branch_bits": 16},
    {"branch_bits": 32}, {"max_rank": 1}, {"branch_refine": 0}, {"branch_refine": 10},
    {"branch_weighting": "layer"}, {"avg_bits": 2.0}, {"avg_bits": 8.0}, {"max_size": 1},
    {"bit_choices": (4,)}, {"bits_overrides": (("fc*", 2),)}, {"depthwise_bits": 4},
    {"sequential": False}, {"sequential": None}, {"u8_weights": True},
]


@pytest.mark.parametrize("kwargs", GOOD, ids=[f"{next(iter(k))}={next(iter(k.values()))}" for k in GOOD])
def test_boundary_values_are_accepted(kwargs):
    cfg = ConvertConfig(**kwargs)
    key, value = next(iter(kwargs.items()))
    assert getattr(cfg, key) == value


def test_config_is_frozen():
    cfg = ConvertConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.bits = 8                                     # type: ignore[misc]
    with pytest.raises(ConfigError):                      # replace() validates again
        dataclasses.replace(cfg, bits=5)


@pytest.mark.parametrize("bits, method", [(2, "gptq"), (3, "gptq"), (4, "gptq"), (8, "mse")])
def test_weight_method_defaults_to_gptq_at_4_bits_or_fewer(bits, method):
    cfg = ConvertConfig(bits=bits)
    assert cfg.weight_method_name == (method if bits < 8 else "gptq for convs, mse for the rest")
    assert ConvertConfig(bits=4).weight_method_for(bits) == method        # per layer, not per model
    assert ConvertConfig(bits=4).weight_method_for(bits, "MatMul") == method
    assert ConvertConfig(bits=4).weight_method_for(bits, "Conv") == method
    # an 8-bit conversion rounds its convs second-order too, depthwise ones included;
    # Gemm/MatMul not, nor the 8-bit convs of a 4-bit conversion (the rule reads no group count)
    eight = ConvertConfig(bits=8)
    assert eight.weight_method_for(bits, "Conv") == "gptq"
    assert ConvertConfig(bits=4).weight_method_for(8, "Conv") == "mse"
    assert eight.weight_method_for(bits, "MatMul") == eight.weight_method_for(bits, "Gemm") == method
    assert ConvertConfig(bits=bits, weight_method="rtn").weight_method_for(bits) == "rtn"
    assert ConvertConfig(bits=bits, weight_method="rtn").weight_method_name == "rtn"


def test_blocked_8bit_gemm_matmul_are_rounded_second_order():
    """Where an 8-bit conversion's Gemm/MatMul are settled for second-order rounding (api.block_8bit:
    a MatMul-heavy model whose weights take blocked grids and stay in memory) they are rounded like
    its convs; tables stay mse, and so do the 8-bit layers of a 4-bit conversion and the
    Gemm/MatMul of other 8-bit conversions."""
    matmuls = ConvertConfig(bits=8, block_8bit=True, gptq_8bit_matmul=True)
    assert matmuls.weight_method_for(8, "MatMul") == matmuls.weight_method_for(8, "Gemm") == "gptq"
    assert matmuls.weight_method_for(8, "Gather") == matmuls.weight_method_for(8) == "mse"
    assert matmuls.weight_method_name == "gptq for convs and Gemm/MatMul, mse for the rest"
    assert ConvertConfig(bits=8, block_8bit=True).weight_method_for(8, "MatMul") == "mse"      # not settled yet
    assert ConvertConfig(bits=8, gptq_8bit_matmul=False).weight_method_for(8, "MatMul") == "mse"
    assert ConvertConfig(bits=4, gptq_8bit_matmul=True).weight_method_for(8, "MatMul") == "mse"
    assert ConvertConfig(bits=8, gptq_8bit_matmul=True, weight_method="mse").weight_method_for(8, "MatMul") == "mse"


@pytest.mark.parametrize("act_bits, method", [(4, "interval"), (6, "interval"), (8, "best"),
                                              (16, "best"), (32, "best")])
def test_act_method_defaults_follow_the_activation_bits(act_bits, method):
    assert ConvertConfig(act_bits=act_bits).act_method_name == method
    assert ConvertConfig(act_bits=act_bits, act_method="lp:3").act_method_name == "lp:3"
    assert ConvertConfig(act_bits=act_bits).quantize_acts == (act_bits < 32)


@pytest.mark.parametrize("bits, act_bits, on", [(4, 8, True), (4, 32, True), (3, 32, True), (2, 8, True),
                                               (4, 16, False), (4, 4, False), (4, 6, False), (8, 8, False),
                                               (8, 32, False)])
def test_sequential_mode_defaults_to_low_bit_weights_with_8_bit_or_float_activations(bits, act_bits, on):
    # measured to pay at W4A8 (rounds 13-14) and weight-only W4 (round 40); 16- and 4-bit activations unmeasured
    assert ConvertConfig(bits=bits, act_bits=act_bits).sequential_on is on
    assert ConvertConfig(bits=bits, act_bits=act_bits, sequential=False).sequential_on is False
    assert ConvertConfig(bits=bits, act_bits=act_bits, sequential=True).sequential_on is True
    assert ConvertConfig(bits=bits, act_bits=act_bits, stages=1).sequential_on is False
    assert ConvertConfig(act_bits=act_bits, avg_bits=4.0).sequential_on is False            # mixed precision


@pytest.mark.parametrize("target", ["generic", "ort-cpu", "openvino", "qnn", "tensorrt"])
def test_ort_cpu_chooses_w8a8_ranges_per_tensor(target):
    # full node units round many more tensors than input-side placement: ort-cpu's W8A8 ranges are
    # chosen one tensor at a time (docs/results.md, round 39); other widths and targets keep theirs
    auto = target == "ort-cpu"
    assert ConvertConfig(act_bits=8, target=target).act_method_name == "best"      # W4A8: measured mixed
    assert ConvertConfig(bits=8, act_bits=8, target=target).act_method_name == ("auto" if auto else "best")
    assert ConvertConfig(bits=8, act_bits=8, target=target, avg_bits=6.0).act_method_name == "best"
    assert ConvertConfig(bits=8, act_bits=16, target=target).act_method_name == "best"
    assert ConvertConfig(bits=8, act_bits=4, target=target).act_method_name == "interval"
    assert ConvertConfig(bits=8, act_bits=8, target=target, act_method="mse").act_method_name == "mse"


def test_bits_for_overrides_depthwise_and_default():
    cfg = ConvertConfig(bits=4, bits_overrides=(("head/*", 8), ("*/fc", 2), ("head/fc", 3)))
    assert cfg.bits_for("head/fc", depthwise=False) == (8, "override head/*")     # the first match wins
    assert cfg.bits_for("body/fc", depthwise=False) == (2, "override */fc")
    assert cfg.bits_for("body/fc", depthwise=True) == (2, "override */fc")        # over the depthwise rule
    assert cfg.bits_for("body/dw", depthwise=True) == (8, "depthwise conv kept at 8 bits")
    assert cfg.bits_for("body/conv", depthwise=False) == (4, "")
    assert cfg.bits_for("HEAD/x", depthwise=False) == (4, "")                     # patterns are case-sensitive


def test_depthwise_bits_only_ever_raise_a_layer():
    assert ConvertConfig(bits=8).bits_for("dw", depthwise=True) == (8, "")
    assert ConvertConfig(bits=8, depthwise_bits=4).bits_for("dw", depthwise=True) == (8, "")
    assert ConvertConfig(bits=2, depthwise_bits=4).bits_for("dw", depthwise=True) == (4, "depthwise conv kept at 4 bits")
    assert ConvertConfig(bits=3, depthwise_bits=3).bits_for("dw", depthwise=True) == (3, "")


def test_bits_chosen_by_mixed_precision_say_so():
    for mixed in ({"avg_bits": 3.5}, {"max_size": 10_000}):
        cfg = ConvertConfig(bits_overrides=(("conv_1", 3),), **mixed)
        assert cfg.mixed
        assert cfg.bits_for("conv_1", depthwise=False) == (3, "bits chosen by mixed precision")
    assert not ConvertConfig().mixed


def test_excluded_patterns():
    cfg = ConvertConfig(exclude=("Conv_1", "head/*", "*_[0-2]"))
    assert cfg.excluded("Conv_1") and cfg.excluded("head/fc") and cfg.excluded("Gemm_2")
    assert not cfg.excluded("Conv_10") and not cfg.excluded("Gemm_3") and not cfg.excluded("Head/fc")
    assert not ConvertConfig().excluded("anything")


def test_to_dict_holds_every_field_with_resolved_methods():
    cfg = ConvertConfig(bits=3, act_bits=6, exclude=("a*",), bits_overrides=(("b", 8),), avg_bits=3.5)
    d = cfg.to_dict()
    assert set(d) == {f.name for f in dataclasses.fields(ConvertConfig)}
    assert d["weight_method"] == "gptq" and d["act_method"] == "interval"     # never None
    assert d["bits"] == 3 and d["act_bits"] == 6 and d["avg_bits"] == 3.5
    assert list(d["exclude"]) == ["a*"] and [list(p) for p in d["bits_overrides"]] == [["b", 8]]
    again = json.loads(json.dumps(d))                                          # JSON as is
    assert again["damp"] == cfg.damp and again["bit_choices"] == list(cfg.bit_choices)
    assert ConvertConfig(bits=8, weight_method="rtn", act_method="mse").to_dict()["weight_method"] == "rtn"
    assert ConvertConfig(bits=8).to_dict()["weight_method"] == "gptq for convs, mse for the rest"


def test_size_budget_bits():
    assert ConvertConfig(max_size=1000).size_budget_bits(10_000) == 8000.0
    assert ConvertConfig(avg_bits=4.0).size_budget_bits(1000) == 4000.0
    # branch parameters count at the same average: budget = avg * (P + b) - branch_bits * b
    assert ConvertConfig(avg_bits=4.0, rank_budget=0.1).size_budget_bits(1000) == pytest.approx(4 * 1100 - 8 * 100)
