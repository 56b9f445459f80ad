"""Core benchmark: exact BAT decisions on real next-token distributions, fast path vs. reference.

    python benchmarks/bench_core.py --model smollm2 --candidates 200 --reference 20

For each setting (eta eps=0.0009 and 0.02; fixed tau=0.1) it draws sub-threshold candidates as the
sampler meets them (from p_hat restricted to p < tau) and tail candidates (p in [1e-6, tau/10], drawn in
proportion to p) on trajectories sampled from the model in llama.cpp, decides them with the adapters'
exact default (BatConfig.for_generation: one BatSolver per trajectory, warm across steps, as a request
would) and with certificate search alone, and decides the first --reference sampler candidates with the
dense reference LP. Prints a table, writes JSON.
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

import bat_core
from bat_core.reference import reference_decide_with_deadline
from bat_llamacpp.trajectories import load_llama, sampled_logits
from bat_models import (
    gemma3_270m_path,
    output_layer,
    smollm2_path,
)

PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    "def fibonacci(n):",
    "In 1905, Albert Einstein published",
    "My favourite food is",
    "The weather today",
    "Dear hiring manager,",
    "The mitochondria is",
    "To bake bread, first",
    "The stock market",
    "She opened the door and",
    "import numpy as np\n",
    "The history of Rome",
    "Water boils at",
    "Q: What is the tallest mountain?\nA:",
    "The best way to learn",
    "In the beginning",
    "Breaking news:",
    "The recipe calls for",
    "He looked at the sky and",
]


def settings():
    return {
        "eta_0.0009": bat_core.ThresholdRule("eta", 0.0009),
        "eta_0.02": bat_core.ThresholdRule("eta", 0.02),
        "tau_0.1": bat_core.ThresholdRule("tau", 0.1),
    }


def model_path(name: str) -> str:
    return {"smollm2": smollm2_path, "gemma3": gemma3_270m_path}.get(name, lambda: name)()


def percentile(values, q):
    return float(np.percentile(values, q)) if len(values) else float("nan")


def candidate_draws(step, rng: np.random.Generator) -> tuple[int | None, int | None]:
    """A sub-threshold token as the sampler meets it (p restricted to p < tau, the argmax left out), and a
    tail token (p in [1e-6, tau / 10], drawn in proportion to p, as mask mode and large-eps settings meet them)."""
    p = step.p
    below = np.flatnonzero(p < step.tau)
    below = below[below != step.argmax]
    deep = below[(p[below] < step.tau / 10) & (p[below] >= 1e-6)]
    return tuple(int(rng.choice(s, p=p[s] / p[s].sum())) if s.size else None for s in (below, deep))


def decide_row(solver, cert_solver, reduced_solver, step, z, tau_of, token: int, tail: bool) -> dict:
    """One candidate decided by the exact path (warm across the trajectory) and by certificate search alone."""
    products = solver.stats.vocabulary_products
    reasons = dict(solver.stats.fallback_reasons)
    start = time.perf_counter()
    decision = solver.decide(step, [token])[0]
    reason = [k for k, n in solver.stats.fallback_reasons.items() if n > reasons.get(k, 0)]
    row = {
        "tail": bool(tail),
        "token": token,
        "p": float(step.p[token]),
        "tau": step.tau,
        "accepted": decision.accepted,
        "method": decision.method,
        "seconds": time.perf_counter() - start,
        "fallback_reason": reason[0] if reason else None,
        "vocabulary_products": solver.stats.vocabulary_products - products,
    }
    start = time.perf_counter()
    cert_only = cert_solver.decide(cert_solver.new_step(z, tau_of), [token])[0]
    row.update(
        cert_only_accepted=cert_only.accepted,
        cert_only_proven=cert_only.method != "fallback",
        cert_only_seconds=time.perf_counter() - start,
    )
    if reduced_solver is not None and decision.method != "fallback":
        start = time.perf_counter()
        small = reduced_solver.decide(reduced_solver.new_step(z, tau_of), [token])[0]
        row.update(reduced_accepted=small.accepted, reduced_seconds=time.perf_counter() - start)
    return row


def kind_summary(rows: list[dict]) -> dict:
    """Median and p99 per decision, and the share left unproven, for the exact path and certificate search."""
    fast = [r["seconds"] for r in rows]
    return {
        "candidates": len(rows),
        "median_ms": 1e3 * percentile(fast, 50),
        "p99_ms": 1e3 * percentile(fast, 99),
        "unproven_pct": 100.0 * sum(r["method"] == "fallback" for r in rows) / max(len(rows), 1),
        "fallback_reasons": dict(Counter(r["fallback_reason"] for r in rows if r["method"] == "fallback")),
        "certificate_only_median_ms": 1e3 * percentile([r["cert_only_seconds"] for r in rows], 50),
        "certificate_only_unproven_pct": 100.0 * sum(not r["cert_only_proven"] for r in rows) / max(len(rows), 1),
    }


def run(args) -> dict:
    path = model_path(args.model)
    t0 = time.perf_counter()
    layer = output_layer(path)
    basis = bat_core.Basis(layer.W, bias=layer.bias, softcap=layer.softcap)
    basis.prepare()
    setup_s = time.perf_counter() - t0
    print(
        f"model {os.path.basename(path)}: v={basis.vocab_size} d={basis.hidden_size}, basis set-up {setup_s:.1f}s",
        flush=True,
    )
    llm = load_llama(path)
    steps = max(1, int(np.ceil(args.candidates / len(PROMPTS))))
    logits = sampled_logits(llm, PROMPTS, steps=steps, seed=args.seed)
    del llm
    report = {
        "model": os.path.basename(path),
        "vocab": basis.vocab_size,
        "hidden": basis.hidden_size,
        "basis_setup_s": setup_s,
        "settings": {},
    }
    rng = np.random.default_rng(args.seed)
    config = bat_core.BatConfig.for_generation(args.time_budget)
    report["time_budget_s"] = args.time_budget
    for name, tau_of in settings().items():
        rows = []
        for traj in range(len(PROMPTS)):
            solver = bat_core.BatSolver(basis, config)  # one request per trajectory: warm model, certificate cache
            reduced_solver = bat_core.BatSolver(basis.reduced_cached(args.directions)) if args.directions else None
            # certificate search alone (bat_time_budget=0): no proof search, no LP
            cert_solver = bat_core.BatSolver(basis, bat_core.BatConfig.for_generation(0.0))
            for k in range(steps):
                z = logits[traj * steps + k]
                step = solver.new_step(z, tau_of)
                for tail, token in enumerate(candidate_draws(step, rng)):
                    if token is None:
                        continue
                    rows.append(decide_row(solver, cert_solver, reduced_solver, step, z, tau_of, token, tail))
                    rows[-1]["row"] = traj * steps + k
            if sum(not r["tail"] for r in rows) >= args.candidates:
                break
        tail_rows = [r for r in rows if r["tail"]]
        rows = [r for r in rows if not r["tail"]][: args.candidates]
        ref_rows = []
        for i, row in enumerate(rows[: args.reference]):
            started = time.perf_counter()
            ref = reference_decide_with_deadline(
                basis, logits[row["row"]], row["token"], row["tau"], args.reference_limit
            )
            if ref is None:
                row.update(
                    ref_accepted=None,
                    ref_seconds=time.perf_counter() - started,
                    ref_status="time limit",
                    ref_relative_infeasibility=None,
                )
            else:
                row.update(
                    ref_accepted=ref.accepted,
                    ref_seconds=ref.seconds,
                    ref_status=ref.status,
                    ref_relative_infeasibility=ref.relative_infeasibility,
                )
            ref_rows.append(row)
            print(
                f"  [{name}] reference {i + 1}/{min(args.reference, len(rows))}: {row['ref_seconds']:.1f}s"
                f" {row['ref_status']}",
                flush=True,
            )
        fast = [r["seconds"] for r in rows]
        methods = {m: sum(r["method"] == m for r in rows) for m in ("certificate", "lp", "fallback", "resolution")}
        summary = {
            "candidates": len(rows),
            "fast_median_ms": 1e3 * percentile(fast, 50),
            "fast_p99_ms": 1e3 * percentile(fast, 99),
            "accepted": sum(r["accepted"] for r in rows),
            "rejected": sum(not r["accepted"] for r in rows),
            "by_method": methods,
            "rejected_by_point": sum(r["method"] == "certificate" and not r["accepted"] for r in rows),
            # certificate checks past the cheap bound of the tail: a product over the vocabulary each
            "vocabulary_products": sum(r["vocabulary_products"] for r in rows),
            # every decision but a fallback or one below float64's resolution carries a certificate verified
            # over the whole vocabulary: a proof that it is the exact LP's answer (up to the tolerance band)
            "proven_pct": 100.0 * (1.0 - (methods["fallback"] + methods["resolution"]) / max(len(rows), 1)),
            "reference_decisions": len(ref_rows),
            # reference runs cut at the limit count at the limit: the true medians are at least these
            "reference_median_s": percentile([r["ref_seconds"] for r in ref_rows], 50),
            "reference_p99_s": percentile([r["ref_seconds"] for r in ref_rows], 99),
            "reference_timeouts": sum(r["ref_status"] != "Optimal" for r in ref_rows),
            "agreement_pct": 100.0
            * np.mean([r["accepted"] == r["ref_accepted"] for r in ref_rows if r["ref_status"] == "Optimal"])
            if any(r["ref_status"] == "Optimal" for r in ref_rows)
            else float("nan"),
        }
        summary["certificate_only"] = {
            "median_ms": 1e3 * percentile([r["cert_only_seconds"] for r in rows], 50),
            "p99_ms": 1e3 * percentile([r["cert_only_seconds"] for r in rows], 99),
            "accepted": sum(r["cert_only_accepted"] for r in rows),
            "accepts_lost": sum(r["accepted"] and not r["cert_only_accepted"] for r in rows),
            "accepted_where_exact_path_fell_back": sum(
                r["cert_only_accepted"] and r["method"] == "fallback" for r in rows
            ),
        }
        if args.directions:
            summary["reduced"] = {
                "directions": args.directions,
                "median_ms": 1e3 * percentile([r["reduced_seconds"] for r in rows if "reduced_seconds" in r], 50),
                "compared": sum("reduced_accepted" in r for r in rows),  # fallbacks of the exact path left out
                "accepts_lost": sum(r["accepted"] and not r.get("reduced_accepted", True) for r in rows),
                "accepts_gained": sum(r.get("reduced_accepted", False) and not r["accepted"] for r in rows),
            }
        summary["sampler"], summary["tail"] = kind_summary(rows), kind_summary(tail_rows)
        if ref_rows:
            summary["speedup_median"] = summary["reference_median_s"] * 1e3 / summary["fast_median_ms"]
        report["settings"][name] = {"summary": summary, "rows": rows + tail_rows}
        print_table(name, summary)
    return report


def print_table(name: str, s: dict) -> None:
    m = s["by_method"]
    print(f"\n== {name}: {s['candidates']} sub-threshold candidates")
    print(f"  fast path      median {s['fast_median_ms']:8.1f} ms   p99 {s['fast_p99_ms']:8.1f} ms")
    print(
        f"  reference      median {s['reference_median_s'] * 1e3:8.1f} ms   p99 {s['reference_p99_s'] * 1e3:8.1f} ms"
        f"   ({s['reference_decisions']} decisions, {s['reference_timeouts']} past the limit)"
    )
    if "speedup_median" in s:
        print(f"  speed-up at the median: {s['speedup_median']:.0f}x   agreement {s['agreement_pct']:.1f}%")
    c = s["certificate_only"]
    print(
        f"  certificate search only (time_budget=0): median {c['median_ms']:.1f} ms, p99 {c['p99_ms']:.1f} ms,"
        f" accepted {c['accepted']}, accepts lost vs. the exact path {c['accepts_lost']}"
    )
    if "reduced" in s:
        r = s["reduced"]
        print(
            f"  reduced to {r['directions']} directions: median {r['median_ms']:.1f} ms, accepts lost "
            f"{r['accepts_lost']},"
            f" gained {r['accepts_gained']} (must be 0)"
        )
    print(
        f"  accepted {s['accepted']}  rejected {s['rejected']}   by certificate {m['certificate']}"
        f" ({s['rejected_by_point']} of them rejects by a feasible point)  by LP {m['lp']}"
        f"  fallback {m['fallback']}  below resolution {m['resolution']}   proven {s['proven_pct']:.1f}%"
    )
    for kind in ("sampler", "tail"):
        k = s[kind]
        print(
            f"  {kind:8s} {k['candidates']:4d} candidates: exact path median {k['median_ms']:.1f} ms, p99 "
            f"{k['p99_ms']:.1f} ms, unproven {k['unproven_pct']:.1f}%"
            f"{' ' + str(k['fallback_reasons']) if k['fallback_reasons'] else ''}; certificate search alone median "
            f"{k['certificate_only_median_ms']:.1f} ms,"
            f" unproven {k['certificate_only_unproven_pct']:.1f}%"
        )
    print(
        f"  certificate checks past the cheap bound: {s['vocabulary_products']} (a product over the vocabulary each)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2, gemma3, or a GGUF path")
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--reference", type=int, default=20, help="how many candidates the reference LP decides too")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--time-budget",
        type=float,
        default=bat_core.GENERATION_TIME_BUDGET,
        help="the clock per decision (a safety net: the work budgets end decisions first)",
    )
    parser.add_argument("--reference-limit", type=float, default=120.0, help="HiGHS time limit of each reference LP")
    parser.add_argument(
        "--directions", type=int, default=0, help="also decide with constraint reduction to k directions"
    )
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/core_<model>.json)")
    args = parser.parse_args()
    report = run(args)
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"core_{os.path.basename(args.model)}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as handle:
        json.dump(report, handle, indent=1)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
