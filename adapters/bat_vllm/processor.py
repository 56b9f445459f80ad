"""BAT as a vLLM v1 logits processor.

    from vllm import LLM, SamplingParams
    llm = LLM(model=FOLDER, logits_processors=["bat_vllm:BatLogitsProcessor"])
    params = SamplingParams(max_tokens=64, extra_args={"bat_eta": 0.0009, "bat_seed": 1})

    vllm serve FOLDER --logits-processors bat_vllm:BatLogitsProcessor
    curl ... -d '{"prompt": "...", "vllm_xargs": {"bat_eta": 0.0009, "bat_seed": 1}}'

Per-request settings (flat keys, the same in `extra_args` and `vllm_xargs`): exactly one of `bat_eta`,
`bat_epsilon`, `bat_tau`; optional `bat_mode` ("sample", "mask", or "threshold": the plain rule
without BAT), `bat_seed` (default: the request's own seed), `bat_time_budget` (seconds per
decision for the exact path's later stages, least-squares proofs and LPs; default 0: certificate
search only).
A request without `bat_` keys is not touched. The processor keeps one core `BatSampler` per BAT
request, keyed by its row in vLLM's persistent batch, and follows vLLM's added / removed / moved
bookkeeping; the sampler (and its HiGHS model, if it ever needed one) is freed when the request leaves.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

import bat_core
from bat_core import BatError, ThresholdRule
from bat_core.threads import usable_cores

RULE_KEYS = {"bat_eta": "eta", "bat_epsilon": "epsilon", "bat_tau": "tau"}
KEYS = set(RULE_KEYS) | {"bat_mode", "bat_seed", "bat_time_budget"}
MODES = ("sample", "mask", "threshold")  # threshold: the plain rule without BAT (a baseline)
# relative span residual at first use: float32 engines give ~1e-6, 16-bit ones ~1e-3
SPAN_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 3e-2}

logger = logging.getLogger(__name__)
_bases: dict[str, bat_core.Basis] = {}
_bases_lock = threading.Lock()
_engines: set[int] = set()  # vllm_config ids that already have an active BAT processor
_instances: weakref.WeakSet = weakref.WeakSet()


def active_processors() -> list[BatLogitsProcessor]:
    """The acting BAT processors of the engines in this process (for monitoring and tests)."""
    return [p for p in list(_instances) if p.active]


@dataclass(frozen=True)
class RequestSettings:
    rule: ThresholdRule
    mode: str
    seed: int | None
    time_budget: float


def settings_from(params: Any) -> RequestSettings | None:
    """The request's BAT settings, None when it asks for no BAT; BatError on bad settings."""
    extra = getattr(params, "extra_args", None) or {}
    keys = {k for k in extra if isinstance(k, str) and k.startswith("bat_")}
    if not keys:
        return None
    unknown = sorted(keys - KEYS)
    if unknown:
        raise BatError(f"unknown BAT setting(s) {unknown}: use {sorted(KEYS)}")
    rules = [k for k in RULE_KEYS if k in extra]
    if len(rules) != 1:
        raise BatError(f"give exactly one of bat_eta, bat_epsilon, bat_tau (got {rules or 'none'})")
    try:
        value = float(extra[rules[0]])
    except (TypeError, ValueError) as exc:
        raise BatError(f"{rules[0]}={extra[rules[0]]!r} is not a number") from exc
    rule = ThresholdRule(RULE_KEYS[rules[0]], value)
    conflicts = [name for name, used in (
        ("logit_bias", bool(getattr(params, "logit_bias", None))),
        ("allowed_token_ids", bool(getattr(params, "allowed_token_ids", None))),
        ("bad_words", bool(getattr(params, "bad_words", None))),
        ("min_tokens", bool(getattr(params, "min_tokens", 0))),
    ) if used]
    if conflicts:
        raise BatError(
            f"BAT needs the model's raw logits, but {', '.join(conflicts)} change them before any custom "
            "processor runs in vLLM; drop those settings for BAT requests"
        )
    mode = extra.get("bat_mode", "sample")
    if mode not in MODES:
        raise BatError(f"bat_mode={mode!r}: use 'sample' (the paper's sampler), 'mask', or 'threshold' (no BAT)")
    if "bat_seed" in extra and int(getattr(params, "n", 1) or 1) > 1:
        raise BatError(
            "bat_seed with n > 1 would give n identical samples: set vLLM's `seed` instead (vLLM gives each "
            "of the n sequences seed + index, and BAT uses it when bat_seed is absent)"
        )
    seed = extra.get("bat_seed", getattr(params, "seed", None))
    if seed is not None:
        try:
            seed = int(seed)
        except (TypeError, ValueError) as exc:
            raise BatError(f"bat_seed={seed!r} is not an integer") from exc
        if seed < 0:
            raise BatError(f"bat_seed={seed} must be a non-negative integer")
    try:
        budget = float(extra.get("bat_time_budget", 0.0))
    except (TypeError, ValueError) as exc:
        raise BatError(f"bat_time_budget={extra['bat_time_budget']!r} is not a number of seconds") from exc
    if not 0.0 <= budget <= 60.0:
        raise BatError(f"bat_time_budget={budget} must lie in [0, 60] seconds (0: certificate search only)")
    return RequestSettings(rule, mode, seed, budget)


