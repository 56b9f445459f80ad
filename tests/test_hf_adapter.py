"""BAT in transformers' `generate` on the real SmolLM2 (the Hugging Face folder set-up builds): seeds, batches
with num_return_sequences, mask mode, refusals, and the adapter's tokens against the core's on the same logits."""

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch", reason="the transformers adapter needs torch (scripts/setup.sh)")
transformers = pytest.importorskip("transformers")

import bat_core
from bat_hf import BatLogitsProcessor
from bat_models import smollm2_hf_folder

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def lm():
    folder = smollm2_hf_folder()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, padding_side="left")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.generation_config.top_k = None  # nothing truncates after BAT unless a test asks for it
    return model, tokenizer


class Recorder(transformers.LogitsProcessor):
    """Keeps the scores it sees (placed before or after BAT in the custom list) and passes them on unchanged."""

    def __init__(self):
        self.rows = []

    def __call__(self, input_ids, scores):
        self.rows.append(scores.detach().float().numpy().copy())
        return scores


def generate(lm, prompts, processors, **kwargs):
    model, tokenizer = lm
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    kwargs = {"do_sample": True, "max_new_tokens": 12, "pad_token_id": tokenizer.eos_token_id, **kwargs}
    out = model.generate(**inputs, logits_processor=transformers.LogitsProcessorList(processors), **kwargs)
    return out[:, inputs.input_ids.shape[1] :]


@pytest.mark.slow
def test_tokens_are_the_cores_draws_on_the_same_logits_and_a_seed_reproduces(lm):
    """Row r draws with seed + r at step k; replaying the recorded raw logits through the core gives the tokens."""
    raw = Recorder()
    proc = BatLogitsProcessor(lm[0], tau=0.05, seed=3)
    first = generate(lm, PROMPTS, [raw, proc], num_return_sequences=2)
    assert first.shape[0] == 6
    again = generate(lm, PROMPTS, [BatLogitsProcessor(lm[0], tau=0.05, seed=3)], num_return_sequences=2)
    assert torch.equal(first, again)
    assert proc.stats.generations == 1 and proc.stats.rows == 6 and proc.stats.tokens == 6 * len(raw.rows)
    basis = proc.basis
    eos = lm[1].eos_token_id
    for row in range(6):
        sampler = bat_core.BatSampler(
            basis, bat_core.ThresholdRule("tau", 0.05), seed=3 + row, config=bat_core.BatConfig.for_generation()
        )
        for step, logits in enumerate(raw.rows):
            if step > 0 and int(first[row, step - 1]) == eos:
                break  # transformers pads a finished row whatever BAT drew
            assert sampler.sample(logits[row], step=step).token == int(first[row, step])
    # the six rows are not one sample repeated: their seeds differ
    assert len({tuple(r.tolist()) for r in first}) > 1
    assert proc.stats.core["candidates"] > proc.stats.core["by_threshold"]  # sub-threshold draws were decided


@pytest.mark.slow
def test_mask_mode_leaves_the_proven_set_and_sampling_stays_inside_it(lm):
    raw, masked = Recorder(), Recorder()
    proc = BatLogitsProcessor(lm[0], eta=0.02, mode="mask", seed=5)
    tokens = generate(lm, PROMPTS[:1], [raw, proc, masked], max_new_tokens=10)[0]
    sampler = bat_core.BatSampler(
        proc.basis, bat_core.ThresholdRule("eta", 0.02), seed=5, config=bat_core.BatConfig.for_generation()
    )
    for step, (z, kept) in enumerate(zip(raw.rows, masked.rows)):
        expected = sampler.mask(z[0], step=step).mask
        assert (np.isfinite(kept[0]) == expected).all()
        assert expected[int(tokens[step])]
        assert expected.sum() < len(expected)  # the mask does cut the tail
    assert proc.stats.tokens == len(raw.rows)


@pytest.mark.slow
def test_settings_that_change_the_logits_before_bat_are_refused(lm):
    model = lm[0]
    with pytest.raises(bat_core.BatError, match="outside the span"):
        generate(lm, PROMPTS[:1], [BatLogitsProcessor(model, eta=0.0009)], repetition_penalty=1.3)
    with pytest.raises(bat_core.BatError, match="not finite"):
        generate(lm, PROMPTS[:1], [BatLogitsProcessor(model, eta=0.0009)], bad_words_ids=[[lm[1].encode(" a")[0]]])
    # warpers run after BAT: top_k and temperature are fine, and one processor serves a second generation
    proc = BatLogitsProcessor(model, eta=0.0009, seed=1)
    one = generate(lm, PROMPTS[:1], [proc], top_k=50, temperature=0.7)
    two = generate(lm, PROMPTS[:1], [proc], top_k=50, temperature=0.7)
    assert torch.equal(one, two) and proc.stats.generations == 2


def test_bad_arguments_are_refused(lm):
    model = lm[0]
    for kwargs, message in [
        ({"eta": 0.001, "tau": 0.1}, "one threshold rule"),
        ({"eta": 2.0}, "out of range"),
        ({"mode": "beam"}, "mode="),
        ({"seed": -1}, "seed="),
        ({"seed": 1.5}, "seed="),
        ({"mode": "mask", "mask_candidates": 2.0}, "mask_candidates=2.0 must be an integer"),
    ]:
        with pytest.raises(bat_core.BatError, match=message):
            BatLogitsProcessor(model, **kwargs)
    with pytest.raises(bat_core.BatError, match="no output embeddings"):
        BatLogitsProcessor(torch.nn.Linear(2, 2))
    assert BatLogitsProcessor(model).basis is BatLogitsProcessor(model).basis  # W read once per model
