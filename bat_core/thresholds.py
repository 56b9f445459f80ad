"""Threshold rules that give the base threshold tau of BAT (vectorized over rows of probabilities)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import BatError

RULES = ("eta", "epsilon", "tau")


@dataclass(frozen=True)
class ThresholdRule:
    """A base truncation rule.

    - ``eta``: tau = min(eps, sqrt(eps) * exp(-H(p))), H the entropy in nats (Hewitt et al. 2022).
    - ``epsilon``: tau = eps.
    - ``tau``: a fixed threshold.
    """

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in RULES:
            raise BatError(f"unknown threshold rule {self.kind!r}: use one of {', '.join(RULES)}")
        value = self.value
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise BatError(f"{self.kind} must be a number, got {value!r}")
        if not math.isfinite(float(value)) or not 0.0 < float(value) < 1.0:
            raise BatError(
                f"{self.kind}={value!r} is out of range: it must lie strictly between 0 and 1 "
                "(typical values: eta 0.0009, epsilon 0.0003, tau 0.02)"
            )
        object.__setattr__(self, "value", float(value))

    def probabilities_and_tau(self, logits: np.ndarray) -> tuple[np.ndarray, float]:
        """(softmax(logits) in float64, tau) for one row; the entropy comes from the logits in one
        dot product (H = log S - sum p (z - max z)) instead of a log over the vocabulary."""
        z = np.asarray(logits, dtype=np.float64)
        shifted = z - z.max()
        p = np.exp(shifted)
        total = p.sum()
        p /= total
        if self.kind != "eta":
            return p, self.value
        h = max(math.log(total) - float(p @ shifted), 0.0)
        return p, float(eta_of_entropy(self.value, h))

    def tau(self, probs: np.ndarray) -> np.ndarray | float:
        """Threshold for each row of ``probs`` (shape [v] gives a float, [n, v] gives shape [n])."""
        p = np.asarray(probs, dtype=np.float64)
        if self.kind != "eta":
            return self.value if p.ndim == 1 else np.full(p.shape[0], self.value)
        return eta_threshold(p, self.value)


def entropy(probs: np.ndarray) -> np.ndarray | float:
    """Shannon entropy in nats along the last axis (0 log 0 = 0)."""
    p = np.asarray(probs, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    h = -terms.sum(axis=-1)
    return float(h) if np.ndim(h) == 0 else h


def eta_of_entropy(eps: float, h: np.ndarray | float) -> np.ndarray | float:
    """eta sampling's threshold min(eps, sqrt(eps) exp(-H)) for entropies H in nats (one or an array)."""
    if np.ndim(h) == 0:
        return min(eps, math.sqrt(eps) * math.exp(-float(h)))
    return np.minimum(eps, math.sqrt(eps) * np.exp(-np.asarray(h)))


def eta_threshold(probs: np.ndarray, eps: float) -> np.ndarray | float:
    tau = eta_of_entropy(eps, entropy(probs))
    return float(tau) if np.ndim(tau) == 0 else tau


def truncate_mask(probs: np.ndarray, tau: np.ndarray | float) -> np.ndarray:
    """The plain threshold rule: keep p >= tau, and always the argmax (vectorized over rows)."""
    p = np.asarray(probs, dtype=np.float64)
    t = np.asarray(tau, dtype=np.float64)
    keep = p >= (t[..., None] if t.ndim else t)
    top = np.argmax(p, axis=-1)
    np.put_along_axis(keep, np.asarray(top)[..., None] if p.ndim > 1 else np.array([top]), True, axis=-1)
    return keep


def rule_from(eta: float | None = None, epsilon: float | None = None, tau: float | None = None) -> ThresholdRule:
    """Exactly one of eta / epsilon / tau (default: eta with eps = 0.0009)."""
    given = {k: v for k, v in (("eta", eta), ("epsilon", epsilon), ("tau", tau)) if v is not None}
    if len(given) > 1:
        raise BatError(f"give one threshold rule, not {sorted(given)}: eta=, epsilon= or tau=")
    kind, value = next(iter(given.items())) if given else ("eta", 0.0009)
    try:
        value = float(value)
    except (TypeError, ValueError) as exc:
        raise BatError(f"{kind}={value!r} is not a number") from exc
    return ThresholdRule(kind, value)
