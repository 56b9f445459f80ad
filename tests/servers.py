"""Servers started by the tests on 127.0.0.1: a free port, a health probe, start and stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def start(cmd: list[str], env: dict, log, base: str, name: str, deadline_s: float) -> subprocess.Popen:
    """`cmd` in its own process group, once `base`/health answers 200; the test fails with the log's tail if not."""
    process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + deadline_s
    while not healthy(base):
        if process.poll() is not None or time.time() > deadline:
            stop(process)
            log.seek(0)
            pytest.fail(f"{name} did not come up: {log.read()[-4000:]}")
        time.sleep(1)
    return process


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
