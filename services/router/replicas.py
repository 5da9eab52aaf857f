"""The replica pool: one lane per verifier replica, each paired with a drafter replica.

KV caches are stateful, so a sequence is pinned to one lane, i.e. to one verifier and one drafter, for its whole
life; new sequences go to the least-loaded lane. Replica addresses come from host:port lists whose host names are
re-resolved every few seconds (`docker compose --scale verifier=2` gives one DNS record per replica), so replicas
that appear get a lane and replicas that vanish have their requests moved to a live lane, where they re-prefill
from the tokens the router holds.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Callable

import grpc

from minedraft.config import RouterConfig
from minedraft.v1 import generate_pb2 as gpb
from services.router.clients import ModelClient, ServiceError, internal_credentials
from services.router.lane import Lane
from services.router.metrics import Metrics
from services.router.negotiation import negotiate
from services.router.request import QueueFull, Request, Unavailable

log = logging.getLogger(__name__)


def resolve(spec: str) -> list[str]:
    """'a:1,b:2' -> every ip:port those names resolve to (sorted, so the order is stable)."""
    out = set()
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        host, _, port = item.rpartition(":")
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except socket.gaierror:
            continue  # not (yet) resolvable: a replica that is starting or gone
        for family, *_, addr in infos:
            out.add(f"[{addr[0]}]:{port}" if family == socket.AF_INET6 else f"{addr[0]}:{port}")
    return sorted(out)


class ReplicaPool:
    """Every drafter and verifier replica the router knows, and a lane per verifier. New requests go to the
    least-loaded serving lane; a lane whose verifier is gone hands its requests to the others (`rehome`).

    The router serves (health SERVING) while at least one lane's verifier is reachable and it is not draining: a
    watcher checks every verifier's health each second, so even an idle lane's lost verifier is noticed, and whoever
    registered with `on_serving_change` (the health service) hears of every change."""

    def __init__(self, cfg: RouterConfig, metrics: Metrics | None = None):
        self.cfg = cfg
        self.metrics = metrics
        self.verifiers: dict[str, ModelClient] = {}
        self.drafters: dict[str, ModelClient] = {}
        self.lanes: dict[str, Lane] = {}  # keyed by verifier address
        self._tasks: list[asyncio.Task] = []
        self._serving: bool | None = None
        self._on_serving_change: Callable[[bool], None] | None = None
        self.draining = False
        self.max_len = 0
        self.eos_ids: frozenset[int] = frozenset()
        self.vocab_size = 0

    # ---- what the public API needs --------------------------------------------------------------------------------
    def live_lanes(self) -> list[Lane]:
        return [e for e in self.lanes.values() if not e.dead]

    def serving_lanes(self) -> list[Lane]:
        """Lanes that can take a new request now: their verifier is up."""
        return [e for e in self.live_lanes() if not e.verifier_down and e.verifier.down_since is None]

    @property
    def serving(self) -> bool:
        return bool(self.serving_lanes()) and not self.draining

    @property
    def in_flight(self) -> int:
        return sum(e.load for e in self.live_lanes())

    def fits_ever(self, req: Request) -> bool:
        return any(e.fits_ever(req) for e in self.live_lanes())

    def submit(self, req: Request) -> None:
        if self.draining:
            raise Unavailable("the router is shutting down (draining in-flight requests); retry on another router")
        lanes = self.serving_lanes()
        if not lanes:
            down = ", ".join(sorted(e.verifier.address for e in self.live_lanes())) or "none known"
            raise Unavailable(f"no verifier is reachable (verifiers: {down}); requests already running wait up to "
                              f"{self.cfg.rpc_timeout_s:.0f} s for one to return, new ones are refused: retry later")
        if sum(len(e.waiting) for e in lanes) >= self.cfg.max_queue:
            raise QueueFull(f"queue full ({self.cfg.max_queue} waiting requests)")
        min(lanes, key=lambda e: e.load).submit(req)

    def on_serving_change(self, callback: Callable[[bool], None]) -> None:
        """Call `callback(serving)` now and whenever the router starts or stops serving."""
        self._on_serving_change = callback
        callback(self.serving)

    def serving_changed(self) -> None:
        """Tell the health service when the router starts or stops serving (one log line per change)."""
        serving = self.serving
        if serving == self._serving:
            return
        if self._serving is not None:
            if serving:
                log.info("router SERVING again (%d verifier lanes up)", len(self.serving_lanes()))
            else:
                log.info("router NOT_SERVING: %s", "draining" if self.draining else "no verifier is reachable")
        self._serving = serving
        if self._on_serving_change is not None:
            self._on_serving_change(serving)

    async def drain(self, timeout_s: float) -> int:
        """Stop admitting (UNAVAILABLE, health NOT_SERVING) and let in-flight requests finish for up to `timeout_s`.
        Returns how many were still in flight at the deadline (stop() cancels them)."""
        self.draining = True
        self.serving_changed()
        n = self.in_flight
        if n:
            log.info("draining: %d requests in flight, up to %.0f s", n, timeout_s)
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = self.in_flight
        if n:
            log.info("drained" if not left else "drain deadline: cancelling %d requests still in flight", left)
        return left

    async def status(self, timeout_s: float = 2.0) -> list[gpb.ReplicaStatus]:
        """Every replica as of now (asked concurrently, each with a short deadline), verifiers with their lanes."""
        async def one(client: ModelClient) -> gpb.ReplicaStatus:
            row = gpb.ReplicaStatus(role=client.kind, address=client.address)
            try:
                info = await client.status(timeout_s)
                row.live, row.model, row.device = True, info.model_name, info.device
                row.kv_blocks_in_use, row.active_sequences = info.kv_blocks_in_use, info.active_sequences
                row.busy_seconds, row.busy_fraction = info.busy_seconds, info.busy_fraction
                row.kv_blocks_total = info.kv_capacity_tokens // max(info.block_size, 1)
            except grpc.aio.AioRpcError as exc:
                row.error = f"{exc.code().name}: {exc.details()}"
            lane = self.lanes.get(client.address) if client.kind == "verifier" else None
            if lane is not None:
                row.running, row.waiting, row.transport = lane.running, len(lane.waiting), lane.transport
                row.drafter = lane.drafter.address if lane.drafter is not None and lane.drafter_up else ""
            return row

        clients = list(self.verifiers.values()) + list(self.drafters.values())
        return list(await asyncio.gather(*(one(c) for c in clients)))

    # ---- replicas -------------------------------------------------------------------------------------------------
    async def _connect(self, pool: dict[str, ModelClient], address: str, kind: str, timeout_s: float):
        client = ModelClient(address, kind, self.cfg.max_message_mb, self.cfg.rpc_timeout_s,
                             credentials=internal_credentials(self.cfg), server_name=self.cfg.internal_server_name)
        await client.wait_ready(timeout_s)
        pool[address] = client
        return client

    def _least_used_drafter(self) -> ModelClient | None:
        if not self.drafters:
            return None
        use = {a: 0 for a in self.drafters}
        for e in self.live_lanes():
            if e.drafter is not None and e.drafter.address in use:
                use[e.drafter.address] += 1
        return self.drafters[min(use, key=use.get)]

    async def _add_lane(self, verifier: ModelClient) -> None:
        drafter = self._least_used_drafter() if self.cfg.mode != "ar" else None
        if drafter is not None and drafter.info.tokenizer_digest != verifier.info.tokenizer_digest:
            raise SystemExit("drafter and verifier models use different vocabularies")
        transport = await negotiate(drafter, verifier, self.cfg.transport) if drafter else "inline"
        lane = Lane(self.cfg, verifier, drafter, transport, replicas=self,
                    metrics=self.metrics.lane(self.cfg.mode) if self.metrics is not None else None)
        self.lanes[verifier.address] = lane
        self.max_len = lane.max_len if not self.max_len else min(self.max_len, lane.max_len)
        self.eos_ids = lane.eos_ids
        self.vocab_size = verifier.info.vocab_size
        lane.start()
        log.info("lane %d: verifier %s + drafter %s (transport %s)", len(self.lanes), verifier.address,
                 drafter.address if drafter else "-", transport)
        self.serving_changed()

    async def start(self, timeout_s: float = 300.0) -> None:
        """Connect to every replica that resolves now (at least one verifier, and one drafter unless ar)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:  # under Swarm / Kubernetes the names appear only once the replicas are scheduled
            v_addrs = await loop.run_in_executor(None, resolve, self.cfg.verifiers)
            d_addrs = await loop.run_in_executor(None, resolve, self.cfg.drafters) if self.cfg.mode != "ar" else []
            if v_addrs and (self.cfg.mode == "ar" or d_addrs):
                break
            if loop.time() > deadline:
                raise SystemExit(f"cannot resolve verifiers {self.cfg.verifiers!r} / drafters {self.cfg.drafters!r}")
            log.info("waiting for replica names to resolve (verifiers %s, drafters %s)", v_addrs or "-",
                     d_addrs or "-")
            await asyncio.sleep(1.0)
        await asyncio.gather(*(self._connect(self.verifiers, a, "verifier", timeout_s) for a in v_addrs),
                             *(self._connect(self.drafters, a, "drafter", timeout_s) for a in d_addrs))
        for address in v_addrs:
            await self._add_lane(self.verifiers[address])
        self._tasks = [asyncio.create_task(self._discover()), asyncio.create_task(self._watch_verifiers())]

    async def _watch_verifiers(self, every_s: float = 1.0, misses: int = 3) -> None:
        """Health-check every verifier each second. Refused (the process is gone) or NOT_SERVING counts at once; a
        slow answer only after `misses` in a row (a verifier busy with a long step may answer late)."""
        slow: dict[str, int] = {}
        while True:
            await asyncio.sleep(every_s)
            clients = list(self.verifiers.values())
            channels = [c.channel for c in clients]
            states = await asyncio.gather(*(c.health(timeout_s=every_s) for c in clients))
            for client, channel, state in zip(clients, channels, states):
                if client.channel is not channel:  # re-dialled meanwhile: this answer is about a dropped connection
                    continue
                slow[client.address] = slow.get(client.address, 0) + 1 if state == "DEADLINE_EXCEEDED" else 0
                if state == "SERVING":
                    client.mark_up()
                elif state != "DEADLINE_EXCEEDED" or slow[client.address] >= misses:
                    client.mark_down(f"health check: {state}")
            self.serving_changed()

    async def _discover(self, every_s: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every_s)
            try:
                v = set(await loop.run_in_executor(None, resolve, self.cfg.verifiers))
                d = set(await loop.run_in_executor(None, resolve, self.cfg.drafters)) if self.cfg.mode != "ar" \
                    else set()
                for address in d - set(self.drafters):
                    await self._connect(self.drafters, address, "drafter", 60)
                    log.info("new drafter replica %s", address)
                for address in set(self.drafters) - d:
                    log.info("drafter replica %s is gone", address)
                    await self.drafters.pop(address).close()
                for address in v - set(self.verifiers):
                    await self._add_lane(await self._connect(self.verifiers, address, "verifier", 60))
                for address in set(self.verifiers) - v:
                    lane = self.lanes.get(address)
                    if lane is not None and not lane.dead and not lane.evacuating:
                        log.info("verifier replica %s is gone from DNS", address)
                        lane.request_evacuation()  # the lane moves its requests between two ticks
            except (TimeoutError, ServiceError, grpc.aio.AioRpcError, OSError) as exc:
                log.warning("replica discovery: %s", exc)

    async def rehome(self, lane: Lane) -> bool:
        """Move a lane's requests to the least-loaded other live lanes; False if there is none."""
        others = [e for e in self.serving_lanes() if e is not lane]
        if not others:
            return False
        reqs = await lane.hand_over()
        for r in reqs:
            min(others, key=lambda e: e.load).adopt([r])
        address = lane.verifier.address
        self.lanes.pop(address, None)
        client = self.verifiers.pop(address, None)
        log.info("lane %s closed: moved %d requests to other lanes", address, len(reqs))
        if client is not None:
            await client.close()
        self.serving_changed()
        return True

    async def find_drafter(self, lane: Lane) -> ModelClient:
        """A lane whose drafter died takes any healthy drafter replica (waiting for one if none is)."""
        while True:
            for client in sorted(self.drafters.values(), key=lambda c: c is lane.drafter):
                try:
                    await client.wait_ready(timeout_s=2, quiet=True)
                    return client
                except (TimeoutError, grpc.aio.AioRpcError):
                    continue
            await asyncio.sleep(1.0)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for lane in list(self.lanes.values()):
            await lane.stop()
        for client in list(self.verifiers.values()) + list(self.drafters.values()):
            await client.close()

    @property
    def transport(self) -> str:
        return ",".join(sorted({e.transport for e in self.live_lanes()})) or "-"
