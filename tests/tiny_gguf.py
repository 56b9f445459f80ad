"""Tiny random llama-architecture GGUF models written by the tests: SmolLM2's tokenizer (copied from
the registry GGUF, so llama.cpp can tokenize), random weights, one layer. llama.cpp itself quantizes
the output matrix to the type under test."""

from __future__ import annotations

import ctypes

import numpy as np

TOKENIZER_KEYS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.add_bos_token",
)


def write_tiny_llama(
    path: str, tokenizer_gguf: str, hidden: int = 256, seed: int = 0, tied: bool = True, output_scale: float = 0.15
) -> np.ndarray:
    """Write an F32 model; returns its output matrix W (vocab x hidden). `output_scale` keeps the
    next-token entropy moderate (random unit-scale rows give one-hot distributions)."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(tokenizer_gguf)
    vocab = len(reader.fields["tokenizer.ggml.tokens"].contents())
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(2 * hidden)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // 4)
    writer.add_vocab_size(vocab)
    writer.add_file_type(0)
    for key in TOKENIZER_KEYS:
        field = reader.fields[key]
        value = field.contents()
        if field.types[0] == GGUFValueType.ARRAY:
            writer.add_array(key, value)
        elif field.types[0] == GGUFValueType.STRING:
            writer.add_string(key, value)
        elif field.types[0] == GGUFValueType.BOOL:
            writer.add_bool(key, value)
        else:
            writer.add_uint32(key, int(value))

    def mat(rows: int, cols: int, scale: float) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    W = mat(vocab, hidden, output_scale)
    writer.add_tensor("token_embd.weight", W if tied else mat(vocab, hidden, output_scale))
    ones = np.ones(hidden, np.float32)
    writer.add_tensor("blk.0.attn_norm.weight", ones)
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        writer.add_tensor(f"blk.0.{name}.weight", mat(hidden, hidden, hidden**-0.5))
    writer.add_tensor("blk.0.ffn_norm.weight", ones)
    writer.add_tensor("blk.0.ffn_gate.weight", mat(2 * hidden, hidden, hidden**-0.5))
    writer.add_tensor("blk.0.ffn_up.weight", mat(2 * hidden, hidden, hidden**-0.5))
    writer.add_tensor("blk.0.ffn_down.weight", mat(hidden, 2 * hidden, (2 * hidden) ** -0.5))
    writer.add_tensor("output_norm.weight", ones)
    if not tied:
        writer.add_tensor("output.weight", W)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return W


def quantize(source: str, target: str, output_type: str) -> None:
    """llama.cpp's own quantizer: the output matrix (and only it, for a tied model the token
    embedding) becomes `output_type` (Q8_0, Q4_1, Q4_K, Q6_K, ...); the rest stays F32."""
    from llama_cpp import llama_cpp as C

    params = C.llama_model_quantize_default_params()
    params.ftype = C.LLAMA_FTYPE_ALL_F32
    params.nthread = 2
    kind = getattr(C, f"GGML_TYPE_{output_type}")
    params.token_embedding_type = kind
    params.output_tensor_type = kind
    params.quantize_output_tensor = True
    status = C.llama_model_quantize(source.encode(), target.encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama_model_quantize failed with status {status} for {output_type}")
