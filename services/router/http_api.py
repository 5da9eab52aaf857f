"""The OpenAI-compatible HTTP API (and /health, /metrics) of the router: a thin adapter over the same request path as
the gRPC API (frontend.py), so both validate, admit, cancel and stream alike.

OpenAI's JSON becomes a `GenerateRequest` (chat messages its `messages`, rendered by the target's chat template) and
a Stream's Chunks become OpenAI's responses; streaming is server-sent events whose deltas carry every token a verify
step accepted (speculative decoding emits several at once). Errors are OpenAI's shape, `{"error": {"message",
"type", "param", "code"}}`, with the HTTP status the request path's failure maps to (400 / 401 / 404 / 429 / 503).
A client that disconnects, streaming or not, has its request cancelled, which frees its KV on both services.

Served by uvicorn (h11) on the router's own event loop, as a task next to the gRPC server: no thread, no second
loop, the same Frontend object. uvicorn's own signal handling is turned off; the router decides when it stops.
What is (not) supported of the OpenAI API: README, "OpenAI-compatible HTTP API".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import uuid
from dataclasses import dataclass

import grpc
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from minedraft.v1 import common_pb2, generate_pb2 as gpb
from services.router.clients import ServiceError
from services.router.frontend import (BearerToken, Frontend, InvalidRequest, Stream, TooLarge, UnknownModel,
                                      status_of)
from services.router.metrics import CONTENT_TYPE
from services.router.request import QueueFull, Unavailable

log = logging.getLogger(__name__)

# OpenAI's finish reasons: EOS and stop strings are both "stop".
FINISH = {"stop": "stop", "stop_string": "stop", "length": "length"}
# How a failure's gRPC status reads over HTTP: (status, OpenAI error type, code).
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", "invalid_request"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error", "not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "queue_full"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error", "unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error", "deadline_exceeded"),
}
INT32_MAX = 2 ** 31 - 1
# Fields we do not implement, and the values of theirs that ask for nothing (accepted, so clients that send defaults
# work). Any other value is a 400 saying so rather than being silently ignored.
UNSUPPORTED = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
    "best_of": (None, 1), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1), "min_p": (None, 0), "logit_bias": (None, {}), "tools": (None, []),
    "functions": (None, []), "tool_choice": (None, "none", "auto"), "response_format": (None, {"type": "text"}),
    "prediction": (None,), "audio": (None,), "modalities": (None, ["text"]), "min_tokens": (None, 0),
}


class ApiError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, type_: str, code: str | None, param: str | None = None):
        super().__init__(message)
        self.status, self.type, self.code, self.param = status, type_, code, param

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", "invalid_request", param)


def api_error(exc: Exception) -> ApiError:
    """A failure of the request path (frontend.py's exceptions, a lane's ServiceError) as an HTTP error."""
    if isinstance(exc, UnknownModel):
        return ApiError(404, str(exc), "not_found_error", "model_not_found", "model")
    if isinstance(exc, TooLarge):  # retrying cannot help: a client error, not a 429
        return ApiError(400, str(exc), "invalid_request_error", "request_too_large")
    status, type_, code = HTTP_STATUS.get(status_of(exc), (500, "server_error", "internal_error"))
    return ApiError(status, str(exc), type_, code)


# ---- OpenAI JSON -> GenerateRequest ---------------------------------------------------------------------------------
def _get(body: dict, name: str, kind: type | tuple, default=None):
    """body[name] if it has the right JSON type (null = absent), else a 400 naming the field."""
    value = body.get(name)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array",
                 dict: "an object"}
        raise bad_request(f"{name} must be {' or '.join(names[k] for k in kinds)}", name)
    return value


def _number(body: dict, name: str, default: float) -> float:
    value = _get(body, name, (int, float), default)
    try:
        return float(value)
    except OverflowError:  # an integer too large for a float: as out of range as inf, which validation refuses
        return float("inf")


@dataclass
class Options:
    """What an HTTP request asks beyond its GenerateRequest."""

    chat: bool
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False


def _common(body: dict, req: gpb.GenerateRequest, chat: bool) -> Options:
    """The fields completions and chat completions share: sampling, stop, limits, streaming, and refusing what is
    not implemented."""
    for name, off in UNSUPPORTED.items():
        if name in body and body[name] not in off:
            raise bad_request(f"{name} is not supported by this server", name)
    if _get(body, "n", int, 1) != 1:
        raise bad_request("only n=1 is supported", "n")
    req.model = _get(body, "model", str, "")
    s = common_pb2.SamplingOptions(temperature=_number(body, "temperature", 1.0), top_p=_number(body, "top_p", 1.0))
    top_k = _get(body, "top_k", int, 0)
    if not -1 <= top_k <= INT32_MAX:
        raise bad_request(f"top_k must be -1 (off), 0 (off) or a positive integer, got {top_k}", "top_k")
    s.top_k = max(top_k, 0)
    seed = _get(body, "seed", int)
    if seed is not None:
        s.seed = seed % 2 ** 64  # any JSON integer; the proto's seed is 64-bit unsigned
    req.sampling.CopyFrom(s)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(x, str) for x in stops):
        raise bad_request("stop must be a string or an array of strings", "stop")
    req.stop.extend(stops)
    req.ignore_eos = _get(body, "ignore_eos", bool, False)
    names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    name, limit = next(((n, v) for n, v in ((n, _get(body, n, int)) for n in names) if v is not None),
                       (names[-1], None))
    if limit is None and not chat:
        limit = 16  # OpenAI's (legacy) completions default
    if limit is not None:
        if not 1 <= limit <= INT32_MAX:
            raise bad_request(f"{name} must be between 1 and {INT32_MAX}, got {limit}", name)
        req.max_new_tokens = limit
    opts = Options(chat=chat, stream=_get(body, "stream", bool, False),
                   return_token_ids=_get(body, "return_token_ids", bool, False))
    stream_options = _get(body, "stream_options", dict, {})
    opts.include_usage = opts.stream and bool(_get(stream_options, "include_usage", bool, False))
    return opts


def completion_request(body: dict) -> tuple[gpb.GenerateRequest, Options]:
    req = gpb.GenerateRequest()
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        req.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(not 0 <= t <= INT32_MAX for t in prompt):
            raise bad_request("prompt token ids must be non-negative 32-bit integers", "prompt")
        req.prompt_ids.ids.extend(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise bad_request("only one prompt per request is supported (no batched prompts)", "prompt")
    else:
        raise bad_request("prompt must be a non-empty string or array of token ids", "prompt")
    return req, _common(body, req, chat=False)


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"messages[{i}].content: only text parts are supported", "messages")
            parts.append(part["text"])
        return "\n".join(parts)
    raise bad_request(f"messages[{i}].content must be a string or an array of text parts", "messages")


def chat_request(body: dict) -> tuple[gpb.GenerateRequest, Options]:
    req = gpb.GenerateRequest()
    messages = _get(body, "messages", list)
    if not messages:
        raise bad_request("messages must be a non-empty array", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a string role", "messages")
        if m.get("tool_calls"):
            raise bad_request("tool calls are not supported by this server", "messages")
        req.messages.messages.add(role=m["role"], content=_content(m, i))
    return req, _common(body, req, chat=True)


# ---- responses -----------------------------------------------------------------------------------------------------
def _speculation(stream: Stream) -> dict:
    stats = stream.speculation()
    return {f.name: getattr(stats, f.name) for f in stats.DESCRIPTOR.fields}


def _usage(stream: Stream) -> dict:
    p, c = stream.prompt_tokens, stream.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


class _Response:
    """The pieces of one HTTP request's answer: ids and object names, then each kind of message."""

    def __init__(self, frontend: Frontend, stream: Stream, opts: Options):
        self.stream, self.opts, self.model = stream, opts, frontend.model
        self.id = f"{'chatcmpl' if opts.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def whole(self, text: str, ids: list[int], reason: str | None) -> dict:
        choice = {"index": 0, "logprobs": None, "finish_reason": FINISH.get(reason, reason)}
        if self.opts.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        out = self._envelope("chat.completion" if self.opts.chat else "text_completion", [choice])
        self._token_ids(out, choice, ids, first=True)
        out["usage"] = _usage(self.stream)
        out["speculation"] = _speculation(self.stream)
        return out

    def chunk(self, text: str | None, ids: list[int], reason: str | None = None, first: bool = False) -> dict:
        """A stream chunk: new text (chat: a delta; `first` opens it with the role), or the end (`reason`)."""
        choice = {"index": 0, "logprobs": None, "finish_reason": FINISH.get(reason, reason)}
        if self.opts.chat:
            delta = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        out = self._envelope("chat.completion.chunk" if self.opts.chat else "text_completion", [choice])
        self._token_ids(out, choice, ids, first)
        if self.opts.include_usage:
            out["usage"] = None
        if reason is not None:
            out["speculation"] = _speculation(self.stream)
        return out

    def usage_chunk(self) -> dict:
        out = self._envelope("chat.completion.chunk" if self.opts.chat else "text_completion", [])
        out["usage"] = _usage(self.stream)
        out["speculation"] = _speculation(self.stream)
        return out

    def _token_ids(self, out: dict, choice: dict, ids: list[int], first: bool) -> None:
        """vLLM's `return_token_ids` extra: the choice's (new) token ids, and the prompt's with the first message."""
        if not self.opts.return_token_ids:
            return
        choice["token_ids"] = list(ids)
        if first:
            (out if self.opts.chat else choice)["prompt_token_ids"] = list(self.stream.request.seq.prompt)


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _events(resp: _Response):
    """The server-sent events of a streamed answer; the last is `data: [DONE]`."""
    stream = resp.stream
    try:
        if resp.opts.chat:
            yield _sse(resp.chunk(None, [], first=True))
        first = not resp.opts.chat
        async for c in stream:
            if c.text or (c.token_ids and resp.opts.return_token_ids):
                yield _sse(resp.chunk(c.text, c.token_ids, first=first))
                first = False
            if c.finish_reason is not None:
                yield _sse(resp.chunk(None, [], c.finish_reason))
        if resp.opts.include_usage:
            yield _sse(resp.usage_chunk())
    except ServiceError as exc:  # the headers are out: the error goes in the stream, as vLLM does
        yield _sse(api_error(exc).body())
    finally:
        stream.close()
    yield _sse("[DONE]")


