"""A lane: one verifier replica, the drafter paired with it, and the loop that keeps two batches in flight on them.

Each tick verifies batch S (with the drafts made for it last tick) on the verifier while batch O is drafted on the
drafter, then the two swap. A tick costs ~max(T_draft, T_verify) instead of their sum. The modes share the loop:
  psd  two batches, the overlap above; a batch with no stored drafts (first tick) is drafted synchronously first,
       so with one batch non-empty it degrades to plain SD until the other fills;
  sd   one batch: draft, then verify;
  ar   one batch, target only (verify with zero drafts).
New requests join the smaller batch (the one just verified on ties, since it drafts next) and are prefilled on the
verifier in the same call that verifies S, while the drafter caches their prompts in the tick's draft call.

The router holds every request's prompt and accepted tokens (Sequence), so a model service that goes away costs
caches, never requests. Recovery is always the same move: forget what the lost service cached and let the next step
re-prefill it. Without a drafter the lane decodes target-only until one is back; without a verifier it waits for
it, or (with replicas) hands its requests to another lane. A lane owns all of its state; the replica pool talks to
it through its methods only, and the lane reaches the pool only through the `Replicas` it was given.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Protocol

import grpc

from minedraft.config import RouterConfig
from minedraft.v1 import model_service_pb2 as pb
from services.router.clients import ModelClient, ServiceError
from services.router.metrics import LaneMetrics
from services.router.negotiation import negotiate
from services.router.releases import PendingReleases
from services.router.request import DRAFT, PREFILL, VERIFY, PendingDraft, QueueFull, Request
from services.router.trace import Trace

__all__ = ["Lane", "QueueFull", "Replicas", "Request"]

log = logging.getLogger(__name__)


class Replicas(Protocol):
    """What a lane may ask of the replica pool it belongs to."""

    async def rehome(self, lane: "Lane") -> bool:
        """Move the lane's requests to other live lanes; False if there is none."""

    async def find_drafter(self, lane: "Lane") -> ModelClient:
        """Any healthy drafter replica (waiting until one is)."""

    def serving_changed(self) -> None:
        """The lane started or stopped waiting for its verifier (the router's health may change)."""


