"""The HTTP layer: an OpenAI-compatible FastAPI app in front of the scheduler.

Handlers parse and validate a request (serving/protocol.py), turn it into a `DecodeConfig` resolved for the
model, tokenize it, and `submit` it to the scheduler; then they read the request's event queue: all of it for a
whole response, or chunk by chunk for `stream: true` (server-sent events, framed by sse-starlette, each round's
accepted tokens as soon as the round ends, then `data: [DONE]`). The model is never touched here.

Status codes: 400 bad request (the field named in `param`), 401 bad or missing API key, 404 unknown model or
path, 429 queue full (with Retry-After), 500 decoding failed, 503 shutting down. Every error carries OpenAI's body
and is logged as one line.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from sse_starlette import ServerSentEvent
from starlette.exceptions import HTTPException

from layerskip.decoding.api import check_prompt, final_text
from layerskip.decoding.config import DecodeConfig, normalize_strategy
from layerskip.decoding.stopping import TextStream
from layerskip.errors import LayerSkipError
from layerskip.forward import LayerStack
from layerskip.serving.metrics import Metrics
from layerskip.serving.protocol import (APIError, ChatRequest, CompletionRequest, Responses, finish_reason,
                                        layerskip_stats, usage, validation_error)
from layerskip.serving.scheduler import QueueFull, Request, Scheduler

log = logging.getLogger("layerskip.serve")
_DECODE_FIELDS = ("strategy", "exit_layer", "num_speculations", "confidence_threshold", "max_new_tokens",
                  "temperature", "top_k", "top_p", "seed", "stop_strings", "draft_vocab")


@dataclass
class ServeState:
    """What the app serves: the engine, its tokenizer and name, the server's decoding defaults."""

    stack: LayerStack
    tokenizer: object
    model_name: str
    defaults: DecodeConfig  # strategy, E, d, C, draft vocabulary from the command line (or the model's)
    default_max_tokens: int
    scheduler: Scheduler
    metrics: Metrics
    api_key: str | None = None
    shutdown_timeout: float = 30.0


def create_app(state: ServeState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.scheduler.start()
        yield
        if not await asyncio.to_thread(state.scheduler.stop, state.shutdown_timeout):
            log.warning("shutdown: requests still running after %.0f s were cancelled", state.shutdown_timeout)

    app = FastAPI(title="layerskip", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    if state.api_key:
        app.add_middleware(_APIKey, key=state.api_key)

    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, e: APIError):
        log.warning("%d %s %s: %s", e.status, request.method, request.url.path, e.message)
        if e.status in (400, 404, 429):
            state.metrics.requests.labels("rejected").inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: HTTPRequest, e: RequestValidationError):
        return await api_error(request, validation_error(e.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request: HTTPRequest, e: HTTPException):
        code = "not_found" if e.status_code == 404 else None
        return await api_error(request, APIError(e.status_code, str(e.detail), code=code))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": state.model_name}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        _check_model(state, name)
        return _model_card(state)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        _check_model(state, body.model)
        return await _serve(state, body, _completion_prompt(state, body), "completion", http)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: HTTPRequest):
        _check_model(state, body.model)
        return await _serve(state, body, _chat_prompt(state, body), "chat", http)

    return app


