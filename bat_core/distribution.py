"""The distribution of one generation step and its head: what every decision on that step shares."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from .basis import Basis
from .thresholds import ThresholdRule


def _sample_threshold(p: np.ndarray, count: int) -> float:
    """A value that about `count` entries of p reach, read off a strided sample of 4096 of them: one
    partition of the sample instead of one of p (which took 0.6 ms on v = 49,152)."""
    sample = p[:: max(1, len(p) // 4096)]
    above = min(len(sample), max(1, int(np.ceil(count * len(sample) / len(p)))))
    return float(np.partition(sample, len(sample) - above)[len(sample) - above])


def most_probable(p: np.ndarray, k: int) -> np.ndarray:
    """The k most probable tokens (unordered), as argpartition(-p, k - 1)[:k]: the partition runs over the
    tokens at or above a sample threshold set with a margin, lowered until they are at least k."""
    if k >= len(p):
        return np.arange(len(p))
    want = k
    while True:
        want = int(1.5 * want) + 64  # the sample's rank error at k = 1024 of 49,152 is about 10%
        if want >= len(p):
            pool = np.arange(len(p))
            break
        pool = np.flatnonzero(p >= _sample_threshold(p, want))
        if len(pool) >= k:
            break
    return pool[np.argpartition(-p[pool], k - 1)[:k]]


@dataclass(eq=False)
class Distribution:
    """One next-token distribution: p, tau, the soft-cap row scales, and the head (its most probable tokens,
    whose products decisions compute exactly)."""

    basis: Basis
    p: np.ndarray  # float64 probabilities, length v
    tau: float
    scale: np.ndarray | None  # soft-cap row scale s_j, or None
    head_size: int = 1024
    tprime: float = field(init=False)  # tau' = tau / (1 - tau), the box's upper slope
    lipschitz: float = field(init=False)  # of rho: max(tau', 1)
    # the last gathers, kept because one decision asks for the same ones several times
    _last_rows: tuple[np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False)
    _last_exact_set: tuple[int, np.ndarray] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.tprime = self.tau / (1.0 - self.tau)
        self.lipschitz = max(self.tprime, 1.0)

    @classmethod
    def build(cls, basis: Basis, logits, tau: float | ThresholdRule, head_size: int = 1024):
        """The step of `logits`; `tau` is a number or a ThresholdRule (its tau computed from p)."""
        z = basis.checked_logits(logits)
        if isinstance(tau, ThresholdRule):
            p, tau = tau.probabilities_and_tau(z)
        else:
            p = np.exp(z - z.max())
            p /= p.sum()
        return cls(basis, p, float(tau), basis.row_scale(z), head_size)

    @functools.cached_property
    def weight_sq_total(self) -> float:
        weights = self.p if self.scale is None else self.p * self.scale
        return float(weights @ weights)

    @functools.cached_property
    def p_total(self) -> float:
        return float(self.p.sum())

    @functools.cached_property
    def head(self) -> np.ndarray:
        """The `head_size` most probable tokens, most probable first (built on first use: most steps
        end at the threshold shortcut and never need it)."""
        head = most_probable(self.p, min(self.head_size, len(self.p)))
        return head[np.argsort(-self.p[head], kind="stable")]

    @functools.cached_property
    def head_sorted(self) -> np.ndarray:
        """The head's token ids in increasing order."""
        return np.sort(self.head)

    @functools.cached_property
    def argmax(self) -> int:
        return int(np.argmax(self.p))

    def scale_of(self, tokens: np.ndarray) -> np.ndarray:
        return np.ones(len(tokens)) if self.scale is None else self.scale[tokens]

    def tolerance_scale(self, tokens: np.ndarray) -> np.ndarray:
        """||a_i||_1 for each token: the unit in which the solver tolerance is measured."""
        return self.scale_of(tokens) * self.basis.row_norm_l1[tokens] + 1.0

    @functools.cached_property
    def vocabulary_tolerance_scale(self) -> np.ndarray:
        """`tolerance_scale` of every token, made once per step (mask mode tests each certificate on all)."""
        return self.tolerance_scale(np.arange(len(self.p)))

    def rows(self, tokens: np.ndarray) -> np.ndarray:
        """Rows of W as float64 (the last gather is kept)."""
        last = self._last_rows
        if last is not None and len(last[0]) == len(tokens) and np.array_equal(last[0], tokens):
            return last[1]
        rows = self.basis.rows(tokens)
        self._last_rows = (np.array(tokens, copy=True), rows)
        return rows

    def augmented_rows(self, tokens: np.ndarray) -> np.ndarray:
        """Rows a_j = (s_j w_j, 1) of [W, 1] in float64: the columns of the LPs and least-squares systems."""
        rows = self.basis.rows(tokens) * self.scale_of(tokens)[:, None]
        return np.hstack([rows, np.ones((len(tokens), 1))])

    def exact_set(self, token: int) -> np.ndarray:
        """The head with `token` added, sorted: the tokens whose products a decision on `token` computes
        exactly (the last one is kept: one decision asks for it several times)."""
        last = self._last_exact_set
        if last is not None and last[0] == token:
            return last[1]
        head = self.head_sorted
        pos = int(np.searchsorted(head, token))
        exact = head if pos < len(head) and head[pos] == token else np.insert(head, pos, token)
        self._last_exact_set = (token, exact)
        return exact

    def head_products(self, tokens: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """u = W y_w on `tokens` in float64 (unscaled): what the bounds of certify.py accept as `u` so that
        one decision computes it once for all its certificate candidates (the products of -y are -u)."""
        if self.basis.rows_product_native:
            return self.basis.rows_product(tokens, Y[: self.basis.hidden_size])
        return self.rows(tokens) @ Y[: self.basis.hidden_size]
