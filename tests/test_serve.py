"""`bat serve` (an OpenAI-compatible server for GGUF on llama-cpp-python) started by the test on 127.0.0.1
with the registry's SmolLM2 and driven with the official `openai` client: completions, chat and streams with
and without BAT, BAT keys at the top level and in vllm_xargs, seeds, refusals with HTTP 400, 8 concurrent
clients, a client that leaves mid-stream, and the server alive at the end."""

import json
import os
import sys
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("llama_cpp.server", reason="bat serve needs llama-cpp-python[server] (scripts/setup.sh)")
openai = pytest.importorskip("openai", reason="the server tests use the official openai client")

from servers import free_port, healthy, start, stop

PROMPTS = ["Once upon a time", "The capital of France is", "My favourite food is", "In 1905,"]
MODEL = "SmolLM2-135M-Instruct.Q4_1"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "bat_llamacpp.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n-ctx",
        "1024",
    ]
    log = open(tmp_path_factory.mktemp("bat-serve") / "server.log", "w+")
    process = start(cmd, dict(os.environ), log, base, "bat serve", deadline_s=180)
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
        yield {"client": client, "base": base, "process": process, "log": log}
    finally:
        stop(process)
        log.close()


def health(server) -> dict:
    with urllib.request.urlopen(server["base"] + "/health", timeout=10) as response:
        return json.loads(response.read())


def complete(client, prompt, max_tokens=16, **extra):
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, extra_body=extra or None)


def streamed(client, prompt, max_tokens=16, **extra):
    """(text, the `bat` field of the final chunk) of a streamed completion."""
    text, stats = "", None
    for chunk in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=max_tokens, stream=True, extra_body=extra or None
    ):
        text += chunk.choices[0].text
        stats = (chunk.model_extra or {}).get("bat", stats)
    return text, stats


def chat(client, content, max_tokens=16, stream=False, **extra):
    messages = [{"role": "user", "content": content}]
    out = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, stream=stream, extra_body=extra or None
    )
    if not stream:
        return out.choices[0].message.content, out.model_extra.get("bat")
    text, stats = "", None
    for chunk in out:
        text += chunk.choices[0].delta.content or "" if chunk.choices else ""
        stats = (chunk.model_extra or {}).get("bat", stats)
    return text, stats


@pytest.mark.slow
def test_models_and_health(server):
    assert [m.id for m in server["client"].models.list().data] == [MODEL]
    state = health(server)
    assert state["status"] == "ok" and state["bat"] == "ready" and state["model"].endswith(".gguf")


@pytest.mark.slow
def test_bat_completion_reproduces_with_statistics_and_either_key_form(server):
    client = server["client"]
    first = complete(client, PROMPTS[0], max_tokens=24, bat_eta=0.0009, bat_seed=3)
    stats = first.model_extra["bat"]
    assert first.choices[0].text
    assert stats["mode"] == "sample" and stats["rule"] == {"kind": "eta", "value": 0.0009} and stats["seed"] == 3
    assert stats["tokens"] >= first.usage.completion_tokens and stats["decisions"] >= stats["tokens"]
    assert stats["errors"] == 0 and 0 <= stats["unproven"] <= stats["decisions"]
    assert stats["by_threshold"] + stats["by_certificate"] + stats["by_lp"] + stats["unproven"] == stats["decisions"]
    again = complete(client, PROMPTS[0], max_tokens=24, bat_eta=0.0009, bat_seed=3)
    nested = complete(client, PROMPTS[0], max_tokens=24, vllm_xargs={"bat_eta": 0.0009, "bat_seed": 3})
    assert again.choices[0].text == first.choices[0].text == nested.choices[0].text
    # the request's own `seed` seeds BAT when bat_seed is absent; a stream gives the same text and statistics
    by_seed = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=24, seed=3, extra_body={"bat_eta": 0.0009}
    )
    text, streamed_stats = streamed(client, PROMPTS[0], max_tokens=24, bat_eta=0.0009, bat_seed=3)
    assert by_seed.choices[0].text == text == first.choices[0].text
    assert streamed_stats["tokens"] == stats["tokens"] and streamed_stats["below_tau"] == stats["below_tau"]


@pytest.mark.slow
def test_bat_text_equals_the_in_process_adapter(server):
    """The server's BAT completion is the llama.cpp adapter's completion of the same prompt and seed."""
    from llama_cpp import Llama

    from bat_llamacpp import BatLlama
    from bat_models import smollm2_path

    llm = Llama(model_path=smollm2_path(), n_ctx=1024, verbose=False, n_threads=os.cpu_count())
    proc = BatLlama(llm).processor(tau=0.1, seed=11)
    local = llm.create_completion(PROMPTS[1], max_tokens=20, **proc.completion_kwargs())["choices"][0]["text"]
    remote = complete(server["client"], PROMPTS[1], max_tokens=20, bat_tau=0.1, bat_seed=11)
    assert remote.choices[0].text == local
    assert remote.model_extra["bat"]["below_tau"] == proc.stats.below_tau


