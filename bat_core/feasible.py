"""Proofs for the hard candidates without the simplex: least squares over the top of the distribution.

Both searches work on a working set K of the most probable tokens, with rows a_j = (s_j w_j, 1) and
the Gram matrix G = sum_{j in K} p_j a_j a_j' (`WorkingSet`, built once per step and shared).

**Reject** (`feasible_point`). Token i is rejected when some q with q_i = -p_i, every other
q_j in [-p_j, tau' p_j] and sum_j q_j a_j = 0 exists (docs/method.md, sections 2-3). Holding every token
outside K at q_j = 0 is a restriction, so a point found on K is a point of the full problem: an exact
reject. The search takes the least-squares solution of sum_{j in K} q_j a_j = p_i a_i with weights
1 / p_j (q_j = p_j a_j' lambda, G lambda = p_i a_i), then holds the tokens that left their box at the
bound they crossed and re-solves the rest, a few rounds. On real SmolLM2 candidates that the
warm-started simplex could not decide in 2 s (it needs 15-30 s), it found a point in 0.05-0.09 s for
7 of 8 with K = 2048; the rest of such rejects need K = 4096-8192 (0.1-0.3 s).

**Accept** (`RegressionSearch`). Token i is accepted when some c = A y with c_i = 1 has
sum_{j != i} p_j rho(c_j) < p_i. Iteratively reweighted least squares writes that cost as
sum_j v_j c_j^2 with v_j = p_j slope(c_j) / |c_j| and re-solves H y = a_i (H = sum v_j a_j a_j'),
while the tokens outside K that the current y charges most (p_j rho(c_j), from one float32 product
over the vocabulary) join K: column generation, as in the exact LP, on a least-squares surrogate.
Each iterate, with its constant component re-chosen (search.with_best_offsets), is only a candidate
until certify.py proves it over the whole vocabulary. On 35 real SmolLM2 candidates that the exact
path left undecided at 2 s (hard accepts: the exact LP needs 6-15 s), 20 iterations proved 29.

Whatever these searches return is proven here (points: float64 residual with a rigorous rounding
bound) or in certify.py (certificates); when they find nothing, the LPs decide.
"""

from __future__ import annotations

import time

import numpy as np

from .certify import U64, Step, costliest_tokens, regression_weights, rho
from .search import with_best_offsets


