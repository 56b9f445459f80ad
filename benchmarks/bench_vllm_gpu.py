"""The vLLM processor with logits on the GPU: overhead per engine step, driven without the engine.

vLLM's GPU build cannot be installed on the lent GPU machine (no network there), so this drives the
processor's own `update_state` / `apply` with realistic batches, as vLLM's GPU runner would:

    python benchmarks/bench_vllm_gpu.py prepare            # here (CPU): writes .cache/gpu-pack
    python benchmarks/bench_vllm_gpu.py run --pack .cache/gpu-pack   # on the GPU machine

`prepare` packs SmolLM2-135M's output matrix W exactly as the registry GGUF stores it (Q8_0 blocks:
int8 values and float16 scales, 30 MB instead of 113 MB of float32) and the model's final hidden
states along sampled continuations of the bench_vllm prompts (one per request and step). `run`
rebuilds W, writes it as the checkpoint the processor reads, and at every step computes the batch's
logits on the device (hidden states @ W^T, float32) and times `apply` alone, with the device
synchronised before and after. Modes: BAT (eta, eps 0.0009), plain eta through the same processor
(`bat_mode="threshold"`), and a batch without BAT requests. Each runs in five variants, each its own
processor: logits on the CPU (the same-machine baseline), with rows one by one and in parallel; logits
on the GPU with the product over the vocabulary on the host, on the GPU with rows one by one, and the
defaults (GPU product, rows in parallel). Every variant must allow the same tokens at every step (the
table's "differ" count). Then: the cost of moving the logits to the CPU, the GPU product's error
against the certificates' rounding bound, and the core's certificate-search times with either product.
Where vLLM itself is not importable, the three vLLM types the processor uses (LogitsProcessor,
BatchUpdate, MoveDirectionality) are stood in by classes of the same shape; the JSON says which ran.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "adapters"), os.path.join(HERE, "..")]
from bench_vllm import PROMPTS

Q8_BLOCK = 32  # GGUF Q8_0: 32 int8 values per float16 scale


# ----------------------------------------------------------------------------------------- prepare
def q8_0_parts(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values [v, d], float16 scales [v, d/32]) of a GGUF Q8_0 tensor's raw bytes [v, d/32*34]."""
    blocks = raw.reshape(raw.shape[0], -1, 2 + Q8_BLOCK)
    scales = np.ascontiguousarray(blocks[:, :, :2]).view(np.float16)[:, :, 0]
    values = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).reshape(raw.shape[0], -1)
    return values, scales


