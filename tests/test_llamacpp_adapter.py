"""The llama.cpp adapter on the real engine: SmolLM2 from the registry, and tiny random GGUF models
that llama.cpp itself quantizes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from independent import augmented, check_accept, softmax64

import bat_core

llama_cpp = pytest.importorskip("llama_cpp", reason="adapter tests need llama-cpp-python (scripts/setup.sh)")
from tiny_gguf import quantize, write_tiny_llama

from bat_llamacpp import BatLlama, EtaLogitsProcessor, rule_from
from bat_llamacpp.trajectories import last_logits
from bat_models import (
    output_layer,
    smollm2_path,
)

PROMPTS = ["Once upon a time", "The best way to learn"]


@pytest.fixture(scope="module")
def llm():
    return llama_cpp.Llama(model_path=smollm2_path(), n_ctx=512, seed=0, verbose=False, n_threads=os.cpu_count())


@pytest.fixture(scope="module")
def bat(llm):
    return BatLlama(llm)


def complete(llm, processor, prompt=PROMPTS[0], max_tokens=40, **extra):
    out = llm.create_completion(prompt, max_tokens=max_tokens, **processor.completion_kwargs(), **extra)
    return out["choices"][0]["text"]


def test_generation_reproduces_and_every_sub_threshold_token_is_proven(llm, bat):
    A = augmented(bat.basis.W)
    records, texts, exact_stages = [], {}, 0
    for seed, prompt in enumerate(PROMPTS):
        proc = bat.processor(eta=0.0009, seed=seed, record=True)  # the default: the exact path, work-bounded
        texts[seed] = complete(llm, proc, prompt, max_tokens=64)
        assert proc.stats.tokens >= 1 and proc.error is None
        core = proc.stats.core
        exact_stages += core["rejected_by_point"] + core["by_lp"] + core["accepts_by_source"].get("regression", 0)
        assert proc.stats.below_tau == len(proc.records)
        records += proc.records
        again = bat.processor(eta=0.0009, seed=seed)
        assert complete(llm, again, prompt, max_tokens=64) == texts[seed]  # a seed reproduces the text
    other = bat.processor(eta=0.0009, seed=11)
    assert complete(llm, other, PROMPTS[0], max_tokens=64) != texts[0]
    assert records, "no token was taken below tau in 128 steps: the test would not check certificates"
    assert exact_stages, "no decision reached the exact path's proof stages: the seeds did not test them"
    for rec in records:
        p = softmax64(rec.logits, bat.basis.vocab_size)
        assert p[rec.token] < rec.tau
        check_accept(A, p, rec.tau, rec.token, rec.certificate.y, bat_core.BatConfig().tol)


def test_call_streaming_chat_and_mask_mode(llm, bat):
    proc = bat.processor(epsilon=0.0003, seed=4)
    whole = complete(llm, proc, max_tokens=24)
    proc = bat.processor(epsilon=0.0003, seed=4)
    chunks = llm("Once upon a time", max_tokens=24, stream=True, **proc.completion_kwargs())
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    chat = bat.processor(tau=0.05, seed=1)
    reply = llm.create_chat_completion([{"role": "user", "content": "Say hello."}], max_tokens=12, **chat.chat_kwargs())
    assert reply["choices"][0]["message"]["content"] and chat.stats.tokens >= 1 and chat.error is None
    masked = [bat.processor(eta=0.0009, mode="mask", seed=2) for _ in range(2)]
    texts = [complete(llm, m, max_tokens=16) for m in masked]
    assert texts[0] == texts[1]  # llama.cpp's draw after the mask uses the completion's seed
    assert masked[0].stats.tokens >= 1 and masked[0].stats.core["steps"] == masked[0].stats.tokens
    one = bat.processor(eta=0.0009, mode="mask", seed=2, mask_candidates=1)
    complete(llm, one, max_tokens=16)
    assert 0 < one.stats.core["candidates"] <= one.stats.core["steps"] < masked[0].stats.core["candidates"]
    with pytest.raises(bat_core.BatError, match=r"mask_candidates=-1 must lie in \[0, 64\]"):
        bat.processor(eta=0.0009, mode="mask", mask_candidates=-1)


def test_engine_logits_lie_in_the_span_of_the_gguf_matrix(llm, bat):
    llm.reset()
    llm.eval(llm.tokenize(b"The capital of France is", add_bos=False))
    for token in (504, 3575, 30):
        assert bat.basis.span_residual(last_logits(llm)) < 1e-4
        llm.eval([token])


def test_bad_settings_are_clear_errors_and_leave_the_model_usable(llm, bat):
    for kwargs, words in (
        ({"eta": -0.1}, "out of range"),
        ({"tau": 1.0}, "out of range"),
        ({"epsilon": "x"}, "not a number"),
        ({"mode": "greedy"}, "unknown mode"),
        ({"eta": 0.001, "tau": 0.1}, "one threshold rule"),
        ({"seed": -3}, "non-negative"),
    ):
        with pytest.raises(bat_core.BatError, match=words):
            bat.processor(**kwargs)
    # llama-cpp-python drops logits_processor when logit_bias is given: BAT notices instead of going silent
    proc = bat.processor(eta=0.0009, seed=0)
    with pytest.raises(bat_core.BatError, match="not called"):
        complete(llm, proc, max_tokens=4, logit_bias={42: 1.0})
    # an error inside llama.cpp's callback (here: a matrix that does not belong to the model) is raised
    wrong = BatLlama(llm)
    wrong.basis = bat_core.Basis(np.roll(bat.basis.W, 1, axis=0))
    with pytest.raises(bat_core.BatError, match="not explained"):
        complete(llm, wrong.processor(eta=0.0009, seed=0), max_tokens=4)
    assert complete(llm, bat.processor(eta=0.0009, seed=0), max_tokens=8)


def test_plain_eta_baseline_never_samples_below_tau(llm):
    seen = []

    class Watch(EtaLogitsProcessor):
        def __call__(self, input_ids, scores):
            out = super().__call__(input_ids, scores)
            z = np.asarray(scores, np.float64)
            p = np.exp(z - z.max())
            p /= p.sum()
            seen.append((p, np.isfinite(out), self.rule.tau(p)))
            return out

    complete(llm, Watch(rule_from(eta=0.0009), seed=1), max_tokens=8)
    for p, kept, tau in seen:
        assert (p[kept] >= tau).all() or kept.sum() == 1


# ---------------------------------------------------------------- tiny random GGUF models
QUANT_TYPES = ("Q8_0", "Q4_1", "Q4_K", "Q6_K")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    source = str(folder / "tiny-f32.gguf")
    W = write_tiny_llama(source, smollm2_path(), hidden=256, seed=3)
    paths = {}
    for kind in QUANT_TYPES:
        paths[kind] = str(folder / f"tiny-{kind}.gguf")
        quantize(source, paths[kind], kind)
    return W, paths


@pytest.mark.parametrize("kind", QUANT_TYPES)
def test_dequantized_matrix_matches_gguf_reference_and_engine(tiny, kind):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    W, paths = tiny
    layer = output_layer(paths[kind])
    assert layer.quantization == kind and layer.tensor_name == "token_embd.weight"
    tensor = next(t for t in GGUFReader(paths[kind]).tensors if t.name == "token_embd.weight")
    reference = dequantize(tensor.data, tensor.tensor_type).reshape(W.shape)
    assert np.array_equal(layer.W, reference)  # same numbers, same orientation
    assert np.abs(layer.W - W).max() < 0.25 * np.abs(W).max()  # close to the matrix that was quantized
    engine = llama_cpp.Llama(model_path=paths[kind], n_ctx=128, seed=0, verbose=False)
    engine.eval(engine.tokenize(b"Hello world, this is", add_bos=False))
    assert BatLlama(engine).basis.span_residual(last_logits(engine)) < 1e-3  # llama.cpp multiplies by this W


def test_bat_generation_on_a_tiny_model(tiny):
    _, paths = tiny
    engine = llama_cpp.Llama(model_path=paths["Q4_K"], n_ctx=128, seed=0, verbose=False)
    bat = BatLlama(engine)
    texts = []
    for _ in range(2):
        proc = bat.processor(tau=0.01, seed=9, record=True)
        texts.append(complete(engine, proc, max_tokens=12))
        assert proc.stats.tokens >= 1 and proc.error is None
    assert texts[0] == texts[1]


def write_raw_gguf(path, tensors):
    """A GGUF with the given raw tensors only (not a loadable model)."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    for name, (array, raw_dtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_bad_model_files_are_clear_errors(tmp_path, llm):
    from gguf import GGMLQuantizationType

    with pytest.raises(bat_core.BatError, match="not found"):
        output_layer(str(tmp_path / "missing.gguf"))
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    with pytest.raises(bat_core.BatError, match="not a GGUF file"):
        output_layer(str(text))
    no_output = tmp_path / "no-output.gguf"
    write_raw_gguf(no_output, {"blk.0.attn_norm.weight": (np.ones(64, np.float32), None)})
    with pytest.raises(bat_core.BatError, match="no output matrix"):
        output_layer(str(no_output))
    q8_1 = tmp_path / "q8_1.gguf"  # 4 rows of 64 values: 2 blocks of 40 bytes per row
    write_raw_gguf(q8_1, {"output.weight": (np.zeros((4, 80), np.uint8), GGMLQuantizationType.Q8_1)})
    with pytest.raises(bat_core.BatError, match="Q8_1"):
        output_layer(str(q8_1))
    small = tmp_path / "small-vocab.gguf"
    write_raw_gguf(small, {"output.weight": (np.ones((1000, 576), np.float32), None)})
    loaded = llm.model_path
    try:
        llm.model_path = str(small)  # as if the engine had loaded this file
        with pytest.raises(bat_core.BatError, match="vocabulary mismatch"):
            BatLlama(llm)
    finally:
        llm.model_path = loaded


