"""bat-sampling for vLLM: BAT as a v1 logits processor (`bat_vllm:BatLogitsProcessor`)."""

from .processor import BatLogitsProcessor, settings_from

__all__ = ["BatLogitsProcessor", "settings_from"]
