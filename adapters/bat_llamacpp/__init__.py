"""bat-sampling for llama.cpp (llama-cpp-python): BAT as a sampler in llama.cpp's sampler chain."""

from .processor import BatLlama, BatLogitsProcessor, CompletionStats, EtaLogitsProcessor, rule_from

__all__ = ["BatLlama", "BatLogitsProcessor", "CompletionStats", "EtaLogitsProcessor", "rule_from"]
