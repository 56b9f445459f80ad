"""The proof search of the exact path: proofs by least squares over the top of the distribution (feasible
points in feasible.py, the reweighted regression in regression.py), cheapest first, for the candidates that
the certificate search leaves (docs/core.md)."""

from __future__ import annotations

import numpy as np

from .certify import Step
from .config import BatConfig
from .decisions import AcceptCertificate, BatStats, Clock, Decision, RejectCertificate
from .feasible import WorkingSet, feasible_point
from .regression import RegressionSearch
from .search import CertificateSearch


class ProofSearch:
    """Per request: feasible points (rejects) and the reweighted regression (accepts) on the step's working
    sets, and the feasible points found in the current step (a point rejects every token it zeroes)."""

    def __init__(self, config: BatConfig, stats: BatStats, clock: Clock, certificates: CertificateSearch) -> None:
        self.config, self.stats, self.clock, self.certificates = config, stats, clock, certificates
        # this step's points with the method that found them: "certificate" (this search) or "lp" (the exact LP)
        self.points: list[tuple[str, RejectCertificate]] = []
        self._working: dict[int, WorkingSet] = {}

    def new_step(self) -> None:
        self.points = []
        self._working = {}  # the previous step's factorizations can go

    def stored_reject(self, step: Step, token: int) -> Decision | None:
        """A reject of `token` by a feasible point found earlier in this step that gives it zero mass (the
        decision's method is that of the stage that found the point)."""
        limit = self.config.tol * step.p[token] * float(step.tolerance_scale(np.array([token]))[0])
        for method, point in self.points:
            if point.residual_l1 <= limit and token in set(point.zero_tokens(step.p).tolist()):
                return Decision(
                    token, False, method, RejectCertificate(token, point.support, point.q, point.residual_l1)
                )
        return None

    def prove(self, step: Step, pending: np.ndarray, out: dict[int, Decision]) -> np.ndarray:
        """Record in `out` what this search proves, token by token, cheapest first: the regression's first
        iterate (least squares on its first working set); then, for a likely accept, the regression's other
        iterations before the feasible-point searches, and for a likely reject (the first iterate's cost
        ratio above point_first_ratio / sqrt(tau')) the reverse; last, a feasible point on the largest working
        set (point_final_columns). Return the tokens still pending."""
        cfg = self.config
        left = []
        sizes = list(cfg.point_columns) if cfg.point_iterations else []
        for t in (int(t) for t in pending):
            regression = decision = None
            if cfg.regression_iterations:
                with self.stats.timing("regression"):
                    working = self._working_set(step, cfg.regression_start)
                    regression = RegressionSearch(working, t, cfg.tol, cfg.regression_grow, cfg.regression_columns)
                decision = self._regression(regression, 1)
            likely_reject = regression is None or regression.cost_ratio * np.sqrt(step.tprime) > cfg.point_first_ratio
            if decision is None and likely_reject:
                decision = self._feasible_point(step, t, sizes)
            if decision is None and regression is not None:
                decision = self._regression(regression, cfg.regression_iterations - regression.iterations)
            if decision is None and not likely_reject:
                decision = self._feasible_point(step, t, sizes)
            if decision is None and cfg.point_iterations and cfg.point_final_columns not in (0, *sizes):
                decision = self._feasible_point(step, t, [cfg.point_final_columns])
            if decision is None:
                left.append(t)
            else:
                out[t] = decision
        return np.array(left, dtype=np.int64)

    def _regression(self, search: RegressionSearch, iterations: int) -> Decision | None:
        """An accept by `iterations` more rounds of the reweighted regression, or None."""
        with self.stats.timing("regression"):
            found = search.run(iterations, self.clock.deadline)
        if found is None:
            return None
        self.certificates.remember(found[0])
        self.stats.accepted_by("regression")
        return Decision(search.token, True, "certificate", AcceptCertificate(search.token, *found))

    def _feasible_point(self, step: Step, token: int, sizes: list[int]) -> Decision | None:
        """A reject by a feasible point on the working sets of `sizes` tokens in turn, or an accept that a
        search's dual iterate proves on the way (feasible.py), or None."""
        for columns in sizes:
            if not self.clock.left():
                return None
            with self.stats.timing("point-search"):
                found = feasible_point(
                    self._working_set(step, columns), token, self.config.tol, self.config.point_iterations
                )
            if isinstance(found, AcceptCertificate):
                self.certificates.remember(found.y)
                self.stats.accepted_by("point-search")
                return Decision(token, True, "certificate", found)
            if found is not None:
                self.points.append(("certificate", found))
                self.stats.rejected_by_point += 1
                return Decision(token, False, "certificate", found)
        return None

    def _working_set(self, step: Step, columns: int) -> WorkingSet:
        """The step's working set of `columns` tokens, built once per step (shared by the searches)."""
        working = self._working.get(columns)
        if working is None or working.step is not step:
            working = self._working[columns] = WorkingSet(step, columns)
        return working
