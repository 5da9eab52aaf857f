"""Router process: connect to the model services (health-gated), check they form a valid pair, negotiate the tensor
transport, start a lane per verifier, and serve the public APIs: gRPC Generation and, with --http-port, the
OpenAI-compatible HTTP API with /health and /metrics (both optionally over TLS, behind a bearer token). Both run on one
event loop over one Frontend, so they share admission, queues and metrics."""

from __future__ import annotations

import argparse
import asyncio
import logging

import grpc
from google.protobuf.message_factory import GetMessageClass

from minedraft import config
from minedraft.rpc import server_credentials
from minedraft.runtime.checkpoint import load_tokenizer, vocab_digest
from minedraft.v1 import generate_pb2
from services import common
from services.router.api import BearerTokenAuth, GenerationServicer
from services.router.frontend import BearerToken, Frontend
from services.router.http_api import HttpServer, create_app
from services.router.metrics import Metrics
from services.router.replicas import ReplicaPool

log = logging.getLogger("minedraft")
SERVICE = generate_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


async def build(cfg: config.RouterConfig, metrics: Metrics | None = None):
    """Everything but the listening sockets: (replica pool with its lanes, tokenizer, server info)."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    pool = ReplicaPool(cfg, metrics)
    await pool.start()
    verifier = next(iter(pool.verifiers.values()))
    if vocab_digest(tokenizer) != verifier.info.tokenizer_digest:
        raise SystemExit(f"tokenizer at {cfg.tokenizer} does not match the verifier's model vocabulary")
    drafter = next(iter(pool.drafters.values()), None)
    info = generate_pb2.ServerInfo(target_model=verifier.info.model_name,
                                   draft_model=drafter.info.model_name if drafter else "", mode=cfg.mode,
                                   num_speculative_tokens=cfg.num_speculative_tokens, max_context=pool.max_len,
                                   max_batch_size=cfg.max_batch_size)
    return pool, tokenizer, info


def _parsed(method, request_cls, streaming: bool):
    """Wrap a servicer method so that it takes raw bytes: a request that is not a valid message (corrupt wire
    format, a string field that is not UTF-8, ...) ends INVALID_ARGUMENT instead of gRPC's generic UNKNOWN."""

    async def parse(raw: bytes, context):
        try:
            return request_cls.FromString(raw)
        except Exception as exc:  # DecodeError, or whatever else a parser may raise on hostile input
            why = str(exc)
            prefix = f"Error parsing message with type '{request_cls.DESCRIPTOR.full_name}': "
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {request_cls.DESCRIPTOR.full_name}: "
                                                                  f"{why.removeprefix(prefix) or type(exc).__name__}")

    if streaming:
        async def stream(raw, context):
            messages = method(await parse(raw, context), context)
            try:
                async for msg in messages:
                    yield msg
            finally:  # closed with us, not whenever the garbage collector gets to it (it cancels the request)
                await messages.aclose()
        return stream

    async def unary(raw, context):
        return await method(await parse(raw, context), context)
    return unary


def add_generation_service(server: grpc.aio.Server, servicer: GenerationServicer) -> None:
    """Like generate_pb2_grpc.add_GenerationServicer_to_server, with request parsing done by `_parsed`."""
    handlers = {}
    for m in generate_pb2.DESCRIPTOR.services_by_name["Generation"].methods:
        request_cls, response_cls = GetMessageClass(m.input_type), GetMessageClass(m.output_type)
        make = grpc.unary_stream_rpc_method_handler if m.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[m.name] = make(_parsed(getattr(servicer, m.name), request_cls, m.server_streaming),
                                response_serializer=response_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def auth_token(cfg: config.RouterConfig) -> str:
    if cfg.auth_token and cfg.auth_token_file:
        raise SystemExit("set one of --auth-token and --auth-token-file")
    if cfg.auth_token_file:
        try:
            token = open(cfg.auth_token_file).read().strip()
        except OSError as exc:
            raise SystemExit(f"cannot read --auth-token-file {cfg.auth_token_file!r}: {exc}") from None
        if not token:
            raise SystemExit(f"--auth-token-file {cfg.auth_token_file!r} is empty")
        return token
    return cfg.auth_token.strip()


async def _serve(cfg: config.RouterConfig) -> None:
    credentials = server_credentials(cfg.tls_cert, cfg.tls_key)
    token = auth_token(cfg)
    if token and credentials is None and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("a bearer token over plaintext on %s can be read off the network: set --tls-cert/--tls-key",
                    cfg.host)
    server = common.make_server(cfg.max_message_mb, [BearerTokenAuth(token, [SERVICE])] if token else [])
    health = common.add_health_and_reflection(server, [SERVICE])
    await common.set_serving(health, [SERVICE], False)
    # Listen first so health checks answer NOT_SERVING (HTTP: 503) while we wait for the model services.
    metrics = Metrics()
    frontend = Frontend(metrics)
    add_generation_service(server, GenerationServicer(frontend))
    if not common.add_port(server, f"{cfg.host}:{cfg.port}", credentials):
        raise SystemExit(f"cannot listen on {cfg.host}:{cfg.port}")
    await server.start()
    http = None
    if cfg.http_port:
        http = HttpServer(create_app(frontend, BearerToken(token) if token else None, cfg.max_message_mb << 20),
                          cfg.host, cfg.http_port, cfg.tls_cert, cfg.tls_key)
        await http.start()
    log.info("router listening on %s:%d%s (%s%s; mode %s, k=%d, batch %d)", cfg.host, cfg.port,
             f", HTTP on {cfg.http_port}" if http else "", "TLS" if credentials else "plaintext",
             ", bearer token" if token else "", cfg.mode, cfg.num_speculative_tokens, cfg.max_batch_size)
    pool, tokenizer, info = await build(cfg, metrics)
    frontend.attach(pool, tokenizer, info)
    pool.on_serving_change(lambda serving: asyncio.ensure_future(common.set_serving(health, [SERVICE], serving)))
    log.info("router SERVING: %d verifier and %d drafter replicas (transport %s)", len(pool.verifiers),
             len(pool.drafters), pool.transport)

    async def drain_and_stop() -> None:
        """SIGTERM / SIGINT: stop admitting, let what is in flight finish (up to --drain-timeout-s), then stop (the
        requests still running end UNAVAILABLE, over HTTP too, before its server closes)."""
        await pool.drain(cfg.drain_timeout_s)
        await pool.stop()
        if http is not None:
            await http.stop()

    await common.serve_until_signal(server, drain_and_stop)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="minedraft-router", description="minedraft router (public gRPC API)")
    config.add_arguments(parser, config.RouterConfig)
    cfg = config.load(config.RouterConfig, "ROUTER", parser.parse_args(argv)).resolved()
    common.die_with_parent()
    common.setup_logging("router")
    common.run(_serve(cfg))
