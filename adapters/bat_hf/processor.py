"""BAT as a transformers `LogitsProcessor` for `model.generate`.

    proc = BatLogitsProcessor(model, eta=0.0009, seed=1)
    out = model.generate(**inputs, do_sample=True, max_new_tokens=64, logits_processor=[proc])
    print(proc.stats.as_dict())

transformers runs the processors built from the generation config that change logits (repetition
penalty, bad words, min new tokens, ...) before custom ones, and the warpers (temperature, top-k, top-p)
after them. BAT needs the raw distribution: logits that are not finite or not in the span of [W, 1]
are refused with an error that names those settings. In "sample" mode BAT draws the token and leaves
only it finite, so later warpers change nothing; in "mask" mode it leaves the proven set finite and
transformers' sampling (with its warpers) draws from it.

Rows are the batch times `num_return_sequences`; row r has its own sampler seeded `seed + r`, and step
k of a generation draws from the generator of (seed + r, k), so a seed reproduces the text. A call
whose input is not the last one plus one token starts a new generation (beam search, which reorders
rows, is not supported). A failure raises `BatError` out of `generate`.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

import bat_core
from bat_core import BatError, rule_from
from bat_core.generation import BAT_MODES, GenerationCounts, kept_tokens
from bat_core.sampler import MASK_CANDIDATES, checked_mask_candidates

MODES = BAT_MODES
SPAN_TOLERANCE = 1e-3  # relative residual of float32 logits; a wrong matrix or a penalty gives ~0.01-1
BEFORE_CUSTOM_PROCESSORS = (
    "repetition_penalty",
    "sequence_bias",
    "bad_words_ids",
    "min_new_tokens",
    "min_length",
    "no_repeat_ngram_size",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "prefix_allowed_tokens_fn",
    "guidance_scale",
)
_bases: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (weight pointer, Basis)


def basis_of(model: Any) -> bat_core.Basis:
    """The Basis of a transformers model's output layer (W, bias, final-logit soft-cap), built once per model."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is None:
        raise BatError(f"{type(model).__name__} has no output embeddings (get_output_embeddings()): BAT needs W")
    cached = _bases.get(model)
    if cached is not None and cached[0] == weight.data_ptr():
        return cached[1]
    W = weight.detach().float().cpu().numpy()
    bias = getattr(head, "bias", None)
    bias = None if bias is None else bias.detach().float().cpu().numpy()
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    basis = bat_core.Basis(W, bias=bias, softcap=getattr(config, "final_logit_softcapping", None) or None)
    _bases[model] = (weight.data_ptr(), basis)
    return basis


@dataclass
class GenerationStats(GenerationCounts):
    """BAT's statistics over this processor's generations, summed over rows (the counts per row-step).
    `as_dict()` is JSON-ready."""

    generations: int = 0
    rows: int = 0  # rows started (batch x num_return_sequences, per generation)
    bat_seconds: float = 0.0
    core: dict[str, Any] = field(default_factory=dict)  # the core's BatStats, summed over rows

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class BatLogitsProcessor:
    """BAT for `model.generate(..., logits_processor=[proc])`; one processor may serve many generations."""

    def __init__(
        self,
        model: Any,
        *,
        eta: float | None = None,
        epsilon: float | None = None,
        tau: float | None = None,
        mode: str = "sample",
        seed: int | None = None,
        config: bat_core.BatConfig | None = None,
        mask_candidates: int = MASK_CANDIDATES,
    ) -> None:
        if mode not in MODES:
            raise BatError(f"mode={mode!r}: use 'sample' (the paper's sampler) or 'mask' (the proven set)")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise BatError(f"seed={seed!r} must be a non-negative integer")
        self.rule = rule_from(eta, epsilon, tau)
        self.mode, self.seed, self.mask_candidates = mode, seed, checked_mask_candidates(mask_candidates)
        self.config = config or bat_core.BatConfig.for_generation()
        bat_core.limit_blas_threads()
        self.basis = basis_of(model)
        self._stats = GenerationStats()
        self._rows: list[bat_core.BatSampler] = []
        self._done: list[dict[str, Any]] = []  # core stats of earlier generations' rows
        self._prompt_length = 0
        self._last: Any = None

    @property
    def stats(self) -> GenerationStats:
        self._stats.core = _summed([*self._done, *(s.stats.as_dict() for s in self._rows)])
        return self._stats

    def reset(self) -> None:
        """Start a new generation at the next call (also detected from the input ids)."""
        self._last = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        start = time.perf_counter()
        z = scores.detach().float().cpu().numpy()
        if z.ndim != 2 or z.shape[1] != self.basis.vocab_size:
            raise BatError(
                f"scores of shape {tuple(z.shape)} do not match the model's output matrix "
                f"({self.basis.vocab_size} tokens)"
            )
        if not np.isfinite(z).all():
            raise BatError(_changed_logits("logits that are not finite"))
        if not self._continues(input_ids):
            self._begin(input_ids, z)
        step = int(input_ids.shape[1]) - self._prompt_length
        out = np.full(z.shape, -np.inf, dtype=np.float32)
        for row, sampler in enumerate(self._rows):
            self._decide_row(sampler, z[row], out[row], step)
        self._last = input_ids.detach().clone()
        self._stats.bat_seconds += time.perf_counter() - start
        return torch.from_numpy(out).to(device=scores.device, dtype=scores.dtype)

    def _continues(self, input_ids: Any) -> bool:
        last = self._last
        return (
            last is not None
            and input_ids.shape[0] == last.shape[0]
            and input_ids.shape[1] == last.shape[1] + 1
            and bool((input_ids[:, :-1] == last.to(input_ids.device)).all())
        )

    def _begin(self, input_ids: Any, z: np.ndarray) -> None:
        self._done.extend(s.stats.as_dict() for s in self._rows)
        rows = int(input_ids.shape[0])
        self.basis.check_span(z[0], SPAN_TOLERANCE, "this model", _changed_logits("logits that W does not explain"))
        seeds = [None if self.seed is None else self.seed + r for r in range(rows)]
        self._rows = [
            bat_core.BatSampler(self.basis, self.rule, seed=s, config=self.config, mask_candidates=self.mask_candidates)
            for s in seeds
        ]
        self._prompt_length = int(input_ids.shape[1])
        self._stats.generations += 1
        self._stats.rows += rows

    def _decide_row(self, sampler: bat_core.BatSampler, z: np.ndarray, out: np.ndarray, step: int) -> None:
        outcome = kept_tokens(sampler, z, self.mode, step=step)
        out[outcome.kept] = z[outcome.kept]
        self._stats.add(outcome)


def _changed_logits(what: str) -> str:
    return (
        f"BAT got {what}: it needs the model's raw logits, but transformers applies these generation settings "
        f"before custom logits processors: {', '.join(BEFORE_CUSTOM_PROCESSORS)}. Unset them (or set "
        "repetition_penalty=1.0) for BAT; temperature, top_k and top_p run after BAT and may stay"
    )


def _summed(dicts: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for d in dicts:
        for k, v in d.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                total[k] = total.get(k, 0) + v
    return total
