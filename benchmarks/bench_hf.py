"""transformers `generate` throughput: BAT against transformers' own eta sampling, same prompts, seeds, lengths.

    python benchmarks/bench_hf.py --prompts 8 --batch 4 --max-new-tokens 48

SmolLM2-135M (the Hugging Face folder set-up builds), float32 on the CPU. Per batch of prompts, in rotating
order: BAT (`bat_hf.BatLogitsProcessor`, eta base, sample mode) and plain eta (`eta_cutoff`, transformers'
EtaLogitsWarper). Generation runs to max_new_tokens (no early stop), so both produce the same number of tokens.
Prints tokens/s and the ratio, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from bench_prompts import CYCLED as PROMPTS

sys.path[:0] = [
    os.path.join(os.path.dirname(__file__), "..", "adapters"),
    os.path.join(os.path.dirname(__file__), ".."),
]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--eps", type=float, default=0.0009)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "hf_smollm2.json"))
    args = parser.parse_args()

    import torch
    import transformers

    from bat_hf import BatLogitsProcessor
    from bat_models import smollm2_hf_folder

    folder = smollm2_hf_folder()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, padding_side="left")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.generation_config.top_k = None
    prompts = (PROMPTS * ((args.prompts + len(PROMPTS) - 1) // len(PROMPTS)))[: args.prompts]
    batches = [prompts[i : i + args.batch] for i in range(0, len(prompts), args.batch)]
    common = {
        "do_sample": True,
        "max_new_tokens": args.max_new_tokens,
        "min_new_tokens": 0,
        "pad_token_id": tokenizer.eos_token_id,
        "eos_token_id": None,
    }
    seconds = {"bat": 0.0, "eta": 0.0}
    tokens = 0
    decisions: dict[str, float] = {}
    generate = lambda inputs, **kw: model.generate(**inputs, **common, **kw)  # noqa: E731
    generate(tokenizer(batches[0], return_tensors="pt", padding=True), eta_cutoff=args.eps)  # warm-up
    for k, batch in enumerate(batches):
        inputs = tokenizer(batch, return_tensors="pt", padding=True)
        order = ["bat", "eta"] if k % 2 == 0 else ["eta", "bat"]
        for name in order:
            torch.manual_seed(k)
            start = time.perf_counter()
            if name == "bat":
                proc = BatLogitsProcessor(model, eta=args.eps, seed=k)
                generate(inputs, logits_processor=transformers.LogitsProcessorList([proc]))
                for key, value in proc.stats.core.items():
                    decisions[key] = decisions.get(key, 0) + value
            else:
                generate(inputs, eta_cutoff=args.eps)
            seconds[name] += time.perf_counter() - start
        tokens += len(batch) * args.max_new_tokens
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "prompts": len(prompts),
        "batch": args.batch,
        "max_new_tokens": args.max_new_tokens,
        "eps": args.eps,
        "tokens": tokens,
        "tokens_per_s": {name: tokens / s for name, s in seconds.items()},
        "bat_over_eta": seconds["eta"] / seconds["bat"],
        "decisions": {k: decisions.get(k, 0) for k in ("candidates", "by_threshold", "by_certificate", "fallbacks")},
    }
    print(
        f"{tokens} tokens per sampler, batches of {args.batch}: BAT {result['tokens_per_s']['bat']:.1f} tok/s, "
        f"plain eta {result['tokens_per_s']['eta']:.1f} tok/s, BAT at {result['bat_over_eta']:.2f}x"
    )
    print("BAT decisions:", result["decisions"])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
