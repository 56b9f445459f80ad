"""`bat serve`: an OpenAI-compatible HTTP server for one GGUF model, with BAT sampling per request.

    .venv/bin/bat serve [--model GGUF] [--host 127.0.0.1] [--port 8000]

llama-cpp-python's server (`llama_cpp.server`) builds its samplers from the request body alone, so no
logits processor reaches it over HTTP. This module starts that server's app (its model loading,
`/v1/models`, `/v1/embeddings`, tokenize routes, API key and error handling) and replaces its two
generation routes with ones that read BAT's flat keys (`bat_core.request`) from the body's top level
or from `vllm_xargs`, as vLLM does. A request without `bat_` keys is served by llama.cpp's own samplers
with the same arguments as in `llama_cpp.server`. A BAT response carries the request's BAT statistics
in a `bat` field (in a stream: on the chunk with the finish reason). Generations take the one model in
turn; a stream whose client goes away stops within a token and frees the model (docs/serve.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from llama_cpp.server import app as llama_app
from llama_cpp.server.app import authenticate
from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
from sse_starlette.sse import EventSourceResponse

import bat_core
from bat_core import BatError
from bat_core.request import RequestSettings, bat_keys, request_settings

from .processor import BatLlama, BatLogitsProcessor, EtaLogitsProcessor
from .trajectories import last_logits

logger = logging.getLogger("bat.serve")
GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions")
UNUSED_FIELDS = {
    "n",
    "best_of",
    "logit_bias_type",
    "user",
    "min_tokens",
}  # as llama_cpp.server: not passed to llama.cpp
# llama.cpp's samplers after BAT: neutral for BAT requests unless the request sets them (they then act on
# BAT's mask in mask mode, and cannot change BAT's single token in sample mode)
SAMPLING_FIELDS = {
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repeat_penalty",
    "typical_p",
    "presence_penalty",
    "frequency_penalty",
    "mirostat_mode",
    "mirostat_tau",
    "mirostat_eta",
}


class ModelSlot:
    """The server's one model and context: generations take it in turn (one lock), with BAT's per-model state.
    When BAT cannot work on the model (its W does not explain the logits), BAT requests get 400 and plain
    ones are served."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self._counts_lock = threading.Lock()
        self.bat: BatLlama | None = None
        self.refusal: str | None = None
        try:
            bat = BatLlama(llm)
            bat.warm_up(bat_core.BatConfig.for_generation())
            llm.eval(llm.tokenize(b"Hello", add_bos=True))  # the span self-check, once, before any request
            bat.check_span(last_logits(llm))
            llm.reset()
            self.bat = bat
        except BatError as exc:
            self.refusal = str(exc)
            logger.error("BAT is refused on this model, plain requests are served: %s", exc)

    def processor(self, settings: RequestSettings | None) -> BatLogitsProcessor | EtaLogitsProcessor | None:
        if settings is None:
            return None
        if settings.mode == "threshold":
            return EtaLogitsProcessor(settings.rule, seed=settings.seed)
        if self.bat is None:
            raise BatError(f"BAT is refused on this model: {self.refusal}")
        config = bat_core.BatConfig.for_generation(settings.time_budget)
        return BatLogitsProcessor(
            self.bat, settings.rule, settings.mode, settings.seed, config, mask_candidates=settings.mask_candidates
        )

    def count(self, key: str, delta: int = 1) -> None:
        with self._counts_lock:
            self.counts[key] += delta

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """The model, for one generation; requests wait here in turn."""
        self.count("waiting")
        with self.lock:
            self.count("waiting", -1)
            self.count("active")
            try:
                yield
            finally:
                self.count("active", -1)

    def run(self, call: Callable[[], Any]) -> Any:
        """In a worker thread: one whole generation with the model held."""
        with self.held():
            return call()

    def stream(
        self, call: Callable[[], Iterator[Any]], send: Callable[[tuple[str, Any]], None], stop: threading.Event
    ) -> None:
        """In a worker thread: a streamed generation with the model held; `stop` (the client left) ends it
        after the current token. Sends ("chunk", c)..., then ("error", exc) or ("end", None)."""
        with self.held():
            chunks = None
            try:
                chunks = call()
                for chunk in chunks:
                    send(("chunk", chunk))
                    if stop.is_set():
                        self.count("cancelled_streams")
                        break
                send(("end", None))
            except Exception as exc:  # noqa: BLE001 - reported to this request's client only
                send(("error", exc))
            finally:
                if chunks is not None:
                    chunks.close()

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": self.llm.model_path,
            "bat": "ready" if self.bat is not None else {"refused": self.refusal},
            "requests": {
                k: self.counts[k] for k in ("served", "bat", "failed", "cancelled_streams", "active", "waiting")
            },
        }


