"""Fault recovery for the engine: a model service that goes away loses only caches, never requests.

The router holds every request's prompt and accepted tokens (Sequence), so recovery is always the same move: forget
what the lost service cached, and let the next step re-prefill it. Without a drafter the lane decodes target-only
until one is back; without a verifier it waits for it, or (with replicas) hands its requests to another lane.
Kept apart from the tick loop in scheduler.py, which it shares state with as a mixin of Engine.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from services.router.clients import ServiceError
from services.router.negotiation import negotiate
from services.router.request import DRAFT, PREFILL, VERIFY, Request

log = logging.getLogger("services.router.scheduler")


class Recovery:
    def adopt(self, reqs: list[Request]) -> None:
        """Take over requests from a lane that lost its verifier: they go first and re-prefill here."""
        self.waiting.extendleft(reversed(reqs))
        self.wake.set()

    def evacuate(self) -> list[Request]:
        """Hand every request over (this lane's verifier is gone). Each keeps its tokens; caches start empty."""
        self._deliver()
        self.dead = True
        reqs = [r for r in self.batches[0] + self.batches[1] + list(self.waiting) if not r.cancelled]
        self.batches[0].clear()
        self.batches[1].clear()
        self.waiting.clear()
        self.reserved = [0] * len(self.reserved)
        self.release_v = []
        for r in reqs:
            r.seq.reset_cache("draft")
            r.seq.reset_cache("target")
            r.seq.drafts, r.seq.draft_probs, r.phase = [], None, PREFILL
            if r.probs_ref is not None:
                self.discard_refs.append(r.probs_ref)
            r.probs_ref, r.probs_buffer = None, ""
        self.wake.set()
        return reqs

    def _fail_running(self, exc: ServiceError) -> None:
        log.error("failing %d running requests: %s %s", self.running, exc.code.name, exc)
        self._deliver()
        for batch in self.batches:
            for req in batch:
                req.events.put_nowait(("error", exc))
                req.cancelled = True

    async def _lost(self, exc: ServiceError) -> None:
        """A model service went away. The router holds every request's tokens, so nothing is lost but caches:
        without a drafter we decode target-only until it is back; without a verifier we wait for it and re-prefill."""
        if exc.source == "drafter":
            log.warning("drafter lost (%s); continuing target-only until it is back", exc)
            self.drafter_up = False
            orphans = {}
            for r in self.batches[0] + self.batches[1]:
                r.seq.reset_cache("draft")
                if r.phase == VERIFY:  # its drafts may be fine, but their probabilities died with the drafter
                    if r.probs_ref is not None:
                        orphans[r.probs_buffer] = r.probs_ref
                    r.seq.drafts, r.seq.draft_probs, r.probs_ref, r.probs_buffer = [], None, None, ""
                    r.phase = DRAFT
            self.discard_refs.extend(orphans.values())
            self.release_d, self.release_buffers = [], []
            if self._drafter_watch is None or self._drafter_watch.done():
                self._drafter_watch = asyncio.create_task(self._await_drafter())
            return
        if self.on_verifier_lost is not None and await self.on_verifier_lost(self):
            return  # the router moved our requests to other lanes
        log.warning("verifier lost (%s); waiting up to %.0fs for it to come back", exc, self.verifier_wait_s)
        try:
            await self.verifier.wait_ready(self.verifier_wait_s)
            if self.drafter is not None and self.drafter_up:
                self.transport = await negotiate(self.drafter, self.verifier, self.cfg.transport)
        except (TimeoutError, Exception) as wait_exc:  # noqa: BLE001 - any failure here means: give up on them
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"verifier unavailable: {wait_exc}") from wait_exc
        log.info("verifier back; re-prefilling %d running requests", self.running)
        self.release_v = []
        for r in self.batches[0] + self.batches[1]:
            r.seq.target_cached = 0

    async def _await_drafter(self) -> None:
        while True:
            try:
                if self.find_drafter is not None:  # any healthy replica will do: caches re-prefill anyway
                    self.drafter = await self.find_drafter(self)
                await self.drafter.wait_ready(timeout_s=3600)
                self.transport = await negotiate(self.drafter, self.verifier, self.cfg.transport)
                break
            except Exception as exc:  # noqa: BLE001 - keep watching whatever went wrong
                log.info("drafter still unavailable: %s", exc)
                await asyncio.sleep(1.0)
        log.info("drafter back at %s; speculation resumes (drafter caches re-prefill on first use)",
                 self.drafter.address)
        self.drafter_up = True
        self.wake.set()
