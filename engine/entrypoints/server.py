"""The OpenAI-compatible HTTP server: /v1/models, /v1/completions,
/v1/chat/completions (with SSE streaming), /health, /version, /metrics.

Completions and chat differ only in how a request becomes a prompt and how a
choice is rendered; running the request, turning the engine's cumulative
outputs into deltas, usage and SSE framing are shared."""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from contextlib import aclosing, suppress
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvtier.engine.core.outputs import RequestOutput
from kvtier.engine.core.sampling_params import SamplingParams
from kvtier.engine.entrypoints import protocol as p
from kvtier.engine.entrypoints.async_engine import EngineDeadError, merge_delta
from kvtier.engine.entrypoints.metrics import make_registry, render
from kvtier.engine.errors import RequestError
from kvtier.kvstore.validation import describe

logger = logging.getLogger("kvtier.server")


def kvtier_version() -> str:
    import kvtier
    return kvtier.__version__


# -- errors --------------------------------------------------------------------

class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def error_response(e: APIError) -> JSONResponse:
    body = p.ErrorResponse(error=p.ErrorInfo(message=e.message, type=e.type, param=e.param, code=e.code))
    return JSONResponse(body.model_dump(), status_code=e.status)


def _describe_request_validation(exc: RequestValidationError) -> APIError:
    err = exc.errors()[0]
    if err["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}")
    param, message = describe(err, skip=1)  # loc starts with "body"
    return APIError(400, message if param else f"request body: {message}", param)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, e: RequestError):
        return error_response(APIError(400, e.message, e.param, e.code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError):
        return error_response(_describe_request_validation(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException):
        return error_response(APIError(e.status_code, str(e.detail)))

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(_: Request, e: EngineDeadError):
        return error_response(APIError(503, "the engine is not running", type="service_unavailable"))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception):
        # The client learns only that it was not its fault, and an id the log carries.
        incident = uuid.uuid4().hex[:12]
        logger.exception("unhandled error (incident %s)", incident)
        return error_response(APIError(500, f"internal error (incident {incident})", type="internal_server_error"))


class APIKeyMiddleware:
    """Requires `Authorization: Bearer <key>` (the scheme in any case, as HTTP
    allows) on every route but /health, and /metrics when it is public. Plain
    ASGI, so that it does not get between a streaming response and its
    disconnect detection."""

    def __init__(self, app, api_key: str, open_paths: frozenset[str] = frozenset({"/health"})):
        self.app = app
        self.expected = api_key.encode()
        self.open_paths = open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.expected):
                response = error_response(APIError(401, "invalid or missing API key", code="invalid_api_key"))
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuses a request body over `limit` bytes with a 413, from its
    Content-Length at once, or as soon as a chunked body passes the limit:
    nothing a client sends is held beyond it. The body is read here (it is
    read whole anyway) and handed on as it came."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = error_response(APIError(413, f"the request body is larger than {self.limit} bytes",
                                          code="request_too_large"))
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await too_big(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                return await too_big(scope, receive, send)
            more = message.get("more_body", False)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: disconnects, for the streaming responses

        await self.app(scope, replay, send)


# -- from the engine's deltas to choices ----------------------------------------

@dataclass
class ChoiceDelta:
    """What one choice gained since the last time it was sent."""
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    stop_reason: int | str | None
    text_offset: int  # length of this choice's text already sent
    first: bool


class ChoiceTracker:
    """The engine streams deltas (it holds back text that may still become a
    stop string); this notes which choices have started, and counts tokens."""

    def __init__(self) -> None:
        self.tokens: dict[int, int] = {}

    def update(self, out: RequestOutput) -> list[ChoiceDelta]:
        deltas = []
        for c in out.outputs:
            deltas.append(ChoiceDelta(c.index, c.text, c.token_ids, c.logprobs, c.finish_reason, c.stop_reason,
                                      c.text_offset, first=c.index not in self.tokens))
            self.tokens[c.index] = self.tokens.get(c.index, 0) + len(c.token_ids)
        return deltas

    def usage(self, out: RequestOutput) -> p.UsageInfo:
        prompt, completion = len(out.prompt_token_ids), sum(self.tokens.values())
        return p.UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                           prompt_tokens_details=p.PromptTokensDetails(cached_tokens=out.num_cached_tokens))


# -- rendering choices, per API --------------------------------------------------

class ResponseFormat(Protocol):
    """How one OpenAI endpoint renders choices, chunks and whole responses."""
    id: str

    def chunk(self, delta: ChoiceDelta | None, usage: p.UsageInfo | None) -> BaseModel: ...

    def response(self, deltas: list[ChoiceDelta], usage: p.UsageInfo) -> BaseModel: ...


