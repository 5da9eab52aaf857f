"""A router lane against the real drafter and verifier servicers, called in-process instead of over gRPC.

Same servicer code as in production, minus the sockets, so the schedule itself can be checked step by step: the
first PSD tick drafts synchronously and every later tick overlaps a verify with a draft of the other batch; new
requests are balanced across the two batches; admission respects the batch limit and the queue limit; cancellation
frees KV on both services; and all of it stays lossless.
"""

from __future__ import annotations

import asyncio

import pytest

from minedraft.config import ModelServiceConfig, RouterConfig
from minedraft.runtime.checkpoint import load_tokenizer
from minedraft.runtime.reference import generate as reference_generate, make_sequences
from minedraft.runtime.sampling import SamplingParams
from minedraft.runtime.sequence import Sequence
from minedraft.runtime.transport import leftover_segments
from minedraft.v1 import common_pb2, model_service_pb2 as pb
from services.drafter.servicer import DrafterService
from services.router.clients import ServiceError, _status
from services.router.lane import Lane
from services.router.policy import Choice
from services.router.request import QueueFull, Request
from services.router.trace import Trace
from services.verifier.servicer import VerifierService
from support import DRAFT, TARGET, chat



class InProcessClient:
    """Stands where services.router.clients.ModelClient stands, calling the servicer's step directly."""

    def __init__(self, service, kind):
        self.service, self.kind, self.address = service, kind, f"in-process-{kind}"
        self.owned: set[str] = set()
        a = service.model.arch
        self.info = pb.ModelInfo(model_name=kind, vocab_size=a.vocab_size, max_context=a.max_position,
                                 eos_token_ids=list(a.eos_token_ids), block_size=service.runner.cache.block_size,
                                 kv_capacity_tokens=service.runner.cache.num_blocks * service.runner.cache.block_size)

    async def step(self, request):
        await asyncio.sleep(0)  # let the other half of a tick start, as a real RPC would
        resp = self.service.step(request, self.owned)
        if resp.WhichOneof("kind") == "error":
            raise ServiceError(_status(resp.error.code), resp.error.message)
        return resp


@pytest.fixture(scope="module")
def services():
    d = DrafterService(ModelServiceConfig(model=DRAFT, kv_cache_tokens=32768))
    v = VerifierService(ModelServiceConfig(model=TARGET, kv_cache_tokens=32768))
    d.load()
    v.load()
    return d, v


@pytest.fixture(scope="module")
def prompts():
    tok = load_tokenizer(TARGET)
    texts = ["Hello there", "Write a haiku about rain", "What is 2 + 2?", "List three colours",
             "Explain gravity to a child in a few sentences", "Why is the sky blue?"]
    return [tok.encode(chat(t), add_special_tokens=False) for t in texts]


def make_lane(services, mode="psd", controller=None, **cfg):
    d, v = services
    cfg.setdefault("num_speculative_tokens", 3)
    return Lane(RouterConfig(mode=mode, **cfg), InProcessClient(v, "verifier"),
                InProcessClient(d, "drafter") if mode != "ar" else None, "inline", trace=Trace(keep=True),
                controller=controller)


def request_for(lane, i, ids, n, params=SamplingParams(), ignore_eos=True):
    seq = Sequence(f"r{i}", list(ids), params, n, lane.max_len, lane.eos_ids, ignore_eos)
    return Request(seq=seq, sampling=common_pb2.SamplingOptions(temperature=params.temperature))


async def drain(req):
    tokens = []
    while True:
        kind, value = await req.events.get()
        if kind == "tokens":
            tokens.extend(value)
        elif kind == "done":
            return tokens, value
        else:
            raise value


async def run_all(lane, reqs):
    lane.start()
    try:
        for r in reqs:
            lane.submit(r)
        return await asyncio.gather(*(drain(r) for r in reqs))
    finally:
        await lane.stop()


def assert_kv_free(services):
    for s in services:
        assert s.runner.cache.used_blocks == 0 and not s.params and s.exporter.live == 0, (s.role, s.runner.cache.seqs, s.params)