class _EventStream(StreamingResponse):
    """Server-sent events whose Stream is closed however the response ends, even if it never started iterating.
    Starlette cancels the iteration when the client disconnects (it listens for http.disconnect meanwhile)."""

    def __init__(self, resp: _Response):
        super().__init__(_events(resp), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._stream = resp.stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._stream.close()


async def _until_disconnect(request: HttpRequest) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(stream: Stream) -> tuple[str, list[int], str | None]:
    parts, ids, reason = [], [], None
    async for c in stream:
        parts.append(c.text)
        ids.extend(c.token_ids)
        reason = c.finish_reason
    return "".join(parts), ids, reason


# ---- the app --------------------------------------------------------------------------------------------------------
def create_app(frontend: Frontend, token: BearerToken | None = None, max_body_bytes: int = 64 << 20) -> Starlette:
    """The ASGI app: /v1/completions, /v1/chat/completions, /v1/models (behind the bearer token when there is one),
    /health and /metrics (open, as the gRPC health service is)."""

    async def read_json(request: HttpRequest) -> dict:
        size, chunks = 0, []
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise ApiError(413, f"request body larger than {max_body_bytes >> 20} MB", "invalid_request_error",
                               "request_too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as exc:
            raise bad_request(f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise bad_request("request body must be a JSON object")
        return body

    async def generate(request: HttpRequest, parse) -> Response:
        try:
            req, opts = parse(await read_json(request))
        except ApiError as exc:  # refused before the request path saw it (which counts its own refusals)
            frontend.metrics.rejected_request("RESOURCE_EXHAUSTED" if exc.status == 413 else "INVALID_ARGUMENT")
            raise
        try:
            stream = await frontend.start(req, default_max_new_tokens=opts.chat)
        except (InvalidRequest, QueueFull, Unavailable) as exc:
            raise api_error(exc) from None
        resp = _Response(frontend, stream, opts)
        if opts.stream:
            return _EventStream(resp)
        # Unary: the request is cancelled if the client goes away before the answer is ready.
        work = asyncio.ensure_future(_collect(stream))
        gone = asyncio.ensure_future(_until_disconnect(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
            stream.close()
        if work.cancelled():
            return Response(status_code=499)  # nobody is listening; nginx's "client closed request"
        try:
            text, ids, reason = work.result()
        except ServiceError as exc:
            raise api_error(exc) from None
        return JSONResponse(resp.whole(text, ids, reason))

    async def completions(request: HttpRequest) -> Response:
        return await generate(request, completion_request)

    async def chat_completions(request: HttpRequest) -> Response:
        return await generate(request, chat_request)

    async def models(request: HttpRequest) -> Response:
        if not frontend.ready:
            raise api_error(Unavailable("router is waiting for its model services"))
        return JSONResponse({"object": "list", "data": [{
            "id": frontend.model, "object": "model", "created": started, "owned_by": "minedraft",
            "root": frontend.model, "max_model_len": frontend.pool.max_len}]})

    async def health(request: HttpRequest) -> Response:
        """200 while the router serves (as its gRPC health says SERVING), else 503."""
        if frontend.serving:
            return JSONResponse({"status": "serving"})
        if not frontend.ready:
            why = "waiting for its model services"
        else:
            why = "draining" if frontend.pool.draining else "no verifier is reachable"
        return ApiError(503, f"router is not serving: {why}", "service_unavailable_error", "unavailable").response()

    async def metrics(request: HttpRequest) -> Response:
        return Response(await frontend.metrics.render(), media_type=CONTENT_TYPE)

    async def on_api_error(request, exc: ApiError) -> Response:
        return exc.response()

    async def on_http_error(request, exc: HTTPException) -> Response:  # unknown path, wrong method
        type_, code = ("not_found_error", "not_found") if exc.status_code == 404 else ("invalid_request_error",
                                                                                       "invalid_request")
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return ApiError(exc.status_code, message, type_, code).response()

    started = int(time.time())
    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                            Route("/v1/models", models, methods=["GET"]),
                            Route("/health", health, methods=["GET"]),
                            Route("/metrics", metrics, methods=["GET"])],
                    exception_handlers={ApiError: on_api_error, HTTPException: on_http_error})
    return RequireToken(app, token) if token is not None else app


class RequireToken:
    """ASGI middleware: every /v1/ request must carry `Authorization: Bearer <token>` (exactly one), else 401 before
    its body is read. /health and /metrics stay open, like the gRPC health service."""

    def __init__(self, app, token: BearerToken):
        self.app, self.token = app, token

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            values = [v for k, v in scope["headers"] if k == b"authorization"]
            if not self.token.matches(values[0] if len(values) == 1 else b""):
                log.debug("rejected unauthenticated HTTP request to %s", scope["path"])
                error = ApiError(401, "missing or invalid bearer token (Authorization header)",
                                 "authentication_error", "invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the router's own (drain on SIGTERM) stay in charge."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    """The HTTP API served by uvicorn as a task on the running event loop."""

    def __init__(self, app, host: str, port: int, tls_cert: str = "", tls_key: str = "", grace_s: float = 3.0):
        self.host, self.port, self.tls = host, port, bool(tls_cert and tls_key)
        config = uvicorn.Config(app, http="h11", ws="none", lifespan="off", log_config=None, access_log=False,
                                server_header=False, timeout_graceful_shutdown=int(max(grace_s, 1)),
                                ssl_certfile=tls_cert or None, ssl_keyfile=tls_key or None)
        self._server = _Server(config)
        self._task: asyncio.Task | None = None
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # its start/stop lines: we log our own

    async def start(self) -> None:
        """Listen (SystemExit if the port cannot be had) and serve in the background."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            sock = socket.create_server((self.host, self.port), family=family)
        except OSError as exc:
            raise SystemExit(f"cannot listen on {self.host}:{self.port} (HTTP): {exc}") from None
        self.port = sock.getsockname()[1]
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="http")
        while not self._server.started and not self._task.done():
            await asyncio.sleep(0.01)
        if self._task.done():
            self._task.result()  # raises what went wrong
            raise SystemExit(f"HTTP server on {self.host}:{self.port} stopped at start-up")

    async def stop(self) -> None:
        """Stop listening; requests still running get the grace period, then are cancelled."""
        if self._task is None:
            return
        self._server.should_exit = True
        try:
            await self._task
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - shutting down regardless
            log.warning("HTTP server stopped with %r", exc)


__all__ = ["ApiError", "HttpServer", "RequireToken", "chat_request", "completion_request", "create_app"]