@dataclass
class _Envelope:
    id: str
    model: str
    tokenizer: Any
    created: int = field(default_factory=lambda: int(time.time()))

    def envelope(self, choices: list, usage: p.UsageInfo | None) -> dict[str, Any]:
        return dict(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def token_text(self, token_id: int) -> str:
        # As the streamed text has it: incremental decoding does no clean-up of spaces.
        return self.tokenizer.decode([token_id], clean_up_tokenization_spaces=False)


class CompletionFormat(_Envelope):
    def _choice(self, d: ChoiceDelta) -> p.CompletionChoice:
        return p.CompletionChoice(index=d.index, text=d.text, logprobs=self._logprobs(d),
                                  finish_reason=d.finish_reason, stop_reason=d.stop_reason)

    def _logprobs(self, d: ChoiceDelta) -> p.CompletionLogprobs | None:
        if d.logprobs is None:
            return None
        tokens = [self.token_text(t) for t in d.token_ids]
        offsets, at = [], d.text_offset
        for token in tokens:
            offsets.append(at)
            at += len(token)
        return p.CompletionLogprobs(
            tokens=tokens, text_offset=offsets,
            token_logprobs=[entry[t] for t, entry in zip(d.token_ids, d.logprobs)],
            top_logprobs=[{self.token_text(t): lp for t, lp in _ranked(entry)} for entry in d.logprobs])

    def chunk(self, delta, usage):
        return p.CompletionResponse(**self.envelope([self._choice(delta)] if delta else [], usage))

    def response(self, deltas, usage):
        return p.CompletionResponse(**self.envelope([self._choice(d) for d in deltas], usage))


@dataclass
class ChatFormat(_Envelope):
    top_logprobs: int = 0

    def _logprobs(self, d: ChoiceDelta) -> p.ChatChoiceLogprobs | None:
        if d.logprobs is None:
            return None
        return p.ChatChoiceLogprobs(content=[
            p.ChatTokenLogprob(**self._top(t, entry[t]),
                               top_logprobs=[p.TopLogprob(**self._top(alt, lp))
                                             for alt, lp in _ranked(entry)[:self.top_logprobs]])
            for t, entry in zip(d.token_ids, d.logprobs)])

    def _top(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.token_text(token_id)
        return dict(token=text, logprob=logprob, bytes=list(text.encode()))

    def chunk(self, delta, usage):
        choices = []
        if delta:
            # The role comes once, with each choice's first delta.
            message = p.DeltaMessage(role="assistant" if delta.first else None, content=delta.text)
            choices.append(p.ChatStreamChoice(index=delta.index, delta=message, logprobs=self._logprobs(delta),
                                              finish_reason=delta.finish_reason, stop_reason=delta.stop_reason))
        return p.ChatCompletionChunk(**self.envelope(choices, usage))

    def response(self, deltas, usage):
        choices = [p.ChatChoice(index=d.index, message=p.AssistantMessage(content=d.text),
                                logprobs=self._logprobs(d), finish_reason=d.finish_reason,
                                stop_reason=d.stop_reason) for d in deltas]
        return p.ChatCompletionResponse(**self.envelope(choices, usage))


def _ranked(entry: dict[int, float]) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda item: item[1], reverse=True)


# -- running a request -----------------------------------------------------------

async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable) -> tuple[bool, Any]:
    """(True, result) of `work`, or (False, None) if the client went away first.
    Cancelling `work` closes its engine stream, which aborts the request."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server is shutting down
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return True, task.result()
    task.cancel()
    with suppress(asyncio.CancelledError):
        await task
    return False, None


async def _whole(results: AsyncIterator[RequestOutput]) -> RequestOutput:
    """Every delta of a request merged into one."""
    whole = None
    async for out in results:
        whole = out if whole is None else merge_delta(whole, out)
    return whole


def _sse(payload: BaseModel, with_usage: bool = False) -> str:
    # Chunks carry "usage" (null until the last) only when the client asked for usage.
    return f"data: {payload.model_dump_json(exclude=None if with_usage else {'usage'})}\n\n"


async def _sse_events(results: AsyncIterator[RequestOutput], first: RequestOutput, tracker: ChoiceTracker,
                      fmt: ResponseFormat, include_usage: bool) -> AsyncIterator[str]:
    # aclosing: if the client disconnects, the engine stream is closed at once,
    # which aborts the request in the engine.
    async with aclosing(results):
        last = first
        try:
            for delta in tracker.update(first):
                yield _sse(fmt.chunk(delta, None), include_usage)
            async for last in results:
                for delta in tracker.update(last):
                    yield _sse(fmt.chunk(delta, None), include_usage)
        except Exception as e:  # headers are gone: report in the stream
            if isinstance(e, EngineDeadError):
                message = "the engine is not running"
            else:
                incident = uuid.uuid4().hex[:12]
                logger.exception("generation failed mid-stream (incident %s)", incident)
                message = f"internal error (incident {incident})"
            yield _sse(p.ErrorResponse(error=p.ErrorInfo(message=message, type="internal_server_error")))
        else:
            if last.error:
                error = p.ErrorInfo(message=last.error, type="internal_server_error", code="kv_load_failed")
                yield _sse(p.ErrorResponse(error=error))
            if include_usage:
                yield _sse(fmt.chunk(None, tracker.usage(last)), with_usage=True)
    yield "data: [DONE]\n\n"


class OpenAIServing:
    def __init__(self, engine, served_model_names: list[str]):
        self.engine = engine
        self.served_model_names = served_model_names

    def check_model(self, model: str | None) -> str:
        if model is None:
            return self.served_model_names[0]
        if model not in self.served_model_names:
            raise APIError(404, f"The model `{model}` does not exist.", "model", "model_not_found")
        return model

    def models(self) -> p.ModelList:
        return p.ModelList(data=[p.ModelCard(id=name, root=self.engine.model_name,
                                             max_model_len=self.engine.max_model_len)
                                 for name in self.served_model_names])

    async def completions(self, body: p.CompletionRequest, raw: Request) -> Response:
        fmt = CompletionFormat(f"cmpl-{uuid.uuid4().hex}", self.check_model(body.model), self.engine.tokenizer)
        return await self._run(body, body.prompt, fmt, raw)

    async def chat(self, body: p.ChatCompletionRequest, raw: Request) -> Response:
        fmt = ChatFormat(f"chatcmpl-{uuid.uuid4().hex}", self.check_model(body.model), self.engine.tokenizer,
                         top_logprobs=body.top_logprobs or 0)
        ids = await self.engine.chat_prompt([m.for_template() for m in body.messages])
        return await self._run(body, ids, fmt, raw)

    async def _run(self, body: p.GenerationRequest, prompt: str | list[int], fmt: ResponseFormat,
                   raw: Request) -> Response:
        params: SamplingParams = body.sampling_params()
        tracker = ChoiceTracker()
        results = self.engine.generate(prompt, params, fmt.id, cache_salt=body.cache_salt, priority=body.priority)
        if body.stream:
            # The first output is awaited here, not in the stream, so that the
            # engine's rejection of the request is still a proper 4xx.
            connected, first = await _unless_disconnected(raw, anext(results))
            if not connected:
                return Response(status_code=499)
            return StreamingResponse(_sse_events(results, first, tracker, fmt, body.include_usage),
                                     media_type="text/event-stream")
        connected, final = await _unless_disconnected(raw, _whole(results))
        if not connected:
            return Response(status_code=499)
        if final.error:  # not the client's doing: a KV load failed under kv_load_failure_policy=fail
            return error_response(APIError(500, final.error, type="internal_server_error", code="kv_load_failed"))
        deltas = tracker.update(final)
        return JSONResponse(fmt.response(deltas, tracker.usage(final)).model_dump())


# -- the app ---------------------------------------------------------------------

DEFAULT_MAX_REQUEST_BYTES = 32 << 20


def build_app(engine, served_model_names: list[str], api_key: str | None, *, metrics_public: bool = False,
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    app = FastAPI(title="kvtier", version=kvtier_version())
    serving = OpenAIServing(engine, served_model_names or [engine.model_name])
    registry = make_registry(engine.stats)
    _install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, limit=max_request_bytes)
    if api_key:
        open_paths = frozenset({"/health", "/metrics"} if metrics_public else {"/health"})
        app.add_middleware(APIKeyMiddleware, api_key=api_key, open_paths=open_paths)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine.is_healthy() else 503)

    @app.get("/version")
    async def version() -> dict:
        return {"version": kvtier_version()}

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = render(registry)
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> p.ModelList:
        return serving.models()

    @app.post("/v1/completions")
    async def completions(body: p.CompletionRequest, raw: Request) -> Response:
        return await serving.completions(body, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: p.ChatCompletionRequest, raw: Request) -> Response:
        return await serving.chat(body, raw)

    return app
