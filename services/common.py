"""What every minedraft gRPC process shares: logging, CPU pinning, a grpc.aio server with the standard health and
reflection services and message-size limits, TLS credentials (optional, plaintext by default), and a shutdown that is
clean on SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Awaitable, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger("minedraft")


def die_with_parent() -> None:
    """When started by `minedraft up` or the tests (MINEDRAFT_PARENT_PID set), exit with the launcher even if it is
    killed with SIGKILL and cannot stop us itself: the kernel sends SIGTERM (Linux PR_SET_PDEATHSIG)."""
    parent = os.environ.get("MINEDRAFT_PARENT_PID")
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):  # the launcher died before we could ask
        os.kill(os.getpid(), signal.SIGTERM)


def setup_logging(role: str) -> None:
    level = os.environ.get("MINEDRAFT_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format=f"%(asctime)s {role:>8} %(levelname)s %(name)s: %(message)s")


def pin_cpu(core: int, threads: int) -> None:
    """One model per core: pinning keeps the drafter and verifier from stealing each other's cycles, which is what
    lets their work overlap on a CPU host."""
    import torch

    if core >= 0 and hasattr(os, "sched_setaffinity"):
        available = sorted(os.sched_getaffinity(0))
        chosen = available[core % len(available)]
        os.sched_setaffinity(0, {chosen})
        log.info("pinned to CPU core %d", chosen)
    torch.set_num_threads(max(1, threads))
    torch.set_num_interop_threads(1)


def channel_options(max_message_mb: int) -> list[tuple[str, int]]:
    n = max_message_mb * 1024 * 1024
    return [("grpc.max_send_message_length", n), ("grpc.max_receive_message_length", n)]


def make_server(max_message_mb: int, interceptors=()) -> grpc.aio.Server:
    return grpc.aio.server(options=channel_options(max_message_mb), interceptors=list(interceptors) or None)


def read_pem(path: str, what: str) -> bytes:
    try:
        data = open(path, "rb").read()
    except OSError as exc:
        raise SystemExit(f"cannot read {what} {path!r}: {exc}") from None
    if b"-----BEGIN" not in data:
        raise SystemExit(f"{what} {path!r} is not a PEM file")
    return data


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials | None:
    """None (plaintext) unless a certificate is configured; with `client_ca`, clients must present a certificate
    signed by it (mutual TLS)."""
    if not cert and not key:
        if client_ca:
            raise SystemExit("--client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
        return None
    if not (cert and key):
        raise SystemExit("--tls-cert and --tls-key go together")
    pair = (read_pem(key, "TLS key"), read_pem(cert, "TLS certificate"))
    if client_ca:
        return grpc.ssl_server_credentials([pair], root_certificates=read_pem(client_ca, "client CA"),
                                           require_client_auth=True)
    return grpc.ssl_server_credentials([pair])


def channel_credentials(ca: str = "", cert: str = "", key: str = "") -> grpc.ChannelCredentials:
    """TLS for a client: verify the server with `ca` (system roots when empty); present `cert`/`key` for mTLS."""
    if bool(cert) != bool(key):
        raise SystemExit("a client certificate and its key go together")
    return grpc.ssl_channel_credentials(root_certificates=read_pem(ca, "CA") if ca else None,
                                        private_key=read_pem(key, "client key") if key else None,
                                        certificate_chain=read_pem(cert, "client certificate") if cert else None)


def add_port(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Listen on `address` with TLS when there are credentials; returns the bound port (0 = failed)."""
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)


def add_health_and_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> health.aio.HealthServicer:
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names) + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    return health_servicer


async def set_serving(health_servicer, service_names: Iterable[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *service_names]:
        await health_servicer.set(name, status)


async def serve_until_signal(server: grpc.aio.Server, on_stop: Callable[[], Awaitable[None]] | None = None,
                             grace_s: float = 3.0) -> None:
    """Run until SIGINT/SIGTERM, then stop taking calls, let running ones finish for `grace_s`, and clean up."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    if on_stop is not None:
        await on_stop()
    await server.stop(grace_s)


def run(main: Awaitable[None]) -> None:
    """Run a service's main coroutine on uvloop (falling back to asyncio where uvloop does not exist)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every platform we ship
        asyncio.run(main)
    else:
        uvloop.run(main)
