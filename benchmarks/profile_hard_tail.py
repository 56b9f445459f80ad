"""Where the exact path's time goes on the hard fixture's candidates (tests/fixtures/hard_smollm2.npz: SmolLM2
candidates that the certificate search alone leaves unproven): each decided by the generation default with a
60 s clock and a fresh solver, under cProfile. Prints each decision and the costliest functions.

    .venv/bin/python benchmarks/profile_hard_tail.py [--top 14]
"""

import argparse
import cProfile
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from decision_record import hard_cases  # the fixture's loader, shared with the tests

import bat_core
from bat_models import output_layer, smollm2_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=14, help="functions to list, by their own time")
    args = parser.parse_args()
    layer = output_layer(smollm2_path())
    basis = bat_core.Basis(layer.W, bias=layer.bias, softcap=layer.softcap)
    basis.prepare()
    config = bat_core.BatConfig.for_generation(60.0)
    profile = cProfile.Profile()
    for logits, rule, token, setting in hard_cases(basis):
        solver = bat_core.BatSolver(basis, config)
        step = solver.new_step(logits, rule)
        start = time.perf_counter()
        profile.enable()
        decision = solver.decide(step, [token])[0]
        profile.disable()
        seconds = time.perf_counter() - start
        source = dict(solver.stats.accepts_by_source) or {"point": solver.stats.rejected_by_point}
        print(f"{setting:16s} accepted={decision.accepted!s:5s} {decision.method:11s} {seconds:6.3f} s {source}")
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