def settings_of(raw: dict[str, Any]) -> RequestSettings | None:
    """BAT's settings from a request body: top-level `bat_*` keys (the openai client's extra_body) and
    `vllm_xargs`, which must agree where both give a key."""
    xargs = raw.get("vllm_xargs") or {}
    if not isinstance(xargs, dict):
        raise BatError(f"vllm_xargs must be an object of settings, got {type(xargs).__name__}")
    top, nested = bat_keys(raw), bat_keys(xargs)
    clash = sorted(k for k in top & nested if raw[k] != xargs[k])
    if clash:
        raise BatError(f"{clash} given twice with different values (top level and vllm_xargs): give each once")
    return request_settings({**{k: raw[k] for k in top}, **{k: xargs[k] for k in nested}}, raw.get("seed"))


def generation_kwargs(body: Any, processor: Any, chat: bool) -> dict[str, Any]:
    """llama-cpp-python's arguments for the request, built by llama_cpp.server's own code; for a BAT request
    with BAT at the head of the chain and the samplers after it neutral unless the request sets them."""
    if processor is not None and body.logit_bias is not None:
        raise BatError(
            "logit_bias changes the logits before BAT (and llama-cpp-python then drops BAT from the "
            "sampler chain): drop logit_bias for BAT requests"
        )
    if processor is not None and body.min_tokens > 0:
        raise BatError("min_tokens masks the end of the text before BAT: drop min_tokens for BAT requests")
    kwargs = body.model_dump(exclude=UNUSED_FIELDS)
    if isinstance(kwargs.get("prompt"), list):
        if len(kwargs["prompt"]) > 1:
            raise BatError(f"one prompt per request (got {len(kwargs['prompt'])}): send the others separately")
        kwargs["prompt"] = kwargs["prompt"][0] if kwargs["prompt"] else ""
    # logit_bias, grammar (which combines with BAT: docs/llamacpp.md) and min_tokens, as llama_cpp.server does
    llama_app.prepare_request_resources(body, llama_app._llama_proxy, body.model, kwargs)
    if processor is None:
        return kwargs
    for name in SAMPLING_FIELDS - body.model_fields_set:
        kwargs.pop(name, None)
    if kwargs.get("seed") is None:
        kwargs.pop("seed", None)  # BAT's seed then seeds llama.cpp's draw too (mask mode)
    chain = (
        processor.chat_kwargs() if chat and isinstance(processor, BatLogitsProcessor) else processor.completion_kwargs()
    )
    return {**chain, **kwargs}


def bat_summary(processor: Any, settings: RequestSettings) -> dict[str, Any]:
    """The `bat` field of a response: what BAT did for this request."""
    out: dict[str, Any] = {
        "mode": settings.mode,
        "rule": {"kind": settings.rule.kind, "value": settings.rule.value},
        "seed": settings.seed,
    }
    if settings.mode == "mask":
        out["mask_candidates"] = settings.mask_candidates
    if not isinstance(processor, BatLogitsProcessor):
        return out
    s = processor.stats
    core = s.core
    below = s.below_tau if settings.mode == "sample" else s.mask_accepted_below_tau
    return {
        **out,
        "tokens": s.tokens,
        "below_tau": below,
        "decisions": core.get("candidates", 0),
        "by_threshold": core.get("by_threshold", 0),
        "by_certificate": core.get("by_certificate", 0),
        "by_lp": core.get("by_lp", 0),
        "unproven": core.get("fallbacks", 0),
        "argmax_fallbacks": s.argmax_fallbacks,
        "mask_undecided_mass": s.mask_undecided_mass,
        "errors": s.errors,
        "bat_seconds": s.bat_seconds,
    }


def error_response(exc: BaseException, generating: bool) -> JSONResponse:
    """OpenAI's error shape. Bad settings (before generating) and llama.cpp's ValueErrors (a prompt longer than
    the context) are 400; BAT failing at a step (the step kept its most probable token) and the rest are 500."""
    bad_request = not generating or isinstance(exc, ValueError) and not isinstance(exc, BatError)
    status, kind = (400, "invalid_request_error") if bad_request else (500, "server_error")
    message = str(exc) if bad_request or isinstance(exc, BatError) else f"generation failed: {exc!r}"
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "code": status}})