def weighted_gram(A: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """A' diag(weights) A for nonnegative weights, as S'S with S = diag(sqrt(weights)) A: numpy then calls
    BLAS's symmetric rank-k update, half the work of the general product (10 against 23 ms at 2048 rows)."""
    S = A * np.sqrt(weights)[:, None]
    return np.dot(S.T, S)


class WorkingSet:
    """The `columns` most probable tokens of a step: augmented rows A, probabilities and G = A' diag(p) A."""

    def __init__(self, step: Step, columns: int) -> None:
        self.step = step
        p = step.p
        k = min(columns, len(p))
        if k <= len(step.head):
            tokens = step.head[:k]
        else:
            tokens = np.argpartition(-p, k - 1)[:k] if k < len(p) else np.arange(len(p))
        self.tokens = np.sort(tokens)
        self.A = step.augmented_rows(self.tokens)
        self.weights = p[self.tokens]
        self.gram = weighted_gram(self.A, self.weights)

    def without(self, token: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, A, weights, G) with `token` left out (a copy of G the caller may change)."""
        keep = self.tokens != token
        if keep.all():
            return self.tokens, self.A, self.weights, self.gram.copy()
        a = self.A[~keep][0]
        return self.tokens[keep], self.A[keep], self.weights[keep], self.gram - self.step.p[token] * np.outer(a, a)


def feasible_point(
    working: WorkingSet, token: int, tol: float, rounds: int = 16
) -> tuple[np.ndarray, np.ndarray, float] | None:
    """A point that rejects `token`: (support, q on the support, bound of ||sum_j q_j a_j||_1), the support
    holding `token` itself (q = -p_token); None when the rounds end without one whose residual is within
    tol * p_token * ||a_token||_1."""
    step = working.step
    p_i = float(step.p[token])
    a_i = step.augmented_rows(np.array([token]))[0]
    tokens, A, w, gram = working.without(token)
    # q_j = tau' p_j exactly would sit up to a few float64 roundings of tau' = tau / (1 - tau) and of the
    # product past the true bound: the upper bound is taken 8 units of roundoff lower, so the box holds exactly
    lower, upper = -w, step.tprime * w * (1.0 - 8 * U64)
    q = np.zeros(len(w))
    free = np.ones(len(w), dtype=bool)
    rhs = p_i * a_i
    for _ in range(rounds):
        if free.sum() < A.shape[1]:
            return None  # too few free tokens left to span the rows
        try:
            lam = np.linalg.solve(gram, rhs - A[~free].T @ q[~free])
        except np.linalg.LinAlgError:
            return None
        q[free] = w[free] * (A[free] @ lam)
        below, above = free & (q < lower), free & (q > upper)
        if not below.any() and not above.any():
            return _checked_point(token, p_i, tokens, A, q, a_i, tol)
        # hold the tokens that crossed a bound at it (exactly: -p_j sets the token to zero mass)
        q[below], q[above] = lower[below], upper[above]
        crossed = below | above
        gram -= weighted_gram(A[crossed], w[crossed])
        free &= ~crossed
    return None


def _checked_point(
    token: int, p_i: float, tokens: np.ndarray, A: np.ndarray, q: np.ndarray, a_i: np.ndarray, tol: float
):
    """The point's residual with a rigorous float64 bound, or None when it is not within tolerance."""
    support = np.flatnonzero(q)
    residual = A[support].T @ q[support] - p_i * a_i
    # each entry is a float64 sum of len(support) + 1 products: error <= gamma * the sum of |terms|
    n = len(support) + 2
    gamma = n * U64 / (1.0 - n * U64)
    magnitude = np.abs(A[support]).T @ np.abs(q[support]) + p_i * np.abs(a_i)
    residual_l1 = float(np.abs(residual).sum() + gamma * magnitude.sum()) * (1.0 + 4 * len(a_i) * U64)
    if not residual_l1 <= tol * p_i * float(np.abs(a_i).sum()):
        return None
    return np.append(tokens[support], token), np.append(q[support], -p_i), residual_l1


class RegressionSearch:
    """Reweighted least squares with column generation for one token, resumable: `run(n)` makes up to n more
    iterations and returns (y, value), an accept certificate proven over the whole vocabulary, or None. The
    solver interleaves it with the feasible-point search on larger working sets (a hard accept needs
    the regression, a hard reject the larger point search, and neither is known in advance)."""

    def __init__(self, working: WorkingSet, token: int, tol: float, grow: int, max_columns: int) -> None:
        step = working.step
        self.step, self.token, self.grow, self.max_columns = step, token, grow, max_columns
        self.a_i = step.augmented_rows(np.array([token]))[0]
        self.limit = tol * float(np.abs(self.a_i).sum())
        self.tokens, self.A, self.p, self.H = working.without(token)
        self.in_set = np.zeros(len(step.p), dtype=bool)
        self.in_set[self.tokens] = self.in_set[token] = True
        self.iterations = 0
        self.failed = False  # a degenerate system: no later iteration can do better

    def run(self, iterations: int, deadline: float) -> tuple[np.ndarray, float] | None:
        for _ in range(iterations):
            if self.failed or time.perf_counter() >= deadline:
                return None
            self.iterations += 1
            found = self._iterate()
            if found is not None:
                return found
        return None

    def _iterate(self) -> tuple[np.ndarray, float] | None:
        step, a_i, H = self.step, self.a_i, self.H
        basis, d = step.basis, step.basis.hidden_size
        H[np.diag_indices_from(H)] += 1e-12 * np.trace(H) / len(H)  # keeps H invertible; y is only a candidate
        try:
            z = np.linalg.solve(H, a_i)
        except np.linalg.LinAlgError:
            self.failed = True
            return None
        y = z / (a_i @ z)  # c_i = 1
        if not np.isfinite(y).all():
            self.failed = True  # a degenerate system (a_i . z = 0): nothing to prove with
            return None
        # one product over the vocabulary per iterate: it proves (the candidates are +y and -y with other
        # constants, so -u32 is the product of -y) and it picks the tokens that join the set
        u32 = None
        candidates = with_best_offsets(step, y[:, None], self.token)  # columns +y, -y
        ranking = step.head_values(candidates, self.token)
        best = int(np.argmax(ranking))
        if ranking[best] > self.limit:  # the tail only lowers the value: otherwise no product can prove it
            u32 = basis.matvec(y[:d])
            value = step.full_value(candidates[:, best], self.token, u32=u32 if best == 0 else -u32)
            if value > self.limit:
                return candidates[:, best].copy(), value
        if len(self.tokens) < self.max_columns:  # the tokens outside the set that y charges most join it
            c = (basis.matvec(y[:d]) if u32 is None else u32).astype(np.float64)
            if step.scale is not None:
                c *= step.scale
            cost = step.p * rho(c + y[d], step.tprime)
            cost[self.in_set] = -1.0
            add = costliest_tokens(cost, min(self.grow, self.max_columns - len(self.tokens)))
            if len(add):
                self.in_set[add] = True
                self.tokens = np.concatenate([self.tokens, add])
                self.A = np.vstack([self.A, step.augmented_rows(add)])
                self.p = step.p[self.tokens]
        v = regression_weights(self.p, self.A @ y, step.tprime)
        self.H = weighted_gram(self.A, v)
        return None
