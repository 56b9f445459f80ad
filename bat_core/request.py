"""A request's BAT settings: the flat `bat_*` keys that every server and adapter accepts.

The same keys in vLLM (`extra_args`, `vllm_xargs`) and in `bat serve` (top-level body fields or
`vllm_xargs`), so one client works against both: exactly one of `bat_eta`, `bat_epsilon`, `bat_tau`;
optional `bat_mode` ("sample", "mask", or "threshold": the plain rule without BAT), `bat_seed`,
`bat_time_budget` (seconds per decision: the safety net's clock, as the exact path stops at its work
budgets first; default GENERATION_TIME_BUDGET, at most the operator's BAT_MAX_TIME_BUDGET; 0: certificate
search only) and, in mask mode, `bat_mask_candidates` (exact decisions per step, default 4: fewer leave more
mass undecided in less time). Values may arrive as strings (HTTP forms).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import GENERATION_TIME_BUDGET
from .errors import BatError
from .generation import MODES
from .sampler import MASK_CANDIDATES, MAX_MASK_CANDIDATES
from .thresholds import ThresholdRule

RULE_KEYS = {"bat_eta": "eta", "bat_epsilon": "epsilon", "bat_tau": "tau"}
SETTING_KEYS = frozenset(RULE_KEYS) | {"bat_mode", "bat_seed", "bat_time_budget", "bat_mask_candidates"}
REQUEST_MODES = MODES  # threshold: the plain rule without BAT (a baseline)
DEFAULT_MAX_TIME_BUDGET = 10.0  # seconds per decision a request may ask for, unless the operator says otherwise


@dataclass(frozen=True)
class RequestSettings:
    rule: ThresholdRule
    mode: str
    seed: int | None
    time_budget: float
    mask_candidates: int = MASK_CANDIDATES


def bat_keys(extra: Mapping[str, Any] | None) -> set[str]:
    """The keys of `extra` that address BAT (any `bat_` prefix, known or not)."""
    return {k for k in (extra or {}) if isinstance(k, str) and k.startswith("bat_")}


def max_time_budget() -> float:
    """The operator's bound on `bat_time_budget` (env BAT_MAX_TIME_BUDGET, seconds per decision)."""
    raw = os.environ.get("BAT_MAX_TIME_BUDGET", "")
    try:
        value = float(raw) if raw else DEFAULT_MAX_TIME_BUDGET
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 60.0:
        raise BatError(
            f"BAT_MAX_TIME_BUDGET={raw!r}: set a number of seconds in [0, 60] (default {DEFAULT_MAX_TIME_BUDGET})"
        )
    return value


def request_settings(extra: Mapping[str, Any] | None, default_seed: Any = None) -> RequestSettings | None:
    """The settings in `extra`, None when it has no `bat_` key; BatError naming the setting when one is bad.
    `default_seed` (the request's own seed) is BAT's seed when `bat_seed` is absent."""
    keys = bat_keys(extra)
    if not keys:
        return None
    assert extra is not None
    unknown = sorted(keys - SETTING_KEYS)
    if unknown:
        raise BatError(f"unknown BAT setting(s) {unknown}: use {sorted(SETTING_KEYS)}")
    rules = [k for k in RULE_KEYS if k in extra]
    if len(rules) != 1:
        raise BatError(f"give exactly one of bat_eta, bat_epsilon, bat_tau (got {rules or 'none'})")
    try:
        rule = ThresholdRule(RULE_KEYS[rules[0]], _number(extra, rules[0], "a number"))
    except BatError as exc:
        raise BatError(f"{rules[0]}: {exc}") from exc
    mode = extra.get("bat_mode", "sample")
    if mode not in REQUEST_MODES:
        raise BatError(f"bat_mode={mode!r}: use 'sample' (the paper's sampler), 'mask', or 'threshold' (no BAT)")
    seed = extra.get("bat_seed", default_seed)
    if seed is not None:
        if isinstance(seed, bool) or isinstance(seed, float) and not seed.is_integer():
            raise BatError(f"bat_seed={seed!r} is not an integer")
        try:
            seed = int(seed)
        except (TypeError, ValueError) as exc:
            raise BatError(f"bat_seed={seed!r} is not an integer") from exc
        if seed < 0:
            raise BatError(f"bat_seed={seed} must be a non-negative integer")
    limit = max_time_budget()
    if "bat_time_budget" in extra:
        budget = _number(extra, "bat_time_budget", "a number of seconds")
    else:  # the exact default, within the operator's bound (0 there: certificate search only)
        budget = min(GENERATION_TIME_BUDGET, limit)
    if not 0.0 <= budget <= limit:
        raise BatError(
            f"bat_time_budget={budget} must lie in [0, {limit}] seconds: this server's limit "
            "(BAT_MAX_TIME_BUDGET); 0 is the certificate search only"
        )
    return RequestSettings(rule, mode, seed, budget, _mask_candidates(extra, mode))


def _mask_candidates(extra: Mapping[str, Any], mode: str) -> int:
    if "bat_mask_candidates" not in extra:
        return MASK_CANDIDATES
    if mode != "mask":
        raise BatError(f"bat_mask_candidates applies to bat_mode='mask' only (this request's mode is {mode!r})")
    value = _number(extra, "bat_mask_candidates", "an integer")
    if not (value.is_integer() and 1 <= value <= MAX_MASK_CANDIDATES):
        raise BatError(
            f"bat_mask_candidates={extra['bat_mask_candidates']!r} must be an integer in [1, {MAX_MASK_CANDIDATES}]: "
            f"the exact decisions per mask step (default {MASK_CANDIDATES})"
        )
    return int(value)


def _number(extra: Mapping[str, Any], key: str, what: str) -> float:
    value = extra[key]
    if isinstance(value, bool):
        raise BatError(f"{key}={value!r} is not {what}")
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise BatError(f"{key}={value!r} is not {what}") from exc
