"""Accepts for the hard candidates without the simplex: the reweighted regression with column generation.

Token i is accepted when some c = A y with c_i = 1 has sum_{j != i} p_j rho(c_j) < p_i (docs/method.md,
section 3). Iteratively reweighted least squares writes that cost as sum_j v_j c_j^2 with
v_j = p_j slope(c_j) / |c_j| and re-solves H y = a_i (H = sum v_j a_j a_j') over a working set that starts
at one of the step's `WorkingSet`s (its first direction is that set's least-squares solve); after each solve
the tokens outside the set that the current y charges most (p_j rho(c_j), from one float32 product over the
vocabulary) join it: column generation, as in the exact LP, on a least-squares surrogate. Each iterate, with
its constant component re-chosen (search.with_best_offsets), is only a candidate until certify.py proves it
over the whole vocabulary.
"""

from __future__ import annotations

import time

import numpy as np

from .certify import costliest_tokens, regression_weights, rho
from .feasible import WorkingSet, solve_ridged, weighted_gram
from .search import prove_pair, with_best_offsets


class RegressionSearch:
    """Reweighted least squares with column generation for one token, resumable: `run(n)` makes up to n more
    iterations and returns (y, value), an accept certificate proven over the whole vocabulary, or None. The
    solver interleaves it with the feasible-point searches (a hard accept needs the regression, a hard reject
    a feasible point, and neither is known in advance)."""

    def __init__(self, working: WorkingSet, token: int, tol: float, grow: int, max_columns: int) -> None:
        step = working.step
        self.step, self.token, self.grow, self.max_columns = step, token, grow, max_columns
        self.working = working
        self.a_i = step.augmented_rows(np.array([token]))[0]
        self.limit = tol * float(np.abs(self.a_i).sum())
        tokens, A, p = working.without(token)
        capacity = max(max_columns, len(tokens))
        self._A = np.empty((capacity, A.shape[1]))  # rows of the working set, grown in place
        self._A[: len(tokens)] = A
        self._p = np.empty(capacity)
        self._p[: len(tokens)] = p
        self.size = len(tokens)
        self.in_set = np.zeros(len(step.p), dtype=bool)
        self.in_set[tokens] = self.in_set[token] = True
        self.iterations = 0
        self.failed = False  # a degenerate system: no later iteration can do better
        # sum_{j != i} p_j rho(c_j) / (p_i c_i) of the first iterate: accepts need below 1 at the end, and
        # the candidates whose first iterate is far above it are mostly rejects (the solver's order)
        self.cost_ratio = np.inf
        self._y: np.ndarray | None = None  # the last iterate (None: the next is the working set's least squares)

    def run(self, iterations: int, deadline: float) -> tuple[np.ndarray, float] | None:
        for _ in range(iterations):
            if self.failed or time.perf_counter() >= deadline:
                return None
            self.iterations += 1
            found = self._iterate()
            if found is not None:
                return found
        return None

    def _direction(self) -> np.ndarray | None:
        """The iterate y (c_i = 1) of the current system, or None for a degenerate one."""
        if self._y is None:
            z = self.working.least_squares(self.token)
        else:
            A, p = self._A[: self.size], self._p[: self.size]
            z = solve_ridged(weighted_gram(A, regression_weights(p, A @ self._y, self.step.tprime)), self.a_i)
        if z is None:
            return None
        y = z / (self.a_i @ z)  # c_i = 1
        return y if np.isfinite(y).all() else None

    def _iterate(self) -> tuple[np.ndarray, float] | None:
        step, token = self.step, self.token
        d = step.basis.hidden_size
        y = self._direction()
        if y is None:
            self.failed = True
            return None
        # one product over the vocabulary per iterate: it proves, and it picks the tokens that join the set
        candidates = with_best_offsets(step, y[:, None], token)  # columns +y, -y
        found, u32 = prove_pair(step, candidates, token, self.limit)
        if found is not None:
            return found
        if u32 is None and (self.size < self.max_columns or self.iterations == 1):
            u32 = step.product(y[:d])
        if self.iterations == 1:
            self.cost_ratio = _cost_ratio(step, token, u32, float(candidates[d, 0]))
        if self.size < self.max_columns:
            self._add_costliest(y, u32)
        self._y = y  # the next iteration reweights by it (not now: the solver may not ask for one)
        return None

    def _add_costliest(self, y: np.ndarray, u32: np.ndarray) -> None:
        """The tokens outside the set that y charges most join it."""
        step = self.step
        cost = _charges(step, u32, float(y[-1]))
        cost[self.in_set] = -1.0
        add = costliest_tokens(cost, min(self.grow, self.max_columns - self.size))
        if len(add):
            self.in_set[add] = True
            self._A[self.size : self.size + len(add)] = step.augmented_rows(add)
            self._p[self.size : self.size + len(add)] = step.p[add]
            self.size += len(add)


def _charges(step, u32: np.ndarray, offset: float) -> np.ndarray:
    """p_j rho(c_j) over the vocabulary for c = s u + offset, from the float32 product u: estimates that pick
    tokens and order the searches (nothing is proven with them)."""
    c = u32.astype(np.float64)
    if step.scale is not None:
        c *= step.scale
    return step.p * rho(c + offset, step.tprime)


def _cost_ratio(step, token: int, u32: np.ndarray, offset: float) -> float:
    """sum_{j != i} p_j rho(c_j) / (p_i c_i) for c = s u + offset (an estimate, as `_charges`)."""
    cost = _charges(step, u32, offset)
    c_i = float(u32[token]) * (1.0 if step.scale is None else float(step.scale[token])) + offset
    if not c_i > 0:
        return np.inf
    return float((cost.sum() - cost[token]) / (step.p[token] * c_i))
