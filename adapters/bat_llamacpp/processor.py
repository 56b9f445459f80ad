"""BAT in llama.cpp's sampler chain, through llama-cpp-python.

    from llama_cpp import Llama
    from bat_llamacpp import BatLlama

    llm = Llama(model_path=path)
    bat = BatLlama(llm)                                # W read once from the loaded GGUF
    proc = bat.processor(eta=0.0009, mode="sample", seed=1)
    out = llm.create_completion("Once upon a time", max_tokens=64, **proc.completion_kwargs())
    print(proc.stats.as_dict())

llama-cpp-python turns `logits_processor=` into a custom `llama_sampler` placed at the head of
llama.cpp's chain (before penalties, grammar, temperature, top-k/top-p/min-p and the final draw), so
BAT sees the raw logits of every step in token-id order. In "sample" mode BAT draws the token itself
(the paper's sampler, with the completion's own seeded generator) and leaves only that token finite;
in "mask" mode it leaves the proven set finite and llama.cpp's own samplers draw from it.

A grammar (`grammar=`, or a chat `response_format`) sits after BAT in the chain: BAT asks the chain's
grammar sampler which tokens it allows at the step, decides on the raw distribution as always, and draws
(or masks) among the allowed tokens only, so that the grammar never meets a step with nothing left.

A ctypes callback cannot raise into the caller. When BAT fails at a step, that step keeps only its
most probable (allowed) token, never the untruncated distribution; the error is counted and raised by
the stopping criterion that `completion_kwargs()` installs (completions, streaming) or by
`create_chat_completion` (chat), before the next token is returned.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

import bat_core
from bat_core import BatError, ThresholdRule, rule_from
from bat_core.generation import BAT_MODES, GenerationCounts, kept_tokens, most_probable_token
from bat_core.sampler import MASK_CANDIDATES
from bat_models import basis_for

MODES = BAT_MODES
GENERATION_TIME_BUDGET = bat_core.GENERATION_TIME_BUDGET  # the clock per decision: a safety net (docs/core.md)
SPAN_TOLERANCE = 1e-3  # relative residual; the right W gives ~1e-5 (float32), a wrong one ~0.1-1


@dataclass
class CompletionStats(GenerationCounts):
    """One completion's BAT statistics. `as_dict()` is JSON-ready."""

    bat_seconds: float = 0.0  # wall time inside BAT
    errors: int = 0  # steps at which BAT failed (each kept only its most probable allowed token)
    grammar_steps: int = 0  # steps restricted to the tokens a grammar allowed
    core: dict[str, Any] = field(default_factory=dict)  # the core's BatStats (decisions, LP solves, fallbacks)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StepRecord:
    """A step whose token BAT took below tau: what a test needs to re-verify the proof."""

    token: int
    probability: float
    tau: float
    logits: np.ndarray
    certificate: Any


class BatLlama:
    """BAT for one `Llama`: reads W from the GGUF it loaded and checks it against the engine."""

    def __init__(self, llm: Any) -> None:
        path = getattr(llm, "model_path", None)
        if not path:
            raise BatError("this Llama object has no model_path: BatLlama reads W from the GGUF file it loaded")
        self.llm = llm
        bat_core.limit_blas_threads()
        self.basis = basis_for(path)
        n_vocab = int(llm.n_vocab())
        if self.basis.vocab_size != n_vocab:
            raise BatError(
                f"vocabulary mismatch: the output matrix in {path} has {self.basis.vocab_size} rows but the "
                f"engine's vocabulary has {n_vocab} tokens; this GGUF is not usable with BAT"
            )
        self.span_checked = False

    def processor(
        self,
        eta: float | None = None,
        epsilon: float | None = None,
        tau: float | None = None,
        mode: str = "sample",
        seed: int | None = None,
        config: bat_core.BatConfig | None = None,
        record: bool = False,
        mask_candidates: int = MASK_CANDIDATES,
    ) -> BatLogitsProcessor:
        """A new processor for one completion (its own seeded generator, HiGHS model and stats).

        `config` defaults to BatConfig.for_generation(): the exact path under its work budgets; a token it
        leaves unproven is a counted, conservative reject. `mask_candidates`: in mask mode, the exact
        decisions per step (fewer leave more mass undecided, in less time)."""
        config = config or bat_core.BatConfig.for_generation()
        return BatLogitsProcessor(self, rule_from(eta, epsilon, tau), mode, seed, config, record, mask_candidates)

    def warm_up(self, config: bat_core.BatConfig | None = None) -> None:
        """Build what the decisions share (whitening, reduced bases) now rather than in the first step."""
        self.basis.prepare(config or bat_core.BatConfig())

    def check_span(self, logits: np.ndarray) -> None:
        """At first use: the engine's logits must lie in the span of [W, 1]."""
        if self.span_checked:
            return
        cause = "A wrong matrix, or a processor before BAT changed the logits (logit_bias, penalties)"
        self.basis.check_span(logits, SPAN_TOLERANCE, self.llm.model_path, cause)
        self.span_checked = True


