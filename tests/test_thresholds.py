import math

import numpy as np

from bat_core import ThresholdRule, entropy, truncate_mask


def test_eta_formula_vectorized():
    p = np.array([[0.5, 0.25, 0.25], [0.9, 0.05, 0.05]])
    eps = 0.01
    expected = [min(eps, math.sqrt(eps) * math.exp(-entropy(row))) for row in p]
    np.testing.assert_allclose(ThresholdRule("eta", eps).tau(p), expected)
    assert ThresholdRule("eta", eps).tau(p[0]) == expected[0]


def test_epsilon_and_fixed():
    p = np.full((3, 4), 0.25)
    np.testing.assert_array_equal(ThresholdRule("epsilon", 0.3).tau(p), [0.3] * 3)
    assert ThresholdRule("tau", 0.2).tau(p[0]) == 0.2


def test_entropy_handles_zeros():
    assert entropy(np.array([1.0, 0.0])) == 0.0


def test_truncate_mask_keeps_argmax():
    p = np.array([[0.4, 0.35, 0.25]])
    assert truncate_mask(p, np.array([0.9])).tolist() == [[True, False, False]]
