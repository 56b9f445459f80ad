"""bat-sampling core: exact basis-aware threshold (BAT) decisions with certificates.

Finlayson et al., "Closing the Curious Case of Neural Text Degeneration" (ICLR 2024).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .basis import Basis
from .config import GENERATION_TIME_BUDGET, BatConfig
from .decisions import AcceptCertificate, BatStats, Decision, RejectCertificate
from .errors import BatError
from .reference import ReferenceDecision, reference_decide
from .sampler import BatSampler, MaskResult, SampleResult
from .solver import BatSolver
from .threads import limit_blas_threads, set_matvec_threads
from .thresholds import ThresholdRule, entropy, eta_threshold, rule_from, truncate_mask


def decide(
    W: Any, logits: Any, token_ids: Any, tau: Any, bias: Any = None, config: BatConfig | None = None
) -> np.ndarray:
    """One-shot exact decision for each token of one distribution (True = may be sampled). `W`: the
    unembedding matrix, or a Basis built once per model (reuse it: building one costs a Gram matrix);
    per-request use with warm starts goes through BatSolver/BatSampler. `tau`: a number or a ThresholdRule."""
    basis = W if isinstance(W, Basis) else Basis(W, bias=bias)
    solver = BatSolver(basis, config)
    step = solver.new_step(logits, tau)
    return np.array([d.accepted for d in solver.decide(step, token_ids)], dtype=bool)


__all__ = [
    "GENERATION_TIME_BUDGET",
    "AcceptCertificate",
    "Basis",
    "BatConfig",
    "BatError",
    "BatSampler",
    "BatSolver",
    "BatStats",
    "Decision",
    "MaskResult",
    "ReferenceDecision",
    "RejectCertificate",
    "SampleResult",
    "ThresholdRule",
    "decide",
    "entropy",
    "eta_threshold",
    "limit_blas_threads",
    "reference_decide",
    "rule_from",
    "set_matvec_threads",
    "truncate_mask",
]
