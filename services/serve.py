"""Entry point shared by `python -m services.drafter` and `python -m services.verifier`."""

from __future__ import annotations

import argparse
import asyncio
import logging

from minedraft import config
from minedraft.v1 import model_service_pb2, model_service_pb2_grpc
from services import common

log = logging.getLogger("minedraft")


def main(role: str, argv=None) -> None:
    parser = argparse.ArgumentParser(prog=f"minedraft-{role}", description=f"minedraft {role} gRPC service")
    config.add_arguments(parser, config.ModelServiceConfig)
    args = parser.parse_args(argv)
    cfg = config.load(config.ModelServiceConfig, role.upper(), args).resolved(role)
    common.die_with_parent()
    common.setup_logging(role)
    common.run(_serve(role, cfg))


async def _serve(role: str, cfg) -> None:
    common.pin_cpu(cfg.cpu_core, cfg.threads)
    service_name = model_service_pb2.DESCRIPTOR.services_by_name["Drafter" if role == "drafter" else "Verifier"]
    credentials = common.server_credentials(cfg.tls_cert, cfg.tls_key, cfg.client_ca)  # fail before loading
    server = common.make_server(cfg.max_message_mb)
    health = common.add_health_and_reflection(server, [service_name.full_name])
    await common.set_serving(health, [service_name.full_name], False)
    if role == "drafter":
        from services.drafter.servicer import DrafterService

        service = DrafterService(cfg)
        model_service_pb2_grpc.add_DrafterServicer_to_server(service, server)
    else:
        from services.verifier.servicer import VerifierService

        service = VerifierService(cfg)
        model_service_pb2_grpc.add_VerifierServicer_to_server(service, server)
    bound = common.add_port(server, f"{cfg.host}:{cfg.port}", credentials)
    if not bound:
        raise SystemExit(f"cannot listen on {cfg.host}:{cfg.port}")
    await server.start()
    security = "plaintext" if credentials is None else "mTLS" if cfg.client_ca else "TLS"
    log.info("listening on %s:%d (%s); loading %s", cfg.host, bound, security, cfg.model)
    await asyncio.get_running_loop().run_in_executor(service.executor, service.load)
    await common.set_serving(health, [service_name.full_name], True)
    log.info("%s SERVING %s on %s (KV capacity %d tokens)", role, cfg.model, cfg.device,
             service.runner.cache.num_blocks * service.runner.cache.block_size)
    await common.serve_until_signal(server, service.shutdown)
