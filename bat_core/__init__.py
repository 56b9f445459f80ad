"""bat-sampling core: exact basis-aware threshold (BAT) decisions with certificates.

Finlayson et al., "Closing the Curious Case of Neural Text Degeneration" (ICLR 2024).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .basis import Basis
from .errors import BatError
from .reference import ReferenceDecision, reference_decide
from .sampler import BatSampler, MaskResult, SampleResult
from .solver import GENERATION_TIME_BUDGET, AcceptCertificate, BatConfig, BatSolver, BatStats, Decision, RejectCertificate
from .threads import limit_blas_threads, set_matvec_threads
from .thresholds import ThresholdRule, entropy, eta_threshold, rule_from, truncate_mask


def decide(W: Any, logits: Any, token_ids: Any, tau: float, bias: Any = None) -> np.ndarray:
    """One-shot exact decision (True = may be sampled). Builds the per-model Basis: for repeated use
    keep a Basis and call `Basis.decide`, or a per-request BatSolver/BatSampler."""
    return Basis(W, bias=bias).decide(logits, token_ids, tau)


__all__ = [
    "GENERATION_TIME_BUDGET", "AcceptCertificate", "Basis", "BatConfig", "BatError", "BatSampler", "BatSolver", "BatStats",
    "Decision", "MaskResult", "ReferenceDecision", "RejectCertificate", "SampleResult", "ThresholdRule",
    "decide", "entropy", "eta_threshold", "limit_blas_threads", "reference_decide", "rule_from", "set_matvec_threads",
    "truncate_mask",
]
