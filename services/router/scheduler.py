"""The router's engine: continuous batching into two batches with one verified while the other is drafted (PSD).

Each tick: verify batch S (with the drafts made for it last tick) on the verifier while batch O is drafted on the
drafter, then swap. A tick costs ~max(T_draft, T_verify) instead of their sum. Modes share the loop:
  psd  two batches, the overlap above; a batch with no stored drafts (first tick) is drafted synchronously first,
       so with one batch non-empty it degrades to plain SD until the other fills;
  sd   one batch: draft, then verify;
  ar   one batch, target only (verify with zero drafts).
New requests join the smaller batch (the one just verified on ties, since it drafts next) and are prefilled on the
verifier in the same call that verifies S, while the drafter caches their prompts in the tick's draft call. The
router holds every request's prompt and accepted tokens (Sequence); the services only hold caches that the router can
rebuild (recovery.py: what happens when one goes away).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Awaitable, Callable

import grpc

from minedraft.config import RouterConfig
from minedraft.v1 import common_pb2, model_service_pb2 as pb
from services.router.clients import ModelClient, ServiceError
from services.router.recovery import Recovery
from services.router.request import DRAFT, PREFILL, VERIFY, QueueFull, Request, buffer_name
from services.router.trace import Trace

__all__ = ["Engine", "QueueFull", "Request"]

log = logging.getLogger(__name__)


class Engine(Recovery):
    def __init__(self, cfg: RouterConfig, verifier: ModelClient, drafter: ModelClient | None, transport: str):
        self.cfg, self.mode, self.k = cfg, cfg.mode, cfg.num_speculative_tokens
        self.verifier, self.drafter, self.transport = verifier, drafter, transport
        self.waiting: deque[Request] = deque()
        self.batches: tuple[list[Request], list[Request]] = ([], [])
        self.cur = 0  # index of S, the batch verified next
        self.release_v: list[str] = []  # sequence ids to free on the verifier with its next step
        self.release_d: list[str] = []
        self.release_buffers: list[str] = []  # drafter buffers the verifier has consumed
        self.discard_refs: list[common_pb2.TensorRef] = []  # buffers of a lost drafter, for the verifier to free
        self.wake = asyncio.Event()
        # Token/finish events from the last verify, handed to the clients' streams only once the next tick's calls are
        # out: each stream write costs the event loop ~0.2 ms, and sixteen of them before the next call would sit on
        # the critical path of every step.
        self._outbox: list[tuple[asyncio.Queue, tuple]] = []
        self.trace = Trace(cfg.trace_file)
        infos = [verifier.info] + ([drafter.info] if drafter else [])
        self.max_len = min(i.max_context for i in infos)
        self.eos_ids = frozenset(verifier.info.eos_token_ids)
        # KV admission: each running sequence reserves its worst case on both services, in blocks.
        self.capacity = [(i.kv_capacity_tokens // max(i.block_size, 1), max(i.block_size, 1)) for i in infos]
        self.reserved = [0] * len(infos)
        self.ticks = 0
        self._task: asyncio.Task | None = None
        self.drafter_up = drafter is not None
        self._drafter_watch: asyncio.Task | None = None
        self.verifier_wait_s = cfg.rpc_timeout_s  # how long running requests wait for a lost verifier to return
        self.dead = False  # this lane's verifier is gone and its requests moved to other lanes
        self.evacuate_requested = False  # set by replica discovery when the verifier vanished from DNS
        # Set by the Router when there are replicas: move requests elsewhere / find another drafter.
        self.on_verifier_lost: Callable[["Engine"], Awaitable[bool]] | None = None
        self.find_drafter: Callable[["Engine"], Awaitable[ModelClient]] | None = None

    # ---- admission ------------------------------------------------------------------------------------------------
    def _blocks(self, req: Request) -> list[int]:
        worst = len(req.seq.prompt) + req.seq.max_new_tokens + self.k + 1
        return [-(-worst // bs) for _, bs in self.capacity]

    def fits_ever(self, req: Request) -> bool:
        return all(b <= cap for b, (cap, _) in zip(self._blocks(req), self.capacity))

    def submit(self, req: Request) -> None:
        if len(self.waiting) >= self.cfg.max_queue:
            raise QueueFull(f"queue full ({self.cfg.max_queue} waiting requests)")
        self.waiting.append(req)
        self.wake.set()

    @property
    def load(self) -> int:
        return self.running + len(self.waiting)

    def cancel(self, req: Request) -> None:
        req.cancelled = True
        self.wake.set()

    @property
    def batch_limit(self) -> int:
        return self.cfg.max_batch_size

    def _admit(self) -> None:
        nb = 2 if self.mode == "psd" else 1
        while self.waiting:
            req = self.waiting[0]
            sizes = [len(self.batches[(self.cur + i) % 2]) for i in range(nb)]
            slot = min(range(nb), key=lambda i: sizes[i])  # ties go to S, which drafts next
            need = self._blocks(req)
            if sizes[slot] >= self.batch_limit or any(r + n > cap for r, n, (cap, _) in
                                                      zip(self.reserved, need, self.capacity)):
                return
            self.waiting.popleft()
            self.reserved = [r + n for r, n in zip(self.reserved, need)]
            self.batches[(self.cur + slot) % 2].append(req)

    def _reap(self) -> None:
        """Drop finished and cancelled sequences; their KV is freed with the next step to each service."""
        for req in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(req)
            self._outbox.append((req.events, ("done", "cancelled")))
        gone = []
        for batch in self.batches:
            for req in [r for r in batch if r.seq.finished or r.cancelled]:
                batch.remove(req)
                gone.append(req)
        # A draft step's probabilities are one buffer for its whole batch: released only once no request left in a
        # batch still points at it (its mates' verification may be reading it right now).
        held = {r.probs_buffer for batch in self.batches for r in batch if r.probs_buffer}
        for req in gone:
            self.reserved = [r - n for r, n in zip(self.reserved, self._blocks(req))]
            # Releasing on a service that never saw the sequence is harmless, just wasted work.
            if req.phase != PREFILL:
                self.release_v.append(req.seq_id)
            if self.drafter is not None and (req.phase != PREFILL or req.seq.draft_cached):
                self.release_d.append(req.seq_id)
            if req.probs_buffer and req.probs_buffer not in held:
                self.release_buffers.append(req.probs_buffer)
            if req.cancelled and not req.seq.finished:
                self._outbox.append((req.events, ("done", "cancelled")))

    # ---- the loop -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="psd-engine")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            except Exception:  # noqa: BLE001 - already logged by run(); shutting down regardless
                log.exception("engine task had failed")
        if self._drafter_watch is not None:
            self._drafter_watch.cancel()
        self._deliver()
        for req in list(self.waiting) + self.batches[0] + self.batches[1]:
            req.events.put_nowait(("error", ServiceError(grpc.StatusCode.UNAVAILABLE, "router shutting down")))
            req.cancelled = True
        self._reap()
        self._deliver()
        try:  # best effort: the services also free everything when our sessions close
            await asyncio.wait_for(self._flush_releases(), 5)
        except Exception as exc:  # noqa: BLE001 - shutting down regardless
            log.warning("could not release KV on shutdown: %s", exc)
        self.trace.close()

    @property
    def running(self) -> int:
        return len(self.batches[0]) + len(self.batches[1])

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
                log.exception("engine iteration failed")
                self._fail_running(ServiceError(grpc.StatusCode.INTERNAL, f"router error: {exc}"))

    async def _iteration(self) -> None:
        if self.evacuate_requested and self.on_verifier_lost is not None and await self.on_verifier_lost(self):
            return
        self._reap()
        self._admit()
        if self.running:
            await self._tick()
            return
        self._deliver()
        await self._flush_releases()
        self.wake.clear()
        if not self.waiting:
            await self.wake.wait()

    def _rebalance(self) -> None:
        """When one batch has emptied (its requests finished), split the other so the overlap resumes instead of
        running plain SD. Only sequences without stored drafts move: they get drafted wherever they go."""
        A, B = self.batches
        full, empty = (A, B) if not B else (B, A)
        if empty or len(full) < 2 or any(r.phase == VERIFY for r in full):
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
        if not reqs and not cache_only and not self.release_d and not self.release_buffers:
            return
        batch = pb.ProposeBatch(transport=self.transport)
        batch.release.seq_ids.extend(self.release_d)
        batch.release.buffers.extend(self.release_buffers)
        self.release_d, self.release_buffers = [], []
        prefills = 0  # sequences the drafter starts from position 0 (new, or after a fault): for the trace
        for r, k in [(r, r.seq.draft_len(self.k)) for r in reqs] + [(r, 0) for r in cache_only]:
            start, tokens = r.seq.draft_input()
            prefills += start == 0
            batch.seqs.add(seq_id=r.seq_id, start=start, tokens=tokens, k=k, sampling=r.sampling)
        # What the cache-only sequences will hold, fixed now: the concurrent verify may commit a token meanwhile.
        cached_upto = [len(r.seq.tokens) for r in cache_only]
        start_t = time.perf_counter()
        resp = await self.drafter.step(pb.DrafterRequest(propose=batch))
        end_t = time.perf_counter()
        out = resp.propose
        ref = out.probs if out.HasField("probs") else None
        name = buffer_name(ref) if ref is not None else ""
        for r, d in zip(reqs, out.seqs):
            r.seq.on_drafted(list(d.tokens), d.probs_row if d.probs_row >= 0 else None)
            r.probs_ref, r.probs_buffer = (ref, name) if d.probs_row >= 0 else (None, "")
            r.phase = VERIFY
        for r, upto in zip(cache_only, cached_upto):
            r.seq.draft_cached = upto
        if reqs or cache_only:
            self.trace.step("draft", self.drafter.address, self.ticks, start_t - t0, end_t - t0,
                            len(reqs) + len(cache_only), out.compute_ms, prefills)

    async def _verify(self, reqs: list[Request], t0: float) -> None:
        if not reqs:
            return
        batch = pb.VerifyBatch(discard=self.discard_refs)
        batch.release.seq_ids.extend(self.release_v)
        self.release_v, self.discard_refs = [], []
        refs = {id(r.probs_ref): r.probs_ref for r in reqs if r.phase == VERIFY and r.probs_ref is not None}
        if len(refs) > 1:
            raise ServiceError(grpc.StatusCode.INTERNAL, "one verify step got drafts from two draft steps")
        if refs:
            batch.draft_probs.CopyFrom(next(iter(refs.values())))
        prefills = 0
        for r in reqs:
            start, tokens = r.seq.verify_input()
            prefills += start == 0
            drafts = r.seq.drafts if r.phase == VERIFY else []
            row = r.seq.draft_probs if (r.phase == VERIFY and r.seq.draft_probs is not None) else -1
            batch.seqs.add(seq_id=r.seq_id, start=start, tokens=tokens, drafts=drafts, probs_row=row,
                           sampling=r.sampling)
        start_t = time.perf_counter()
        resp = await self.verifier.step(pb.VerifierRequest(verify=batch))
        end_t = time.perf_counter()
        now = time.perf_counter()
        for r, v in zip(reqs, resp.verify.seqs):
            if r.phase != VERIFY:
                r.seq.drafts, r.seq.draft_probs = [], None
            emitted = r.seq.on_verified(v.num_accepted, list(v.tokens))
            if r.probs_buffer:
                self.release_buffers.append(r.probs_buffer)
            r.probs_ref, r.probs_buffer, r.phase = None, "", DRAFT
            if r.first_token_at is None:
                r.first_token_at = now
            if emitted and not r.cancelled:
                self._outbox.append((r.events, ("tokens", emitted)))
            if r.seq.finished:
                r.finished_at = now
                self._outbox.append((r.events, ("done", r.seq.finish_reason)))
        self.trace.step("verify", self.verifier.address, self.ticks, start_t - t0, end_t - t0, len(reqs),
                        resp.verify.compute_ms, prefills)

    async def _flush_releases(self) -> None:
        """When idle, free what finished sequences still hold instead of waiting for the next step. The lists are
        cleared only once a service confirmed, so a cancelled flush (shutdown) is retried by the next one."""
        if self.discard_refs:
            refs = list(self.discard_refs)
            await self.verifier.step(pb.VerifierRequest(verify=pb.VerifyBatch(discard=refs)))
            del self.discard_refs[:len(refs)]
        if self.release_v:
            ids = list(self.release_v)
            await self.verifier.step(pb.VerifierRequest(release=pb.Release(seq_ids=ids)))
            del self.release_v[:len(ids)]
        if self.drafter and (self.release_d or self.release_buffers):
            ids, bufs = list(self.release_d), list(self.release_buffers)
            await self.drafter.step(pb.DrafterRequest(release=pb.Release(seq_ids=ids, buffers=bufs)))
            del self.release_d[:len(ids)]
            del self.release_buffers[:len(bufs)]
