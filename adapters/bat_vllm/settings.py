"""A vLLM request's BAT settings: the core's flat keys (`bat_core.request`) from `SamplingParams.extra_args`
(`vllm_xargs` over HTTP), and what vLLM applies to the logits before any custom processor."""
from __future__ import annotations

from typing import Any

from bat_core import BatError
from bat_core.request import RequestSettings, bat_keys, max_time_budget, request_settings

__all__ = ["RequestSettings", "asks_for_bat", "max_time_budget", "settings_from"]

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
