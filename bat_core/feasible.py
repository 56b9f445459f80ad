"""Rejects for the hard candidates without the simplex: feasible points by a Newton method on a working set
(and accepts where its dual diverges).

Token i is rejected when some q with q_i = -p_i, every other q_j in [l_j, u_j] = [-p_j, tau' p_j] and
sum_j q_j a_j = 0 exists (docs/method.md, sections 2-3): p_i a_i lies in the zonotope of the other tokens.
Holding every token outside a working set K (`WorkingSet`: the most probable tokens of the step, rows
a_j = (s_j w_j, 1), G = sum_{j in K} p_j a_j a_j') at q_j = 0 is a restriction, so a point found on K is a
point of the full problem: an exact reject.

The search (`feasible_point`) takes the point of smallest sum_j q_j^2 / p_j: a box-constrained least
squares problem whose dual is unconstrained and concave,

    phi(lam) = b'lam - sum_j psi_j(a_j'lam),   psi_j(c) = max_{q in [l_j, u_j]} (q c - q^2 / (2 p_j)),

with b = p_i a_i; the point is q_j = clip(p_j a_j'lam, l_j, u_j) and grad phi = b - sum_j q_j a_j, its
residual. A semismooth Newton method maximizes phi: the Hessian is the Gram matrix of the tokens strictly
inside their box, the step is damped by a backtracking line search on phi, and tokens enter and leave
their bounds freely. When a point exists it converges in a few iterations; when none does, phi is
unbounded and the residual stops shrinking, which ends the search early. The first iterate is the plain
least-squares solution (`WorkingSet.least_squares`, the solve that also starts the regression on its own set).

Where no point exists, the iterates are tried as accept certificates on the way (the direction along
which phi grows is one), so a search that a misjudged accept starts can still prove it.

Whatever this search returns is proven: the point holds its box exactly and its residual is bounded
rigorously in float64 (`_checked_point`); an accept is proven over the whole vocabulary by certify.py.
"""

from __future__ import annotations

import numpy as np

from .certify import U64, Step
from .decisions import AcceptCertificate, RejectCertificate
from .search import prove_pair, with_best_offsets


def weighted_gram(A: np.ndarray, weights: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """A' diag(weights) A for nonnegative weights, as S'S with S = diag(sqrt(weights)) A (BLAS's symmetric
    rank-k update); with `rows` (a boolean mask), over those rows only, from one copy of them."""
    if rows is None:
        S = A * np.sqrt(weights)[:, None]
    else:
        S = A[rows]
        S *= np.sqrt(weights[rows])[:, None]
    return np.dot(S.T, S)


def solve_ridged(H: np.ndarray, rhs: np.ndarray) -> np.ndarray | None:
    """H^-1 rhs for the symmetric H with a ridge of 1e-12 of its mean diagonal (the systems only propose
    candidates, proven elsewhere), or None when that fails or is not finite. numpy's LU: scipy's
    Cholesky would bring a second OpenBLAS whose spinning threads slow numpy's products down 2-3x."""
    H = H.copy()
    H[np.diag_indices_from(H)] += 1e-12 * np.trace(H) / len(H) + 1e-300
    try:
        x = np.linalg.solve(H, rhs)
    except np.linalg.LinAlgError:
        return None
    return x if np.isfinite(x).all() else None


class WorkingSet:
    """The `columns` most probable tokens of a step: augmented rows A, probabilities and G = A' diag(p) A,
    shared by the searches of every candidate of the step."""

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
        self._least_squares: tuple[int, np.ndarray | None] | None = None  # the last token's, asked for twice
        self._row_l1: np.ndarray | None = None

    def position(self, token: int) -> int | None:
        """The row of `token` in the working set, or None when it is not in it."""
        pos = int(np.searchsorted(self.tokens, token))
        return pos if pos < len(self.tokens) and self.tokens[pos] == token else None

    def row_l1_without(self, token: int) -> np.ndarray:
        """||a_j||_1 of the rows, `token` left out (as `without`), for the feasible points' rounding bound."""
        if self._row_l1 is None:
            self._row_l1 = np.abs(self.A).sum(axis=1)
        return self._row_l1[self.tokens != token]

    def without(self, token: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, A, weights) with `token` left out."""
        keep = self.tokens != token
        if keep.all():
            return self.tokens, self.A, self.weights
        return self.tokens[keep], self.A[keep], self.weights[keep]

    def least_squares(self, token: int) -> np.ndarray | None:
        """z = G_i^-1 a_i, G_i the Gram matrix without `token` (a rank-one downdate of G by Sherman-Morrison):
        the regression's first direction (y = z / a_i'z) and the feasible-point search's first iterate
        (lam = p_i z), each on its own set. None when G is singular."""
        if self._least_squares is None or self._least_squares[0] != token:
            self._least_squares = (token, self._solve_without(token))
        return self._least_squares[1]

    def _solve_without(self, token: int) -> np.ndarray | None:
        a_i = self.step.augmented_rows(np.array([token]))[0]
        z = solve_ridged(self.gram, a_i)
        if z is None:
            return None
        pos = self.position(token)
        if pos is not None:
            shrink = 1.0 - self.weights[pos] * float(a_i @ z)  # (G - p a a')^-1 a = G^-1 a / (1 - p a'G^-1 a)
            if not shrink > 1e-12:
                return None
            z = z / shrink
        return z if np.isfinite(z).all() else None


def feasible_point(
    working: WorkingSet, token: int, tol: float, iterations: int = 24
) -> RejectCertificate | AcceptCertificate | None:
    """A point that rejects `token` (support, q on the support, bound of ||sum_j q_j a_j||_1; the support
    holds `token` itself with q = -p_token), or an accept certificate found on the way; None when
    `iterations` Newton iterations end with neither, or when the residual stops shrinking.

    Where no point exists, phi grows without bound along the iterates, and c = A lam tends to an accept
    certificate: psi_j is within p_j / 2 of p_j rho, so once phi(lam) exceeds half the working set's mass,
    lam (scaled to c_i = 1) has value above zero on the set. Each iterate is therefore also tried as one,
    with its constant re-chosen, and proven over the vocabulary like the regression's (search.prove_pair)."""
    step = working.step
    z = working.least_squares(token)
    if z is None or iterations <= 0:
        return None
    p_i = float(step.p[token])
    a_i = step.augmented_rows(np.array([token]))[0]
    accept_limit = tol * float(np.abs(a_i).sum())
    limit = p_i * accept_limit
    tokens, A, w = working.without(token)
    box = _Box(w, step.tprime, p_i * a_i)
    lam = p_i * z
    c = A @ lam
    value = box.phi(lam, c)
    best, stalled = np.inf, 0
    for _ in range(iterations):
        q = box.point(c)
        residual = box.b - A.T @ q
        size = float(np.abs(residual).sum())
        if size <= 0.5 * limit:
            found = _checked_point(token, p_i, a_i, tokens, working.row_l1_without(token), q, residual, limit)
            if found is not None:
                return found
        if (accept := _accept_along(step, token, lam, a_i, accept_limit)) is not None:
            return accept
        stalled = 0 if size < 0.9 * best else stalled + 1
        best = min(best, size)
        if stalled >= 6 or size > 100 * best:
            return None
        direction = solve_ridged(_free_gram(working, token, A, w, box.inside(c)), residual)
        if direction is None:
            return None
        lam, c, value = box.line_search(lam, c, value, direction, A @ direction, float(residual @ direction))
    return None


