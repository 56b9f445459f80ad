"""The hard tail: candidates that the certificate search alone leaves unproven, decided by the exact default.

    .venv/bin/python benchmarks/bench_hard_tail.py --steps 6 --limit 40

Collects them as benchmarks/hard_candidates.py does (sampler and tail draws on SmolLM2 trajectories, eta 0.0009,
eta 0.02 and tau 0.1, up to --limit of each kind per setting), then decides each with a fresh solver
(BatConfig.for_generation with the --config overrides, the clock out of the way) and prints, per setting and
kind, the decisions, the stage that proved them, median / p90 / max seconds and the unproven (fallback) count.
Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter

import numpy as np

sys.path[:0] = [
    os.path.join(os.path.dirname(__file__), "..", "adapters"),
    os.path.join(os.path.dirname(__file__), ".."),
]

from hard_candidates import collect, logits_of

import bat_core
from bat_models import output_layer, smollm2_path


def stage(decision: bat_core.Decision, stats: bat_core.BatStats) -> str:
    if decision.method == "fallback":
        return "fallback"
    if not decision.accepted:
        return "point" if stats.rejected_by_point else decision.method
    return ",".join(sorted(stats.accepts_by_source)) or decision.method


def decide_all(fixture: dict, basis: bat_core.Basis, clock: float, overrides: dict) -> list[dict]:
    config = bat_core.BatConfig.for_generation(clock, **overrides)
    rows = []
    for n in range(len(fixture["token"])):
        rule = bat_core.ThresholdRule(str(fixture["kind"][n]), float(fixture["value"][n]))
        token = int(fixture["token"][n])
        solver = bat_core.BatSolver(basis, config)
        step = solver.new_step(logits_of(basis, fixture["h"][n]), rule)
        start = time.perf_counter()
        decision = solver.decide(step, [token])[0]
        seconds = time.perf_counter() - start
        rows.append(
            {
                "setting": str(fixture["setting"][n]),
                "tail": bool(fixture["tail"][n]),
                "p": float(step.p[token]),
                "tau": step.tau,
                "accepted": bool(decision.accepted),
                "stage": stage(decision, solver.stats),
                "seconds": seconds,
            }
        )
        label = f"{rows[-1]['setting']}{' tail' if rows[-1]['tail'] else ''}"
        print(f"  {n + 1}/{len(fixture['token'])} {label}: {rows[-1]['stage']} {seconds:.3f} s", flush=True)
    return rows


def summary(rows: list[dict]) -> dict:
    seconds = np.array([r["seconds"] for r in rows])
    return {
        "candidates": len(rows),
        "accepted": sum(r["accepted"] for r in rows),
        "unproven": sum(r["stage"] == "fallback" for r in rows),
        "stages": dict(Counter(r["stage"] for r in rows)),
        "median_s": float(np.median(seconds)),
        "p90_s": float(np.percentile(seconds, 90)),
        "max_s": float(seconds.max()),
        "total_s": float(seconds.sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="steps per prompt")
    parser.add_argument("--limit", type=int, default=40, help="candidates per setting, sampler and tail each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", type=float, default=60.0, help="the safety net's seconds per decision")
    parser.add_argument("--config", default="{}", help="BatConfig overrides as JSON, e.g. '{\"regression_grow\": 512}'")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "hard_tail_smollm2.json"))
    args = parser.parse_args()
    overrides = json.loads(args.config)
    args.model = "smollm2"
    fixture = collect(args)
    layer = output_layer(smollm2_path())
    basis = bat_core.Basis(layer.W, bias=layer.bias, softcap=layer.softcap)
    basis.prepare()
    rows = decide_all(fixture, basis, args.clock, overrides)
    report = {"steps": args.steps, "limit": args.limit, "seed": args.seed, "config": overrides, "groups": {}}
    report["rows"] = rows
    print(f"\n{'setting':18s} {'n':>4s} {'acc':>4s} {'unproven':>8s} {'median':>8s} {'p90':>8s} {'max':>8s}  stages")
    for name in dict.fromkeys(r["setting"] for r in rows):
        for tail in (False, True):
            group = [r for r in rows if r["setting"] == name and r["tail"] == tail]
            if not group:
                continue
            key = f"{name}{' tail' if tail else ''}"
            s = report["groups"][key] = summary(group)
            print(
                f"{key:18s} {s['candidates']:4d} {s['accepted']:4d} {s['unproven']:8d} {s['median_s']:8.3f}"
                f" {s['p90_s']:8.3f} {s['max_s']:8.3f}  {s['stages']}"
            )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
