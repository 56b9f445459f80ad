"""Rigour of the core: the argmax decided by the LP, tail-sum slacks derived from the vocabulary size,
reduced bases proving their accepts on the full W, and the sampler's step-indexed, grammar-aware draws."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
from independent import augmented, check_accept, softmax64
from test_random_agreement import random_case

import bat_core
from bat_core.certify import U64, Step


def test_the_argmax_gets_the_lps_answer_and_the_sampler_keeps_it():
    """`decide` is the exact LP's answer for every token, the argmax too; the argmax rule (the top token
    is always kept) is the sampler's."""
    rng = np.random.default_rng(21)
    compared, rejected = 0, 0
    for case in range(400):
        W, logits = random_case(rng, ("plain", "wide", "low_rank")[case % 3])
        p = softmax64(logits, len(W))
        top = int(np.argmax(p))
        if p[top] > 0.6:
            continue
        tau = float(p[top] * 1.5)  # the argmax is below tau
        basis = bat_core.Basis(W)
        decided = bool(bat_core.decide(basis, logits, [top], tau)[0])
        reference = bat_core.reference_decide(basis, logits, top, tau)
        assert reference.status == "Optimal", reference.status
        assert decided == reference.accepted, (case, p[top], tau)
        compared += 1
        rejected += not decided
        if not decided:
            sampler = bat_core.BatSampler(basis, bat_core.ThresholdRule("tau", tau), seed=0, max_rejections=len(W))
            assert sampler.mask(logits, candidates=len(W)).mask[top]
            assert top in {sampler.sample(logits).token for _ in range(50)}
    assert compared > 100 and rejected > 0  # the LP does reject some argmaxes: the test can fail


def test_tail_sum_slack_covers_the_worst_case_rounding_of_a_vocabulary_sum():
    """A tail's mass and squared weights are taken as (vocabulary sum) - (head sum): each float64 sum of n terms
    may be off by gamma_n = n u / (1 - n u) times the sum of the terms, in any summation order. The slack
    must cover that at Gemma's vocabulary size (fixed constants 1e-14 and 1e-12 did not)."""
    v, d = 262_144, 8
    rng = np.random.default_rng(3)
    W = rng.normal(size=(v, d)).astype(np.float32)
    basis = bat_core.Basis(W)
    z = rng.normal(size=v) * 2
    p = np.exp(z - z.max())
    p /= p.sum()
    step = Step(basis, p, 0.01, None, head_size=1024)
    exact = np.sort(step.head)
    mass, _ = step._lipschitz_tail(exact, np.array([0.0]))

    def gamma(n):
        return n * U64 / (1 - n * U64)

    computed = step.p_total - float(p[exact].sum())
    worst = gamma(v) * step.p_total + gamma(len(exact)) * float(p[exact].sum()) + U64 * abs(computed)
    assert mass - computed >= worst
    weights_sq = (p[exact] ** 2).sum()
    assert (
        step.tail_sum_slack(len(exact)) * step.weight_sq_total
        >= gamma(v + 1) * step.weight_sq_total + gamma(len(exact) + 1) * weights_sq
    )
    # the bound holds for the true tail mass (exactly rounded sum)
    tail = np.setdiff1d(np.arange(v), exact)
    assert mass >= math.fsum(p[tail])


def test_a_reduced_basis_proves_its_accepts_on_the_full_matrix():
    """Accepts of a solver on `Basis.reduced(k)` carry certificates for the full [W, 1] that independent code
    verifies on W; the reduced decision never accepts what the full one rejects."""
    rng = np.random.default_rng(17)
    accepts = 0
    for _ in range(150):
        W = rng.normal(size=(40, 8)).astype(np.float32)
        logits = (W @ rng.normal(size=8) * 2).astype(np.float32)
        basis = bat_core.Basis(W)
        reduced = basis.reduced(5)
        assert reduced.parent is basis and reduced.directions.shape == (8, 5)
        p = softmax64(logits, 40)
        tau = 0.05
        tokens = [int(t) for t in np.flatnonzero((p < tau) & (p > 1e-8))]
        if not tokens:
            continue
        solver = bat_core.BatSolver(reduced)
        decisions = solver.decide(solver.new_step(logits, tau), tokens)
        full = bat_core.decide(basis, logits, tokens, tau)
        for decision, exact in zip(decisions, full):
            assert not (decision.accepted and not exact)
            if decision.accepted:
                accepts += 1
                assert decision.certificate.y.shape == (9,)
                check_accept(augmented(W), p, tau, decision.token, decision.certificate.y, solver.config.tol)
        # a reduced basis of a reduced basis still proves on the original W
        twice = bat_core.BatSolver(reduced.reduced(3))
        for decision in twice.decide(twice.new_step(logits, tau), tokens):
            if decision.accepted:
                check_accept(augmented(W), p, tau, decision.token, decision.certificate.y, twice.config.tol)
    assert accepts > 20


def sampler_case(seed=4, v=60, d=5):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(v, d)).astype(np.float32)
    rows = [(W @ rng.normal(size=d) * 1.5).astype(np.float32) for _ in range(12)]
    return bat_core.Basis(W), rows


