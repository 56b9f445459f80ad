"""W of the checkpoint a vLLM engine loaded, read once per process (vLLM gives processors no handle to the model)."""
from __future__ import annotations

import json
import math
import os
import threading
from typing import Any

import numpy as np

import bat_core
from bat_core import BatError

OUTPUT_TENSORS = ("lm_head.weight", "model.embed_tokens.weight")
_bases: dict[tuple[str, float | None], bat_core.Basis] = {}
_bases_lock = threading.Lock()


def _tensor_files(model: str) -> dict[str, str]:
    """Tensor name -> safetensors file of the local checkpoint folder (sharded or not)."""
    from safetensors import safe_open

    index = os.path.join(model, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as handle:
            return json.load(handle)["weight_map"]
    single = os.path.join(model, "model.safetensors")
    if not os.path.isfile(single):
        raise BatError(f"no model.safetensors (or index) in {model}: BAT needs the safetensors checkpoint")
    with safe_open(single, framework="pt") as handle:
        return {name: "model.safetensors" for name in handle.keys()}


def _output_tensor(model: str) -> tuple[str, str]:
    """(tensor name, file) of W: `lm_head.weight`, else the tied `model.embed_tokens.weight`."""
    if not os.path.isdir(model):
        raise BatError(
            f"BAT reads W from the checkpoint the engine loaded, but {model!r} is not a local folder: "
            "download the model and serve it from its folder"
        )
    where = _tensor_files(model)
    for name in OUTPUT_TENSORS:
        if name in where:
            return name, os.path.join(model, where[name])
    raise BatError(f"{model} has neither lm_head.weight nor model.embed_tokens.weight: no output matrix found")


def check_model(model: str, vocab_size: int) -> None:
    """What can be checked without reading W (headers only): where W is, and its number of rows."""
    if os.path.isfile(model) and model.endswith(".gguf"):
        return
    from safetensors import safe_open

    name, path = _output_tensor(model)
    with safe_open(path, framework="pt") as handle:
        rows = handle.get_slice(name).get_shape()[0]
    if rows != vocab_size:
        raise BatError(f"vocabulary mismatch: the output matrix of {model} has {rows} rows, the engine's "
                       f"vocabulary {vocab_size}")


def read_output_matrix(model: str) -> tuple[np.ndarray, np.ndarray | None]:
    """W (and bias) as the engine loaded it, from the local checkpoint folder (safetensors) or a GGUF file."""
    if os.path.isfile(model) and model.endswith(".gguf"):
        from bat_llamacpp.gguf_weights import read_output_layer

        layer = read_output_layer(model)
        return layer.W, layer.bias
    from safetensors import safe_open

    name, path = _output_tensor(model)
    with safe_open(path, framework="pt") as handle:
        W = handle.get_tensor(name).float().numpy()
        bias_name = name.replace(".weight", ".bias")
        bias = handle.get_tensor(bias_name).float().numpy() if bias_name in handle.keys() else None
    return W, bias


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


def basis_for(model: str, softcap: float | None = None) -> bat_core.Basis:
    """One Basis per checkpoint and process (vLLM may build the processor twice: entry point and argument)."""
    key = (os.path.realpath(model), softcap)
    with _bases_lock:
        if key not in _bases:
            W, bias = read_output_matrix(model)
            _bases[key] = bat_core.Basis(W, bias=bias, softcap=softcap)
        return _bases[key]
