"""Which schedule and how many drafts, each tick: the choice that maximizes predicted generated tokens per second.

Schedules (what one tick of a lane does with its running requests):
  ar     verify everyone, no drafts: one target step per token; best when drafting costs more than it saves
  sd     draft k for everyone, then verify: standard speculative decoding, one batch
  psd    two batches, one verified while the other is drafted (MineDraft): a tick costs max(T_draft, T_verify)
  ahead  one batch; while it is verified, the drafter drafts its next k tokens assuming every draft is accepted
         (PEARL's post-verify); where the outcome matches, the next tick needs no draft step: the drafter's idle time
         during verification turns into latency at low load. Where it does not, the request is drafted afresh while
         the others are verified (a pipeline: the verifier never waits for a re-draft while anyone holds drafts)
For each, `throughput` predicts tokens per second from the cost model (costs.py) and the acceptance estimates
(acceptance.py). The Controller picks the best, but keeps its current choice unless another is predicted to be
`margin` better (twice that for another schedule not measured yet, whose first tick costs more and whose score is the
cost model's alone; so noise in the estimates cannot make it oscillate), and now and then explores a neighbour (k +-
1, or another schedule at the same k), so that a wrong estimate, such as the acceptance of a position never drafted,
gets corrected by measurement. What the cost model cannot see (the router's and the client's own CPU on a shared
machine, a schedule's extra calls) is corrected by measurement too: each choice's prediction is scaled by the ratio of
the time its ticks were predicted to take to what they took (the median over its first 20 ticks, so a few ticks
correct it and one slow tick does not, then a running mean). The ratio is kept per choice and batch-size bucket
(corrections.py), because how a tick grows with k is what the cost model gets most wrong when both services compute at
once on shared cores (the demo pair at 8 concurrent on 2 cores: psd/k=6 was predicted best, psd/k=4 measured 1.24x
faster); a choice not yet measured borrows the ratio of its schedule's nearest measured k, else its schedule's.
Because a ratio is only learnt for a choice that runs, the lane probes: after its first `every` ticks, each other
schedule whose best k is predicted within `probe_within` of the best runs a few ticks (`probe_ticks`, the first of
which does not count), and after `reprobe` ticks, then twice and four times that, ... one still measured on few ticks
runs again if its corrected score is within `reprobe_within` of the best (probes are paid for inside the run: a
150-tick benchmark run of the first controller spent 25-36% of its time on them, most on schedules measured ~2x slower
per tick); and once the current choice is measured, its k - 1 and k + 1 are measured too (a hill climb on measured
ticks, each neighbour once). Probes are paid for out of a budget: each is charged its predicted time times its
shortfall against the current choice, and then what its ticks took beyond their predicted time (a probe of a
schedule the cost model overrates costs more than it was charged for); together they stay within `probe_budget` of
the time the lane has run, so a neighbour rated nearly as good is measured at once and a schedule rated far worse
waits until the lane has run long enough to pay for it (the real pair's ticks are seconds: a first round of probes
took 42-44% of a 40-tick run).
So a model that overrates speculation (a compute-bound target whose verify grows with every token) cannot keep auto
off target-only decoding for good, and one unlucky probe cannot rule a schedule out. A
change of schedule also waits `dwell` ticks after the previous one: under arrival-driven load the batch changes every
few ticks, and each switch costs a non-overlapped first tick. And the schedule is chosen by each schedule's edge
averaged over the last ~`dwell` ticks, not by the latest score: under turnover the batch swings by a request every
few ticks (4, 4, 4, 3, ... at 4 concurrent), the best schedule swings with it, and following each swing changed
the schedule once a dwell (k still follows the latest score at once: a change of k costs nothing). A batch grown or
shrunk `lasting` times (a burst after a quiet spell, a drained wave) is a lasting change: the mean restarts there.
Pure: no servers (tests/test_policy.py).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from services.router.acceptance import all_accepted, expected_tokens
from services.router.corrections import Corrections, bucket
from services.router.costs import CostModel

SCHEDULES = ("ar", "sd", "psd", "ahead")


@dataclass(frozen=True)
class Choice:
    schedule: str
    k: int = 0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; one of {SCHEDULES}")
        if (self.schedule == "ar") != (self.k == 0):
            raise ValueError(f"{self.schedule} with k={self.k}: ar takes k=0, the others k >= 1")

    def __str__(self) -> str:
        return self.schedule if self.schedule == "ar" else f"{self.schedule}/k={self.k}"


@dataclass
class LaneView:
    """What the controller needs to know of a lane's running requests."""

    contexts: np.ndarray  # [n] tokens each request has cached on the verifier (its context length)
    alphas: np.ndarray  # [n, k_max] each request's estimated acceptance per draft position

    @property
    def n(self) -> int:
        return len(self.contexts)