# ---------------------------------------------------------------- the `bat` command
def bat_command() -> list[str]:
    script = Path(sys.executable).parent / "bat"
    return [str(script)] if script.exists() else [sys.executable, "-m", "bat_llamacpp.cli"]


def run_bat(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "adapters"), env.get("PYTHONPATH", "")])
    return subprocess.run(bat_command() + list(args), capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_bat_generate_command_end_to_end():
    runs = [run_bat("generate", "Once upon a time", "--max-tokens", "24", "--seed", "5", "--json") for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
    outs = [json.loads(run.stdout) for run in runs]
    assert outs[0]["text"] and outs[0]["text"] == outs[1]["text"]
    assert outs[0]["bat"]["tokens"] >= 1 and outs[0]["baseline"]["tokens_per_second"] > 0
    plain = run_bat("generate", "The capital of France is", "--max-tokens", "12", "--no-baseline")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.startswith("The capital of France is") and "BAT decisions:" in plain.stdout
    assert "\033[" not in plain.stdout  # piped: plain markers, no colour
    bad = run_bat("generate", "x", "--value", "1.5")
    assert bad.returncode == 2 and "out of range" in bad.stderr
    missing = run_bat("generate", "x", "--model", "/nonexistent/model.gguf")
    assert missing.returncode == 2 and "not found" in missing.stderr


# ---------------------------------------------------------------- failures and grammars
def break_sampler(proc, method: str, after: int = 2):
    """Make the processor's core sampler raise from its `after`-th call of `method` on (fault injection)."""
    original, calls = getattr(proc.sampler, method), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) >= after:
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)

    setattr(proc.sampler, method, failing)