class Lane:
    """Everything one verifier replica serves: admission into two batches, the tick loop, fault recovery and what is
    still owed to the services (PendingReleases). The pool reaches it through `submit`, `adopt`, `request_evacuation`
    and `hand_over` only."""

    def __init__(self, cfg: RouterConfig, verifier: ModelClient, drafter: ModelClient | None, transport: str,
                 replicas: Replicas | None = None, trace: Trace | None = None, metrics: LaneMetrics | None = None):
        self.cfg, self.mode, self.k = cfg, cfg.mode, cfg.num_speculative_tokens
        self.verifier, self.drafter, self.transport = verifier, drafter, transport
        self.replicas = replicas
        self.trace = trace if trace is not None else Trace(cfg.trace_file)
        self.metrics = metrics if metrics is not None else LaneMetrics()
        self.waiting: deque[Request] = deque()
        self.batches: tuple[list[Request], list[Request]] = ([], [])
        self.cur = 0  # index of S, the batch verified next
        self.releases = PendingReleases()
        self.wake = asyncio.Event()
        # Token/finish events from the last verify, handed to the clients' streams only once the next tick's calls are
        # out: each stream write costs the event loop ~0.2 ms, and sixteen of them before the next call would sit on
        # the critical path of every step.
        self._outbox: list[tuple[asyncio.Queue, tuple]] = []
        infos = [verifier.info] + ([drafter.info] if drafter else [])
        self.max_len = min(i.max_context for i in infos)
        self.eos_ids = frozenset(verifier.info.eos_token_ids)
        # KV admission: each running sequence reserves its worst case on both services, in blocks.
        self.capacity = [(i.kv_capacity_tokens // max(i.block_size, 1), max(i.block_size, 1)) for i in infos]
        self.ticks = 0
        self._task: asyncio.Task | None = None
        self.drafter_up = drafter is not None
        self._drafter_watch: asyncio.Task | None = None
        self.dead = False  # this lane's verifier is gone and its requests moved to other lanes
        self.verifier_down = False  # waiting for a lost verifier to come back (new requests go elsewhere or fail)
        self._evacuate = False  # replica discovery saw the verifier vanish: hand requests over between two ticks

    # ---- what the replica pool asks ------------------------------------------------------------------------------
    @property
    def running(self) -> int:
        return len(self.batches[0]) + len(self.batches[1])

    @property
    def load(self) -> int:
        return self.running + len(self.waiting)

    def fits_ever(self, req: Request) -> bool:
        return all(b <= cap for b, (cap, _) in zip(self._blocks(req), self.capacity))

    def submit(self, req: Request) -> None:
        if len(self.waiting) >= self.cfg.max_queue:
            raise QueueFull(f"queue full ({self.cfg.max_queue} waiting requests)")
        self.waiting.append(req)
        self.wake.set()

    def adopt(self, reqs: list[Request]) -> None:
        """Take over requests from a lane that lost its verifier: they go first and re-prefill here."""
        self.waiting.extendleft(reversed(reqs))
        self.wake.set()

    @property
    def evacuating(self) -> bool:
        return self._evacuate

    def request_evacuation(self) -> None:
        """The verifier is gone for good (it vanished from DNS): hand the requests over at the next iteration."""
        self._evacuate = True
        self.wake.set()

    async def hand_over(self) -> list[Request]:
        """Give up every request (this lane's verifier is gone): each keeps its tokens, its caches start empty. What
        the drafter holds for them is freed (best effort: its session's end frees it too)."""
        self._deliver()
        self.dead = True
        running = self.batches[0] + self.batches[1]
        reqs = [r for r in running + list(self.waiting) if not r.cancelled]
        for r in running:
            self._forget_on_drafter(r)
        for r in reqs:
            draft = r.forget_caches()
            if draft is not None and draft.buffer:
                self.releases.drafter_buffers.append(draft.buffer)
        self.batches[0].clear()
        self.batches[1].clear()
        self.waiting.clear()
        self.releases.verifier_lost()
        self.releases.discards.clear()  # they were for the verifier that is gone
        if self.drafter is not None and self.drafter_up:
            try:
                await self._flush_drafter()
            except ServiceError:
                pass
        return reqs

    # ---- admission -------------------------------------------------------------------------------------------------
    def _blocks(self, req: Request) -> list[int]:
        worst = len(req.seq.prompt) + req.seq.max_new_tokens + self.k + 1
        return [-(-worst // bs) for _, bs in self.capacity]

    def _reserved(self) -> list[int]:
        used = [0] * len(self.capacity)
        for batch in self.batches:
            for req in batch:
                used = [u + n for u, n in zip(used, self._blocks(req))]
        return used

    def _admit(self) -> None:
        if not self.waiting:
            return
        nb = 2 if self.mode == "psd" else 1
        reserved = self._reserved()
        while self.waiting:
            req = self.waiting[0]
            sizes = [len(self.batches[(self.cur + i) % 2]) for i in range(nb)]
            slot = min(range(nb), key=lambda i: sizes[i])  # ties go to S, which drafts next
            need = self._blocks(req)
            if sizes[slot] >= self.cfg.max_batch_size or any(r + n > cap for r, n, (cap, _) in
                                                             zip(reserved, need, self.capacity)):
                return
            self.waiting.popleft()
            reserved = [r + n for r, n in zip(reserved, need)]
            self.batches[(self.cur + slot) % 2].append(req)
            req.on_admitted()

    def _forget_on_drafter(self, req: Request) -> None:
        """The drafter need not keep this sequence's cache any more (release rides on its next step)."""
        if self.drafter is not None and req.seq.draft_cached:
            self.releases.drafter_seqs.append(req.seq_id)

    def _reap(self) -> None:
        """Drop finished and cancelled requests; their KV is freed with the next step to each service."""
        if any(r.cancelled for r in self.waiting):
            for req in [r for r in self.waiting if r.cancelled]:
                self._outbox.append((req.events, ("done", "cancelled")))
            self.waiting = deque(r for r in self.waiting if not r.cancelled)
        gone = []
        for batch in self.batches:
            if any(r.seq.finished or r.cancelled for r in batch):
                gone += [r for r in batch if r.seq.finished or r.cancelled]
                batch[:] = [r for r in batch if not (r.seq.finished or r.cancelled)]
        if not gone:
            return
        # A draft step's probabilities are one buffer for its whole batch: released only once no request left in a
        # batch still points at it (its mates' verification may be reading it right now).
        held = {r.draft.buffer for batch in self.batches for r in batch if r.draft is not None}
        for req in gone:
            # Releasing on a service that never saw the sequence is harmless, just wasted work.
            if req.seq.target_cached:
                self.releases.verifier_seqs.append(req.seq_id)
            self._forget_on_drafter(req)
            draft = req.drop_draft()
            if draft is not None and draft.buffer and draft.buffer not in held:
                self.releases.drafter_buffers.append(draft.buffer)
            if req.cancelled and not req.seq.finished:
                self._outbox.append((req.events, ("done", "cancelled")))

    # ---- the loop -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name=f"lane {self.verifier.address}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            except Exception:  # noqa: BLE001 - already logged by run(); shutting down regardless
                log.exception("lane task had failed")
        if self._drafter_watch is not None:
            self._drafter_watch.cancel()
        self._deliver()
        for req in list(self.waiting) + self.batches[0] + self.batches[1]:
            req.events.put_nowait(("error", ServiceError(grpc.StatusCode.UNAVAILABLE, "router shutting down")))
            req.cancel()
        self._reap()
        self._deliver()
        try:  # best effort: the services also free everything when our sessions close
            await asyncio.wait_for(self.flush_releases(), 5)
        except Exception as exc:  # noqa: BLE001 - shutting down regardless
            log.warning("could not release KV on shutdown: %s", exc)
        self.trace.close()

    async def run(self) -> None:
        while not self.dead:
            try:
                await self._iteration()
            except asyncio.CancelledError:
                raise
            except ServiceError as exc:
                try:
                    if not exc.lost:
                        raise
                    await self._lost(exc)
                except ServiceError as final:
                    self._fail_running(final)
            except Exception as exc:  # a bug must not leave clients waiting forever
                log.exception("lane iteration failed")
                self._fail_running(ServiceError(grpc.StatusCode.INTERNAL, f"router error: {exc}"))

    async def _iteration(self) -> None:
        if self._evacuate and self.replicas is not None and await self.replicas.rehome(self):
            return
        self._reap()
        self._admit()
        if self.running:
            await self._tick()
            return
        self._deliver()
        await self.flush_releases()
        self.wake.clear()
        if not self.waiting:
            await self.wake.wait()

    def _rebalance(self) -> None:
        """When one batch has emptied (its requests finished), split the other so the overlap resumes instead of
        running plain SD. Only sequences without stored drafts move: they get drafted wherever they go."""
        A, B = self.batches
        full, empty = (A, B) if not B else (B, A)
        if empty or len(full) < 2 or any(r.draft is not None for r in full):
            return
        empty.extend(full[len(full) // 2:])
        del full[len(full) // 2:]

    async def _tick(self) -> None:
        if self.mode == "psd":
            self._rebalance()
        S, O = self.batches[self.cur], self.batches[1 - self.cur]
        speculate = self.mode != "ar" and self.drafter_up
        t0 = time.perf_counter()
        if speculate and not any(r.phase == VERIFY for r in S):
            # Nothing stored for S: the non-overlapped first tick in psd, every tick in sd.
            (derr,) = await self._launch(self._draft([r for r in S if r.phase == DRAFT], t0))
            if derr is not None:
                await self._lost(derr)
                return
        # New requests prefill with S's verification; without a drafter everyone is verified (target-only) each tick.
        verify_set = S + [r for r in O if r.phase == PREFILL or not speculate]
        draft_set = [r for r in O if r.phase == DRAFT] if self.mode == "psd" and speculate else []
        # The drafter caches new prompts while the verifier prefills them, so their first draft step feeds one token
        # instead of the whole prompt: the draft-side prefill hides behind the (much longer) target prefill.
        warm = [r for r in verify_set if r.phase == PREFILL and r.seq.draft_cached == 0] if speculate else []
        verr, derr = await self._launch(self._verify(verify_set, t0), self._draft(draft_set, t0, warm))
        for err in (derr, verr):
            if err is not None:
                await self._lost(err)  # raises if the requests cannot go on
        self.trace.tick(self.ticks, t0, time.perf_counter(), len(S), len(O))
        self.metrics.tick(self.mode if speculate else "ar", self.k)
        self.ticks += 1
        if self.mode == "psd" and verr is None:
            self.cur ^= 1

    async def _launch(self, *steps) -> list[ServiceError | None]:
        """Start the calls (their tasks are queued before anything else), then hand out the last verify's events, so
        the clients' stream writes run while the services compute."""
        calls = asyncio.gather(*(self._guard(s) for s in steps))
        self._deliver()
        return await calls

    def _deliver(self) -> None:
        outbox, self._outbox = self._outbox, []
        for queue, event in outbox:
            queue.put_nowait(event)

    @staticmethod
    async def _guard(step) -> ServiceError | None:
        """Run one half of a tick; a lost replica is returned (handled after both halves), anything else raised."""
        try:
            await step
        except ServiceError as exc:
            if not exc.lost:
                raise
            return exc
        return None

    async def _draft(self, reqs: list[Request], t0: float, cache_only: list[Request] = ()) -> None:
        """Propose drafts for `reqs`; `cache_only` sequences are only written into the drafter's cache (k = 0)."""
        if not reqs and not cache_only and not self.releases.for_drafter:
            return
        batch = pb.ProposeBatch(transport=self.transport, release=self.releases.take_drafter())
        prefills = 0  # sequences the drafter starts from position 0 (new, or after a fault): for the trace
        for r, k in [(r, r.seq.draft_len(self.k)) for r in reqs] + [(r, 0) for r in cache_only]:
            start, tokens = r.seq.draft_input()
            entry = batch.seqs.add(seq_id=r.seq_id, start=start, tokens=tokens, k=k)
            if start == 0:  # the drafter keeps a sequence's sampling options from its first step on
                prefills += 1
                entry.sampling.CopyFrom(r.sampling)
        # What the cache-only sequences will hold, fixed now: the concurrent verify may commit a token meanwhile.
        cached_upto = [len(r.seq.tokens) for r in cache_only]
        start_t = time.perf_counter()
        resp = await self.drafter.step(pb.DrafterRequest(propose=batch))
        end_t = time.perf_counter()
        out = resp.propose
        ref = out.probs if out.HasField("probs") else None
        for r, d in zip(reqs, out.seqs):
            r.seq.on_drafted(len(d.tokens))
            sampled = d.probs_row >= 0
            r.draft = PendingDraft(list(d.tokens), ref if sampled else None, d.probs_row if sampled else -1)
        for r, upto in zip(cache_only, cached_upto):
            r.seq.draft_cached = upto
        if reqs or cache_only:
            self.trace.step("draft", self.drafter.address, self.ticks, start_t - t0, end_t - t0,
                            len(reqs) + len(cache_only), out.compute_ms, prefills)

    async def _verify(self, reqs: list[Request], t0: float) -> None:
        if not reqs:
            return
        release, discards = self.releases.take_verifier()
        batch = pb.VerifyBatch(discard=discards, release=release)
        refs = {id(r.draft.probs): r.draft.probs for r in reqs if r.draft is not None and r.draft.probs is not None}
        if len(refs) > 1:
            raise ServiceError(grpc.StatusCode.INTERNAL, "one verify step got drafts from two draft steps")
        if refs:
            batch.draft_probs.CopyFrom(next(iter(refs.values())))
        prefills = 0
        for r in reqs:
            start, tokens = r.seq.verify_input()
            draft = r.draft
            entry = batch.seqs.add(seq_id=r.seq_id, start=start, tokens=tokens,
                                   drafts=draft.tokens if draft else [], probs_row=draft.probs_row if draft else -1)
            if start == 0:  # the verifier keeps a sequence's sampling options from its first step on
                prefills += 1
                entry.sampling.CopyFrom(r.sampling)
        start_t = time.perf_counter()
        resp = await self.verifier.step(pb.VerifierRequest(verify=batch))
        end_t = time.perf_counter()
        for r, v in zip(reqs, resp.verify.seqs):
            draft = r.drop_draft()
            drafted = len(draft.tokens) if draft else 0
            emitted = r.seq.on_verified(drafted, v.num_accepted, list(v.tokens))
            self.metrics.verified(drafted, v.num_accepted, len(emitted))
            if draft is not None and draft.buffer:
                self.releases.drafter_buffers.append(draft.buffer)
            if emitted and not r.cancelled:
                self._outbox.append((r.events, ("tokens", emitted)))
            if r.seq.finished:
                self._outbox.append((r.events, ("done", r.seq.finish_reason)))
        self.trace.step("verify", self.verifier.address, self.ticks, start_t - t0, end_t - t0, len(reqs),
                        resp.verify.compute_ms, prefills)

    async def flush_releases(self) -> None:
        """When idle, free what finished sequences still hold instead of waiting for the next step. What a flush takes
        is owed again if the call does not get through (shutdown cancelled it), so the next flush retries it."""
        await self._flush_verifier()
        await self._flush_drafter()

    async def _flush_verifier(self) -> None:
        if not (self.releases.verifier_seqs or self.releases.discards):
            return
        release, discards = self.releases.take_verifier()
        try:
            if discards:
                await self.verifier.step(pb.VerifierRequest(verify=pb.VerifyBatch(discard=discards)))
                discards = []
            if release.seq_ids:
                await self.verifier.step(pb.VerifierRequest(release=release))
        except BaseException:
            self.releases.give_back_verifier(release, discards)
            raise

    async def _flush_drafter(self) -> None:
        if self.drafter is None or not self.releases.for_drafter:
            return
        release = self.releases.take_drafter()
        try:
            await self.drafter.step(pb.DrafterRequest(release=release))
        except BaseException:
            self.releases.give_back_drafter(release)
            raise

    # ---- faults ---------------------------------------------------------------------------------------------------
    def _fail_running(self, exc: ServiceError) -> None:
        log.error("failing %d running requests: %s %s", self.running, exc.code.name, exc)
        self._deliver()
        for batch in self.batches:
            for req in batch:
                req.events.put_nowait(("error", exc))
                req.cancel()

    async def _lost(self, exc: ServiceError) -> None:
        """A model service went away. Nothing is lost but caches: without a drafter we decode target-only until it is
        back; without a verifier we hand the requests to another lane, or wait for it to return and re-prefill."""
        if exc.source == "drafter":
            self._drafter_lost(exc)
            return
        if self.replicas is not None and await self.replicas.rehome(self):
            return  # the pool moved our requests to other lanes
        wait_s = self.cfg.rpc_timeout_s
        log.info("lane %s: %d running requests wait up to %.0f s for the verifier to come back",
                 self.verifier.address, self.running, wait_s)
        self._set_verifier_down(True)
        try:
            await self.verifier.wait_ready(wait_s, quiet=True)
            if self.drafter is not None and self.drafter_up:
                self.transport = await negotiate(self.drafter, self.verifier, self.cfg.transport)
        except (TimeoutError, Exception) as wait_exc:  # noqa: BLE001 - any failure here means: give up on them
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"verifier unavailable: {wait_exc}") from wait_exc
        finally:
            self._set_verifier_down(False)
        log.info("lane %s: re-prefilling %d running requests", self.verifier.address, self.running)
        self.releases.verifier_lost()
        for r in self.batches[0] + self.batches[1]:
            r.seq.reset_cache("target")

    def _set_verifier_down(self, down: bool) -> None:
        self.verifier_down = down
        if self.replicas is not None:
            self.replicas.serving_changed()

    def _drafter_lost(self, exc: ServiceError) -> None:
        log.info("lane %s: decoding target-only until a drafter is back", self.verifier.address)
        self.drafter_up = False
        orphans = {}
        for r in self.batches[0] + self.batches[1]:
            r.seq.reset_cache("draft")
            draft = r.drop_draft()  # its drafts may be fine, but their probabilities died with the drafter
            if draft is not None and draft.probs is not None:
                orphans[draft.buffer] = draft.probs
        self.releases.discards.extend(orphans.values())
        self.releases.drafter_lost()
        if self._drafter_watch is None or self._drafter_watch.done():
            self._drafter_watch = asyncio.create_task(self._await_drafter())

    async def _await_drafter(self) -> None:
        while True:
            try:
                if self.replicas is not None:  # any healthy replica will do: caches re-prefill anyway
                    self.drafter = await self.replicas.find_drafter(self)
                await self.drafter.wait_ready(timeout_s=3600, quiet=True)
                self.transport = await negotiate(self.drafter, self.verifier, self.cfg.transport)
                break
            except Exception as exc:  # noqa: BLE001 - keep watching whatever went wrong
                log.debug("drafter still unavailable: %s", exc)
                await asyncio.sleep(1.0)
        log.info("lane %s: speculation resumes with drafter %s (transport %s)", self.verifier.address,
                 self.drafter.address, self.transport)
        self.drafter_up = True
        self.wake.set()
