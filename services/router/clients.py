"""The router's connection to one model-service replica: a channel, a health-gated start, the replica's ModelInfo,
and one bidirectional Session on which batch steps go out and come back strictly in order."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from minedraft.v1 import model_service_pb2 as pb, model_service_pb2_grpc as pb_grpc
from minedraft.rpc import channel_credentials, channel_options

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """A step failed; `code` is the gRPC status the affected requests should end with. `lost` means the replica
    itself is gone (connection, session or deadline failure): its caches are lost, but the requests are not."""

    def __init__(self, code: grpc.StatusCode, message: str, lost: bool = False, source: str = ""):
        super().__init__(message)
        self.code, self.lost, self.source = code, lost, source


def _status(code_number: int) -> grpc.StatusCode:
    for c in grpc.StatusCode:
        if c.value[0] == code_number:
            return c
    return grpc.StatusCode.UNKNOWN


def internal_credentials(cfg) -> grpc.ChannelCredentials | None:
    """TLS (mTLS with a client certificate) to the model services when a RouterConfig sets any internal_* file."""
    if not (cfg.internal_ca or cfg.internal_cert or cfg.internal_key):
        return None
    return channel_credentials(cfg.internal_ca, cfg.internal_cert, cfg.internal_key)


class ModelClient:
    """The router's handle on one replica. Steps share one Session stream and go out strictly one at a time (a
    lock), each answered in order; any transport failure becomes a ServiceError with `lost` set."""

    def __init__(self, address: str, kind: str, max_message_mb: int = 64, timeout_s: float = 120.0,
                 credentials: grpc.ChannelCredentials | None = None, server_name: str = ""):
        self.address, self.kind, self.timeout_s = address, kind, timeout_s
        self._dial = (max_message_mb, credentials, server_name)
        self.channel = self._new_channel()
        self.stub = self._new_stub()
        self.info: pb.ModelInfo | None = None
        self.down_since: float | None = None  # monotonic time this replica was found gone; None while it serves
        self._session = None
        self._lock = asyncio.Lock()
        self._ids = itertools.count(1)
        self._closing: set[asyncio.Task] = set()  # channels dropped by _redial, closing

    def _new_channel(self) -> grpc.aio.Channel:
        max_message_mb, credentials, server_name = self._dial
        # Its own subchannel pool: channels to one address otherwise share a connection, and a re-dial would reuse
        # the very connection it means to leave.
        # Reconnect attempts at most 1 s apart (gRPC's default backoff grows to 120 s): a replica whose link comes back
        # is found within a second, well inside the time a lane waits for it.
        options = channel_options(max_message_mb) + [("grpc.use_local_subchannel_pool", 1),
                                                     ("grpc.initial_reconnect_backoff_ms", 200),
                                                     ("grpc.max_reconnect_backoff_ms", 1000)]
        if credentials is None:
            return grpc.aio.insecure_channel(self.address, options=options)
        if server_name:  # replicas are dialled by resolved IP; their certificates carry a name
            options.append(("grpc.ssl_target_name_override", server_name))
        return grpc.aio.secure_channel(self.address, credentials, options=options)

    def _new_stub(self):
        return (pb_grpc.DrafterStub if self.kind == "drafter" else pb_grpc.VerifierStub)(self.channel)

    def _redial(self) -> None:
        """A call that timed out may sit on a half-open connection (a middlebox that forgot it, a peer that vanished
        without a FIN): the channel would keep using it until TCP gives up, minutes later. Drop the channel and dial
        again, so the next call (the health check that waits for the replica) opens a new connection."""
        old, self.channel = self.channel, self._new_channel()
        self.stub = self._new_stub()
        task = asyncio.get_running_loop().create_task(self._close_later(old))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_later(self, channel: grpc.aio.Channel) -> None:
        """Close a dropped channel once the calls still on it have met their own deadlines: closing it under them
        can leave them pending past their deadline (seen with a probe on a black-holed connection)."""
        await asyncio.sleep(self.timeout_s + 5.0)
        await channel.close()

    # ---- reachability: each change is logged once, whoever notices it (a failed step, the health watcher) --------
    def mark_down(self, why: str) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning("%s %s lost (%s)", self.kind, self.address, why)

    def mark_up(self) -> None:
        if self.down_since is not None:
            log.info("%s %s back after %.1f s", self.kind, self.address, time.monotonic() - self.down_since)
            self.down_since = None

    async def health(self, timeout_s: float = 5.0) -> str:
        """The replica's health status name (SERVING, NOT_SERVING, ...), or the gRPC code name if the check failed."""
        try:
            r = await health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                                     timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    async def status(self, timeout_s: float = 2.0) -> pb.ModelInfo:
        """The replica's ModelInfo as of now (KV blocks in use, sequences, busy seconds)."""
        return await self.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=timeout_s)

    async def wait_ready(self, timeout_s: float = 300.0, quiet: bool = False) -> pb.ModelInfo:
        """Block until the replica reports SERVING (model loaded and warmed up), then fetch its info."""
        deadline = time.monotonic() + timeout_s
        while True:
            if await self.health() == "SERVING":
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.kind} at {self.address} not SERVING after {timeout_s:.0f}s")
            await asyncio.sleep(0.2)
        self.info = await self.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30)
        self.mark_up()
        log.log(logging.DEBUG if quiet else logging.INFO, "%s %s ready: %s (%s), vocab %d, context %d, KV %d tokens, %s", self.kind, self.address,
                 self.info.model_name, self.info.model_type, self.info.vocab_size, self.info.max_context,
                 self.info.kv_capacity_tokens, self.info.device)
        return self.info

    async def probe(self, request: pb.ProbeRequest) -> pb.ProbeReply:
        """One transport-negotiation call. No answer in time means a lost replica, as for a step: the connection may be
        half-open (a black-holed link, a frozen process), so it is dropped and the next call dials again."""
        try:
            return await self.stub.ProbeTransport(request, timeout=min(10.0, self.timeout_s))
        except grpc.aio.AioRpcError as exc:
            self._end_session()  # the router forgets this replica's caches: the replica frees them once it can
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                self._redial()
            self.mark_down(f"a transport probe failed: {exc.code().name}")
            raise ServiceError(exc.code(), f"{self.kind} {self.address}: transport probe: {exc.details()}", lost=True,
                               source=self.kind) from exc

    async def step(self, request):
        """Send one step (a DrafterRequest or VerifierRequest, step_id filled in here) and await its answer."""
        async with self._lock:
            if self._session is None:
                self._session = self.stub.Session()
            request.step_id = next(self._ids)
            try:
                # asyncio.timeout, not wait_for: wait_for runs the exchange in a new task, which queues the write
                # behind every other ready task (the clients' stream writes), on the critical path of each step.
                async with asyncio.timeout(self.timeout_s):
                    resp = await self._exchange(request)
            except asyncio.CancelledError:
                # Our caller was cancelled mid-exchange (shutdown): grpc cancels the whole stream with the pending
                # read, so the next step needs a new session. Nothing is wrong with the replica.
                self._end_session()
                raise
            except (grpc.aio.AioRpcError, asyncio.TimeoutError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
                # InvalidStateError: "RPC already finished", the session ended under us (peer gone, shutdown)
                self._end_session()
                code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else grpc.StatusCode.UNAVAILABLE
                if isinstance(exc, asyncio.TimeoutError) or code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    self._redial()
                self.mark_down(f"a step failed: {code.name}")
                raise ServiceError(code, f"{self.kind} {self.address}: {exc}", lost=True, source=self.kind) from exc
            if resp is grpc.aio.EOF:
                self._session = None
                self.mark_down("it closed the session")
                raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"{self.kind} {self.address} closed the session",
                                   lost=True, source=self.kind)
            if resp.step_id != request.step_id:
                raise ServiceError(grpc.StatusCode.INTERNAL, f"{self.kind}: answer to step {resp.step_id}, "
                                                             f"expected {request.step_id}")
            if resp.WhichOneof("kind") == "error":
                raise ServiceError(_status(resp.error.code), resp.error.message)
            return resp

    def _end_session(self) -> None:
        """Cancel the step stream. The replica frees every sequence and buffer the stream held when it sees the cancel
        (a frozen one, once it runs again), which matches what the router assumes of a lost replica: caches gone."""
        session, self._session = self._session, None
        if session is not None:
            session.cancel()

    async def _exchange(self, request):
        session = self._session  # a probe that fails meanwhile may end it: this exchange then fails, as it should
        await session.write(request)
        return await session.read()

    async def close(self) -> None:
        for task in list(self._closing):
            task.cancel()
        self._end_session()
        await self.channel.close()