class BatLogitsProcessor:
    """One completion's BAT state; called by llama.cpp once per step with the raw logits."""

    def __init__(
        self,
        owner: BatLlama,
        rule: ThresholdRule,
        mode: str = "sample",
        seed: int | None = None,
        config: bat_core.BatConfig | None = None,
        record: bool = False,
        mask_candidates: int = MASK_CANDIDATES,
    ) -> None:
        if mode not in MODES:
            raise BatError(f"unknown mode {mode!r}: use 'sample' (the paper's sampler) or 'mask'")
        if seed is not None and (not isinstance(seed, (int, np.integer)) or seed < 0):
            raise BatError(f"seed={seed!r} must be a non-negative integer")
        self.owner = owner
        self.rule = rule
        self.mode = mode
        self.seed = seed
        self.sampler = bat_core.BatSampler(owner.basis, rule, seed=seed, config=config, mask_candidates=mask_candidates)
        self._stats = CompletionStats()
        self.records: list[StepRecord] | None = [] if record else None
        self.error: BaseException | None = None
        self.calls = 0
        self.last_tau = float("nan")
        self.last_below_tau: set[int] = set()  # tokens of the last step that BAT kept below tau

    @property
    def stats(self) -> CompletionStats:
        """The completion's statistics, with the core's decisions copied in when read (not per token)."""
        self._stats.core = self.sampler.stats.as_dict()
        return self._stats

    def completion_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `Llama.__call__` / `create_completion`: this processor, the guard that
        raises its errors, neutral llama.cpp samplers (temperature 1, no top-k/top-p/min-p, no
        penalties) and the seed. For `create_chat_completion` use `chat_kwargs()`."""
        from llama_cpp import StoppingCriteriaList

        kwargs = self.chat_kwargs()
        kwargs["stopping_criteria"] = StoppingCriteriaList([self.raise_if_failed])
        return kwargs

    def chat_kwargs(self) -> dict[str, Any]:
        """As `completion_kwargs()` without the guard (chat completions take no stopping criteria): prefer
        `create_chat_completion`, which raises BAT's errors; with these, check `processor.error` yourself."""
        return neutral_sampling_kwargs(self, self.seed)

    def create_chat_completion(self, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        """`Llama.create_chat_completion` with this processor; BAT's errors are raised (after the reply, or at the
        next chunk of a stream). `response_format` and `grammar` combine with BAT (see the module docstring)."""
        out = self.owner.llm.create_chat_completion(messages, **{**self.chat_kwargs(), **kwargs})
        if kwargs.get("stream"):
            return self._raising(out)
        self.raise_if_failed()
        return out

    def _raising(self, chunks: Iterator[Any]) -> Iterator[Any]:
        for chunk in chunks:
            self.raise_if_failed()
            yield chunk
        self.raise_if_failed()

    def raise_if_failed(self, input_ids: Any = None, logits: Any = None) -> bool:
        """Stopping criterion: raise the error BAT met inside llama.cpp's callback, or the sign that
        llama-cpp-python dropped the processor from the chain (it does when `logit_bias` is given)."""
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        if self.calls == 0:
            raise BatError(
                "BAT was not called for this step: llama-cpp-python left the processor out of the sampler "
                "chain (0.3.x drops logits_processor when logit_bias is given); remove logit_bias"
            )
        return False

    def __call__(self, input_ids: Any, scores: np.ndarray) -> np.ndarray:
        self.calls += 1
        start = time.perf_counter()
        z = np.asarray(scores, dtype=np.float32)
        allowed = None
        try:
            allowed = grammar_allowed(self.owner.llm, z)
            return self._apply(z, allowed)
        except Exception as exc:  # noqa: BLE001 - must not escape into the C callback
            self._stats.errors += 1
            self.error = exc if isinstance(exc, BatError) else BatError(f"BAT failed inside llama.cpp: {exc!r}")
            return most_probable_only(z, allowed)
        finally:
            self._stats.bat_seconds += time.perf_counter() - start

    def _apply(self, z: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
        self.owner.check_span(z)
        out = np.full(z.shape, -np.inf, dtype=np.float32)
        self._stats.grammar_steps += allowed is not None
        outcome = kept_tokens(self.sampler, z, self.mode, allowed=allowed)
        out[outcome.kept] = z[outcome.kept]
        self._stats.add(outcome)
        self.last_tau, self.last_below_tau = outcome.tau, set(outcome.proven_below_tau.tolist())
        if self.records is not None and outcome.sample is not None and len(outcome.proven_below_tau):
            drawn = outcome.sample
            certificate = drawn.decisions[-1].certificate
            self.records.append(StepRecord(drawn.token, drawn.probability, drawn.tau, z.copy(), certificate))
        return out


def grammar_allowed(llm: Any, z: np.ndarray) -> np.ndarray | None:
    """The tokens the grammar samplers of `llm`'s current chain allow at this step (None: no grammar). Each is
    applied to a copy of the candidates: `apply` only marks tokens, the chain's own `accept` moves the grammar on."""
    from llama_cpp import llama_cpp as C

    sampler = getattr(llm, "_sampler", None)
    chain = getattr(sampler, "sampler", None)
    if not chain:
        return None
    custom = {index for index, _ in getattr(sampler, "custom_samplers", [])}  # Python samplers have no C name
    grammars = [C.llama_sampler_chain_get(chain, i) for i in range(C.llama_sampler_chain_n(chain)) if i not in custom]
    grammars = [g for g in grammars if (C.llama_sampler_name(g) or b"").startswith(b"grammar")]
    if not grammars:
        return None
    n = len(z)
    data = (C.llama_token_data * n)()
    view = np.frombuffer(data, dtype=np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True))
    view["id"], view["logit"], view["p"] = np.arange(n), z, 0.0
    candidates = C.llama_token_data_array(data=data, size=n, selected=-1, sorted=False)
    for grammar in grammars:
        C.llama_sampler_apply(grammar, ctypes.byref(candidates))
    allowed = np.zeros(n, dtype=bool)
    kept = view[: candidates.size]
    allowed[kept["id"][np.isfinite(kept["logit"])]] = True
    if not allowed.any():
        raise BatError("the grammar allows no token at this step")
    return allowed


def most_probable_only(z: np.ndarray, allowed: np.ndarray | None = None) -> np.ndarray:
    """Fail closed: only the most probable (allowed) token stays finite."""
    out = np.full(z.shape, -np.inf, dtype=np.float32)
    top = most_probable_token(z, allowed)
    out[top] = z[top] if np.isfinite(z[top]) else 0.0  # logits with no finite value: one token all the same
    return out


class EtaLogitsProcessor:
    """Plain threshold sampling (eta / epsilon / tau) through the same hook: the baseline BAT is compared
    with. Tokens below tau are removed; the argmax is always kept."""

    def __init__(self, rule: ThresholdRule, seed: int | None = None) -> None:
        self.rule = rule
        self.seed = seed
        self.seconds = 0.0

    def __call__(self, input_ids: Any, scores: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        z = np.asarray(scores, dtype=np.float32)
        p, tau = self.rule.probabilities_and_tau(z)  # the same code path as BAT's own steps
        out = np.where(bat_core.truncate_mask(p, tau), z, np.float32(-np.inf))
        self.seconds += time.perf_counter() - start
        return out

    def completion_kwargs(self) -> dict[str, Any]:
        return neutral_sampling_kwargs(self, self.seed)


def neutral_sampling_kwargs(processor: Any, seed: int | None) -> dict[str, Any]:
    """`processor` at the head of the chain; llama.cpp's own samplers after it made neutral
    (temperature 1, no top-k/top-p/min-p, no repetition penalty); the seed of llama.cpp's draw."""
    from llama_cpp import LogitsProcessorList

    kwargs: dict[str, Any] = {
        "logits_processor": LogitsProcessorList([processor]),
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "min_p": 0.0,
        "repeat_penalty": 1.0,
    }
    if seed is not None:
        kwargs["seed"] = int(seed)
    return kwargs
