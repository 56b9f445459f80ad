"""The per-request decision engine: threshold, certificates, LP, in that order.

`BatSolver` answers "may token i be sampled?" for candidates of one distribution, exactly:
every accept carries an accept certificate (y, verified over the whole vocabulary with rigorous
float bounds), every reject that is not a fallback carries a feasible point. Cheap paths come first:

1. the threshold (p_i >= tau accepts with no LP; the argmax rule is the sampler's, not the decision's);
2. certificate candidates: the weighted-least-squares direction, then (with an LP budget) the request's
   recent certificates; each is only a candidate until certify.py proves it;
3. (with an LP budget) proofs by least squares over the top of the distribution (feasible.py): a feasible
   point by clipped least squares (reject), then reweighted least squares with column generation
   (accept); then accept certificates from small LPs over the top singular directions of W;
4. the exact restricted LP with column generation, warm-started on the request's HiGHS model;
5. past the per-decision time budget, or when HiGHS fails: reject, and count the fallback.

On a reduced basis (`Basis.reduced`, constraint reduction) every accept is proven again on the full
W: its certificate, lifted to R^(d+1), must pass the same check there, or the token is rejected.
Accept certificates are therefore always vectors for [W, 1] of the full model.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .basis import Basis
from .certify import Step
from .config import BatConfig
from .errors import BatError
from .feasible import RegressionSearch, WorkingSet, feasible_point
from .lp import RequestLP
from .search import WeightedLeastSquares
from .thresholds import ThresholdRule


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
    accepts_by_source: dict[str, int] = field(
        default_factory=dict
    )  # least-squares | reweighted | cache | regression | search-k | lp

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
        self._lsq: WeightedLeastSquares | None = None
        self._working: dict[int, WorkingSet] = {}
        self._parent_step: tuple[Step, Step] | None = None  # (step, the same distribution on the full W)
        self._deadline = 0.0  # the safety net's clock for the decision in progress

    # ------------------------------------------------------------------ steps
    def new_step(self, logits: Any, tau: Any) -> Step:
        """Prepare one distribution (softmax, head) for decisions; call once per generated token.

        `tau`: a number in (0, 1), or a ThresholdRule (its tau is computed from this distribution)."""
        if isinstance(tau, ThresholdRule):
            pass
        elif not (isinstance(tau, (float, int, np.floating)) and 0.0 < float(tau) < 1.0):
            raise BatError(f"tau={tau!r} must lie strictly between 0 and 1")
        step = Step.build(self.basis, logits, tau, head_size=self.config.head_size)
        self._step_id += 1
        self._rejects = []
        self._lsq, self._working = (
            None,
            {},
        )  # the previous step's factorizations (and the distribution they hold) can go
        self.stats.steps += 1
        return step

    def cached_certificates(self) -> list[np.ndarray]:
        """The request's recent accept certificates (most recent first), as vectors for the full [W, 1]."""
        return [self._lifted(y) for y in self._cache]

    def forget_certificates(self) -> None:
        """Drop the recent certificates, so that later decisions do not depend on earlier steps."""
        self._cache.clear()

    def proven_tokens(self, step: Step, Y: np.ndarray) -> np.ndarray:
        """The tokens that some column of Y (certificates for the full [W, 1]) proves: bool, length v."""
        step = self._verifying_step(step)
        tol = self.config.tol * step.tolerance_scale(np.arange(len(step.p)))
        return (step.all_values(Y) > tol[None, :]).any(axis=0)

    # ------------------------------------------------------------------ reduced bases
    def _lifted(self, y: np.ndarray) -> np.ndarray:
        """A certificate of this solver's basis as one for the full [W, 1] (the same c = A y up to rounding)."""
        if self.basis.parent is None:
            return y
        return np.append(self.basis.directions @ y[:-1], y[-1])

    def _verifying_step(self, step: Step) -> Step:
        """The step on the full W that proves this solver's accepts (the step itself unless the basis is reduced)."""
        if self.basis.parent is None:
            return step
        if self._parent_step is None or self._parent_step[0] is not step:
            full = Step(self.basis.parent, step.p, step.tau, step.scale, step.head_size)
            self._parent_step = (step, full)
        return self._parent_step[1]

    def _proven_on_full_matrix(self, step: Step, found: dict[int, Decision]) -> dict[int, Decision]:
        """Accepts of a reduced basis, proven again on the full W (its rounded product W V_k proves nothing of
        W itself); what fails there is rejected, as constraint reduction may reject more, never accept more."""
        full = self._verifying_step(step)
        out = {}
        for t, decision in found.items():
            if decision.accepted:
                y = self._lifted(decision.certificate.y)
                tol = self.config.tol * float(full.tolerance_scale(np.array([t]))[0])
                value = full.full_value(y, t, enough=tol)
                decision = (
                    Decision(t, True, decision.method, AcceptCertificate(t, y, value))
                    if value > tol
                    else self._fallback(t, "not proven on the full matrix")
                )
            out[t] = decision
        return out

    # ------------------------------------------------------------------ decisions
    def decide(self, step: Step, candidates: Any, deadline: float | None = None) -> list[Decision]:
        """Exact decision for each candidate token of `step` (in the order given).

        `deadline` (a time.perf_counter() value) caps the LP work below the per-decision budget."""
        start = time.perf_counter()
        products = step.vocabulary_products
        self._deadline = (
            start + self.config.time_budget if deadline is None else min(deadline, start + self.config.time_budget)
        )
        tokens = self._check_candidates(candidates)
        decisions: dict[int, Decision] = {}
        pending = []
        for t in np.unique(tokens):
            t = int(t)
            if step.p[t] >= step.tau:
                decisions[t] = Decision(t, True, "threshold")
            elif step.p[t] < self.config.min_probability:
                decisions[t] = Decision(t, False, "resolution")
            elif (point := self._stored_reject(step, t)) is not None:
                decisions[t] = Decision(t, False, "lp", point)
            else:
                pending.append(t)
        if pending:
            found = self._decide_below_tau(step, np.array(pending))
            decisions.update(found if self.basis.parent is None else self._proven_on_full_matrix(step, found))
        out = [decisions[int(t)] for t in tokens]
        self.stats.vocabulary_products += step.vocabulary_products - products
        self._count(out, time.perf_counter() - start)
        return out

    def record_shortcut(self, decision: Decision) -> Decision:
        """Count a decision the caller settled by the threshold (p >= tau) without `decide`."""
        self._count([decision], 0.0)
        return decision

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
            raise BatError(
                f"candidate token ids must lie in [0, {self.basis.vocab_size}); got {tokens.min()}..{tokens.max()}"
            )
        return tokens.astype(np.int64)

    def _decide_below_tau(self, step: Step, pending: np.ndarray) -> dict[int, Decision]:
        cfg = self.config
        out: dict[int, Decision] = {}
        # 1. cheap certificates: the least-squares directions
        search = self._least_squares(step)
        pending = self._accept_found(step, pending, search.directions(pending), ["least-squares"] * len(pending), out)
        # reweighted least squares only for what the plain directions left (most candidates never need it)
        if len(pending) and cfg.lsq_refine:
            refined = search.refined_directions(pending, cfg.lsq_refine)
            if refined.shape[1]:
                pending = self._accept_found(step, pending, refined, ["reweighted"] * refined.shape[1], out)
        if not len(pending) or cfg.time_budget == 0:
            return {**out, **{int(t): self._fallback(int(t), "certificate search only") for t in pending}}
        iterations_left = {int(t): int(cfg.lp_iterations) for t in pending}  # simplex iterations: the LPs' work budget
        # 2. the request's recent certificates (from earlier LPs, steps and candidates). Only here: ranked with
        #    the least-squares directions on every decision they cost time and proved nothing more (docs/core.md)
        if self._cache and self._clock_left():
            pending = self._accept_found(step, pending, np.column_stack(self._cache), ["cache"] * len(self._cache), out)
        # 3. proofs by least squares over the top of the distribution (feasible.py), bounded by rounds
        if len(pending) and self._clock_left():
            pending = self._least_squares_proofs(step, pending, out)
        # 4. exact LPs of the problem reduced to the top-k singular directions of W, k growing: a relaxation,
        #    so only their accept certificates count (proven again on the full problem)
        for k in cfg.search_levels:
            if not len(pending) or k >= self.basis.hidden_size or not self._clock_left():
                break
            Y = self._search_directions(step, pending, k, iterations_left)
            if Y is not None:
                pending = self._accept_found(step, pending, Y, [f"search-{k}"] * Y.shape[1], out)
        # 5. the exact LP, candidate by candidate, under the work budget
        for t in pending:
            out[int(t)] = self._exact(step, int(t), iterations_left)
        return out

    def _clock_left(self) -> bool:
        """Whether the safety net's clock still allows work on this decision."""
        return time.perf_counter() < self._deadline

    def _least_squares_proofs(self, step: Step, pending: np.ndarray, out: dict) -> np.ndarray:
        """Record what feasible.py proves, token by token, cheapest first: a feasible point (reject) on the
        first working set, a few rounds of reweighted least squares with column generation (accept), feasible
        points on the larger working sets, then the regression's other rounds; return the tokens still pending."""
        cfg = self.config
        left = []
        sizes = list(cfg.point_columns) if cfg.point_rounds else []
        for t in (int(t) for t in pending):
            decision = self._feasible_point(step, t, sizes[:1])
            regression = None
            if decision is None and cfg.regression_iterations:
                regression = RegressionSearch(
                    self._working_set(step, cfg.point_columns[0]),
                    t,
                    cfg.tol,
                    cfg.regression_grow,
                    cfg.regression_columns,
                )
                decision = self._regression(regression, min(cfg.regression_first, cfg.regression_iterations))
            if decision is None:
                decision = self._feasible_point(step, t, sizes[1:])
            if decision is None and regression is not None:
                decision = self._regression(regression, cfg.regression_iterations - regression.iterations)
            if decision is None:
                left.append(t)
            else:
                out[t] = decision
        return np.array(left, dtype=np.int64)

    def _regression(self, search: RegressionSearch, iterations: int) -> Decision | None:
        """An accept by `iterations` more rounds of the reweighted regression, or None."""
        found = search.run(iterations, self._deadline)
        if found is None:
            return None
        self._remember(found[0])
        self.stats.accepts_by_source["regression"] = self.stats.accepts_by_source.get("regression", 0) + 1
        return Decision(search.token, True, "certificate", AcceptCertificate(search.token, *found))

    def _feasible_point(self, step: Step, token: int, sizes: list[int]) -> Decision | None:
        """A reject by a feasible point on the working sets of `sizes` tokens in turn, or None."""
        for columns in sizes:
            if not self._clock_left():
                return None
            found = feasible_point(self._working_set(step, columns), token, self.config.tol, self.config.point_rounds)
            if found is not None:
                point = RejectCertificate(token, *found)
                self._rejects.append(point)
                self.stats.rejected_by_point += 1
                return Decision(token, False, "certificate", point)
        return None

    def _working_set(self, step: Step, columns: int) -> WorkingSet:
        """The step's working set of `columns` tokens, built once per step (shared by the searches)."""
        working = self._working.get(columns)
        if working is None or working.step is not step:
            working = self._working[columns] = WorkingSet(step, columns)
        return working

    def _least_squares(self, step: Step) -> WeightedLeastSquares:
        """The step's least-squares factorization, kept for the step's later candidates (the sampler's
        redraws after a reject)."""
        if self._lsq is None or self._lsq.step is not step:
            self._lsq = WeightedLeastSquares(step, head_size=self.config.lsq_head)
        return self._lsq

    def _accept_found(self, step: Step, pending: np.ndarray, Y: np.ndarray, labels: list[str], out: dict) -> np.ndarray:
        """Record the accepts that the candidates Y (columns named by `labels`) prove; return the
        tokens still pending."""
        for t, (cert, column) in self._certify(step, pending, Y).items():
            out[t] = Decision(t, True, "certificate", cert)
            source = labels[column]
            self.stats.accepts_by_source[source] = self.stats.accepts_by_source.get(source, 0) + 1
        return np.array([t for t in pending if int(t) not in out], dtype=np.int64)

    def _certify(self, step: Step, pending: np.ndarray, Y: np.ndarray) -> dict[int, tuple[AcceptCertificate, int]]:
        """Prove what the certificate candidates Y can prove for `pending`, token by token: Y and its
        columns with re-chosen constant components (Step.with_best_offsets), ranked by their value on the
        head; the most promising columns only are proven by Step.full_value (a cheap bound of the tail
        first, then one float32 product over the vocabulary)."""
        found = {}
        for token in pending:
            token = int(token)
            cand = np.array([token])
            # the head products of Y serve every column below: the offset columns are +-Y with new constants
            u = step.head_products(step.exact_set(token), Y)
            Yt = np.hstack([Y, step.with_best_offsets(Y, token, u)])
            ut = np.hstack([u, u, -u])
            tol = self.config.tol * float(step.tolerance_scale(cand)[0])
            ranking = step.head_values(Yt, token, ut)
            for col in np.argsort(-ranking)[: self.config.full_checks]:
                if not ranking[col] > tol:
                    break  # the tail only lowers the value: no product can prove this column
                y = Yt[:, col]
                value = step.full_value(
                    y, token, ut[:, col], enough=tol
                )  # a cheap bound of the tail, then the vocabulary
                if value > tol:
                    found[token] = (AcceptCertificate(token, y.copy(), value), int(col) % Y.shape[1])
                    self._remember(found[token][0].y)
                    break
        return found

    def _remember(self, y: np.ndarray) -> None:
        if not any(np.array_equal(y, old) for old in self._cache):
            self._cache.appendleft(y)

    def _search_directions(
        self, step: Step, pending: np.ndarray, k: int, iterations_left: dict[int, int]
    ) -> np.ndarray | None:
        """Accept certificates of the L1 LP reduced to the top-k singular directions of W (column
        generation included), mapped back to R^(d+1); None when it proves nothing. Spends from each
        candidate's `iterations_left`."""
        cfg = self.config
        reduced = self.basis.reduced_cached(k)
        small = Step(reduced, step.p, step.tau, step.scale, step.head_size)
        small.head = step.head  # same distribution, same head
        if k not in self._search_lps:
            self._search_lps[k] = RequestLP(reduced.hidden_size, max_columns=4 * cfg.search_columns)
        lp = self._search_lps[k]
        directions = self.basis.singular_directions(k)
        columns = []
        for t in (int(t) for t in pending):
            if not self._clock_left():
                break
            if iterations_left[t] <= 0:
                continue
            outcome = lp.solve(
                small,
                self._step_id,
                t,
                step.head[: cfg.search_columns],
                cfg.tol,
                self._deadline,
                max_rounds=cfg.search_rounds,
                iterations=iterations_left[t],
            )
            iterations_left[t] -= outcome.iterations
            self.stats.lp_solves += outcome.solves
            self.stats.lp_iterations += outcome.iterations
            if outcome.accepted:
                columns.append(np.append(directions @ outcome.y[:k], outcome.y[k]))
        return np.column_stack(columns) if columns else None

    def _exact(self, step: Step, token: int, iterations_left: dict[int, int]) -> Decision:
        cfg = self.config
        if not self._clock_left():
            return self._fallback(token, "time budget")
        if iterations_left[token] <= 0:
            return self._fallback(token, "work budget")
        if self._lp is None:
            self._lp = RequestLP(self.basis.hidden_size, max_columns=max(4096, 4 * cfg.lp_columns))
        outcome = self._lp.solve(
            step,
            self._step_id,
            token,
            step.head[: cfg.lp_columns],
            cfg.tol,
            self._deadline,
            max_rounds=cfg.lp_max_rounds,
            grow=cfg.lp_grow,
            iterations=iterations_left[token],
        )
        self.stats.lp_solves += outcome.solves
        self.stats.lp_rounds += outcome.rounds
        self.stats.lp_iterations += outcome.iterations
        if outcome.accepted is True:
            self._remember(outcome.y)
            self.stats.accepts_by_source["lp"] = self.stats.accepts_by_source.get("lp", 0) + 1
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
        return self._fallback(token, outcome.reason or "unknown")

    def _fallback(self, token: int, reason: str) -> Decision:
        """The conservative answer when no proof came within the budget: reject, and count it."""
        self.stats.fallbacks += 1
        self.stats.fallback_reasons[reason] = self.stats.fallback_reasons.get(reason, 0) + 1
        return Decision(token, False, "fallback")

    def _count(self, decisions: list[Decision], seconds: float) -> None:
        s = self.stats
        s.seconds += seconds
        for d in decisions:
            s.candidates += 1
            s.accepted += d.accepted
            s.rejected += not d.accepted
            if d.method in ("threshold", "argmax"):  # "argmax": the sampler's rule (record_shortcut)
                s.by_threshold += 1
            elif d.method == "certificate":
                s.by_certificate += 1
                s.accepted_below_tau += d.accepted
            elif d.method == "lp":
                s.by_lp += 1
                s.accepted_below_tau += d.accepted
            elif d.method == "resolution":
                s.below_resolution += 1
