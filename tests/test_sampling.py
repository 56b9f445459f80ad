"""The paper's sampler and the mask mode on small random models (exact reference available)."""
import numpy as np

import bat_core
from independent import softmax64


def small_problem(seed=5, v=24, d=3):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(v, d)).astype(np.float32)
    logits = (W @ rng.normal(size=d) * 2.0).astype(np.float32)
    return W, logits


def exact_accepted(basis, logits, tau):
    p = softmax64(logits, basis.vocab_size)
    out = p >= tau
    out[np.argmax(p)] = True
    for t in np.flatnonzero(~out):
        out[t] = bat_core.reference_decide(basis, logits, int(t), tau).accepted
    return out


def test_sample_mode_matches_p_restricted_to_the_accepted_set():
    W, logits = small_problem()
    basis = bat_core.Basis(W)
    tau = 0.06
    accepted = exact_accepted(basis, logits, tau)
    p = softmax64(logits, len(W))
    assert (~accepted).any()  # some rejects
    assert ((p < tau) & accepted).any()  # and some sub-threshold accepts
    sampler = bat_core.BatSampler(basis, bat_core.ThresholdRule("tau", tau), seed=11, max_rejections=len(W))
    n = 20000
    counts = np.bincount([sampler.sample(logits).token for _ in range(n)], minlength=len(W))
    assert counts[~accepted].sum() == 0
    expected = n * np.where(accepted, p, 0) / p[accepted].sum()
    keep = expected > 5
    chi2 = float((((counts - expected) ** 2)[keep] / expected[keep]).sum())
    dof = int(keep.sum()) - 1
    # 99.9% quantile of chi-square with dof degrees of freedom (Wilson-Hilferty), a fixed seed
    z = 3.09
    limit = dof * (1 - 2 / (9 * dof) + z * np.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < limit, (chi2, limit)


def test_seed_reproduces_and_differs():
    W, logits = small_problem(seed=6)
    basis = bat_core.Basis(W)
    rule = bat_core.ThresholdRule("tau", 0.05)

    def run(seed):
        s = bat_core.BatSampler(basis, rule, seed=seed)
        return [s.sample(logits).token for _ in range(30)]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_argmax_after_max_rejections():
    W, logits = small_problem(seed=7)
    basis = bat_core.Basis(W)
    sampler = bat_core.BatSampler(basis, bat_core.ThresholdRule("tau", 0.3), seed=0, max_rejections=0)
    result = sampler.sample(logits)
    assert result.fell_back_to_argmax and result.token == int(np.argmax(logits))


def test_mask_is_sound_and_reports_undecided_mass():
    W, logits = small_problem(seed=8, v=30, d=4)
    basis = bat_core.Basis(W)
    tau = 0.05
    accepted = exact_accepted(basis, logits, tau)
    sampler = bat_core.BatSampler(basis, bat_core.ThresholdRule("tau", tau), seed=0)
    result = sampler.mask(logits, budget=10.0, candidates=len(W))
    assert not (result.mask & ~accepted).any()  # never a token the exact LP rejects
    p = softmax64(logits, len(W))
    decided = result.mask | ~accepted
    # with a generous budget everything decidable is decided (tokens under min_probability excepted)
    assert result.undecided_mass <= p[~decided].sum() + 1e-12
    assert (result.mask == (accepted & (p >= 1e-10))).all()
    assert result.mask_mass >= result.threshold_mass


def test_reduced_basis_is_a_relaxation():
    rng = np.random.default_rng(9)
    lost = 0
    for case in range(60):
        W = rng.normal(size=(30, 6)).astype(np.float32)
        logits = (W @ rng.normal(size=6) * 2).astype(np.float32)
        basis = bat_core.Basis(W)
        reduced = basis.reduced(2)
        p = softmax64(logits, 30)
        tokens = [int(t) for t in np.flatnonzero((p < 0.05) & (p > 1e-8))]
        if not tokens:
            continue
        full = basis.decide(logits, tokens, 0.05)
        small = reduced.decide(logits, tokens, 0.05)
        assert not (small & ~full).any()  # reduction never accepts more
        lost += int((full & ~small).sum())
    assert lost > 0  # and it does lose accepts: the test can fail both ways


def test_block_cdf_draws_the_tokens_of_the_full_cumulative_sum():
    """The sampler's two-level inverse CDF returns the token a cumulative sum over the whole vocabulary
    returns (up to a rounding tie), and never a token of probability 0, at the ends of [0, total) too."""
    from bat_core.sampler import BlockCdf

    rng = np.random.default_rng(11)
    for v in (1, 7, 256, 300, 1000, 49152):
        p = rng.random(v) ** 8
        p[rng.random(v) < 0.3] = 0.0
        p[-1] = 0.0 if v > 1 else 1.0  # a zero-probability last token: the end of [0, total) must skip it
        p /= p.sum()
        cdf, full = BlockCdf(p), np.cumsum(p)
        for r in [*rng.random(500) * cdf.total, 0.0, cdf.total, np.nextafter(cdf.total, 0.0)]:
            token = cdf.token_at(float(r))
            assert p[token] > 0
            expected = min(int(np.searchsorted(full, r, side="right")), v - 1)
            assert token == expected or min(abs(full[token] - r), abs(full[token - 1] - r)) < 1e-12
