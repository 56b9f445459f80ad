"""Certificate search alone (time_budget=0, no LP): how many sub-threshold candidates it proves, with
and without the reweighted least-squares pass, on real SmolLM2 distributions.

    python benchmarks/bench_certificates.py --rule eta --value 0.0009
    python benchmarks/bench_certificates.py --rule tau --value 0.1

Distributions come from 4 prompts x 30 steps of SmolLM2's own sampling in llama.cpp; two candidates
per step are drawn below tau in proportion to p_hat (as the paper's sampler meets them). One request
solver per setting decides them in order (its certificate cache included). Prints and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path[:0] = [
    os.path.join(os.path.dirname(__file__), "..", "adapters"),
    os.path.join(os.path.dirname(__file__), ".."),
]

import bat_core
from bat_llamacpp.trajectories import load_llama, sampled_logits
from bat_models import (
    basis_for,
    smollm2_path,
)

PROMPTS = ["Once upon a time", "The history of Rome", "Dear hiring manager,", "To bake bread, first"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rule", choices=("eta", "epsilon", "tau"), default="eta")
    parser.add_argument("--value", type=float, default=0.0009)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--refine", type=int, nargs="+", default=[0, 3], help="lsq_refine values to compare")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    bat_core.limit_blas_threads()
    rule = bat_core.ThresholdRule(args.rule, args.value)
    logits = sampled_logits(load_llama(smollm2_path()), PROMPTS, args.steps)
    basis = basis_for(smollm2_path())
    basis.prepare(bat_core.BatConfig())
    rng = np.random.default_rng(0)
    cases = []
    for z in logits:
        p, tau = rule.probabilities_and_tau(z)
        below = np.flatnonzero(p < tau)
        if len(below):
            cases += [(z, int(t)) for t in rng.choice(below, size=2, p=p[below] / p[below].sum())]
    rows = []
    for refine in args.refine:
        solver = bat_core.BatSolver(basis, bat_core.BatConfig(time_budget=0.0, lsq_refine=refine))
        seconds = []
        for z, token in cases:
            start = time.perf_counter()
            solver.decide(solver.new_step(z, rule), [token])
            seconds.append(time.perf_counter() - start)
        stats = solver.stats
        rows.append(
            {
                "lsq_refine": refine,
                "candidates": len(cases),
                "accepted": stats.accepted,
                "unproven": stats.fallbacks,
                "median_ms": 1000 * float(np.median(seconds)),
                "mean_ms": 1000 * float(np.mean(seconds)),
                "accepts_by_source": stats.accepts_by_source,
            }
        )
        print(
            f"{args.rule} {args.value}: lsq_refine={refine}: {stats.accepted}/{len(cases)} proven, "
            f"{stats.fallbacks} unproven, median {rows[-1]['median_ms']:.1f} ms, mean {rows[-1]['mean_ms']:.1f} ms, "
            f"by source {stats.accepts_by_source}",
            flush=True,
        )
    out = args.out or os.path.join(
        os.path.dirname(__file__), "results", f"certificates_{args.rule}_{args.value:g}.json"
    )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as handle:
        json.dump({"rule": args.rule, "value": args.value, "rows": rows}, handle, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
