"""The exact path: a restricted LP with column generation, one warm-started HiGHS model per request.

For candidate i and a working set K of tokens, HiGHS solves (docs/method.md, section 4, in q-space divided
by p_i, every token outside K held at q_j = 0):

    delta_K = min ||r||_1  s.t.  sum_{j in K, j != i} x_j a_j + r = a_i,  -p_j/p_i <= x_j <= tau' p_j/p_i

- delta_K <= tol * ||a_i||_1: the restricted point is a feasible point of the full problem (up to that
  residual): reject, exactly (delta <= delta_K).
- otherwise the optimal row duals y are a certificate for K only; certify.py checks them over the whole
  vocabulary. If they fail, the tokens that break them (largest p_j rho(c_j)) join K and HiGHS re-solves
  from its last basis (column generation). This ends with the exact answer or, past the time budget or
  the round limit, a conservative reject that is counted.

The model keeps a column for every token it has ever used (columns of tokens outside the current K
have bounds [0, 0]), so successive candidates and successive steps of a request only change bounds and
the right-hand side: dual simplex restarts from the previous basis. Soft-capped models change their
columns every step, so their model is rebuilt per step.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

import highspy
import numpy as np

from .basis import Basis
from .certify import Step, costliest_tokens, rho
from .config import BatConfig
from .decisions import AcceptCertificate, BatStats, Clock, Decision, RejectCertificate
from .highs import new_highs


@dataclass
class LPOutcome:
    accepted: bool | None  # None: undecided (solver failure, time budget, round limit) -> caller rejects
    y: np.ndarray | None = None  # verified accept certificate (row duals)
    value: float = float("nan")  # lower bound of value(y, i) for an accept
    residual: float = float("nan")  # delta_K / ||a_i||_1 for a reject
    point: tuple[np.ndarray, np.ndarray] | None = None  # (tokens, x) of the reject certificate
    solves: int = 0
    rounds: int = 0
    iterations: int = 0
    reason: str = ""


_live: weakref.WeakSet = weakref.WeakSet()


_created = 0


def live_models() -> int:
    """RequestLP objects alive in this process (each holds one HiGHS model): for leak checks."""
    return len(_live)


def models_created() -> int:
    """RequestLP objects created in this process so far."""
    return _created


class RequestLP:
    """One HiGHS model for one request, re-used across candidates and steps."""

    def __init__(self, hidden_size: int, max_columns: int = 12000) -> None:
        global _created
        _created += 1
        _live.add(self)
        self.rows = hidden_size + 1
        self.max_columns = max_columns
        self.models_built = 0
        self._reset()

    def _reset(self) -> None:
        self.highs = new_highs()
        h = self.highs
        h.setOptionValue("presolve", "off")  # presolve would throw the warm basis away
        h.setOptionValue("simplex_strategy", 1)  # dual simplex: bounds/rhs changes keep the basis dual feasible
        n = self.rows
        inf = highspy.kHighsInf
        h.addRows(n, np.zeros(n), np.zeros(n), 0, np.array([], np.int32), np.array([], np.int32), np.array([]))
        eye = np.arange(n, dtype=np.int32)
        h.addCols(
            2 * n,
            np.ones(2 * n),
            np.zeros(2 * n),
            np.full(2 * n, inf),
            2 * n,
            np.arange(2 * n, dtype=np.int32),
            np.concatenate([eye, eye]),
            np.concatenate([np.ones(n), -np.ones(n)]),
        )
        self.column_of: dict[int, int] = {}
        self.tokens: list[int] = []
        self.scaled_step: int | None = None
        self.models_built += 1

    @property
    def columns(self) -> int:
        return len(self.tokens)

    def _ensure_columns(self, step: Step, tokens: np.ndarray) -> None:
        new = [int(t) for t in tokens if int(t) not in self.column_of]
        if not new:
            return
        block = step.augmented_rows(np.array(new))
        n = len(new)
        self.highs.addCols(
            n,
            np.zeros(n),
            np.zeros(n),
            np.zeros(n),
            n * self.rows,
            (np.arange(n) * self.rows).astype(np.int32),
            np.tile(np.arange(self.rows, dtype=np.int32), n),
            block.ravel(),
        )
        first = 2 * self.rows + len(self.tokens)
        for k, t in enumerate(new):
            self.column_of[t] = first + k
        self.tokens.extend(new)

    def solve(
        self,
        step: Step,
        step_id: int,
        candidate: int,
        working: np.ndarray,
        tol: float,
        deadline: float,
        max_rounds: int = 8,
        grow: int = 512,
        iterations: int = 10**7,
    ) -> LPOutcome:
        """Decide one candidate exactly (column generation until proven or out of budget): at most
        `iterations` dual simplex iterations in all (the deterministic budget), `deadline` the clock's."""
        if step.scale is not None and self.scaled_step != step_id:
            self._reset()  # soft-capped columns depend on the step's logits
            self.scaled_step = step_id
        if self.columns + len(working) > self.max_columns:
            self._reset()
        outcome = LPOutcome(accepted=None)
        working = np.setdiff1d(np.unique(working), [candidate])
        cand = np.array([candidate])
        a_norm = float(step.tolerance_scale(cand)[0])
        rhs = step.augmented_rows(cand)[0]
        self.highs.changeRowsBounds(self.rows, np.arange(self.rows, dtype=np.int32), rhs, rhs)
        for round_ in range(max_rounds):
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                outcome.reason = "time budget"
                return outcome
            toks, cols, active = self._bound_columns(step, candidate, working)
            if outcome.iterations >= iterations:
                outcome.reason = "work budget"
                return outcome
            info = self._run(remaining, iterations, outcome)
            outcome.rounds = round_ + 1
            if info is None:
                return outcome
            delta = float(info.objective_function_value) / a_norm
            solution = self.highs.getSolution()
            if delta <= tol:
                x = np.asarray(solution.col_value)[cols]
                outcome.accepted, outcome.residual = False, delta
                outcome.point = (toks[active], x[active])
                return outcome
            y = np.asarray(solution.row_dual, dtype=np.float64)[:, None]
            value = step.candidate_values(y, cand, exact_tokens=working)[0][0, 0]
            if value <= tol * a_norm:
                value, c = _full_check(step, y, cand, working)
                if value <= tol * a_norm:
                    add = _breaking_tokens(step, c, candidate, working, grow)
                    if add is None:
                        outcome.reason = "no column left to add"
                        return outcome
                    working = np.union1d(working, add)  # then re-solve from the current basis
                    continue
            outcome.accepted, outcome.y, outcome.value = True, y[:, 0], value
            return outcome
        outcome.reason = "round limit"
        return outcome

    def _bound_columns(self, step: Step, candidate: int, working: np.ndarray) -> tuple:
        """The box of the working set's columns, every other column held at 0: (tokens, columns, active)."""
        self._ensure_columns(step, np.append(working, candidate))
        cols = np.fromiter((self.column_of[int(t)] for t in self.tokens), np.int32, len(self.tokens))
        toks = np.array(self.tokens)
        active = np.isin(toks, working)
        ratio = np.where(active, step.p[toks] / step.p[candidate], 0.0)
        self.highs.changeColsBounds(len(cols), cols, -ratio, step.tprime * ratio)
        return toks, cols, active

    def _run(self, remaining: float, iterations: int, outcome: LPOutcome):
        """One dual simplex run within the clock and what is left of `iterations`: HiGHS's info when optimal,
        else None with the reason in `outcome`."""
        h = self.highs
        h.setOptionValue("time_limit", h.getRunTime() + max(remaining, 1e-3))  # HiGHS counts from its creation
        h.setOptionValue("simplex_iteration_limit", int(iterations - outcome.iterations))  # per run
        h.run()
        outcome.solves += 1
        info = h.getInfo()
        outcome.iterations += int(info.simplex_iteration_count)
        status = h.getModelStatus()
        if status == highspy.HighsModelStatus.kOptimal:
            return info
        outcome.reason = {
            highspy.HighsModelStatus.kIterationLimit: "work budget",
            highspy.HighsModelStatus.kTimeLimit: "time budget",
        }.get(status, h.modelStatusToString(status))
        return None


