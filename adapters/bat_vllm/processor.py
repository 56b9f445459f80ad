"""BAT as a vLLM v1 logits processor.

    from vllm import LLM, SamplingParams
    llm = LLM(model=FOLDER, logits_processors=["bat_vllm:BatLogitsProcessor"])
    params = SamplingParams(max_tokens=64, extra_args={"bat_eta": 0.0009, "bat_seed": 1})

    vllm serve FOLDER --logits-processors bat_vllm:BatLogitsProcessor
    curl ... -d '{"prompt": "...", "vllm_xargs": {"bat_eta": 0.0009, "bat_seed": 1}}'

Per-request settings (flat keys, the same in `extra_args` and `vllm_xargs`): exactly one of `bat_eta`,
`bat_epsilon`, `bat_tau`; optional `bat_mode` ("sample", "mask", or "threshold": the plain rule
without BAT), `bat_seed` (default: the request's own seed), `bat_time_budget` (seconds per
decision, the exact path's safety-net clock, at most the operator's BAT_MAX_TIME_BUDGET; default
bat_core.GENERATION_TIME_BUDGET, 10 s; 0: certificate search only), `bat_mask_candidates` (mask mode: exact
decisions per step, default 4). Settings that change the logits
before BAT (structured outputs, logit_bias, allowed_token_ids, bad_words, min_tokens) are refused: BAT
needs the raw distribution.

A request without `bat_` keys is not touched. The processor keeps one core `BatSampler` per BAT
request, keyed by its row in vLLM's persistent batch, and follows vLLM's added / removed / moved
bookkeeping. Each step is drawn with the request's step index (its number of output tokens), so a
seed gives the same text whatever else is in the batch (chunked prefill, preemption, reordering).
Nothing BAT does can stop the engine: a failure on one request leaves that request its most probable
token and is counted; the other rows and requests go on (docs/vllm.md).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

import bat_core
from bat_core import BatError
from bat_core.generation import GenerationCounts, kept_tokens, most_probable_token
from bat_core.lp import live_models
from bat_core.solver import live_solvers
from bat_core.threads import usable_cores
from bat_models import basis_for, check_model

from .monitoring import StatsFile, StepTimes, resident_mb
from .settings import asks_for_bat, max_time_budget, settings_from, softcap_of

__all__ = ["BatLogitsProcessor", "active_processors", "settings_from"]

# relative span residual at first use: float32 engines give ~1e-6, 16-bit ones ~1e-3
SPAN_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 3e-2}

logger = logging.getLogger(__name__)
_engines_lock = threading.Lock()
_engines: list[Any] = []  # one entry per engine with an acting BAT processor: a weak reference to its config
_instances: weakref.WeakSet = weakref.WeakSet()


def active_processors() -> list[BatLogitsProcessor]:
    """The acting BAT processors of the engines in this process (for monitoring and tests)."""
    return [p for p in list(_instances) if p.active]


def _first_for_engine(vllm_config: Any) -> bool:
    """Whether no acting BAT processor exists yet for this engine (identity of its config, never a reused id)."""

    def target(entry: Any) -> Any:
        return entry() if isinstance(entry, weakref.ref) else entry

    with _engines_lock:
        _engines[:] = [e for e in _engines if target(e) is not None]
        if any(target(e) is vllm_config for e in _engines):
            return False
        try:
            _engines.append(weakref.ref(vllm_config))
        except TypeError:  # not weakly referable: held, so that its id cannot be reused
            _engines.append(vllm_config)
        return True


# ---------------------------------------------------------------------------------------------- the processor
@dataclass
class RequestState:
    sampler: bat_core.BatSampler | None  # None: BAT could not start for this request (it keeps its argmax)
    mode: str
    output: list  # vLLM's live list of the request's output tokens: its length is the step index
    errors: int = 0  # steps at which BAT failed for this request (see _after_failure)
    last_step: int = -1
    redone: int = 0  # steps seen again (discarded prefill chunks, a re-scheduled step)
    bat_seconds: float = 0.0
    counts: GenerationCounts = field(default_factory=GenerationCounts)  # below tau, mask's undecided mass


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
        self.active = _first_for_engine(vllm_config)
        _instances.add(self)
        model_config = vllm_config.model_config
        self.model = model_config.model
        self.vocab_size = int(model_config.get_vocab_size())
        self.span_tolerance = SPAN_TOLERANCE.get(getattr(model_config, "dtype", None), 3e-2)
        self.requests: dict[int, RequestState] = {}
        self._basis: bat_core.Basis | None = None
        self._span_checked = False
        self.record_dir = os.environ.get("BAT_VLLM_RECORD_DIR")  # tests: every sub-tau token's proof
        self.stats_file = StatsFile(os.environ.get("BAT_VLLM_STATS_FILE"))  # operators, tests: stats() as JSON
        self._stats_changed = False
        # "auto": BAT's product over the vocabulary runs on the GPU the logits are on; "cpu": on the host
        self.matvec_policy = os.environ.get("BAT_MATVEC_DEVICE", "auto")
        if self.matvec_policy not in ("auto", "cpu"):
            raise BatError(f"BAT_MATVEC_DEVICE={self.matvec_policy!r}: use 'auto' (the logits' GPU) or 'cpu'")
        self._row_pool: ThreadPoolExecutor | None = None  # BAT rows decided in parallel (GPU logits)
        row_threads = os.environ.get("BAT_ROW_THREADS", "0") or "0"
        if not row_threads.isdigit() or int(row_threads) > 64:
            raise BatError(f"BAT_ROW_THREADS={row_threads!r}: use a thread count from 1 to 64 (0 or unset: automatic)")
        self.row_threads = int(row_threads)
        max_time_budget()  # a bad operator setting stops the engine at start, not a request later
        self.apply_seconds = 0.0  # wall time in apply (BAT requests present)
        self.step_times = StepTimes()
        self._step_started = time.perf_counter()
        self.totals: dict[str, float] = {}  # decisions of the requests that left (core BatStats summed)
        # checks that need no W (folder, tensor, rows, soft-cap) at engine start; a model BAT cannot serve is
        # logged now, and each BAT request on it later keeps its most probable tokens (counted as refused)
        self.refusal: str | None = None
        self.softcap: float | None = None
        if self.active:
            try:
                self.softcap = softcap_of(model_config)
                check_model(self.model, self.vocab_size)
            except Exception as exc:  # noqa: BLE001 - the engine starts either way
                self._refuse(exc)

    # ------------------------------------------------------------------ the model, once
    @property
    def basis(self) -> bat_core.Basis:
        """W is read at the first BAT request (the processor is built before the model is loaded)."""
        if self._basis is None:
            # BAT's numpy work gets the engine's own share of the cores (vLLM's CPU backend keeps one
            # core for serving): spinning BLAS threads halved the engine's throughput on 2 cores
            bat_core.limit_blas_threads()
            bat_core.set_matvec_threads(torch.get_num_threads())
            basis = basis_for(self.model, self.softcap)
            if basis.vocab_size != self.vocab_size:
                raise BatError(
                    f"vocabulary mismatch: the output matrix of {self.model} has {basis.vocab_size} rows, "
                    f"the engine's vocabulary {self.vocab_size}"
                )
            self._basis = basis
        return self._basis

    def _refuse(self, exc: BaseException) -> None:
        """BAT cannot serve this engine's model: said once; BAT requests keep their most probable tokens."""
        if self.refusal is None:
            self.refusal = f"{type(exc).__name__}: {exc}"
            logger.error(
                "BAT is unavailable on this engine (%s); BAT requests will keep only their most probable "
                "token at each step, other requests are not affected",
                self.refusal,
            )

    def is_argmax_invariant(self) -> bool:
        return False  # BAT must see the logits before temperature, and may change the argmax draw

    # ------------------------------------------------------------------ bookkeeping
    def update_state(self, batch_update: BatchUpdate | None) -> None:
        self._step_started = time.perf_counter()
        if batch_update is None or not self.active:
            return
        for index in batch_update.removed:
            self._retire(self.requests.pop(index, None))
        for index, params, _, output in batch_update.added:
            self._add(index, params, output)
        for a, b, direction in batch_update.moved:
            self._move(a, b, direction)
        if self._stats_changed:  # no retired state is left in a local here: the stats count live solvers
            self._write_stats(force=not self.requests)

    def _add(self, index: int, params: Any, output: list) -> None:
        self._retire(self.requests.pop(index, None))
        state = self._start(params, output)
        if state is not None:
            self.requests[index] = state

    def _move(self, a: int, b: int, direction: MoveDirectionality) -> None:
        first, second = self.requests.pop(a, None), self.requests.pop(b, None)
        if first is not None:
            self.requests[b] = first
        if direction == MoveDirectionality.SWAP:
            if second is not None:
                self.requests[a] = second
        else:
            self._retire(second)  # a one-way move overwrites b

    def _start(self, params: Any, output: list) -> RequestState | None:
        """A new request's state; a request BAT cannot serve gets one without a sampler (it keeps its argmax)."""
        if not asks_for_bat(params):
            return None
        self._stats_changed = True
        try:
            settings = settings_from(params)
        except Exception as exc:  # noqa: BLE001 - validate_params refused it already; never stop the engine here
            logger.error("BAT settings refused in the engine (%s); the request keeps its most probable tokens", exc)
            self._count("refused")
            return RequestState(None, "sample", output)
        if settings is None:
            return None
        if self.refusal is None:
            try:
                config = bat_core.BatConfig.for_generation(settings.time_budget)
                sampler = bat_core.BatSampler(
                    self.basis, settings.rule, settings.seed, config, mask_candidates=settings.mask_candidates
                )
                return RequestState(sampler, settings.mode, output)
            except Exception as exc:  # noqa: BLE001 - reading W may fail for this model: every BAT request would
                self._refuse(exc)
        self._count("refused")
        return RequestState(None, settings.mode, output)

    def _retire(self, state: RequestState | None) -> None:
        if state is None:
            return
        self._stats_changed = True
        if state.sampler is not None:
            for key, value in state.sampler.stats.as_dict().items():
                if isinstance(value, (int, float)):
                    self.totals[key] = self.totals.get(key, 0) + value
        for key, value in asdict(state.counts).items():
            self._count(key, value)
        self._count("errors", state.errors)
        self._count("redone_steps", state.redone)
        self._count("bat_seconds", state.bat_seconds)
        self._count("requests")

    def _count(self, key: str, amount: float = 1) -> None:
        self.totals[key] = self.totals.get(key, 0) + amount

    def stats(self) -> dict[str, Any]:
        """What an operator watches: BAT requests in the batch, HiGHS models and BAT solvers alive in this
        process, the decisions of the requests that left, BAT's share of the steps' time, and the BAT time of
        the costliest request in the batch (a noisy neighbour)."""
        busiest = max((state.bat_seconds for state in self.requests.values()), default=0.0)
        return {
            "active_requests": len(self.requests),
            "highs_models": live_models(),
            "bat_solvers": live_solvers(),
            "refusal": self.refusal,
            "totals": dict(self.totals),
            "steps": self.step_times.as_dict(),
            "busiest_request_seconds": busiest,
            "resident_mb": resident_mb(),
        }

    def _write_stats(self, force: bool = False) -> None:
        if self.stats_file.due(force):
            self._stats_changed = False
            self.stats_file.write(self.stats())

    # ------------------------------------------------------------------ the step
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.requests:
            return logits  # requests without BAT cost nothing
        start = time.perf_counter()
        try:
            return self._apply(logits)
        except Exception as exc:  # noqa: BLE001 - the last line of defence: BAT rows keep their argmax, the engine goes on
            logger.exception("BAT failed for a whole step (%s); its BAT rows keep their most probable token", exc)
            self._count("failed_steps")
            return self._keep_argmax(logits, sorted(self.requests))
        finally:
            seconds = time.perf_counter() - start
            self.apply_seconds += seconds
            self.step_times.add(max(start - self._step_started, 0.0), seconds)

    def _apply(self, logits: torch.Tensor) -> torch.Tensor:
        rows = sorted(self.requests)
        if self.refusal is None:
            raw = logits[rows].float().cpu().numpy()
            if not self._span_checked:
                self._check_span(raw, logits)
        if self.refusal is not None:
            for state in self.requests.values():
                if state.sampler is not None:  # started before BAT was refused for this engine
                    state.sampler = None
                    self._count("refused")
            return self._keep_argmax(logits, rows)

        def decide_row(k: int) -> np.ndarray:
            state = self.requests[rows[k]]
            try:
                return self._allowed_tokens(state, raw[k])
            except Exception as exc:  # noqa: BLE001 - one request's failure must not fail the step of every other request
                return self._after_failure(state, raw[k], exc)

        decided: dict[int, np.ndarray] = {}
        if self._row_pool is not None:
            # rows that may need decisions go to the threads; plain-rule rows are all small numpy
            # operations, which threads only slow down (measured: 8.0 -> 11.3 ms per step at 32 rows)
            threaded = [k for k, index in enumerate(rows) if self.requests[index].mode != "threshold"]
            if len(threaded) > 1:
                decided = dict(zip(threaded, self._row_pool.map(decide_row, threaded)))
        keep_rows = [decided[k] if k in decided else decide_row(k) for k in range(len(rows))]
        return self._keep(logits, rows, keep_rows)

    @staticmethod
    def _keep(logits: torch.Tensor, rows: list[int], keep_rows: list[np.ndarray]) -> torch.Tensor:
        """-inf everywhere in `rows` but the kept token ids: three tensor operations, whatever the row count."""
        row_ids = torch.as_tensor(np.repeat(rows, [len(keep) for keep in keep_rows]), device=logits.device)
        token_ids = torch.as_tensor(np.concatenate(keep_rows), device=logits.device)
        kept = logits[row_ids, token_ids]
        logits[torch.as_tensor(rows, device=logits.device)] = float("-inf")
        logits[row_ids, token_ids] = kept
        return logits

    def _keep_argmax(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Fail closed for whole rows: each keeps its most probable token of the vocabulary (never a padding column)."""
        top = torch.argmax(torch.nan_to_num(logits[rows, : self.vocab_size].float(), nan=-float("inf")), dim=1)
        return self._keep(logits, rows, [np.array([t]) for t in top.cpu().numpy()])

    def _check_span(self, raw: np.ndarray, logits: torch.Tensor) -> None:
        """At the first BAT step: the engine's logits must lie in the span of [W, 1] (else BAT is refused for the
        engine); then the GPU product and the row threads are set up."""
        try:
            cause = "A wrong or transformed matrix (a soft-cap or scaling the model's config does not declare)"
            self.basis.check_span(raw[0], self.span_tolerance, self.model, cause)
        except Exception as exc:  # noqa: BLE001 - a model BAT cannot serve costs its BAT requests, never the engine
            self._refuse(exc)
            return
        self._span_checked = True
        if logits.is_cuda and self.matvec_policy == "auto":
            self._product_on(logits.device)
        self._start_row_threads(logits.is_cuda)

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
            logger.warning(
                "no GPU memory for BAT's copy of W (%.0f MB): its product over the vocabulary "
                "stays on the CPU; lower gpu_memory_utilization to give it room",
                4 * self.basis.vocab_size * self.basis.hidden_size / 1e6,
            )

    def _allowed_tokens(self, state: RequestState, z: np.ndarray) -> np.ndarray:
        """The token ids this request may sample at this step (one id in sample mode)."""
        if state.sampler is None:
            return self._argmax(z)
        step = len(state.output)
        if step == state.last_step:
            state.redone += 1
        state.last_step = step
        start = time.perf_counter()
        try:
            outcome = kept_tokens(state.sampler, z, state.mode, step=step)
            state.counts.add(outcome)
            drawn = outcome.sample
            if self.record_dir and drawn is not None and drawn.below_tau and not drawn.fell_back_to_argmax:
                self._record(z, drawn)
            return outcome.kept
        finally:
            state.bat_seconds += time.perf_counter() - start

    def _argmax(self, z: np.ndarray) -> np.ndarray:
        return np.array([most_probable_token(z[: self.vocab_size])])

    def _after_failure(self, state: RequestState, z: np.ndarray, exc: Exception) -> np.ndarray:
        """A request whose BAT step raised keeps only its most probable token (the one token BAT always
        allows), is logged once and counted in `totals["errors"]`; the other rows go on as usual."""
        state.errors += 1
        if state.errors == 1:
            logger.warning(
                "BAT failed on one request (%s: %s); it keeps only its most probable token at "
                "each step that fails, the other requests are not affected",
                type(exc).__name__,
                exc,
            )
        return self._argmax(z)

    def _record(self, z: np.ndarray, result: bat_core.SampleResult) -> None:
        cert = result.decisions[-1].certificate
        if cert is None:
            return
        os.makedirs(self.record_dir, exist_ok=True)
        name = f"{os.getpid()}-{id(result)}-{result.token}.npz"
        np.savez(os.path.join(self.record_dir, name), logits=z, token=result.token, tau=result.tau, y=cert.y)
