"""Certificate checks written independently of bat_core: dense float64 numpy, no shared helpers."""

from __future__ import annotations

import numpy as np


def softmax64(logits: np.ndarray, v: int) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)[:v]
    e = np.exp(z - z.max())
    return e / e.sum()


def augmented(W: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    W64 = np.asarray(W, dtype=np.float64)
    if scale is not None:
        W64 = W64 * scale[:, None]
    return np.hstack([W64, np.ones((W64.shape[0], 1))])


def accept_value(A: np.ndarray, p: np.ndarray, tau: float, token: int, y: np.ndarray) -> float:
    """max over +-y of (p_i c_i - sum_{j != i} p_j rho(c_j)) / (p_i ||y||_inf), c = A y."""
    tprime = tau / (1.0 - tau)
    best = -np.inf
    for sign in (1.0, -1.0):
        c = sign * (A @ y)
        cost = np.where(c > 0, tprime * c, -c) * p
        others = cost.sum() - cost[token]
        best = max(best, (p[token] * c[token] - others) / (p[token] * np.abs(y).max()))
    return best


def check_accept(A: np.ndarray, p: np.ndarray, tau: float, token: int, y: np.ndarray, tol: float) -> None:
    value = accept_value(A, p, tau, token, y)
    limit = tol * np.abs(A[token]).sum()
    assert value > limit * (1 - 1e-6), f"accept certificate for {token} fails: value {value} <= {limit}"


def check_reject(A: np.ndarray, p: np.ndarray, tau: float, token: int, support, q, tol: float) -> None:
    sigma = 1.0 / (1.0 - tau)
    q_full = np.zeros_like(p)
    q_full[np.asarray(support)] = np.asarray(q)
    new = p + q_full
    assert abs(new[token]) <= 1e-12, f"reject point gives token {token} mass {new[token]}"
    assert (new >= -1e-12 * p - 1e-300).all(), "reject point has negative mass"
    assert (new <= sigma * p * (1 + 1e-9) + 1e-300).all(), "reject point exceeds sigma * p_hat"
    residual = np.abs(A.T @ q_full).sum()
    limit = tol * p[token] * np.abs(A[token]).sum()
    assert residual <= limit * (1 + 1e-6) + 1e-15, f"reject point residual {residual} > {limit}"


def exact_product_and_rounding_bound(W: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W y in float64, and the float32 rounding bound gamma_(d+4) ||w_j|| ||y|| that the certificates
    rely on for any product over the vocabulary (numpy's, the compiled int8 one, torch's)."""
    W64, y64 = W.astype(np.float64), y.astype(np.float64)
    n = W.shape[1] + 4
    gamma = n * 2.0**-24 / (1 - n * 2.0**-24)
    return W64 @ y64, gamma * np.linalg.norm(W64, axis=1) * np.linalg.norm(y64)
