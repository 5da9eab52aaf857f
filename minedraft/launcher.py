"""Start the three services as local processes, wait until each reports SERVING, and stop them cleanly.

Used by `minedraft up` and by the end-to-end tests, so what the tests exercise is exactly what a user runs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from minedraft.config import REPO_ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(address: str, timeout_s: float, proc: subprocess.Popen | None = None, service: str = "",
                 credentials: grpc.ChannelCredentials | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    with (grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process for {address} exited with code {proc.returncode}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{address} not SERVING after {timeout_s:.0f}s")


@dataclass
class TLSFiles:
    """PEM files for one side of the system. Certificates must name 127.0.0.1 (IP SAN) for loopback use."""

    ca: str  # the CA clients verify the server with (and, with client_cert, the servers verify clients with)
    cert: str  # server certificate
    key: str  # server key
    client_cert: str = ""  # client certificate: set = mutual TLS
    client_key: str = ""

    def credentials(self) -> grpc.ChannelCredentials:
        read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
        return grpc.ssl_channel_credentials(read(self.ca), read(self.client_key), read(self.client_cert))


@dataclass
class Cluster:
    """drafter + verifier + router on loopback. Extra flags per role go in *_args.

    Security is off by default (plaintext on loopback). `public_tls` serves the public API over TLS, `auth_token_file`
    makes it require that bearer token, `internal_tls` puts the model services behind TLS (mutual TLS when it has a
    client certificate, which the router then presents)."""

    mode: str = "psd"
    router_port: int = 0
    http_port: int | None = None  # the router's HTTP API (OpenAI-compatible, /metrics): None = off, 0 = a free port
    drafter_port: int = 0
    verifier_port: int = 0
    target: str = ""
    draft: str = ""
    device: str = "cpu"
    router_args: list[str] = field(default_factory=list)
    drafter_args: list[str] = field(default_factory=list)
    verifier_args: list[str] = field(default_factory=list)
    log_dir: str = ""  # when set, each process logs to <role>.log there; else inherits our stdout/stderr
    verifier_replicas: int = 1  # extra replicas are roles "verifier-1", "verifier-2", ... on their own ports
    drafter_replicas: int = 1
    public_tls: TLSFiles | None = None
    internal_tls: TLSFiles | None = None
    auth_token_file: str = ""
    drain_timeout_s: float = 30.0  # the router's --drain-timeout-s: how long stop() lets in-flight requests finish
    extra_ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    _spawned: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    _crashed: set[int] = field(default_factory=set)  # pids that died without cleaning up (killed, crashed)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.router_port}"

    @property
    def http_url(self) -> str:
        """Base URL of the router's HTTP API ('' when it is off)."""
        if self.http_port is None:
            return ""
        return f"{'https' if self.public_tls else 'http'}://127.0.0.1:{self.http_port}"

    def _spawn(self, role: str, module: str, args: list[str]) -> subprocess.Popen:
        env = dict(os.environ, PYTHONUNBUFFERED="1", MINEDRAFT_PARENT_PID=str(os.getpid()))
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        out = None
        if self.log_dir:
            Path(self.log_dir).mkdir(parents=True, exist_ok=True)
            out = open(Path(self.log_dir) / f"{role}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", module, *args], env=env, stdout=out, stderr=subprocess.STDOUT
                                if out else None, start_new_session=True)
        self.procs[role] = proc
        self._spawned[role] = (module, args)
        return proc

    def port_of(self, role: str) -> int:
        fixed = {"router": self.router_port, "drafter": self.drafter_port, "verifier": self.verifier_port}
        return fixed[role] if role in fixed else self.extra_ports[role]

    def credentials(self, role: str) -> grpc.ChannelCredentials | None:
        """What a client needs to connect to `role` (None = plaintext)."""
        tls = self.public_tls if role == "router" else self.internal_tls
        return tls.credentials() if tls else None

    def channel(self, role: str = "router") -> grpc.Channel:
        address = f"127.0.0.1:{self.port_of(role)}"
        creds = self.credentials(role)
        return grpc.secure_channel(address, creds) if creds else grpc.insecure_channel(address)

    def _security_args(self) -> tuple[list[str], list[str]]:
        """(flags for the model services, flags for the router)."""
        service, router = [], []
        if self.internal_tls:
            t = self.internal_tls
            service = ["--tls-cert", t.cert, "--tls-key", t.key] + (["--client-ca", t.ca] if t.client_cert else [])
            router = ["--internal-ca", t.ca] + (["--internal-cert", t.client_cert, "--internal-key", t.client_key]
                                                if t.client_cert else [])
        if self.public_tls:
            router += ["--tls-cert", self.public_tls.cert, "--tls-key", self.public_tls.key]
        if self.auth_token_file:
            router += ["--auth-token-file", self.auth_token_file]
        return service, router

    def kill(self, role: str, sig: int = signal.SIGKILL) -> None:
        """Fault injection: kill one service (SIGKILL by default, so it cannot clean up)."""
        p = self.procs[role]
        p.send_signal(sig)
        p.wait()
        self._crashed.add(p.pid)

    def restart(self, role: str, timeout_s: float = 120.0) -> None:
        """Start a killed (or exited) service again on the same port, with the same flags, and wait until it serves.
        What the old process left in /dev/shm is swept first."""
        old = self.procs.get(role)
        if old is not None and old.poll() is not None:
            self._crashed.add(old.pid)
            from minedraft.runtime.transport import sweep_orphans

            sweep_orphans(only_pids={old.pid})
        module, args = self._spawned[role]
        proc = self._spawn(role, module, args)
        wait_serving(f"127.0.0.1:{self.port_of(role)}", timeout_s, proc,
                     credentials=self.credentials(role))

    def replace_router(self, mode: str, router_args: list[str], timeout_s: float = 300.0) -> None:
        """Stop the router and start another on the same port, against the same model services, in `mode` with
        `router_args` (the services keep running: a benchmark compares router configurations without reloading
        the models)."""
        module, args = self._spawned["router"]
        base = args[:len(args) - len(self.router_args)]
        base[base.index("--mode") + 1] = mode
        router = self.procs.pop("router")
        router.send_signal(signal.SIGTERM)
        router.wait(15 + self.drain_timeout_s)
        self.mode, self.router_args = mode, list(router_args)
        proc = self._spawn("router", module, base + self.router_args)
        wait_serving(self.address, timeout_s, proc, credentials=self.credentials("router"))

    def exited(self) -> dict[str, int]:
        """Roles whose process has exited, with its exit code (negative: killed by that signal)."""
        return {role: p.returncode for role, p in self.procs.items() if p.poll() is not None}

    @staticmethod
    def _replica_roles(kind: str, n: int) -> list[str]:
        return [kind] + [f"{kind}-{i}" for i in range(1, n)]

    def start(self, timeout_s: float = 300.0) -> "Cluster":
        self.router_port = self.router_port or free_port()
        if self.http_port is not None:
            self.http_port = self.http_port or free_port()
        self.drafter_port = self.drafter_port or free_port()
        self.verifier_port = self.verifier_port or free_port()
        service_security, router_security = self._security_args()
        model_args = ["--device", self.device, *service_security]
        verifiers = self._replica_roles("verifier", self.verifier_replicas)
        drafters = self._replica_roles("drafter", self.drafter_replicas) if self.mode != "ar" else []
        for role in verifiers[1:] + drafters[1:]:
            self.extra_ports[role] = free_port()
        try:
            for role in verifiers:
                self._spawn(role, "services.verifier", ["--port", str(self.port_of(role)), *model_args,
                                                        *(["--model", self.target] if self.target else []),
                                                        *self.verifier_args])
            for role in drafters:
                self._spawn(role, "services.drafter", ["--port", str(self.port_of(role)), *model_args,
                                                       *(["--model", self.draft] if self.draft else []),
                                                       *self.drafter_args])
            addresses = {kind: ",".join(f"127.0.0.1:{self.port_of(r)}" for r in roles)
                         for kind, roles in (("verifiers", verifiers), ("drafters", drafters or ["drafter"]))}
            r = self._spawn("router", "services.router", [
                "--port", str(self.router_port), "--mode", self.mode, "--verifiers", addresses["verifiers"],
                "--drafters", addresses["drafters"], *(["--tokenizer", self.target] if self.target else []),
                "--drain-timeout-s", str(self.drain_timeout_s), *router_security,
                *(["--http-port", str(self.http_port)] if self.http_port is not None else []), *self.router_args])
            for role in verifiers + drafters:
                wait_serving(f"127.0.0.1:{self.port_of(role)}", timeout_s, self.procs[role],
                             credentials=self.credentials("verifier"))
            wait_serving(self.address, timeout_s, r, credentials=self.credentials("router"))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout_s: float = 15.0, kill: bool = False) -> dict[str, int]:
        """SIGTERM the router first (it drains: in-flight requests finish for up to drain_timeout_s, then it frees
        what it holds on the services), then the services; SIGKILL stragglers (everyone at once with `kill`).
        Returns exit codes."""
        codes = {}
        for role in ["router"] + sorted(r for r in self.procs if r != "router"):
            p = self.procs.get(role)
            if p is not None and p.poll() is not None:
                self._crashed.add(p.pid)
            elif p is not None:
                p.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
                try:
                    p.wait(timeout_s + (self.drain_timeout_s if role == "router" else 0))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                if kill or p.returncode == -signal.SIGKILL:
                    self._crashed.add(p.pid)
            if p is not None:
                codes[role] = p.returncode
        self.procs.clear()
        # A service that died without cleaning up (SIGKILL in the fault tests, a crash) cannot unlink a segment it had
        # created but not yet announced. As their supervisor we sweep what those processes left, and only theirs: a
        # leak by a process that shut down cleanly stays visible.
        from minedraft.runtime.transport import sweep_orphans

        sweep_orphans(only_pids=self._crashed)
        self._crashed = set()
        return codes

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
