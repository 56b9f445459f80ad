"""Per-request BAT sampling: the paper's sampler and the mask mode.

- ``sample``: draw from p_hat without replacement; take the first token that passes the threshold or
  has an accept certificate; after `max_rejections` rejections take the argmax (Finlayson et al.).
  The argmax itself is always taken (the rule that keeps sampling from getting stuck: it belongs to
  the sampler, not to the decision, which is the LP's answer for every token).
- ``mask``: a sound accepted set over the whole vocabulary: tokens at or above tau, the argmax, and
  every sub-threshold token proven among a fixed number of exact decisions per step (most probable
  first; one certificate can prove many tokens at once). The mass left undecided is reported; undecided
  tokens are not in the mask.

Both take `allowed`, the tokens a grammar permits at this step: BAT then decides on the raw
distribution as always, draws only among allowed tokens, and "the argmax" becomes the most probable
allowed token. Both take `step`, the index of the generated token: the outcome is then a function of
(seed, step, logits, allowed) alone (the draws come from a generator of that step, and no certificate
of another step is reused), so an engine that repeats, skips or reorders steps (vLLM's chunked
prefill, preemption) still reproduces a seed. Without `step` the request's generator runs as one
stream and certificates carry over from step to step.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .basis import Basis
from .certify import Step
from .config import BatConfig
from .decisions import Decision
from .errors import BatError
from .solver import BatSolver
from .thresholds import ThresholdRule

MODES = ("sample", "mask")
MASK_CANDIDATES = 4  # exact decisions per mask step: fewer leave more mass undecided, in less time (docs/core.md)
MAX_MASK_CANDIDATES = 64


@dataclass
class SampleResult:
    token: int
    tau: float
    probability: float
    decisions: list[Decision] = field(default_factory=list)  # one per draw, in order
    fell_back_to_argmax: bool = False

    @property
    def below_tau(self) -> bool:
        return self.probability < self.tau


@dataclass
class MaskResult:
    mask: np.ndarray  # bool, length v: True = may be sampled (proven, >= tau or the argmax; within `allowed`)
    tau: float
    accepted_below_tau: int
    rejected: int
    undecided: int
    undecided_mass: float
    threshold_mass: float  # mass the plain threshold rule keeps
    mask_mass: float  # mass BAT keeps
    accepted_below_tau_ids: np.ndarray  # the proven sub-threshold tokens (the argmax excluded)


class BlockGumbelRace:
    """Exact draws from the categorical distribution of weights p as a two-level Gumbel-max race: a
    block of 256 tokens by its mass, then a token of that block by its weight, so a draw costs no pass
    over the whole vocabulary beyond the block sums. Unlike an inverse CDF in token order, where a
    small change of p moves every later boundary by the change summed so far, a race turns a small
    change of p into an equally small chance of another token: rounding that depends on the batch an
    engine ran rarely changes a seeded draw. Every draw takes the same count of random numbers."""

    BLOCK = 256

    def __init__(self, p: np.ndarray) -> None:
        self.vocab_size = len(p)
        blocks = -(-len(p) // self.BLOCK)
        self.weights = np.zeros(blocks * self.BLOCK)
        self.weights[: len(p)] = p
        self.weights = self.weights.reshape(blocks, self.BLOCK)
        self.mass = self.weights.sum(axis=1)
        self.total = float(self.mass.sum())

    def remove(self, token: int) -> None:
        """Take a token out of later draws (sampling without replacement)."""
        block = token // self.BLOCK
        self.weights[block, token % self.BLOCK] = 0.0
        self.mass[block] = self.weights[block].sum()

    def draw(self, rng: np.random.Generator) -> int | None:
        """A token with probability weight / remaining mass; None when (almost) no mass remains."""
        if not self.mass.sum() > self.total * 1e-12:
            return None
        blocks = len(self.mass)
        with np.errstate(divide="ignore"):
            for _ in range(100):  # a retry only when a uniform draw is exactly 0 where it matters
                gumbel = -np.log(-np.log(rng.random(blocks + self.BLOCK)))  # u in [0, 1): never +inf
                block = int(np.argmax(np.log(self.mass) + gumbel[:blocks]))
                k = int(np.argmax(np.log(self.weights[block]) + gumbel[blocks:]))
                if self.weights[block, k] > 0:
                    return block * self.BLOCK + k
        return None


class BatSampler:
    """BAT for one request: threshold rule, mode, seed, warm HiGHS model and statistics."""

    def __init__(
        self,
        basis: Basis,
        rule: ThresholdRule,
        seed: int | None = None,
        config: BatConfig | None = None,
        max_rejections: int = 10,
        mask_candidates: int = MASK_CANDIDATES,
        mask_budget: float | None = None,
    ) -> None:
        if not isinstance(rule, ThresholdRule):
            raise BatError("rule must be a ThresholdRule, e.g. ThresholdRule('eta', 0.0009)")
        if max_rejections < 0:
            raise BatError(f"max_rejections={max_rejections} must be >= 0")
        if mask_budget is not None and not mask_budget > 0:
            raise BatError(f"mask_budget={mask_budget} must be a positive number of seconds (None: the default)")
        self.basis = basis
        self.rule = rule
        self.solver = BatSolver(basis, config)
        self.rng = np.random.default_rng(seed)  # the stream of calls without `step`
        self._seed_sequence = np.random.SeedSequence(seed)  # seed None: fresh entropy, drawn once
        self.max_rejections = max_rejections
        self.mask_candidates = checked_mask_candidates(mask_candidates)
        # the clock of a mask step, a safety net like the decisions' own: room for each candidate's clock
        self.mask_budget = (
            mask_budget if mask_budget is not None else max(1.0, mask_candidates * self.solver.config.time_budget)
        )

    @property
    def stats(self):
        return self.solver.stats

    def sample(self, logits: Any, step: int | None = None, allowed: Any = None) -> SampleResult:
        """One token by the paper's sampler, on the model's raw (temperature 1) logits.

        `step`: the index of the generated token (see the module docstring); `allowed`: a boolean mask
        over the vocabulary of the tokens a grammar permits (None: every token)."""
        rng = self._generator(step)
        state = self.solver.new_step(logits, self.rule)
        allowed = self._allowed(allowed)
        weights = state.p if allowed is None else np.where(allowed, state.p, 0.0)
        top = state.argmax if allowed is None else int(np.argmax(weights))
        race = BlockGumbelRace(weights)
        result = SampleResult(-1, state.tau, 0.0)
        while len(result.decisions) < self.max_rejections:
            token = race.draw(rng)
            if token is None:
                break
            if state.p[token] >= state.tau:  # most draws: no candidate bookkeeping needed
                decision = self.solver.record_shortcut(Decision(token, True, "threshold"))
            elif token == top:
                decision = self.solver.record_shortcut(Decision(token, True, "argmax"))
            else:
                decision = self.solver.decide(state, [token])[0]
            result.decisions.append(decision)
            if decision.accepted:
                result.token, result.probability = token, float(state.p[token])
                return result
            race.remove(token)
        result.token, result.probability = top, float(state.p[top])
        result.fell_back_to_argmax = True
        return result

    def _generator(self, step: int | None) -> np.random.Generator:
        """The request's stream (step None), or a generator of its own for the step, from the seed."""
        if step is None:
            return self.rng
        self._begin_step(step)
        seeds = self._seed_sequence
        return np.random.default_rng(np.random.SeedSequence(seeds.entropy, spawn_key=(*seeds.spawn_key, int(step))))

    def _begin_step(self, step: int) -> None:
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise BatError(f"step={step!r} must be a non-negative integer (the index of the generated token)")
        self.solver.forget_certificates()  # nothing of another step may shape this one

    def _allowed(self, allowed: Any) -> np.ndarray | None:
        if allowed is None:
            return None
        mask = np.asarray(allowed)
        v = self.basis.vocab_size
        if mask.dtype != bool or mask.ndim != 1 or len(mask) < v:
            raise BatError(
                f"allowed must be a boolean mask over the {v} tokens of the vocabulary, got {mask.dtype} {mask.shape}"
            )
        mask = mask[:v]
        if not mask.any():
            raise BatError("no token is allowed at this step (the grammar permits none of the vocabulary)")
        return mask

    def mask(
        self,
        logits: Any,
        budget: float | None = None,
        candidates: int | None = None,
        step: int | None = None,
        allowed: Any = None,
    ) -> MaskResult:
        """The proven accepted set over the whole vocabulary (within `allowed`, where given).

        At most `candidates` (default `mask_candidates`) sub-threshold tokens get an exact decision,
        most probable first; certificates found on the way prove every other token they cover. A
        count, not a clock, limits the work so that a seed reproduces the mask; `budget` seconds
        (default `mask_budget`) is only a safety cap. `step` and `allowed` as in `sample`."""
        start = time.perf_counter()
        deadline = start + (self.mask_budget if budget is None else budget)
        if step is not None:
            self._begin_step(step)
        solver = self.solver
        state = solver.new_step(logits, self.rule)
        allowed = self._allowed(allowed)
        p = state.p
        top = state.argmax if allowed is None else int(np.argmax(np.where(allowed, p, -1.0)))
        permitted = np.ones(len(p), dtype=bool) if allowed is None else allowed
        mask = (p >= state.tau) & permitted
        mask[top] = True
        rejected = np.zeros_like(mask)
        below = most_probable_first(p, np.flatnonzero(~mask & permitted))
        # certificates the request already holds may prove many tokens with one product
        cached = solver.cached_certificates()
        if cached:
            mask |= solver.proven_tokens(state, np.column_stack(cached)) & permitted
        limit = self.mask_candidates if candidates is None else candidates
        _decide_in_order(self.solver, state, below, mask, rejected, permitted, limit, deadline)
        return _mask_result(state, mask, rejected, permitted, top)


