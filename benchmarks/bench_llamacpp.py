"""llama.cpp throughput: BAT sampling against plain eta sampling, same prompts, seeds and lengths, one run.

    python benchmarks/bench_llamacpp.py --model smollm2 --prompts 10 --max-tokens 64
    python benchmarks/bench_llamacpp.py --model gemma3 --prompts 6 --max-tokens 64
    python benchmarks/bench_llamacpp.py --mode mask      # BAT's proven set, llama.cpp's sampler draws

Three samplers per prompt, in rotating order so that drift on a shared machine hits all alike:
- BAT: the adapter's processor at the head of llama.cpp's chain (eta base, eps 0.0009, sample or mask mode);
- plain eta: the same threshold rule through the same hook, without the LP (the baseline of the target);
- native: llama.cpp's own draw with no Python processor (what the hook itself costs).
Prints a table and writes JSON (tokens/s, the share of time inside BAT, BAT's decisions).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path[:0] = [
    os.path.join(os.path.dirname(__file__), "..", "adapters"),
    os.path.join(os.path.dirname(__file__), ".."),
]

from bench_prompts import PROMPTS

import bat_core
from bat_core.sampler import MASK_CANDIDATES
from bat_llamacpp import BatLlama, EtaLogitsProcessor, rule_from
from bat_llamacpp.cli import load_llama, run_generation
from bat_llamacpp.processor import GENERATION_TIME_BUDGET, neutral_sampling_kwargs
from bat_models import gemma3_270m_path, smollm2_path


class Native:
    """llama.cpp's own sampling (temperature 1, no truncation), no Python processor in the chain."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def completion_kwargs(self) -> dict:
        kwargs = neutral_sampling_kwargs(None, self.seed)
        kwargs.pop("logits_processor")
        return kwargs


