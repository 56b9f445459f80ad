"""Cheap accept certificates from the regression view (docs/method.md, sections 3 and 6).

Token i is accepted when some c = A y with c_i = 1 has sum_{j != i} p_j rho(c_j) < p_i. A quadratic
surrogate of that cost, with the head of the distribution weighted by p_j and the rest of the
vocabulary by a ridge in the metric of the Gram matrix of A (the Cauchy-Schwarz tail bound of
certify.py), gives a closed form: y = G^-1 a_i / (a_i' G^-1 a_i). In whitened coordinates
(b_j = L^-1 a_j, L L' = A'A) the ridge is mu * I and Woodbury's identity makes the per-step work a
K x K solve (K = head size) and the per-candidate work a few (d+1)-vectors. Whatever this finds is
only a candidate: certify.py proves it or discards it.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from .certify import Step, regression_weights
from .config import BatConfig
from .decisions import AcceptCertificate, BatStats, Decision
from .distribution import Distribution


class WeightedLeastSquares:
    """Per-step factorization; `directions(candidates)` gives one certificate candidate per token."""

    def __init__(self, step: Step, head_size: int = 256, ridge: float | None = None) -> None:
        basis = step.basis
        self.step = step
        self.chol_inv, white = basis.whitening()
        head = step.head[: min(head_size, len(step.head))]
        self.B = self._whitened_rows(head, white)  # [K, d+1]
        weights = step.p[head]
        tail_mass = max(1.0 - float(weights.sum()), 1e-12)
        # ridge ~ weight of a typical tail token, times the tail's size in the Cauchy-Schwarz sense
        self.mu = ridge if ridge is not None else max(tail_mass / np.sqrt(basis.vocab_size), 1e-12)
        self._plain: dict[int, np.ndarray] = {}  # the plain direction's z per candidate (whitened)
        self.gram_head = np.dot(self.B, self.B.T)  # np.dot spots B B' and calls BLAS's syrk: 0.2 ms, matmul's `@` 0.4
        self.kernel = self.gram_head.copy()
        self.kernel[np.diag_indices_from(self.kernel)] += self.mu / np.maximum(weights, 1e-300)

    def _whitened_rows(self, tokens: np.ndarray, white: np.ndarray) -> np.ndarray:
        step = self.step
        if step.scale is None:
            return white[tokens].astype(np.float64)
        d = step.basis.hidden_size
        scaled = step.basis.rows(tokens) * step.scale[tokens][:, None]
        return scaled @ self.chol_inv.T[:d] + self.chol_inv.T[d]

    def directions(self, candidates: np.ndarray) -> np.ndarray:
        """Certificate candidates, one column per token, scaled so that c_i = 1: shape [d+1, n]."""
        _, white = self.step.basis.whitening()
        b = self._whitened_rows(candidates, white).T  # [d+1, n]
        z = self._solve(self.kernel, b)
        self._plain = {int(t): z[:, [n]] for n, t in enumerate(np.asarray(candidates))}  # refined_directions' start
        return self.chol_inv.T @ z

    def refined_directions(self, candidates: np.ndarray, iterations: int) -> np.ndarray:
        """Iteratively reweighted least squares: the cost sum p_j rho(c_j) written as a weighted square
        with weights p_j * slope(c_j) / |c_j| (slope tau' where c_j > 0, 1 where c_j < 0), re-solved
        `iterations` times from the plain direction. Every iterate is a candidate: shape
        [d+1, n * iterations]. Costs a K x K solve per iterate; on 240 real SmolLM2 candidates
        (benchmarks/bench_certificates.py, eta 0.0009) three iterations proved 152 instead of 142."""
        step = self.step
        _, white = step.basis.whitening()
        head = step.head[: self.B.shape[0]]
        p_head = step.p[head]
        out = []
        for token in np.asarray(candidates):
            b = self._whitened_rows(np.array([token]), white).T  # [d+1, 1]
            z = self._plain[int(token)] if int(token) in self._plain else self._solve(self.kernel, b)
            for _ in range(iterations):
                c = self.B @ z[:, 0]
                weights = regression_weights(p_head, c, step.tprime)
                weights[head == token] = 0.0  # the candidate's own term is fixed by c_i = 1
                kernel = self.gram_head.copy()
                kernel[np.diag_indices_from(kernel)] += self.mu / np.maximum(weights, 1e-300)
                try:
                    z = self._solve(kernel, b)
                except np.linalg.LinAlgError:
                    break
                out.append(self.chol_inv.T @ z[:, 0])
        return np.column_stack(out) if out else np.empty((self.B.shape[1], 0))

    def _solve(self, kernel: np.ndarray, b: np.ndarray) -> np.ndarray:
        """z minimizing the weighted squares plus mu |z|^2 with b_i . z = 1 (Woodbury through the K x K
        kernel). One LU solve: a third of the time of a Cholesky factor and its inverse at K = 128 (the
        directions are only candidates: certify.py proves them)."""
        inner = np.linalg.solve(kernel, self.B @ b)
        z = (b - self.B.T @ inner) / self.mu
        return z / np.einsum("kn,kn->n", b, z)  # a_i . y = b_i . z = 1


def with_best_offsets(step: Distribution, Y: np.ndarray, token: int, u: np.ndarray | None = None) -> np.ndarray:
    """Columns +-y with the constant component y_0 re-chosen to maximize `token`'s value on the
    head (the tail is left to the bounds).

    value(y0) = p_i (u_i + y0) - sum_j p_j rho(u_j + y0) is concave in y0 with slope
    p_i - tau' M+(y0) + M-(y0) (M-: mass with c_j < 0): positive c_j cost only tau' per unit, so
    the best y0 lets a mass of about tau - p_i fall below zero. A least-squares direction centres
    c on zero instead; re-choosing y0 turned 4 of 40 real SmolLM2 candidates into 26 of 40."""
    d = step.basis.hidden_size
    exact = step.exact_set(token)
    pos = int(np.searchsorted(exact, token))
    u = step.head_products(exact, Y) if u is None else u
    if step.scale is not None:
        u = u * step.scale[exact][:, None]
    q = step.p[exact].copy()
    p_i, q[pos] = q[pos], 0.0
    total = q.sum()
    # the slope is nonnegative once the mass below y0's crossing reaches (tau' total - p_i) / (1 + tau'):
    # a weighted quantile of u, from below for +y and from above for -y
    target = (step.tprime * total - p_i) / (1.0 + step.tprime)
    order = np.argsort(u, axis=0)
    u_sorted = np.take_along_axis(u, order, axis=0)
    mass = q[order]
    cum = np.cumsum(mass, axis=0)
    columns = np.arange(Y.shape[1])
    first_plus = np.argmax(cum - mass >= target, axis=0)  # the smallest u_j with that much mass below it
    count = np.count_nonzero(total - cum >= target, axis=0)  # mass above is nonincreasing: a prefix
    last_minus = np.where(count > 0, count - 1, len(exact) - 1)  # the largest u_j with that much above
    out = np.hstack([Y, -Y])
    out[d, : Y.shape[1]] = -u_sorted[first_plus, columns]
    out[d, Y.shape[1] :] = u_sorted[last_minus, columns]
    return out


def prove_pair(
    step: Step, pair: np.ndarray, token: int, limit: float
) -> tuple[tuple[np.ndarray, float] | None, np.ndarray | None]:
    """Prove or discard the better of `pair` (the columns +y, -y of `with_best_offsets`) as an accept
    certificate of `token`: ((y, value), u32) when certify.py proves it over the whole vocabulary, else
    (None, u32). u32 = W y_w of the first column in float32 (-u32 is the second's), made only when the
    head's value is above `limit` (the tail only lowers it, so otherwise no product can prove it); else None."""
    ranking = step.head_values(pair, token)
    best = int(np.argmax(ranking))
    if not ranking[best] > limit:
        return None, None
    u32 = step.product(pair[: step.basis.hidden_size, 0])
    value = step.full_value(pair[:, best], token, u32=u32 if best == 0 else -u32)
    return ((pair[:, best].copy(), value) if value > limit else None), u32


class CertificateSearch:
    """A request's certificate candidates, each proven or discarded by certify.py: the step's least-squares
    directions (kept for the step's later candidates: the sampler's redraws after a reject) and the
    request's recent accept certificates."""

    def __init__(self, config: BatConfig, stats: BatStats) -> None:
        self.config, self.stats = config, stats
        self.recent: deque[np.ndarray] = deque(maxlen=config.cache_size)  # most recent first
        self._lsq: WeightedLeastSquares | None = None

    def new_step(self) -> None:
        self._lsq = None  # the previous step's factorization (and the distribution it holds) can go

    def prove_by_least_squares(self, step: Step, pending: np.ndarray, out: dict[int, Decision]) -> np.ndarray:
        """Accepts by the least-squares directions, then by reweighted least squares for what they left (most
        candidates never need it); returns the tokens still pending."""
        if self._lsq is None or self._lsq.step is not step:
            self._lsq = WeightedLeastSquares(step, head_size=self.config.lsq_head)
        directions = self._lsq.directions(pending)
        pending = self.prove_by(step, pending, directions, ["least-squares"] * len(pending), out)
        if len(pending) and self.config.lsq_refine:
            refined = self._lsq.refined_directions(pending, self.config.lsq_refine)
            if refined.shape[1]:
                pending = self.prove_by(step, pending, refined, ["reweighted"] * refined.shape[1], out)
        return pending

    def prove_by_recent(self, step: Step, pending: np.ndarray, out: dict[int, Decision]) -> np.ndarray:
        """Accepts by the request's recent certificates (from earlier LPs, steps and candidates)."""
        if not self.recent:
            return pending
        return self.prove_by(step, pending, np.column_stack(self.recent), ["cache"] * len(self.recent), out)

    def prove_by(
        self, step: Step, pending: np.ndarray, Y: np.ndarray, labels: list[str], out: dict[int, Decision]
    ) -> np.ndarray:
        """Record in `out` the accepts that the candidates Y (columns named by `labels`, the sources counted
        in the statistics) prove; return the tokens still pending."""
        for t, (cert, column) in self._certify(step, pending, Y).items():
            out[t] = Decision(t, True, "certificate", cert)
            self.stats.accepted_by(labels[column])
        return np.array([t for t in pending if int(t) not in out], dtype=np.int64)

    def _certify(self, step: Step, pending: np.ndarray, Y: np.ndarray) -> dict[int, tuple[AcceptCertificate, int]]:
        """Prove what Y can prove for `pending`, token by token: Y and its columns with re-chosen constant
        components (`with_best_offsets`), ranked by their value on the head; the most promising columns only
        (`full_checks`) are proven by Step.full_value (a cheap bound of the tail first, then one float32
        product over the vocabulary)."""
        found = {}
        for token in (int(t) for t in pending):
            # the head products of Y serve every column below: the offset columns are +-Y with new constants
            u = step.head_products(step.exact_set(token), Y)
            Yt = np.hstack([Y, with_best_offsets(step, Y, token, u)])
            ut = np.hstack([u, u, -u])
            tol = self.config.tol * float(step.tolerance_scale(np.array([token]))[0])
            ranking = step.head_values(Yt, token, ut)
            for col in np.argsort(-ranking)[: self.config.full_checks]:
                if not ranking[col] > tol:
                    break  # the tail only lowers the value: no product can prove this column
                y = Yt[:, col]
                value = step.full_value(y, token, ut[:, col], enough=tol)
                if value > tol:
                    found[token] = (AcceptCertificate(token, y.copy(), value), int(col) % Y.shape[1])
                    self.remember(found[token][0].y)
                    break
        return found

    def remember(self, y: np.ndarray) -> None:
        """Keep an accept certificate for the request's later decisions."""
        if not any(np.array_equal(y, old) for old in self.recent):
            self.recent.appendleft(y)
