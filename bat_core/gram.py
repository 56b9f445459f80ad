"""Factors of a model's Gram matrix G = [W, 1]'[W, 1] that certificate searches use: the whitening (a
metric in which the Cauchy-Schwarz tail bound is a Euclidean norm), W's singular directions, and the
constraint reduction to the top ones."""

from __future__ import annotations

import numpy as np

from .errors import BatError

CHUNK_ROWS = 8192  # rows per block of the passes over W: no v x d float64 copy


class GramFactors:
    """Built once per model on first use, under the Basis's lock `_lazy` (requests may run in threads)."""

    W: np.ndarray
    gram: np.ndarray
    vocab_size: int
    hidden_size: int

    def _init_factors(self) -> None:
        self._whitening: tuple[np.ndarray, np.ndarray] | None = None
        self._eigvec: np.ndarray | None = None
        self._reduced: dict[int, GramFactors] = {}

    def whitening(self) -> tuple[np.ndarray, np.ndarray]:
        """(L^-1, whitened rows [W,1] L^-T in float32) with L L^T = Gram: a metric in which the
        Cauchy-Schwarz tail bound of a certificate is its Euclidean norm. Built once, on first use."""
        if self._whitening is not None:
            return self._whitening
        with self._lazy:
            if self._whitening is None:
                self._build_whitening()
        return self._whitening

    def _build_whitening(self) -> None:
        d1 = self.hidden_size + 1
        jitter = 1e-9 * np.trace(self.gram) / d1
        chol = np.linalg.cholesky(self.gram + jitter * np.eye(d1))
        chol_inv = np.linalg.inv(chol)
        transform = np.ascontiguousarray(chol_inv.T[: self.hidden_size].astype(np.float32))
        ones_row = chol_inv.T[self.hidden_size].astype(np.float32)
        white = np.empty((self.vocab_size, d1), dtype=np.float32)
        for start in range(0, self.vocab_size, CHUNK_ROWS):
            block = self.W[start : start + CHUNK_ROWS]
            np.matmul(block, transform, out=white[start : start + len(block)])
            white[start : start + len(block)] += ones_row
        self._whitening = (chol_inv, white)

    def singular_directions(self, k: int) -> np.ndarray:
        """The top-k right singular vectors of W (d x k, float64), from the Gram matrix."""
        with self._lazy:
            if self._eigvec is None:
                _, eigvec = np.linalg.eigh(self.gram[: self.hidden_size, : self.hidden_size])
                self._eigvec = eigvec[:, ::-1]
        return self._eigvec[:, :k]

    def reduced_cached(self, directions: int):
        """`reduced(directions)`, built once per model and shared by all requests."""
        directions = min(directions, self.hidden_size)
        with self._lazy:
            if directions not in self._reduced:
                self._reduced[directions] = self.reduced(directions)
        return self._reduced[directions]

    def reduced(self, directions: int):
        """Constraint reduction: keep only the top-k right singular directions of W (as the paper does).

        The reduced LP drops constraints, so it is a relaxation: it may reject tokens the exact LP
        accepts, never the reverse. Use it as a speed knob; measure the accepts it loses. The reduced
        matrix is W V_k rounded to float32, so a solver on it proves every accept again on W itself
        (its certificates are lifted to the full [W, 1]).
        """
        d = self.hidden_size
        if not 1 <= directions <= d:
            raise BatError(f"directions={directions} must be between 1 and the hidden size {d}")
        if directions == d:
            return self
        top = self.singular_directions(directions).astype(np.float32)
        reduced = np.empty((self.vocab_size, directions), dtype=np.float32)
        for start in range(0, self.vocab_size, CHUNK_ROWS):
            np.matmul(self.W[start : start + CHUNK_ROWS], top, out=reduced[start : start + CHUNK_ROWS])
        basis = type(self).__new__(type(self))
        basis.W, basis.bias, basis.softcap = reduced, self.bias, self.softcap
        basis.vocab_size, basis.hidden_size = reduced.shape
        own = self.singular_directions(directions)
        # certificates lift to the original model's W, also from a reduced basis's reduction
        basis.parent = self if self.parent is None else self.parent
        basis.directions = own.copy() if self.parent is None else self.directions @ own
        basis._derive()
        return basis
