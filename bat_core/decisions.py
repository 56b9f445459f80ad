"""What a decision returns and what a request's decisions cost: certificates, decisions, statistics, and the
safety net's clock."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class AcceptCertificate:
    """y in R^(d+1): with c = [W, 1] y, value(y, token) > tol * ||a_token||_1 (see certify.py)."""

    token: int
    y: np.ndarray
    value: float


@dataclass
class RejectCertificate:
    """A point p of the rejected tokens' F: p = p_hat + q, with q nonzero only on `support`.

    Every token t with p_hat_t + q_t = 0 is rejected by it when ||sum_j q_j a_j||_1 (at most
    `residual_l1`) is within tol * p_hat_t * ||a_t||_1: the point is then feasible up to the solver's
    tolerance for that token's problem."""

    token: int
    support: np.ndarray
    q: np.ndarray
    residual_l1: float

    def zero_tokens(self, p: np.ndarray) -> np.ndarray:
        """Tokens that this point sets to (numerically) zero probability."""
        p_new = p[self.support] + self.q
        return self.support[p_new <= 1e-9 * p[self.support]]


@dataclass
class Decision:
    token: int
    accepted: bool
    # threshold | argmax | certificate (accept or reject, found without the exact LP) | lp | resolution | fallback
    method: str
    certificate: AcceptCertificate | RejectCertificate | None = None


@dataclass
class BatStats:
    """What one request's decisions cost. `as_dict()` is JSON-ready."""

    steps: int = 0
    candidates: int = 0
    by_threshold: int = 0
    by_certificate: int = 0  # accepts and rejects proven without the exact LP
    rejected_by_point: int = 0  # of those, rejects by a feasible point from the clipped least squares
    vocabulary_products: int = 0  # certificate checks that made a product over the whole vocabulary
    by_lp: int = 0
    accepted: int = 0
    rejected: int = 0
    accepted_below_tau: int = 0
    lp_solves: int = 0
    lp_rounds: int = 0
    lp_iterations: int = 0
    fallbacks: int = 0
    below_resolution: int = 0
    seconds: float = 0.0
    fallback_reasons: dict[str, int] = field(default_factory=dict)
    # least-squares | reweighted | cache | regression | point-search | search-k | lp
    accepts_by_source: dict[str, int] = field(default_factory=dict)
    # seconds inside each stage of the exact path, whatever it proved: certificate-search | cache | regression |
    # point-search | search-lp | lp (docs/core.md, "The exact path"); where a request's BAT time goes
    seconds_by_stage: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @contextmanager
    def timing(self, stage: str) -> Iterator[None]:
        """Add the seconds of the enclosed work to `seconds_by_stage[stage]`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds_by_stage[stage] = self.seconds_by_stage.get(stage, 0.0) + time.perf_counter() - start

    def accepted_by(self, source: str) -> None:
        self.accepts_by_source[source] = self.accepts_by_source.get(source, 0) + 1

    def fallback(self, token: int, reason: str) -> Decision:
        """The conservative answer when no proof came within the budget: reject, and count it."""
        self.fallbacks += 1
        self.fallback_reasons[reason] = self.fallback_reasons.get(reason, 0) + 1
        return Decision(token, False, "fallback")

    def count(self, decisions: list[Decision], seconds: float) -> None:
        self.seconds += seconds
        for d in decisions:
            self.candidates += 1
            self.accepted += d.accepted
            self.rejected += not d.accepted
            if d.method in ("threshold", "argmax"):  # "argmax": the sampler's rule (BatSolver.record_shortcut)
                self.by_threshold += 1
            elif d.method == "certificate":
                self.by_certificate += 1
                self.accepted_below_tau += d.accepted
            elif d.method == "lp":
                self.by_lp += 1
                self.accepted_below_tau += d.accepted
            elif d.method == "resolution":
                self.below_resolution += 1


@dataclass
class Clock:
    """The safety net's clock of the decision in progress: a time.perf_counter() deadline."""

    deadline: float = 0.0

    def left(self) -> bool:
        return time.perf_counter() < self.deadline
