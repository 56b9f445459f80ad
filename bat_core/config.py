"""The decision engine's knobs: what a user may turn, with the reason for each default (docs/core.md
has the measurements behind them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import BatError

GENERATION_TIME_BUDGET = 10.0  # the adapters' clock per decision: a safety net, as the work budgets end decisions first


@dataclass
class BatConfig:
    """Knobs of the decision engine. Defaults suit a 2-core CPU and vocabularies of 50k-260k tokens."""

    # relative infeasibility at or below which a decision is a reject (the solver's tolerance band)
    tol: float = 1e-6
    # seconds per decision, a safety net (a counted "time budget" fallback; a seed's text may then depend on load);
    # 0: certificate search only
    time_budget: float = 2.0
    # dual simplex iterations per decision over all its LPs: the LPs' deterministic budget
    lp_iterations: int = 500
    # tokens whose products are exact float64: the head carries most of a value, the rest is bounded
    head_size: int = 1024
    # tokens weighted in the least-squares certificate search: fewer loses accepts, more finds no more
    lsq_head: int = 128
    # reweighted least-squares iterations per candidate (0: plain least squares only)
    lsq_refine: int = 3
    # singular directions of the search LPs, small LPs that prove some accepts cheaply (() turns them off)
    search_levels: tuple[int, ...] = (32, 128)
    # initial tokens in a search LP, and its column-generation rounds
    search_columns: int = 256
    search_rounds: int = 4
    # the exact LP: initial working set (larger sets were slower), tokens added per round, rounds before a fallback
    lp_columns: int = 128
    lp_grow: int = 256
    lp_max_rounds: int = 12
    # working sets of the feasible-point search, tried in turn
    point_columns: tuple[int, ...] = (2048, 8192)
    # the working set of a last feasible-point search, after the regression and the searches above (0: none):
    # it proves rejects that need more of the tail, at a second or more each, so it runs only when all else failed
    point_final_columns: int = 32768
    # Newton iterations of that search per working set (0 turns it off); most points take 0-6
    point_iterations: int = 24
    # reweighted-regression iterations with column generation, the hard accepts' proof (0: off)
    regression_iterations: int = 48
    # the regression's first cost ratio (sum_{j != i} p_j rho(c_j) / p_i c_i) above which the feasible-point
    # searches run before its other iterations, times 1 / sqrt(tau'): the first iterate is further from the
    # optimum the smaller tau' is (on real hard candidates accepts stayed at or below 3.1 at tau 0.1, rejects above 3.8)
    point_first_ratio: float = 1.0
    # the regression's first working set (the most probable tokens), the tokens joining it per iteration, and its
    # largest: smaller sets that grow slowly cost less per iteration than they add iterations
    regression_start: int = 1024
    regression_grow: int = 128
    regression_columns: int = 12288
    # recent certificates re-tried before the LPs and in mask mode
    cache_size: int = 4
    # best-ranked certificate candidates per token checked over the whole vocabulary
    full_checks: int = 1
    # below this probability float64 cannot verify a certificate: reject
    min_probability: float = 1e-10

    @classmethod
    def for_generation(cls, time_budget: float | None = None, **overrides: Any) -> BatConfig:
        """The adapters' setting while generating: the exact path with its work budgets, and the clock of
        GENERATION_TIME_BUDGET seconds per decision as the safety net (`time_budget`; 0: certificate
        search only, the cheapest setting, which leaves a third of the sub-threshold draws unproven)."""
        budget = GENERATION_TIME_BUDGET if time_budget is None else time_budget
        if budget == 0:  # the certificate search alone stays as it was measured: no reweighted pass
            overrides = {"lsq_refine": 0, **overrides}
        return cls(time_budget=budget, **overrides)

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_probability < 1e-3:
            raise BatError(f"min_probability={self.min_probability} must lie in [0, 1e-3) (default 1e-10)")
        if not 1e-12 <= self.tol <= 1e-2:
            raise BatError(f"tol={self.tol} must lie in [1e-12, 1e-2] (default 1e-6)")
        if not 0 <= int(self.point_iterations) <= 100:
            raise BatError(
                f"point_iterations={self.point_iterations} must be an integer in [0, 100] (0: no feasible-point search)"
            )
        if not 0 <= int(self.lsq_refine) <= 50:
            raise BatError(f"lsq_refine={self.lsq_refine} must be an integer in [0, 50]")
        if not self.time_budget >= 0:
            raise BatError(
                f"time_budget={self.time_budget} must be a number of seconds >= 0 (0: certificate search only)"
            )
        if not 0 <= int(self.lp_iterations) <= 10**7:
            raise BatError(f"lp_iterations={self.lp_iterations} must be an integer in [0, 10^7] (0: no LP stages)")
        self.search_levels = tuple(int(k) for k in self.search_levels)
        if any(k < 1 for k in self.search_levels):
            raise BatError(f"search_levels={self.search_levels} must be positive numbers of directions")
        if not 0 <= int(self.point_final_columns):
            raise BatError(f"point_final_columns={self.point_final_columns} must be a number of tokens >= 0 (0: none)")
        self.point_columns = tuple(int(k) for k in self.point_columns)
        if not self.point_columns or any(k < 1 for k in self.point_columns):
            raise BatError(f"point_columns={self.point_columns} must be positive numbers of tokens, smallest first")
        if not 0 <= int(self.regression_iterations) <= 1000:
            raise BatError(
                f"regression_iterations={self.regression_iterations} must be an integer in [0, 1000] (0: off)"
            )
        for name in (
            "full_checks",
            "head_size",
            "lsq_head",
            "regression_start",
            "regression_grow",
            "regression_columns",
            "search_columns",
            "search_rounds",
            "lp_columns",
            "lp_grow",
            "lp_max_rounds",
        ):
            if int(getattr(self, name)) < 1:
                raise BatError(f"{name} must be a positive integer")
