"""The public gRPC Generation service: a thin adapter over the request path both public APIs share (frontend.py).
It turns a call into a Stream and the Stream's chunks into messages; a failure ends the call with the status the
request path gives it. Every way a call ends (done, stop string, client cancel, deadline, lane failure) closes the
Stream, which cancels an unfinished request and so frees its KV on both services."""

from __future__ import annotations

import logging
import uuid
from typing import Iterable

import grpc

from minedraft.v1 import generate_pb2 as gpb
from services.router.clients import ServiceError
from services.router.frontend import BearerToken, Frontend, InvalidRequest, Stream, status_of
from services.router.request import QueueFull, Unavailable

log = logging.getLogger(__name__)

FINISH = {"stop": gpb.FINISH_REASON_EOS, "length": gpb.FINISH_REASON_LENGTH,
          "stop_string": gpb.FINISH_REASON_STOP_STRING}


class GenerationServicer:
    """Registered with the server before the model services are up (so health answers NOT_SERVING meanwhile); it
    serves once its Frontend is attached."""

    def __init__(self, frontend: Frontend):
        self.frontend = frontend

    async def _chunks(self, req: gpb.GenerateRequest, context, stream_out: list):
        """The request's Chunks; the Stream goes into `stream_out` for the final message's usage and stats."""
        try:
            stream = await self.frontend.start(req)
        except (InvalidRequest, QueueFull, Unavailable) as exc:
            await context.abort(status_of(exc), str(exc))
        stream_out.append(stream)
        try:
            async for chunk in stream:
                yield chunk
        except ServiceError as exc:
            await context.abort(exc.code, str(exc))
        finally:
            stream.close()

    @staticmethod
    def _tail(stream: Stream, resp) -> None:
        resp.usage.prompt_tokens = stream.prompt_tokens
        resp.usage.completion_tokens = stream.completion_tokens
        resp.speculation.CopyFrom(stream.speculation())

    async def Generate(self, req: gpb.GenerateRequest, context) -> gpb.GenerateResponse:
        rid = req.request_id or uuid.uuid4().hex
        parts, ids, reason, streams = [], [], None, []
        async for chunk in self._chunks(req, context, streams):
            parts.append(chunk.text)
            ids.extend(chunk.token_ids)
            reason = chunk.finish_reason
        resp = gpb.GenerateResponse(request_id=rid, text="".join(parts), token_ids=ids,
                                    finish_reason=FINISH.get(reason, gpb.FINISH_REASON_UNSPECIFIED))
        self._tail(streams[0], resp)
        return resp

    async def GenerateStream(self, req: gpb.GenerateRequest, context):
        rid = req.request_id or uuid.uuid4().hex
        streams = []
        chunks = self._chunks(req, context, streams)
        try:
            async for chunk in chunks:
                msg = gpb.GenerateStreamResponse(request_id=rid, text=chunk.text, token_ids=chunk.token_ids)
                if chunk.finish_reason is not None:
                    msg.finish_reason = FINISH.get(chunk.finish_reason, gpb.FINISH_REASON_UNSPECIFIED)
                    self._tail(streams[0], msg)
                if chunk.text or chunk.token_ids or chunk.finish_reason is not None:
                    yield msg
        finally:
            await chunks.aclose()

    async def GetInfo(self, req, context) -> gpb.ServerInfo:
        """What the router serves, and every replica as of now (liveness, KV use, each lane's queue)."""
        f = self.frontend
        if not f.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "router is waiting for its model services")
        info = gpb.ServerInfo()
        info.CopyFrom(f.info)
        info.serving = f.pool.serving
        info.verifier_replicas.extend(f.pool.verifiers)
        info.drafter_replicas.extend(f.pool.drafters)
        info.replicas.extend(await f.pool.status())
        return info


class BearerTokenAuth(grpc.aio.ServerInterceptor):
    """Every call to `services` must carry `authorization: Bearer <token>`, else it ends UNAUTHENTICATED before its
    request is even parsed. Other services (health, reflection) stay open, so orchestrators' health checks and
    `grpcurl list/describe` keep working; they expose nothing the public protos do not.

    The token check itself (constant time) is BearerToken's, shared with the HTTP API."""

    def __init__(self, token: str, services: Iterable[str]):
        self._token = BearerToken(token)
        self._prefixes = tuple(f"/{s}/" for s in services)

    def allowed(self, metadata) -> bool:
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        return self._token.matches(values[0] if len(values) == 1 else "")

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


__all__ = ["GenerationServicer", "BearerTokenAuth"]
