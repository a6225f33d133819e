"""The network loss the searches minimise and the figures the summary prints, on output shapes
of real models: classifier logits, per-step probabilities, a YOLO-style detector head."""

import numpy as np
import pytest

from onnxq.algos.metrics import classifier_like, compare_outputs, divergence


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_class_scores_are_told_from_detector_heads():
    rng = np.random.default_rng(0)
    assert classifier_like(rng.standard_normal((4, 10)).astype(np.float32))             # logits
    assert classifier_like(softmax(rng.standard_normal((1, 40, 97))).astype(np.float32))  # CTC steps
    head = np.concatenate([rng.uniform(0, 320, (1, 4, 2100)), rng.uniform(0, 1, (1, 18, 2100))], 1)
    assert not classifier_like(head.astype(np.float32))                                   # boxes + scores
    assert "top1_agreement" not in compare_outputs([head], [head])


def test_a_normalised_embedding_is_not_taken_for_class_scores():
    """A sentence encoder's unit-length rows: their softmax is near uniform, so KL and top-1
    would say nothing; the searches compare them by relative error and verify by cosine."""
    rng = np.random.default_rng(2)
    e = rng.standard_normal((3, 384))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    assert not classifier_like(e.astype(np.float32))
    assert "top1_agreement" not in compare_outputs([e], [e])
    assert divergence([e], [e * 0.9]) == pytest.approx(0.01, rel=1e-6)     # relative MSE, not KL
    assert classifier_like((e * 3).astype(np.float32))                      # other rank-2 scores stay class scores


def test_a_detector_heads_small_rows_count_as_much_as_its_large_ones():
    """Box coordinates (hundreds) must not drown the class scores (0..1): the same relative
    error in either set of rows gives the same loss."""
    rng = np.random.default_rng(1)
    head = np.concatenate([rng.uniform(1, 320, (1, 4, 500)), rng.uniform(0.01, 1, (1, 4, 500))], 1)
    boxes_off, scores_off = head.copy(), head.copy()
    boxes_off[:, :4] *= 1.1
    scores_off[:, 4:] *= 1.1
    a, b = divergence([head], [boxes_off]), divergence([head], [scores_off])
    assert a > 0 and b > 0 and np.isclose(a, b, rtol=1e-6)
    # summed over all values instead, the score rows' error would be ~1e-5 of the boxes'
    flat = lambda x: np.mean((head - x) ** 2) / np.mean(head ** 2)  # noqa: E731
    assert flat(scores_off) < 1e-3 * flat(boxes_off)


def test_logits_use_kl_and_identical_outputs_cost_nothing():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((8, 5))
    assert divergence([logits], [logits]) == 0.0
    assert divergence([logits], [logits + 1.0]) < 1e-12          # softmax ignores a shift
    assert divergence([logits], [logits * 2.0]) > 1e-3
