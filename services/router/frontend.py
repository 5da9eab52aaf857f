"""What the two public APIs share: the gRPC Generation service (api.py) and the OpenAI-compatible HTTP API
(http_api.py) are thin adapters over this one request path, so they validate, admit, cancel and stream alike.

A request is a `GenerateRequest` (the public proto, whichever transport it came by): `Frontend.start` validates it,
renders chat messages with the target's chat template, tokenizes off the event loop and hands it to the replica
pool; the `Stream` it returns yields the output as `Chunk`s of text and token ids, released together (TextStream),
and times the request for the metrics. Failures are exceptions that carry a gRPC status (`status_of`); each adapter
says them its own way. However a stream ends (done, stop string, the client gone, a lane failure), `Stream.close`
leaves nothing running: an unfinished request is cancelled, which frees its KV on both services.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import time
import uuid
from dataclasses import dataclass

import grpc

from minedraft.runtime.sampling import SamplingParams
from minedraft.runtime.sequence import Sequence
from minedraft.v1 import generate_pb2 as gpb
from services.router.clients import ServiceError
from services.router.metrics import Metrics
from services.router.replicas import ReplicaPool
from services.router.request import QueueFull, Request, Unavailable
from services.router.text import TextStream

MAX_STOP_STRINGS, MAX_STOP_CHARS, MAX_ID_CHARS = 16, 256, 256


class InvalidRequest(ValueError):
    """The request is wrong and retrying it unchanged cannot help: INVALID_ARGUMENT / HTTP 400."""


class UnknownModel(InvalidRequest):
    """It names a model this router does not serve: INVALID_ARGUMENT / HTTP 404."""


class TooLarge(QueueFull):
    """It needs more KV cache than a model service has, so it could never run: RESOURCE_EXHAUSTED / HTTP 400."""


def status_of(exc: Exception) -> grpc.StatusCode:
    """The gRPC status a failure of the request path ends a call with."""
    if isinstance(exc, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, Unavailable):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, ServiceError):
        return exc.code
    return grpc.StatusCode.INTERNAL


@dataclass
class Chunk:
    """New output: text and the token ids it decodes from; `finish_reason` is set on the last chunk only (stop = EOS,
    length, stop_string)."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None


def speculation_stats(seq: Sequence) -> gpb.SpeculationStats:
    """A request's speculation, as both APIs report it in their final response."""
    return gpb.SpeculationStats(drafted_tokens=seq.drafted, accepted_tokens=seq.accepted,
                                verify_steps=seq.verify_steps, num_drafts=seq.drafts,
                                mean_acceptance_length=1 + seq.accepted / seq.drafts if seq.drafts else 0.0,
                                acceptance_rate=seq.accepted / seq.drafted if seq.drafted else 0.0)


class Stream:
    """One admitted request's output: iterate it for Chunks (a lane failure raises its ServiceError); `close` when
    done with it, however that happens (idempotent). Usage and speculation stats are read from it at the end."""

    def __init__(self, request: Request, stop: list[str], tokenizer, metrics: Metrics):
        self.request = request
        self.text = TextStream(tokenizer, stop)
        self.metrics = metrics
        self.finish_reason: str | None = None
        self._first_token_at: float | None = None
        self._last_token_at = 0.0
        self._ended = False

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.seq.prompt)

    @property
    def completion_tokens(self) -> int:
        """Tokens sent to the client (after a stop string, fewer than the target generated)."""
        return self.text.sent_tokens

    def speculation(self) -> gpb.SpeculationStats:
        return speculation_stats(self.request.seq)

    async def __aiter__(self):
        r, text = self.request, self.text
        try:
            while True:
                kind, value = await r.events.get()
                now = time.monotonic()
                if kind == "error":
                    self._end("error", now)
                    raise value
                if kind == "done":
                    new_text, new_ids = text.flush()
                    self._end(value, now)
                    yield Chunk(new_text, new_ids, value)
                    return
                if self._first_token_at is None:
                    self._first_token_at = now
                    self.metrics.first_token(r, now)
                else:
                    self.metrics.next_token(now - self._last_token_at)
                self._last_token_at = now
                new_text, new_ids = text.feed(value)
                if text.stopped:
                    self._end("stop_string", now)
                    yield Chunk(new_text, new_ids, "stop_string")
                    return
                yield Chunk(new_text, new_ids)
        finally:
            self.close()

    def close(self) -> None:
        """The caller is done with the stream: a request still running is cancelled (the client went away, or a
        stop string ended it before the lane did)."""
        if not self.request.seq.finished:
            self.request.cancel()
        self._end("cancelled", time.monotonic())

    def _end(self, reason: str, now: float) -> None:
        if self._ended:
            return
        self._ended, self.finish_reason = True, reason
        self.metrics.finished(self.request, reason, self._first_token_at, now, self.text.sent_tokens)


