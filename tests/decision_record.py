"""The decisions of the core on fixed cases, recorded so that a change meant to keep behaviour can show it.

A record line per case: its name, accept or reject, the decision's method and the stage that settled it
(an accept's source, a feasible point, a fallback's reason). Cases: small random problems (as in
test_random_agreement.py, default config), the hard SmolLM2 candidates of tests/fixtures/hard_smollm2.npz
and other sub-threshold tokens of the same distributions (the generation default with the clock out of
the way), and a seeded sampler and mask over those distributions in turn (a request's state across steps).

    .venv/bin/python tests/decision_record.py            # compare with tests/fixtures/decisions.json
    .venv/bin/python tests/decision_record.py --write    # after a change meant to alter decisions
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from independent import softmax64
from test_random_agreement import TAUS, near_boundary_tau, random_case

import bat_core

HERE = os.path.dirname(__file__)
RECORD = os.path.join(HERE, "fixtures", "decisions.json")
HARD = os.path.join(HERE, "fixtures", "hard_smollm2.npz")
CLOCK = 120.0  # seconds: far above what the work budgets cost, so that only counts end a decision


def stage(decision: bat_core.Decision, stats: bat_core.BatStats) -> str:
    """What settled one decision of a fresh solver, free of timings."""
    if decision.method == "fallback":
        return "fallback:" + ",".join(sorted(stats.fallback_reasons))
    if decision.accepted:
        return "accept:" + ",".join(sorted(stats.accepts_by_source)) if stats.accepts_by_source else "accept"
    return "reject:point" if stats.rejected_by_point else "reject"


def decided(basis: bat_core.Basis, logits: np.ndarray, rule, token: int, config: bat_core.BatConfig) -> str:
    solver = bat_core.BatSolver(basis, config)
    decision = solver.decide(solver.new_step(logits, rule), [token])[0]
    return f"{'accept' if decision.accepted else 'reject'} {decision.method} {stage(decision, solver.stats)}"


def random_cases(seed: int = 5, count: int = 400) -> dict[str, str]:
    rng = np.random.default_rng(seed)
    kinds = ["plain", "duplicates", "zero_rows", "wide", "low_rank"]
    out = {}
    for case in range(count):
        W, logits = random_case(rng, kinds[case % len(kinds)])
        p = softmax64(logits, len(W))
        tau = near_boundary_tau(p, rng) if case % 7 == 0 else float(rng.choice(TAUS))
        below = np.flatnonzero(p < tau)
        if below.size:
            token = int(rng.choice(below))
            out[f"random {case}"] = decided(bat_core.Basis(W), logits, tau, token, bat_core.BatConfig())
    return out


def hard_cases(basis: bat_core.Basis) -> list[tuple[np.ndarray, bat_core.ThresholdRule, int, str]]:
    """(logits, rule, token, setting) per candidate of the hard fixture (logits = W h, SmolLM2 has no bias)."""
    f = np.load(HARD)
    W64 = basis.W.astype(np.float64)
    return [
        (
            W64 @ f["h"][n].astype(np.float64),
            bat_core.ThresholdRule(str(f["kind"][n]), float(f["value"][n])),
            int(f["token"][n]),
            f"{f['setting'][n]}{' tail' if f['tail'][n] else ''}",
        )
        for n in range(len(f["token"]))
    ]


def real_cases(basis: bat_core.Basis) -> dict[str, str]:
    """Each hard candidate, and the sub-threshold tokens at ranks tau-crossing + 0, 5 and 50 of its row."""
    config = bat_core.BatConfig.for_generation(CLOCK)
    out = {}
    for n, (logits, rule, token, _) in enumerate(hard_cases(basis)):
        out[f"hard {n}"] = decided(basis, logits, rule, token, config)
        p = softmax64(logits, basis.vocab_size)
        order = np.argsort(-p, kind="stable")
        first = int(np.searchsorted(-p[order], -rule.tau(p), side="right"))
        for offset in (0, 5, 50):
            t = int(order[first + offset])
            out[f"hard {n} rank {first + offset}"] = decided(basis, logits, rule, t, config)
    return out


def request_cases(basis: bat_core.Basis) -> dict[str, str]:
    """A seeded sampler over the hard rows in turn (one request: its cache and LP carry over), then a mask."""
    config = bat_core.BatConfig.for_generation(CLOCK)
    rows = hard_cases(basis)
    sampler = bat_core.BatSampler(basis, bat_core.ThresholdRule("eta", 0.0009), seed=7, config=config)
    tokens = [sampler.sample(logits, step=k).token for k, (logits, *_) in enumerate(rows)]
    s = sampler.stats
    out = {
        "sampler tokens": " ".join(map(str, tokens)),
        "sampler stats": f"accepted_below_tau={s.accepted_below_tau} by_certificate={s.by_certificate} "
        f"by_lp={s.by_lp} fallbacks={s.fallbacks}",
    }
    masker = bat_core.BatSampler(basis, bat_core.ThresholdRule("eta", 0.02), seed=7, config=config, mask_budget=CLOCK)
    for k, (logits, *_) in enumerate(rows[:4]):
        m = masker.mask(logits, step=k)
        proven = " ".join(map(str, sorted(int(t) for t in m.accepted_below_tau_ids)))
        out[f"mask {k}"] = f"kept={int(m.mask.sum())} rejected={m.rejected} undecided={m.undecided} proven={proven}"
    return out


def record(basis: bat_core.Basis) -> dict[str, str]:
    return {**random_cases(), **real_cases(basis), **request_cases(basis)}


def smollm2_basis() -> bat_core.Basis:
    from bat_models import output_layer, smollm2_path

    layer = output_layer(smollm2_path())
    return bat_core.Basis(layer.W, bias=layer.bias, softcap=layer.softcap)


def differences(expected: dict[str, str], actual: dict[str, str]) -> list[str]:
    return [
        f"{k}: recorded {expected.get(k)!r}, now {actual.get(k)!r}"
        for k in sorted(set(expected) | set(actual))
        if expected.get(k) != actual.get(k)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write the record to {RECORD}")
    args = parser.parse_args()
    bat_core.limit_blas_threads()
    actual = record(smollm2_basis())
    if args.write:
        with open(RECORD, "w") as f:
            json.dump(actual, f, indent=0, sort_keys=True)
            f.write("\n")
        print(f"wrote {len(actual)} decisions to {RECORD}")
        return
    with open(RECORD) as f:
        diff = differences(json.load(f), actual)
    print("\n".join(diff) or f"all {len(actual)} decisions as recorded")
    raise SystemExit(1 if diff else 0)


if __name__ == "__main__":
    main()