class _APIKey:
    """Every request needs `Authorization: Bearer <key>` (a plain ASGI middleware: streaming passes through)."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            given = dict(scope.get("headers") or ()).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                log.warning("401 %s %s: missing or wrong API key", scope.get("method"), scope.get("path"))
                e = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                             code="invalid_api_key")
                await JSONResponse(e.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _model_card(state: ServeState) -> dict:
    return {"id": state.model_name, "object": "model", "created": 0, "owned_by": "layerskip"}


def _check_model(state: ServeState, name: str) -> None:
    if name != state.model_name:
        raise APIError(404, f"the model {name!r} does not exist; this server serves {state.model_name!r}",
                       param="model", code="model_not_found")


def _completion_prompt(state: ServeState, body: CompletionRequest) -> list[int]:
    p = body.prompt
    if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        if len(p) != 1:
            raise APIError(400, f"one prompt per request (got {len(p)}); send them as separate requests",
                           param="prompt")
        p = p[0]
    if isinstance(p, str):
        return list(state.tokenizer(p).input_ids) if p else []
    return list(p)  # token ids; an empty prompt or ids outside the vocabulary: check_prompt in _serve


def _chat_prompt(state: ServeState, body: ChatRequest) -> list[int]:
    tok = state.tokenizer
    if not getattr(tok, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template: use /v1/completions, or start the "
                            "server with --chat-template FILE", param="messages")
    messages = [m.model_dump() for m in body.messages]
    try:
        return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    except Exception as e:  # a template's own raise_exception(...), e.g. roles out of order
        raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None


def _decode_config(state: ServeState, body, num_prompt: int):
    """The request's settings over the server's defaults, resolved for the model (APIError on a bad one)."""
    given = body.model_fields_set
    if body.n != 1:
        raise APIError(400, "n must be 1: this server returns one choice per request", param="n")
    changes = {}
    if body.strategy is not None:
        try:
            if normalize_strategy(body.strategy) != state.defaults.strategy:  # the defaults' E, d, C do not carry
                changes.update(exit_layer=None, num_speculations=None, confidence_threshold=None, draft_vocab=None)
        except LayerSkipError as e:
            raise APIError(400, str(e), param="strategy") from None
        changes["strategy"] = body.strategy
    for name in ("exit_layer", "num_speculations", "confidence_threshold"):
        if getattr(body, name) is not None:
            changes[name] = getattr(body, name)
    generation = state.stack.model.generation_config
    temperature = body.temperature
    if temperature is None and getattr(generation, "do_sample", False):
        temperature = getattr(generation, "temperature", None) or 1.0
    sample = bool(temperature)
    if not sample:
        for name in ("top_p", "seed"):
            if name in given and getattr(body, name) is not None and not (name == "top_p" and body.top_p == 1):
                raise APIError(400, f"{name} has no effect with greedy decoding (temperature 0 or the model's "
                                    "default); drop it or set a temperature > 0", param=name)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or ())
    if len(stop) > 4:
        raise APIError(400, f"at most 4 stop sequences, got {len(stop)}", param="stop")
    max_tokens = body.max_tokens or getattr(body, "max_completion_tokens", None) or state.default_max_tokens
    changes.update(max_new_tokens=max_tokens, do_sample=sample, temperature=float(temperature) if sample else None,
                   top_p=body.top_p if sample and body.top_p != 1 else None, seed=body.seed if sample else None,
                   stop_strings=tuple(stop))
    positions = state.stack.max_positions
    if positions and num_prompt >= positions:
        raise APIError(400, f"the prompt is {num_prompt} tokens; this model has {positions} positions",
                       param="messages" if hasattr(body, "messages") else "prompt", code="context_length_exceeded")
    if positions and num_prompt + max_tokens > positions:
        raise APIError(400, f"the prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                            f"{positions} positions; lower max_tokens to {positions - num_prompt} or less",
                       param="max_tokens", code="context_length_exceeded")
    try:
        config = state.defaults.replace(**changes)
        unused = [u for u in config.unused() if u.split()[0] in given]
        if unused:
            raise LayerSkipError(f"{unused[0].replace(' (', ' has no effect here (', 1)}")
        return config.resolve(state.stack.model, warn=False)
    except LayerSkipError as e:
        word = str(e).split()[0]
        raise APIError(400, str(e), param=word if word in _DECODE_FIELDS else None) from None


async def _serve(state: ServeState, body, prompt: list[int], kind: str, http: HTTPRequest):
    config = _decode_config(state, body, len(prompt))
    try:
        check_prompt(state.stack, prompt, config, "the prompt")
    except LayerSkipError as e:
        raise APIError(400, str(e), param="prompt") from None
    request = Request(prompt, config, asyncio.get_running_loop())
    try:
        state.scheduler.submit(request)
    except QueueFull as e:
        raise APIError(429, f"the server is busy: {e}; retry shortly", type="server_busy", code="queue_full",
                       headers={"Retry-After": "1"}) from None
    responses = Responses(kind, state.model_name, request.id)
    text = TextStream(state.tokenizer, config.stop_strings)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_events(state, request, responses, text, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        while True:
            try:
                kind_, payload = await asyncio.wait_for(request.events.get(), 0.25)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    request.cancel()
                    return Response(status_code=499)
                continue
            if kind_ == "done":
                row = payload
                return responses.whole(final_text(state.tokenizer, row.stopper, row.generated), finish_reason(row.stats.stop_reason),
                                       usage(len(prompt), len(row.generated)), layerskip_stats(row.stats))
            if kind_ == "error":
                raise _failure(payload)
    finally:
        request.cancel()  # no-op once finished; frees the row if the handler was cancelled


def _failure(payload: str) -> APIError:
    if payload == "cancelled":
        return APIError(503, "the server is shutting down; the request was cancelled", type="server_error")
    return APIError(500, payload, type="server_error")


def _sse(data: str) -> bytes:
    return ServerSentEvent(data=data, sep="\n").encode()


async def _events(state: ServeState, request: Request, responses: Responses, text: TextStream, include_usage: bool):
    """The SSE body of a streamed request: a chunk per round with new text, the last with its finish reason,
    usage if asked, then [DONE]. An error mid-stream is sent as an {"error": ...} event (the status is sent)."""
    import json

    try:
        if responses.chat:
            yield _sse(json.dumps(responses.chunk("", first=True)))
        while True:
            kind, payload = await request.events.get()
            if kind == "tokens":
                delta = text.feed(payload)
                if delta:
                    yield _sse(json.dumps(responses.chunk(delta)))
            elif kind == "done":
                row = payload
                final = final_text(state.tokenizer, row.stopper, row.generated)
                yield _sse(json.dumps(responses.chunk(text.finish(final) or None, finish_reason(row.stats.stop_reason))))
                if include_usage:
                    yield _sse(json.dumps(responses.usage_chunk(usage(len(request.prompt), len(row.generated)))))
                yield _sse("[DONE]")
                return
            else:
                e = _failure(payload)
                log.warning("%d (streaming) request %d: %s", e.status, request.id, e.message)
                yield _sse(json.dumps(e.body()))
                return
    finally:
        request.cancel()
