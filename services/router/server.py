"""Router process: connect to the model services (health-gated), check they form a valid pair, negotiate the tensor
transport, start the engine, and serve the public Generation API."""

from __future__ import annotations

import argparse
import logging

from minedraft import config
from minedraft.runtime.checkpoint import load_tokenizer
from minedraft.v1 import generate_pb2, generate_pb2_grpc
from services import common
from services.model_service import vocab_digest
from services.router.api import GenerationServicer
from services.router.lanes import Router

log = logging.getLogger("minedraft")
SERVICE = generate_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


async def build(cfg: config.RouterConfig):
    """Everything but the listening socket: (router over replica lanes, tokenizer, server info)."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    router = Router(cfg)
    await router.start()
    verifier = next(iter(router.verifiers.values()))
    if vocab_digest(tokenizer) != verifier.info.tokenizer_digest:
        raise SystemExit(f"tokenizer at {cfg.tokenizer} does not match the verifier's model vocabulary")
    drafter = next(iter(router.drafters.values()), None)
    info = generate_pb2.ServerInfo(target_model=verifier.info.model_name,
                                   draft_model=drafter.info.model_name if drafter else "", mode=cfg.mode,
                                   num_speculative_tokens=cfg.num_speculative_tokens, max_context=router.max_len,
                                   max_batch_size=cfg.max_batch_size, drafter_replicas=list(router.drafters),
                                   verifier_replicas=list(router.verifiers))
    return router, tokenizer, info


async def _serve(cfg: config.RouterConfig) -> None:
    server = common.make_server(cfg.max_message_mb)
    health = common.add_health_and_reflection(server, [SERVICE])
    await common.set_serving(health, [SERVICE], False)
    # Listen first so health checks answer NOT_SERVING while we wait for the model services.
    servicer = GenerationServicer()
    generate_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
    if not server.add_insecure_port(f"{cfg.host}:{cfg.port}"):
        raise SystemExit(f"cannot listen on {cfg.host}:{cfg.port}")
    await server.start()
    log.info("router listening on %s:%d (mode %s, k=%d, batch %d)", cfg.host, cfg.port, cfg.mode,
             cfg.num_speculative_tokens, cfg.max_batch_size)
    router, tokenizer, info = await build(cfg)
    servicer.attach(router, tokenizer, info)
    await common.set_serving(health, [SERVICE], True)
    log.info("router SERVING: %d verifier and %d drafter replicas (transport %s)", len(router.verifiers),
             len(router.drafters), router.transport)
    await common.serve_until_signal(server, router.stop)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="minedraft-router", description="minedraft router (public gRPC API)")
    config.add_arguments(parser, config.RouterConfig)
    cfg = config.load(config.RouterConfig, "ROUTER", parser.parse_args(argv)).resolved()
    common.setup_logging("router")
    common.run(_serve(cfg))
