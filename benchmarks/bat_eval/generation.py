"""Continuations of the human prefixes in llama.cpp, through the adapter, at matched parameters.

Samplers (all at temperature 1, llama.cpp's own truncation samplers off):
- ``untruncated``: llama.cpp's draw from the full distribution (a reference point, no parameter);
- ``eta`` / ``epsilon``: the threshold rule as a processor at the head of the chain;
- ``bat-eta`` / ``bat-epsilon``: the adapter's BAT processor (the paper's sampler) on that rule, with
  the same per-decision budget as in matching, so that generation uses the decisions that were matched.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import bat_core
from bat_core import ThresholdRule
from bat_llamacpp import BatLlama, EtaLogitsProcessor
from bat_llamacpp.cli import pieces_of, run_generation
from bat_llamacpp.processor import neutral_sampling_kwargs

from .matching import rule_of

SAMPLERS = ("untruncated", "eta", "epsilon", "bat-eta", "bat-epsilon")


class Untruncated:
    """The full distribution: an identity processor, so the call path matches the other samplers."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __call__(self, input_ids: Any, scores: np.ndarray) -> np.ndarray:
        return scores

    def completion_kwargs(self) -> dict[str, Any]:
        return neutral_sampling_kwargs(self, self.seed)


def make_processor(bat: BatLlama, sampler: str, parameter: float | None, seed: int, time_budget: float):
    if sampler == "untruncated":
        return Untruncated(seed)
    rule = ThresholdRule(rule_of(sampler), float(parameter))
    if not sampler.startswith("bat-"):
        return EtaLogitsProcessor(rule, seed=seed)
    return bat.processor(
        **{rule.kind: rule.value},
        seed=seed,
        config=bat_core.BatConfig.for_generation(time_budget),
    )


def human_reference(llm, passages, max_tokens: int) -> list[str]:
    """Each human continuation cut to `max_tokens` tokens of this model, as generations are."""
    texts = []
    for passage in passages:
        tokens = llm.tokenize((" " + passage.continuation).encode("utf-8"), add_bos=False)[:max_tokens]
        texts.append(llm.detokenize(tokens).decode("utf-8", errors="replace").strip())
    return texts


def generate_run(
    llm,
    bat: BatLlama,
    passages,
    sampler: str,
    parameter: float | None,
    seed: int,
    max_tokens: int,
    time_budget: float,
    progress=None,
) -> dict:
    """One sampler, one seed, every passage: texts, lengths and (BAT) the tokens taken below tau."""
    rows = []
    below = fallbacks = candidates = 0
    seconds = 0.0
    for index, passage in enumerate(passages):
        # each passage gets its own seed stream, so a run can be compared passage by passage
        processor = make_processor(bat, sampler, parameter, seed * 100_003 + index, time_budget)
        out = run_generation(llm, passage.prefix, max_tokens, processor)
        seconds += out["seconds"]
        pieces = pieces_of(llm, out["tokens"], out["marks"])
        text = "".join(piece["text"] for piece in pieces)
        row = {
            "passage": passage.id,
            "text": text.strip(),
            "tokens": len(out["tokens"]),
            "eos": len(out["tokens"]) < max_tokens,
        }
        if sampler.startswith("bat-"):
            stats = processor.stats
            below += stats.below_tau
            fallbacks += stats.core.get("fallbacks", 0)
            candidates += stats.core.get("candidates", 0) - stats.core.get("by_threshold", 0)
            row["marked"] = "".join(f"[[{p['text']}]]" if p["below_tau"] else p["text"] for p in pieces).strip()
            row["below_tau"] = stats.below_tau
        rows.append(row)
        if progress:
            progress(f"{sampler} seed {seed}: {index + 1}/{len(passages)} passages")
    tokens = sum(r["tokens"] for r in rows)
    return {
        "sampler": sampler,
        "parameter": parameter,
        "seed": seed,
        "max_tokens": max_tokens,
        "time_budget": time_budget,
        "rows": rows,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds else None,
        "below_tau": below,
        "sub_tau_decisions": candidates,
        "fallbacks": fallbacks,
    }
