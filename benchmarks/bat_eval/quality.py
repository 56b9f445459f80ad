"""Quality of continuations: MAUVE against the human continuations, distinct-n, repetition, length.

MAUVE (Pillutla et al. 2021, package `mauve-text`) needs text features. Its default, GPT-2 large,
would be downloaded from a model hub, which is not allowed here, so features come from a model that
installs from the package registry, run in llama.cpp's embedding mode: the final hidden states
averaged over the text's tokens (mean pooling), L2-normalised.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter

import numpy as np

# two-sided 95% Student t quantiles by degrees of freedom (confidence intervals over seeds)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def words(text: str) -> list[str]:
    return text.lower().split()


def ngrams(items: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(items[i : i + n]) for i in range(len(items) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams of a set of texts (words, lower case); 0 when there are none."""
    grams = [g for text in texts for g in ngrams(words(text), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition(text: str, n: int = 4) -> float:
    """Share of a text's word n-grams that repeat an earlier n-gram of the same text."""
    grams = ngrams(words(text), n)
    if not grams:
        return 0.0
    return 1.0 - len(Counter(grams)) / len(grams)


def text_metrics(texts: list[str], tokens: list[int]) -> dict[str, float]:
    return {
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "distinct_3": distinct_n(texts, 3),
        "repetition_4": float(np.mean([repetition(t) for t in texts])) if texts else 0.0,
        "length_tokens": float(np.mean(tokens)) if tokens else 0.0,
        "length_words": float(np.mean([len(words(t)) for t in texts])) if texts else 0.0,
    }


def mean_ci(values: list[float]) -> dict[str, float]:
    """Mean and the half-width of its 95% confidence interval (Student t over the values: seeds)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(x) == 0:
        return {"mean": float("nan"), "ci95": float("nan"), "n": 0}
    if len(x) == 1:
        return {"mean": float(x[0]), "ci95": float("nan"), "n": 1}
    half = T95.get(len(x) - 1, 1.96) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return {"mean": float(x.mean()), "ci95": half, "n": int(len(x))}


class Featurizer:
    """Text features from a registry model in llama.cpp (mean-pooled last hidden states), cached on disk."""

    def __init__(self, model_path: str, cache_dir: str, threads: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(
            model_path=model_path,
            embedding=True,
            pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
            n_ctx=512,
            verbose=False,
            n_threads=threads,
        )
        self.cache_dir = cache_dir
        os.makedirs(cache_dir, exist_ok=True)

    def __call__(self, texts: list[str]) -> np.ndarray:
        key = hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()[:24]
        path = os.path.join(self.cache_dir, f"{key}.npy")
        if os.path.isfile(path):
            return np.load(path)
        rows = [np.asarray(self.llm.embed(text or " "), dtype=np.float32) for text in texts]
        features = np.stack(rows)
        features /= np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
        np.save(path, features)
        return features


def mauve_score(human: np.ndarray, generated: np.ndarray, seed: int = 25) -> float:
    """MAUVE between two feature sets (k-means on the joint PCA; buckets = samples / 10, the default)."""
    import mauve

    out = mauve.compute_mauve(p_features=human, q_features=generated, seed=seed, verbose=False)
    return float(out.mauve)
