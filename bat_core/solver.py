"""The per-request decision engine: threshold, certificates, LP, in that order.

`BatSolver` answers "may token i be sampled?" for candidates of one distribution, exactly:
every accept carries an accept certificate (y, verified over the whole vocabulary with rigorous
float bounds), every reject that is not a fallback carries a feasible point. Cheap paths come first:

1. the threshold (p_i >= tau accepts with no LP) and the argmax rule (the top token is always kept);
2. certificate candidates: the request's recent certificates (they often prove the next step's tokens
   too), the weighted-least-squares direction, and the dual of a small LP over the top singular
   directions of W; each is only a candidate until certify.py proves it;
3. the exact restricted LP with column generation, warm-started on the request's HiGHS model;
4. past the per-decision time budget, or when HiGHS fails: reject, and count the fallback.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .basis import Basis
from .certify import Step
from .errors import BatError
from .lp import RequestLP
from .search import WeightedLeastSquares
from .thresholds import ThresholdRule


@dataclass
class BatConfig:
    """Knobs of the decision engine. Defaults suit a 2-core CPU and vocabularies of 50k-260k tokens."""

    tol: float = 1e-6  # relative infeasibility at or below which a decision counts as reject
    time_budget: float = 2.0  # seconds per exact decision before the conservative reject
    head_size: int = 1024  # tokens whose products are computed exactly in float64
    lsq_head: int = 256  # tokens weighted in the least-squares certificate search
    search_levels: tuple[int, ...] = (32, 128)  # singular directions of the search LPs (() turns them off)
    search_columns: int = 1024  # initial tokens in a search LP
    search_rounds: int = 4  # column-generation rounds of a search LP
    lp_columns: int = 1024  # initial working set of the exact LP
    lp_max_rounds: int = 12  # column-generation rounds before a fallback
    cache_size: int = 16  # recent certificates re-tried on new candidates
    min_probability: float = 1e-10  # below this, float64 cannot verify a certificate: reject

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_probability < 1e-3:
            raise BatError(f"min_probability={self.min_probability} must lie in [0, 1e-3) (default 1e-10)")
        if not 1e-12 <= self.tol <= 1e-2:
            raise BatError(f"tol={self.tol} must lie in [1e-12, 1e-2] (default 1e-6)")
        if not self.time_budget > 0:
            raise BatError(f"time_budget={self.time_budget} must be a positive number of seconds")
        self.search_levels = tuple(int(k) for k in self.search_levels)
        if any(k < 1 for k in self.search_levels):
            raise BatError(f"search_levels={self.search_levels} must be positive numbers of directions")
        for name in ("head_size", "lsq_head", "search_columns", "search_rounds", "lp_columns", "lp_max_rounds"):
            if int(getattr(self, name)) < 1:
                raise BatError(f"{name} must be a positive integer")


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
    method: str  # threshold | argmax | certificate | lp | resolution | fallback
    certificate: AcceptCertificate | RejectCertificate | None = None


@dataclass
class BatStats:
    """What one request's decisions cost. `as_dict()` is JSON-ready."""

    steps: int = 0
    candidates: int = 0
    by_threshold: int = 0
    by_certificate: int = 0
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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class BatSolver:
    """Exact BAT decisions for one request: its warm HiGHS model, recent certificates and statistics."""

    def __init__(self, basis: Basis, config: BatConfig | None = None) -> None:
        self.basis = basis
        self.config = config or BatConfig()
        self.stats = BatStats()
        self._cache: deque[np.ndarray] = deque(maxlen=self.config.cache_size)
        self._lp: RequestLP | None = None
        self._search_lps: dict[int, RequestLP] = {}
        self._step_id = 0
        self._rejects: list[RejectCertificate] = []
        self._deadline = 0.0

    # ------------------------------------------------------------------ steps
    def new_step(self, logits: Any, tau: Any) -> Step:
        """Prepare one distribution (softmax, head) for decisions; call once per generated token.

        `tau`: a number in (0, 1), or a ThresholdRule (its tau is computed from this distribution)."""
        if isinstance(tau, ThresholdRule):
            tau = tau.tau
        elif not (isinstance(tau, (float, int, np.floating)) and 0.0 < float(tau) < 1.0):
            raise BatError(f"tau={tau!r} must lie strictly between 0 and 1")
        step = Step.build(self.basis, logits, tau, head_size=self.config.head_size)
        self._step_id += 1
        self._rejects = []
        self.stats.steps += 1
        return step

    def cached_certificates(self) -> list[np.ndarray]:
        """The request's recent accept certificates (most recent first)."""
        return list(self._cache)

    @property
    def lp_models_built(self) -> int:
        return 0 if self._lp is None else self._lp.models_built

    # ------------------------------------------------------------------ decisions
    def decide(self, step: Step, candidates: Any, deadline: float | None = None) -> list[Decision]:
        """Exact decision for each candidate token of `step` (in the order given).

        `deadline` (a time.perf_counter() value) caps the LP work below the per-decision budget."""
        start = time.perf_counter()
        self._deadline = start + self.config.time_budget if deadline is None else min(deadline, start + self.config.time_budget)
        tokens = self._check_candidates(candidates)
        decisions: dict[int, Decision] = {}
        pending = []
        for t in np.unique(tokens):
            t = int(t)
            if step.p[t] >= step.tau:
                decisions[t] = Decision(t, True, "threshold")
            elif t == step.argmax:
                decisions[t] = Decision(t, True, "argmax")
            elif step.p[t] < self.config.min_probability:
                decisions[t] = Decision(t, False, "resolution")
            elif (point := self._stored_reject(step, t)) is not None:
                decisions[t] = Decision(t, False, "lp", point)
            else:
                pending.append(t)
        if pending:
            decisions.update(self._decide_below_tau(step, np.array(pending)))
        out = [decisions[int(t)] for t in tokens]
        self._count(out, time.perf_counter() - start)
        return out

    def _stored_reject(self, step: Step, token: int) -> RejectCertificate | None:
        """A feasible point found earlier in this step that already gives `token` zero mass."""
        limit = self.config.tol * step.p[token] * float(step.tolerance_scale(np.array([token]))[0])
        for point in self._rejects:
            if point.residual_l1 <= limit and token in set(point.zero_tokens(step.p).tolist()):
                return RejectCertificate(token, point.support, point.q, point.residual_l1)
        return None

    def _check_candidates(self, candidates: Any) -> np.ndarray:
        tokens = np.atleast_1d(np.asarray(candidates))
        if tokens.size == 0:
            raise BatError("no candidate tokens given: pass at least one token id")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise BatError(f"candidate token ids must be integers, got dtype {tokens.dtype}")
        if tokens.min() < 0 or tokens.max() >= self.basis.vocab_size:
            raise BatError(f"candidate token ids must lie in [0, {self.basis.vocab_size}); got {tokens.min()}..{tokens.max()}")
        return tokens.astype(np.int64)

    def _decide_below_tau(self, step: Step, pending: np.ndarray) -> dict[int, Decision]:
        cfg = self.config
        out: dict[int, Decision] = {}
        # 1. cheap certificates: the request's recent ones first (no factorization needed), then the
        #    least-squares directions for what they leave
        sources = [lambda todo: np.column_stack(list(self._cache)) if self._cache else None,
                   lambda todo: WeightedLeastSquares(step, head_size=cfg.lsq_head).directions(todo)]
        for source in sources:
            if not len(pending):
                break
            Y = source(pending)
            if Y is None:
                continue
            for t, cert in self._certify(step, pending, Y).items():
                out[t] = Decision(t, True, "certificate", cert)
            pending = np.array([t for t in pending if int(t) not in out], dtype=np.int64)
        # 2. exact LPs of the problem reduced to the top-k singular directions of W, k growing: a relaxation,
        #    so only their accept certificates count (proven again on the full problem)
        for k in cfg.search_levels:
            if not len(pending) or k >= self.basis.hidden_size:
                break
            Y = self._search_directions(step, pending, k)
            if Y is not None:
                for t, cert in self._certify(step, pending, Y).items():
                    out[t] = Decision(t, True, "certificate", cert)
                pending = np.array([t for t in pending if int(t) not in out], dtype=np.int64)
        # 3. the exact LP, candidate by candidate, under the time budget
        for t in pending:
            out[int(t)] = self._exact(step, int(t))
        return out

    def _certify(self, step: Step, pending: np.ndarray, Y: np.ndarray) -> dict[int, AcceptCertificate]:
        """Prove what the certificate candidates Y can prove for `pending`: cheap bound first, then one
        float32 product over the vocabulary for those whose exact part alone leaves room."""
        tol = self.config.tol * step.tolerance_scale(pending)
        lower, optimistic = step.candidate_values(Y, pending)
        proven = lower > tol[None, :]
        hopeful = (~proven.any(axis=0)) & (optimistic > tol[None, :]).any(axis=0)
        if hopeful.any():
            cols = np.flatnonzero((optimistic[:, hopeful] > tol[None, hopeful]).any(axis=1))
            values, _ = step.full_candidate_values(Y[:, cols], pending[hopeful])
            lower[np.ix_(cols, np.flatnonzero(hopeful))] = np.maximum(lower[np.ix_(cols, np.flatnonzero(hopeful))], values)
            proven = lower > tol[None, :]
        found = {}
        for n in np.flatnonzero(proven.any(axis=0)):
            best = int(np.argmax(lower[:, n]))
            y = Y[:, best].copy()
            found[int(pending[n])] = AcceptCertificate(int(pending[n]), y, float(lower[best, n]))
            self._remember(y)
        return found

    def _remember(self, y: np.ndarray) -> None:
        if not any(np.array_equal(y, old) for old in self._cache):
            self._cache.appendleft(y)

    def _search_directions(self, step: Step, pending: np.ndarray, k: int) -> np.ndarray | None:
        """Accept certificates of the L1 LP reduced to the top-k singular directions of W (column
        generation included), mapped back to R^(d+1); None when it proves nothing."""
        cfg = self.config
        reduced = self.basis.reduced_cached(k)
        small = Step(reduced, step.p, step.tau, step.scale, step.head_size)
        small.head = step.head  # same distribution, same head
        if k not in self._search_lps:
            self._search_lps[k] = RequestLP(reduced.hidden_size, max_columns=4 * cfg.search_columns)
        lp = self._search_lps[k]
        directions = self.basis.singular_directions(k)
        columns = []
        for t in pending:
            outcome = lp.solve(
                small, self._step_id, int(t), step.head[: cfg.search_columns], cfg.tol, self._deadline,
                max_rounds=cfg.search_rounds,
            )
            self.stats.lp_solves += outcome.solves
            self.stats.lp_iterations += outcome.iterations
            if outcome.accepted:
                columns.append(np.append(directions @ outcome.y[:k], outcome.y[k]))
        return np.column_stack(columns) if columns else None

    def _exact(self, step: Step, token: int) -> Decision:
        cfg = self.config
        if self._lp is None:
            self._lp = RequestLP(self.basis.hidden_size, max_columns=4 * cfg.lp_columns)
        deadline = max(self._deadline, time.perf_counter() + 1e-3)
        outcome = self._lp.solve(
            step, self._step_id, token, step.head[: cfg.lp_columns], cfg.tol, deadline, max_rounds=cfg.lp_max_rounds
        )
        self.stats.lp_solves += outcome.solves
        self.stats.lp_rounds += outcome.rounds
        self.stats.lp_iterations += outcome.iterations
        if outcome.accepted is True:
            self._remember(outcome.y)
            return Decision(token, True, "lp", AcceptCertificate(token, outcome.y, outcome.value))
        if outcome.accepted is False:
            tokens, x = outcome.point
            p_i = step.p[token]
            a_norm = float(step.tolerance_scale(np.array([token]))[0])
            point = RejectCertificate(
                token, np.append(tokens, token), np.append(x * p_i, -p_i), outcome.residual * a_norm * p_i
            )
            self._rejects.append(point)
            return Decision(token, False, "lp", point)
        self.stats.fallbacks += 1
        reason = outcome.reason or "unknown"
        self.stats.fallback_reasons[reason] = self.stats.fallback_reasons.get(reason, 0) + 1
        return Decision(token, False, "fallback")

    def _count(self, decisions: list[Decision], seconds: float) -> None:
        s = self.stats
        s.seconds += seconds
        for d in decisions:
            s.candidates += 1
            s.accepted += d.accepted
            s.rejected += not d.accepted
            if d.method in ("threshold", "argmax"):
                s.by_threshold += 1
            elif d.method == "certificate":
                s.by_certificate += 1
                s.accepted_below_tau += 1
            elif d.method == "lp":
                s.by_lp += 1
                s.accepted_below_tau += d.accepted
            elif d.method == "resolution":
                s.below_resolution += 1
