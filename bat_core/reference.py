"""The slow, obviously correct exact decision: one dense LP over the whole vocabulary, from scratch.

For tests and benchmarks only (seconds per decision on a real model). For candidate i it solves

    delta = min ||r||_1  s.t.  sum_{j != i} x_j a_j + r = a_i,   -p_j/p_i <= x_j <= tau' p_j/p_i

(the system in q of docs/method.md, section 3, divided by p_i; a_j = row j of [W, 1]). delta is the L1
distance between the right-hand side and what the feasible box can reach: F_i is empty iff delta > 0.
bat-sampling's decision rule is: accept iff delta > tol * ||a_i||_1 (decisions inside the solver's
tolerance are rejects). The optimal row duals y (||y||_inf <= 1) are an accept certificate and the
optimal x a reject certificate.

To save time it first solves the plain feasibility problem (phase 1, as the paper states F_i) and takes
its answer when the certificate it returns checks out in float64 over the whole vocabulary (a feasible
x with residual <= tol: reject; a Farkas ray with value > tol * ||a_i||_1: accept). Anything else
falls through to the L1 problem above, whose optimum always exists.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import highspy
import numpy as np

from .basis import Basis
from .errors import BatError
from .highs import new_highs

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
    basis: Basis, logits: Any, token: int, tau: float, tol: float = DEFAULT_TOL, time_limit: float = float("inf")
) -> ReferenceDecision:
    """Exact decision for one token by a dense full-vocabulary LP (no shortcut but p_i >= tau).

    Past `time_limit` seconds (per LP) the status says so and `accepted` is False: undecided."""
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
    ratio = p[others] / p[token]
    block = np.empty((n_x, n_rows))
    block[:, :d] = basis.W[others].astype(np.float64) * s[others][:, None]
    block[:, d] = 1.0
    a_l1 = float(np.abs(a_i).sum())

    # 1. the feasibility problem as the paper states it (phase 1 only: the fast way to an answer)
    answer = _feasibility_answer(block, ratio, tprime, a_i, tol, time_limit)
    if answer is not None:
        accepted, relative, y, x, status = answer
        return _decision(token, accepted, relative, y, x, others, v, start, status)
    # 2. otherwise the L1 distance itself, which has an optimum whatever the data
    h = _dense_model(block, ratio, tprime, a_i, residual_columns=True, time_limit=time_limit)
    del block
    h.run()
    status = h.modelStatusToString(h.getModelStatus())
    seconds = time.perf_counter() - start
    if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        return ReferenceDecision(token, False, float("nan"), None, None, seconds, status)
    solution = h.getSolution()
    relative = float(h.getInfo().objective_function_value) / a_l1
    x = np.asarray(solution.col_value)[:n_x]
    y = np.asarray(solution.row_dual, dtype=np.float64)
    return _decision(token, relative > tol, relative, y, x, others, v, start, status)


def _feasibility_answer(block, ratio, tprime, a_i, tol: float, time_limit: float) -> tuple | None:
    """(accepted, relative, y, x, status) from the phase-1 feasibility LP, acted on only through a point or a
    dual ray checked here in float64 over the whole vocabulary; None where it settles nothing."""
    a_l1 = float(np.abs(a_i).sum())
    h = _dense_model(block, ratio, tprime, a_i, residual_columns=False, time_limit=time_limit)
    h.run()
    status = h.getModelStatus()
    if status == highspy.HighsModelStatus.kOptimal:
        x = np.asarray(h.getSolution().col_value)
        residual = float(np.abs(block.T @ x - a_i).sum()) / a_l1
        inside = bool(np.all(x >= -ratio * (1 + 1e-9) - 1e-12) and np.all(x <= tprime * ratio * (1 + 1e-9) + 1e-12))
        if residual <= tol and inside:
            return False, residual, None, x, "Optimal"
    elif status == highspy.HighsModelStatus.kTimeLimit:
        return False, float("nan"), None, None, "Time limit reached"
    elif status == highspy.HighsModelStatus.kInfeasible:
        has_ray, ray = h.getDualRay()[1:]
        if has_ray:
            y = np.asarray(ray, dtype=np.float64)
            y = y / max(np.abs(y).max(), 1e-300)
            value = _value(block, ratio, tprime, a_i, y)
            if value > tol * a_l1:
                return True, value / a_l1, y, None, "Optimal"
    return None


def _value(block, ratio, tprime, a_i, y) -> float:
    """max over +-y of a_i.y - sum_j ratio_j rho(a_j.y) (the L1 dual objective)."""
    best = -np.inf
    for sign in (1.0, -1.0):
        c = sign * (block @ y)
        best = max(best, sign * float(a_i @ y) - float(ratio @ np.where(c > 0, tprime * c, -c)))
    return best


def _decision(token, accepted, relative, y, x, others, v, start, status) -> ReferenceDecision:
    x_full = None
    if x is not None:
        x_full = np.empty(v)
        x_full[others] = x
        x_full[token] = -1.0
    return ReferenceDecision(token, accepted, relative, y, x_full, time.perf_counter() - start, status)


def _dense_model(block, ratio, tprime, a_i, residual_columns: bool, time_limit: float) -> highspy.Highs:
    n_x, n_rows = block.shape
    n_r = 2 * n_rows if residual_columns else 0
    h = new_highs()
    h.setOptionValue("presolve", "off")  # measured 2x faster on SmolLM2's dense problem
    if np.isfinite(time_limit):
        h.setOptionValue("time_limit", float(time_limit))
    lp = highspy.HighsLp()
    lp.num_row_ = n_rows
    lp.num_col_ = n_x + n_r
    inf = highspy.kHighsInf
    lp.col_cost_ = np.concatenate([np.zeros(n_x), np.ones(n_r)])
    lp.col_lower_ = np.concatenate([-ratio, np.zeros(n_r)])
    lp.col_upper_ = np.concatenate([tprime * ratio, np.full(n_r, inf)])
    lp.row_lower_ = a_i
    lp.row_upper_ = a_i
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    starts = np.concatenate([np.arange(n_x) * n_rows, n_x * n_rows + np.arange(n_r + 1)])
    lp.a_matrix_.start_ = starts.astype(np.int32)
    eye = np.arange(n_rows, dtype=np.int32)
    residual_index = [eye, eye] if residual_columns else []
    residual_value = [np.ones(n_rows), -np.ones(n_rows)] if residual_columns else []
    lp.a_matrix_.index_ = np.concatenate([np.tile(eye, n_x)] + residual_index)
    lp.a_matrix_.value_ = np.concatenate([block.ravel()] + residual_value)
    h.passModel(lp)
    return h


def reference_decide_with_deadline(
    basis: Basis, logits: Any, token: int, tau: float, seconds: float, tol: float = DEFAULT_TOL
) -> ReferenceDecision | None:
    """reference_decide in a forked child process, killed after `seconds` of wall time (HiGHS does not
    always honour its own time limit inside a dense phase 1). None when it ran out of time. POSIX only."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)

    def work() -> None:
        sender.send(reference_decide(basis, logits, token, tau, tol=tol, time_limit=seconds))

    child = ctx.Process(target=work, daemon=True)
    child.start()
    result = receiver.recv() if receiver.poll(seconds + 5.0) else None
    child.kill()
    child.join()
    if result is None or result.status == "Time limit reached":
        return None
    return result