def dequantize_q8_0(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    v, d = values.shape
    blocks = values.reshape(v, d // Q8_BLOCK, Q8_BLOCK).astype(np.float32) * scales.astype(np.float32)[:, :, None]
    return blocks.reshape(v, d)


def prepare(out: str, requests: int, steps: int) -> None:
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bat_models import output_layer, smollm2_hf_folder, smollm2_path

    path = smollm2_path()
    [tensor] = [t for t in GGUFReader(path).tensors if t.name == "token_embd.weight"]
    if tensor.tensor_type.name != "Q8_0":
        raise SystemExit(f"expected a Q8_0 output matrix in {path}, found {tensor.tensor_type.name}")
    values, scales = q8_0_parts(np.asarray(tensor.data))
    W = dequantize_q8_0(values, scales)
    if not np.array_equal(W, output_layer(path).W):
        raise SystemExit("the packed W differs from the GGUF reader's W")
    folder = smollm2_hf_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    engine_W = model.get_output_embeddings().weight.detach().numpy()
    if not np.array_equal(W, engine_W):
        raise SystemExit("the packed W differs from the engine checkpoint's output matrix")
    hidden = np.empty((requests, steps, W.shape[1]), np.float32)
    worst = 0.0
    for k in range(requests):
        ids = tokenizer(PROMPTS[k % len(PROMPTS)], return_tensors="pt").input_ids
        torch.manual_seed(k)
        with torch.no_grad():
            text = model.generate(
                ids,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=steps,
                min_new_tokens=steps,
                pad_token_id=tokenizer.eos_token_id,
            )
            run = model(text[:, :-1], output_hidden_states=True)
        start = ids.shape[1] - 1  # the state after the prompt's last token gives the first new token
        states = run.hidden_states[-1][0, start : start + steps]
        logits = run.logits[0, start : start + steps]
        worst = max(worst, float((states @ torch.from_numpy(W).T - logits).abs().max()))
        hidden[k] = states.numpy()
        print(f"[prepare] request {k + 1}/{requests}", end="\r", file=sys.stderr, flush=True)
    if worst > 1e-3:
        raise SystemExit(f"hidden states @ W^T differ from the model's logits by {worst:.3g}")
    os.makedirs(out, exist_ok=True)
    np.savez(os.path.join(out, "pack.npz"), values=values, scales=scales, hidden=hidden)
    print(
        f"\nwrote {out}/pack.npz: W {W.shape} as Q8_0, hidden states {hidden.shape} "
        f"(|hidden @ W^T - logits| <= {worst:.2g})"
    )


# --------------------------------------------------------------------------------------------- run
def vllm_types() -> str:
    """Import vLLM's processor interface, or register classes of the same shape where vLLM is absent."""
    try:
        import vllm
        import vllm.v1.sample.logits_processor  # noqa: F401

        return f"vllm {vllm.__version__}"
    except ImportError:
        pass
    import abc
    import enum
    import types
    from dataclasses import dataclass

    class MoveDirectionality(enum.Enum):
        UNIDIRECTIONAL = enum.auto()
        SWAP = enum.auto()

    @dataclass(frozen=True)
    class BatchUpdate:
        batch_size: int
        removed: list
        added: list
        moved: list

    class LogitsProcessor(abc.ABC):  # noqa: B024 - a stand-in with the base class's name only
        @classmethod
        def validate_params(cls, sampling_params):
            return None

    module = types.ModuleType("vllm.v1.sample.logits_processor")
    module.MoveDirectionality, module.BatchUpdate, module.LogitsProcessor = (
        MoveDirectionality,
        BatchUpdate,
        LogitsProcessor,
    )
    for name in ("vllm", "vllm.v1", "vllm.v1.sample"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["vllm.v1.sample.logits_processor"] = module
    return "stand-in types (vLLM not installed)"


def request_params(mode: str | None, seed: int, eps: float) -> object:
    extra = None if mode is None else {"bat_eta": eps, "bat_mode": mode, "bat_seed": seed}
    try:
        from vllm import SamplingParams

        return SamplingParams(max_tokens=1, seed=seed, extra_args=extra)
    except ImportError:
        return SimpleNamespace(
            extra_args=extra, seed=seed, n=1, logit_bias=None, allowed_token_ids=None, bad_words=None, min_tokens=0
        )


def product_check(basis, device, trials: int = 20) -> dict:
    """The device's float32 product W y against float64, as a share of the certificates' rounding bound,
    with TensorFloat-32 matrix products allowed and not (the core's device product must not depend on
    that global setting); and its time against numpy's."""
    import torch

    from bat_core.certify import float32_gamma

    d = basis.hidden_size
    gamma = float32_gamma(d)
    rng = np.random.default_rng(0)
    ys = [rng.standard_normal(d).astype(np.float32) * 10.0 ** rng.uniform(-3, 3) for _ in range(trials)]
    result = {}
    before = torch.get_float32_matmul_precision()
    try:
        for precision in ("highest", "high"):  # "high" lets torch use TensorFloat-32 in float32 products
            torch.set_float32_matmul_precision(precision)
            basis.set_matvec_device(device)
            worst = 0.0
            for y in ys:
                exact = np.zeros(basis.vocab_size)
                for lo in range(0, basis.vocab_size, 8192):
                    exact[lo : lo + 8192] = basis.W[lo : lo + 8192].astype(np.float64) @ y.astype(np.float64)
                bound = gamma * basis.row_norm * float(np.linalg.norm(y.astype(np.float64)))
                worst = max(worst, float(np.max(np.abs(basis.matvec(y) - exact) / bound)))
            result[f"error_over_bound_{precision}"] = worst
    finally:
        torch.set_float32_matmul_precision(before)
    for name, where in products_compared(device).items():
        basis.set_matvec_device(where)
        basis.matvec(ys[0])
        samples = []
        for y in ys * 3:
            start = time.perf_counter()
            basis.matvec(y)
            samples.append(time.perf_counter() - start)
        result[f"{name}_ms"] = 1000 * float(np.median(samples))
    basis.set_matvec_device(None)
    return result


def products_compared(device) -> dict:
    """The products over the vocabulary compared: numpy's float32, the host default (the compiled int8
    product where its kernel builds, bat_core/q8.py), and torch on the device."""
    return {"numpy": "numpy", "host": None, "device": device}


def core_decisions(basis, logits: np.ndarray, device, candidates: int, seed: int = 0) -> dict:
    """The core's certificate-search decisions (time_budget 0, the adapters' generation default) with the
    product over the vocabulary on numpy, the host default and `device`, candidate by candidate on the same solvers'
    history: sub-threshold tokens drawn from p below tau as bench_core.py draws them."""
    import bat_core

    rules = {"eta_0.0009": bat_core.ThresholdRule("eta", 0.0009), "tau_0.1": bat_core.ThresholdRule("tau", 0.1)}
    products = products_compared(device)
    report = {}
    for name, rule in rules.items():
        rng = np.random.default_rng(seed)
        times = {key: [] for key in products}
        accepted = {key: [] for key in products}
        for trajectory in range(logits.shape[0]):
            solvers = {key: bat_core.BatSolver(basis, bat_core.BatConfig(time_budget=0.0)) for key in products}
            for z in logits[trajectory]:
                step = solvers["numpy"].new_step(z, rule)
                below = np.flatnonzero(step.p < step.tau)
                below = below[below != step.argmax]
                if below.size == 0:
                    continue
                token = int(rng.choice(below, p=step.p[below] / step.p[below].sum()))
                for key, where in products.items():
                    basis.set_matvec_device(where)
                    start = time.perf_counter()
                    decision = solvers[key].decide(solvers[key].new_step(z, rule), [token])[0]
                    times[key].append(time.perf_counter() - start)
                    accepted[key].append(bool(decision.accepted))
            if len(times["numpy"]) >= candidates:
                break
        basis.set_matvec_device(None)
        report[name] = {
            key: {
                "candidates": len(times[key][:candidates]),
                "median_ms": 1000 * float(np.median(times[key][:candidates])),
                "p99_ms": 1000 * float(np.percentile(times[key][:candidates], 99)),
                "accepted": int(sum(accepted[key][:candidates])),
            }
            for key in products
        }
        report[name]["same_decisions"] = all(
            accepted[key][:candidates] == accepted["numpy"][:candidates] for key in products
        )
        print(
            f"core, {name}: "
            + "  ".join(
                f"{key} product median {r['median_ms']:.2f} ms p99 {r['p99_ms']:.1f} ms, "
                f"{r['accepted']}/{r['candidates']} "
                "accepted"
                for key, r in report[name].items()
                if isinstance(r, dict)
            )
            + f"  same decisions: {report[name]['same_decisions']}",
            flush=True,
        )
    return report


def decision_summary(totals: dict) -> str:
    below = totals.get("candidates", 0) - totals.get("by_threshold", 0)
    seconds = totals.get("seconds", 0.0)
    return (
        f"{below:.0f} draws, {totals.get('accepted_below_tau', 0):.0f} accepted, "
        f"{1000 * seconds / max(below, 1):.2f} ms each in the core"
    )


def run(
    pack: str, out: str, concurrency: list[int], steps: int, eps: float, threads: int | None, core_candidates: int
) -> None:
    import torch
    from safetensors.torch import save_file

    if threads:
        torch.set_num_threads(threads)  # the processor gives its product as many threads as torch has
    kind = vllm_types()
    from vllm.v1.sample.logits_processor import BatchUpdate

    import bat_core
    from bat_core.threads import usable_cores
    from bat_vllm.processor import BatLogitsProcessor

    data = np.load(os.path.join(pack, "pack.npz"))
    W = dequantize_q8_0(data["values"], data["scales"])
    hidden = data["hidden"]
    steps = min(steps, hidden.shape[1])
    gpu = torch.device("cuda") if torch.cuda.is_available() else None
    compute = gpu or torch.device("cpu")
    W_dev = torch.from_numpy(W).to(compute)
    hidden_dev = torch.from_numpy(hidden).to(compute)
    # (name, where the logits are, the processor's settings); one processor each for the whole run, as one
    # per engine, each with its own checkpoint folder so that each has its own Basis
    parallel = str(min(8, usable_cores()))
    variants = [
        ("cpu", "cpu", {"BAT_ROW_THREADS": "1"}),
        ("cpu, rows in parallel", "cpu", {"BAT_ROW_THREADS": parallel}),
    ]
    if gpu is not None:
        variants += [
            ("gpu, host product, rows one by one", "cuda", {"BAT_MATVEC_DEVICE": "cpu", "BAT_ROW_THREADS": "1"}),
            ("gpu, rows one by one", "cuda", {"BAT_ROW_THREADS": "1"}),
            ("gpu", "cuda", {}),
        ]  # the defaults: product on the GPU, rows in parallel
    processors, configs = {}, []  # configs kept alive: the processor tells engines apart by their id
    for name, device, settings in variants:
        folder = tempfile.mkdtemp(prefix="bat-gpu-model-")
        save_file({"model.embed_tokens.weight": torch.from_numpy(W)}, os.path.join(folder, "model.safetensors"))
        configs.append(
            SimpleNamespace(
                model_config=SimpleNamespace(model=folder, dtype=torch.float32, get_vocab_size=lambda: W.shape[0])
            )
        )
        saved = {key: os.environ.pop(key, None) for key in ("BAT_MATVEC_DEVICE", "BAT_ROW_THREADS")}
        os.environ.update(settings)
        processors[name] = (BatLogitsProcessor(configs[-1], torch.device(device), False), torch.device(device))
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value

    def sync() -> None:
        if gpu is not None:
            torch.cuda.synchronize()

    def drive(mode: str | None, n: int, name: str, count: int) -> dict:
        """One batch of n requests for `count` steps; apply's wall time per step and the outputs."""
        proc, device = processors[name]
        before = dict(proc.totals)
        rows = [k % hidden.shape[0] for k in range(n)]
        generated = [[] for _ in range(n)]  # vLLM's live output lists: their length is each request's step index
        added = [(k, request_params(mode, k, eps), None, generated[k]) for k in range(n)]
        proc.update_state(BatchUpdate(batch_size=n, removed=[], added=added, moved=[]))
        times, outputs = [], []
        for t in range(count):
            for out in generated:
                out[:] = [0] * t
            logits = (hidden_dev[rows, t] @ W_dev.T).to(device)
            sync()
            start = time.perf_counter()
            result = proc.apply(logits)
            sync()
            times.append(time.perf_counter() - start)
            outputs.append(torch.isfinite(result).cpu())
            proc.update_state(None)
        proc.update_state(BatchUpdate(batch_size=0, removed=list(range(n)), added=[], moved=[]))
        totals = {key: value - before.get(key, 0) for key, value in proc.totals.items()}
        return {"times": times, "outputs": outputs, "totals": totals}

    for name, (proc, _) in processors.items():
        drive("sample", 2, name, 3)  # warm-up: W read, basis built, span check, first transfers
        proc.basis.whitening()  # built at the first decision otherwise (once per model, 0.2-0.4 s)
    table = []
    for n in concurrency:
        for mode in ("sample", "threshold", None):
            runs = {name: drive(mode, n, name, steps) for name in processors}
            row = {"concurrency": n, "mode": mode or "no BAT request", "steps": steps}
            for name, result in runs.items():
                ms = 1000 * np.array(result["times"])
                row[name] = {
                    "median_ms": float(np.median(ms)),
                    "mean_ms": float(ms.mean()),
                    "p90_ms": float(np.percentile(ms, 90)),
                    "max_ms": float(ms.max()),
                    "totals": result["totals"],
                }
                # the same logits and seeds: the same tokens allowed at every step, wherever the logits are
                row[name]["steps_differing_from_cpu"] = sum(
                    not torch.equal(a, b) for a, b in zip(runs["cpu"]["outputs"], result["outputs"])
                )
            table.append(row)
            cells = "  ".join(
                f"{name}: {row[name]['median_ms']:7.3f} / {row[name]['mean_ms']:7.3f} ms "
                f"(differ {row[name]['steps_differing_from_cpu']})"
                for name in runs
            )
            print(f"{n:3d} requests {row['mode']:>15s}  median / mean  {cells}", flush=True)
            if mode == "sample":
                print(
                    "    decisions below tau: "
                    + "  ".join(f"{name}: {decision_summary(row[name]['totals'])}" for name in runs),
                    flush=True,
                )
    checks = {}
    if gpu is not None:
        transfer = {}
        for n in concurrency:
            logits = hidden_dev[[k % hidden.shape[0] for k in range(n)], 0] @ W_dev.T
            samples = []
            for _ in range(50):
                sync()
                start = time.perf_counter()
                logits[list(range(n))].float().cpu().numpy()
                samples.append(time.perf_counter() - start)
            transfer[n] = 1000 * float(np.median(samples))
        checks["logits_to_cpu_ms"] = transfer
        checks["product"] = product_check(processors["gpu"][0].basis, gpu)
        every_row = (hidden_dev @ W_dev.T).cpu().numpy()  # [requests, steps, vocab]
        checks["core"] = core_decisions(processors["gpu"][0].basis, every_row, gpu, core_candidates)
        print("logits to the CPU (median ms): " + ", ".join(f"{n} rows {ms:.3f}" for n, ms in transfer.items()))
        print(f"product over the vocabulary: {json.dumps(checks['product'])}")
    info = {
        "vllm_types": kind,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "matvec_threads": bat_core.threads.matvec_threads(),
        "eps": eps,
        "compiled_product": bat_core.q8.kernel_status(),
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as handle:
        json.dump({"info": info, "rows": table, "checks": checks}, handle, indent=1)
    print(json.dumps(info))
    print(f"wrote {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="pack W and hidden states (needs the set-up's model and transformers)")
    p.add_argument("--out", default=os.path.join(HERE, "..", ".cache", "gpu-pack"))
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--steps", type=int, default=48)
    r = sub.add_parser("run", help="time the processor's apply with logits on the GPU (and the CPU)")
    r.add_argument("--pack", default=os.path.join(HERE, "..", ".cache", "gpu-pack"))
    r.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    r.add_argument("--steps", type=int, default=48)
    r.add_argument("--eps", type=float, default=0.0009)
    r.add_argument("--threads", type=int, default=None, help="torch threads (and so BAT's product threads)")
    r.add_argument("--core-candidates", type=int, default=200, help="per setting, for the core's decision times")
    r.add_argument("--out", default=os.path.join(HERE, "results", "vllm_gpu_smollm2.json"))
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.out, args.requests, args.steps)
    else:
        run(args.pack, args.out, args.concurrency, args.steps, args.eps, args.threads, args.core_candidates)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