def read_output_matrix(model: str) -> tuple[np.ndarray, np.ndarray | None]:
    """W (and bias) as the engine loaded it: `lm_head.weight`, else the tied `model.embed_tokens.weight`,
    from the local checkpoint folder (safetensors, sharded or not) or a GGUF file."""
    if os.path.isfile(model) and model.endswith(".gguf"):
        from bat_llamacpp.gguf_weights import read_output_layer

        layer = read_output_layer(model)
        return layer.W, layer.bias
    if not os.path.isdir(model):
        raise BatError(
            f"BAT reads W from the checkpoint the engine loaded, but {model!r} is not a local folder: "
            "download the model and serve it from its folder"
        )
    from safetensors import safe_open

    index = os.path.join(model, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as handle:
            where = json.load(handle)["weight_map"]
    else:
        single = os.path.join(model, "model.safetensors")
        if not os.path.isfile(single):
            raise BatError(f"no model.safetensors (or index) in {model}: BAT needs the safetensors checkpoint")
        with safe_open(single, framework="pt") as handle:
            where = {name: "model.safetensors" for name in handle.keys()}
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        if name in where:
            with safe_open(os.path.join(model, where[name]), framework="pt") as handle:
                W = handle.get_tensor(name).float().numpy()
                bias_name = name.replace(".weight", ".bias")
                bias = handle.get_tensor(bias_name).float().numpy() if bias_name in handle.keys() else None
            return W, bias
    raise BatError(f"{model} has neither lm_head.weight nor model.embed_tokens.weight: no output matrix found")


def basis_for(model: str) -> bat_core.Basis:
    """One Basis per checkpoint and process (vLLM may build the processor twice: entry point and argument)."""
    key = os.path.realpath(model)
    with _bases_lock:
        if key not in _bases:
            W, bias = read_output_matrix(model)
            _bases[key] = bat_core.Basis(W, bias=bias)
        return _bases[key]


@dataclass
class RequestState:
    sampler: bat_core.BatSampler
    mode: str
    errors: int = 0  # steps at which BAT raised for this request (see _after_failure)


class BatLogitsProcessor(LogitsProcessor):
    """Batch-aware BAT for vLLM's v1 engine (see the module docstring)."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        try:
            settings_from(sampling_params)
        except BatError as exc:
            raise ValueError(str(exc)) from exc  # vLLM turns this into HTTP 400

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        # registered as an entry point AND passed in logits_processors=, vLLM builds the class twice for
        # one engine: only the first instance acts, so BAT runs once per step
        with _bases_lock:
            self.active = id(vllm_config) not in _engines
            _engines.add(id(vllm_config))
            _instances.add(self)
        model_config = vllm_config.model_config
        self.model = model_config.model
        self.vocab_size = int(model_config.get_vocab_size())
        self.span_tolerance = SPAN_TOLERANCE.get(model_config.dtype, 3e-2)
        self.requests: dict[int, RequestState] = {}
        self._basis: bat_core.Basis | None = None
        self._span_checked = False
        self.record_dir = os.environ.get("BAT_VLLM_RECORD_DIR")  # tests: every sub-tau token's proof
        # "auto": BAT's product over the vocabulary runs on the GPU the logits are on; "cpu": on the host
        self.matvec_policy = os.environ.get("BAT_MATVEC_DEVICE", "auto")
        if self.matvec_policy not in ("auto", "cpu"):
            raise BatError(f"BAT_MATVEC_DEVICE={self.matvec_policy!r}: use 'auto' (the logits' GPU) or 'cpu'")
        self._row_pool: ThreadPoolExecutor | None = None  # BAT rows decided in parallel (GPU logits)
        row_threads = os.environ.get("BAT_ROW_THREADS", "0") or "0"
        if not row_threads.isdigit() or int(row_threads) > 64:
            raise BatError(f"BAT_ROW_THREADS={row_threads!r}: use a thread count from 1 to 64 (0 or unset: automatic)")
        self.row_threads = int(row_threads)
        self.apply_seconds = 0.0  # wall time in apply (BAT requests present)
        self.totals: dict[str, float] = {}  # decisions of the requests that left (core BatStats summed)

    @property
    def basis(self) -> bat_core.Basis:
        """W is read at the first BAT request (the processor is built before the model is loaded)."""
        if self._basis is None:
            # BAT's numpy work gets the engine's own share of the cores (vLLM's CPU backend keeps one
            # core for serving): spinning BLAS threads halved the engine's throughput on 2 cores
            bat_core.limit_blas_threads()
            bat_core.set_matvec_threads(torch.get_num_threads())
            basis = basis_for(self.model)
            if basis.vocab_size != self.vocab_size:
                raise BatError(
                    f"vocabulary mismatch: the output matrix of {self.model} has {basis.vocab_size} rows, "
                    f"the engine's vocabulary {self.vocab_size}"
                )
            self._basis = basis
        return self._basis

    def is_argmax_invariant(self) -> bool:
        return False  # BAT must see the logits before temperature, and may change the argmax draw

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None or not self.active:
            return
        for index in batch_update.removed:
            self._retire(self.requests.pop(index, None))
        for index, params, _, _ in batch_update.added:
            settings = settings_from(params)
            self._retire(self.requests.pop(index, None))
            if settings is None:
                continue
            config = bat_core.BatConfig.for_generation(settings.time_budget)
            sampler = bat_core.BatSampler(self.basis, settings.rule, seed=settings.seed, config=config)
            self.requests[index] = RequestState(sampler, settings.mode)
        for a, b, direction in batch_update.moved:
            first, second = self.requests.pop(a, None), self.requests.pop(b, None)
            if first is not None:
                self.requests[b] = first
            if direction == MoveDirectionality.SWAP:
                if second is not None:
                    self.requests[a] = second
            else:
                self._retire(second)  # a one-way move overwrites b

    def _retire(self, state: RequestState | None) -> None:
        if state is None:
            return
        for key, value in state.sampler.stats.as_dict().items():
            if isinstance(value, (int, float)):
                self.totals[key] = self.totals.get(key, 0) + value
        self.totals["errors"] = self.totals.get("errors", 0) + state.errors

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.requests:
            return logits  # requests without BAT cost nothing
        start = time.perf_counter()
        try:
            return self._apply(logits)
        finally:
            self.apply_seconds += time.perf_counter() - start

    def _apply(self, logits: torch.Tensor) -> torch.Tensor:
        rows = sorted(self.requests)
        raw = logits[rows].float().cpu().numpy()
        if not self._span_checked:
            residual = self.basis.span_residual(raw[0])
            if not residual < self.span_tolerance:
                raise BatError(
                    f"the engine's logits are not explained by the output matrix of {self.model} (relative "
                    f"residual {residual:.2g} > {self.span_tolerance}): BAT refuses to sample on them"
                )
            self._span_checked = True
            if logits.is_cuda and self.matvec_policy == "auto":
                self._product_on(logits.device)
            self._start_row_threads(logits.is_cuda)

        def decide_row(k: int) -> np.ndarray:
            state = self.requests[rows[k]]
            try:
                return self._allowed_tokens(state, raw[k])
            except Exception as exc:  # one request's failure must not fail the step of every other request
                return self._after_failure(state, raw[k], exc)

        decided: dict[int, np.ndarray] = {}
        if self._row_pool is not None:
            # rows that may need decisions go to the threads; plain-rule rows are all small numpy
            # operations, which threads only slow down (measured: 8.0 -> 11.3 ms per step at 32 rows)
            threaded = [k for k, index in enumerate(rows) if self.requests[index].mode != "threshold"]
            if len(threaded) > 1:
                decided = dict(zip(threaded, self._row_pool.map(decide_row, threaded)))
        keep_rows = [decided[k] if k in decided else decide_row(k) for k in range(len(rows))]
        # three tensor operations for the whole batch, whatever the number of rows
        row_ids = torch.as_tensor(np.repeat(rows, [len(keep) for keep in keep_rows]), device=logits.device)
        token_ids = torch.as_tensor(np.concatenate(keep_rows), device=logits.device)
        kept = logits[row_ids, token_ids]
        logits[torch.as_tensor(rows, device=logits.device)] = float("-inf")
        logits[row_ids, token_ids] = kept
        return logits

    def _start_row_threads(self, gpu_logits: bool) -> None:
        """With the logits on a GPU the host's cores are free while BAT decides: the rows (requests) are
        decided in parallel, each request on its own sampler and generator, so a seed gives the same
        text. Next to vLLM's CPU backend they stay on one thread (more threads took the cores the engine
        decodes on). BAT_ROW_THREADS sets the count either way."""
        threads = self.row_threads or (min(8, usable_cores()) if gpu_logits else 1)
        if threads > 1:
            self.basis.whitening()  # every decision's least squares reads it: built before the threads start
            self._row_pool = ThreadPoolExecutor(threads, thread_name_prefix="bat-rows")

    def _product_on(self, device: torch.device) -> None:
        """BAT's product over the vocabulary on the logits' GPU: a float32 copy of W there, outside
        vLLM's memory budget. Without room for it the product stays on numpy (same decisions, slower)."""
        try:
            self.basis.set_matvec_device(device)
        except torch.OutOfMemoryError:
            logger.warning("no GPU memory for BAT's copy of W (%.0f MB): its product over the vocabulary "
                           "stays on the CPU; lower gpu_memory_utilization to give it room",
                           4 * self.basis.vocab_size * self.basis.hidden_size / 1e6)

    def _allowed_tokens(self, state: RequestState, z: np.ndarray) -> np.ndarray:
        """The token ids this request may sample at this step (one id in sample mode)."""
        if state.mode == "threshold":
            p, tau = state.sampler.rule.probabilities_and_tau(z[: self.vocab_size])
            return np.flatnonzero(bat_core.truncate_mask(p, tau))
        if state.mode == "sample":
            result = state.sampler.sample(z)
            if self.record_dir and result.below_tau and not result.fell_back_to_argmax:
                self._record(z, result)
            return np.array([result.token])
        return np.flatnonzero(state.sampler.mask(z).mask)

    def _after_failure(self, state: RequestState, z: np.ndarray, exc: Exception) -> np.ndarray:
        """A request whose BAT step raised keeps only its most probable token (the one token BAT always
        allows), is logged once and counted in `totals["errors"]`; the other rows go on as usual."""
        state.errors += 1
        if state.errors == 1:
            logger.warning("BAT failed on one request (%s: %s); it keeps only its most probable token at "
                           "each step that fails, the other requests are not affected", type(exc).__name__, exc)
        finite = np.where(np.isfinite(z[: self.vocab_size]), z[: self.vocab_size], -np.inf)
        return np.array([int(np.argmax(finite))])

    def _record(self, z: np.ndarray, result: bat_core.SampleResult) -> None:
        cert = result.decisions[-1].certificate
        if cert is None:
            return
        os.makedirs(self.record_dir, exist_ok=True)
        name = f"{os.getpid()}-{id(result)}-{result.token}.npz"
        np.savez(os.path.join(self.record_dir, name), logits=z, token=result.token, tau=result.tau, y=cert.y)
