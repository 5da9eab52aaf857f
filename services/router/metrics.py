"""The router's Prometheus metrics (`GET /metrics` on the HTTP port), under vLLM's names and meanings, so dashboards
and alerts written for vLLM (and SGLang, which copies them) work unchanged: prefix `vllm:`, label `model_name`.
What vLLM has no name for is `minedraft:`: the schedule a lane runs, and each model service's own state.

Who feeds what:
- the request path (services/router/frontend.py) times each request: TTFT, inter-token gaps, end-to-end, queue,
  prefill and decode time, prompt tokens, finished requests by reason, rejections;
- each lane reports through its `LaneMetrics`, three hooks and nothing else: `tick(schedule, k)` once per tick (the
  schedule that tick ran: ar / sd / psd / ahead, fixed or picked per tick by the adaptive controller),
  `verified_step(drafts, accepted, emitted)` once per verify step (per sequence the drafts checked and accepted,
  and the tokens committed in all), which counts generated tokens and vLLM's speculative-decoding counters exactly
  as the target committed them, and `drafted_ahead(hits, misses)` once per draft-ahead tick (drafts made ahead that
  were used, and discarded: the share used is what draft-ahead's latency gain rests on);
- gauges of the present (requests running / waiting, KV use, the schedule in use, every replica's state) are read
  when scraped, from the replica pool and from each model service.

Why the model services' compute time, KV blocks and busy fraction come through the router instead of an HTTP
endpoint of their own: the services speak gRPC only, on one port that mutual TLS can close to everyone but the
router (their Session and ProbeTransport trust their caller), and their replicas come and go with DNS, which the
router already follows. A metrics port per replica would be a second, unauthenticated surface on each of them and a
second discovery problem for Prometheus. So a scrape asks every replica for its GetModelInfo (concurrently, answered
on the service's event loop, not its step thread, ~1 ms) and exposes it labelled `role` and `replica`; a replica that
does not answer reads `minedraft:replica_up 0`. One scrape target, one auth story.

The metrics own their state (a registry of their own, not prometheus_client's global one); nothing here changes what
the lanes or requests do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from services.router.acceptance import prefix_counts
from services.router.policy import SCHEDULES

if TYPE_CHECKING:
    from services.router.request import Request


class Pool(Protocol):
    """What the metrics read from the replica pool (ReplicaPool), declared here so that metrics, a lower layer, does
    not import the pool that owns it."""
    max_len: int

    async def status(self, timeout_s: float) -> list: ...

    def live_lanes(self) -> list: ...

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST

# vLLM's buckets (vllm/v1/metrics/loggers.py), with finer ones below 10 ms where a CPU or GPU step lands.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
LATENCY_BUCKETS = [0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
FINISHED_REASONS = ("stop", "length", "abort", "error")  # vLLM's, plus error: the request failed on our side


def token_buckets(max_len: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to the context length (vLLM's build_1_2_5_buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_len:
                return out
            out.append(float(m * scale))
        scale *= 10


def finished_reason(reason: str) -> str:
    """Our finish reasons as vLLM names them: eos and stop strings are both `stop`; a client gone is `abort`."""
    return {"stop": "stop", "stop_string": "stop", "length": "length", "cancelled": "abort"}.get(reason, "error")


class LaneMetrics:
    """One lane's hooks. A lane calls `tick` once per tick, `verified_step` once per verify step and `drafted_ahead`
    once per draft-ahead tick; each is a few dictionary lookups and additions. `LaneMetrics()` (no Metrics) records nothing: a lane built without a router
    (the scheduler tests) gets that."""

    def __init__(self, metrics: "Metrics | None" = None, schedule: str = ""):
        self._m = metrics
        # of the last tick; until the first, the configured mode if it is a schedule ('' for auto: not counted)
        self.schedule = schedule if schedule in SCHEDULES else ""
        self.k = 0  # drafts per sequence the last tick asked for (0 when it did not speculate)
        self._cached: dict | None = None

    def tick(self, schedule: str, k: int) -> None:
        """A tick ran `schedule` with up to `k` drafts per sequence."""
        self.schedule, self.k = schedule, k if schedule != "ar" else 0
        if self._m is not None:
            self._m.schedule_ticks.labels(self._m.model_name, schedule).inc()

    def drafted_ahead(self, hits: int, misses: int) -> None:
        """A draft-ahead tick's outcome: `hits` sequences whose drafts made ahead were used (the whole pending draft
        accepted and the target's token guessed), `misses` whose drafts were discarded (re-drafted next tick)."""
        if self._m is not None:
            c = self._children()
            c["ahead_hit"].inc(hits)
            c["ahead_miss"].inc(misses)

    def verified_step(self, drafts: list[int], accepted: list[int], emitted: int) -> None:
        """One verify step: per sequence the drafts checked and accepted, and the tokens committed in all. Counted
        once per step, not per sequence: at batch 64 the per-sequence label lookups cost the event loop ~2 ms a tick."""
        m = self._m
        if m is None:
            return
        c = self._children()
        c["generation"].inc(emitted)
        checked = [(d, a) for d, a in zip(drafts, accepted) if d]
        if not checked:
            return
        c["drafts"].inc(len(checked))
        c["draft_tokens"].inc(sum(d for d, _ in checked))
        c["accepted"].inc(sum(a for _, a in checked))
        accepted_lens = [a for _, a in checked]  # acceptance is a prefix: positions 0 .. a - 1
        for pos, n in enumerate(prefix_counts(accepted_lens, max(accepted_lens))):
            c["per_pos"](pos).inc(int(n))

    def _children(self) -> dict:
        """The labelled counters, looked up once."""
        if self._cached is None:
            m, name = self._m, self._m.model_name
            per_pos: dict[int, object] = {}

            def pos_child(pos: int):
                if pos not in per_pos:
                    per_pos[pos] = m.spec_accepted_per_pos.labels(name, str(pos))
                return per_pos[pos]

            self._cached = {"generation": m.generation_tokens.labels(name), "drafts": m.spec_drafts.labels(name),
                            "draft_tokens": m.spec_draft_tokens.labels(name),
                            "accepted": m.spec_accepted.labels(name), "per_pos": pos_child,
                            "ahead_hit": m.draft_ahead.labels(name, "hit"),
                            "ahead_miss": m.draft_ahead.labels(name, "miss")}
        return self._cached