@pytest.mark.parametrize("mode", ["psd", "sd", "ar"])
def test_lossless_and_schedule(services, prompts, mode):
    lane = make_lane(services, mode)
    budgets = [12, 20, 7, 16, 9, 25]
    reqs = [request_for(lane, i, p, n) for i, (p, n) in enumerate(zip(prompts, budgets))]
    results = asyncio.run(run_all(lane, reqs))
    target = services[1].runner
    expected = reference_generate(target, make_sequences(prompts, SamplingParams(), budgets, lane.max_len,
                                                         ignore_eos=True))
    assert [toks for toks, _ in results] == [s.output for s in expected]
    assert all(reason == "length" for _, reason in results)

    rec = lane.trace.records
    ticks = [r for r in rec if r["kind"] == "tick"]
    by_tick = {t["tick"]: [r["kind"] for r in rec if r["kind"] in ("draft", "verify") and r["tick"] == t["tick"]]
               for t in ticks}
    if mode != "ar":
        # The drafter caches the prompts while the verifier prefills them: tick 0 holds both calls, and no later draft
        # call has to start a sequence from position 0.
        assert sorted(by_tick[0]) == ["draft", "verify"]
        assert all(r["prefill"] == 0 for r in rec if r["kind"] == "draft" and r["tick"] > 0)
    if mode == "psd":
        # All six arrive together: split 3/3; tick 0 prefills S (the drafter caches all six prompts meanwhile),
        # tick 1 prefills the other three while drafting S's, and from then on a tick verifies one batch while
        # drafting the other. Each request runs prefill, then draft and verify, whichever batch it joined.
        assert ticks[0]["verify_batch"] == 3 and ticks[0]["draft_batch"] == 3
        assert sorted(by_tick[1]) == ["draft", "verify"]
        # With both batches non-empty a tick is one verify overlapped with one draft; a synchronous draft first
        # happens only right after a batch emptied and the survivors were split in two (rebalance).
        both = [t["tick"] for t in ticks if t["tick"] >= 2 and t["draft_batch"] > 0]
        assert both and all(sorted(by_tick[k]) in (["draft", "verify"], ["draft", "draft", "verify"]) for k in both)
        assert sum(len(by_tick[k]) == 3 for k in both) <= 2, by_tick
    elif mode == "sd":
        assert all(t["draft_batch"] == 0 for t in ticks)
    else:
        assert all(kinds == ["verify"] for kinds in by_tick.values())
    assert_kv_free(services)


def test_batch_limit_and_queue_limit(services, prompts):
    lane = make_lane(services, "psd", max_batch_size=1, max_queue=3)
    reqs = [request_for(lane, i, prompts[i], 6) for i in range(5)]

    async def go():
        lane.start()
        try:
            for r in reqs[:3]:
                lane.submit(r)
            with pytest.raises(QueueFull):  # nothing admitted yet: the lane has not run
                for r in reqs[3:]:
                    lane.submit(r)
            await asyncio.sleep(0)
            outs = await asyncio.gather(*(drain(r) for r in reqs[:3]))
            return outs
        finally:
            await lane.stop()

    outs = asyncio.run(go())
    assert [len(t) for t, _ in outs] == [6, 6, 6]
    sizes = [(t["verify_batch"], t["draft_batch"]) for t in lane.trace.records if t["kind"] == "tick"]
    assert max(a for a, _ in sizes) <= 1 and max(b for _, b in sizes) <= 1
    assert_kv_free(services)


def test_cancel_frees_both_services(services, prompts):
    lane = make_lane(services, "psd")
    reqs = [request_for(lane, i, prompts[i], 400) for i in range(4)]

    async def go():
        lane.start()
        try:
            for r in reqs:
                lane.submit(r)
            first = await reqs[0].events.get()
            assert first[0] == "tokens"
            for r in reqs:
                r.cancel()
            reasons = []
            for r in reqs:
                while (ev := await r.events.get())[0] != "done":
                    pass
                reasons.append(ev[1])
            while lane.running or lane.releases:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            return reasons
        finally:
            await lane.stop()

    assert asyncio.run(go()) == ["cancelled"] * 4
    assert_kv_free(services)