class Frontend:
    """Validation, chat templates, tokenization and admission for both public APIs. Made before the model services
    are up (so both APIs answer UNAVAILABLE / 503 meanwhile); `attach` makes it serve."""

    def __init__(self, metrics: Metrics | None = None):
        self.pool: ReplicaPool | None = None
        self.metrics = metrics if metrics is not None else Metrics()
        self.tokenizer = None
        self.info: gpb.ServerInfo | None = None

    def attach(self, pool: ReplicaPool, tokenizer, info: gpb.ServerInfo) -> "Frontend":
        self.tokenizer, self.info = tokenizer, info
        # No token is longer than this many characters, so a prompt longer than context x this cannot fit and is
        # refused before tokenizing it (which would take ~1 s per MB).
        self.max_token_chars = max(len(t) for t in tokenizer.get_vocab())
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.metrics.attach(pool, info.target_model, info.num_speculative_tokens)
        self.pool = pool
        return self

    @property
    def ready(self) -> bool:
        return self.pool is not None

    @property
    def serving(self) -> bool:
        return self.pool is not None and self.pool.serving

    @property
    def model(self) -> str:
        return self.info.target_model if self.info is not None else ""

    # ---- validation -----------------------------------------------------------------------------------------------
    def _check_length(self, chars: int, what: str) -> None:
        if chars > self.pool.max_len * self.max_token_chars:
            raise InvalidRequest(f"{what} of {chars} characters cannot fit the context of {self.pool.max_len} tokens")

    async def _tokenize(self, text: str) -> list[int]:
        # Off the event loop: other requests keep streaming while a long prompt is tokenized.
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.tokenizer.encode(text, add_special_tokens=False))

    async def _chat_ids(self, chat: gpb.ChatMessages) -> list[int]:
        """The conversation rendered by the target's own chat template, with the prompt for the assistant's turn (the
        template adds whatever special tokens it wants, so tokenization adds none)."""
        if not self.has_chat_template:
            raise InvalidRequest(f"model {self.model!r} has no chat template: send a prompt (raw text) or prompt_ids "
                                 "instead of messages")
        if not chat.messages:
            raise InvalidRequest("messages is empty")
        for i, m in enumerate(chat.messages):
            if not m.role:
                raise InvalidRequest(f"messages[{i}].role is empty")
        self._check_length(sum(len(m.content) + len(m.role) for m in chat.messages), "messages")
        messages = [{"role": m.role, "content": m.content} for m in chat.messages]

        def render() -> list[int]:
            try:
                text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as exc:  # the template's own raise_exception (e.g. roles out of order), a Jinja error
                raise InvalidRequest(f"the chat template of {self.model!r} rejected messages: {exc}") from None
            return self.tokenizer.encode(text, add_special_tokens=False)

        return await asyncio.get_running_loop().run_in_executor(None, render)

    async def _prompt_ids(self, req: gpb.GenerateRequest) -> list[int]:
        kind = req.WhichOneof("input")
        if kind == "prompt":
            if not req.prompt:
                raise InvalidRequest("prompt is empty")
            self._check_length(len(req.prompt), "prompt")
            ids = await self._tokenize(req.prompt)
        elif kind == "prompt_ids":
            ids = list(req.prompt_ids.ids)
            vocab = self.pool.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise InvalidRequest(f"prompt_ids contains {len(bad)} ids outside the vocabulary [0, {vocab}), "
                                     f"e.g. {bad[0]}")
        elif kind == "messages":
            ids = await self._chat_ids(req.messages)
        else:
            raise InvalidRequest("set either prompt or prompt_ids, or messages")
        if not ids:
            raise InvalidRequest("prompt is empty after tokenization")
        return ids

    @staticmethod
    def _sampling(req: gpb.GenerateRequest) -> SamplingParams:
        o = req.sampling
        if not math.isfinite(o.top_p) or o.top_p < 0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {o.top_p}")
        params = SamplingParams(temperature=o.temperature, top_p=o.top_p or 1.0, top_k=o.top_k,
                                seed=o.seed if o.HasField("seed") else None)
        try:
            params.validate()
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        return params

    async def build(self, req: gpb.GenerateRequest, arrived: float | None = None,
                    default_max_new_tokens: bool = False) -> Request:
        """A validated Request for `req`. With `default_max_new_tokens`, max_new_tokens 0 means as many as fit (what
        OpenAI's chat API does without max_tokens); otherwise it must be set."""
        if req.model and req.model != self.model:
            raise UnknownModel(f"unknown model {req.model!r}; this server serves {self.model!r}")
        if len(req.request_id) > MAX_ID_CHARS:
            raise InvalidRequest(f"request_id longer than {MAX_ID_CHARS} characters")
        if len(req.stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in req.stop):
            raise InvalidRequest(f"stop: at most {MAX_STOP_STRINGS} non-empty strings of <= {MAX_STOP_CHARS} chars")
        params = self._sampling(req)
        ids = await self._prompt_ids(req)
        ctx = self.pool.max_len
        if len(ids) >= ctx:
            raise InvalidRequest(f"prompt has {len(ids)} tokens; the context length is {ctx}")
        limit = min(self.pool.cfg.max_new_tokens_limit, ctx - len(ids))
        max_new = req.max_new_tokens or (limit if default_max_new_tokens else 0)
        if max_new <= 0:
            raise InvalidRequest(f"max_new_tokens must be >= 1, got {req.max_new_tokens}")
        if max_new > limit:
            raise InvalidRequest(f"max_new_tokens {max_new} too large: at most {limit} for a {len(ids)}-token prompt "
                                 f"(context {ctx}, limit {self.pool.cfg.max_new_tokens_limit})")
        seq = Sequence(uuid.uuid4().hex, ids, params, max_new, ctx, self.pool.eos_ids, req.ignore_eos)
        r = Request(seq=seq, sampling=req.sampling)
        if arrived is not None:
            r.arrived = arrived
        if not self.pool.fits_ever(r):
            raise TooLarge(f"request needs more KV cache than a model service has ({len(ids)} + {max_new} tokens)")
        return r

    # ---- running a request ----------------------------------------------------------------------------------------
    async def start(self, req: gpb.GenerateRequest, default_max_new_tokens: bool = False) -> Stream:
        """Validate and admit `req`; its output is the Stream returned. Raises InvalidRequest, QueueFull or
        Unavailable (see status_of) when it cannot run."""
        arrived = time.monotonic()
        if self.pool is None:
            raise Unavailable("router is waiting for its model services")
        try:
            r = await self.build(req, arrived, default_max_new_tokens)
            self.pool.submit(r)
        except (InvalidRequest, QueueFull, Unavailable) as exc:
            self.metrics.rejected_request(status_of(exc).name)
            raise
        return Stream(r, list(req.stop), self.tokenizer, self.metrics)


class BearerToken:
    """The public APIs' bearer token. Comparison is of SHA-256 digests with hmac.compare_digest: constant time, and
    not even the length leaks."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("empty bearer token")
        self._digest = hashlib.sha256(token.encode()).digest()

    def matches(self, header: str | bytes) -> bool:
        """`header` is the value of an `authorization` header / metadata entry ('' when there is none)."""
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        scheme, _, credential = header.partition(" ")
        match = hmac.compare_digest(hashlib.sha256(credential.encode()).digest(), self._digest)
        return match and scheme.lower() == "bearer"


__all__ = ["BearerToken", "Chunk", "Frontend", "InvalidRequest", "Stream", "TooLarge", "UnknownModel", "status_of",
           "speculation_stats"]
