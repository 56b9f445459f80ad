"""BAT in Hugging Face transformers' `generate`."""

from .processor import BatLogitsProcessor, GenerationStats, basis_of

__all__ = ["BatLogitsProcessor", "GenerationStats", "basis_of"]
