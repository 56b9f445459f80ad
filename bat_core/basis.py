"""The per-model object: the unembedding matrix W and everything derived from it once.

A model's logits are ``z = W h + b`` (optionally soft-capped: ``c * tanh(u / c)``). BAT needs W
exactly as the engine multiplies with it, as float32, once per model. Everything that all requests
share (row norms, the Gram matrix of [W, 1], the whitened rows used to search for certificates) is
computed here, once, and never copied per request.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np

from .config import BatConfig
from .errors import BatError
from .gram import CHUNK_ROWS, GramFactors
from .products import MatrixProducts


def as_float32_matrix(matrix: Any, name: str) -> np.ndarray:
    """numpy or torch matrix of any float dtype -> C-contiguous float32 numpy (no copy when already so)."""
    if hasattr(matrix, "detach") and hasattr(matrix, "cpu"):  # a torch tensor, without importing torch
        import torch

        matrix = matrix.detach().to(device="cpu", dtype=torch.float32).numpy()
    array = np.asarray(matrix)
    if array.ndim != 2:
        raise BatError(f"{name} must be a 2-D matrix [vocab, hidden], got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise BatError(f"{name} must hold floating-point numbers, got dtype {array.dtype}; dequantize it first")
    return np.ascontiguousarray(array, dtype=np.float32)


def _require_finite(array: np.ndarray, name: str, advice: str) -> None:
    for start in range(0, array.shape[0], CHUNK_ROWS):
        block = array[start : start + CHUNK_ROWS]
        if not np.isfinite(block).all():
            bad = start + int(np.argwhere(~np.isfinite(block))[0][0])
            raise BatError(f"{name} holds NaN or inf (first at row {bad}); {advice}")


class Basis(MatrixProducts, GramFactors):
    """One model's unembedding ``W`` (v x d), optional bias and soft-cap.

    Args:
        W: numpy array or torch tensor, shape [vocab, hidden], any float dtype. Rows must be the
            exact rows that produced the logits (tied embedding or lm_head, dequantized).
        bias: optional output bias of length vocab.
        softcap: optional final-logit soft-cap ``c`` (logits = c * tanh(u / c), as in Gemma 2).
            BAT then uses the rows of W scaled by ``1 - (z_j / c)^2`` (docs/method.md, section 5).
    """

    def __init__(self, W: Any, bias: Any = None, softcap: float | None = None) -> None:
        self.W = as_float32_matrix(W, "W")
        self.vocab_size, self.hidden_size = self.W.shape
        if self.vocab_size < 2:
            raise BatError(f"W has {self.vocab_size} row(s): a vocabulary needs at least 2 tokens")
        _require_finite(self.W, "W", "check the checkpoint and its dequantization")
        self.bias = None
        if bias is not None:
            b = np.asarray(bias.detach().cpu().float().numpy() if hasattr(bias, "detach") else bias, np.float64)
            if b.shape != (self.vocab_size,):
                raise BatError(f"bias has shape {b.shape}, expected ({self.vocab_size},) to match W")
            _require_finite(b[:, None], "bias", "check the checkpoint")
            self.bias = b
        if softcap is not None and (not math.isfinite(softcap) or softcap <= 0):
            raise BatError(f"softcap={softcap!r} must be a positive number (or None when the model has none)")
        self.softcap = None if softcap is None else float(softcap)
        self.parent: Basis | None = None  # the full basis, where this one is `reduced`
        self.directions: np.ndarray | None = None  # then its d x k singular directions (float64)
        self._derive()

    def _derive(self) -> None:
        """Row norms and the float64 Gram matrix of A = [W, 1], chunked so no v x d float64 copy exists."""
        v, d = self.W.shape
        gram = np.zeros((d + 1, d + 1))
        row_norm_sq = np.empty(v)
        row_norm_l1 = np.empty(v)
        for start in range(0, v, CHUNK_ROWS):
            block = self.W[start : start + CHUNK_ROWS].astype(np.float64)
            row_norm_sq[start : start + len(block)] = np.einsum("ij,ij->i", block, block)
            row_norm_l1[start : start + len(block)] = np.abs(block).sum(axis=1)
            gram[:d, :d] += block.T @ block
            gram[:d, d] += block.sum(axis=0)
        gram[d, :d] = gram[:d, d]
        gram[d, d] = v
        self.row_norm = np.sqrt(row_norm_sq)  # ||w_j||_2: bounds float32 rounding of W y
        self.row_norm_l1 = row_norm_l1  # ||w_j||_1: scales the solver tolerance per token
        self.gram = gram  # A^T A in float64: bounds sum_j c_j^2 over any token set exactly (up to 1e-12)
        # the rounding slack of a tail energy y' G y - sum_exact u_j^2 (certify.py) is bounded by ||y||^2 times
        # max_i sum_k |G_ik| (>= |y|'|G||y| / ||y||^2, the error of evaluating y' G y) and the trace of G
        # (>= sum_j (|w_j|.|y|)^2 / ||y||^2, the scale of the error of G's own float64 sums, each over at most
        # gram_terms rows, and of the exact products u_j)
        self.abs_gram_bound = float(np.abs(gram[:d, :d]).sum(axis=1).max())
        self.gram_trace = float(np.trace(gram[:d, :d]))
        self.gram_terms = min(v, CHUNK_ROWS) + -(-v // CHUNK_ROWS)
        self._lazy = threading.RLock()  # the caches below are built once, also when requests run in threads
        self._init_factors()
        self._init_products()

    def checked_logits(self, logits: Any) -> np.ndarray:
        """The first v logits as float64, after checking shape and values."""
        if hasattr(logits, "detach"):
            logits = logits.detach().float().cpu().numpy()
        z = np.asarray(logits)
        if z.ndim != 1:
            raise BatError(f"logits must be one row of length >= {self.vocab_size}, got shape {z.shape}")
        if z.shape[0] < self.vocab_size:
            raise BatError(
                f"logits have {z.shape[0]} columns but W has {self.vocab_size} rows: "
                "W does not belong to this model (or the wrong matrix was read)"
            )
        z = z[: self.vocab_size].astype(np.float64)
        if not np.isfinite(z).all():
            raise BatError(
                "logits hold NaN or inf: BAT needs the model's raw logits; run it before any processor "
                "that masks tokens with -inf, and check the model for overflow"
            )
        return z

    def row_scale(self, z: np.ndarray) -> np.ndarray | None:
        """Per-token scaling of W's rows for soft-capped logits (None when there is no soft-cap)."""
        if self.softcap is None:
            return None
        ratio = z / self.softcap
        if np.any(np.abs(ratio) > 1.0 + 1e-6):
            raise BatError(
                f"logits exceed the soft-cap {self.softcap}: these logits were not produced by a "
                "soft-capped model with this cap"
            )
        return np.clip(1.0 - ratio * ratio, 0.0, 1.0)

    def prepare(self, config: Any = None) -> None:
        """Build now what decisions build lazily (whitening, the reduced bases of the search LPs, the
        int8 copy of a Q8_0 W with its compiled products: 0.4 s for SmolLM2), so that the first
        request does not pay for it. Optional."""
        config = config or BatConfig()
        if not self._host_numpy:
            self._q8_rows()
        self.whitening()
        for k in config.search_levels:
            if k < self.hidden_size:
                self.reduced_cached(k).whitening()

    def check_span(self, logits: Any, tolerance: float, source: str, cause: str) -> None:
        """A BatError unless one row of `source`'s logits lies in the span of [W, 1] (relative residual below
        `tolerance`): BAT's decisions hold for the distributions W can produce only. `cause`: what probably
        changed the logits, for the message."""
        residual = self.span_residual(logits)
        if not residual < tolerance:
            raise BatError(
                f"the logits of {source} are not explained by its output matrix: they lie outside the span of "
                f"[W, 1] (relative residual {residual:.2g} > {tolerance}). {cause}; BAT refuses to sample on them"
            )

    def span_residual(self, logits: Any) -> float:
        """Relative distance of one row of logits from the span of [W, 1] (docs/method.md, section 5).

        About 1e-6 (float32 rounding) when W produced these logits; of order 1 for a wrong matrix, a
        shuffled vocabulary or logits changed by a bias/penalty processor. Soft-capped logits are first
        mapped back through the cap."""
        z = self.checked_logits(logits)
        if self.softcap is not None:
            z = self.softcap * np.arctanh(np.clip(z / self.softcap, -1 + 1e-7, 1 - 1e-7))
        if self.bias is not None:
            z = z - self.bias
        d = self.hidden_size
        rhs = np.zeros(d + 1)
        for start in range(0, self.vocab_size, CHUNK_ROWS):  # float64 without a v x d float64 copy
            rhs[:d] += self.W[start : start + CHUNK_ROWS].astype(np.float64).T @ z[start : start + CHUNK_ROWS]
        rhs[d] = z.sum()
        x = np.linalg.lstsq(self.gram, rhs, rcond=1e-13)[0]
        fitted = np.empty_like(z)
        for start in range(0, self.vocab_size, CHUNK_ROWS):
            fitted[start : start + CHUNK_ROWS] = self.W[start : start + CHUNK_ROWS].astype(np.float64) @ x[:d] + x[d]
        centred = z - z.mean()
        return float(np.linalg.norm(z - fitted) / max(np.linalg.norm(centred), 1e-30))

    def __repr__(self) -> str:
        extras = "".join(
            [", bias" if self.bias is not None else "", f", softcap={self.softcap}" if self.softcap else ""]
        )
        return f"Basis(vocab={self.vocab_size}, hidden={self.hidden_size}{extras})"
