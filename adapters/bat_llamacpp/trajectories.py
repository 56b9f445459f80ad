"""Real next-token distributions from llama.cpp, for tests and benchmarks."""

from __future__ import annotations

import numpy as np


def load_llama(path: str, n_ctx: int = 512, seed: int = 0):
    from llama_cpp import Llama

    return Llama(model_path=path, n_ctx=n_ctx, verbose=False, seed=seed, n_threads=2)


def last_logits(llm) -> np.ndarray:
    """The raw logits of the last evaluated position (float32 copy)."""
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()


def sampled_logits(llm, prompts: list[str], steps: int, seed: int = 0) -> np.ndarray:
    """Logits rows along trajectories sampled from the model itself (plain ancestral sampling)."""
    rng = np.random.default_rng(seed)
    rows = []
    for prompt in prompts:
        llm.reset()
        llm.eval(llm.tokenize(prompt.encode(), add_bos=False))
        for _ in range(steps):
            z = last_logits(llm)
            rows.append(z)
            p = np.exp(z.astype(np.float64) - z.max())
            p /= p.sum()
            llm.eval([int(rng.choice(len(p), p=p))])
    return np.stack(rows)
