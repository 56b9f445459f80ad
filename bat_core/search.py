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

import numpy as np

from .certify import Step


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
                floor = 1e-3 * float(np.median(np.abs(c))) + 1e-300
                weights = p_head * np.where(c > 0, step.tprime, 1.0) / np.maximum(np.abs(c), floor)
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
