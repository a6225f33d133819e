"""Property tests of the quantization arithmetic."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from onnxq.algos.qmath import act_params, act_qrange, channel_scales, dequantize, quantize, weight_qmax

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@given(arrays(np.float32, st.tuples(st.integers(1, 8), st.integers(1, 40)), elements=finite),
       st.sampled_from([2, 3, 4, 8]))
def test_weight_codes_in_range_and_error_within_half_step(w, bits):
    s = channel_scales(w.astype(np.float64), bits)
    qm = weight_qmax(bits)
    q = quantize(w, s[:, None], 0, -qm, qm)
    assert q.min() >= -qm and q.max() <= qm
    err = np.abs(dequantize(q, s[:, None]) - w)
    assert np.all(err <= s[:, None] / 2 + 1e-6 * np.abs(w) + 1e-9)


@given(finite, finite, st.sampled_from([4, 8, 16]), st.booleans())
def test_activation_zero_is_exact_and_range_covered(a, b, bits, signed):
    lo, hi = min(a, b), max(a, b)
    scale, zp = act_params(lo, hi, bits, signed)
    qmin, qmax = act_qrange(bits, signed)
    assert qmin <= zp <= qmax
    assert dequantize(quantize(np.zeros(1), scale, zp, qmin, qmax), scale, zp)[0] == 0.0
    x = np.linspace(min(lo, 0), max(hi, 0), 101)
    err = np.abs(dequantize(quantize(x, scale, zp, qmin, qmax), scale, zp) - x)
    assert np.all(err <= scale / 2 * (1 + 1e-6) + 1e-9)


@settings(max_examples=30)
@given(arrays(np.int8, st.integers(1, 50), elements=st.integers(-8, 7)))
def test_int4_initializer_round_trip(codes):
    import ml_dtypes
    from onnx import numpy_helper

    t = numpy_helper.from_array(codes.astype(ml_dtypes.int4), "w")
    assert len(t.raw_data) == (codes.size + 1) // 2      # two codes a byte
    back = numpy_helper.to_array(t).astype(np.int8)
    assert np.array_equal(back, codes)
