"""Parameter matching (the paper's method): on human text, teacher-forced, the share of human next
tokens each method would reject, and the parameter of each method that rejects a target share.

Methods: eta and epsilon (threshold rules), and BAT on each of them. A threshold rule rejects the
human token t when p_hat_t < tau (the argmax is never rejected). BAT rejects it only when the rule
does and the exact core cannot prove p*_t > 0.

BAT's decision is monotone in tau for a fixed distribution: sigma = 1/(1 - tau) grows with tau, so
the polytope F_t grows too, and an accept (F_t empty) at tau proves an accept at every smaller tau; a
reject (a point of F_t) at tau is a reject at every larger tau. Each position keeps the bracket
(largest proven tau, smallest rejected tau), so a share at a new parameter needs decisions only for
positions whose bracket contains the new tau. A decision the core could not finish in its budget
(fallback) counts as a reject, as it does in generation (sound), and is counted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

import bat_core
from bat_core import BatConfig, BatSolver

RULES = ("eta", "epsilon")
METHODS = ("eta", "epsilon", "bat-eta", "bat-epsilon")
# parameter ranges of the grids (the rules' parameters must lie in (0, 1))
GRID_RANGE = {"eta": (1e-5, 0.95), "epsilon": (1e-5, 0.5)}


def rule_of(method: str) -> str:
    return method.removeprefix("bat-")


def tau_of(rule: str, theta: float, entropy: np.ndarray) -> np.ndarray:
    """The threshold of each position under `rule` with parameter `theta`."""
    if rule == "epsilon":
        return np.full(entropy.shape, float(theta))
    return np.minimum(theta, math.sqrt(theta) * np.exp(-entropy))


@dataclass
class Positions:
    """Teacher-forced human next tokens: their probability, the entropy of the step, and BAT brackets."""

    passage: np.ndarray  # passage index of each position
    token: np.ndarray  # the human token
    p: np.ndarray  # p_hat of the human token
    entropy: np.ndarray  # of p_hat, nats
    is_argmax: np.ndarray
    accept_tau: np.ndarray  # BAT proved the token at this tau (so at every smaller one); 0 = none yet
    reject_tau: np.ndarray  # BAT rejected (or fell back) at this tau (so at every larger one); inf = none
    fallback: np.ndarray  # True when reject_tau comes from a fallback (budget spent), not from a feasible point
    logits: dict[int, np.ndarray] = field(default_factory=dict)  # raw logits of each position

    @classmethod
    def empty(cls) -> Positions:
        z = np.zeros(0)
        return cls(z.astype(int), z.astype(int), z, z, z.astype(bool), z, z, z.astype(bool))

    def __len__(self) -> int:
        return len(self.p)

    def threshold_rejects(self, tau: np.ndarray) -> np.ndarray:
        return (self.p < tau) & ~self.is_argmax

    def bat_unknown(self, tau: np.ndarray) -> np.ndarray:
        return self.threshold_rejects(tau) & (tau > self.accept_tau) & (tau < self.reject_tau)

    def bat_rejects(self, tau: np.ndarray) -> np.ndarray:
        """Needs no unknown position left at `tau` (see Decider.resolve)."""
        return self.threshold_rejects(tau) & (tau >= self.reject_tau)

    def brackets(self) -> dict:
        return {
            "accept_tau": self.accept_tau.tolist(),
            "reject_tau": [None if math.isinf(t) else t for t in self.reject_tau],
            "fallback": self.fallback.tolist(),
        }


def teacher_force(llm, passages, max_positions: int, progress: Callable[[str], None] | None = None) -> Positions:
    """Run the model over each prefix + human continuation; for the first `max_positions` continuation
    tokens of each passage record the human token's probability and the step's entropy, and keep the
    logits (decisions and the accepted-set analysis need them; ~1 MB per position for Gemma 3)."""
    from bat_llamacpp.trajectories import last_logits

    rows: dict[str, list] = {k: [] for k in ("passage", "token", "p", "entropy", "is_argmax")}
    logits: dict[int, np.ndarray] = {}
    for index, passage in enumerate(passages):
        prefix = llm.tokenize(passage.prefix.encode("utf-8"), add_bos=True)
        full = llm.tokenize((passage.prefix + " " + passage.continuation).encode("utf-8"), add_bos=True)
        if full[: len(prefix)] != prefix:  # the prefix's last token merged with the continuation: split there
            prefix = prefix[:-1]
        target = full[len(prefix) : len(prefix) + max_positions]
        llm.reset()
        llm.eval(prefix)
        for token in target:
            z = last_logits(llm)
            shifted = z.astype(np.float64) - float(z.max())
            e = np.exp(shifted)
            total = e.sum()
            p = e / total
            h = max(math.log(total) - float(p @ shifted), 0.0)
            argmax = int(np.argmax(z))
            logits[len(rows["p"])] = z
            for key, value in zip(rows, (index, token, p[token], h, token == argmax)):
                rows[key].append(value)
            llm.eval([token])
        if progress:
            progress(f"teacher forcing {index + 1}/{len(passages)} passages, {len(rows['p'])} positions")
    n = len(rows["p"])
    return Positions(
        np.array(rows["passage"], dtype=int),
        np.array(rows["token"], dtype=int),
        np.array(rows["p"], dtype=float),
        np.array(rows["entropy"], dtype=float),
        np.array(rows["is_argmax"], dtype=bool),
        np.zeros(n),
        np.full(n, np.inf),
        np.zeros(n, dtype=bool),
        logits,
    )


class Decider:
    """Exact BAT decisions on teacher-forced positions, one warm solver per passage."""

    def __init__(self, basis: bat_core.Basis, positions: Positions, time_budget: float) -> None:
        self.basis = basis
        self.positions = positions
        self.config = BatConfig.for_generation(time_budget)  # the decisions generation makes
        self.solvers: dict[int, BatSolver] = {}
        self.decisions = 0
        self.fallbacks = 0
        self.seconds = 0.0

    def resolve(self, tau: np.ndarray) -> None:
        """Decide every position whose BAT status at `tau` (one per position) is not known yet."""
        pos = self.positions
        for i in np.flatnonzero(pos.bat_unknown(tau)):
            solver = self.solvers.setdefault(int(pos.passage[i]), BatSolver(self.basis, self.config))
            start = time.perf_counter()
            step = solver.new_step(pos.logits[int(i)], float(tau[i]))
            decision = solver.decide(step, [int(pos.token[i])])[0]
            self.seconds += time.perf_counter() - start
            self.decisions += 1
            if decision.accepted:
                pos.accept_tau[i] = max(pos.accept_tau[i], tau[i])
            elif tau[i] < pos.reject_tau[i]:
                fell_back = decision.method == "fallback"
                self.fallbacks += fell_back
                pos.reject_tau[i], pos.fallback[i] = tau[i], fell_back


class Matcher:
    """Rejection shares of human tokens, and matched parameters, for the four methods."""

    def __init__(self, positions: Positions, decider: Decider) -> None:
        self.positions = positions
        self.decider = decider

    def share(self, method: str, theta: float) -> float:
        return self.shares(method, theta)[0]

    def shares(self, method: str, theta: float) -> tuple[float, float]:
        """(share of human tokens rejected, share rejected only because the core fell back)."""
        pos = self.positions
        tau = tau_of(rule_of(method), theta, pos.entropy)
        if not method.startswith("bat-"):
            return float(pos.threshold_rejects(tau).mean()), 0.0
        self.decider.resolve(tau)
        rejects = pos.bat_rejects(tau)
        return float(rejects.mean()), float((rejects & pos.fallback).mean())

    def curve(self, method: str, thetas: np.ndarray) -> list[tuple[float, float]]:
        """`shares` over a grid; BAT grids are resolved middle-first so that brackets narrow fast."""
        shares: dict[int, tuple[float, float]] = {}
        for k in bisection_order(len(thetas)):
            shares[k] = self.shares(method, float(thetas[k]))
        return [shares[k] for k in range(len(thetas))]

    def match(self, method: str, target: float, tolerance: float, iterations: int = 24) -> dict:
        """The parameter whose rejection share is closest to `target` (bisection in log parameter;
        the share never decreases with the parameter). A share moves in steps of one position, so
        the match counts as within tolerance when it is within `tolerance` + 1/positions."""
        lo, hi = (math.log(x) for x in GRID_RANGE[rule_of(method)])
        best = None
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            share = self.share(method, math.exp(mid))
            if best is None or abs(share - target) < abs(best[1] - target):
                best = (math.exp(mid), share)
            if abs(share - target) <= tolerance / 4:
                break
            lo, hi = (mid, hi) if share < target else (lo, mid)
        top = GRID_RANGE[rule_of(method)][1]
        reachable = self.share(method, top) >= target - tolerance
        fallback_share = self.shares(method, best[0])[1]
        return {
            "method": method,
            "target": target,
            "parameter": best[0],
            "share": best[1],
            "fallback_share": fallback_share,
            "within_tolerance": abs(best[1] - target) <= tolerance + 1 / len(self.positions),
            "reachable": reachable,
        }


def bisection_order(n: int) -> list[int]:
    """Indices 0..n-1, middle first, then the middles of each half, and so on."""
    order, spans = [], [(0, n - 1)]
    while spans:
        lo, hi = spans.pop(0)
        if lo > hi:
            continue
        mid = (lo + hi) // 2
        order.append(mid)
        spans += [(lo, mid - 1), (mid + 1, hi)]
    return order
