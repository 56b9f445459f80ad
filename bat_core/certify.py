"""Accept certificates, checked over the whole vocabulary with rigorous floating-point bounds.

Notation (docs/method.md, section 3). ``a_j = (s_j w_j, 1)`` is row j of [W, 1] (``s_j`` = 1 unless the
model soft-caps its logits), a certificate is ``y`` in R^(d+1) and ``c = A y``. With
``rho(t) = tau' max(t, 0) + max(-t, 0)`` and ``tau' = sigma - 1 = tau / (1 - tau)``, the *value* of y
for token i is

    value(y, i) = (p_i c_i - sum_{j != i} p_j rho(c_j)) / (p_i ||y||_inf)

Token i is provably sampleable (F_i is empty) when value(y, i) > 0 for some y; its largest value over
``||y||_inf <= 1`` is the L1 distance from the LP's right-hand side to what the box can reach
(the "relative infeasibility" once divided by ||a_i||_1). bat-sampling accepts only when a lower
bound of value(y, i) exceeds ``tol * ||a_i||_1``: decisions inside the solver's tolerance are
rejects, the sound answer. Lower bounds come from:

- exact products (float64, error below 1e-15 relative) for the head of the distribution and the
  candidates;
- for the rest, either a Cauchy-Schwarz bound from the float64 Gram matrix of [W, 1] (costs no
  product over the vocabulary), or one float32 product over the vocabulary with the standard
  rounding-error bound ``|fl(w.y) - w.y| <= gamma ||w|| ||y||`` (`float32_gamma`).

Both y and -y are tried (the sign of a dual ray is a convention of the solver that produced it).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import q8
from .distribution import Distribution

U32 = 2.0**-24
U64 = 2.0**-53


def float32_gamma(d: int) -> float:
    """gamma_n = n u / (1 - n u) with n = d + 4 roundings per term of a float32 product over d terms:
    the conversion of y to float32, the product, the Q8 scale (bat_core/q8.py) and at most d - 1
    additions. It holds for any summation order and with fused multiply-adds, so it covers numpy's
    product, the compiled int8 product and the product on a torch device alike."""
    n = d + 4
    return n * U32 / (1.0 - n * U32)


def rho(t: np.ndarray, tprime: float) -> np.ndarray:
    return np.where(t > 0, tprime * t, -t)


def regression_weights(p: np.ndarray, c: np.ndarray, tprime: float) -> np.ndarray:
    """The reweighted least-squares weights of sum_j p_j rho(c_j) written as sum_j v_j c_j^2:
    v_j = p_j slope(c_j) / |c_j| (slope tau' above zero, 1 below), |c_j| floored at 1e-3 of the median."""
    floor = 1e-3 * float(np.median(np.abs(c))) + 1e-300
    return p * np.where(c > 0, tprime, 1.0) / np.maximum(np.abs(c), floor)


def costliest_tokens(cost: np.ndarray, k: int) -> np.ndarray:
    """The (up to) k tokens of largest positive `cost` (p_j rho(c_j), with -1 where a token is excluded):
    those that break a certificate most, which column generation adds to a working set."""
    k = min(k, int((cost > 0).sum()))
    return np.argpartition(-cost, k - 1)[:k] if k > 0 else np.zeros(0, dtype=np.int64)


def _rho_upper(lo: np.ndarray, hi: np.ndarray, tprime: float) -> np.ndarray:
    """max of rho over [lo, hi]: rho(t) = max(tau' t, -t) is convex, so the max is at an end, and
    of the four terms only tau' hi and -lo can be largest."""
    return np.maximum(tprime * hi, -lo)


def _interval_sums(
    u: np.ndarray, weight: np.ndarray, norm: np.ndarray, scale: np.ndarray | None, y0: float, g: float, tprime: float
) -> tuple[float, float]:
    """sum_j weight_j max(tau' hi_j, -lo_j) and sum_j weight_j max(-tau' lo_j, hi_j), the costs of +y and -y,
    where [lo_j, hi_j] holds c_j = s_j u_j + y0 for float32 products u (float64 here) with error
    <= g s_j ||w_j|| (`norm`): the numpy twin of bat_tail_sums in native/q8_matvec.c."""
    c = u * scale + y0 if scale is not None else u + y0
    err = g * (norm if scale is None else scale * norm) + 4 * U64 * np.abs(c)
    hi, lo = c + err, c - err
    return float(weight @ _rho_upper(lo, hi, tprime)), float(weight @ _rho_upper(-hi, -lo, tprime))


class HeadBounds(Distribution):
    """Bounds of a certificate's value that make no product over the vocabulary: exact float64 products on
    the head and the candidates, and a Lipschitz and Cauchy-Schwarz bound of the rest from the Gram matrix."""

    def exact_products(
        self, tokens: np.ndarray, Y: np.ndarray, u: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(c, err, u) on `tokens` for certificates Y (shape [d+1, m]), in float64.

        u = W y_w (unscaled; computed unless given), c = s u + y_0, |c - true c| <= err."""
        d = self.basis.hidden_size
        if u is None:
            u = self.head_products(tokens, Y)
        elif u.shape != (len(tokens), Y.shape[1]):
            raise ValueError(
                f"products of shape {u.shape} given for {len(tokens)} tokens and {Y.shape[1]} certificates"
            )
        s = self.scale_of(tokens)[:, None]
        c = s * u + Y[d]
        yw_norm = np.linalg.norm(Y[:d], axis=0)
        err = (d + 3) * U64 * (s * self.basis.row_norm[tokens][:, None]) * yw_norm + 4 * U64 * np.abs(c)
        return c, err, u

    def candidate_values(
        self, Y: np.ndarray, candidates: np.ndarray, exact_tokens: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Cheap check: lower bounds of max(value(y, i), value(-y, i)) for each y (column of Y) and
        candidate i, exact on the head (or `exact_tokens`) and the candidates, Cauchy-Schwarz on the rest.

        Returns (lower [m, n], optimistic [m, n]). `optimistic` drops the tail bound: where it is not
        above the tolerance, no full product can rescue that certificate."""
        d = self.basis.hidden_size
        if exact_tokens is None and len(candidates) == 1:
            exact = self.exact_set(int(candidates[0]))
        else:
            exact = np.unique(np.concatenate([self.head if exact_tokens is None else exact_tokens, candidates]))
        c, err, u = self.exact_products(exact, Y)
        pos = np.searchsorted(exact, candidates)
        p_exact = self.p[exact][:, None]
        p_cand = self.p[candidates][None, :]
        lower = optimistic = None
        tail_mass, spread = self._tail_bound(Y, exact, u)
        for sign in (1.0, -1.0):
            lo, hi = (c - err, c + err) if sign > 0 else (-c - err, -c + err)
            rho_up = p_exact * _rho_upper(lo, hi, self.tprime)
            others = rho_up.sum(axis=0)[:, None] * (1.0 + 4 * len(exact) * U64) - rho_up[pos].T  # j != i
            gain = p_cand * lo[pos].T  # p_i times a lower bound of c_i
            tail = (rho(sign * Y[d], self.tprime) * tail_mass + spread)[:, None]
            lower = np.maximum(lower, gain - others - tail) if lower is not None else gain - others - tail
            optimistic = np.maximum(optimistic, gain - others) if optimistic is not None else gain - others
        scale = p_cand * np.abs(Y).max(axis=0)[:, None]
        return lower / scale, optimistic / scale

    def head_values(self, Y: np.ndarray, token: int, u: np.ndarray | None = None) -> np.ndarray:
        """value(+-y, token) counting only the head and the token (no rounding bounds): an upper
        estimate that ranks certificate candidates before any product over the vocabulary."""
        exact = self.exact_set(token)
        pos = int(np.searchsorted(exact, token))
        c = self.head_products(exact, Y) if u is None else u
        c = c * self.scale[exact][:, None] if self.scale is not None else c.copy()
        c += Y[self.basis.hidden_size]
        p = self.p[exact][:, None]
        best = np.full(Y.shape[1], -np.inf)
        for sign in (1.0, -1.0):
            cost = p * rho(sign * c, self.tprime)
            value = p[pos] * sign * c[pos] - (cost.sum(axis=0) - cost[pos])
            best = np.maximum(best, value)
        return best / (self.p[token] * np.abs(Y).max(axis=0))

    def _outside_energy(self, Y: np.ndarray, exact: np.ndarray, u_exact: np.ndarray) -> np.ndarray:
        """Upper bounds of sum_{j not in exact} u_j^2 (u = W y_w), per certificate: y_w' G y_w less the exact
        tokens' part, plus the float64 rounding of y'Gy, of G itself and of the exact products' squares
        (Basis._derive)."""
        d = self.basis.hidden_size
        yw = Y[:d]
        total_energy = np.einsum("km,km->m", yw, self.basis.gram[:d, :d] @ yw)
        terms = self.basis.gram_terms + 2 * d + len(exact) + 8
        scale = 1e-9 * self.basis.abs_gram_bound + 4 * terms * U64 * self.basis.gram_trace
        slack = scale * np.einsum("km,km->m", yw, yw) + 1e-300
        return np.maximum(total_energy - (u_exact * u_exact).sum(axis=0), 0.0) + slack

    def _tail_bound(self, Y: np.ndarray, exact: np.ndarray, u_exact: np.ndarray) -> tuple[float, np.ndarray]:
        """(mass, spread): sum_{j not in exact} p_j rho(sign * c_j) <= rho(sign * y0) * mass + spread, per
        certificate, without touching the tail (the same for both signs).

        rho is Lipschitz (constant L = max(tau', 1)), so rho(s_j u_j + y0) <= rho(y0) + L |s_j u_j|, and
        Cauchy-Schwarz gives sum p_j s_j |u_j| <= sqrt(sum (p_j s_j)^2) sqrt(sum u_j^2), where the tail's
        sum of u_j^2 is y_w' G y_w minus the exact tokens' part (G = W'W in float64)."""
        return self._lipschitz_tail(exact, self._outside_energy(Y, exact, u_exact))

    def _lipschitz_tail(self, exact: np.ndarray, tail_energy: np.ndarray) -> tuple[float, np.ndarray]:
        """_tail_bound's (mass, spread) from the tail's energy bound."""
        weights = self.p[exact] * self.scale_of(exact)
        slack = self.tail_sum_slack(len(exact))
        tail_weight_sq = max(self.weight_sq_total - float(weights @ weights), 0.0) + slack * self.weight_sq_total
        tail_mass = max(self.p_total - float(self.p[exact].sum()), 0.0) + slack * self.p_total
        return tail_mass, self.lipschitz * np.sqrt(tail_weight_sq * tail_energy)

    def tail_sum_slack(self, kept: int) -> float:
        """Relative slack of a tail sum taken as (sum over the vocabulary) - (sum over `kept` tokens): each
        float64 sum of n terms (products p_j s_j, squares) is within gamma_(n+1) <= 2 (n+1) u of exact for any
        summation order, and the difference adds one rounding; 4 (v + kept) u covers the three."""
        return 4 * (self.basis.vocab_size + kept) * U64


class ProductMemo:
    """W y_w in float32 (Basis.matvec) for the last few vectors y_w: the product does not depend on the step, and
    a certificate proven by one check is applied to the whole vocabulary next (mask mode), and again at the
    request's later steps (its recent certificates). Any float32 product of W and the float32 y_w meets the
    rounding bounds, so a kept one serves as well as a new one.

    The products live in one [capacity, v] block of its own pages, mapped at the first product and unmapped
    with the memo: long-lived arrays from malloc would stay in a serving process's heap after the request ends
    (docs/vllm.md). Callers get a copy, so no later product overwrites what they hold."""

    def __init__(self, basis: Any, capacity: int = 2) -> None:
        self.basis, self.capacity = basis, capacity
        self._rows: np.ndarray | None = None
        self._row_of: dict[bytes, int] = {}  # y_w's float32 bytes -> its row of _rows, oldest first

    def product(self, y_w: np.ndarray, known: np.ndarray | None = None) -> np.ndarray:
        """The product, from the memo, from `known` (a float32 product the caller made), or made now."""
        y32 = np.ascontiguousarray(y_w, dtype=np.float32)
        key = y32.tobytes()
        row = self._row_of.pop(key, None)
        if row is None:
            row = self._free_row()
            if known is None:
                self.basis.matvec(y32, out=self._rows[row])
            else:
                self._rows[row] = known
        self._row_of[key] = row
        return self._rows[row].copy()

    def _free_row(self) -> int:
        """A row of the block for a new product: an unused one, else the oldest product's."""
        if self._rows is None:
            pages = mmap.mmap(-1, self.capacity * self.basis.vocab_size * 4)
            self._rows = np.frombuffer(pages, dtype=np.float32).reshape(self.capacity, self.basis.vocab_size)
        if len(self._row_of) < self.capacity:  # rows are taken in order and freed only all at once (clear)
            return len(self._row_of)
        return self._row_of.pop(next(iter(self._row_of)))

    def clear(self) -> None:
        self._row_of.clear()


@dataclass(eq=False)
class Step(HeadBounds):
    """One step's distribution with every bound a decision uses, the last ones with one float32 product over
    the vocabulary and its rigorous rounding bound."""

    vocabulary_products: int = field(default=0, init=False)  # full_value checks that made a product over the vocabulary
    # the request's memo of products over the vocabulary (BatSolver.new_step), or one of this step alone
    products: ProductMemo | None = field(default=None, init=False, repr=False)

    def product(self, y_w: np.ndarray, known: np.ndarray | None = None) -> np.ndarray:
        """W y_w in float32 through the memo (`ProductMemo.product`)."""
        if self.products is None:
            self.products = ProductMemo(self.basis)
        return self.products.product(y_w, known)

    def products_of(self, Y: np.ndarray) -> np.ndarray:
        """W y_w in float32 for each column y of Y: [m, v] (a view, not always contiguous)."""
        Y32 = np.asarray(Y[: self.basis.hidden_size], dtype=np.float32)
        if Y.shape[1] <= 4:  # OpenBLAS's sgemm with a few columns is slower than the matching sgemv calls
            return np.stack([self.product(Y32[:, m]) for m in range(Y.shape[1])])
        return (self.basis.W @ np.ascontiguousarray(Y32)).T

    def full_products(self, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(c, err) over the whole vocabulary from one float32 product, with a rigorous error bound."""
        d = self.basis.hidden_size
        u = np.ascontiguousarray(self.products_of(Y).T)  # [v, m] in rows, as the sums below were measured
        s = np.ones(self.basis.vocab_size) if self.scale is None else self.scale
        c = s[:, None] * u + Y[d]
        gamma = float32_gamma(d)
        yw_norm = np.linalg.norm(Y[:d], axis=0)
        err = gamma * (s * self.basis.row_norm)[:, None] * yw_norm + 4 * U64 * np.abs(c)
        return c, err

    def full_value(
        self,
        y: np.ndarray,
        token: int,
        u_exact: np.ndarray | None = None,
        u32: np.ndarray | None = None,
        enough: float | None = None,
    ) -> float:
        """Rigorous lower bound of max(value(y, token), value(-y, token)) from one float32 product over
        the vocabulary (exact float64 on the head): the single-token case of `all_values`, without
        its [v, m] intermediates. `u_exact`: W y_w on exact_set(token), if already computed; `u32`:
        Basis.matvec(y_w), if already made (any float32 product of W and y_w meets the rounding bound).

        `enough` (the value that settles the caller's question): first the bound of the tail that needs no
        product (Lipschitz and Cauchy-Schwarz, as in `candidate_values`); the product over the vocabulary is
        made only where that bound is not above `enough`. The larger bound is returned."""
        d = self.basis.hidden_size
        exact = self.exact_set(token)
        c_exact, err_exact, u_exact = self.exact_products(
            exact, y[:, None], None if u_exact is None else u_exact[:, None]
        )
        p, tp, i = self.p, self.tprime, token
        y0 = float(y[d])
        rounding = 1.0 + 4 * self.basis.vocab_size * U64  # the float64 sum of v terms, rounded up
        # the head and the candidate from exact float64 products, the rest from the float32 product
        hi_exact, lo_exact = c_exact[:, 0] + err_exact[:, 0], c_exact[:, 0] - err_exact[:, 0]
        up_exact = (_rho_upper(lo_exact, hi_exact, tp), _rho_upper(-hi_exact, -lo_exact, tp))  # +y, -y
        pos = int(np.searchsorted(exact, i))

        def value(tail: tuple[float, float]) -> float:
            best = -np.inf
            for sign_lo, up, rest in ((lo_exact[pos], up_exact[0], tail[0]), (-hi_exact[pos], up_exact[1], tail[1])):
                others = (rest + float(p[exact] @ up)) * rounding - p[i] * up[pos]
                best = max(best, p[i] * sign_lo - others)
            return best / (p[i] * float(np.abs(y).max()))

        best = -np.inf
        if enough is not None and u32 is None:
            outside = self._outside_energy(y[:, None], exact, u_exact)
            tail_mass, spread = self._lipschitz_tail(exact, outside)
            best = value(tuple(float(rho(np.array(sign * y0), tp)) * tail_mass + float(spread[0]) for sign in (1, -1)))
            if best > enough:
                return best
        u32 = self.product(y[:d], u32)
        weight = p.copy()
        weight[exact] = 0.0
        self.vocabulary_products += 1
        g = float32_gamma(d) * float(np.linalg.norm(y[:d]))
        return max(best, value(self._tail_sums(u32, weight, g, y0)))

    def _tail_sums(self, u32: np.ndarray, weight: np.ndarray, g: float, y0: float) -> tuple[float, float]:
        """sum_j weight_j max(tau' hi_j, -lo_j) and sum_j weight_j max(-tau' lo_j, hi_j) over the vocabulary,
        where [lo_j, hi_j] holds c_j = s_j u_j + y0 given the float32 product u (error <= g s_j ||w_j||)."""
        compiled = q8.value_sums(u32, weight, self.basis.row_norm, self.scale, y0, g, self.tprime)
        if compiled is not None:
            return compiled
        return _interval_sums(u32.astype(np.float64), weight, self.basis.row_norm, self.scale, y0, g, self.tprime)

    def full_candidate_values(
        self, Y: np.ndarray, candidates: np.ndarray, exact_tokens: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Like candidate_values, with one float32 product over the whole vocabulary for the tail.

        Returns (values [m, n], c [v, m]) where c is the product used (for column generation)."""
        exact = self.head if exact_tokens is None else exact_tokens
        exact = np.unique(np.concatenate([exact, candidates]))
        c, err, _ = self.exact_products(exact, Y)
        values, c_full = self.all_values(Y, exact, c, err, return_products=True)
        return values[:, candidates], c_full

    def _values_on(self, p: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """p_i lo_i - sum_(j != i) p_j rho_up_j for every token i and column, where c_j lies in [lo_j, hi_j]:
        the unscaled lower bound of each column's value for token i."""
        rho_up = _rho_upper(lo, hi, self.tprime)
        rho_up *= p
        # sum over j != i of p_j rho_j, rounded up: the float64 sum of v terms is within v*u of exact
        total = rho_up.sum(axis=0) * (1.0 + 4 * self.basis.vocab_size * U64)
        np.subtract(total[None, :], rho_up, out=rho_up)
        value = p * lo
        value -= rho_up
        return value

    def _compiled_values(
        self, Y: np.ndarray, exact: np.ndarray, c_exact: np.ndarray, err_exact: np.ndarray
    ) -> np.ndarray | None:
        """`all_values` by the compiled library (q8.token_values), or None without it. The products are
        the same float32 ones (through the memo); each token's interval is full_value's."""
        if q8.kernel() is None:
            return None
        d = self.basis.hidden_size
        slot = np.full(self.basis.vocab_size, -1, dtype=np.int32)
        slot[exact] = np.arange(len(exact), dtype=np.int32)
        g = float32_gamma(d) * np.linalg.norm(Y[:d], axis=0)
        sum_slack = 1.0 + 4 * self.basis.vocab_size * U64
        return q8.token_values(
            self.products_of(Y),
            self.p,
            self.basis.row_norm,
            self.scale,
            Y[d],
            g,
            self.tprime,
            sum_slack,
            slot,
            c_exact,
            err_exact,
            np.abs(Y).max(axis=0),
        )

    def all_values(
        self,
        Y: np.ndarray,
        exact: np.ndarray | None = None,
        c_exact: np.ndarray | None = None,
        err_exact: np.ndarray | None = None,
        return_products: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Lower bounds of max(value(y, i), value(-y, i)) for every token i of the vocabulary: [m, v]."""
        if exact is None:
            exact = self.head
            c_exact, err_exact, _ = self.exact_products(exact, Y)
        if not return_products:
            compiled = self._compiled_values(Y, exact, c_exact, err_exact)
            if compiled is not None:
                return compiled
        c, err = self.full_products(Y)
        c[exact], err[exact] = c_exact, err_exact
        p = self.p[:, None]
        lo, hi = c - err, c + err
        best = self._values_on(p, lo, hi)
        np.maximum(best, self._values_on(p, -hi, -lo), out=best)  # -y: c_j lies in [-hi_j, -lo_j]
        with np.errstate(divide="ignore", invalid="ignore"):
            out = best / (p * np.abs(Y).max(axis=0)[None, :])
        out[~np.isfinite(out)] = -np.inf
        return (out.T, c) if return_products else out.T
