"""Model files for every adapter: the registry's models, and W (with bias and soft-cap) read from a GGUF file
or a safetensors checkpoint, once per process."""

from .checkpoint import basis_for, check_model, output_layer
from .gguf import OutputLayer, read_gguf_output_layer
from .hf_folder import smollm2_hf_folder
from .registry import gemma3_270m_path, smollm2_path

__all__ = [
    "OutputLayer",
    "basis_for",
    "check_model",
    "gemma3_270m_path",
    "output_layer",
    "read_gguf_output_layer",
    "smollm2_hf_folder",
    "smollm2_path",
]
