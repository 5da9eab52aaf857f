"""A lane: one verifier replica, the drafter paired with it, and the loop that keeps two batches in flight on them.

Each tick verifies batch S (with the drafts made for it last tick) on the verifier while batch O is drafted on the
drafter, then the two swap. A tick costs ~max(T_draft, T_verify) instead of their sum. The modes share the loop:
  psd  two batches, the overlap above; a batch with no stored drafts (first tick) is drafted synchronously first,
       so with one batch non-empty it degrades to plain SD until the other fills;
  sd   one batch: draft, then verify;
  ar   one batch, target only (verify with zero drafts);
  ahead one batch; each verified request's next drafts are made during its verification (draft-ahead) and used
       where they hit; a request whose drafts missed is drafted afresh while the others are verified, and verified
       next tick (so a miss costs its own request a tick, not everyone a re-draft).
New requests join the smaller batch (S on ties, since it drafts next) and are prefilled on the verifier with their
batch's verification, while the drafter caches their prompts in a draft call; then they draft and verify like the
rest. Every request runs the same steps whatever batch it joined, so a seeded sample does not depend on timing.

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
from collections import Counter, deque
from typing import Protocol

import grpc
import numpy as np

from minedraft.config import RouterConfig
from minedraft.v1 import model_service_pb2 as pb
from services.router.acceptance import PositionAcceptance, request_scale
from services.router.clients import ModelClient, ServiceError
from services.router.costs import CostModel, decode_shaped, draft_features, draft_forwards, verify_features
from services.router.metrics import LaneMetrics
from services.router.negotiation import negotiate
from services.router.policy import Choice, Controller, LaneView, measures_steady_cost, tick_ms
from services.router.releases import PendingReleases
from services.router.request import DRAFT, PREFILL, VERIFY, PendingDraft, QueueFull, Request
from services.router.trace import Trace

__all__ = ["Lane", "QueueFull", "Replicas", "Request"]

log = logging.getLogger(__name__)


def _shape(reqs: list[Request], tokens: int, ahead: int = 0) -> tuple[int, float, int]:
    """(sequences, summed cached lengths, tokens or drafts each) of a step over `reqs`, for `policy.tick_ms`;
    `ahead`: drafts each has pending beyond its tokens (drafting ahead starts after them)."""
    return len(reqs), float(sum(len(r.seq.tokens) for r in reqs) + ahead * len(reqs)), tokens


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
                 replicas: Replicas | None = None, trace: Trace | None = None, metrics: LaneMetrics | None = None,
                 controller: Controller | None = None):
        self.cfg, self.mode = cfg, cfg.mode
        self.k_max = cfg.max_speculative_tokens if cfg.mode == "auto" else cfg.num_speculative_tokens
        fixed = None if cfg.mode == "auto" else Choice(cfg.mode, 0 if cfg.mode == "ar" else cfg.num_speculative_tokens)
        self.controller = controller if controller is not None else Controller(self.k_max, fixed=fixed)
        self.costs = CostModel.guess()
        self.acceptance = PositionAcceptance(self.k_max)
        self.ahead_hits = self.ahead_misses = 0
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
        self._holders: Counter[str] = Counter()  # drafter buffer -> pending drafts that point at it
        self._outcomes: dict[str, tuple[int, int, int]] = {}  # this tick's (drafted, accepted, last token) per seq
        self._calls: list[tuple[float, float]] = []  # this tick's service calls (start, end)
        self._tick_prefills = 0  # prompts this tick's verify prefilled
        self._split = False  # the last tick ran psd with both batches
        self._last_tick_end = 0.0
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
            self._unhold(r.forget_caches())
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
        worst = len(req.seq.prompt) + req.seq.max_new_tokens + self.k_max + 1
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
        nb = 1 if self.mode in ("sd", "ahead", "ar") else 2  # auto may run two batches (psd) at any tick
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

    # ---- draft buffers: one per draft step, shared by its batch; freed when no pending draft points at it ---------
    def _hold(self, draft: PendingDraft) -> PendingDraft:
        if draft.buffer:
            self._holders[draft.buffer] += 1
        return draft

    def _unhold(self, drafts) -> None:
        for draft in drafts:
            if draft is None or not draft.buffer:
                continue
            self._holders[draft.buffer] -= 1
            if self._holders[draft.buffer] <= 0:
                del self._holders[draft.buffer]
                self.releases.drafter_buffers.append(draft.buffer)

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
        for req in gone:
            # Releasing on a service that never saw the sequence is harmless, just wasted work.
            if req.seq.target_cached:
                self.releases.verifier_seqs.append(req.seq_id)
            self._forget_on_drafter(req)
            self._unhold(req.drop_drafts())
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
        if self.controller.fixed is None and self.drafter is not None:
            try:
                await self._profile()
            except ServiceError as exc:  # the first real step will find out what is wrong; estimates start rough
                log.info("lane %s: start-up profile failed (%s); the cost model starts from a guess",
                         self.verifier.address, exc)
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

    def _view(self) -> LaneView:
        """The running requests as the controller sees them: context lengths, acceptance per position each."""
        reqs = self.batches[0] + self.batches[1]
        rates, overall = self.acceptance.rates(), self.acceptance.overall
        scale = np.array([request_scale(r.seq.accepted, r.examined, overall) for r in reqs])
        return LaneView(np.array([len(r.seq.tokens) for r in reqs], dtype=float),
                        np.clip(rates[None, :] * scale[:, None], 0.0, 0.995))

    def _rebalance(self) -> None:
        """psd: when one batch has emptied (its requests finished, or a single-batch schedule ran), split the other
        so the overlap resumes. Only requests without a pending draft move: they get drafted wherever they go."""
        A, B = self.batches
        full, empty = (A, B) if not B else (B, A)
        if not self.batches[self.cur]:  # nothing to verify: the other batch goes first (plain SD until both fill)
            self.cur ^= 1
        if empty or len(full) < 2:
            return
        movable = [r for r in full if r.draft is None][:len(full) // 2]
        for r in movable:
            full.remove(r)
        empty.extend(movable)

    @staticmethod
    def _defer_undrafted(S: list[Request], O: list[Request]) -> None:
        """psd: a request of S without a draft, beside ones with (a missed draft-ahead after a schedule switch), is
        drafted with O this tick rather than verified alone with zero drafts. Every request's steps are then prefill,
        then draft k and verify, whatever batch it joined and whoever else runs: a seeded request consumes its random
        streams the same way in every run, so its sample is reproducible (rejection sampling's outcome depends on
        where drafts were made)."""
        late = [r for r in S if r.phase == DRAFT]
        for r in late:
            S.remove(r)
        O.extend(late)

    def _merge(self) -> None:
        """A single-batch schedule: everyone is in S."""
        S, O = self.batches[self.cur], self.batches[1 - self.cur]
        S.extend(O)
        O.clear()

    async def _tick(self) -> None:
        choice = self.controller.choose(self._view, self.costs, drafter=self.drafter_up and self.mode != "ar",
                                        n=self.running)
        if getattr(self.controller, "switched", None):
            was, now, top = self.controller.switched
            self.controller.switched = None
            log.info("lane %s: %d running, auto runs %s (was %s); predicted tok/s: %s; measured/predicted: %s",
                     self.verifier.address, self.running, now, was, ", ".join(f"{c} {t:.0f}" for t, c in top),
                     ", ".join(f"{s} {v:.2f}" for s, v in self.controller.correction.items()))
            if log.isEnabledFor(logging.DEBUG):
                ctx = self._view().contexts
                log.debug("lane %s: ms predicted: verify %.1f (all, k+1 tokens) %.1f (half); draft %.1f (all) %.1f "
                          "(half); overheads verify %.1f draft %.1f tick %.1f", self.verifier.address,
                          self.costs.t_verify(ctx, now.k + 1), self.costs.t_verify(ctx[0::2], now.k + 1),
                          self.costs.t_draft(ctx, now.k), self.costs.t_draft(ctx[0::2], now.k),
                          self.costs.verify_overhead.value, self.costs.draft_overhead.value,
                          self.costs.tick_overhead.value)
        sched, k = choice.schedule, choice.k
        if sched == "psd":
            self._rebalance()
        else:
            self._merge()
        S, O = self.batches[self.cur], self.batches[1 - self.cur]
        if sched == "psd" and any(r.phase == VERIFY for r in S):
            self._defer_undrafted(S, O)
        t0 = time.perf_counter()
        self._calls, self._tick_prefills = [], 0
        # psd drafts S first only when nothing is stored for it (its first tick: _defer_undrafted left no request
        # without a draft beside ones with); sd drafts every request that has no draft (new, the other batch merged
        # in) first. Draft-ahead drafts the requests without one (new, or whose drafts made ahead missed) while it
        # verifies the others, and verifies them next tick: a miss costs its own request a tick, not everyone a
        # re-draft. Only with nothing else to verify (one request, or all missed at once) does it draft first.
        need = [r for r in S if r.phase == DRAFT] if sched != "ar" else []
        draft_set = [r for r in O if r.phase == DRAFT] if sched == "psd" else []
        verify_set = S
        if sched == "ahead" and need and len(need) < len(S):
            verify_set = [r for r in S if r.phase != DRAFT]
            draft_set, need = need, []
        if need:
            (derr,) = await self._launch(self._draft(t0, need, k))
            if derr is not None:
                await self._lost(derr)
                return
        ahead = [r for r in verify_set if r.draft is not None and self._ahead_len(r, k) > 0] \
            if sched == "ahead" else []
        predicted = tick_ms(self.costs, _shape(verify_set, k + 1), [_shape(need, k)],
                            [_shape(ahead, k + 1, ahead=k), _shape(draft_set, k)])
        # New requests prefill with their own batch's verification (single-batch schedules merged O into S): one
        # that joined O waits a tick rather than being prefilled now and then verified alone with zero drafts, so
        # every request runs prefill, then draft k and verify, whatever batch it joined (reproducible seeded samples).
        # The drafter caches new prompts while the verifier works, so their first draft step feeds one token instead
        # of the whole prompt: the draft-side prefill hides behind the (much longer) target prefill.
        warm = [r for r in S + O if r.phase == PREFILL and r.seq.draft_cached == 0] \
            if self.drafter_up and self.mode != "ar" else []
        verr, derr = await self._launch(self._verify(verify_set, t0), self._draft(t0, draft_set, k, warm, ahead))
        outcome = self._settle_ahead(ahead, verified=verr is None and derr is None)
        for err in (derr, verr):
            if err is not None:
                await self._lost(err)  # raises if the requests cannot go on
        end = time.perf_counter()
        # psd's first tick with both batches, after a single-batch schedule whose requests all held drafts (the
        # batch could not split at once), drafts both halves before it can overlap: 24-45 ms where psd's steady
        # ticks took 11-16 at 2 concurrent on the demo pair. Counted, it set psd's correction to 0.92 and kept auto
        # on draft-ahead where psd/k=4 measured 19% more tokens per busy ms.
        split = sched == "psd" and bool(O)
        first_split, self._split = split and not self._split, split
        if measures_steady_cost(self._tick_prefills, len(S) + len(O)) and not first_split:
            # psd with one batch (one request, or the other batch drained) ran an sd tick: it corrects sd.
            ran = Choice("sd", k) if sched == "psd" and not O else choice
            self.controller.observe(ran, 1e3 * (end - t0 + self._gap(t0)), predicted_ms=predicted, n=len(S) + len(O))
        self._observe_tick(t0, end)
        self.trace.tick(self.ticks, t0, end, len(verify_set), len(S) + len(O) - len(verify_set), str(choice),
                        self.controller.predicted, self.controller.explored, outcome)
        self.metrics.tick(sched, k)
        if any(outcome):
            self.metrics.drafted_ahead(*outcome)
        self.ticks += 1
        if sched == "psd" and verr is None:
            self.cur ^= 1

    def _ahead_len(self, r: Request, k: int) -> int:
        """Drafts worth making ahead for `r`: what draft_len(k) will allow once its pending draft and the target's
        next token are committed."""
        pending = len(r.draft.tokens) + 1
        room = min(r.seq.max_new_tokens - len(r.seq.output), r.seq.max_len - len(r.seq.tokens)) - pending - 1
        return max(0, min(k, room))

    def _settle_ahead(self, reqs: list[Request], verified: bool) -> tuple[int, int]:
        """After the verify: a draft made ahead is used where the whole pending draft was accepted and the target's
        own next token is the drafter's guess (the first token drafted ahead); anywhere else it is discarded.
        Returns this tick's (hits, misses)."""
        hits = misses = 0
        for r in reqs:
            ahead, outcome = r.drop_ahead(), self._outcomes.pop(r.seq_id, None)
            if ahead is None:
                continue
            hit = verified and outcome is not None and not r.seq.finished and len(ahead.tokens) >= 2 and \
                outcome[1] == outcome[0] and outcome[2] == ahead.tokens[0]
            if hit:
                r.draft = self._hold(PendingDraft(ahead.tokens[1:], ahead.probs,
                                                  ahead.probs_row + 1 if ahead.probs_row >= 0 else -1))
                r.seq.draft_cached = r.ahead_cached
                hits += 1
            else:
                misses += 1
            self._unhold([ahead])
        self._outcomes.clear()
        self.ahead_hits += hits
        self.ahead_misses += misses
        return hits, misses

    def _observe_tick(self, t0: float, end: float) -> None:
        """The router's own share of the tick (and of the gap since the previous one): what no call covered."""
        covered, last = 0.0, t0
        for s, e in sorted(self._calls):
            covered += max(0.0, e - max(s, last))
            last = max(last, e)
        self.costs.tick_overhead.update(1e3 * (end - t0 - covered + self._gap(t0)))
        self._last_tick_end = end

    def _gap(self, t0: float) -> float:
        """Time between the previous tick's end and this one's start, when the lane was busy all along."""
        return t0 - self._last_tick_end if 0 <= t0 - self._last_tick_end < 0.05 else 0.0

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

    async def _draft(self, t0: float, reqs: list[Request], k: int, cache_only: list[Request] = (),
                     ahead: list[Request] = ()) -> None:
        """Propose up to k drafts for `reqs`; write `cache_only` sequences into the drafter's cache (k = 0); and for
        `ahead`, draft what follows their pending drafts (the drafter's guess of the target's next token, then the
        next k), which `_settle_ahead` keeps or drops once the pending drafts are verified."""
        if not reqs and not cache_only and not ahead and not self.releases.for_drafter:
            return
        batch = pb.ProposeBatch(transport=self.transport, release=self.releases.take_drafter())
        tau = self.cfg.draft_confidence
        entries = []  # (request, kind, start, tokens, k)
        for r in reqs:
            entries.append((r, "draft", *r.seq.draft_input(), r.seq.draft_len(k)))
        for r in cache_only:
            entries.append((r, "cache", *r.seq.draft_input(), 0))
        for r in ahead:  # the last pending draft is not in the drafter's cache yet: feed it, then draft on
            entries.append((r, "ahead", r.seq.draft_cached, r.draft.tokens[-1:], self._ahead_len(r, k) + 1))
        prefills = 0  # sequences the drafter starts from position 0 (new, or after a fault): for the trace
        for r, kind, start, tokens, n in entries:
            entry = batch.seqs.add(seq_id=r.seq_id, start=start, tokens=tokens, k=n,
                                   min_confidence=tau if kind != "cache" else 0.0)
            if start == 0:  # the drafter keeps a sequence's sampling options from its first step on
                prefills += 1
                entry.sampling.CopyFrom(r.sampling)
        # What the cache-only sequences will hold, fixed now: the concurrent verify may commit a token meanwhile.
        cached_upto = {r.seq_id: len(r.seq.tokens) for r in cache_only}
        start_t = time.perf_counter()
        resp = await self.drafter.step(pb.DrafterRequest(propose=batch))
        end_t = time.perf_counter()
        self._calls.append((start_t, end_t))
        out = resp.propose
        ref = out.probs if out.HasField("probs") else None
        rows = []
        for (r, kind, start, tokens, n), d in zip(entries, out.seqs):
            rows.append((start, len(tokens), 1 if kind == "cache" else draft_forwards(n, len(d.tokens))))
            sampled = d.probs_row >= 0
            draft = PendingDraft(list(d.tokens), ref if sampled else None, d.probs_row if sampled else -1)
            if kind == "draft":
                r.seq.on_drafted(len(d.tokens))
                r.draft = self._hold(draft)
            elif kind == "ahead":
                r.ahead, r.ahead_cached = self._hold(draft), start + len(tokens) + max(len(d.tokens) - 1, 0)
            else:
                r.seq.draft_cached = cached_upto[r.seq_id]
        if entries and not cache_only and decode_shaped(rows):
            self.costs.draft.update(draft_features(rows), out.compute_ms)
            self.costs.draft_overhead.update(1e3 * (end_t - start_t) - out.compute_ms)
        if entries:
            self.trace.step("draft", self.drafter.address, self.ticks, start_t - t0, end_t - t0, len(entries),
                            out.compute_ms, prefills)

    async def _verify(self, reqs: list[Request], t0: float) -> None:
        if not reqs:
            return
        release, discards = self.releases.take_verifier()
        batch = pb.VerifyBatch(discard=discards, release=release)
        # Drafts of one verify may come from several draft steps (a merge of the two batches, draft-ahead hits next to
        # fresh drafts): one reference each, by position.
        refs: dict[int, int] = {}
        for r in reqs:
            q = r.draft.probs if r.draft is not None else None
            if q is not None and id(q) not in refs:
                refs[id(q)] = len(refs)
                (batch.draft_probs if not refs[id(q)] else batch.more_draft_probs.add()).CopyFrom(q)
        prefills, rows = 0, []
        for r in reqs:
            start, tokens = r.seq.verify_input()
            draft = r.draft
            entry = batch.seqs.add(seq_id=r.seq_id, start=start, tokens=tokens,
                                   drafts=draft.tokens if draft else [], probs_row=draft.probs_row if draft else -1,
                                   probs_ref=refs[id(draft.probs)] if draft and draft.probs is not None else 0)
            rows.append((start, len(tokens) + len(entry.drafts)))
            if start == 0:  # the verifier keeps a sequence's sampling options from its first step on
                prefills += 1
                entry.sampling.CopyFrom(r.sampling)
        self._tick_prefills += prefills
        start_t = time.perf_counter()
        resp = await self.verifier.step(pb.VerifierRequest(verify=batch))
        end_t = time.perf_counter()
        self._calls.append((start_t, end_t))
        if decode_shaped(rows):
            self.costs.verify.update(verify_features(rows), resp.verify.compute_ms)
            self.costs.verify_overhead.update(1e3 * (end_t - start_t) - resp.verify.compute_ms)
        drafted_all, accepted_all, emitted_all = [], [], 0
        for r, v in zip(reqs, resp.verify.seqs):
            draft = r.drop_draft()
            drafted = len(draft.tokens) if draft else 0
            self._outcomes[r.seq_id] = (drafted, v.num_accepted, v.tokens[-1] if v.tokens else -1)
            emitted = r.seq.on_verified(drafted, v.num_accepted, list(v.tokens))
            emitted_all += len(emitted)
            drafted_all.append(drafted)
            accepted_all.append(v.num_accepted)
            if drafted:
                r.examined += min(drafted, v.num_accepted + 1)
            self._unhold([draft])
            if emitted and not r.cancelled:
                self._outbox.append((r.events, ("tokens", emitted)))
            if r.seq.finished:
                self._outbox.append((r.events, ("done", r.seq.finish_reason)))
        self.acceptance.observe_step(drafted_all, accepted_all)  # once per step: per sequence costs ms at batch 64
        self.metrics.verified_step(drafted_all, accepted_all, emitted_all)
        self.trace.step("verify", self.verifier.address, self.ticks, start_t - t0, end_t - t0, len(reqs),
                        resp.verify.compute_ms, prefills, drafted_all, accepted_all)

    # ---- start-up profile -----------------------------------------------------------------------------------------
    async def _profile(self, batch: int = 8, context: int = 64) -> None:
        """A few timed steps on made-up sequences before the first request, so the cost model starts from this
        deployment's own measurements: one prefill, verifies of 1 and k_max + 1 tokens per sequence and drafts of
        1 and k_max, each for 1, batch / 2 and `batch` sequences. Then everything is released."""
        vocab = min(self.verifier.info.vocab_size, self.drafter.info.vocab_size)
        rng = np.random.default_rng(0)
        ids = [f"__profile-{self.verifier.address}-{i}" for i in range(batch)]
        prompts = [rng.integers(1, vocab, context).tolist() for _ in ids]
        t = time.perf_counter()
        self._calls = []

        async def verify(n: int, q: int) -> None:
            v = pb.VerifyBatch()
            for i in range(n):
                v.seqs.add(seq_id=ids[i], start=context, tokens=prompts[i][-1:], drafts=prompts[i][:q - 1])
            resp = await self.verifier.step(pb.VerifierRequest(verify=v))
            self.costs.verify.update(verify_features([(context, q)] * n), resp.verify.compute_ms)

        async def draft(n: int, k: int) -> None:
            p = pb.ProposeBatch(transport="inline")
            for i in range(n):
                p.seqs.add(seq_id=ids[i], start=context, tokens=prompts[i][-1:], k=k)
            resp = await self.drafter.step(pb.DrafterRequest(propose=p))
            self.costs.draft.update(draft_features([(context, 1, k)] * n), resp.propose.compute_ms)

        pv, pd = pb.VerifyBatch(), pb.ProposeBatch(transport="inline")
        for i in ids:
            pv.seqs.add(seq_id=i, start=0, tokens=prompts[ids.index(i)] + [1])
            pd.seqs.add(seq_id=i, start=0, tokens=prompts[ids.index(i)] + [1], k=0)
        await asyncio.gather(self.verifier.step(pb.VerifierRequest(verify=pv)),
                             self.drafter.step(pb.DrafterRequest(propose=pd)))  # prefill: not decode-shaped, not fitted
        for n in (1, batch // 2, batch, batch // 2, 1):  # each shape twice: a first call may pay for warm-up
            for q in (1, self.k_max + 1):
                await verify(n, q)
            for k in (1, self.k_max):
                await draft(n, k)
        await self.verifier.step(pb.VerifierRequest(release=pb.Release(seq_ids=ids)))
        await self.drafter.step(pb.DrafterRequest(release=pb.Release(seq_ids=ids)))
        x1, xb = verify_features([(context, 1)]), verify_features([(context, 1)] * batch)
        log.info("lane %s: profiled in %.1f s: a verify forward costs %.1f ms for 1 sequence, %.1f ms for %d; a draft "
                 "forward %.1f / %.1f ms", self.verifier.address, time.perf_counter() - t, self.costs.verify.predict(x1),
                 self.costs.verify.predict(xb), batch, self.costs.draft.predict(x1), self.costs.draft.predict(xb))

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
                await self._renegotiate()
        except ServiceError:
            raise
        except (TimeoutError, Exception) as wait_exc:  # noqa: BLE001 - any failure here means: give up on them
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"verifier unavailable: {wait_exc}") from wait_exc
        finally:
            self._set_verifier_down(False)
        log.info("lane %s: re-prefilling %d running requests", self.verifier.address, self.running)
        self.releases.verifier_lost()
        for r in self.batches[0] + self.batches[1]:
            r.seq.reset_cache("target")

    async def _renegotiate(self) -> None:
        """The verifier is back (perhaps a new process): agree on the transport again. A drafter that does not answer
        the probe is lost as if its step had failed (target-only until it is back): the requests the verifier came
        back for must not fail for it. Its connection may have died in the same outage while it had nothing to do."""
        try:
            self.transport = await negotiate(self.drafter, self.verifier, self.cfg.transport)
        except ServiceError as exc:
            if exc.source != "drafter":
                raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"verifier unavailable: {exc}") from exc
            self._drafter_lost(exc)

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
            for draft in r.drop_drafts():  # they may be fine, but their probabilities died with the drafter
                if draft.probs is not None:
                    orphans[draft.buffer] = draft.probs
        self.releases.discards.extend(orphans.values())
        self._holders.clear()
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
