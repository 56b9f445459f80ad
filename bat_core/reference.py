"""The slow, obviously correct exact decision: one dense LP over the whole vocabulary, from scratch.

For tests and benchmarks only (seconds per decision on a real model). For candidate i it solves

    delta = min ||r||_1  s.t.  sum_{j != i} x_j a_j + r = a_i,   -p_j/p_i <= x_j <= tau' p_j/p_i

(the q-space system of METHOD.md section 3 divided by p_i; a_j = row j of [W, 1]). delta is the L1
distance between the right-hand side and what the feasible box can reach: F_i is empty iff delta > 0.
bat-sampling's decision rule is: accept iff delta > tol * ||a_i||_1 (decisions inside the solver's
tolerance are rejects). The optimal row duals y (||y||_inf <= 1) are an accept certificate and the
optimal x a reject certificate.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import highspy
import numpy as np

from .basis import Basis
from .errors import BatError

DEFAULT_TOL = 1e-6


@dataclass
class ReferenceDecision:
    token: int
    accepted: bool
    relative_infeasibility: float  # delta / ||a_i||_1; accept iff > tol
    y: np.ndarray | None  # row duals: accept certificate candidate
    x: np.ndarray | None  # q / p_i for every token (x_i = -1): reject certificate candidate
    seconds: float
    status: str


def reference_decide(
    basis: Basis, logits: Any, token: int, tau: float, tol: float = DEFAULT_TOL
) -> ReferenceDecision:
    """Exact decision for one token by a dense full-vocabulary LP (no shortcut but p_i >= tau)."""
    start = time.perf_counter()
    z = basis.checked_logits(logits)
    p = np.exp(z - z.max())
    p /= p.sum()
    v, d = basis.vocab_size, basis.hidden_size
    if not 0 <= token < v:
        raise BatError(f"token {token} is outside the vocabulary [0, {v})")
    if p[token] >= tau:
        return ReferenceDecision(token, True, np.inf, None, None, time.perf_counter() - start, "threshold")
    scale = basis.row_scale(z)
    s = np.ones(v) if scale is None else scale
    tprime = tau / (1.0 - tau)
    others = np.delete(np.arange(v), token)
    a_i = np.append(s[token] * basis.W[token].astype(np.float64), 1.0)

    n_rows = d + 1
    n_x = v - 1
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    lp = highspy.HighsLp()
    lp.num_row_ = n_rows
    lp.num_col_ = n_x + 2 * n_rows
    ratio = p[others] / p[token]
    inf = highspy.kHighsInf
    lp.col_cost_ = np.concatenate([np.zeros(n_x), np.ones(2 * n_rows)])
    lp.col_lower_ = np.concatenate([-ratio, np.zeros(2 * n_rows)])
    lp.col_upper_ = np.concatenate([tprime * ratio, np.full(2 * n_rows, inf)])
    lp.row_lower_ = a_i
    lp.row_upper_ = a_i
    # column-wise dense block for the x columns, then +I and -I for the residual columns
    block = np.empty((n_x, n_rows))
    block[:, :d] = basis.W[others].astype(np.float64) * s[others][:, None]
    block[:, d] = 1.0
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    starts = np.concatenate([np.arange(n_x) * n_rows, n_x * n_rows + np.arange(2 * n_rows + 1)])
    lp.a_matrix_.start_ = starts.astype(np.int32)
    eye = np.arange(n_rows, dtype=np.int32)
    lp.a_matrix_.index_ = np.concatenate([np.tile(eye, n_x), eye, eye])
    lp.a_matrix_.value_ = np.concatenate([block.ravel(), np.ones(n_rows), -np.ones(n_rows)])
    del block
    h.passModel(lp)
    h.run()
    status = h.modelStatusToString(h.getModelStatus())
    seconds = time.perf_counter() - start
    if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        return ReferenceDecision(token, False, float("nan"), None, None, seconds, status)
    solution = h.getSolution()
    delta = float(h.getInfo().objective_function_value)
    relative = delta / float(np.abs(a_i).sum())
    x = np.empty(v)
    x[others] = np.asarray(solution.col_value)[:n_x]
    x[token] = -1.0
    y = np.asarray(solution.row_dual, dtype=np.float64)
    return ReferenceDecision(token, relative > tol, relative, y, x, seconds, status)
