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

import grpc

from minedraft.config import RouterConfig
from services.router.clients import ModelClient, ServiceError, internal_credentials
from services.router.lane import Lane
from services.router.negotiation import negotiate
from services.router.request import QueueFull, Request

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
    least-loaded live lane; a lane whose verifier is gone hands its requests to the others (`rehome`)."""

    def __init__(self, cfg: RouterConfig):
        self.cfg = cfg
        self.verifiers: dict[str, ModelClient] = {}
        self.drafters: dict[str, ModelClient] = {}
        self.lanes: dict[str, Lane] = {}  # keyed by verifier address
        self._discovery: asyncio.Task | None = None
        self.max_len = 0
        self.eos_ids: frozenset[int] = frozenset()
        self.vocab_size = 0

    # ---- what the public API needs --------------------------------------------------------------------------------
    def live_lanes(self) -> list[Lane]:
        return [e for e in self.lanes.values() if not e.dead]

    def fits_ever(self, req: Request) -> bool:
        return any(e.fits_ever(req) for e in self.live_lanes())

    def submit(self, req: Request) -> None:
        lanes = self.live_lanes()
        if not lanes:
            raise QueueFull("no verifier replica is available")
        if sum(len(e.waiting) for e in lanes) >= self.cfg.max_queue:
            raise QueueFull(f"queue full ({self.cfg.max_queue} waiting requests)")
        min(lanes, key=lambda e: e.load).submit(req)

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
        lane = Lane(self.cfg, verifier, drafter, transport, replicas=self)
        self.lanes[verifier.address] = lane
        self.max_len = lane.max_len if not self.max_len else min(self.max_len, lane.max_len)
        self.eos_ids = lane.eos_ids
        self.vocab_size = verifier.info.vocab_size
        lane.start()
        log.info("lane %d: verifier %s + drafter %s (transport %s)", len(self.lanes), verifier.address,
                 drafter.address if drafter else "-", transport)

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
        self._discovery = asyncio.create_task(self._discover())

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
        others = [e for e in self.live_lanes() if e is not lane]
        if not others:
            return False
        reqs = await lane.hand_over()
        for r in reqs:
            min(others, key=lambda e: e.load).adopt([r])
        address = lane.verifier.address
        self.lanes.pop(address, None)
        client = self.verifiers.pop(address, None)
        log.warning("verifier %s lost: moved %d requests to other lanes", address, len(reqs))
        if client is not None:
            await client.close()
        return True

    async def find_drafter(self, lane: Lane) -> ModelClient:
        """A lane whose drafter died takes any healthy drafter replica (waiting for one if none is)."""
        while True:
            for client in sorted(self.drafters.values(), key=lambda c: c is lane.drafter):
                try:
                    await client.wait_ready(timeout_s=2)
                    return client
                except (TimeoutError, grpc.aio.AioRpcError):
                    continue
            await asyncio.sleep(1.0)

    async def stop(self) -> None:
        if self._discovery is not None:
            self._discovery.cancel()
        for lane in list(self.lanes.values()):
            await lane.stop()
        for client in list(self.verifiers.values()) + list(self.drafters.values()):
            await client.close()

    @property
    def transport(self) -> str:
        return ",".join(sorted({e.transport for e in self.live_lanes()})) or "-"