class Metrics:
    """Every metric the router exposes, in a registry of its own. `attach` gives it the pool to read gauges from;
    `render` is one scrape."""

    def __init__(self):
        prometheus_client.disable_created_metrics()  # as vLLM does: no `_created` twin of every counter
        self.registry = CollectorRegistry()
        self.model_name = ""
        self.pool: Pool | None = None
        self._replicas: list = []  # the last scrape's ReplicaStatus rows
        r, m = self.registry, ["model_name"]
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefilled prompt tokens (counted at the first token).",
                                     m, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens the target committed.", m, registry=r)
        self.request_success = Counter("vllm:request_success", "Finished requests by finish reason (stop: EOS or a "
                                       "stop string; length; abort: the client went away; error).",
                                       m + ["finished_reason"], registry=r)
        self.rejected = Counter("minedraft:requests_rejected", "Requests refused before they ran, by status (400 "
                                "INVALID_ARGUMENT, 429 RESOURCE_EXHAUSTED, 503 UNAVAILABLE, ...).", m + ["code"],
                                registry=r)
        self.spec_drafts = Counter("vllm:spec_decode_num_drafts", "Drafts verified (one per sequence per verify step "
                                   "that checked drafts).", m, registry=r)
        self.spec_draft_tokens = Counter("vllm:spec_decode_num_draft_tokens", "Draft tokens verified.", m, registry=r)
        self.spec_accepted = Counter("vllm:spec_decode_num_accepted_tokens", "Draft tokens the target accepted.", m,
                                     registry=r)
        self.spec_accepted_per_pos = Counter("vllm:spec_decode_num_accepted_tokens_per_pos", "Accepted draft tokens "
                                             "by position in the draft (0 = first).", m + ["position"], registry=r)
        self.schedule_ticks = Counter("minedraft:schedule_ticks", "Lane ticks by the schedule they ran (ar, sd, psd, "
                                      "ahead).", m + ["schedule"], registry=r)
        self.draft_ahead = Counter("minedraft:draft_ahead", "Drafts made ahead (draft-ahead), per sequence, by outcome: "
                                   "hit (used: the whole pending draft was accepted and the target's next token "
                                   "guessed) or miss (discarded and re-drafted).", m + ["outcome"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Arrival to the first token out.", m,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Gap between successive outputs of a request (one per"
                             " verify step: a step's several accepted tokens count once, as in vLLM).", m,
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival to the last token.", m,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("vllm:request_queue_time_seconds", "Arrival to joining a batch.", m,
                               buckets=LATENCY_BUCKETS, registry=r)
        self.prefill = Histogram("vllm:request_prefill_time_seconds", "Joining a batch to the first token.", m,
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.decode = Histogram("vllm:request_decode_time_seconds", "First token to the last.", m,
                                buckets=LATENCY_BUCKETS, registry=r)
        self.registry.register(_Live(self))
        self._token_histograms: tuple[Histogram, Histogram, Histogram] | None = None

    def attach(self, pool: Pool, model_name: str, k: int) -> None:
        """Serve `model_name` from `pool`: series that always exist (zero counts included) are created now, so a
        dashboard's rates start from 0 rather than from the first event."""
        self.pool, self.model_name = pool, model_name
        buckets = token_buckets(max(pool.max_len, 1))
        r, m = self.registry, ["model_name"]
        self._token_histograms = (
            Histogram("vllm:request_prompt_tokens", "Prompt length of finished requests.", m, buckets=buckets,
                      registry=r),
            Histogram("vllm:request_generation_tokens", "Generated tokens of finished requests.", m, buckets=buckets,
                      registry=r),
            Histogram("vllm:request_params_max_tokens", "max_tokens of finished requests.", m, buckets=buckets,
                      registry=r))
        for metric in (self.prompt_tokens, self.generation_tokens, self.spec_drafts, self.spec_draft_tokens,
                       self.spec_accepted, self.ttft, self.itl, self.e2e, self.queue, self.prefill, self.decode,
                       *self._token_histograms):
            metric.labels(model_name)
        for reason in FINISHED_REASONS:
            self.request_success.labels(model_name, reason)
        for pos in range(k):
            self.spec_accepted_per_pos.labels(model_name, str(pos))
        for schedule in SCHEDULES:
            self.schedule_ticks.labels(model_name, schedule)
        for outcome in ("hit", "miss"):
            self.draft_ahead.labels(model_name, outcome)

    def lane(self, schedule: str) -> LaneMetrics:
        return LaneMetrics(self, schedule)

    # ---- the request path -----------------------------------------------------------------------------------------
    def rejected_request(self, code: str) -> None:
        self.rejected.labels(self.model_name, code).inc()

    def first_token(self, req: "Request", now: float) -> None:
        self.ttft.labels(self.model_name).observe(now - req.arrived)
        self.prompt_tokens.labels(self.model_name).inc(len(req.seq.prompt))

    def next_token(self, gap_s: float) -> None:
        self.itl.labels(self.model_name).observe(gap_s)

    def finished(self, req: "Request", reason: str, first_token_at: float | None, now: float,
                 completion_tokens: int) -> None:
        """A request ended (`reason` as the lane or the stop strings gave it, or `cancelled` / `error`)."""
        name = self.model_name
        self.request_success.labels(name, finished_reason(reason)).inc()
        self.e2e.labels(name).observe(now - req.arrived)
        if req.admitted is not None:
            self.queue.labels(name).observe(req.admitted - req.arrived)
            if first_token_at is not None:
                self.prefill.labels(name).observe(first_token_at - req.admitted)
        if first_token_at is not None:
            self.decode.labels(name).observe(now - first_token_at)
        if self._token_histograms is not None:
            prompt, generation, max_tokens = self._token_histograms
            prompt.labels(name).observe(len(req.seq.prompt))
            generation.labels(name).observe(completion_tokens)
            max_tokens.labels(name).observe(req.seq.max_new_tokens)

    # ---- a scrape -------------------------------------------------------------------------------------------------
    async def render(self) -> bytes:
        """The text exposition, after asking every replica for its state (each with a short deadline)."""
        if self.pool is not None:
            self._replicas = await self.pool.status(timeout_s=1.0)
        return generate_latest(self.registry)


class _Live:
    """The gauges of the present, computed when scraped: requests running and waiting, KV use, schedules, replicas."""

    def __init__(self, metrics: Metrics):
        self.m = metrics

    def collect(self):
        m, pool = self.m, self.m.pool
        if pool is None:
            return
        name = [m.model_name]
        lanes = pool.live_lanes()
        running = GaugeMetricFamily("vllm:num_requests_running", "Requests in a batch (being decoded).",
                                    labels=["model_name"])
        running.add_metric(name, sum(e.running for e in lanes))
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Requests queued for a batch.", labels=["model_name"])
        waiting.add_metric(name, sum(len(e.waiting) for e in lanes))
        verifiers = [r for r in m._replicas if r.role == "verifier" and r.live]
        kv = GaugeMetricFamily("vllm:kv_cache_usage_perc", "Target KV cache in use, 0 to 1 (1 = full), over every "
                               "verifier replica.", labels=["model_name"])
        kv.add_metric(name, sum(r.kv_blocks_in_use for r in verifiers) / max(sum(r.kv_blocks_total
                                                                                  for r in verifiers), 1))
        yield from (running, waiting, kv)

        schedule = GaugeMetricFamily("minedraft:schedule", "Lanes whose last tick ran this schedule (one lane: 1 for "
                                     "the schedule in use, 0 for the others).", labels=["model_name", "schedule"])
        counts = dict.fromkeys(SCHEDULES, 0)
        for e in lanes:
            if e.metrics.schedule:
                counts[e.metrics.schedule] = counts.get(e.metrics.schedule, 0) + 1
        for s, n in counts.items():
            schedule.add_metric(name + [s], n)
        k = GaugeMetricFamily("minedraft:lane_num_speculative_tokens", "Drafts per sequence a lane's last tick asked "
                              "for (0: target only).", labels=["model_name", "lane"])
        for e in lanes:
            k.add_metric(name + [e.verifier.address], e.metrics.k)
        yield from (schedule, k)

        labels = ["model_name", "role", "replica"]
        up = GaugeMetricFamily("minedraft:replica_up", "1 if the model service answered this scrape.", labels=labels)
        in_use = GaugeMetricFamily("minedraft:kv_blocks_in_use", "KV cache blocks in use on a model service.",
                                   labels=labels)
        total = GaugeMetricFamily("minedraft:kv_blocks_total", "KV cache blocks of a model service.", labels=labels)
        seqs = GaugeMetricFamily("minedraft:active_sequences", "Sequences a model service holds state for.",
                                 labels=labels)
        busy = CounterMetricFamily("minedraft:busy_seconds", "Seconds a model service spent computing steps since it "
                                   "started (its compute time).", labels=labels)
        fraction = GaugeMetricFamily("minedraft:busy_fraction", "Share of the last 10 s a model service spent "
                                     "computing.", labels=labels)
        for r in m._replicas:
            key = [r.model, r.role, r.address]
            up.add_metric(key, 1 if r.live else 0)
            if r.live:
                in_use.add_metric(key, r.kv_blocks_in_use)
                total.add_metric(key, r.kv_blocks_total)
                seqs.add_metric(key, r.active_sequences)
                busy.add_metric(key, r.busy_seconds)
                fraction.add_metric(key, r.busy_fraction)
        yield from (up, in_use, total, seqs, busy, fraction)


__all__ = ["CONTENT_TYPE", "LaneMetrics", "Metrics", "finished_reason", "token_buckets"]
