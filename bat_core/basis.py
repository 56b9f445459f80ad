"""The per-model object: the unembedding matrix W and everything derived from it once.

A model's logits are ``z = W h + b`` (optionally soft-capped: ``c * tanh(u / c)``). BAT needs W
exactly as the engine multiplies with it, as float32, once per model. Everything that all requests
share (row norms, the Gram matrix of [W, 1], the whitened rows used to search for certificates) is
computed here, once, and never copied per request.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from .config import BatConfig
from .errors import BatError
from .q8 import Q8Rows
from .threads import matvec_pool, matvec_threads

_CHUNK_ROWS = 8192
_DEVICE_BLOCK_ROWS = 16384  # rows per elementwise product on the device (a 16384 x d float32 temporary)


def _in_parts(count: int, min_split: int, work: Callable[[int, int], Any]) -> list:
    """[work(start, stop) for each part] over [0, count) split into one part per product thread
    (`matvec_threads`), on the worker pool; one part in the calling thread below `min_split` items,
    where threads only cost."""
    parts = matvec_threads() if count >= min_split else 1
    bounds = [int(b) for b in np.linspace(0, count, parts + 1)]
    if parts == 1:
        return [work(0, count)]
    return list(matvec_pool().map(lambda k: work(bounds[k], bounds[k + 1]), range(parts)))


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
    for start in range(0, array.shape[0], _CHUNK_ROWS):
        block = array[start : start + _CHUNK_ROWS]
        if not np.isfinite(block).all():
            bad = start + int(np.argwhere(~np.isfinite(block))[0][0])
            raise BatError(f"{name} holds NaN or inf (first at row {bad}); {advice}")


class Basis:
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
        for start in range(0, v, _CHUNK_ROWS):
            block = self.W[start : start + _CHUNK_ROWS].astype(np.float64)
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
        self.gram_terms = min(v, _CHUNK_ROWS) + -(-v // _CHUNK_ROWS)
        self._lazy = threading.RLock()  # the caches below are built once, also when requests run in threads
        self._whitening: tuple[np.ndarray, np.ndarray] | None = None
        self._eigvec: np.ndarray | None = None
        self._reduced: dict[int, Basis] = {}
        self._device_W: Any = None  # a torch copy of W where set_matvec_device put the product
        self._q8: Q8Rows | None | bool = False  # int8 rows for the compiled product (False: not looked at yet)
        self._host_numpy = False  # set_matvec_device("numpy")

    # ----------------------------------------------------------------- distributions
    def probabilities(self, logits: Any) -> np.ndarray:
        """p_hat = softmax(logits[:v]) in float64. Extra columns (engine padding) are ignored."""
        z = self.checked_logits(logits)
        z = z - z.max()
        p = np.exp(z)
        p /= p.sum()
        return p

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
        for start in range(0, self.vocab_size, _CHUNK_ROWS):  # float64 without a v x d float64 copy
            rhs[:d] += self.W[start : start + _CHUNK_ROWS].astype(np.float64).T @ z[start : start + _CHUNK_ROWS]
        rhs[d] = z.sum()
        x = np.linalg.lstsq(self.gram, rhs, rcond=1e-13)[0]
        fitted = np.empty_like(z)
        for start in range(0, self.vocab_size, _CHUNK_ROWS):
            fitted[start : start + _CHUNK_ROWS] = self.W[start : start + _CHUNK_ROWS].astype(np.float64) @ x[:d] + x[d]
        centred = z - z.mean()
        return float(np.linalg.norm(z - fitted) / max(np.linalg.norm(centred), 1e-30))

    # ----------------------------------------------------------------- helpers for the core
    def set_matvec_device(self, device: Any) -> None:
        """Where the product over the vocabulary runs. None (the default): on the host, with the compiled
        int8 product where W is Q8_0 (bat_core/q8.py), else numpy; "numpy": numpy's float32 product in
        any case; a torch device (e.g. the engine's GPU, which the logits come from): torch there, with
        a float32 copy of W (4 v d bytes).

        The certificates' rounding bound holds for any summation order and fused multiply-adds, but
        not for TensorFloat-32, which a GPU matrix product may use (torch's TF32 settings are global
        and belong to the engine): the product is therefore an elementwise multiply and a float32 sum,
        which no TF32 setting touches (`bench_vllm_gpu.py` measures its error against the bound)."""
        if device is None or device == "numpy":
            self._device_W = None
            self._host_numpy = device == "numpy"
            return
        import torch

        device = torch.device(device)
        if self._device_W is None or self._device_W.device != device:
            self._device_W = torch.from_numpy(self.W).to(device)

    @property
    def matvec_device(self) -> str:
        """Where `matvec` runs: "numpy", "q8" (the compiled int8 product, bat_core/q8.py) or a torch device."""
        if self._device_W is not None:
            return str(self._device_W.device)
        return "numpy" if self._host_numpy or self._q8_rows() is None else "q8"

    def _q8_rows(self) -> Q8Rows | None:
        """W as Q8_0 int8 blocks, when it is made of them and the kernel builds here (checked once)."""
        if self._q8 is False:
            with self._lazy:
                if self._q8 is False:
                    self._q8 = Q8Rows.of(self.W)
        return self._q8

    def matvec(self, y: np.ndarray) -> np.ndarray:
        """W @ y in float32 over the whole vocabulary, split by rows over worker threads: on int8 rows
        where W is Q8_0 (a quarter of the bytes to read), else numpy's float32 product, or on
        set_matvec_device's device. All three stay within certify.py's rounding bound."""
        y = np.ascontiguousarray(y, dtype=np.float32)
        if self._device_W is not None:
            return self._device_product(y)
        q8 = None if self._host_numpy else self._q8_rows()
        out = np.empty(self.vocab_size, dtype=np.float32)

        def work(start: int, stop: int) -> None:
            if q8 is not None:
                q8.product(y, out, start, stop)
            else:
                np.matmul(self.W[start:stop], y, out=out[start:stop])

        _in_parts(self.vocab_size, 16384, work)
        return out

    def _device_product(self, y: np.ndarray) -> np.ndarray:
        """W @ y on the device in plain float32 arithmetic, by blocks of rows."""
        import torch

        W = self._device_W
        y_dev = torch.from_numpy(y).to(W.device)
        out = torch.empty(W.shape[0], dtype=torch.float32, device=W.device)
        for start in range(0, W.shape[0], _DEVICE_BLOCK_ROWS):
            stop = start + _DEVICE_BLOCK_ROWS
            torch.sum(W[start:stop] * y_dev, dim=1, out=out[start:stop])
        return out.cpu().numpy()

    def rows(self, token_ids: np.ndarray) -> np.ndarray:
        """Rows of W for token_ids as float64 (a small gather)."""
        return self.W[token_ids].astype(np.float64)

    @property
    def rows_product_native(self) -> bool:
        """Whether `rows_product` runs compiled on the int8 rows (else on float64 copies of the rows)."""
        return not self._host_numpy and self._q8_rows() is not None

    def rows_product(self, token_ids: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """W[token_ids] @ Y in float64 ([n, m]; Y: [d, m])."""
        if self.rows_product_native:
            return self._q8.rows_product(token_ids, Y)
        return self.rows(token_ids) @ Y

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
        for start in range(0, self.vocab_size, _CHUNK_ROWS):
            block = self.W[start : start + _CHUNK_ROWS]
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

    def reduced_cached(self, directions: int) -> Basis:
        """`reduced(directions)`, built once per model and shared by all requests."""
        directions = min(directions, self.hidden_size)
        with self._lazy:
            if directions not in self._reduced:
                self._reduced[directions] = self.reduced(directions)
        return self._reduced[directions]

    def reduced(self, directions: int) -> Basis:
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
        for start in range(0, self.vocab_size, _CHUNK_ROWS):
            np.matmul(self.W[start : start + _CHUNK_ROWS], top, out=reduced[start : start + _CHUNK_ROWS])
        basis = Basis.__new__(Basis)
        basis.W, basis.bias, basis.softcap = reduced, self.bias, self.softcap
        basis.vocab_size, basis.hidden_size = reduced.shape
        own = self.singular_directions(directions)
        # certificates lift to the original model's W, also from a reduced basis's reduction
        basis.parent = self if self.parent is None else self.parent
        basis.directions = own.copy() if self.parent is None else self.directions @ own
        basis._derive()
        return basis

    def __repr__(self) -> str:
        extras = "".join(
            [", bias" if self.bias is not None else "", f", softcap={self.softcap}" if self.softcap else ""]
        )
        return f"Basis(vocab={self.vocab_size}, hidden={self.hidden_size}{extras})"