def _breaking_tokens(step: Step, c: np.ndarray, candidate: int, working: np.ndarray, grow: int):
    """The (up to) `grow` tokens outside the working set that break the certificate c most, or None."""
    sign = 1.0 if c[candidate] > 0 else -1.0
    cost = step.p * rho(sign * c, step.tprime)
    cost[working] = -1.0
    cost[candidate] = -1.0
    add = costliest_tokens(cost, grow)
    return add if len(add) else None


def _full_check(step: Step, y: np.ndarray, cand: np.ndarray, working: np.ndarray) -> tuple[float, np.ndarray]:
    values, c = step.full_candidate_values(y, cand, exact_tokens=np.union1d(working, step.head))
    return float(values[0, 0]), c[:, 0]


class LinearPrograms:
    """A request's LP stages under its work budget (`lp_iterations` dual simplex iterations per candidate over
    all its LPs): the L1 LPs reduced to the top singular directions of W (a relaxation: only their accept
    certificates count), and the exact restricted LP. One warm HiGHS model each, kept across steps."""

    def __init__(self, basis: Basis, config: BatConfig, stats: BatStats, clock: Clock, certificates) -> None:
        self.basis, self.config, self.stats, self.clock = basis, config, stats, clock
        self.certificates = certificates  # search.CertificateSearch: accepts are remembered there
        self.step_id = 0  # the caller's step counter: a model's columns are rebuilt when it changes
        self._exact: RequestLP | None = None
        self._reduced: dict[int, RequestLP] = {}

    def reduced_accepts(
        self, step: Step, pending: np.ndarray, k: int, iterations_left: dict[int, int]
    ) -> np.ndarray | None:
        """Accept certificates of the L1 LP reduced to the top-k singular directions of W (column generation
        included), mapped back to R^(d+1); None when it proves nothing. Spends from `iterations_left`."""
        cfg = self.config
        reduced = self.basis.reduced_cached(k)
        small = Step(reduced, step.p, step.tau, step.scale, step.head_size)
        small.head = step.head  # same distribution, same head
        if k not in self._reduced:
            self._reduced[k] = RequestLP(reduced.hidden_size, max_columns=4 * cfg.search_columns)
        lp = self._reduced[k]
        directions = self.basis.singular_directions(k)
        columns = []
        for t in (int(t) for t in pending):
            if not self.clock.left():
                break
            if iterations_left[t] <= 0:
                continue
            outcome = lp.solve(
                small,
                self.step_id,
                t,
                step.head[: cfg.search_columns],
                cfg.tol,
                self.clock.deadline,
                max_rounds=cfg.search_rounds,
                iterations=iterations_left[t],
            )
            iterations_left[t] -= outcome.iterations
            self.stats.lp_solves += outcome.solves
            self.stats.lp_iterations += outcome.iterations
            if outcome.accepted:
                columns.append(np.append(directions @ outcome.y[:k], outcome.y[k]))
        return np.column_stack(columns) if columns else None

    def exact(self, step: Step, token: int, iterations_left: dict[int, int]) -> Decision:
        """The exact restricted LP's answer for `token`, with its certificate, or a counted fallback."""
        cfg = self.config
        if not self.clock.left():
            return self.stats.fallback(token, "time budget")
        if iterations_left[token] <= 0:
            return self.stats.fallback(token, "work budget")
        if self._exact is None:
            self._exact = RequestLP(self.basis.hidden_size, max_columns=max(4096, 4 * cfg.lp_columns))
        outcome = self._exact.solve(
            step,
            self.step_id,
            token,
            step.head[: cfg.lp_columns],
            cfg.tol,
            self.clock.deadline,
            max_rounds=cfg.lp_max_rounds,
            grow=cfg.lp_grow,
            iterations=iterations_left[token],
        )
        self.stats.lp_solves += outcome.solves
        self.stats.lp_rounds += outcome.rounds
        self.stats.lp_iterations += outcome.iterations
        if outcome.accepted is True:
            self.certificates.remember(outcome.y)
            self.stats.accepted_by("lp")
            return Decision(token, True, "lp", AcceptCertificate(token, outcome.y, outcome.value))
        if outcome.accepted is False:
            tokens, x = outcome.point
            p_i = step.p[token]
            a_norm = float(step.tolerance_scale(np.array([token]))[0])
            support, q = np.append(tokens, token), np.append(x * p_i, -p_i)
            return Decision(token, False, "lp", RejectCertificate(token, support, q, outcome.residual * a_norm * p_i))
        return self.stats.fallback(token, outcome.reason or "unknown")
