"""The public Generation service: validates and tokenizes requests, hands them to the replica pool (which puts each
on a lane), and turns accepted tokens into text (streamed or whole). Every way a call can end (done, stop string,
client cancel, deadline, lane failure) cancels the request, which frees its KV on both services."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import uuid
from typing import Iterable

import grpc

from minedraft.runtime.sampling import SamplingParams
from minedraft.runtime.sequence import Sequence
from minedraft.v1 import generate_pb2 as gpb
from services.router.replicas import ReplicaPool
from services.router.request import QueueFull, Request, Unavailable
from services.router.text import TextStream

log = logging.getLogger(__name__)

FINISH = {"stop": gpb.FINISH_REASON_EOS, "length": gpb.FINISH_REASON_LENGTH,
          "stop_string": gpb.FINISH_REASON_STOP_STRING}
MAX_STOP_STRINGS, MAX_STOP_CHARS, MAX_ID_CHARS = 16, 256, 256


class InvalidRequest(ValueError):
    pass


class GenerationServicer:
    """Registered with the server before the model services are up (so health answers NOT_SERVING meanwhile);
    `attach` makes it serve."""

    def __init__(self):
        self.pool: ReplicaPool | None = None

    def attach(self, pool: ReplicaPool, tokenizer, info: gpb.ServerInfo) -> "GenerationServicer":
        self.tokenizer, self.info = tokenizer, info
        # No token is longer than this many characters, so a prompt longer than context x this cannot fit and is
        # refused before tokenizing it (which would take ~1 s per MB).
        self.max_token_chars = max(len(t) for t in tokenizer.get_vocab())
        self.pool = pool
        return self

    async def _require_ready(self, context) -> None:
        if self.pool is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "router is waiting for its model services")

    # ---- validation -----------------------------------------------------------------------------------------------
    async def _prompt_ids(self, req: gpb.GenerateRequest) -> list[int]:
        kind = req.WhichOneof("input")
        if kind == "prompt":
            if not req.prompt:
                raise InvalidRequest("prompt is empty")
            if len(req.prompt) > self.pool.max_len * self.max_token_chars:
                raise InvalidRequest(f"prompt of {len(req.prompt)} characters cannot fit the context of "
                                     f"{self.pool.max_len} tokens")
            # Off the event loop: other requests keep streaming while a long prompt is tokenized.
            ids = await asyncio.get_running_loop().run_in_executor(
                None, lambda: self.tokenizer.encode(req.prompt, add_special_tokens=False))
        elif kind == "prompt_ids":
            ids = list(req.prompt_ids.ids)
            vocab = self.pool.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise InvalidRequest(f"prompt_ids contains {len(bad)} ids outside the vocabulary [0, {vocab}), "
                                     f"e.g. {bad[0]}")
        else:
            raise InvalidRequest("set either prompt or prompt_ids")
        if not ids:
            raise InvalidRequest("prompt is empty after tokenization")
        return ids

    def _sampling(self, req: gpb.GenerateRequest) -> SamplingParams:
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

    async def build(self, req: gpb.GenerateRequest) -> Request:
        if req.model and req.model not in (self.info.target_model, ""):
            raise InvalidRequest(f"unknown model {req.model!r}; this server serves {self.info.target_model!r}")
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
        if req.max_new_tokens <= 0:
            raise InvalidRequest(f"max_new_tokens must be >= 1, got {req.max_new_tokens}")
        if req.max_new_tokens > limit:
            raise InvalidRequest(f"max_new_tokens {req.max_new_tokens} too large: at most {limit} for a "
                                 f"{len(ids)}-token prompt (context {ctx}, limit "
                                 f"{self.pool.cfg.max_new_tokens_limit})")
        seq = Sequence(uuid.uuid4().hex, ids, params, req.max_new_tokens, ctx, self.pool.eos_ids, req.ignore_eos)
        r = Request(seq=seq, sampling=req.sampling)
        if not self.pool.fits_ever(r):
            raise QueueFull(f"request needs more KV cache than a model service has ({len(ids)} + {req.max_new_tokens}"
                            " tokens)")
        return r

    # ---- running a request ----------------------------------------------------------------------------------------
    async def _run(self, req: gpb.GenerateRequest, context):
        """Yield (new_text, new_ids, finish_reason or None, Request, tokens released so far) as the lane accepts
        tokens. Text and ids are released together (TextStream), so what a client got always agrees."""
        await self._require_ready(context)
        try:
            r = await self.build(req)
            self.pool.submit(r)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except QueueFull as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except Unavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        text = TextStream(self.tokenizer, list(req.stop))
        finished = False
        try:
            while True:
                kind, value = await r.events.get()
                if kind == "error":
                    await context.abort(value.code, str(value))
                if kind == "done":
                    finished = True
                    new_text, new_ids = text.flush()
                    yield new_text, new_ids, value, r, text.sent_tokens
                    return
                new_text, new_ids = text.feed(value)
                if text.stopped:
                    finished = True
                    yield new_text, new_ids, "stop_string", r, text.sent_tokens
                    return
                yield new_text, new_ids, None, r, text.sent_tokens
        finally:
            if not finished or text.stopped:
                r.cancel()

    @staticmethod
    def _tail(r: Request, completion_tokens: int, resp) -> None:
        resp.usage.prompt_tokens = len(r.seq.prompt)
        resp.usage.completion_tokens = completion_tokens
        resp.speculation.drafted_tokens = r.seq.drafted
        resp.speculation.accepted_tokens = r.seq.accepted
        resp.speculation.verify_steps = r.seq.verify_steps

    async def Generate(self, req: gpb.GenerateRequest, context) -> gpb.GenerateResponse:
        rid = req.request_id or uuid.uuid4().hex
        parts, ids, reason, r, n = [], [], None, None, 0
        async for new_text, new_ids, reason, r, n in self._run(req, context):
            parts.append(new_text)
            ids.extend(new_ids)
        resp = gpb.GenerateResponse(request_id=rid, text="".join(parts), token_ids=ids,
                                    finish_reason=FINISH.get(reason, gpb.FINISH_REASON_UNSPECIFIED))
        self._tail(r, n, resp)
        return resp

    async def GenerateStream(self, req: gpb.GenerateRequest, context):
        rid = req.request_id or uuid.uuid4().hex
        async for new_text, new_ids, reason, r, n in self._run(req, context):
            msg = gpb.GenerateStreamResponse(request_id=rid, text=new_text, token_ids=new_ids)
            if reason is not None:
                msg.finish_reason = FINISH.get(reason, gpb.FINISH_REASON_UNSPECIFIED)
                self._tail(r, n, msg)
            if new_text or new_ids or reason is not None:
                yield msg

    async def GetInfo(self, req, context) -> gpb.ServerInfo:
        """What the router serves, and every replica as of now (liveness, KV use, each lane's queue)."""
        await self._require_ready(context)
        info = gpb.ServerInfo()
        info.CopyFrom(self.info)
        info.serving = self.pool.serving
        info.verifier_replicas.extend(self.pool.verifiers)
        info.drafter_replicas.extend(self.pool.drafters)
        info.replicas.extend(await self.pool.status())
        return info


class BearerTokenAuth(grpc.aio.ServerInterceptor):
    """Every call to `services` must carry `authorization: Bearer <token>`, else it ends UNAUTHENTICATED before its
    request is even parsed. Other services (health, reflection) stay open, so orchestrators' health checks and
    `grpcurl list/describe` keep working; they expose nothing the public protos do not.

    Comparison is of SHA-256 digests with hmac.compare_digest: constant time, and not even the length leaks."""

    def __init__(self, token: str, services: Iterable[str]):
        if not token:
            raise ValueError("empty bearer token")
        self._digest = hashlib.sha256(token.encode()).digest()
        self._prefixes = tuple(f"/{s}/" for s in services)

    def allowed(self, metadata) -> bool:
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        value = values[0] if len(values) == 1 else ""
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, credential = value.partition(" ")
        match = hmac.compare_digest(hashlib.sha256(credential.encode()).digest(), self._digest)
        return match and scheme.lower() == "bearer"

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self._prefixes) or \
                self.allowed(details.invocation_metadata):
            return handler
        log.debug("rejected unauthenticated call to %s", details.method)
        return _deny(handler)


async def _unauthenticated(_request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token (authorization metadata)")


async def _unauthenticated_stream(_request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token (authorization metadata)")
    yield  # pragma: no cover - abort raises


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts; requests stay unparsed bytes."""
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_unauthenticated_stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_unauthenticated)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_unauthenticated_stream)
    return grpc.unary_unary_rpc_method_handler(_unauthenticated)


__all__ = ["GenerationServicer", "InvalidRequest", "BearerTokenAuth"]
