"""The fast path agrees with the dense reference LP on thousands of random small problems."""

from fractions import Fraction

import numpy as np
import pytest
from independent import augmented, check_accept, check_reject, softmax64

import bat_core

TOL = 1e-6
TAUS = (0.005, 0.02, 0.1, 0.3)


def random_case(rng: np.random.Generator, kind: str):
    v = int(rng.integers(4, 48))
    d = int(rng.integers(1, 7))
    W = rng.normal(size=(v, d))
    if kind == "duplicates":  # repeated rows: tokens the LP cannot tell apart
        W[v // 2 :] = W[: v - v // 2]
    elif kind == "zero_rows":
        W[rng.choice(v, size=max(1, v // 4), replace=False)] = 0.0
    elif kind == "wide":  # d close to v: few tokens, many directions
        d = v - int(rng.integers(1, 3))
        W = rng.normal(size=(v, d))
    elif kind == "low_rank":
        W = rng.normal(size=(v, 1)) @ rng.normal(size=(1, d)) + 1e-3 * rng.normal(size=(v, d))
    temperature = float(rng.choice([0.3, 1.0, 3.0, 8.0]))  # from flat to peaked distributions
    logits = W @ rng.normal(size=d) * temperature
    return W.astype(np.float32), logits.astype(np.float32)


def near_boundary_tau(p, rng):
    """A tau just above a probability, so the threshold shortcut barely misses."""
    j = int(rng.integers(len(p)))
    return float(min(max(p[j] * (1 + 1e-4), 1e-4), 0.9))


CASES = 2000


def agree_with_reference(seed: int, cases: int, config: bat_core.BatConfig | None = None) -> dict:
    """Decide `cases` random candidates with the fast path, re-check every certificate independently and
    compare with the dense reference; returns counts (checked, in the tolerance band, by stage)."""
    rng = np.random.default_rng(seed)
    kinds = ["plain", "duplicates", "zero_rows", "wide", "low_rank"]
    counts = dict(checked=0, gray=0, by_point=0, by_regression=0, lp_rejects=0, lp_accepts=0)
    for case in range(cases):
        kind = kinds[case % len(kinds)]
        W, logits = random_case(rng, kind)
        p = softmax64(logits, len(W))
        tau = near_boundary_tau(p, rng) if case % 7 == 0 else float(rng.choice(TAUS))
        below = np.flatnonzero(p < tau)
        if below.size == 0:
            continue
        token = int(rng.choice(below))
        basis = bat_core.Basis(W)
        solver = bat_core.BatSolver(basis, config)
        step = solver.new_step(logits, tau)
        decision = solver.decide(step, [token])[0]
        if decision.method == "resolution":  # p below float64's reach: documented sound reject
            assert not decision.accepted and p[token] < solver.config.min_probability
            continue
        ref = bat_core.reference_decide(basis, logits, token, tau, tol=TOL)
        assert ref.status in ("Optimal", "threshold"), (kind, case, ref.status, p[token])
        A = augmented(W)
        counts["checked"] += 1
        counts["by_point"] += solver.stats.rejected_by_point
        counts["by_regression"] += solver.stats.accepts_by_source.get("regression", 0)
        counts["lp_rejects" if not decision.accepted else "lp_accepts"] += decision.method == "lp"
        if decision.accepted:
            check_accept(A, p, tau, token, decision.certificate.y, TOL)
        elif decision.method != "fallback":
            cert = decision.certificate
            check_reject(A, p, tau, token, cert.support, cert.q, TOL)
            if decision.method == "certificate":  # the feasible-point search's points hold the box exactly
                box = Fraction(step.tau) / (1 - Fraction(step.tau))
                assert all(
                    -Fraction(step.p[j]) <= Fraction(q) <= box * Fraction(step.p[j])
                    for j, q in zip(cert.support, cert.q)
                    if j != token
                ), (kind, case)
        if decision.accepted != ref.accepted:
            # only inside the solver's tolerance band may the two differ
            assert TOL / 100 <= ref.relative_infeasibility <= TOL * 100, (kind, case, ref, decision)
            counts["gray"] += 1
    assert counts["checked"] > cases // 2
    assert counts["gray"] <= max(1, counts["checked"] // 200)
    return counts


@pytest.mark.parametrize("chunk", range(4))
def test_fast_path_agrees_with_reference(chunk):
    counts = agree_with_reference(1000 + chunk, CASES // 4)
    # the least-squares proofs ran, and their points and certificates passed the independent checks
    assert counts["by_point"] > 0 and counts["by_regression"] > 0, counts
    print(f"chunk {chunk}: {counts}")


def test_exact_lp_alone_agrees_with_reference():
    """With the least-squares proofs off, the exact LP decides what the cheap search leaves: its reject
    points and accept certificates pass the same independent checks and agree with the reference."""
    config = bat_core.BatConfig(point_iterations=0, regression_iterations=0)
    counts = agree_with_reference(2000, 300, config)
    assert counts["by_point"] == counts["by_regression"] == 0
    assert counts["lp_rejects"] > 0 and counts["lp_accepts"] > 0, counts


def test_certificate_search_alone_is_sound_and_reweighting_only_adds():
    """time_budget=0 (no LP): every accept is re-verified by independent code and is an accept of the
    reference; the reweighted least-squares pass proves a superset of what plain least squares proves."""
    rng = np.random.default_rng(77)
    plain_accepts = refined_accepts = from_reweighted = 0
    for case in range(400):
        W, logits = random_case(rng, ["plain", "low_rank"][case % 2])
        p = softmax64(logits, len(W))
        tau = float(rng.choice(TAUS))
        below = np.flatnonzero(p < tau)
        if below.size == 0:
            continue
        token = int(rng.choice(below))
        basis = bat_core.Basis(W)
        results = {}
        for refine in (0, 3):
            solver = bat_core.BatSolver(basis, bat_core.BatConfig(time_budget=0.0, lsq_refine=refine))
            results[refine] = solver.decide(solver.new_step(logits, tau), [token])[0]
            from_reweighted += solver.stats.accepts_by_source.get("reweighted", 0)
        if results[0].accepted:
            assert results[3].accepted
        for decision in results.values():
            if decision.accepted and decision.method == "certificate":
                check_accept(augmented(W), p, tau, token, decision.certificate.y, TOL)
                ref = bat_core.reference_decide(basis, logits, token, tau, tol=TOL)
                assert ref.accepted or ref.relative_infeasibility >= TOL / 100
        plain_accepts += results[0].accepted
        refined_accepts += results[3].accepted
    assert from_reweighted > 0 and refined_accepts > plain_accepts


def test_top_token_selection_matches_a_full_partition():
    """The head's selection (a partition over the tokens above a sample threshold) gives the same set as a
    partition of the whole distribution: on peaked, flat and tied (quantized) distributions of many sizes."""
    from bat_core.distribution import most_probable

    rng = np.random.default_rng(11)
    for case in range(120):
        v = int(rng.choice([5, 300, 4096, 5000, 49152, 262144]))
        z = rng.standard_normal(v) * float(rng.choice([0.5, 3.0, 12.0]))
        if case % 3 == 0:
            z = np.round(z * 4) / 4  # many exact ties, as in quantized models
        p = softmax64(z, v)
        for k in {min(k, v) for k in (1, 7, 1024, max(1, v // 3), v - 1, v)}:
            top = most_probable(p, k)
            assert len(top) == len(np.unique(top)) == k
            out = np.ones(v, dtype=bool)
            out[top] = False
            assert not out.any() or p[out].max() <= p[top].min()  # a top-k set (ties either way)


def test_a_stored_feasible_point_rejects_later_candidates_under_its_own_method():
    """A feasible point found by the point search rejects every other token it zeroes in that step: such a
    later decision is a "certificate" reject (not an LP one), and its point passes the independent check."""
    rng = np.random.default_rng(5)
    stored = 0
    for case in range(400):
        W, logits = random_case(rng, ["plain", "low_rank"][case % 2])
        p = softmax64(logits, len(W))
        tau = float(rng.choice(TAUS))
        below = np.flatnonzero((p < tau) & (p >= 1e-10))
        solver = bat_core.BatSolver(bat_core.Basis(W), bat_core.BatConfig())
        step = solver.new_step(logits, tau)
        for token in rng.permutation(below)[:6]:
            decision = solver.decide(step, [int(token)])[0]
            if decision.method != "certificate" or decision.accepted:
                continue
            point = decision.certificate
            zeroed = [int(j) for j in point.zero_tokens(step.p) if j != token and 1e-10 <= step.p[j] < tau]
            if not zeroed:
                continue
            later = solver.decide(step, [zeroed[0]])[0]
            assert (later.accepted, later.method) == (False, "certificate"), (case, later.method)
            cert = later.certificate
            check_reject(augmented(W), p, tau, zeroed[0], cert.support, cert.q, TOL)
            stored += 1
            break
    assert stored >= 3, stored