def bat_router(slot: ModelSlot) -> APIRouter:
    router = APIRouter(dependencies=[Depends(authenticate)])

    async def generate(request: Request, body: Any, chat: bool) -> Any:
        try:
            settings = settings_of(await request.json())
            processor = slot.processor(settings)
            kwargs = generation_kwargs(body, processor, chat)
        except ValueError as exc:  # BatError, or llama.cpp refusing the grammar
            return error_response(exc, generating=False)
        slot.count("bat", settings is not None)
        if not chat:
            generation = slot.llm.create_completion
        elif isinstance(processor, BatLogitsProcessor):
            generation = processor.create_chat_completion  # raises BAT's step errors
        else:
            generation = slot.llm.create_chat_completion
        seeded = kwargs.get("seed") is not None

        def call() -> Any:
            if seeded:  # the whole prompt evaluated afresh: a reused prefix gives slightly different logits
                slot.llm.reset()
            return generation(**kwargs)

        def with_stats(out: dict[str, Any]) -> dict[str, Any]:
            if settings is not None and (not body.stream or out["choices"][0].get("finish_reason")):
                out["bat"] = bat_summary(processor, settings)
            return out

        if body.stream:
            return await stream_response(slot, call, with_stats)
        try:
            out = await anyio.to_thread.run_sync(slot.run, call)
        except Exception as exc:  # noqa: BLE001 - this request fails, the server goes on
            slot.count("failed")
            return error_response(exc, generating=True)
        slot.count("served")
        return with_stats(out)

    @router.post("/v1/completions", summary="Completion (BAT keys optional)")
    async def completions(request: Request, body: CreateCompletionRequest) -> Any:
        return await generate(request, body, chat=False)

    @router.post("/v1/chat/completions", summary="Chat (BAT keys optional)")
    async def chat_completions(request: Request, body: CreateChatCompletionRequest) -> Any:
        return await generate(request, body, chat=True)

    return router


async def stream_response(slot: ModelSlot, call: Callable[[], Iterator[Any]], decorate: Callable) -> Any:
    """Server-sent events of a generation that runs in its own thread; the first chunk (or the error) is
    awaited before answering, so a failure at the start is an HTTP error, not a broken stream."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def send(item: tuple[str, Any]) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown)
            stop.set()

    threading.Thread(target=slot.stream, args=(call, send, stop), daemon=True, name="bat-stream").start()
    kind, value = await queue.get()
    if kind == "error":
        slot.count("failed")
        return error_response(value, generating=True)

    async def events() -> Any:
        item = (kind, value)
        try:
            while item[0] == "chunk":
                yield {"data": json.dumps(decorate(item[1]))}
                item = await queue.get()
            if item[0] == "error":
                slot.count("failed")
                yield {"data": error_response(item[1], generating=True).body.decode()}
            else:
                slot.count("served")
            yield {"data": "[DONE]"}
        finally:
            stop.set()  # the client left, or the stream ended: the worker stops after its current token

    return EventSourceResponse(events(), sep="\n")


def create_app(model_path: str, n_ctx: int = 2048, api_key: str | None = None) -> FastAPI:
    """llama_cpp.server's app for `model_path`, with BAT's generation routes and /health."""
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    if not os.path.isfile(model_path):
        raise BatError(f"model file not found: {model_path}")
    alias = os.path.basename(model_path).removesuffix(".gguf")
    model = ModelSettings(
        model=model_path,
        model_alias=alias,
        n_ctx=n_ctx,
        n_threads=os.cpu_count() or 1,
        n_threads_batch=os.cpu_count() or 1,
        verbose=False,
    )
    # interrupt_requests off: a waiting request queues instead of cutting a running stream short
    server = ServerSettings(interrupt_requests=False, api_key=api_key)
    app = llama_app.create_app(server_settings=server, model_settings=[model])
    bat_core.limit_blas_threads()
    slot = ModelSlot(llama_app._llama_proxy(alias))
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) not in GENERATION_ROUTES]
    app.include_router(bat_router(slot))
    app.add_api_route("/health", slot.health, methods=["GET"], summary="Liveness, BAT's state, request counts")
    app.state.bat_slot = slot
    return app


def serve(model_path: str, host: str, port: int, n_ctx: int = 2048, api_key: str | None = None) -> None:
    import uvicorn

    app = create_app(model_path, n_ctx=n_ctx, api_key=api_key)
    slot = app.state.bat_slot
    state = "ready" if slot.bat is not None else f"refused ({slot.refusal})"
    print(f"[bat] serving {model_path} at http://{host}:{port}/v1 (BAT {state})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
