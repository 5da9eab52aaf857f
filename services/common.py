"""What every minedraft gRPC server process shares: logging, CPU pinning, a grpc.aio server with the standard health
and reflection services and message-size limits, and a shutdown that is clean on SIGINT/SIGTERM. (Credentials and
channel options, which clients need too, are in minedraft/rpc.py.)"""

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

from minedraft.rpc import channel_options

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


def make_server(max_message_mb: int, interceptors=()) -> grpc.aio.Server:
    return grpc.aio.server(options=channel_options(max_message_mb), interceptors=list(interceptors) or None)


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
