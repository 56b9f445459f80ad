"""A vLLM request's BAT settings (flat keys of `SamplingParams.extra_args`, `vllm_xargs` over HTTP)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from bat_core import BatError, ThresholdRule

RULE_KEYS = {"bat_eta": "eta", "bat_epsilon": "epsilon", "bat_tau": "tau"}
KEYS = set(RULE_KEYS) | {"bat_mode", "bat_seed", "bat_time_budget"}
MODES = ("sample", "mask", "threshold")  # threshold: the plain rule without BAT (a baseline)
DEFAULT_MAX_TIME_BUDGET = 0.1  # seconds per decision a request may ask for, unless the operator says otherwise
# settings applied to the logits before any custom processor runs: BAT would not see the raw distribution
RAW_LOGIT_CONFLICTS = ("structured_outputs", "logit_bias", "allowed_token_ids", "bad_words", "min_tokens")


def asks_for_bat(params: Any) -> bool:
    return any(isinstance(k, str) and k.startswith("bat_") for k in (getattr(params, "extra_args", None) or {}))


def max_time_budget() -> float:
    """The operator's bound on `bat_time_budget` (env BAT_MAX_TIME_BUDGET, seconds per decision)."""
    raw = os.environ.get("BAT_MAX_TIME_BUDGET", "")
    try:
        value = float(raw) if raw else DEFAULT_MAX_TIME_BUDGET
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 60.0:
        raise BatError(f"BAT_MAX_TIME_BUDGET={raw!r}: set a number of seconds in [0, 60] (default {DEFAULT_MAX_TIME_BUDGET})")
    return value


@dataclass(frozen=True)
class RequestSettings:
    rule: ThresholdRule
    mode: str
    seed: int | None
    time_budget: float


def settings_from(params: Any) -> RequestSettings | None:
    """The request's BAT settings, None when it asks for no BAT; BatError on bad settings."""
    if not asks_for_bat(params):
        return None
    extra = params.extra_args
    keys = {k for k in extra if isinstance(k, str) and k.startswith("bat_")}
    unknown = sorted(keys - KEYS)
    if unknown:
        raise BatError(f"unknown BAT setting(s) {unknown}: use {sorted(KEYS)}")
    rules = [k for k in RULE_KEYS if k in extra]
    if len(rules) != 1:
        raise BatError(f"give exactly one of bat_eta, bat_epsilon, bat_tau (got {rules or 'none'})")
    try:
        value = float(extra[rules[0]])
    except (TypeError, ValueError) as exc:
        raise BatError(f"{rules[0]}={extra[rules[0]]!r} is not a number") from exc
    rule = ThresholdRule(RULE_KEYS[rules[0]], value)
    conflicts = [name for name in RAW_LOGIT_CONFLICTS if getattr(params, name, None)]
    if conflicts:
        raise BatError(
            f"BAT needs the model's raw logits, but {', '.join(conflicts)} change them before any custom processor "
            "runs in vLLM (structured outputs / response_format apply a grammar mask first); drop those settings "
            "for BAT requests"
        )
    mode = extra.get("bat_mode", "sample")
    if mode not in MODES:
        raise BatError(f"bat_mode={mode!r}: use 'sample' (the paper's sampler), 'mask', or 'threshold' (no BAT)")
    if "bat_seed" in extra and int(getattr(params, "n", 1) or 1) > 1:
        raise BatError(
            "bat_seed with n > 1 would give n identical samples: set vLLM's `seed` instead (vLLM gives each "
            "of the n sequences seed + index, and BAT uses it when bat_seed is absent)"
        )
    seed = extra.get("bat_seed", getattr(params, "seed", None))
    if seed is not None:
        try:
            seed = int(seed)
        except (TypeError, ValueError) as exc:
            raise BatError(f"bat_seed={seed!r} is not an integer") from exc
        if seed < 0:
            raise BatError(f"bat_seed={seed} must be a non-negative integer")
    try:
        budget = float(extra.get("bat_time_budget", 0.0))
    except (TypeError, ValueError) as exc:
        raise BatError(f"bat_time_budget={extra['bat_time_budget']!r} is not a number of seconds") from exc
    limit = max_time_budget()
    if not 0.0 <= budget <= limit:
        raise BatError(f"bat_time_budget={budget} must lie in [0, {limit}] seconds: this server's limit "
                       "(BAT_MAX_TIME_BUDGET); 0 is the certificate search only")
    return RequestSettings(rule, mode, seed, budget)
