"""What an engine adapter does with a request's sampler at each step: the tokens it may sample in the
request's mode, and the counts it reports. Adapters only translate tensors into and out of this."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import BatError
from .sampler import BatSampler, MaskResult, SampleResult
from .thresholds import truncate_mask

BAT_MODES = ("sample", "mask")  # the paper's sampler, and the proven set over the vocabulary
MODES = (*BAT_MODES, "threshold")  # threshold: the plain rule through the same hook (a baseline)


@dataclass
class StepOutcome:
    kept: np.ndarray  # token ids the engine may sample at this step (one in sample mode)
    tau: float
    proven_below_tau: np.ndarray  # the kept tokens below tau, each with a proof (the argmax excluded)
    sample: SampleResult | None = None
    mask: MaskResult | None = None


def kept_tokens(
    sampler: BatSampler, logits: np.ndarray, mode: str, step: int | None = None, allowed: np.ndarray | None = None
) -> StepOutcome:
    """The tokens `sampler`'s request keeps at this step: the paper's draw (sample), the proven set over the
    vocabulary (mask), or what the plain threshold keeps (threshold). `step` and `allowed` as in BatSampler."""
    if mode == "sample":
        result = sampler.sample(logits, step=step, allowed=allowed)
        proven = not result.fell_back_to_argmax and result.decisions[-1].method in ("certificate", "lp")
        below = np.array([result.token] if result.below_tau and proven else [], dtype=np.int64)
        return StepOutcome(np.array([result.token]), result.tau, below, sample=result)
    if mode == "mask":
        masked = sampler.mask(logits, step=step, allowed=allowed)
        return StepOutcome(np.flatnonzero(masked.mask), masked.tau, masked.accepted_below_tau_ids, mask=masked)
    if mode == "threshold":
        p, tau = sampler.rule.probabilities_and_tau(np.asarray(logits)[: sampler.basis.vocab_size])
        return StepOutcome(np.flatnonzero(truncate_mask(p, tau)), float(tau), np.zeros(0, dtype=np.int64))
    raise BatError(f"mode={mode!r}: use one of {', '.join(MODES)}")


@dataclass
class GenerationCounts:
    """What BAT did over a generation's steps, summed (JSON-ready with dataclasses.asdict)."""

    tokens: int = 0  # steps BAT handled
    below_tau: int = 0  # sample mode: tokens drawn below tau and proven (kept by BAT, dropped by the rule)
    argmax_fallbacks: int = 0  # sample mode: steps where every draw was rejected
    mask_accepted_below_tau: int = 0  # mask mode: sub-threshold tokens proven, summed over steps
    mask_undecided_mass: float = 0.0  # mask mode: probability left undecided, summed over steps

    def add(self, outcome: StepOutcome) -> None:
        self.tokens += 1
        if outcome.sample is not None:
            self.below_tau += len(outcome.proven_below_tau)
            self.argmax_fallbacks += int(outcome.sample.fell_back_to_argmax)
        if outcome.mask is not None:
            self.mask_accepted_below_tau += outcome.mask.accepted_below_tau
            self.mask_undecided_mass += outcome.mask.undecided_mass


def most_probable_token(logits: np.ndarray, allowed: np.ndarray | None = None) -> int:
    """The fail-closed answer of a step: the most probable token with a finite logit (among `allowed`, where
    it allows any). Adapters keep it alone when BAT fails at a step."""
    finite = np.where(np.isfinite(logits), logits, -np.inf)
    if allowed is not None and allowed.any():
        finite = np.where(allowed, finite, -np.inf)
    return int(np.argmax(finite))
