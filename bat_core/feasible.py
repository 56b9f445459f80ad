"""Reject certificates without the LP: a feasible point of F_i by least squares with clipping.

Token i is rejected when some q with q_i = -p_i, every other q_j in [-p_j, tau' p_j] and
sum_j q_j a_j = 0 exists (METHOD.md sections 2-3; a_j = (s_j w_j, 1)). Holding every token outside
the working set K (the most probable tokens) at q_j = 0 is a restriction, so a point found on K is a
point of the full problem: an exact reject.

The search: the least-squares solution of sum_{j in K} q_j a_j = p_i a_i with weights 1 / p_j
(q_j = p_j a_j' lambda, G lambda = p_i a_i, G = sum p_j a_j a_j'), then the tokens that leave their
box are held at the bound they crossed and the rest re-solved, a few rounds. It is the primal twin of
the least-squares accept direction of search.py (the same G). On real SmolLM2 candidates that the
warm-started simplex could not decide in 2 s (it needs 15-30 s), it found a point in 0.05-0.1 s for 7
of 8. Whatever it returns is checked here in float64 with a rigorous rounding bound; when it finds
nothing, the LP decides.
"""
from __future__ import annotations

import numpy as np

from .certify import U64, Step


class FeasiblePointSearch:
    """Per-step Gram matrix of the working set; `find(token)` gives (support, q, residual_l1) or None."""

    def __init__(self, step: Step, columns: int = 2048) -> None:
        self.step = step
        p = step.p
        k = min(columns, len(p))
        if k <= len(step.head):
            working = step.head[:k]
        else:
            working = np.argpartition(-p, k - 1)[:k] if k < len(p) else np.arange(len(p))
        self.working = np.sort(working)
        self.A = self._augmented_rows(self.working)
        self.weights = p[self.working]
        self.gram = (self.A * self.weights[:, None]).T @ self.A

    def _augmented_rows(self, tokens: np.ndarray) -> np.ndarray:
        step = self.step
        rows = step.basis.rows(tokens) * step.scale_of(tokens)[:, None]
        return np.hstack([rows, np.ones((len(tokens), 1))])

    def find(self, token: int, tol: float, rounds: int = 8) -> tuple[np.ndarray, np.ndarray, float] | None:
        """A point that rejects `token`: (support, q on the support, bound of ||sum_j q_j a_j||_1), the
        support holding `token` itself (q = -p_token); None when the rounds end without one whose residual
        is within tol * p_token * ||a_token||_1."""
        step, p = self.step, self.step.p
        p_i = float(p[token])
        a_i = self._augmented_rows(np.array([token]))[0]
        mask = self.working != token
        A, w = self.A[mask], self.weights[mask]
        gram = self.gram - p_i * np.outer(a_i, a_i) if not mask.all() else self.gram.copy()
        lower, upper = -w, step.tprime * w
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
                return self._checked(token, A, q, a_i, tol)
            # hold the tokens that crossed a bound at it (exactly: -p_j sets the token to zero mass)
            q[below], q[above] = lower[below], upper[above]
            crossed = below | above
            gram -= (A[crossed] * w[crossed, None]).T @ A[crossed]
            free &= ~crossed
        return None

    def _checked(self, token: int, A: np.ndarray, q: np.ndarray, a_i: np.ndarray, tol: float):
        """The point's residual with a rigorous float64 bound, or None when it is not within tolerance."""
        step = self.step
        p_i = float(step.p[token])
        support = np.flatnonzero(q)
        Aq = A[support].T @ q[support]
        residual = Aq - p_i * a_i
        # each entry is a float64 sum of len(support) + 1 products: error <= gamma * the sum of |terms|
        n = len(support) + 2
        gamma = n * U64 / (1.0 - n * U64)
        magnitude = np.abs(A[support]).T @ np.abs(q[support]) + p_i * np.abs(a_i)
        residual_l1 = float(np.abs(residual).sum() + gamma * magnitude.sum()) * (1.0 + 4 * len(a_i) * U64)
        if not residual_l1 <= tol * p_i * float(np.abs(a_i).sum()):
            return None
        tokens = self.working[self.working != token][support]
        return np.append(tokens, token), np.append(q[support], -p_i), residual_l1