def _accept_along(step: Step, token: int, lam: np.ndarray, a_i: np.ndarray, limit: float) -> AcceptCertificate | None:
    """The dual iterate lam as an accept certificate of `token`, proven over the vocabulary, or None."""
    c_i = float(a_i @ lam)
    if not c_i > 0:
        return None
    found, _ = prove_pair(step, with_best_offsets(step, (lam / c_i)[:, None], token), token, limit)
    return None if found is None else AcceptCertificate(token, *found)


class _Box:
    """The box [-p_j, tau' p_j] of a point's coordinates and the dual function phi of the search."""

    def __init__(self, w: np.ndarray, tprime: float, b: np.ndarray) -> None:
        # q_j = tau' p_j exactly would sit up to a few float64 roundings of tau' = tau / (1 - tau) and of the
        # product past the true bound: the upper bound is taken 8 units of roundoff lower, so the box holds exactly
        self.w, self.lower, self.upper, self.b = w, -w, tprime * w * (1.0 - 8 * U64), b

    def point(self, c: np.ndarray) -> np.ndarray:
        return np.clip(self.w * c, self.lower, self.upper)

    def inside(self, c: np.ndarray) -> np.ndarray:
        q = self.w * c
        return (q > self.lower) & (q < self.upper)

    def phi(self, lam: np.ndarray, c: np.ndarray) -> float:
        q = self.point(c)
        return float(self.b @ lam - (q @ c - (q * q) @ (1.0 / self.w) / 2))

    def line_search(self, lam, c, value, direction, dc, slope) -> tuple[np.ndarray, np.ndarray, float]:
        """The Newton step, halved until phi rises by 1e-4 of its first-order gain (Armijo), at most 30 times."""
        t = 1.0
        for _ in range(30):
            trial = self.phi(lam + t * direction, c + t * dc)
            if trial >= value + 1e-4 * t * slope:
                break
            t *= 0.5
        return lam + t * direction, c + t * dc, trial


def _free_gram(working: WorkingSet, token: int, A: np.ndarray, w: np.ndarray, free: np.ndarray) -> np.ndarray:
    """sum over the free tokens of w_j a_j a_j': G less the others' part where they are few and light (so
    that the subtraction cancels nothing the free part needs), else directly."""
    out = ~free
    if out.sum() < 0.4 * len(free) and w[out].sum() <= 1e-3 * w.sum():
        H = working.gram - weighted_gram(A, w, out)
        pos = working.position(token)
        if pos is not None:
            H -= working.weights[pos] * np.outer(working.A[pos], working.A[pos])
        return H
    return weighted_gram(A, w, free)


def _checked_point(
    token: int,
    p_i: float,
    a_i: np.ndarray,
    tokens: np.ndarray,
    row_l1: np.ndarray,
    q: np.ndarray,
    residual: np.ndarray,
    limit: float,
) -> RejectCertificate | None:
    """The point q on `tokens` (whose rows have L1 norms `row_l1`) with a rigorous float64 bound of its
    residual ||sum_j q_j a_j - p_i a_i||_1, from `residual` = p_i a_i - A'q as computed (each entry one float64
    sum over all of `tokens`); None when that bound is above `limit`."""
    d1 = len(a_i)
    # each entry is a float64 sum of len(q) + 1 products (the zeros of q add exact zeros): its error is at most
    # gamma times the sum of |terms|, and those sums total sum_j |q_j| ||a_j||_1 + p_i ||a_i||_1 (rounded up)
    n = len(q) + 2
    gamma = n * U64 / (1.0 - n * U64)
    magnitude = float(np.abs(q) @ row_l1 + p_i * np.abs(a_i).sum()) / (1.0 - (n + d1 + 2) * U64)
    residual_l1 = float(np.abs(residual).sum() + gamma * magnitude) * (1.0 + 4 * d1 * U64)
    if not residual_l1 <= limit:
        return None
    support = np.flatnonzero(q)
    return RejectCertificate(token, np.append(tokens[support], token), np.append(q[support], -p_i), residual_l1)
