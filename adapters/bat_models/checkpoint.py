"""W of the model an engine loaded, read from its file or folder once per process: a GGUF file, or a local
safetensors checkpoint (sharded or not). Engines give logits processors no handle to the weights."""

from __future__ import annotations

import json
import os
import threading

import numpy as np

import bat_core
from bat_core import BatError

from .gguf import OutputLayer, read_gguf_output_layer

OUTPUT_TENSORS = ("lm_head.weight", "model.embed_tokens.weight")  # the second where the embedding is tied
_bases: dict[tuple, bat_core.Basis] = {}
_bases_lock = threading.Lock()


def _is_gguf(model: str) -> bool:
    """A file (or a missing path named .gguf) is read as GGUF; a safetensors checkpoint is a folder."""
    return os.path.isfile(model) or (model.endswith(".gguf") and not os.path.isdir(model))


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
    if _is_gguf(model):
        return
    from safetensors import safe_open

    name, path = _output_tensor(model)
    with safe_open(path, framework="pt") as handle:
        rows = handle.get_slice(name).get_shape()[0]
    if rows != vocab_size:
        raise BatError(
            f"vocabulary mismatch: the output matrix of {model} has {rows} rows, the engine's vocabulary {vocab_size}"
        )


def output_layer(model: str) -> OutputLayer:
    """W (and bias) as the engine loaded it, from a GGUF file or a local safetensors folder. A GGUF file
    carries its soft-cap; a folder's is in its config, which the engine reads (softcap None here)."""
    if _is_gguf(model):
        return read_gguf_output_layer(model)
    from safetensors import safe_open

    name, path = _output_tensor(model)
    with safe_open(path, framework="pt") as handle:
        tensor = handle.get_tensor(name)
        W = tensor.float().numpy()
        bias_name = name.replace(".weight", ".bias")
        bias = handle.get_tensor(bias_name).float().numpy() if bias_name in handle.keys() else None
    return OutputLayer(
        np.ascontiguousarray(W), bias, None, name, str(tensor.dtype).removeprefix("torch."), "safetensors"
    )


def basis_for(model: str, softcap: float | None = None) -> bat_core.Basis:
    """One Basis per model file or folder and process, shared by every request (and by processors an engine
    builds twice). `softcap`: the engine's config value; a GGUF file's own is used where it is None."""
    try:
        info = os.stat(model)
    except OSError as exc:
        raise BatError(f"model file not found: {model}") from exc
    key = (os.path.realpath(model), info.st_size, info.st_mtime_ns, softcap)
    with _bases_lock:
        if key not in _bases:
            layer = output_layer(model)
            cap = softcap if softcap is not None else layer.softcap
            _bases[key] = bat_core.Basis(layer.W, bias=layer.bias, softcap=cap)
        return _bases[key]