def model_path(name: str) -> str:
    return {"smollm2": smollm2_path, "gemma3": gemma3_270m_path}.get(name, lambda: name)()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2, gemma3, or a GGUF path")
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--eps", type=float, default=0.0009)
    parser.add_argument("--time-budget", type=float, default=GENERATION_TIME_BUDGET)
    parser.add_argument("--mode", default="sample", choices=["sample", "mask"], help="BAT's mode")
    parser.add_argument("--mask-candidates", type=int, default=MASK_CANDIDATES, help="mask mode: decisions per step")
    parser.add_argument("--config", default="{}", help="BatConfig overrides as JSON, e.g. '{\"lsq_refine\": 0}'")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/llamacpp_<model>.json)")
    args = parser.parse_args()
    path = model_path(args.model)
    llm = load_llama(path, n_ctx=args.max_tokens + 128, seed=0)
    t0 = time.perf_counter()
    bat = BatLlama(llm)
    config = bat_core.BatConfig.for_generation(args.time_budget, **json.loads(args.config))
    bat.warm_up(config)
    prepare_s = time.perf_counter() - t0
    rule = rule_from(eta=args.eps)
    prompts = (PROMPTS * (args.prompts // len(PROMPTS) + 1))[: args.prompts]

    def make(kind: str, seed: int):
        if kind == "bat":
            return bat.processor(
                eta=args.eps, seed=seed, config=config, mode=args.mode, mask_candidates=args.mask_candidates
            )
        if kind == "eta":
            return EtaLogitsProcessor(rule, seed=seed)
        return Native(seed)

    kinds = ["bat", "eta", "native"]
    for kind in kinds:  # warm-up: first decode, first HiGHS model, caches
        run_generation(llm, "Hello", 8, make(kind, 0))
    runs = []
    for n, prompt in enumerate(prompts):
        order = kinds[n % 3 :] + kinds[: n % 3]
        row = {"prompt": prompt, "seed": n}
        for kind in order:
            proc = make(kind, n)
            out = run_generation(llm, prompt, args.max_tokens, proc)
            row[kind] = {
                "tokens": len(out["tokens"]),
                "seconds": out["seconds"],
                "tokens_per_second": len(out["tokens"]) / max(out["seconds"], 1e-9),
            }
            if kind == "bat":
                row[kind]["bat_seconds"] = proc.stats.bat_seconds
                row[kind]["below_tau"] = proc.stats.below_tau
                row[kind]["mask_accepted_below_tau"] = proc.stats.mask_accepted_below_tau
                row[kind]["mask_undecided_mass"] = proc.stats.mask_undecided_mass
                row[kind]["core"] = proc.stats.core
        runs.append(row)
        print(
            f"[{n + 1}/{len(prompts)}] {prompt[:28]:28s} "
            + "  ".join(f"{k} {row[k]['tokens_per_second']:6.1f} tok/s" for k in kinds),
            flush=True,
        )

    def total(kind: str, key: str) -> float:
        return float(sum(r[kind][key] for r in runs))

    tps = {k: total(k, "tokens") / total(k, "seconds") for k in kinds}
    per_run = [r["bat"]["tokens_per_second"] / r["eta"]["tokens_per_second"] for r in runs]
    cores = [r["bat"]["core"] for r in runs]
    sub_tau = sum(c["candidates"] - c["by_threshold"] for c in cores)
    sources: dict[str, int] = {}
    stage_seconds: dict[str, float] = {}
    for c in cores:
        for k, v in c.get("accepts_by_source", {}).items():
            sources[k] = sources.get(k, 0) + v
        for k, v in c.get("seconds_by_stage", {}).items():
            stage_seconds[k] = stage_seconds.get(k, 0.0) + v
    summary = {
        "model": path,
        "vocab": bat.basis.vocab_size,
        "hidden": bat.basis.hidden_size,
        "prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "eps": args.eps,
        "time_budget": args.time_budget,
        "mode": args.mode,
        "mask_candidates": args.mask_candidates,
        "tokens_per_second": tps,
        "ratio_bat_to_eta": tps["bat"] / tps["eta"],
        "ratio_median_per_prompt": float(np.median(per_run)),
        "ratio_eta_to_native": tps["eta"] / tps["native"],
        "bat_share_of_time": total("bat", "bat_seconds") / total("bat", "seconds"),
        "bat_ms_per_token": 1e3 * total("bat", "bat_seconds") / total("bat", "tokens"),
        "sub_threshold_decisions": sub_tau,
        "accepted_below_tau": int(total("bat", "below_tau")),
        "fallbacks": int(sum(c["fallbacks"] for c in cores)),
        "accepts_by_source": sources,
        "seconds_by_stage": stage_seconds,
        "mask_accepted_below_tau": int(total("bat", "mask_accepted_below_tau")),
        "mask_undecided_mass_per_token": total("bat", "mask_undecided_mass") / total("bat", "tokens"),
        "prepare_seconds": prepare_s,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    print()
    print(
        f"model {os.path.basename(path)} (v={bat.basis.vocab_size}, d={bat.basis.hidden_size}), "
        f"{len(prompts)} prompts x {args.max_tokens} tokens, eta eps={args.eps}, {args.mode} mode, time budget "
        f"{args.time_budget}s"
    )
    print(f"{'sampler':12s} {'tokens':>7s} {'seconds':>8s} {'tokens/s':>9s}")
    for k in kinds:
        print(f"{k:12s} {int(total(k, 'tokens')):7d} {total(k, 'seconds'):8.2f} {tps[k]:9.1f}")
    print(
        f"BAT / plain eta: {summary['ratio_bat_to_eta']:.2f}x overall, "
        f"{summary['ratio_median_per_prompt']:.2f}x median "
        f"per prompt (target >= 0.95); plain eta / native: {summary['ratio_eta_to_native']:.2f}x"
    )
    print(
        f"time in BAT: {100 * summary['bat_share_of_time']:.1f}% ({summary['bat_ms_per_token']:.2f} ms/token); "
        f"sub-threshold decisions {sub_tau}, accepted {summary['accepted_below_tau']}, fallbacks "
        f"{summary['fallbacks']}, "
        f"accepts by source {sources}"
    )
    print(
        "decision time by stage (s): "
        + ", ".join(f"{k} {v:.2f}" for k, v in sorted(stage_seconds.items(), key=lambda kv: -kv[1]))
    )
    if args.mode == "mask":
        print(
            f"mask mode: {summary['mask_accepted_below_tau']} sub-threshold tokens proven over all steps, "
            f"undecided mass {summary['mask_undecided_mass_per_token']:.4f} per token"
        )
    out = args.out or os.path.join(
        os.path.dirname(__file__),
        "results",
        f"llamacpp_{args.model if args.model in ('smollm2', 'gemma3') else 'model'}.json",
    )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as handle:
        json.dump({"summary": summary, "runs": runs}, handle, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