def test_sampled_requests_carry_draft_probabilities(services, prompts):
    lane = make_lane(services, "psd")
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=11)
    reqs = [request_for(lane, i, prompts[i], 15, params) for i in range(4)]
    for r in reqs:
        r.sampling = common_pb2.SamplingOptions(temperature=0.8, top_p=0.9, seed=11)
    results = asyncio.run(run_all(lane, reqs))
    assert all(len(t) == 15 for t, _ in results)
    assert sum(r.seq.drafted for r in reqs) > 0
    # Same prompt + seed in one batch would give the same tokens; different prompts need not.
    assert_kv_free(services)


def test_cancelling_one_sampled_request_leaves_its_batch_mates_intact(services, prompts):
    """psd over shared memory: the draft probabilities of a whole batch travel in one segment. Cancelling one request
    must not release that segment while its batch mates' verification (running concurrently with the next draft
    step, which carries releases) still has to read it; the others finish exactly as without the cancellation."""
    d, v = services
    v.importer.trust(d.instance_id)  # what transport negotiation does

    def lane_and_requests():
        lane = make_lane(services, "psd")
        lane.transport = "shm"
        reqs = []
        for i in range(4):
            params = SamplingParams(temperature=0.9, seed=100 + i)
            seq = Sequence(f"c{i}", list(prompts[i]), params, 60, lane.max_len, lane.eos_ids, True)
            reqs.append(Request(seq=seq, sampling=common_pb2.SamplingOptions(temperature=0.9, seed=100 + i)))
        return lane, reqs

    lane, reqs = lane_and_requests()
    clean = asyncio.run(run_all(lane, reqs))

    async def cancel_one():
        lane, reqs = lane_and_requests()
        lane.start()
        try:
            for r in reqs:
                lane.submit(r)
            for _ in range(3):  # a few ticks in, while drafts are in flight
                assert (await reqs[0].events.get())[0] == "tokens"
            reqs[0].cancel()
            return await asyncio.gather(*(drain(r) for r in reqs[1:]))
        finally:
            await lane.stop()

    assert asyncio.run(cancel_one()) == clean[1:]
    assert not leftover_segments(d.instance_id)


class ScriptedController:
    """Stands where policy.Controller stands: forces a switch of schedule and k at every tick, through every
    combination, so that each schedule follows each other one with requests mid-generation."""

    fixed, predicted, explored = None, 0.0, False

    def __init__(self, k_max=4):
        cycle = ("psd", "ahead", "sd", "ar", "ahead", "psd", "sd")
        self.plan = [Choice(cycle[i % 7], 0 if cycle[i % 7] == "ar" else 1 + i % k_max) for i in range(7 * k_max)]
        self.ticks = 0

    def choose(self, view, costs, drafter=True, n=None):
        self.ticks += 1
        return self.plan[self.ticks % len(self.plan)] if drafter else Choice("ar")

    def observe(self, choice, ms, ticks=1, predicted_ms=None, n=None):
        pass