@pytest.mark.parametrize("mode", ["sample", "mask"])
def test_a_step_index_makes_the_outcome_independent_of_what_came_before(mode):
    """With `step`, a step's outcome is a function of (seed, step, logits): repeated, skipped and reordered
    steps (an engine's discarded prefill chunks, a preempted request's new sampler) change nothing."""
    basis, rows = sampler_case()
    rule = bat_core.ThresholdRule("tau", 0.08)

    def outcome(sampler, k):
        if mode == "sample":
            return sampler.sample(rows[k], step=k).token
        return tuple(np.flatnonzero(sampler.mask(rows[k], step=k, candidates=3).mask))

    straight = bat_core.BatSampler(basis, rule, seed=5)
    expected = [outcome(straight, k) for k in range(len(rows))]
    noisy = bat_core.BatSampler(basis, rule, seed=5)
    for k in range(len(rows)):
        for _ in range(k % 3):  # discarded attempts at the same and at other steps
            outcome(noisy, (k * 7) % len(rows))
            outcome(noisy, k)
        assert outcome(noisy, k) == expected[k]
        assert outcome(bat_core.BatSampler(basis, rule, seed=5), k) == expected[k]  # a fresh sampler
    other = bat_core.BatSampler(basis, rule, seed=6)
    if mode == "sample":
        assert [outcome(other, k) for k in range(len(rows))] != expected
    with pytest.raises(bat_core.BatError, match="non-negative integer"):
        straight.sample(rows[0], step=-1)


def test_allowed_tokens_restrict_sampling_and_masks():
    """A grammar's allowed set: draws stay inside it, the fallback is the most probable allowed token, and the
    mask is the proven set within it (never empty)."""
    basis, rows = sampler_case(seed=9)
    rule = bat_core.ThresholdRule("tau", 0.05)
    rng = np.random.default_rng(0)
    for k, logits in enumerate(rows):
        p = softmax64(logits, basis.vocab_size)
        allowed = rng.random(basis.vocab_size) < 0.3
        allowed[np.argmax(p)] = k % 2 == 0  # half the steps forbid the argmax
        allowed[int(np.argmin(p))] = True
        sampler = bat_core.BatSampler(basis, rule, seed=k)
        for n in range(20):
            result = sampler.sample(logits, step=n, allowed=allowed)
            assert allowed[result.token]
            if result.fell_back_to_argmax:
                assert result.token == int(np.argmax(np.where(allowed, p, -1)))
        masked = sampler.mask(logits, step=0, allowed=allowed, candidates=basis.vocab_size, budget=10.0)
        assert masked.mask.any() and not (masked.mask & ~allowed).any()
        assert masked.mask[int(np.argmax(np.where(allowed, p, -1)))]
        unrestricted = sampler.mask(logits, step=0, candidates=basis.vocab_size, budget=10.0).mask
        below = (p < 0.05) & allowed & (np.arange(len(p)) != np.argmax(np.where(allowed, p, -1)))
        assert (masked.mask[below] == unrestricted[below]).all()  # the same decisions, restricted
    with pytest.raises(bat_core.BatError, match="permits none"):
        bat_core.BatSampler(basis, rule).sample(rows[0], allowed=np.zeros(basis.vocab_size, dtype=bool))
    with pytest.raises(bat_core.BatError, match="boolean mask"):
        bat_core.BatSampler(basis, rule).sample(rows[0], allowed=np.ones(3, dtype=bool))


def test_the_product_memo_gives_the_products_a_new_matvec_would():
    """Products over the vocabulary are kept per request (ProductMemo): a kept one equals a fresh float32
    product bit for bit and is not made again, the oldest go first, no later product changes one a caller
    holds; masks with the memo shared across a request's steps equal masks made with the memo emptied
    before each step."""
    from bat_core.certify import ProductMemo

    rng = np.random.default_rng(3)
    W, _ = random_case(rng, "plain")
    basis = bat_core.Basis(W)
    made = []  # the products the memo made

    def matvec(y, out):
        made.append(y)
        return basis.matvec(y, out)

    memo = ProductMemo(SimpleNamespace(vocab_size=basis.vocab_size, matvec=matvec), capacity=2)
    ys = [rng.standard_normal(basis.hidden_size) for _ in range(3)]
    first = memo.product(ys[0])
    assert np.array_equal(first, basis.matvec(ys[0].astype(np.float32)))
    first[:] = 0.0  # a caller's copy: the kept product stays as it was
    assert np.array_equal(memo.product(ys[0]), basis.matvec(ys[0].astype(np.float32))) and len(made) == 1
    held = [memo.product(y) for y in ys[1:]]  # ys[0] goes: capacity 2
    assert len(made) == 3 and np.array_equal(memo.product(ys[0]), basis.matvec(ys[0].astype(np.float32)))
    assert len(made) == 4  # made again, into the row of the oldest (ys[1])
    for y, u in zip(ys[1:], held):
        assert np.array_equal(u, basis.matvec(y.astype(np.float32)))
    assert np.array_equal(memo.product(ys[2]), held[1]) and len(made) == 4

    rule = bat_core.ThresholdRule("eta", 0.02)
    rows = [rng.standard_normal(len(W)) * 3 for _ in range(6)]
    shared = bat_core.BatSampler(basis, rule, seed=0)
    fresh = bat_core.BatSampler(basis, rule, seed=0)
    for z in rows:
        fresh.solver._products.clear()  # nothing kept from the request's earlier steps
        a, b = shared.mask(z), fresh.mask(z)
        assert np.array_equal(a.mask, b.mask) and a.undecided_mass == b.undecided_mass
