"""The per-request decision engine: the stages of the exact path, cheapest first (docs/core.md).

`BatSolver` answers "may token i be sampled?" for candidates of one distribution, exactly: every accept
carries an accept certificate (y, verified over the whole vocabulary with rigorous float bounds), every
reject that is not a counted fallback carries a feasible point.

1. shortcuts: p_i >= tau accepts, p_i below float64's resolution rejects, a feasible point found earlier in
   the step rejects every token it zeroes;
2. the certificate search (search.py: least squares, then reweighted least squares); `time_budget=0` ends here;
3. the request's recent certificates, then the proof search (proofs.py: feasible points and the reweighted
   regression on working sets of the top of the distribution);
4. the LPs (lp.py) under the work budget: reduced to the top singular directions of W (accepts only), then
   the exact restricted LP with column generation on the request's warm HiGHS model;
5. what none proves within its budget: reject, counted as a fallback with its reason.

On a reduced basis (`Basis.reduced`, constraint reduction) every accept is proven again on the full
W: its certificate, lifted to R^(d+1), must pass the same check there, or the token is rejected.
Accept certificates are therefore always vectors for [W, 1] of the full model.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

import numpy as np

from .basis import Basis
from .certify import ProductMemo, Step
from .config import BatConfig
from .decisions import AcceptCertificate, BatStats, Clock, Decision, RejectCertificate
from .errors import BatError
from .lp import LinearPrograms
from .proofs import ProofSearch
from .search import CertificateSearch
from .thresholds import ThresholdRule

__all__ = ["AcceptCertificate", "BatSolver", "BatStats", "Decision", "RejectCertificate"]


_live: weakref.WeakSet = weakref.WeakSet()


def live_solvers() -> int:
    """BatSolver objects alive in this process (one per request, with its products and certificates): for
    leak checks."""
    return len(_live)


class BatSolver:
    """Exact BAT decisions for one request: its stages (certificate search, proof search, LPs, each with the
    state it keeps across candidates and steps) and its statistics."""

    def __init__(self, basis: Basis, config: BatConfig | None = None) -> None:
        _live.add(self)
        self.basis = basis
        self.config = config or BatConfig()
        self.stats = BatStats()
        self._clock = Clock()
        self._certificates = CertificateSearch(self.config, self.stats)
        self._proofs = ProofSearch(self.config, self.stats, self._clock, self._certificates)
        self._lps = LinearPrograms(basis, self.config, self.stats, self._clock, self._certificates)
        self._parent_step: tuple[Step, Step] | None = None  # (step, the same distribution on the full W)
        # products over the vocabulary, kept across steps: the recent certificates' and the last few checks'
        self._products = ProductMemo(basis, capacity=self.config.cache_size + 2)

    # ------------------------------------------------------------------ steps
    def new_step(self, logits: Any, tau: Any) -> Step:
        """Prepare one distribution (softmax, head) for decisions; call once per generated token.

        `tau`: a number in (0, 1), or a ThresholdRule (its tau is computed from this distribution)."""
        if not isinstance(tau, ThresholdRule) and not (
            isinstance(tau, (float, int, np.floating)) and 0.0 < float(tau) < 1.0
        ):
            raise BatError(f"tau={tau!r} must lie strictly between 0 and 1")
        step = Step.build(self.basis, logits, tau, head_size=self.config.head_size)
        step.products = self._products
        self._lps.step_id += 1
        self._certificates.new_step()
        self._proofs.new_step()
        self.stats.steps += 1
        return step

    def cached_certificates(self) -> list[np.ndarray]:
        """The request's recent accept certificates (most recent first), as vectors for the full [W, 1]."""
        return [self._lifted(y) for y in self._certificates.recent]

    def forget_certificates(self) -> None:
        """Drop the recent certificates, so that later decisions do not depend on earlier steps."""
        self._certificates.recent.clear()
        self._products.clear()

    def proven_tokens(self, step: Step, Y: np.ndarray) -> np.ndarray:
        """The tokens that some column of Y (certificates for the full [W, 1]) proves: bool, length v."""
        step = self._verifying_step(step)
        tol = self.config.tol * step.vocabulary_tolerance_scale
        return (step.all_values(Y) > tol[None, :]).any(axis=0)

    # ------------------------------------------------------------------ reduced bases
    def _lifted(self, y: np.ndarray) -> np.ndarray:
        """A certificate of this solver's basis as one for the full [W, 1] (the same c = A y up to rounding)."""
        if self.basis.parent is None:
            return y
        return np.append(self.basis.directions @ y[:-1], y[-1])

    def _verifying_step(self, step: Step) -> Step:
        """The step on the full W that proves this solver's accepts (the step itself unless the basis is reduced)."""
        if self.basis.parent is None:
            return step
        if self._parent_step is None or self._parent_step[0] is not step:
            full = Step(self.basis.parent, step.p, step.tau, step.scale, step.head_size)
            self._parent_step = (step, full)
        return self._parent_step[1]

    def _proven_on_full_matrix(self, step: Step, found: dict[int, Decision]) -> dict[int, Decision]:
        """Accepts of a reduced basis, proven again on the full W (its rounded product W V_k proves nothing of
        W itself); what fails there is rejected, as constraint reduction may reject more, never accept more."""
        full = self._verifying_step(step)
        out = {}
        for t, decision in found.items():
            if decision.accepted:
                y = self._lifted(decision.certificate.y)
                tol = self.config.tol * float(full.tolerance_scale(np.array([t]))[0])
                value = full.full_value(y, t, enough=tol)
                decision = (
                    Decision(t, True, decision.method, AcceptCertificate(t, y, value))
                    if value > tol
                    else self.stats.fallback(t, "not proven on the full matrix")
                )
            out[t] = decision
        return out

    # ------------------------------------------------------------------ decisions
    def decide(self, step: Step, candidates: Any, deadline: float | None = None) -> list[Decision]:
        """Exact decision for each candidate token of `step` (in the order given).

        `deadline` (a time.perf_counter() value) caps the work below the per-decision clock."""
        start = time.perf_counter()
        products = step.vocabulary_products
        own = start + self.config.time_budget
        self._clock.deadline = own if deadline is None else min(deadline, own)
        tokens = checked_candidates(candidates, self.basis.vocab_size)
        decisions: dict[int, Decision] = {}
        pending = []
        for t in np.unique(tokens):
            t = int(t)
            if step.p[t] >= step.tau:
                decisions[t] = Decision(t, True, "threshold")
            elif step.p[t] < self.config.min_probability:
                decisions[t] = Decision(t, False, "resolution")
            elif (stored := self._proofs.stored_reject(step, t)) is not None:
                decisions[t] = stored
            else:
                pending.append(t)
        if pending:
            found = self._decide_below_tau(step, np.array(pending))
            decisions.update(found if self.basis.parent is None else self._proven_on_full_matrix(step, found))
        out = [decisions[int(t)] for t in tokens]
        self.stats.vocabulary_products += step.vocabulary_products - products
        self.stats.count(out, time.perf_counter() - start)
        return out

    def record_shortcut(self, decision: Decision) -> Decision:
        """Count a decision the caller settled by the threshold (p >= tau) without `decide`."""
        self.stats.count([decision], 0.0)
        return decision

    def _decide_below_tau(self, step: Step, pending: np.ndarray) -> dict[int, Decision]:
        """The stages in order (docs/core.md, "The exact path"), each on what the previous ones left."""
        cfg, clock, timing = self.config, self._clock, self.stats.timing
        out: dict[int, Decision] = {}
        with timing("certificate-search"):
            pending = self._certificates.prove_by_least_squares(step, pending, out)
        if not len(pending) or cfg.time_budget == 0:
            return {**out, **{int(t): self.stats.fallback(int(t), "certificate search only") for t in pending}}
        iterations_left = {int(t): int(cfg.lp_iterations) for t in pending}  # simplex iterations: the LPs' budget
        # recent certificates only here: ranked on every decision they cost time and proved nothing more
        if clock.left():
            with timing("cache"):
                pending = self._certificates.prove_by_recent(step, pending, out)
        if len(pending) and clock.left():
            pending = self._proofs.prove(step, pending, out)  # times its regression and point searches
        for k in cfg.search_levels:
            if not len(pending) or k >= self.basis.hidden_size or not clock.left():
                break
            with timing("search-lp"):
                Y = self._lps.reduced_accepts(step, pending, k, iterations_left)
                if Y is not None:
                    pending = self._certificates.prove_by(step, pending, Y, [f"search-{k}"] * Y.shape[1], out)
        for t in (int(t) for t in pending):
            with timing("lp"):
                out[t] = self._lps.exact(step, t, iterations_left)
            if out[t].method == "lp" and not out[t].accepted:
                self._proofs.points.append(("lp", out[t].certificate))  # it may reject the step's later candidates too
        return out


def checked_candidates(candidates: Any, vocab_size: int) -> np.ndarray:
    """Candidate token ids as int64, or a BatError saying what is wrong with them."""
    tokens = np.atleast_1d(np.asarray(candidates))
    if tokens.size == 0:
        raise BatError("no candidate tokens given: pass at least one token id")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise BatError(f"candidate token ids must be integers, got dtype {tokens.dtype}")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise BatError(f"candidate token ids must lie in [0, {vocab_size}); got {tokens.min()}..{tokens.max()}")
    return tokens.astype(np.int64)
