"""Container health probe: exit 0 iff the gRPC health service on host:port answers SERVING, else 1.

    python -m minedraft.healthcheck [--port N] [--host H] [--service NAME] [--timeout S] [--live]

Used by the image's HEALTHCHECK (and usable as a Kubernetes exec probe). Runs every few seconds in every container,
so it is kept tiny: it imports grpc and the health stubs only (not torch, not minedraft.v1).

Without --port it finds out what this container runs: MINEDRAFT_HEALTHCHECK_PORT if set, else the first process whose
command line is `python -m services.{router,drafter,verifier}` (its --port flag, else MINEDRAFT_<ROLE>_PORT, else
the role's default port 50051 / 50061 / 50062). So one HEALTHCHECK line in the Dockerfile serves all three roles.
"""

from __future__ import annotations

import argparse
import os
import sys

from minedraft.config import ROLES  # stdlib only: keeps the probe light

DEFAULT_PORTS = {name: role.port for name, role in ROLES.items()}


def _port_from_argv(argv: list[str]) -> int | None:
    for i, a in enumerate(argv):
        if a == "--port" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--port="):
            return int(a.split("=", 1)[1])
    return None


def detect_port(proc: str = "/proc") -> int:
    """The port of the minedraft service running in this container (see the module docstring)."""
    if os.environ.get("MINEDRAFT_HEALTHCHECK_PORT"):
        return int(os.environ["MINEDRAFT_HEALTHCHECK_PORT"])
    pids = sorted((int(p) for p in os.listdir(proc) if p.isdigit()))
    for pid in pids:
        try:
            with open(f"{proc}/{pid}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        for i, a in enumerate(argv[:-1]):
            role = argv[i + 1].removeprefix("services.") if a == "-m" else ""
            if role in DEFAULT_PORTS and argv[i + 1].startswith("services."):
                port = _port_from_argv(argv[i + 2:])
                if port:
                    return port
                env_port = os.environ.get(f"MINEDRAFT_{role.upper()}_PORT", "")
                return int(env_port) if env_port.strip() not in ("", "0") else DEFAULT_PORTS[role]
    raise SystemExit("healthcheck: no --port given and no `python -m services.<role>` process found")


def check(host: str, port: int, service: str = "", timeout_s: float = 3.0) -> str:
    """The health status name (SERVING, NOT_SERVING, ...), or the gRPC error code name when the call fails."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"{host}:{port}", options=[("grpc.enable_http_proxy", 0)]) as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                          timeout=timeout_s)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minedraft.healthcheck", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="default: detected (see the module docstring)")
    p.add_argument("--service", default="", help="health service name ('' = the whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds")
    p.add_argument("--live", action="store_true", help="liveness instead of readiness: exit 0 for NOT_SERVING too "
                   "(the process answers). The router is NOT_SERVING while no verifier is reachable or while it "
                   "drains; restarting it then would only end its in-flight requests")
    args = p.parse_args(argv)
    port = args.port or detect_port()
    status = check(args.host, port, args.service, args.timeout)
    print(f"{args.host}:{port} {args.service or '(server)'}: {status}")
    return 0 if status == "SERVING" or (args.live and status == "NOT_SERVING") else 1


if __name__ == "__main__":
    sys.exit(main())
