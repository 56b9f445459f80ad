"""The paper's sampler and the mask mode on small random models (exact reference available)."""

import numpy as np
from independent import softmax64

import bat_core


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
    for _ in range(60):
        W = rng.normal(size=(30, 6)).astype(np.float32)
        logits = (W @ rng.normal(size=6) * 2).astype(np.float32)
        basis = bat_core.Basis(W)
        reduced = basis.reduced(2)
        p = softmax64(logits, 30)
        tokens = [int(t) for t in np.flatnonzero((p < 0.05) & (p > 1e-8))]
        if not tokens:
            continue
        full = bat_core.decide(basis, logits, tokens, 0.05)
        small = bat_core.decide(reduced, logits, tokens, 0.05)
        assert not (small & ~full).any()  # reduction never accepts more
        lost += int((full & ~small).sum())
    assert lost > 0  # and it does lose accepts: the test can fail both ways


def test_block_gumbel_race_draws_from_p_and_never_a_zero_or_removed_token():
    """The sampler's two-level Gumbel race is an exact categorical draw: frequencies match p (a block
    boundary inside the vocabulary and a short last block included), tokens of weight 0 and removed
    tokens never come, and the draw stops when no mass is left."""
    from bat_core.sampler import BlockGumbelRace

    rng = np.random.default_rng(11)
    for v in (1, 7, 300, 1000):
        p = rng.random(v) ** 2
        p[rng.random(v) < 0.3] = 0.0
        p[0] = 1.0
        race = BlockGumbelRace(p)
        removed = [int(t) for t in np.flatnonzero(p)[1:3]]
        for t in removed:
            race.remove(t)
        expected = p.copy()
        expected[removed] = 0.0
        expected /= expected.sum()
        draws = 20_000
        counts = np.bincount([race.draw(rng) for _ in range(draws)], minlength=v)
        assert counts[expected == 0].sum() == 0
        # every token within 5 standard deviations of its binomial count
        sd = np.sqrt(draws * expected * (1 - expected))
        assert (np.abs(counts - draws * expected) <= 5 * sd + 1).all()
    race = BlockGumbelRace(np.array([0.0, 2.0, 0.0]))
    race.remove(1)
    assert race.draw(rng) is None


def test_block_gumbel_race_keeps_a_seeded_draw_under_small_changes_of_the_logits():
    """Engines round logits differently in different batches (vLLM's CPU build: about 3e-5). With the
    same random numbers, such noise changes under 1% of draws over a real-sized vocabulary."""
    from bat_core.sampler import BlockGumbelRace

    rng = np.random.default_rng(5)
    changed, trials = 0, 400
    for trial in range(trials):
        z = rng.normal(0.0, 3.0, 49152)
        noisy = z + rng.normal(0.0, 3e-5, z.shape)
        draws = []
        for logits in (z, noisy):
            p = np.exp(logits - logits.max())
            draws.append(BlockGumbelRace(p / p.sum()).draw(np.random.default_rng(trial)))
        changed += draws[0] != draws[1]
    assert changed < 0.01 * trials


def test_mask_mode_takes_candidates_in_the_order_of_a_stable_sort():
    """`most_probable_first` sorts lazily (a partition for the first few): the order is a stable sort's, ties
    (here many, from rounded probabilities) by token id, past the partitioned head too."""
    from bat_core.sampler import most_probable_first

    rng = np.random.default_rng(10)
    for v, first in ((50, 256), (2000, 16), (2000, 256), (5000, 1)):
        p = np.round(rng.random(v), 2)
        tokens = np.flatnonzero(rng.random(v) < 0.7)
        expected = tokens[np.argsort(-p[tokens], kind="stable")]
        assert list(most_probable_first(p, tokens, first)) == expected.tolist()
