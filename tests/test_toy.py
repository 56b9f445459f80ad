"""The paper's worked example (Finlayson et al., fig. 3) through every public entry point."""

import numpy as np
import pytest
from independent import augmented, check_accept, check_reject, softmax64

import bat_core

W = np.array([[0.55], [0.71], [0.29]])
LOGITS = W[:, 0] * 2.55
TAU = 1 - 1 / 1.9  # exp(delta) = 1.9


def test_toy_probabilities_match_the_paper():
    np.testing.assert_allclose(softmax64(LOGITS, 3), [0.331, 0.498, 0.171], atol=1e-3)


def test_toy_decisions_one_shot():
    assert bat_core.decide(W, LOGITS, [0, 1, 2], TAU).tolist() == [False, True, True]


def test_toy_reference_agrees_and_certificates_verify():
    basis = bat_core.Basis(W)
    p = softmax64(LOGITS, 3)
    A = augmented(W)
    solver = bat_core.BatSolver(basis)
    decisions = solver.decide(solver.new_step(LOGITS, TAU), [0, 1, 2])
    assert [d.accepted for d in decisions] == [False, True, True]
    assert decisions[1].method == "threshold"  # p = 0.498 >= tau = 0.474
    check_reject(A, p, TAU, 0, decisions[0].certificate.support, decisions[0].certificate.q, 1e-6)
    check_accept(A, p, TAU, 2, decisions[2].certificate.y, 1e-6)
    for token, expected in [(0, False), (2, True)]:
        ref = bat_core.reference_decide(basis, LOGITS, token, TAU)
        assert ref.accepted is expected
        if expected:
            check_accept(A, p, TAU, token, ref.y, 1e-6)


def test_token_three_is_accepted_although_least_probable():
    # no threshold can keep token 3 (p = 0.171) and drop token 1 (p = 0.331): BAT does
    accepted = bat_core.decide(W, LOGITS, [0, 2], TAU)
    assert accepted.tolist() == [False, True]


@pytest.mark.parametrize("tau", [0.0, 1.0, -0.1, float("nan")])
def test_bad_tau_is_a_clear_error(tau):
    with pytest.raises(bat_core.BatError, match="tau"):
        bat_core.decide(W, LOGITS, [0], tau)
