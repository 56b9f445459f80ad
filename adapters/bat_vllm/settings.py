"""A vLLM request's BAT settings: the core's flat keys (`bat_core.request`) from `SamplingParams.extra_args`
(`vllm_xargs` over HTTP), what vLLM applies to the logits before any custom processor, and the model
config's soft-cap."""

from __future__ import annotations

import math
from typing import Any

from bat_core import BatError
from bat_core.request import RequestSettings, bat_keys, max_time_budget, request_settings

__all__ = ["RequestSettings", "asks_for_bat", "max_time_budget", "settings_from", "softcap_of"]

# settings applied to the logits before any custom processor runs: BAT would not see the raw distribution
RAW_LOGIT_CONFLICTS = ("structured_outputs", "logit_bias", "allowed_token_ids", "bad_words", "min_tokens")


def asks_for_bat(params: Any) -> bool:
    return bool(bat_keys(getattr(params, "extra_args", None)))


def settings_from(params: Any) -> RequestSettings | None:
    """The request's BAT settings, None when it asks for no BAT; BatError on bad settings."""
    settings = request_settings(getattr(params, "extra_args", None), default_seed=getattr(params, "seed", None))
    if settings is None:
        return None
    conflicts = [name for name in RAW_LOGIT_CONFLICTS if getattr(params, name, None)]
    if conflicts:
        raise BatError(
            f"BAT needs the model's raw logits, but {', '.join(conflicts)} change them before any custom processor "
            "runs in vLLM (structured outputs / response_format apply a grammar mask first); drop those settings "
            "for BAT requests"
        )
    if "bat_seed" in params.extra_args and int(getattr(params, "n", 1) or 1) > 1:
        raise BatError(
            "bat_seed with n > 1 would give n identical samples: set vLLM's `seed` instead (vLLM gives each "
            "of the n sequences seed + index, and BAT uses it when bat_seed is absent)"
        )
    return settings


def softcap_of(model_config: Any) -> float | None:
    """The final-logit soft-cap c of the model's config (Gemma 2 style: logits = c tanh(u / c)), or None."""
    for config in (getattr(model_config, "hf_text_config", None), getattr(model_config, "hf_config", None)):
        cap = getattr(config, "final_logit_softcapping", None) if config is not None else None
        if cap:
            cap = float(cap)
            if not (math.isfinite(cap) and cap > 0):
                raise BatError(f"final_logit_softcapping={cap!r} in the model's config is not a positive number")
            return cap
    return None