@pytest.mark.parametrize("mode", ["sample", "mask"])
def test_a_failing_step_fails_closed_in_completions_streams_and_chat(llm, bat, mode):
    """A step at which BAT raises keeps only its most probable token (never the untruncated distribution), the
    failure is counted and raised to the caller of a completion, a stream or a chat, and the model serves on."""
    z = None
    llm.reset()
    llm.eval(llm.tokenize(b"Once upon a time", add_bos=False))
    z = last_logits(llm)
    proc = bat.processor(eta=0.0009, mode=mode, seed=1)
    break_sampler(proc, mode, after=1)
    out = proc(None, z.copy())
    assert np.isfinite(out).sum() == 1 and int(np.argmax(out)) == int(np.argmax(z))
    assert proc.stats.errors == 1 and proc.error is not None
    for run in ("completion", "stream", "chat", "chat_stream"):
        proc = bat.processor(eta=0.0009, mode=mode, seed=1)
        break_sampler(proc, mode)
        with pytest.raises(bat_core.BatError, match="injected failure"):
            if run == "completion":
                complete(llm, proc, max_tokens=8)
            elif run == "stream":
                list(llm(PROMPTS[0], max_tokens=8, stream=True, **proc.completion_kwargs()))
            else:
                reply = proc.create_chat_completion(
                    [{"role": "user", "content": "Say hello."}], max_tokens=8, stream=run == "chat_stream"
                )
                if run == "chat_stream":
                    list(reply)
        assert proc.stats.errors >= 1
    healthy = bat.processor(eta=0.0009, mode=mode, seed=1)
    assert complete(llm, healthy, max_tokens=8) and healthy.stats.errors == 0 and healthy.error is None


@pytest.mark.parametrize("mode", ["sample", "mask"])
def test_bat_draws_within_a_grammar(llm, bat, mode):
    """A grammar after BAT in llama.cpp's chain: BAT keeps only tokens the grammar allows at each step (llama.cpp
    would otherwise end the process when its grammar meets a step with nothing left), in completions and chat."""
    from llama_cpp import LlamaGrammar

    grammar = LlamaGrammar.from_string('root ::= ("yes" | "no" | "maybe") "."', verbose=False)
    texts = set()
    for seed in range(4):
        proc = bat.processor(eta=0.0009, mode=mode, seed=seed)
        text = complete(llm, proc, "Will it rain tomorrow? Answer:", max_tokens=8, grammar=grammar)
        assert text in ("yes.", "no.", "maybe."), text
        assert proc.stats.grammar_steps == proc.stats.tokens >= 2 and proc.stats.errors == 0
        texts.add(text)
    chat = bat.processor(tau=0.05, mode=mode, seed=0)
    reply = chat.create_chat_completion(
        [{"role": "user", "content": "Give a JSON object with a key a."}],
        max_tokens=24,
        response_format={"type": "json_object"},
    )
    content = reply["choices"][0]["message"]["content"]
    assert content.lstrip().startswith("{") and chat.stats.grammar_steps == chat.stats.tokens > 0
    # without a grammar, no step is restricted
    free = bat.processor(eta=0.0009, mode=mode, seed=0)
    complete(llm, free, max_tokens=4)
    assert free.stats.grammar_steps == 0
