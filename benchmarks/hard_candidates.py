"""Collect hard BAT candidates from real trajectories: the ones certificate search alone leaves unproven.

    python benchmarks/hard_candidates.py --model smollm2 --steps 12 --limit 6 --out tests/fixtures/hard_smollm2.npz

Each candidate is stored small: the hidden state h with W h (+ b) the step's logits (least squares on the
llama.cpp logits row), the token and the threshold setting. Tests and benchmarks rebuild the
distribution from W and h, so a fixture is a few KB per candidate and a real model's distribution.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path[:0] = [
    os.path.join(os.path.dirname(__file__), "..", "adapters"),
    os.path.join(os.path.dirname(__file__), ".."),
]

from bench_core import PROMPTS, candidate_draws, model_path

import bat_core
from bat_llamacpp.trajectories import load_llama, sampled_logits
from bat_models import output_layer

SETTINGS = {"eta_0.0009": ("eta", 0.0009), "eta_0.02": ("eta", 0.02), "tau_0.1": ("tau", 0.1)}


def hidden_states(basis: bat_core.Basis, logits: np.ndarray) -> np.ndarray:
    """h with W h + b closest to each logits row (float64 normal equations on the basis' Gram matrix)."""
    d = basis.hidden_size
    z = logits.astype(np.float64) - (0.0 if basis.bias is None else basis.bias)
    rhs = basis.W.T.astype(np.float64) @ z.T  # [d, n]
    return np.linalg.solve(basis.gram[:d, :d], rhs).T.astype(np.float32)


def logits_of(basis: bat_core.Basis, h: np.ndarray) -> np.ndarray:
    """The fixture's logits row: W h (+ b) in float64."""
    z = basis.W.astype(np.float64) @ h.astype(np.float64)
    return z if basis.bias is None else z + basis.bias


def collect(args) -> dict:
    layer = output_layer(model_path(args.model))
    basis = bat_core.Basis(layer.W, bias=layer.bias, softcap=layer.softcap)
    if basis.softcap is not None:
        raise SystemExit("soft-capped models are not linear in h: store logits rows instead")
    llm = load_llama(model_path(args.model))
    H = hidden_states(basis, sampled_logits(llm, PROMPTS, steps=args.steps, seed=args.seed))
    del llm
    rng = np.random.default_rng(args.seed)
    out = {"h": [], "token": [], "kind": [], "value": [], "setting": [], "tail": []}
    for name, (kind, value) in SETTINGS.items():
        rule = bat_core.ThresholdRule(kind, value)
        found = [0, 0]
        for h in H:
            solver = bat_core.BatSolver(basis, bat_core.BatConfig.for_generation(0.0))
            step = solver.new_step(logits_of(basis, h), rule)
            for tail, token in enumerate(candidate_draws(step, rng)):
                if token is None or found[tail] >= args.limit or solver.decide(step, [token])[0].method != "fallback":
                    continue
                for key, item in (
                    ("h", h),
                    ("token", token),
                    ("kind", kind),
                    ("value", value),
                    ("setting", name),
                    ("tail", bool(tail)),
                ):
                    out[key].append(item)
                found[tail] += 1
        print(f"{name}: certificate search left {found[0]} sampler and {found[1]} tail candidates unproven", flush=True)
    return {key: np.array(items) for key, items in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--steps", type=int, default=12, help="steps per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=1000, help="candidates kept per setting, sampler and tail each")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    fixture = collect(args)
    np.savez_compressed(args.out, model=args.model, **fixture)
    print(f"wrote {args.out}: {len(fixture['token'])} candidates")


if __name__ == "__main__":
    main()
