"""Per-request BAT sampling: the paper's sampler and the mask mode.

- ``sample``: draw from p_hat without replacement; take the first token that passes the threshold or
  has an accept certificate; after `max_rejections` rejections take the argmax (Finlayson et al.).
  The request's own seeded generator makes a seed reproduce the output.
- ``mask``: a sound accepted set over the whole vocabulary: tokens at or above tau, the argmax, and
  every sub-threshold token proven among a fixed number of exact decisions per step (most probable
  first; one certificate can prove many tokens at once). The mass left undecided is reported; undecided tokens are not in the mask.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .basis import Basis
from .errors import BatError
from .solver import BatConfig, BatSolver, Decision
from .thresholds import ThresholdRule

MODES = ("sample", "mask")


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
    mask: np.ndarray  # bool, length v: True = may be sampled (proven, or >= tau, or the argmax)
    tau: float
    accepted_below_tau: int
    rejected: int
    undecided: int
    undecided_mass: float
    threshold_mass: float  # mass the plain threshold rule keeps
    mask_mass: float  # mass BAT keeps
    accepted_below_tau_ids: np.ndarray  # the proven sub-threshold tokens (argmax excluded)


class BlockCdf:
    """Inverse-CDF draws from p without a cumulative sum over the whole vocabulary: the block sums find
    the block, a cumulative sum of that block finds the token (numpy's cumsum over SmolLM2's 49k
    probabilities took 0.17 ms, about a third of a sampled step that needs no decision)."""

    BLOCK = 256

    def __init__(self, p: np.ndarray) -> None:
        self.p = p
        full = len(p) // self.BLOCK * self.BLOCK
        sums = p[:full].reshape(-1, self.BLOCK).sum(axis=1)
        if full < len(p):
            sums = np.append(sums, p[full:].sum())
        self.block_cdf = np.cumsum(sums)
        self.total = float(self.block_cdf[-1])

    def token_at(self, r: float) -> int:
        """The token whose interval of the cumulative distribution holds r (0 <= r < total); tokens
        with p = 0 have empty intervals and are never returned."""
        r = min(r, float(np.nextafter(self.total, 0.0)))  # random() * total can round up to total
        block = int(np.searchsorted(self.block_cdf, r, side="right"))
        start = block * self.BLOCK
        inside = self.p[start : start + self.BLOCK]
        offset = r - (self.block_cdf[block - 1] if block else 0.0)
        k = int(np.searchsorted(np.cumsum(inside), offset, side="right"))
        if k >= len(inside):  # the block's sum and its cumulative sum round differently: its last token
            k = int(np.flatnonzero(inside)[-1])
        return start + k


class BatSampler:
    """BAT for one request: threshold rule, mode, seed, warm HiGHS model and statistics."""

    def __init__(
        self,
        basis: Basis,
        rule: ThresholdRule,
        seed: int | None = None,
        config: BatConfig | None = None,
        max_rejections: int = 10,
        mask_candidates: int = 4,
        mask_budget: float = 1.0,
    ) -> None:
        if not isinstance(rule, ThresholdRule):
            raise BatError("rule must be a ThresholdRule, e.g. ThresholdRule('eta', 0.0009)")
        if max_rejections < 0:
            raise BatError(f"max_rejections={max_rejections} must be >= 0")
        if mask_candidates < 0:
            raise BatError(f"mask_candidates={mask_candidates} must be >= 0")
        if not mask_budget > 0:
            raise BatError(f"mask_budget={mask_budget} must be a positive number of seconds")
        self.basis = basis
        self.rule = rule
        self.solver = BatSolver(basis, config)
        self.rng = np.random.default_rng(seed)
        self.max_rejections = max_rejections
        self.mask_candidates = mask_candidates
        self.mask_budget = mask_budget

    @property
    def stats(self):
        return self.solver.stats

    def sample(self, logits: Any) -> SampleResult:
        """One token by the paper's sampler, on the model's raw (temperature 1) logits."""
        step = self.solver.new_step(logits, self.rule)
        cdf = BlockCdf(step.p)
        removed: set[int] = set()
        result = SampleResult(-1, step.tau, 0.0)
        while len(result.decisions) < self.max_rejections:
            token = self._draw(cdf, removed)
            if token is None:
                break
            if step.p[token] >= step.tau:  # most draws: no candidate bookkeeping needed
                decision = self.solver.record_shortcut(Decision(token, True, "threshold"))
            else:
                decision = self.solver.decide(step, [token])[0]
            result.decisions.append(decision)
            if decision.accepted:
                result.token, result.probability = token, float(step.p[token])
                return result
            removed.add(token)
        result.token, result.probability = step.argmax, float(step.p[step.argmax])
        result.fell_back_to_argmax = True
        return result

    def _draw(self, cdf: BlockCdf, removed: set[int]) -> int | None:
        """A draw from p without the removed tokens (rejection on the removed set = sampling without
        replacement)."""
        left = cdf.total - sum(float(cdf.p[t]) for t in removed)
        if left <= cdf.total * 1e-12:
            return None
        for _ in range(10_000):
            token = cdf.token_at(self.rng.random() * cdf.total)
            if token not in removed:
                return token
        return None

    def mask(self, logits: Any, budget: float | None = None, candidates: int | None = None) -> MaskResult:
        """The proven accepted set over the whole vocabulary.

        At most `candidates` (default `mask_candidates`) sub-threshold tokens get an exact decision,
        most probable first; certificates found on the way prove every other token they cover. A
        count, not a clock, limits the work so that a seed reproduces the mask; `budget` seconds
        (default `mask_budget`) is only a safety cap."""
        start = time.perf_counter()
        deadline = start + (self.mask_budget if budget is None else budget)
        solver = self.solver
        step = solver.new_step(logits, self.rule)
        p = step.p
        mask = p >= step.tau
        mask[step.argmax] = True
        rejected = np.zeros_like(mask)
        below = np.flatnonzero(~mask)
        below = below[np.argsort(-p[below], kind="stable")]
        scale = step.tolerance_scale(np.arange(len(p)))
        tol = solver.config.tol * scale
        # certificates the request already holds may prove many tokens with one product
        cached = solver.cached_certificates()
        if cached:
            mask |= (step.all_values(np.column_stack(cached)) > tol[None, :]).any(axis=0)
        cursor, tried = 0, 0
        limit = self.mask_candidates if candidates is None else candidates
        while tried < limit and time.perf_counter() < deadline:
            while cursor < len(below) and (mask[below[cursor]] or rejected[below[cursor]]):
                cursor += 1
            if cursor == len(below):
                break
            token = int(below[cursor])
            tried += 1
            decision = solver.decide(step, [token], deadline=deadline)[0]
            cert = decision.certificate
            if decision.accepted:
                mask[token] = True
                if cert is not None:
                    mask |= step.all_values(cert.y[:, None])[0] > tol
            else:
                rejected[token] = True
                if cert is not None:  # the same feasible point rejects every token it leaves at zero
                    zeros = cert.zero_tokens(p)
                    zeros = zeros[~mask[zeros] & (cert.residual_l1 <= tol[zeros] * p[zeros])]
                    rejected[zeros] = True
        undecided = ~mask & ~rejected
        threshold_mass = float(p[p >= step.tau].sum())
        below_ids = np.flatnonzero(mask & (p < step.tau))
        below_ids = below_ids[below_ids != step.argmax]
        return MaskResult(
            mask=mask,
            tau=step.tau,
            accepted_below_tau=len(below_ids),
            rejected=int(rejected.sum()),
            undecided=int(undecided.sum()),
            undecided_mass=float(p[undecided].sum()),
            threshold_mass=threshold_mass,
            mask_mass=float(p[mask].sum()),
            accepted_below_tau_ids=below_ids,
        )
