"""The process around a model service, shared by `python -m services.drafter` and `python -m services.verifier`.

Each role's entry point hands its servicer class to `main`; nothing here knows a role. The server listens (and
answers health checks NOT_SERVING) before the model loads, so orchestrators see the process come up, then turns
SERVING once the model is loaded and warmed up.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from minedraft import config
from minedraft.rpc import server_credentials
from services import common
from services.model_service import ModelService

log = logging.getLogger("minedraft")


def main(service_cls: type[ModelService], argv=None) -> None:
    role = service_cls.role
    parser = argparse.ArgumentParser(prog=f"minedraft-{role}", description=f"minedraft {role} gRPC service")
    config.add_arguments(parser, config.ModelServiceConfig)
    cfg = config.load(config.ModelServiceConfig, role.upper(), parser.parse_args(argv)).resolved(role)
    common.die_with_parent()
    common.setup_logging(role)
    common.run(_serve(service_cls, cfg))


async def _serve(service_cls: type[ModelService], cfg: config.ModelServiceConfig) -> None:
    common.pin_cpu(cfg.cpu_core, cfg.threads)
    name = service_cls.grpc_service
    credentials = server_credentials(cfg.tls_cert, cfg.tls_key, cfg.client_ca)  # fail before loading
    server = common.make_server(cfg.max_message_mb)
    health = common.add_health_and_reflection(server, [name])
    await common.set_serving(health, [name], False)
    service = service_cls(cfg)
    service.add_to_server(server)
    bound = common.add_port(server, f"{cfg.host}:{cfg.port}", credentials)
    if not bound:
        raise SystemExit(f"cannot listen on {cfg.host}:{cfg.port}")
    await server.start()
    security = "plaintext" if credentials is None else "mTLS" if cfg.client_ca else "TLS"
    log.info("listening on %s:%d (%s); loading %s", cfg.host, bound, security, cfg.model)
    await asyncio.get_running_loop().run_in_executor(service.executor, service.load)
    await common.set_serving(health, [name], True)
    log.info("%s SERVING %s on %s (KV capacity %d tokens)", service_cls.role, cfg.model, cfg.device,
             service.runner.cache.num_blocks * service.runner.cache.block_size)
    await common.serve_until_signal(server, service.shutdown)