Shape = tuple[float, float, int]  # (sequences, their summed cached lengths, tokens or drafts each)


def tick_ms(costs: CostModel, verified: Shape, first: Sequence[Shape] = (), overlapped: Sequence[Shape] = ()) -> float:
    """The cost model's time of one tick that ran these shapes: a draft call made `first` (sd's draft, draft-ahead's
    re-draft when it has nothing else to verify, psd's first tick), then a verify and, overlapped with it, another
    draft call (psd's other batch; draft-ahead's drafts ahead and, beside them, the drafts of the requests that
    missed). A draft call is given as its groups of sequences, each drafting its own number of tokens. `cycle` builds
    a schedule's expected ticks from it; the lane prices the tick that ran with it, so that a correction does not
    learn how one tick's shapes differed from the average (psd's batches unequal while a wave drains, draft-ahead's
    misses)."""
    return costs.draft_call_ms(first) + max(costs.verify_ms(*verified), costs.draft_call_ms(overlapped)) + \
        costs.tick_overhead.value


def cycle(choice: Choice, view: LaneView, costs: CostModel, yields: np.ndarray | None = None,
          hits: np.ndarray | None = None) -> tuple[float, float, int]:
    """(expected tokens, ms, ticks) of one cycle of `choice` on these requests: a tick, or psd's two (one per batch).
    `yields` [n, k_max + 1] and `hits` [n, k_max] (expected tokens per verification and draft-ahead hit probability
    per k) may be passed in when many choices are scored at once. Step costs come from sums over the requests
    (costs.CostModel.*_ms)."""
    n, k = view.n, choice.k
    if n == 0:
        return 0.0, 1.0, 1
    ctx = view.contexts
    total, over = float(ctx.sum()), costs.tick_overhead.value
    if choice.schedule == "ar":
        return float(n), tick_ms(costs, (n, total, 1)), 1
    tokens_each = (yields if yields is not None else expected_tokens(view.alphas, k))[:, k]
    tokens = float(tokens_each.sum())
    if choice.schedule == "sd" or (choice.schedule == "psd" and n < 2):
        return tokens, tick_ms(costs, (n, total, k + 1), first=[(n, total, k)]), 1
    if choice.schedule == "psd":  # two ticks, each verifying one half while the other is drafted
        a, b = ((n + 1) // 2, total * ((n + 1) // 2) / n), (n // 2, total * (n // 2) / n)
        return tokens, tick_ms(costs, (*a, k + 1), overlapped=[(*b, k)]) + \
            tick_ms(costs, (*b, k + 1), overlapped=[(*a, k)]), 2
    # ahead: a verified request's next k drafts (after a guess of the target's next token) are made during its
    # verification and used where they hit (probability h: all k accepted and the guess right).
    hit = hits[:, k - 1] if hits is not None else all_accepted(view.alphas, k)
    if n == 1:  # a miss re-drafts before the next verify: nothing else could be verified meanwhile
        t_miss = (1.0 - float(hit[0])) * costs.draft_ms(1, total, k)
        return tokens, max(costs.verify_ms(1, total, k + 1), costs.draft_ms(1, total + k, k + 1)) + t_miss + over, 1
    # Several: a request that missed is drafted while the others are verified, and verified a tick later, so in the
    # long run each is verified in f = 1 / (2 - h) of the ticks (a two-state chain: verified -> verified with
    # probability h, else drafted -> verified). All missing at once, the tick re-drafts them first.
    f = 1.0 / (2.0 - hit)
    nv, ctx_v = float(f.sum()), float((f * ctx).sum())
    drafts = costs.draft_call_ms([(nv, ctx_v + nv * k, k + 1), (n - nv, total - ctx_v, k)])
    t_stall = float(np.prod(1.0 - f)) * costs.draft_ms(n, total, k)
    return float((f * tokens_each).sum()), max(costs.verify_ms(nv, ctx_v, k + 1), drafts) + t_stall + over, 1


def throughput(choice: Choice, view: LaneView, costs: CostModel, yields: np.ndarray | None = None,
               hits: np.ndarray | None = None) -> float:
    """Predicted generated tokens per second of running `choice` on these requests."""
    tokens, ms, _ = cycle(choice, view, costs, yields, hits)
    return 1e3 * tokens / ms


def cycles(view: LaneView, costs: CostModel, candidates: list[Choice]) -> dict[Choice, tuple[float, float, int]]:
    """`cycle` of every candidate. The expected tokens per verification and the draft-ahead hit probabilities are
    computed once for every k."""
    k_max = max(c.k for c in candidates)
    yields = expected_tokens(view.alphas, k_max)
    padded = np.concatenate([view.alphas, view.alphas[:, -1:]], axis=1)  # the guess past the last position
    hits = np.cumprod(padded, axis=1)[:, 1:k_max + 1]
    return {c: cycle(c, view, costs, yields, hits) for c in candidates}


def ranked(view: LaneView, costs: CostModel, candidates: list[Choice]) -> list[tuple[float, Choice]]:
    return sorted(((1e3 * tokens / ms, c) for c, (tokens, ms, _) in cycles(view, costs, candidates).items()),
                  key=lambda tc: -tc[0])


def measures_steady_cost(prefills: int, running: int) -> bool:
    """Whether a tick that prefilled `prefills` prompts among `running` requests tells what its schedule costs.
    Steady turnover's few prefills do: how a schedule absorbs them is part of its cost (in psd the other batch keeps
    drafting; in sd and ahead every running request waits), and under heavy turnover such ticks are most of the time
    (68% at 64 concurrent, 64-token answers, on the demo pair), so leaving them out left probes with nothing to
    measure. A burst, more than a quarter of the running requests prefilling (a lane's start, a wave of arrivals),
    does not: counted, lane-start prefills set psd's correction to 0.36 at 16 concurrent."""
    return 4 * prefills <= running


def candidates(k_max: int, schedules: tuple[str, ...] = SCHEDULES) -> list[Choice]:
    return [Choice(s, 0 if s == "ar" else k) for s in schedules for k in ([0] if s == "ar" else range(1, k_max + 1))]


class Controller:
    """Per-lane chooser. `fixed` pins one choice (the fixed modes); otherwise it decides as the module says,
    re-scoring every choice when the batch changes size and every `every` ticks otherwise (a score of every choice
    costs about a millisecond; a tick can be a few). `explore` is the share of ticks spent trying a neighbour."""

    def __init__(self, k_max: int, schedules: tuple[str, ...] = SCHEDULES, fixed: Choice | None = None,
                 margin: float = 0.05, explore: float = 0.02, explore_ticks: int = 3, every: int = 8, seed: int = 0,
                 probe_within: float = 0.6, probe_ticks: int = 4, reprobe: int = 64, reprobe_within: float = 0.9,
                 dwell: int = 8, weight: float = 0.05, min_own: int = 3, lasting: float = 4.0,
                 probe_budget: float = 0.08):
        self.fixed, self.margin, self.explore, self.every, self.weight = fixed, margin, explore, every, weight
        self.explore_ticks = explore_ticks  # an exploration holds its choice this many ticks: the first is not steady
        self.probe_within, self.probe_ticks, self.reprobe, self.dwell = probe_within, probe_ticks, reprobe, dwell
        self.reprobe_within, self.lasting, self.probe_budget = reprobe_within, lasting, probe_budget
        self._lived_ms = self._spent_ms = 0.0  # measured tick time so far; what probes cost of it
        self._budgeted: Choice | None = None  # the probe running now, paid for out of the budget
        self._budgeted_ms = 0.0  # the time per tick it was charged for (its corrected prediction)
        self._ref_n = 0  # the batch size when the edges were last reset (`_follow`)
        self._rounds = 0  # rounds of probes so far: the gap to the next doubles each time
        self._exploring: Choice | None = None
        self._explore_left = 0
        self._probes: list[Choice] = []  # choices to measure next, a few ticks each
        self._lived, self._next_probe = 0, every  # ticks so far; when the next round of probes is due
        self._since_switch = 0  # ticks since `current` last changed schedule
        # Predicted / measured tick time, per choice and batch-size bucket (corrections.py).
        self.corrections = Corrections(weight, min_own)
        self._climbed: set[tuple[Choice, int]] = set()  # (neighbour, bucket) of a current choice already probed
        self._last, self._run = Choice("ar"), 0  # the last choice returned and how many ticks its schedule has run
        self.options = candidates(k_max, schedules)
        self.current: Choice | None = fixed
        self.predicted = 0.0  # tokens/s the current choice is predicted to give
        self.explored = False  # the last choice was an exploration
        self._scores: dict[Choice, float] = {}
        self._cached: dict[int, tuple] = {}  # batch size -> (tick scored, tick ms, scores, by choice, best of each)
        self._best_of: dict[str, tuple[float, Choice]] = {}  # each schedule's best (score, choice) at the last score
        self._edge: dict[str, float] = {}  # running mean of log(schedule's best / best of all): `_follow`
        self._tick_ms: dict[Choice, float] = {}  # the cost model's time per tick of each choice, at the last score
        self.switched: tuple | None = None  # (from, to, top scores) when the last re-score changed the choice
        self._scored_n, self._age = -1, 0
        self._in_bucket = 0  # ticks in a row with the batch in the current batch-size bucket
        self._rng = random.Random(seed)

    def choose(self, view: LaneView | Callable[[], LaneView], costs: CostModel, drafter: bool = True,
               n: int | None = None) -> Choice:
        """The choice for the next tick. `view` may be a function making it, called only when the choices are
        re-scored (then `n`, the number of running requests, tells whether the batch changed size)."""
        picked = self._choose(view, costs, drafter, n)
        self._run = self._run + 1 if picked.schedule == self._last.schedule else 1
        self._last = picked
        return picked

    def _choose(self, view, costs: CostModel, drafter: bool, n: int | None) -> Choice:
        self.explored = False
        if not drafter:  # without a drafter only target-only decoding is possible
            return Choice("ar")
        if self.fixed is not None:
            return self.fixed
        self._age += 1
        self._since_switch += 1
        self._lived += 1
        n = view.n if isinstance(view, LaneView) else n
        self._in_bucket = self._in_bucket + 1 if self._scored_n >= 0 and bucket(n) == bucket(self._scored_n) else 1
        # Re-score when the batch changed bucket or by more than an eighth (under turnover at 16 concurrent it
        # changes by one nearly every tick, and a score of every choice is ~0.35 ms of the router's CPU, taken from
        # the cores the services share), and every `every` ticks.
        moved = bucket(n) != bucket(self._scored_n) or abs(n - self._scored_n) > self._scored_n // 8
        rescored = moved or self._age >= self.every or self.current is None
        if rescored:
            # A batch swinging between sizes (4, 4, 4, 3, ...) re-uses a size's scores for `every` ticks.
            hit = self._cached.get(n)
            if hit is not None and self._age < self.every and self._lived - hit[0] < self.every:
                _, self._tick_ms, scores, self._scores, self._best_of = hit
            else:
                view = view if isinstance(view, LaneView) else view()
                predicted = cycles(view, costs, self.options)
                self._tick_ms = {c: ms / ticks for c, (_, ms, ticks) in predicted.items()}
                # With fewer than 2 requests psd runs one batch, as sd: it is scored as sd (its correction too), so
                # a moment at one request (a wave draining) does not switch psd to sd and back.
                scores = sorted(((1e3 * tokens / ms * self.correction_of(Choice("sd", c.k) if c.schedule == "psd"
                                                                         and n < 2 else c, n), c)
                                 for c, (tokens, ms, _) in predicted.items()), key=lambda tc: -tc[0])
                self._scores, self._best_of = {c: t for t, c in scores}, {}
                for tps, c in scores:  # each schedule's best k (scores are sorted)
                    self._best_of.setdefault(c.schedule, (tps, c))
                self._cached[n] = (self._lived, self._tick_ms, scores, self._scores, self._best_of)
            self._scored_n, self._age = n, 0
            if n > self.lasting * self._ref_n or self.lasting * n < self._ref_n:
                # A lasting change of load (a burst after a quiet spell, a wave's drain): the averaged edges describe
                # another batch, and the schedule follows the new one as soon as its dwell allows. The first choice,
                # made for the first request of a burst alone, ran draft-ahead for 8 ticks of 32 requests (37 ms
                # each where psd's took 25) while the mean caught up.
                self._edge.clear()
                self._ref_n = n
            if self.current is None:
                # The first choice is often made for the first request alone (the rest of a wave is still on its
                # way): it does not hold the schedule for a dwell.
                self.switched = (None, scores[0][1], scores[:3])
                self.current, self._since_switch = scores[0][1], self.dwell
        self._follow()
        self.predicted = self._scores[self.current]
        if rescored:
            if self._lived >= self._next_probe and self._exploring is None:
                # The first round (after `every` ticks: the first ticks of a lane are prefills and arrivals)
                # measures every schedule worth it; later rounds, one schedule still measured on few ticks.
                first = self._rounds == 0
                within = self.probe_within if first else max(self.probe_within, self.reprobe_within)
                self._probes = self._worth_probing(scores, within)[:None if first else 1]
                self._next_probe = self._lived + self.reprobe * 2 ** self._rounds
                self._rounds += 1
            # The k climb runs in a bucket the batch has stayed in for `every` ticks: under arrivals the batch moves
            # between buckets every few ticks, and climbing in each of them was a quarter of auto's ticks at 4-6
            # req/s on the demo pair (the occasional exploration still measures neighbours there).
            if self._exploring is None and not self._affordable() and self._lived >= self.every and \
                    self._in_bucket >= self.every:
                self._probes = [c for c in self._unmeasured_neighbours(scores) if c not in self._probes] + \
                    self._probes
        while self._exploring is None and self._probes and \
                self._scores.get(self._probes[0], 0.0) < self.probe_within * self._top():
            self._probes.pop(0)  # no longer worth it (the batch changed since it was queued)
        if self._exploring is None and self._affordable():
            # Measure a choice the model rates close to the best; re-score when the probe is over.
            self._exploring = self._probes.pop(0)
            self._spent_ms += self._probe_cost(self._exploring)
            self._explore_left = self._probe_ticks(self._exploring)
            self._budgeted = self._exploring
            self._budgeted_ms = self._tick_ms.get(self._exploring, 0.0) / max(self.correction_of(self._exploring), 1e-3)
        elif self._exploring is None and self._rng.random() < self.explore / self.explore_ticks:
            self._budgeted = None
            same, other = self._neighbours(self.current)
            # Mostly k +- 1 (free to switch to); another schedule a third of the time (its first tick is not steady).
            near = same if same and (not other or self._rng.random() < 2 / 3) else other
            if near:  # another schedule's first tick does not count: it runs probe_ticks, so it is measured
                self._exploring = self._rng.choice(near)
                self._explore_left = self._probe_ticks(self._exploring)
        if self._exploring is not None:
            self._explore_left -= 1
            picked = self._exploring
            if self._explore_left <= 0:  # what it measured counts at once: re-score on the next tick
                self._exploring, self._age = None, self.every
                self._cached.clear()
            self.explored = True
            return picked
        self._budgeted = None
        return self.current

    def _probe_ticks(self, c: Choice) -> int:
        """A probe of another schedule than the last tick ran takes `probe_ticks` (its first tick is not steady, and
        does not count), a neighbouring k `explore_ticks`. A k climb's probe that followed another schedule's probe
        kept 2 measured ticks, fewer than a measured choice needs, and was never repeated."""
        return self.explore_ticks if c.schedule == self._last.schedule else self.probe_ticks

    def _top(self) -> float:
        return max(t for t, _ in self._best_of.values())

    def _probe_cost(self, c: Choice) -> float:
        """What probing `c` is expected to cost: its ticks' predicted time times its shortfall against the current
        choice."""
        ticks = self._probe_ticks(c)
        shortfall = 1.0 - self._scores.get(c, 0.0) / max(self._scores.get(self.current, 0.0), 1e-9)
        return ticks * self._tick_ms.get(c, 0.0) / max(self.correction_of(c), 1e-3) * max(shortfall, 0.0)

    def _affordable(self) -> bool:
        """Whether the next queued probe fits the budget: what probes cost so far stays within `probe_budget` of the
        time the lane has run. A probe of a choice rated nearly as good costs little and runs at once; one rated far
        worse waits until the lane has run long enough to pay for it (a run of the real pair at 16 concurrent is
        ~40 ticks of 1.4-8 s, and its first round of probes took 42-44% of it)."""
        return bool(self._probes) and \
            self._spent_ms + self._probe_cost(self._probes[0]) <= self.probe_budget * max(self._lived_ms, 0.0)

    def _follow(self) -> None:
        """Each tick: move each schedule's edge (the log of its best score over the best of all, a running mean
        over about `dwell` ticks) and change `current` by it. A schedule changes where another's edge beats the
        current one's by the margin (twice that for a schedule not measured yet at this batch size: its first tick
        is not steady and its score is the cost model's alone), `dwell` ticks after the last change; k follows the
        current schedule's best at once where it beats the current k by the margin (a change of k costs nothing).
        The mean is what keeps the schedule still under turnover: at 4 concurrent a finished request's successor
        joins a tick or two later, so the batch swings between 3 and 4, and the best schedule with it (draft-ahead
        at 3, psd at 4, on the demo pair); following each swing changed the schedule every dwell, 30-40% of the
        ticks of a run ran a schedule's unsteady first tick or its second best. Only a lasting change of load moves
        the mean past the margin (a 20% gain, about 6 ticks)."""
        top = self._top()
        for s, (tps, _) in self._best_of.items():
            edge = math.log(max(tps, 1e-9) / max(top, 1e-9))
            old = self._edge.get(s)
            self._edge[s] = edge if old is None else old + (edge - old) / max(self.dwell, 1)
        was, cur = self.current, self.current.schedule
        cand = max(self._edge, key=self._edge.get)
        if cand != cur and self._since_switch >= self.dwell:
            best = self._best_of[cand][1]
            margin = self.margin if self._measured(best) else 2 * self.margin
            if self._edge[cand] - self._edge.get(cur, -math.inf) > math.log1p(margin):
                self.current, self._since_switch = best, 0
        if self.current.schedule in self._best_of:
            tps, best = self._best_of[self.current.schedule]
            if best != self.current and tps > self._scores.get(self.current, 0.0) * (1 + self.margin):
                self.current = best
        if self.current != was:
            self.switched = (was, self.current, sorted(((t, c) for t, c in self._best_of.values()),
                                                       key=lambda tc: -tc[0])[:3])

    @property
    def correction(self) -> dict[str, float]:
        """Predicted / measured tick time per schedule at the current batch size (what the lane's log shows)."""
        return self.corrections.by_schedule(SCHEDULES, max(self._scored_n, 1))

    def _measured(self, c: Choice) -> bool:
        return self.corrections.measured(c, self._scored_n)

    def correction_of(self, c: Choice, n: int | None = None) -> float:
        """Predicted / measured tick time of `c` with n running requests (default: at the last score)."""
        return self.corrections.of(c, self._scored_n if n is None else n)

    def observe(self, choice: Choice, ms: float, ticks: int = 1, predicted_ms: float | None = None,
                n: int | None = None) -> None:
        """`ticks` ticks of `choice` took `ms` in all: move its corrections (predicted / measured tick time, its own
        and its schedule's) towards what they measured (`Measured`). The prediction is `predicted_ms` where the caller
        computed it from the shapes the tick ran (`tick_ms`), else the choice's expected cycle at the last score.
        Time, not tokens per second, is what is corrected: how many tokens a tick yields is the acceptance estimates'
        job, and folding their early errors in here would bias the correction for good. The first tick after a change
        of schedule is not steady (psd's first tick drafts before it can overlap, draft-ahead's has nothing drafted
        ahead yet), so it does not count; a change of k alone keeps the tick steady. `n`: the requests the tick ran
        (default: as many as at the last score)."""
        if self.fixed is not None or ms <= 0:
            return
        self._lived_ms += ms
        if choice == self._budgeted:
            # A probe was charged its predicted time; what it took beyond that is a cost of probing too (and a
            # probe faster than predicted gives some back). On the real pair in bf16 at 8 concurrent a run is 29
            # ticks: probes of three schedules, each 1.3-2.6x slower than predicted, were 12 of them.
            self._spent_ms = max(0.0, self._spent_ms + ms - ticks * self._budgeted_ms)
        predicted = predicted_ms if predicted_ms is not None else self._tick_ms.get(choice, 0.0)  # per tick
        if predicted > 0 and self._run >= 2:
            ratio = min(2.0, max(0.25, predicted * ticks / ms))
            self.corrections.update(choice, self._scored_n if n is None else n, ratio)

    def _unmeasured_neighbours(self, scores: list[tuple[float, Choice]]) -> list[Choice]:
        """Once the current choice is measured (`min_own` ticks): its k - 1 and k + 1 not yet measured, where
        predicted within `probe_within` of the best. Each is probed once (its first tick does not count if it
        changes schedule; it is not repeated), so this climbs to the best measured k and stops."""
        n, b = self._scored_n, bucket(self._scored_n)
        if self.current.schedule == "ar" or not self.corrections.measured(self.current, n):
            return []
        top, by = scores[0][0], {c: t for t, c in scores}
        out = [c for c in self._neighbours(self.current)[0] if (c, b) not in self._climbed and
               by.get(c, 0.0) >= self.probe_within * top and not self.corrections.measured(c, n)]
        self._climbed.update((c, b) for c in out)
        return out

    def _worth_probing(self, scores: list[tuple[float, Choice]], within: float) -> list[Choice]:
        """The best-scored choice of every other schedule predicted within `within` of the best, among those
        measured on fewer than 1 / weight ticks so far."""
        top, out = scores[0][0], []
        for tps, c in scores:
            if c.schedule != self.current.schedule and tps >= within * top and \
                    self.corrections.schedule_samples(c.schedule, self._scored_n) < 1.0 / self.weight and \
                    all(o.schedule != c.schedule for o in out):
                out.append(c)
        return out

    def _neighbours(self, c: Choice) -> tuple[list[Choice], list[Choice]]:
        """(the same schedule at k +- 1, the other schedules at this k)."""
        same = [o for o in self.options if o.schedule == c.schedule and abs(o.k - c.k) == 1]
        other = [o for o in self.options if o.schedule != c.schedule and (o.k == c.k or o.schedule == "ar" or
                                                                        c.schedule == "ar" and o.k == 1)]
        return same, other
