"""The output layer of a GGUF file: W (and bias, soft-cap) dequantized to float32, as llama.cpp multiplies with it."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from bat_core import BatError


@dataclass
class OutputLayer:
    """What BAT needs of a model: logits = softcap * tanh((W h + bias) / softcap), or W h + bias."""

    W: np.ndarray  # float32 [vocab, hidden]
    bias: np.ndarray | None
    softcap: float | None
    tensor_name: str
    quantization: str  # GGUF type or safetensors dtype
    architecture: str


def read_gguf_output_layer(path: str) -> OutputLayer:
    """W as the engine multiplies with it: `output.weight`, or `token_embd.weight` for tied models."""
    try:
        from gguf import GGUFReader
        from gguf.quants import dequantize
    except ImportError as exc:  # pragma: no cover - the extra is part of set-up
        raise BatError("reading GGUF needs the `gguf` package: pip install 'bat-sampling[llamacpp]'") from exc
    if not os.path.isfile(path):
        raise BatError(f"model file not found: {path}")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise BatError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        reader = GGUFReader(path)
    except Exception as exc:
        raise BatError(f"could not parse GGUF file {path}: {exc}") from exc
    tensors = {t.name: t for t in reader.tensors}
    arch_field = reader.fields.get("general.architecture")
    arch = arch_field.contents() if arch_field is not None else "unknown"
    name = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    if name not in tensors:
        raise BatError(f"{path} has neither output.weight nor token_embd.weight: no output matrix to read")
    tensor = tensors[name]
    try:
        W = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as exc:
        raise BatError(
            f"{name} in {path} is quantized as {tensor.tensor_type.name}, which the gguf package cannot "
            "dequantize; use a model file quantized with another type (Q8_0, Q4_K, Q6_K, F16, ...)"
        ) from exc
    W = np.ascontiguousarray(W.reshape(-1, W.shape[-1]), dtype=np.float32)
    bias = None
    if "output.bias" in tensors:
        bias = np.asarray(dequantize(tensors["output.bias"].data, tensors["output.bias"].tensor_type), np.float32)
        bias = bias.reshape(-1)
    softcap = None
    cap_field = reader.fields.get(f"{arch}.final_logit_softcapping")
    if cap_field is not None:
        value = float(cap_field.contents())
        softcap = value if value > 0 else None
    return OutputLayer(W, bias, softcap, name, tensor.tensor_type.name, arch)
