"""`bat serve` throughput: BAT against plain eta on the same server, same prompts, seeds and lengths.

    python benchmarks/bench_serve.py --requests 16 --concurrency 1 4 --max-tokens 48

Starts `bat serve` (SmolLM2-135M-Instruct from the registry) on 127.0.0.1 and sends completions with the
official openai client. Per concurrency level, in rotating order: BAT (`bat_eta`, sample mode), plain eta
through the same hook (`bat_mode: threshold`) and llama.cpp's own samplers (no BAT keys, temperature 1, no
top-k/top-p/min-p). Tokens/s counts the completion tokens the server reports over the wall time of the
batch. Prints a table and the ratios, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from bench_prompts import CYCLED as PROMPTS

KINDS = {
    "bat": {"bat_eta": 0.0009},
    "plain_eta": {"bat_eta": 0.0009, "bat_mode": "threshold"},
    "llama_samplers": {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0},
}


def start_server(port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bat_llamacpp.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return process
        except OSError:
            time.sleep(1)
    os.killpg(process.pid, signal.SIGKILL)
    raise SystemExit("bat serve did not come up in 180 s")


def run_batch(client, kind: str, requests: int, concurrency: int, max_tokens: int) -> dict:
    def one(i: int) -> tuple[int, dict | None]:
        out = client.completions.create(
            model="default",
            prompt=PROMPTS[i % len(PROMPTS)],
            max_tokens=max_tokens,
            extra_body={**KINDS[kind], "seed": i},
        )
        return out.usage.completion_tokens, out.model_extra.get("bat")

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    seconds = time.perf_counter() - start
    tokens = sum(n for n, _ in results)
    row = {
        "kind": kind,
        "concurrency": concurrency,
        "requests": requests,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds,
    }
    stats = [s for _, s in results if s and "decisions" in s]
    if stats:
        row.update(
            {
                key: sum(s[key] for s in stats)
                for key in ("decisions", "by_threshold", "by_certificate", "unproven", "below_tau")
            }
        )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "serve_smollm2.json"))
    args = parser.parse_args()

    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = start_server(port)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
        run_batch(client, "bat", 2, 1, 8)  # warm-up
        rows = []
        for concurrency in args.concurrency:
            for kind in KINDS:
                rows.append(run_batch(client, kind, args.requests, concurrency, args.max_tokens))
                print(f"  {kind:>14} x{concurrency}: {rows[-1]['tokens_per_second']:.1f} tokens/s", file=sys.stderr)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    print(f"{'concurrency':>11} {'BAT tok/s':>10} {'plain eta':>10} {'llama.cpp':>10} {'BAT/eta':>8} {'unproven':>9}")
    for concurrency in args.concurrency:
        by = {r["kind"]: r for r in rows if r["concurrency"] == concurrency}
        bat, eta, own = by["bat"], by["plain_eta"], by["llama_samplers"]
        print(
            f"{concurrency:>11} {bat['tokens_per_second']:>10.1f} {eta['tokens_per_second']:>10.1f} "
            f"{own['tokens_per_second']:>10.1f} {bat['tokens_per_second'] / eta['tokens_per_second']:>8.2f} "
            f"{bat.get('unproven', 0):>4}/{bat.get('decisions', 0)}"
        )
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "args": vars(args),
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
