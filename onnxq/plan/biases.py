"""Int32 bias coding of a finished plan: once every activation scale is known, each layer's
bias (and its branch's A bias) is coded in units of s_x * s_w. A range search calls
`coded_biases` with every trial scale; `code_biases` fills the plan the rewriter emits."""

from __future__ import annotations

from ..algos.bias import bias_safe, int32_codes
from ..types import CodedBiases, Int32Bias, LayerPlan, Plan
from .rules import RULES, float_input


def weight_only(plan: Plan, lp: LayerPlan) -> bool:
    """Whether the target's rules keep this layer's input float (int4 weight-only kernels)."""
    return float_input(RULES[plan.target], lp.target, lp.bits)


def unrounded_inputs(plan: Plan) -> set[str]:
    """Activations that only weight-only layers read, where Q/DQ sits on layer inputs alone."""
    if RULES[plan.target].output_units:
        return set()
    rounded = {lp.target.act for lp in plan.layers if not weight_only(plan, lp)}
    rounded.update(a for tensors in plan.readers.values() for a in tensors)
    return {lp.target.act for lp in plan.layers if weight_only(plan, lp)} - rounded


def input_scale(plan: Plan, lp: LayerPlan) -> float | None:
    """The scale of the quantized input a layer reads, or None (float input)."""
    t = lp.target
    a = plan.acts.get(t.act) if t.act and not weight_only(plan, lp) else None
    return a.scale if a else None


def coded_biases(lp: LayerPlan, x_scale: float | None) -> CodedBiases:
    """The biases a layer's node and its branch read for input scale `x_scale` (None: float)."""
    bias = lp.bias
    if bias is None and lp.source_bias is not None and x_scale is not None:
        bias = lp.source_bias       # an int32 bias needs the model's own bias coded too
    layer = None
    if bias is not None and x_scale is not None and lp.axis == 0 and bias.shape == lp.scales.shape:
        codes, scales = bias_safe(lp.codes, lp.scales, lp.bits, bias, x_scale)
        layer = Int32Bias(codes, scales, *int32_codes(bias, x_scale * scales))
    br = lp.branch
    branch = None
    if br is not None and br.a_bias is not None and br.a_scales is not None and x_scale is not None:
        branch = int32_codes(br.a_bias, x_scale * br.a_scales)
    return CodedBiases(bias, layer, branch)


def code_biases(plan: Plan) -> Plan:
    """Fills plan.biases for every layer from the plan's activation scales; returns the plan."""
    plan.biases = {lp.target.node: coded_biases(lp, input_scale(plan, lp)) for lp in plan.layers}
    return plan