@pytest.mark.parametrize("mode", ["auto", "ahead", "switching"])
def test_auto_ahead_and_forced_switches_are_lossless(services, prompts, mode):
    """Greedy output equals target-only decoding whatever the lane chooses each tick: auto, draft-ahead pinned, or a
    switch of schedule and k at every tick (drafts made under one schedule are verified under the next; a draft
    made ahead is used or dropped; batches merge and split). Nothing stays held on either service."""
    lane = make_lane(services, "auto" if mode == "switching" else mode, max_speculative_tokens=4,
                     controller=ScriptedController() if mode == "switching" else None)
    budgets = [12, 20, 7, 16, 9, 25]
    reqs = [request_for(lane, i, p, n) for i, (p, n) in enumerate(zip(prompts, budgets))]
    results = asyncio.run(run_all(lane, reqs))
    expected = reference_generate(services[1].runner, make_sequences(prompts, SamplingParams(), budgets, lane.max_len,
                                                                      ignore_eos=True))
    assert [toks for toks, _ in results] == [s.output for s in expected]
    choices = {t["choice"] for t in lane.trace.records if t["kind"] == "tick"}
    if mode == "switching":
        assert {c.split("/")[0] for c in choices} == {"ar", "sd", "psd", "ahead"} and len(choices) >= 7, choices
    if mode != "auto":
        assert lane.ahead_hits > 0 and lane.ahead_misses > 0  # both outcomes of a draft made ahead happened
    ticks = [t for t in lane.trace.records if t["kind"] == "tick"]  # and the trace counts each of them
    assert sum(t.get("ahead_hits", 0) for t in ticks) == lane.ahead_hits
    assert sum(t.get("ahead_misses", 0) for t in ticks) == lane.ahead_misses
    assert_kv_free(services)


def test_draft_ahead_drafts_the_misses_while_it_verifies_the_others(services, prompts):
    """Pinned draft-ahead with several requests: where some requests' drafts made ahead missed, the tick verifies the
    others (drafting ahead for them) while the drafter drafts the missed ones afresh, in one call; they are verified
    next tick. A re-draft before the verify happens only when nothing else could be verified. Lossless, and nothing
    stays held."""
    lane = make_lane(services, "ahead", num_speculative_tokens=4)
    budgets = [40, 33, 28, 36]
    reqs = [request_for(lane, i, p, n) for i, (p, n) in enumerate(zip(prompts, budgets))]
    results = asyncio.run(run_all(lane, reqs))
    expected = reference_generate(services[1].runner, make_sequences(prompts[:4], SamplingParams(), budgets,
                                                                      lane.max_len, ignore_eos=True))
    assert [toks for toks, _ in results] == [s.output for s in expected]
    calls: dict[int, list[dict]] = {}
    for r in lane.trace.records:
        if r["kind"] != "tick":
            calls.setdefault(r["tick"], []).append(r)
    ticks = [t for t in lane.trace.records if t["kind"] == "tick"]
    pipelined = [t for t in ticks if t["draft_batch"] and t["verify_batch"]]
    assert len(pipelined) >= 5, ticks  # misses drafted beside the others' verification
    for t in pipelined:
        assert sum(c["kind"] == "draft" for c in calls[t["tick"]]) == 1  # one draft call: fresh drafts and ahead
    for t in ticks:
        if sum(c["kind"] == "draft" for c in calls[t["tick"]]) == 2:  # drafted first: everyone is verified then
            assert t["draft_batch"] == 0, t
    assert lane.ahead_hits > 0 and lane.ahead_misses > 0
    assert_kv_free(services)


def test_switching_schedules_with_sampled_requests_over_shm(services, prompts):
    """Sampled requests while the schedule switches every tick: draft probabilities of one verify come from several
    draft steps (separate shm buffers), drafts made ahead are kept or dropped; every request finishes and every
    buffer is released."""
    d, v = services
    v.importer.trust(d.instance_id)
    lane = make_lane(services, "auto", max_speculative_tokens=4, controller=ScriptedController())
    lane.transport = "shm"
    reqs = []
    for i in range(4):
        params = SamplingParams(temperature=0.9, seed=100 + i)
        seq = Sequence(f"w{i}", list(prompts[i]), params, 40, lane.max_len, lane.eos_ids, True)
        reqs.append(Request(seq=seq, sampling=common_pb2.SamplingOptions(temperature=0.9, seed=100 + i)))
    results = asyncio.run(run_all(lane, reqs))
    assert all(len(t) == 40 for t, _ in results)
    assert sum(r.seq.drafted for r in reqs) > 0
    assert_kv_free(services)
    assert not leftover_segments(d.instance_id)
