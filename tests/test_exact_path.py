"""The exact path on hard real candidates: proofs, work budgets, and the clock as a counted safety net.

tests/fixtures/hard_smollm2.npz holds SmolLM2 candidates that certificate search alone leaves unproven
(benchmarks/hard_candidates.py): sampler draws and tail tokens at eta 0.0009, eta 0.02 and tau 0.1, each
stored as a hidden state h (the distribution is softmax(W h)), a token and its threshold setting. Rows 15-16
(eta 0.02, tail) are rejects whose feasible point only the Newton search on 8,192 tokens finds; rows 17-20
(from bench_hard_tail.py's collection) are accepts that the feasible-point search's dual iterate proves.
"""

import threading
import time

import numpy as np
import pytest
from decision_record import hard_cases
from independent import augmented, check_accept, check_reject, softmax64

import bat_core

pytest.importorskip("llama_cpp", reason="real-model tests need llama-cpp-python (scripts/setup.sh)")


@pytest.fixture(scope="module")
def cases(basis):
    """(logits, rule, token, setting) per stored candidate."""
    return hard_cases(basis)


def decide(basis, case, config):
    logits, rule, token, _ = case
    solver = bat_core.BatSolver(basis, config)
    step = solver.new_step(logits, rule)
    return solver.decide(step, [token])[0], solver.stats, step.tau


def outcome(decision, stats) -> tuple:
    """What a decision did, free of timings: reproducibility compares these."""
    return (
        decision.accepted,
        decision.method,
        dict(stats.accepts_by_source),
        stats.rejected_by_point,
        stats.lp_iterations,
        dict(stats.fallback_reasons),
    )


def test_fixture_candidates_are_hard_for_the_certificate_search(basis, cases):
    for case in cases:
        decision, _, _ = decide(basis, case, bat_core.BatConfig.for_generation(0.0))
        assert decision.method == "fallback", case[3]


@pytest.mark.slow
def test_the_exact_default_proves_every_hard_candidate(basis, cases, layer):
    """With the clock out of the way (60 s), the generation default's work budgets decide all of them, each
    with a certificate that independent dense code verifies over the whole vocabulary; where the dense
    reference LP finishes within 60 s, it gives the same answer."""
    A = augmented(layer.W)
    config = bat_core.BatConfig.for_generation(60.0)
    compared = 0
    for n, case in enumerate(cases):
        logits, _, token, name = case
        decision, stats, tau = decide(basis, case, config)
        assert decision.method != "fallback", (name, stats)
        p = softmax64(logits, basis.vocab_size)
        cert = decision.certificate
        if decision.accepted:
            check_accept(A, p, tau, token, cert.y, config.tol)
        else:
            check_reject(A, p, tau, token, cert.support, cert.q, config.tol)
        if n in (8, 13):  # the two the reference decides in 15-20 s on a 2-core machine
            ref = bat_core.reference.reference_decide_with_deadline(basis, logits, token, tau, seconds=60.0)
            if ref is not None:
                assert ref.accepted == decision.accepted, name
                compared += 1
    assert compared >= 1, "the reference finished on none of its two cases within 60 s"


def test_the_point_search_proves_the_accepts_its_dual_iterate_meets(basis, cases):
    """Rows 17-20 are accepts whose first regression iterate looks like a reject (cost ratio above
    1 / sqrt(tau')), so the feasible-point search runs before the rest of the regression: no point exists,
    and the search's dual iterate is proven as an accept certificate over the vocabulary on the way (the
    test above verifies every fixture certificate with independent code)."""
    config = bat_core.BatConfig.for_generation(60.0)
    for case in cases[17:21]:
        decision, stats, _ = decide(basis, case, config)
        assert decision.accepted and decision.method == "certificate", case[3]
        assert stats.accepts_by_source == {"point-search": 1} and stats.rejected_by_point == 0, (case[3], stats)
        # the stages it went through, timed, within the decision's own time
        stages = stats.seconds_by_stage
        assert {"certificate-search", "regression", "point-search"} <= set(stages), stages
        assert all(v > 0 for v in stages.values()) and sum(stages.values()) <= stats.seconds


def busy(stop: threading.Event) -> None:
    x = np.random.default_rng(0).standard_normal((300, 300))
    while not stop.is_set():
        x = np.tanh(x @ x.T / 300.0)  # BLAS and the interpreter both kept busy


@pytest.mark.slow
def test_work_budgets_give_the_same_decisions_on_a_loaded_machine(basis, cases):
    """The exact stages stop at counts (rounds, iterations, simplex iterations), not at a clock: the same
    decisions, stages and LP iterations with two busy threads beside as on an idle machine."""
    config = bat_core.BatConfig.for_generation(60.0, lp_iterations=300)
    chosen = [cases[n] for n in (0, 5, 10, 12, 15)]
    idle = [outcome(*decide(basis, case, config)[:2]) for case in chosen]
    stop = threading.Event()
    threads = [threading.Thread(target=busy, args=(stop,)) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        loaded = [outcome(*decide(basis, case, config)[:2]) for case in chosen]
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert loaded == idle


def test_the_lp_stops_at_its_iteration_budget_deterministically(basis, cases):
    """Only the LPs left (no proof search): a budget of 40 simplex iterations ends the decision as a counted
    'work budget' fallback, the same way twice; a budget of 0 skips the LPs."""
    lp_only = dict(lsq_refine=0, point_iterations=0, regression_iterations=0, search_levels=(), time_budget=60.0)
    runs = [outcome(*decide(basis, cases[0], bat_core.BatConfig(lp_iterations=40, **lp_only))[:2]) for _ in range(2)]
    assert runs[0] == runs[1]
    accepted, method, _, _, iterations, reasons = runs[0]
    assert (accepted, method, reasons) == (False, "fallback", {"work budget": 1}) and 0 < iterations <= 40
    decision, stats, _ = decide(basis, cases[0], bat_core.BatConfig(lp_iterations=0, **lp_only))
    assert decision.method == "fallback" and stats.fallback_reasons == {"work budget": 1} and stats.lp_solves == 0


def test_the_clock_is_a_counted_safety_net(basis, cases):
    start = time.perf_counter()
    decision, stats, _ = decide(basis, cases[0], bat_core.BatConfig(time_budget=1e-6))
    assert decision.method == "fallback" and not decision.accepted
    assert stats.fallback_reasons == {"time budget": 1}
    assert time.perf_counter() - start < 5.0