@pytest.mark.slow
def test_mask_mode_chat_and_chat_stream(server):
    client = server["client"]
    masked = complete(client, PROMPTS[2], max_tokens=16, bat_eta=0.02, bat_mode="mask", bat_seed=5)
    assert masked.choices[0].text and masked.model_extra["bat"]["mode"] == "mask"
    assert masked.model_extra["bat"]["mask_candidates"] == 4
    one = complete(client, PROMPTS[2], max_tokens=16, bat_eta=0.02, bat_mode="mask", bat_mask_candidates=1)
    assert one.model_extra["bat"]["mask_candidates"] == 1 and one.model_extra["bat"]["decisions"] <= 16
    assert (
        masked.choices[0].text
        == complete(client, PROMPTS[2], max_tokens=16, bat_eta=0.02, bat_mode="mask", bat_seed=5).choices[0].text
    )
    text, stats = chat(client, "Name a colour.", bat_epsilon=0.0003, bat_seed=2)
    assert text and stats["tokens"] >= 1 and stats["errors"] == 0
    assert chat(client, "Name a colour.", stream=True, bat_epsilon=0.0003, bat_seed=2)[0] == text
    plain, plain_stats = chat(client, "Name a colour.")
    assert plain and plain_stats is None  # no BAT keys: llama.cpp's own samplers, no `bat` field


@pytest.mark.slow
def test_bad_settings_are_refused_with_400_and_the_server_goes_on(server):
    client = server["client"]
    for extra, words in (
        ({"bat_eta": 2.0}, "bat_eta.*out of range"),
        ({"bat_eta": 0.001, "bat_tau": 0.1}, "exactly one"),
        ({"bat_eta": 0.001, "bat_mode": "greedy"}, "bat_mode"),
        ({"bat_etta": 0.001}, "unknown"),
        ({"bat_eta": 0.001, "bat_seed": "x"}, "bat_seed"),
        ({"bat_eta": 0.001, "bat_time_budget": 30}, "BAT_MAX_TIME_BUDGET"),
        ({"bat_eta": 0.001, "vllm_xargs": {"bat_eta": 0.002}}, "given twice"),
        ({"bat_eta": 0.001, "logit_bias": {"42": 1.0}}, "logit_bias"),
        ({"bat_eta": 0.001, "bat_mode": "mask", "bat_mask_candidates": 100}, "bat_mask_candidates"),
    ):
        with pytest.raises(openai.BadRequestError, match=words):
            complete(client, "Is it raining?", max_tokens=4, **extra)
    with pytest.raises(openai.BadRequestError, match="bat_tau"):
        chat(client, "Hi", bat_tau=-1)
    assert complete(client, "Is it raining?", max_tokens=4, logit_bias={"42": 1.0}).choices[0].text is not None
    assert complete(client, PROMPTS[3], max_tokens=4, bat_tau=0.1).choices[0].text


@pytest.mark.slow
def test_eight_concurrent_clients_get_their_own_seeded_text(server):
    """Requests queue for the one model: each of 8 concurrent clients (completions, streams, chat, plain) gets
    exactly the text its settings give when sent alone."""
    client = server["client"]
    jobs = (
        [("complete", PROMPTS[i % 4], i) for i in range(4)]
        + [("stream", PROMPTS[i % 4], 10 + i) for i in range(2)]
        + [("chat", "Say something about the sea.", 20), ("plain", PROMPTS[0], None)]
    )

    def run(job):
        kind, prompt, seed = job
        if kind == "complete":
            return complete(client, prompt, max_tokens=16, bat_eta=0.0009, bat_seed=seed).choices[0].text
        if kind == "stream":
            return streamed(client, prompt, max_tokens=16, bat_eta=0.0009, bat_seed=seed)[0]
        if kind == "chat":
            return chat(client, prompt, bat_eta=0.0009, bat_seed=seed)[0]
        return complete(client, prompt, max_tokens=16).choices[0].text

    alone = [run(job) for job in jobs]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(run, jobs))
    assert together[:-1] == alone[:-1]  # the plain request is unseeded: its text is llama.cpp's draw
    assert together[-1]


@pytest.mark.slow
def test_a_client_that_leaves_mid_stream_frees_the_model(server):
    client = server["client"]
    before = health(server)["requests"]["cancelled_streams"]
    stream = client.completions.create(
        model=MODEL,
        prompt="List every number from one to a thousand:",
        max_tokens=900,
        stream=True,
        extra_body={"bat_eta": 0.0009, "bat_seed": 1},
    )
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    done = threading.Event()
    text = []

    def after():
        text.append(complete(client, PROMPTS[0], max_tokens=4, bat_eta=0.0009).choices[0].text)
        done.set()

    threading.Thread(target=after, daemon=True).start()
    assert done.wait(240) and text[0]
    state = health(server)["requests"]
    assert state["cancelled_streams"] == before + 1 and state["active"] == 0 and state["waiting"] == 0


@pytest.mark.slow
def test_server_alive_at_the_end(server):
    assert server["process"].poll() is None and healthy(server["base"])
    assert health(server)["requests"]["failed"] == 0