def checked_mask_candidates(value: Any) -> int:
    """The count of exact decisions per mask step, or a BatError saying what is wrong with it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise BatError(f"mask_candidates={value!r} must be an integer (default {MASK_CANDIDATES})")
    if not 0 <= value <= MAX_MASK_CANDIDATES:
        raise BatError(
            f"mask_candidates={value} must lie in [0, {MAX_MASK_CANDIDATES}]: the exact decisions per mask step "
            f"(default {MASK_CANDIDATES})"
        )
    return int(value)


def most_probable_first(p: np.ndarray, tokens: np.ndarray, first: int = 256) -> Iterator[int]:
    """`tokens` by decreasing p, ties by token id (a stable sort), sorted as they are reached: the `first`
    most probable (and any tied with the last of them) by a partition, the rest only if asked for."""
    q = p[tokens]
    if len(q) > first:
        kth = np.partition(q, len(q) - first)[len(q) - first]
        head = np.flatnonzero(q >= kth)
        yield from tokens[head[np.argsort(-q[head], kind="stable")]].tolist()
        rest = np.flatnonzero(q < kth)
        tokens, q = tokens[rest], q[rest]
    yield from tokens[np.argsort(-q, kind="stable")].tolist()


def _decide_in_order(
    solver: BatSolver,
    state: Step,
    below: Iterator[int],
    mask: np.ndarray,
    rejected: np.ndarray,
    permitted: np.ndarray,
    limit: int,
    deadline: float,
) -> None:
    """Exact decisions on `below` in order, skipping what earlier certificates settled, up to `limit`:
    an accept certificate proves every token it covers, a feasible point rejects every token it zeroes."""
    p = state.p
    tol = solver.config.tol * state.vocabulary_tolerance_scale
    tried = 0
    while tried < limit and time.perf_counter() < deadline:
        token = next((t for t in below if not (mask[t] or rejected[t])), None)
        if token is None:
            break
        tried += 1
        decision = solver.decide(state, [token], deadline=deadline)[0]
        cert = decision.certificate
        if decision.accepted:
            mask[token] = True
            if cert is not None:
                mask |= solver.proven_tokens(state, cert.y[:, None]) & permitted
        else:
            rejected[token] = True
            if cert is not None:
                zeros = cert.zero_tokens(p)
                zeros = zeros[~mask[zeros] & (cert.residual_l1 <= tol[zeros] * p[zeros])]
                rejected[zeros] = True


def _mask_result(state: Step, mask: np.ndarray, rejected: np.ndarray, permitted: np.ndarray, top: int) -> MaskResult:
    p = state.p
    undecided = ~mask & ~rejected & permitted
    below_ids = np.flatnonzero(mask & (p < state.tau))
    below_ids = below_ids[below_ids != top]
    return MaskResult(
        mask=mask,
        tau=state.tau,
        accepted_below_tau=len(below_ids),
        rejected=int(rejected.sum()),
        undecided=int(undecided.sum()),
        undecided_mass=float(p[undecided].sum()),
        threshold_mass=float(p[(p >= state.tau) & permitted].sum()),
        mask_mass=float(p[mask].sum()),
        accepted_below_tau_ids=below_ids,
    )
